"""The dev cluster's background daemons and CLI: a daemon counts as started only once ready, restarts keep
its command line, and bad input fails before anything starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from kubetune.dev.__main__ import main
from kubetune.dev.agent import daemons
from kubetune.dev.controlplane import ControlPlane, free_ports
from kubetune.dev.lifecycle import daemon_status, with_signing_key
from kubetune.signing import Signer


def web_server(port: int) -> daemons.Daemon:
    """A daemon that is ready when its port answers (like the operator's liveness endpoint)."""
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    return daemons.Daemon(daemons.OPERATOR, argv, "http.server", health_url=f"http://127.0.0.1:{port}/")


def test_operator_listens_on_loopback_ports_of_its_own() -> None:
    daemon = daemons.operator_daemon(Path("/k"), Path("/c.yaml"), metrics_port=41001, health_port=41002)
    assert daemon.argv[daemon.argv.index("--metrics-address") + 1] == "127.0.0.1:41001"
    assert daemon.argv[daemon.argv.index("--liveness") + 1] == daemon.health_url == "http://127.0.0.1:41002/healthz"


def test_a_daemon_that_exits_at_once_is_reported_with_the_end_of_its_log(tmp_path: Path) -> None:
    script = "import sys; print('--metrics-address 127.0.0.1:8000: [Errno 98] Address in use'); sys.exit(2)"
    daemon = daemons.Daemon(daemons.OPERATOR, [sys.executable, "-c", script], "Errno", health_url="http://127.0.0.1:1/")
    with pytest.raises(RuntimeError) as error:
        daemons.start_ready(tmp_path, daemon, timeout=30)
    assert "the operator did not start: it exited" in str(error.value)
    assert "[Errno 98] Address in use" in str(error.value)
    assert daemon_status(tmp_path, daemons.OPERATOR)[0] == "exited"


def test_a_daemon_is_ready_once_it_answers_and_restarts_as_it_was(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    pid, running = daemons.start_ready(tmp_path, web_server(port), timeout=30)
    try:
        assert running == web_server(port) == daemons.recorded(tmp_path, daemons.OPERATOR)
        assert daemon_status(tmp_path, daemons.OPERATOR)[:2] == ("healthy", pid)
        # A second start finds it running and keeps its port, whatever port the new definition names.
        assert daemons.start_ready(tmp_path, web_server(port + 1), timeout=30) == (pid, running)
        new_pid = daemons.restart(tmp_path, daemons.OPERATOR, timeout=30)
        assert new_pid != pid and daemons.ready(tmp_path, running, new_pid)
    finally:
        daemons.stop(tmp_path, daemons.OPERATOR, "http.server")
    assert daemon_status(tmp_path, daemons.OPERATOR)[0] == "stopped"


def test_up_rejects_a_bad_operator_config_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "operator.yaml"
    config.write_text("gpuTypes: {x: {nodeSelectr: {a: b}}}\n")
    state = tmp_path / "state"
    assert main(["up", "--state-dir", str(state), "--operator-config", str(config)]) == 1
    error = capsys.readouterr().err
    assert f"--operator-config {config}" in error and "nodeSelectr" in error
    assert not state.exists()


def test_restart_needs_a_cluster_and_a_known_component(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["restart", "apiserver", "--state-dir", str(tmp_path)]) == 1
    assert "no cluster in" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no component 'kubelet'"):
        ControlPlane(tmp_path).restart("kubelet")
    with pytest.raises(SystemExit):
        main(["restart", "kubelet", "--state-dir", str(tmp_path)])


def test_the_dev_operator_keeps_one_signing_key_across_restarts(tmp_path: Path) -> None:
    first = yaml.safe_load(with_signing_key("server: {extraArgs: []}\n", tmp_path))
    key = Path(first["server"]["signingKeyFile"])
    assert key.parent == tmp_path and first["server"]["extraArgs"] == []
    again = yaml.safe_load(with_signing_key("{}", tmp_path))
    assert Signer.from_pem_file(again["server"]["signingKeyFile"]).public_key == Signer.from_pem_file(key).public_key
    theirs = yaml.safe_load(with_signing_key("server: {signingKeyFile: /etc/k.pem}\n", tmp_path))
    assert theirs["server"]["signingKeyFile"] == "/etc/k.pem"
