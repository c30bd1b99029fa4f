"""The final adapter under <output>/adapter: PEFT files, tokenizer, and `kubetune.json` metadata.

The Trainer saves into a staging directory; it is cleaned, described and then renamed into place, so a reader
never sees a half-written adapter. `kubetune.json` is written before the rename and is the last file there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from kubetune import storage
from kubetune.api.v1alpha1 import AdapterStatus, TrainerConfig

WEIGHTS = "adapter_model.safetensors"
METADATA = "kubetune.json"
# Left behind by the Trainer but not part of an adapter (a pickle of the arguments; DPO's frozen reference copy).
EXTRA = ("training_args.bin", "ref")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def adapter_metadata(
    config: TrainerConfig,
    lora: dict[str, Any],
    metrics: dict[str, Any],
    dataset: dict[str, Any] | None = None,
    versions: dict[str, str] | None = None,
) -> dict[str, Any]:
    """What kubetune.json holds: where the adapter came from, its shape and how it was trained.

    `lora` is the trained adapter's actual shape ({"r", "alpha", "dropout", "targetModules"}): a DPO run that
    starts from an SFT adapter keeps that adapter's shape. `finalize` adds the weights' sha256.
    """
    spec = config.spec
    return {
        "baseModel": {"uri": spec.base_model.uri, "revision": config.base_model_revision},
        "method": spec.method.value,
        "rank": lora["r"],
        "alpha": lora["alpha"],
        "dropout": lora["dropout"],
        "targetModules": lora["targetModules"],
        "weights": WEIGHTS,
        "initAdapter": config.init_adapter_uri,
        "trainerConfig": config.to_wire(),
        "metrics": metrics,
        "dataset": dataset,
        "versions": versions or {},
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def finalize(staging: Path, final: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Clean `staging`, add the checksum and metadata, and move it to `final` (replacing an older one)."""
    for name in EXTRA:
        path = staging / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    metadata = {**metadata, "sha256": sha256_file(staging / WEIGHTS)}
    (staging / METADATA).write_text(json.dumps(metadata, indent=2, default=str))
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(final)
    return metadata


def adapter_status(config: TrainerConfig, metadata: dict[str, Any]) -> AdapterStatus:
    """status.adapter of the FineTuneJob."""
    return AdapterStatus(
        uri=storage.join(config.spec.output.uri, "adapter"),
        base_model=config.spec.base_model.uri,
        rank=metadata["rank"],
        target_modules=metadata["targetModules"],
        sha256=metadata["sha256"],
    )
