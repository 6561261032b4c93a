"""The receiver's state, status and one session's record (used by repl/receiver.py).

``ReceiverState`` and ``ReceiverStatus`` are what the control socket reports; ``_Session``
is one connected, authenticated source: its machine, its connection and why it ended.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from mirrorfs.repl.handshake import Peer
from mirrorfs.repl.stream import FramedStream
from mirrorfs.repl.target_session import TargetPhase, TargetSession
from mirrorfs.repl.txn_pipeline import TxnPipeline
from mirrorfs.repl.wire import ReplError


class ReceiverState(enum.StrEnum):
    """What the receiver is doing (the ``state`` of its status)."""

    WAITING = "waiting"  # no source has connected since the node started
    INITIAL_SYNC = "initial-sync"  # an empty target is being filled
    RESYNCING = "resyncing"  # a resync is being staged (the replica stays as it was)
    STREAMING = "streaming"  # following the source's transactions
    DISCONNECTED = "disconnected"  # the last source went away; waiting for it to return
    ERROR = "error"  # the volume cannot take more (disk full, I/O error)


class _Drop(ReplError):
    """End the session: ``str(self)`` is the one-line reason."""

    def __init__(self, reason: str, *, error: bool = False):
        super().__init__(reason)
        self.error = error  # the node itself is at fault (ERROR state), not the connection


@dataclass(slots=True)
class ReceiverStatus:
    """The receiver's status as the control socket reports it (``as_dict``)."""

    state: ReceiverState = ReceiverState.WAITING
    source_address: str = ""
    source_node_id: str = ""
    source_last_seq: int = 0  # as announced in the source's HELLO
    received_seq: int = 0
    applied_seq: int = 0
    consistent: bool = False
    last_ack_time: float = 0.0  # wall clock of the last ACK sent (0: never)
    last_contact: float = 0.0  # wall clock of the last frame from a source (0: never)
    bytes_received: int = 0  # over every session since the node started
    throughput: float = 0.0  # bytes/s received over the last THROUGHPUT_WINDOW seconds
    sync_blocks_copied: int = 0
    sync_blocks_total: int = 0  # block count of the volume being copied
    sessions: int = 0
    last_error: str = ""
    last_refused: str = ""  # the last source refused at its handshake, and why

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value, "throughput": round(self.throughput, 1)}


@dataclass(slots=True)
class _Session:
    """One connected, authenticated source: its machine and its connection."""

    fs: FramedStream
    machine: TargetSession
    address: str
    reason: str = ""
    error: bool = False
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    pipeline: TxnPipeline | None = None  # set once the session's tasks start

    @property
    def peer(self) -> Peer:
        return self.machine.peer

    def drop(self, reason: str, *, error: bool = False) -> None:
        """Record the first reason and end every task of the session."""
        if not self.reason:
            self.reason, self.error = reason, error
        self.cancel.cancel()


_PHASE_STATE = {
    TargetPhase.INITIAL_SYNC: ReceiverState.INITIAL_SYNC,
    TargetPhase.RESYNCING: ReceiverState.RESYNCING,
    TargetPhase.STREAMING: ReceiverState.STREAMING,
}
