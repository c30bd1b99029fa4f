"""GPU types the planner knows: memory, dense bf16 speed, memory bandwidth and how GPUs talk.

`memory_gib` is what PyTorch reports as the card's total capacity (a little under the marketing
figure). Speeds are vendor peak figures for dense bf16 with fp32 accumulation; `matmul_efficiency` is
the fraction a large bf16 matmul reaches (790 of 989 TFLOP/s on the H200 of docs/gpu-baselines.md; the
same fraction is assumed elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Interconnect = Literal["nvlink", "pcie"]


@dataclass(frozen=True)
class GpuType:
    name: str
    display_name: str
    memory_gib: float
    bf16_tflops: float
    """Dense bf16 tensor-core peak, TFLOP/s."""
    memory_bandwidth_gbs: float
    """HBM/GDDR bandwidth, GB/s."""
    interconnect: Interconnect
    """Between GPUs of one node."""
    collective_gbs: float
    """Bus bandwidth a NCCL collective reaches between GPUs of one node, GB/s (effective, not peak)."""
    host_link_gbs: float
    """Host-to-device copy bandwidth (PCIe), GB/s."""
    host_memory_gib_per_gpu: float
    """Host RAM assumed per GPU when the pod does not state its memory (typical servers of this GPU)."""
    matmul_efficiency: float = 0.8


GPU_TYPES: dict[str, GpuType] = {
    g.name: g
    for g in (
        GpuType("rtx-4090d", "RTX 4090D", 23.65, 147.0, 1008, "pcie", 10, 20, 32),
        GpuType("rtx-4090", "RTX 4090", 23.65, 165.2, 1008, "pcie", 10, 20, 32),
        GpuType("l40s", "L40S", 44.4, 362.0, 864, "pcie", 20, 20, 64),
        GpuType("a100-40gb", "A100 40GB", 39.4, 312.0, 1555, "nvlink", 230, 20, 128),
        GpuType("a100-80gb", "A100 80GB", 79.15, 312.0, 2039, "nvlink", 230, 20, 128),
        GpuType("h100-80gb", "H100 80GB", 79.2, 989.0, 3350, "nvlink", 360, 40, 256),
        GpuType("h200", "H200", 139.8, 989.0, 4800, "nvlink", 360, 40, 256, matmul_efficiency=790 / 989),
    )
}

ALIASES = {
    "h100": "h100-80gb",
    "a100": "a100-80gb",
    "4090d": "rtx-4090d",
    "4090": "rtx-4090",
    "h200-141gb": "h200",
}

# Between nodes: a 200 Gb/s NIC per node shared by its GPUs is assumed (25 GB/s).
INTER_NODE_GBS = 25.0


def gpu_type(name: str | None) -> GpuType | None:
    """The GPU type called `name` (case-insensitive, aliases such as h100), or None when unknown."""
    if not name:
        return None
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    return GPU_TYPES.get(ALIASES.get(key, key))
