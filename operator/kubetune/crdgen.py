"""Generate the CustomResourceDefinitions from the API models.

    python -m kubetune.crdgen --output-dir crds/

Pydantic's JSON schema is turned into a Kubernetes structural schema: references inlined, optional
fields as `nullable`, int-or-string kept as `x-kubernetes-int-or-string`, draft-2020 exclusive bounds
turned into OpenAPI v3.0 form, and keywords the API server refuses (`additionalProperties: false`,
`title`, `$defs`) dropped.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import re
from pathlib import Path
from typing import Any

import yaml

from kubetune.api.v1alpha1 import GROUP, KINDS, VERSION, KubeModel
from kubetune.render.trainer_access import status_policy

CATEGORY = "kubetune"
_DROPPED_KEYS = {"title", "$defs", "examples", "const"}
_KEY_ORDER = ("type", "description", "default", "enum", "required", "properties")


def _clean_description(text: str) -> str:
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(text))
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline `$ref`, keeping keywords written beside the reference (they win over the target's)."""
    if "$ref" not in node:
        return node
    target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def structural(node: Any, defs: dict[str, Any]) -> Any:
    """Rewrite one pydantic JSON-schema node (recursively) into a structural OpenAPI v3 schema."""
    if isinstance(node, list):
        return [structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = _resolve(node, defs)
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = _resolve(node["allOf"][0], defs)
        node = {**inner, **{k: v for k, v in node.items() if k != "allOf"}}

    variants = node.get("anyOf")
    if variants is not None:
        non_null = [v for v in variants if v.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(non_null) < len(variants):
            rest["nullable"] = True
        if len(non_null) == 1:
            node = {**_resolve(non_null[0], defs), **rest}
        elif {v.get("type") for v in non_null} == {"integer", "string"}:
            node = {**rest, "x-kubernetes-int-or-string": True}
        else:
            raise ValueError(f"cannot express anyOf {variants} in a structural schema")

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "description":
            out[key] = _clean_description(value)
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "default" and value is None:
            continue
        elif key == "properties":
            out[key] = {name: structural(prop, defs) for name, prop in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = structural(value, defs)
        else:
            out[key] = copy.deepcopy(value)
    if "const" in node:
        out["enum"] = [node["const"]]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    elif "type" not in out and "properties" in out:
        out["type"] = "object"
    first = [k for k in _KEY_ORDER if k in out]
    return {k: out[k] for k in first + [k for k in out if k not in _KEY_ORDER]}


def _object_schema(model: type[KubeModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    return structural(raw, defs)


def crd_for(kind: type[KubeModel]) -> dict[str, Any]:
    """The CustomResourceDefinition of one top-level API model (FineTuneJob, ModelServer)."""
    name = kind.__name__
    plural: str = kind.plural  # type: ignore[attr-defined]
    spec_model = kind.model_fields["spec"].annotation
    status_model = kind.model_fields["status"].annotation
    assert isinstance(spec_model, type) and isinstance(status_model, type)
    spec = _object_schema(spec_model)
    status = _object_schema(status_model)
    schema = {
        "type": "object",
        "description": _clean_description(kind.__doc__ or ""),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object: kubetune.io/v1alpha1."},
            "kind": {"type": "string", "description": f"Kind of this object: {name}."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    if rules := kind.__dict__.get("rules"):
        schema["x-kubernetes-validations"] = [r.as_schema() for r in rules]
    subresources: dict[str, Any] = {"status": {}}
    # A kind that autoscalers may scale names its replica paths (ModelServer.scale_subresource).
    if scale := getattr(kind, "scale_subresource", None):
        subresources["scale"] = dict(scale)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": name,
                "listKind": f"{name}List",
                "plural": plural,
                "singular": name.lower(),
                "shortNames": list(kind.short_names),  # type: ignore[attr-defined]
                "categories": [CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": subresources,
                    "additionalPrinterColumns": list(kind.printer_columns),  # type: ignore[attr-defined]
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def crd_files() -> dict[str, str]:
    """File name -> YAML text of every CRD."""
    files = {}
    for kind in KINDS:
        crd = crd_for(kind)
        header = "# Generated by `python -m kubetune.crdgen` from operator/kubetune/api. Do not edit.\n"
        files[f"{crd['metadata']['name'].split('.', 1)[1]}_{crd['spec']['names']['plural']}.yaml"] = (
            header + yaml.safe_dump(crd, sort_keys=False, width=100)
        )
    return files


POLICY_FILE = "kubetune.io_trainer-status-policy.yaml"


def api_files() -> dict[str, str]:
    """File name -> YAML text of everything in crds/: the CRDs and the admission policy that keeps each
    training pod to its own job's status (render/trainer_access.py), which `kubectl apply -f crds` needs too."""
    header = "# Generated by `python -m kubetune.crdgen` from render/trainer_access.py. Do not edit.\n"
    policy = header + yaml.safe_dump_all(status_policy(), sort_keys=False, width=100)
    return {**crd_files(), POLICY_FILE: policy}


def _type_of(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    kind = str(node.get("type", ""))
    if kind == "array":
        return f"[]{_type_of(node.get('items', {}))}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map[string]{_type_of(node['additionalProperties'])}"
    return kind


def _rows(node: dict[str, Any], path: str) -> list[str]:
    rows = []
    required = set(node.get("required", []))
    for name, prop in node.get("properties", {}).items():
        field = f"{path}.{name}" if path else name
        bits = []
        if "default" in prop and prop["default"] not in ({}, []):
            bits.append(f"default `{json.dumps(prop['default'])}`")
        if "enum" in prop:
            bits.append("one of " + ", ".join(f"`{v}`" for v in prop["enum"]))
        if "minimum" in prop:
            bits.append(f"{'>' if prop.get('exclusiveMinimum') else '>='} {prop['minimum']}")
        if "maximum" in prop:
            bits.append(f"{'<' if prop.get('exclusiveMaximum') else '<='} {prop['maximum']}")
        for key in ("minLength", "maxLength", "minItems", "maxItems"):
            if key in prop:
                bits.append(f"{key} {prop[key]}")
        rules = [r["message"] for r in prop.get("x-kubernetes-validations", [])]
        description = prop.get("description", "").replace("\n", " ").replace("|", "\\|")
        extra = "; ".join(bits + [f"rule: {m}" for m in rules]).replace("|", "\\|")
        req = " (required)" if name in required else ""
        rows.append(f"| `{field}`{req} | {_type_of(prop)} | {description} | {extra} |")
        child = prop.get("items", prop) if prop.get("type") == "array" else prop
        if child.get("properties"):
            rows += _rows(child, field + ("[]" if prop.get("type") == "array" else ""))
    return rows


def api_markdown() -> str:
    """docs/api.md: every field of both kinds, from the same schemas as the CRDs."""
    out = [
        "# The kubetune API (kubetune.io/v1alpha1)",
        "",
        "Generated by `python -m kubetune.crdgen --docs docs/api.md` from the models in",
        "`operator/kubetune/api/v1alpha1/`; `kubectl explain finetunejob.spec` shows the same descriptions.",
        "Object-level rules (CEL, checked by the API server and by the models) are listed under each section.",
    ]
    for kind in KINDS:
        crd = crd_for(kind)
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        out += ["", f"## {kind.__name__}", "", schema["description"], ""]
        for part in ("spec", "status"):
            node = schema["properties"][part]
            out += [f"### {part}", "", node.get("description", ""), ""]
            rules = _object_rules(node, part)
            if rules:
                out += ["Rules:", "", *(f"- {r}" for r in rules), ""]
            out += ["| field | type | description | constraints |", "|---|---|---|---|", *_rows(node, part)]
            out.append("")
        columns = ", ".join(c["name"].upper() for c in crd["spec"]["versions"][0]["additionalPrinterColumns"])
        names = crd["spec"]["names"]
        out += [f"`kubectl get {names['plural']}` (short name `{names['shortNames'][0]}`) shows {columns}.", ""]
    return "\n".join(out).rstrip() + "\n"


def _object_rules(node: dict[str, Any], path: str) -> list[str]:
    found = [f"`{path}`: {r['message']}" for r in node.get("x-kubernetes-validations", [])]
    for name, prop in node.get("properties", {}).items():
        child = prop.get("items", prop) if prop.get("type") == "array" else prop
        if child.get("properties"):
            found += _object_rules(child, f"{path}.{name}")
    return found


def write(output_dir: Path) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in api_files().items():
        path = output_dir / name
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune crds", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("crds"), help="directory for the YAML files")
    parser.add_argument("--docs", type=Path, help="also write the API reference (markdown) to this file")
    args = parser.parse_args(argv)
    for path in write(args.output_dir):
        print(path)
    if args.docs:
        args.docs.write_text(api_markdown())
        print(args.docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
