"""The source's write path: seal, persist, finish (the three-phase commit).

``VolumeCore.write`` records block images into the open transaction. Committing it is
three steps, so that the slow part can run in a worker thread (``store/committer.py``,
group commit) while FUSE handlers keep filling the next transaction:

``seal``     (volume thread, no I/O) close the open transaction, give it its seq; its
             blocks stay visible to reads until ``finish``.
``persist``  (any thread, one at a time, in seal order) append it to the SAM log and fsync
             the log: the one synchronous write, all that an fsync waits for.
``finish``   (volume thread) publish it: hand its blocks to the in-place backlog
             (``store/inplace.py``: written later by the flusher, coalesced), ``last_seq``,
             the commit listeners (shippers), maybe a checkpoint.

Write-ahead holds by construction: a transaction reaches the backlog only in ``finish``,
after its log fsync. ``commit`` is the three in a row; ``drain`` persists and finishes what
is still sealed (shutdown). Without a running flusher (``InPlaceBlocks.driven`` false:
tests, tools), ``finish`` flushes inline once the backlog passes ``max_unflushed_bytes``.
What upper layers hook in here is explicit: commit listeners (``subscribe``), the
replication's "not yet received" probe (``watch_replication``) and the write gate of the
read-write mount (``attach_gate``, a ``WriteHold``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from mirrorfs.store.checkpoint import Checkpointer
from mirrorfs.store.core import VolumeCore
from mirrorfs.store.overlay import BlockOverlay
from mirrorfs.store.txn import Transaction

log = logging.getLogger(__name__)

#: Bytes the block file may lag behind the log before writers wait (or flush inline).
MAX_UNFLUSHED_BYTES = 64 << 20

#: Called with each committed transaction, in the commit path: O(1), no I/O, no await.
CommitListener = Callable[[Transaction], None]


class WriteHold(Protocol):
    """What a planned switchover needs of the read-write mount's write gate (fuse/gate.py)."""

    refusal: int

    def close(self) -> None:
        """Hold every modifying request from now on."""

    def reopen(self) -> None:
        """Let the held requests (and later ones) go on."""

    def refuse(self, err: int = ...) -> None:
        """Answer the held requests and every later modifying one with ``err``."""

    async def commit(self) -> int:
        """Make everything written so far durable; the last committed seq."""


def _nothing_pending() -> bool:
    return False


class WritePath:
    """Seal/persist/finish over one volume's open transaction (see the module doc)."""

    def __init__(self, volume: VolumeCore, checkpointer: Checkpointer) -> None:
        self.volume = volume
        self.checkpointer = checkpointer
        self._sealed_seq = 0
        self._persisted_seq = 0
        self._listeners: list[CommitListener] = []
        self._pending: Callable[[], bool] = _nothing_pending
        self._gate: WriteHold | None = None
        self.max_unflushed_bytes = MAX_UNFLUSHED_BYTES

    # -- hooks of the upper layers
    def subscribe(self, listener: CommitListener) -> None:
        """Call ``listener`` with every transaction committed from now on."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: CommitListener) -> None:
        """Stop calling ``listener``."""
        self._listeners.remove(listener)

    def watch_replication(self, pending: Callable[[], bool]) -> None:
        """``pending()``: whether a connected target has not yet received the last commit
        (installed by the source node; the unmount waits on it, bounded)."""
        self._pending = pending

    def replication_pending(self) -> bool:
        """Whether a connected target has not yet received the last commit."""
        return self._pending()

    def attach_gate(self, gate: WriteHold) -> None:
        """The write gate of the read-write mount serving this volume (how a switchover
        holds the writers)."""
        self._gate = gate

    @property
    def gate(self) -> WriteHold | None:
        """The attached write gate, None when the volume is not mounted read-write."""
        return self._gate

    # -- sizes
    @property
    def open_bytes(self) -> int:
        """Bytes of block data in the open (not yet sealed) transaction."""
        return self.volume._overlay.nbytes

    @property
    def in_flight_seq(self) -> int | None:
        """The newest sealed transaction not finished yet, if any."""
        sealed = self.volume._sealed
        return sealed[-1][0].seq if sealed else None

    @property
    def pending_bytes(self) -> int:
        """Bytes in the open transaction plus those sealed but not yet persisted."""
        vol = self.volume
        return vol._overlay.nbytes + sum(o.nbytes for _, o in vol._sealed)

    # -- the three phases
    def commit(self) -> int | None:
        """Seal the open transaction, log it and fsync the log, publish it.

        Returns its sequence number, or None if there was nothing to commit. Its blocks go
        to the in-place backlog, written after the log fsync (write-ahead).
        """
        self.drain()
        txn = self.seal()
        if txn is None:
            self.checkpointer.maybe_checkpoint()
            return None
        self.persist(txn)
        self.finish(txn)
        return txn.seq

    def drain(self) -> None:
        """Persist and finish, here and now, every sealed transaction still pending.

        For shutdown and the synchronous ``commit``: the group committer has stopped by then.
        """
        sealed = self.volume._sealed
        while sealed:
            txn = sealed[0][0]
            if txn.seq > self._persisted_seq:
                self.persist(txn)
            self.finish(txn)

    def seal(self) -> Transaction | None:
        """Close the open transaction and give it its sequence number (no I/O).

        Its blocks stay visible to ``read`` until ``finish``; new writes go to a fresh open
        transaction. Returns None when there is nothing to commit, or when the volume is
        frozen.
        """
        vol = self.volume
        if not vol._overlay and not vol._hints:
            return None
        if vol.condition.frozen:
            return None
        vol.check_usable()
        if vol.snapshots is not None:
            vol.snapshots.flush_pending()  # checkpoints' map and table, once per transaction
        self._sealed_seq = max(self._sealed_seq, vol.last_seq) + 1
        txn = Transaction(
            seq=self._sealed_seq,
            epoch=vol.state.epoch,
            timestamp_ns=time.time_ns(),
            runs=vol._overlay.runs(),
            hints=vol._hints,
        )
        vol._sealed.append((txn, vol._overlay))
        vol._overlay = BlockOverlay(vol.block_size)
        vol._hints = []
        return txn

    def persist(self, txn: Transaction) -> int:
        """Append a sealed transaction to the log and fsync it (nothing else).

        Safe to run in a worker thread while the trio thread keeps reading and writing the
        volume, as long as persists run one at a time and in seal order (the caller holds a
        lock) and nothing else touches the log meanwhile. Returns the record size.
        """
        vol = self.volume
        vol.check_usable()
        try:
            nbytes = vol.samlog.append(txn)
            vol.samlog.sync()
        except OSError as exc:
            vol.fail(f"cannot append to the SAM log: {exc.strerror or exc}")
        self.checkpointer.note_logged(nbytes)
        self._persisted_seq = txn.seq
        return nbytes

    def finish(self, txn: Transaction) -> None:
        """Back in the volume's thread after ``persist``: publish the commit."""
        vol = self.volume
        done, _ = vol._sealed.pop(0)
        assert done is txn, "transactions finished out of order"
        # Same step as the pop: a reader in this thread finds the blocks in one layer or
        # the other, never in neither.
        vol.defer_in_place(txn.seq, txn.runs)
        vol._last_seq = txn.seq
        for listener in self._listeners:
            listener(txn)
        dev = vol.device
        if not dev.driven and dev.backlog_bytes > self.max_unflushed_bytes:
            try:
                dev.flush()
            except OSError as exc:
                # Durable in the log; the replay at the next open writes it in place.
                vol.fail(f"cannot write the block file: {exc.strerror or exc}")
        self.checkpointer.maybe_checkpoint()
