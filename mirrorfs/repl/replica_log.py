"""The replica's SAM log side of streaming: a group of TXNs logged with one fsync, and the
checkpoints of the block file behind the applier.

``GroupLog`` collects the TXNs that the session machine takes (``take``, trio thread; only
the sequence number is checked there), logs a group in a worker thread (``log``: every
record validated once and appended, then ONE fsync) and keeps the received position that
ACKs may report: while a group is being logged, the one from before it (``vol.received_seq``
moves at each append, in the thread); after ``logged``, the group's last seq. Nothing is
ever reported received before its fsync returned.

``CheckpointClock`` says when the applier should checkpoint (bytes applied or time since the
last one, with the Checkpointer's thresholds) and does it in two worker-thread parts: the
block-file fsync (``presync``, beside the logging) and the checkpoint proper (``checkpoint``,
under the log's limiter, so never beside an append or fsync of the log).

Used through mirrorfs.repl.replica_store and driven by mirrorfs.repl.txn_pipeline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from mirrorfs.store.errors import LogError
from mirrorfs.store.txn import Transaction
from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)

GROUP_BYTES = 32 << 20  # record bytes appended before one fsync, at most


@dataclass(slots=True)
class LoggedGroup:
    """What ``GroupLog.log`` did: the transactions now durable (in order) and, if one
    failed, why (the ones before it are durable all the same)."""

    txns: list[Transaction] = field(default_factory=list)
    error: Exception | None = None


class GroupLog:
    """The TXNs taken and not logged yet, and the received position ACKs may report."""

    def __init__(self) -> None:
        self._group: list[tuple[int, bytes]] = []
        self._bytes = 0
        self._taken_seq = 0  # the last seq taken (0: none since the last reset)
        self._durable_seq: int | None = None  # None: the log is durable as it stands

    def reset(self) -> None:
        """Forget the group and the sequence (a session ended; a copy or resync began)."""
        self._group, self._bytes, self._taken_seq = [], 0, 0
        self._durable_seq = None

    def take(self, vol: Volume, seq: int, record: bytes) -> None:
        """Add TXN ``seq`` to the group; LogError when it is not the next one."""
        vol.check_usable()
        expect = max(self._taken_seq, vol.received_seq) + 1
        if seq != expect:
            raise LogError(f"out of sequence: got seq {seq}, expected {expect}", seq=seq)
        self._group.append((seq, record))
        self._bytes += len(record)
        self._taken_seq = seq

    @property
    def pending(self) -> bool:
        """TXNs were taken and are not logged yet."""
        return bool(self._group)

    @property
    def full(self) -> bool:
        """The group is as large as one fsync should cover: log it now."""
        return self._bytes >= GROUP_BYTES

    def taken(self, vol: Volume) -> int:
        """The last seq taken off the wire, logged or not (status: received, not flushed)."""
        return max(self._taken_seq, vol.received_seq)

    @property
    def pending_bytes(self) -> int:
        """Record bytes taken and not handed to the logger yet."""
        return self._bytes

    def received(self, vol: Volume) -> int:
        """The received seq an ACK may report now (durable in the log)."""
        return vol.received_seq if self._durable_seq is None else self._durable_seq

    def take_group(self, vol: Volume) -> list[tuple[int, bytes]]:
        """The collected group, for ``log`` (trio thread, before the thread starts)."""
        group, self._group, self._bytes = self._group, [], 0
        if group and self._durable_seq is None:
            self._durable_seq = vol.received_seq
        return group

    @staticmethod
    def log(vol: Volume, group: list[tuple[int, bytes]]) -> LoggedGroup:
        """Validate and append every record of ``group``, then fsync once (a worker thread:
        the caller's limiter makes it the only one that touches the SAM log)."""
        applier = vol.applier
        out = LoggedGroup()
        for seq, record in group:
            try:
                out.txns.append(applier.receive(seq, record, sync=False))
            except Exception as exc:  # the ones before it are logged: they count
                out.error = exc
                break
        if out.txns:
            try:
                applier.sync_log()
            except Exception as exc:  # the volume is failed: nothing of the group counts
                return LoggedGroup([], exc)
        return out

    def logged(self, vol: Volume, done: LoggedGroup) -> None:
        """``log`` returned (trio thread): its transactions may be acked as received."""
        if done.txns:
            self._durable_seq = done.txns[-1].seq
        if self._durable_seq == vol.received_seq and not vol.failed:
            self._durable_seq = None


class CheckpointClock:
    """When the applier checkpoints the replica, and the two parts of doing it."""

    def __init__(self) -> None:
        self._applied_bytes = 0  # in-place bytes since the last checkpoint
        self._since = time.monotonic()

    def applied(self, nbytes: int) -> None:
        self._applied_bytes += nbytes

    def due(self, vol: Volume | None) -> bool:
        """Enough was applied (bytes or time) since the last checkpoint."""
        if vol is None or vol.failed or vol.state.checkpointed_seq == vol.last_seq:
            return False
        ck = vol.checkpointer
        elapsed = time.monotonic() - self._since
        return self._applied_bytes >= ck.every_bytes or elapsed >= ck.every_seconds

    @staticmethod
    def presync(vol: Volume) -> None:
        """fsync the block file (a worker thread, beside the logging; the caller applies
        nothing meanwhile): the checkpoint's own fsync then has little left to write."""
        vol.device.sync()

    @staticmethod
    def checkpoint(vol: Volume) -> None:
        """The checkpoint proper (a worker thread under the log's limiter; nothing is
        applied meanwhile, so ``last_seq`` is what the block-file fsync covers)."""
        vol.checkpointer.checkpoint()

    def done(self) -> None:
        """``checkpoint`` returned (trio thread)."""
        self._applied_bytes = 0
        self._since = time.monotonic()
