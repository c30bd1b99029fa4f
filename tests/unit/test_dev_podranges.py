"""Pod address ranges of node agents: one per state folder, kept across restarts, never two alike."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from kubetune.dev import podranges
from kubetune.dev.agent.__main__ import config_from, parser

# /proc/net/tcp and tcp6 as the kernel writes them: 127.42.0.1:8000, 10.0.0.5:22, [::ffff:127.43.0.9]:7860.
TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 01002A7F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0500000A:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
"""
TCP6 = """  sl  local_address                         remote_address                        st
   0: 0000000000000000FFFF000009002B7F:1EB4 00000000000000000000000000000000:0000 0A
   1: 00000000000000000000000001000000:0277 00000000000000000000000000000000:0000 0A
"""


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return tmp_path / "registry"


def test_sockets_bound_in_loopback_ranges_are_found_in_proc_net_tables() -> None:
    assert podranges.loopback_octets_in_use([TCP, TCP6]) == {42, 43}


def test_a_range_where_a_socket_is_bound_is_skipped(tmp_path: Path, registry: Path) -> None:
    state = (tmp_path / "agent").resolve()
    preferred = podranges.preferred_octet(state)
    with socket.socket() as busy:
        busy.bind((f"127.{preferred}.0.1", 0))
        busy.listen()
        assert preferred in podranges.sockets_in_use()
        claimed = podranges.claim_pod_range(state, registry)
    assert claimed != podranges.cidr(preferred)


def test_first_free_goes_round_the_octets() -> None:
    assert podranges.first_free({252, 253}, 252) == 2
    assert podranges.first_free(set(), 100) == 100
    assert podranges.first_free(set(podranges.OCTETS), 2) is None


def test_ranges_avoid_127_0_kwoks_127_254_and_the_old_default() -> None:
    assert {0, 1, 254, 255}.isdisjoint(podranges.OCTETS)
    assert podranges.octet_of("127.7.0.0/16") == 7
    assert podranges.octet_of("127.254.0.0/16") is None
    assert podranges.octet_of("10.7.0.0/16") is None


def test_two_state_folders_get_two_ranges_and_each_keeps_its_own(tmp_path: Path, registry: Path) -> None:
    first = podranges.claim_pod_range(tmp_path / "a", registry)
    second = podranges.claim_pod_range(tmp_path / "b", registry)
    assert first != second
    assert podranges.claim_pod_range(tmp_path / "a", registry) == first  # a restart
    assert (tmp_path / "a" / podranges.RECORD_FILE).read_text().strip() == first


def test_the_range_of_a_deleted_state_folder_is_free_again(tmp_path: Path, registry: Path) -> None:
    octet = podranges.octet_of(podranges.claim_pod_range(tmp_path / "gone", registry))
    assert octet is not None
    assert podranges.holder(registry, octet) == (tmp_path / "gone").resolve()
    shutil.rmtree(tmp_path / "gone")
    assert podranges.holder(registry, octet) is None


def test_release_gives_the_range_up(tmp_path: Path, registry: Path) -> None:
    octet = podranges.octet_of(podranges.claim_pod_range(tmp_path / "a", registry))
    assert octet is not None
    podranges.release_pod_range(tmp_path / "a", registry)
    assert podranges.holder(registry, octet) is None
    assert podranges.recorded_range(tmp_path / "a") is None


def test_a_copied_state_folder_gets_a_range_of_its_own(tmp_path: Path, registry: Path) -> None:
    original = podranges.claim_pod_range(tmp_path / "a", registry)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert podranges.claim_pod_range(tmp_path / "copy", registry) != original
    assert podranges.claim_pod_range(tmp_path / "a", registry) == original


def test_agent_without_pod_cidr_claims_a_range_for_its_state_folder(
    tmp_path: Path, registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(podranges.REGISTRY_ENV, str(registry))
    args = parser().parse_args(["--kubeconfig", "k", "--state-dir", str(tmp_path / "agent")])
    claimed = config_from(args).pod_cidr
    assert claimed == podranges.recorded_range(tmp_path / "agent")
    explicit = parser().parse_args(
        ["--kubeconfig", "k", "--state-dir", str(tmp_path / "b"), "--pod-cidr", "127.9.0.0/16"]
    )
    assert config_from(explicit).pod_cidr == "127.9.0.0/16"
    assert podranges.recorded_range(tmp_path / "b") is None
