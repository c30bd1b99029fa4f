"""Pod address ranges of node agents: a /16 of 127.0.0.0/8 per agent state folder, never two alike on a machine.

Every agent of a machine, whatever its cluster, shares the machine's loopback network, so two agents that
gave out the same pod address would see each other's servers. Each agent state folder therefore holds a
range of its own: claimed in a registry folder that every cluster of the machine shares (one file per
range, ``127.N``, naming the state folder that holds it) and recorded in the state folder itself
(``pod-cidr``), so that a restart gets the same range back. A claim is alive while the state folder it
names records that range; a claim whose folder is gone (``dev down --purge``, a deleted test folder) is
free again. Ranges in which a socket is open are skipped too: an agent started with an explicit
``--pod-cidr`` claims nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

REGISTRY_ENV = "KUBETUNE_DEV_REGISTRY"
RECORD_FILE = "pod-cidr"
# 127.0/16 holds 127.0.0.1, the address of every component and of hostNetwork pods; 127.254/16 is where kwok
# places the simulated pods (controlplane.py); 127.1/16 was the agents' fixed range before ranges were claimed.
OCTETS = range(2, 254)
PROC_NET = ("tcp", "tcp6", "udp", "udp6")


def cidr(octet: int) -> str:
    """The range ``127.<octet>.0.0/16``."""
    return f"127.{octet}.0.0/16"


def octet_of(text: str) -> int | None:
    """N of a range ``127.N.0.0/16`` among :data:`OCTETS`, else None."""
    parts = text.strip().removesuffix("/16").split(".")
    if len(parts) != 4 or parts[0] != "127" or parts[2:] != ["0", "0"] or not parts[1].isdigit():
        return None
    return int(parts[1]) if int(parts[1]) in OCTETS else None


def default_registry() -> Path:
    """``$KUBETUNE_DEV_REGISTRY``, else ``<temp>/kubetune-dev/pod-ranges`` (shared by every cluster of the machine)."""
    return Path(os.environ.get(REGISTRY_ENV) or Path(tempfile.gettempdir()) / "kubetune-dev" / "pod-ranges")


def loopback_octets_in_use(proc_net_tables: Iterable[str]) -> set[int]:
    """Second octets of the 127/8 addresses that sockets are bound to, from /proc/net/{tcp,udp}[6] tables."""
    octets = set()
    for table in proc_net_tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 2:
                continue
            address = fields[1].split(":")[0]
            # IPv4 is one little-endian word; IPv6 four, the IPv4-mapped form (::ffff:a.b.c.d) ending in a.b.c.d.
            if len(address) == 32 and address[:24].upper() == "0000000000000000FFFF0000":
                address = address[24:]
            if len(address) == 8:
                raw = bytes.fromhex(address)[::-1]
                if raw[0] == 127:
                    octets.add(raw[1])
    return octets


def sockets_in_use() -> set[int]:
    """:func:`loopback_octets_in_use` of this machine (this network namespace) now."""
    tables = []
    for name in PROC_NET:
        with contextlib.suppress(OSError):
            tables.append(Path("/proc/net", name).read_text())
    return loopback_octets_in_use(tables)


def preferred_octet(state_dir: Path) -> int:
    """Where the search for a free range starts: derived from the folder, so that a folder tends to keep its range
    even when its record is lost, and two folders rarely try the same one first."""
    digest = hashlib.sha256(str(state_dir).encode()).digest()
    return OCTETS[int.from_bytes(digest[:4], "big") % len(OCTETS)]


def first_free(taken: set[int], start: int) -> int | None:
    """The first octet of :data:`OCTETS` not in ``taken``, going round from ``start``."""
    offset = OCTETS.index(start)
    for step in range(len(OCTETS)):
        octet = OCTETS[(offset + step) % len(OCTETS)]
        if octet not in taken:
            return octet
    return None


def recorded_range(state_dir: Path) -> str | None:
    """The range recorded in ``state_dir``, if any."""
    try:
        text = (state_dir / RECORD_FILE).read_text().strip()
    except OSError:
        return None
    return text if octet_of(text) is not None else None


def holder(registry: Path, octet: int) -> Path | None:
    """The state folder whose claim on ``octet`` is alive, if any."""
    try:
        folder = Path((registry / f"127.{octet}").read_text().strip())
    except OSError:
        return None
    return folder if folder.is_absolute() and recorded_range(folder) == cidr(octet) else None


@contextlib.contextmanager
def locked(registry: Path) -> Iterator[None]:
    """The registry, locked against other processes that claim or release at the same time."""
    registry.mkdir(parents=True, exist_ok=True)
    with (registry / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def claim_pod_range(state_dir: Path, registry: Path | None = None) -> str:
    """The range of the agent state folder ``state_dir``: the one recorded there, else a free one; claimed."""
    registry = registry or default_registry()
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    with locked(registry):
        recorded = recorded_range(state_dir)
        if recorded is not None:
            octet = octet_of(recorded)
            assert octet is not None
            owner = holder(registry, octet)
            if owner is None or owner == state_dir:  # ours, or lost from the registry: claimed again
                (registry / f"127.{octet}").write_text(f"{state_dir}\n")
                return recorded
            # A copy of another folder (same record, another path): that folder keeps the range.
        taken = {octet for octet in OCTETS if holder(registry, octet) is not None} | sockets_in_use()
        free = first_free(taken, preferred_octet(state_dir))
        if free is None:
            raise RuntimeError(f"no free pod address range left in 127.0.0.0/8 (claims in {registry})")
        (registry / f"127.{free}").write_text(f"{state_dir}\n")
        (state_dir / RECORD_FILE).write_text(f"{cidr(free)}\n")
        return cidr(free)


def release_pod_range(state_dir: Path, registry: Path | None = None) -> None:
    """Give up the claim of ``state_dir`` (before the folder is deleted)."""
    registry = registry or default_registry()
    state_dir = state_dir.resolve()
    recorded = recorded_range(state_dir)
    octet = octet_of(recorded) if recorded else None
    if octet is None:
        return
    with locked(registry):
        if holder(registry, octet) == state_dir:
            (registry / f"127.{octet}").unlink(missing_ok=True)
        (state_dir / RECORD_FILE).unlink(missing_ok=True)
