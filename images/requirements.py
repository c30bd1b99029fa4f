"""Prints kubetune's pinned requirements from pyproject.toml, one a line: the base dependencies, then those
of each extra named after the path.

    python3 images/requirements.py pyproject.toml trainer > requirements.txt

The trainer and server images install these before they copy the source, so a change of code reuses the
layer with torch in it, and pyproject.toml stays the one place where a shared version is written.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return lines


if __name__ == "__main__":
    print("\n".join(requirements(Path(sys.argv[1]), sys.argv[2:])))
