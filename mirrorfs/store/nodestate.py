"""Node-local state of a volume directory (``node.json``): never part of the block file.

Two nodes holding the same volume at the same sequence number have byte-identical block
files; everything that differs between them (node id, role, epoch history, positions) lives
here. The file is small and replaced atomically (write, fsync, rename, fsync the directory).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import uuid as uuidlib
from dataclasses import asdict, dataclass, field

from mirrorfs.store.errors import VolumeError
from mirrorfs.store.files import NODE_FILE, atomic_write

log = logging.getLogger(__name__)

FORMAT = 1


class Role(enum.StrEnum):
    SOURCE = "source"
    TARGET = "target"


@dataclass(slots=True)
class NodeState:
    """What this node knows about its copy of the volume."""

    volume_uuid: str  # hex
    block_size: int
    node_id: str = field(default_factory=lambda: uuidlib.uuid4().hex[:16])
    role: str = Role.SOURCE.value
    # (epoch, first sequence number of that epoch), oldest first
    epochs: list[list[int]] = field(default_factory=lambda: [[1, 1]])
    # every transaction up to here is in the block file and fsynced
    checkpointed_seq: int = 0
    # "" when the block file is consistent; "full" while an initial sync is filling it (the
    # replica becomes consistent once it has applied ``consistent_at``)
    sync_state: str = ""
    consistent_at: int = 0
    # Set while a staged resync group is being applied (``Volume.commit_resync``):
    # {"start_seq": S, "consistent_at": T, "stage": file name}. A volume opened with it set
    # redoes the group before anything else; None otherwise.
    resync: dict | None = None
    # A demoted source keeps its log from this seq on (0: no such pin) until a new source
    # has told it the fork point: its unshipped transactions are archived, never retired.
    keep_log_from: int = 0
    # Diverged transactions kept aside on failback (mirrorfs.store.archive), newest last:
    # {"path", "epoch", "fork_seq", "first_seq", "last_seq", "records", "note", ...}.
    archives: list[dict] = field(default_factory=list)

    @property
    def epoch(self) -> int:
        return self.epochs[-1][0]

    def save(self, directory: str) -> None:
        data = json.dumps({"format": FORMAT, **asdict(self)}, indent=1).encode() + b"\n"
        atomic_write(os.path.join(directory, NODE_FILE), data)

    @classmethod
    def load(cls, directory: str) -> NodeState:
        path = os.path.join(directory, NODE_FILE)
        try:
            with open(path, "rb") as f:
                raw = json.loads(f.read())
        except FileNotFoundError:
            raise VolumeError(f"{directory}: not a mirrorfs volume ({NODE_FILE} is missing)")
        except (OSError, ValueError) as exc:
            raise VolumeError(f"{path}: unreadable node state: {exc}")
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise VolumeError(f"{path}: unknown node state format")
        raw.pop("format")
        try:
            state = cls(**raw)
            int(state.volume_uuid, 16)
            if state.role not in {r.value for r in Role} or not state.epochs:
                raise ValueError("bad role or epochs")
        except (TypeError, ValueError) as exc:
            raise VolumeError(f"{path}: damaged node state: {exc}")
        return state
