"""Group commit with the slow parts in worker threads (the source's commit policy).

``WritePath.seal`` closes the open transaction without I/O; ``WritePath.persist`` appends it
to the SAM log and fsyncs the log; ``WritePath.finish`` publishes it (in-place backlog, last
committed seq, shippers). The committer seals in the trio thread (between two awaits, so a
handler's change is never split), hands the transaction to one persister task that runs
``persist`` in a worker thread, strictly one at a time and in seal order, and calls
``finish`` back in the trio thread. Meanwhile FUSE handlers keep running and fill the next
transaction: a streaming writer does not wait for the log fsync.

``run`` also runs the flusher (``store/flusher.py``) beside the persister: it writes the
in-place backlog (``store/inplace.py``) in a worker thread under its own
``trio.CapacityLimiter``, fsyncs the block file when a checkpoint is due and lets the
checkpointer record it. While it runs, the trio thread never writes or fsyncs the block
file itself.

When to seal is the policy here too: every ``interval`` (``group_commit``), when the open
transaction grows big (``throttle``), on fsync (``commit``). The FUSE layer only calls it.
``throttle`` also bounds memory: writers wait while more than ``max_in_flight_bytes`` are
open or sealed, and while more than ``max_unflushed_bytes`` wait to be written in place.

``fsync`` waits until the transaction holding everything written so far is finished: its
log record is durable. The in-place write is not waited for.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import trio

from mirrorfs.store.errors import VolumeFailed
from mirrorfs.store.flusher import Flusher
from mirrorfs.store.volume import Volume
from mirrorfs.store.writepath import MAX_UNFLUSHED_BYTES

log = logging.getLogger(__name__)


class Failsafe(Protocol):
    """Who is told when a group commit fails (the FUSE adapter: it turns read-only)."""

    failsafe: bool

    def enter_failsafe(self, reason: str) -> None:
        """Refuse changes from now on, for ``reason``."""


class Committer:
    """Seals, queues and persists transactions of one volume, in order."""

    def __init__(
        self,
        volume: Volume,
        *,
        max_in_flight_bytes: int = 64 << 20,
        max_unflushed_bytes: int | None = None,
        flush_bytes: int = 8 << 20,
        flush_interval: float = 0.2,
    ) -> None:
        self.volume = volume
        self.max_in_flight_bytes = max_in_flight_bytes
        if max_unflushed_bytes is None:
            max_unflushed_bytes = MAX_UNFLUSHED_BYTES
        self.max_unflushed_bytes = max_unflushed_bytes
        self.flusher = Flusher(volume, flush_bytes=flush_bytes, flush_interval=flush_interval)
        self._send, self._recv = trio.open_memory_channel(math.inf)
        self._done = trio.Event()
        self._finished_seq = 0
        self._running = False

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The persister task (one transaction at a time, in seal order) and the flusher."""
        # When it ends, no flush thread runs any more (to_thread waits for its thread):
        # whoever comes next (close, drain) flushes inline.
        async with trio.open_nursery() as nursery:
            await nursery.start(self.flusher.run, name="in-place flusher")
            await self._persister(task_status)
            nursery.cancel_scope.cancel()

    async def _persister(self, task_status: trio.TaskStatus[None]) -> None:
        writer = self.volume.writer
        self._running = True
        task_status.started()
        try:
            async for txn in self._recv:
                # Shielded: once the thread runs, its result must be published (finish), or
                # the shutdown path (WritePath.drain) would persist it a second time.
                with trio.CancelScope(shield=True):
                    try:
                        await trio.to_thread.run_sync(writer.persist, txn)
                    except VolumeFailed:
                        pass  # the volume is marked failed; waiters see it
                    except Exception:
                        log.exception("persisting transaction %d failed", txn.seq)
                        if not self.volume.failed:
                            self.volume.condition.fail("unexpected error while persisting")
                    else:
                        writer.finish(txn)
                        self._finished_seq = txn.seq
                        self.flusher.note_commit()
                    self._wake()
        finally:
            self._running = False

    async def group_commit(self, interval: float, failsafe: Failsafe) -> None:
        """Seal the open transaction every ``interval`` seconds when it holds anything.

        Sealing runs inline, between two awaits, so no handler can add to the transaction
        while it is being sealed; the persister task (``run``) writes it out.
        """
        while True:
            await trio.sleep(interval)
            if failsafe.failsafe or not self.volume.writer.open_bytes:
                continue
            try:
                self.seal()
            except VolumeFailed as exc:
                failsafe.enter_failsafe(f"group commit: {exc}")
            except Exception as exc:
                log.exception("group commit failed")
                failsafe.enter_failsafe(f"group commit: {exc!r}")

    def _wake(self) -> None:
        self._done.set()
        self._done = trio.Event()

    def seal(self) -> int | None:
        """Seal the open transaction and queue it; return the seq to wait for (or None).

        Without a running persister (tests, shutdown), commits synchronously.
        """
        if not self._running:
            return self.volume.commit(sync=True)
        writer = self.volume.writer
        txn = writer.seal()
        if txn is not None:
            self._send.send_nowait(txn)
            return txn.seq
        return writer.in_flight_seq

    async def wait_for(self, seq: int | None) -> None:
        """Wait until ``seq`` is persisted and finished; VolumeFailed if it cannot be."""
        if seq is None:
            return
        while self._finished_seq < seq and self.volume.last_seq < seq:
            if self.volume.failed:
                raise VolumeFailed(self.volume.failed)
            await self._done.wait()

    async def commit(self) -> None:
        """Make everything written so far durable (fsync semantics)."""
        await self.wait_for(self.seal())

    async def throttle(self) -> None:
        """Seal when the open transaction is big; wait while too much is in flight."""
        vol = self.volume
        writer = vol.writer
        if writer.open_bytes >= self.max_in_flight_bytes // 4:
            self.seal()
        while writer.in_flight_seq is not None and writer.pending_bytes > self.max_in_flight_bytes:
            if vol.failed:
                raise VolumeFailed(vol.failed)
            await self._done.wait()
        if vol.device.driven and vol.device.backlog_bytes > self.max_unflushed_bytes:
            await self.flusher.wait_below(self.max_unflushed_bytes)
