"""The replica's own directory and volume at start: a directory that is ours to fill (an
initial sync wipes it), the volume in it, and a log with a hole cut (after archiving what
follows the hole) rather than served torn."""

from __future__ import annotations

import logging
import os

from mirrorfs.store.archive import archive_hole
from mirrorfs.store.errors import LogHole
from mirrorfs.store.files import (
    BLOCK_FILE,
    CONTROL_SOCKET,
    DAEMON_LOG_FILE,
    LOCK_FILE,
    LOG_DIR,
    NODE_FILE,
    REPLICA_PID_FILE,
)
from mirrorfs.store.nodestate import NodeState, Role
from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)

# What a directory may hold besides a volume and still count as empty: our own files, and
# the leftovers of an initial sync that never completed.
_NODE_LOCAL = {
    CONTROL_SOCKET,
    DAEMON_LOG_FILE,
    REPLICA_PID_FILE,
    LOCK_FILE,
    BLOCK_FILE,
    LOG_DIR,
    NODE_FILE + ".tmp",
}


class ReplicaError(Exception):
    """The replica cannot start (one-line message for the user)."""


def prepare_dir(volume_dir: str) -> str:
    """Absolute DIR, created if missing; ReplicaError if it holds something not ours."""
    path = os.path.abspath(volume_dir)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ReplicaError(f"{parent}: no such directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ReplicaError(f"{path} exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    if not os.path.exists(os.path.join(path, NODE_FILE)):
        foreign = sorted(set(os.listdir(path)) - _NODE_LOCAL)
        if foreign:
            # An initial sync wipes DIR: never do that to files we did not make.
            raise ReplicaError(
                f"{path} is not empty and holds no mirrorfs volume (found {foreign[0]!r})"
            )
    return path


def open_replica_volume(path: str) -> Volume | None:
    """The replica volume in ``path``, or None when it needs an initial sync."""
    if not os.path.exists(os.path.join(path, NODE_FILE)):
        return None
    state = NodeState.load(path)
    if state.sync_state:
        log.info("%s: an initial sync never completed; it restarts with the next source", path)
        return None
    if state.role == Role.SOURCE.value:
        raise ReplicaError(
            f"{path} holds the source of volume {state.volume_uuid}; a replica needs a target "
            "volume (an empty directory, or a demoted source)"
        )
    try:
        return Volume.open(path)
    except LogHole as hole:
        return _cut_at_hole(path, state, hole)


def _cut_at_hole(path: str, state: NodeState, hole: LogHole) -> Volume:
    """Acknowledged seqs are missing from the replica's own log: archive the valid records
    after the hole (the cut would throw them away), cut the log there, and stay unserved
    (not consistent, store/holes.py) until the source has resent them."""
    try:
        info = archive_hole(
            path,
            hole,
            volume_uuid=state.volume_uuid,
            node_id=state.node_id,
            epoch=state.epoch,
            block_size=state.block_size,
        )
    except OSError as exc:  # nothing is cut that could not be kept first
        raise ReplicaError(
            f"{path}: the replica's SAM log has a hole: {hole.detail}; the valid records "
            f"after it cannot be archived before the log is cut there: {exc.strerror or exc} "
            f"(mirrorfs fsck --repair {path} cuts it without archiving them)"
        ) from None
    kept = (
        f"the {info.records} valid record(s) after it (seq {info.first_seq}..{info.last_seq}) "
        f"are archived in {info.path}"
        if info is not None
        else "no valid record follows it"
    )
    log.warning(
        "%s: the replica's SAM log has a hole: %s; %s; the log is cut there and the replica "
        "asks its source for seq %d on; it is not served before seq %d is applied again",
        path,
        hole.detail,
        kept,
        hole.first,
        hole.last or hole.first,
    )
    vol = Volume.open(path, repair_log=True)
    if info is not None:  # named in node.json, so status shows it (as a diverged archive)
        entry = info.as_dict()
        st = vol.state
        st.archives = [a for a in st.archives if a.get("path") != info.path] + [entry]
        st.save(path)
    return vol
