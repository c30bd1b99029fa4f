"""The docs name files that exist, and nothing outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "operator" / "kubetune"
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
SOURCES = ("operator/**/*.py", "bench/*.py", "tests/**/*.py")
TEXTS = [*DOCS, *(path for pattern in SOURCES for path in sorted(ROOT.glob(pattern)))]
PACKAGE_PATH = re.compile(r"operator/kubetune/[\w/.-]*\w")
# A backticked module or folder of the package, as architecture.md names them: `adapters/http.py`, `k8s/`.
MODULE = re.compile(r"`((?:[a-z0-9_]+/)+(?:[a-z0-9_]+\.py)?|[a-z0-9_]+\.py)`")
# A file cited by a path that leaves its folder (two dots, a slash, then a folder and more, or a file name).
PARENT = re.compile(r"(?<![\w.])\.\./[\w-]+(?:(?:/[\w.-]+)+|\.[a-z]+)")


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=relative)
def test_every_path_of_the_package_a_doc_names_exists(doc: Path) -> None:
    missing = sorted({ref for ref in PACKAGE_PATH.findall(doc.read_text()) if not (ROOT / ref).exists()})
    assert missing == []


def test_every_module_the_architecture_page_names_exists() -> None:
    def found(ref: str) -> bool:
        return (PACKAGE / ref).exists() or (ROOT / ref).exists() or any(ROOT.glob(f"*/**/{ref.rstrip('/')}"))

    text = (ROOT / "docs" / "architecture.md").read_text()
    assert sorted({ref for ref in MODULE.findall(text) if not found(ref)}) == []


def inside(source: Path, ref: str) -> bool:
    target = (source.parent / ref).resolve()
    return ROOT in target.parents and target.exists()


@pytest.mark.parametrize("text", TEXTS, ids=relative)
def test_nothing_outside_the_repository_is_cited(text: Path) -> None:
    # A `../` path names a file next to the repository (or none): docs must stand on their own.
    assert [ref for ref in PARENT.findall(text.read_text()) if not inside(text, ref)] == []
