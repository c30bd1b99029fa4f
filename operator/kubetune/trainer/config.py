"""Reading the TrainerConfig the operator renders (YAML or JSON, camelCase keys as in `to_wire()`)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from kubetune.api.v1alpha1 import TrainerConfig
from kubetune.trainer.errors import CONFIG_INVALID, TrainerFailure


def load_config(path: str | Path) -> TrainerConfig:
    """The TrainerConfig in `path`; ConfigInvalid when it cannot be read or does not validate."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise TrainerFailure(CONFIG_INVALID, f"cannot read trainer config {path}: {err}") from err
    try:
        return TrainerConfig.model_validate(data)
    except ValidationError as err:
        raise TrainerFailure(CONFIG_INVALID, f"trainer config {path} is invalid: {err}") from err
