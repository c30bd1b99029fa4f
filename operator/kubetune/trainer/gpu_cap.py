"""A cap on this rank's GPU memory, for benchmarks that emulate a smaller card on a larger one.

`KUBETUNE_GPU_MEMORY_CAP_GIB` (GiB, a positive number) limits PyTorch's caching allocator of the rank's GPU with
torch.cuda.set_per_process_memory_fraction: an allocation past it fails with the out-of-memory error a card of that
size would give. The CUDA context and NCCL's buffers are outside the allocator, so a caller emulating a card
subtracts them from the card's memory. bench/trainer_multigpu.py sets it to emulate 24 GB cards; the operator
never does. Without the variable, or without a GPU, nothing is capped.
"""

from __future__ import annotations

from collections.abc import Mapping

CAP_ENV = "KUBETUNE_GPU_MEMORY_CAP_GIB"
GIB = 2**30


def cap_fraction(value: str | None, total_bytes: int) -> float | None:
    """The share of a GPU of `total_bytes` that a cap of `value` GiB allows (at most 1); None without a cap."""
    if value is None or not value.strip():
        return None
    try:
        gib = float(value)
    except ValueError:
        gib = -1.0
    if not gib > 0:
        raise ValueError(f"{CAP_ENV}={value!r}: expected a positive number of GiB")
    return min(1.0, gib * GIB / total_bytes)


def cap_gpu_memory(env: Mapping[str, str]) -> float | None:  # pragma: no cover - needs a GPU
    """Apply the cap of `env` to this rank's GPU (LOCAL_RANK); returns the fraction set, or None."""
    if not env.get(CAP_ENV):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    device = int(env.get("LOCAL_RANK", "0"))
    fraction = cap_fraction(env[CAP_ENV], torch.cuda.get_device_properties(device).total_memory)
    assert fraction is not None
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
