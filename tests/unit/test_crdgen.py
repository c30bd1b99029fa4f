"""CRD generation: structural schemas, descriptions, rules, and no drift from crds/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.crdgen import api_files, crd_files

CRDS = Path(__file__).resolve().parents[2] / "crds"
GENERATED = {name: yaml.safe_load(text) for name, text in crd_files().items()}


def schema_of(name: str) -> dict[str, Any]:
    return GENERATED[name]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.get("properties", {}).items():
            yield from walk(value, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_crds_directory_matches_the_models() -> None:
    on_disk = {p.name: p.read_text() for p in CRDS.glob("*.yaml")}
    assert on_disk == dict(api_files()), "crds/ is stale: run `python -m kubetune.crdgen --output-dir crds`"


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_schema_is_structural(name: str) -> None:
    for path, node in walk(schema_of(name)):
        assert "$ref" not in node and "$defs" not in node, path
        assert node.get("additionalProperties") is not False, path
        assert "title" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
        else:
            assert "type" in node, f"{path} has no type"
        assert "anyOf" not in node, f"{path}: use nullable or int-or-string"


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_every_field_is_described(name: str) -> None:
    undocumented = [
        path
        for path, node in walk(schema_of(name))
        if path.count(".") >= 2
        and "description" not in node
        and not path.startswith(".metadata")
        and not path.endswith("[]")
        and not path.endswith("{}")
    ]
    assert undocumented == []


def test_finetunejob_names_columns_and_subresources() -> None:
    crd = GENERATED["kubetune.io_finetunejobs.yaml"]
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["ftj"] and names["categories"] == ["kubetune"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Method",
        "Model",
        "State",
        "Prepared",
        "Progress",
        "Loss",
        "ETA",
        "Age",
    ]


def test_modelserver_names_and_columns() -> None:
    crd = GENERATED["kubetune.io_modelservers.yaml"]
    assert crd["spec"]["names"]["shortNames"] == ["msrv"]
    columns = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["Model", "State", "Ready", "Adapters", "Endpoint", "Age"]


def test_defaults_bounds_enums_and_rules_reach_the_schema() -> None:
    spec = schema_of("kubetune.io_finetunejobs.yaml")["properties"]["spec"]
    lora = spec["properties"]["lora"]
    assert lora["default"] == {}
    assert lora["properties"]["r"] == {
        "type": "integer",
        "description": "Rank of the low-rank update matrices.",
        "default": 64,
        "maximum": 1024,
        "minimum": 1,
    }
    assert lora["properties"]["alpha"]["exclusiveMinimum"] is True
    assert spec["properties"]["method"]["enum"] == ["SFT", "DPO"]
    assert spec["properties"]["method"]["x-kubernetes-validations"][0]["rule"] == "self == oldSelf"
    messages = [r["message"] for r in spec["x-kubernetes-validations"]]
    assert any("fromFineTuneJob is only allowed with method DPO" in m for m in messages)
    assert spec["properties"]["fromFineTuneJob"]["nullable"] is True
    assert spec["properties"]["distributed"]["properties"]["zeroStage"]["x-kubernetes-int-or-string"] is True


def test_api_reference_matches_the_models() -> None:
    from kubetune.crdgen import api_markdown

    docs = Path(__file__).resolve().parents[2] / "docs" / "api.md"
    assert docs.read_text() == api_markdown(), (
        "docs/api.md is stale: run `python -m kubetune.crdgen --docs docs/api.md`"
    )
    for text in ("`spec.lora.r`", "fromFineTuneJob is only allowed with method DPO", "`status.progress.eta`"):
        assert text in docs.read_text()
