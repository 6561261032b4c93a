"""The target's TXN pipeline for one session: group fsync off the loop, batch apply on it.

The receiver's processor (mirrorfs.repl.receiver) hands each streaming TXN to the session
machine, which takes it into the store's group (``ReplicaStore.receive_apply``). Then:

``flush``   when the reader's queue is drained (or the group is ``GROUP_BYTES`` big): a
            worker thread, under ``limiter`` (a ``trio.CapacityLimiter(1)``: one thread at a
            time owns the SAM log), validates and appends every record of the group and
            fsyncs ONCE (``GroupLog.log``, mirrorfs.repl.replica_log); meanwhile the loop
            serves FUSE requests and reads frames. Then one ACK: received = the group's
            last seq, never before the fsync returned. Then the group goes to the applier,
            through a channel of ``APPLY_QUEUE`` groups (back-pressure, bounded memory).
``apply``   the applier task: whole transactions in place, several per step
            (``ReplicaStore.apply_step``: ``on_applied`` for each in that same step, no await
            inside), the loop serving FUSE requests between steps; group N is applied while
            group N+1 is logged. An ACK when the queue is empty (or ``ACK_DELAY`` passed).
            The periodic checkpoint runs here, in worker threads, while this task applies
            nothing: the block file is fsynced beside the logging first, then the
            checkpoint proper (node.json, log retirement) under ``limiter``.
``drain``   before a frame that is not a TXN: every TXN before it is logged and applied,
            so a SWITCHOVER, VERIFY_REQ or SYNC_BEGIN sees the replica at the last TXN and
            nothing is applied while a VERIFY_REQ's digests are computed.

Why several transactions per step are still transaction-atomic for readers, and why the
in-place pwrite stays on the loop: see mirrorfs.repl.replica_store.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from mirrorfs.repl.replica_store import ReplicaStore
from mirrorfs.repl.target_session import Drop, TargetSession
from mirrorfs.store.errors import StoreError
from mirrorfs.store.txn import Transaction

log = logging.getLogger(__name__)

APPLY_QUEUE = 1  # logged groups waiting for the applier (besides the one it applies)


class TxnPipeline:
    """One session's group logging and batch applying (module docstring).

    ``ack()`` sends the ACK that is due (if any); ``dropped(drop)`` reports and ends the
    session (it raises).
    """

    def __init__(
        self,
        store: ReplicaStore,
        machine: TargetSession,
        limiter: trio.CapacityLimiter,
        *,
        ack: Callable[[], Awaitable[None]],
        dropped: Callable[[Drop], Awaitable[Any]],
    ) -> None:
        self.store = store
        self.machine = machine
        self.limiter = limiter
        self._ack = ack
        self._dropped = dropped
        self._send, self._receive = trio.open_memory_channel[list[Transaction]](APPLY_QUEUE)
        self.batches = 0  # logged groups handed to the applier and not yet applied
        self.threads = 0  # worker threads running for this session
        self._progress = trio.Event()  # set (and replaced) whenever a group is applied

    @property
    def busy(self) -> bool:
        """Work in flight: a group collected or being logged, groups not applied yet."""
        return bool(self.store.group.pending or self.batches or self.threads)

    async def _in_thread(self, fn: Callable[[], Any], limiter: trio.CapacityLimiter | None):
        self.threads += 1
        try:
            return await trio.to_thread.run_sync(fn, limiter=limiter)
        finally:
            self.threads -= 1

    async def flush(self, *, drain: bool = False) -> None:
        """Log the collected group (append, one fsync), ACK it as received and hand it to
        the applier; with ``drain``, then wait until everything logged is applied."""
        store, glog = self.store, self.store.group
        if glog.pending:
            if not store.overlap_ok:
                await self.applied_all()  # see ReplicaStore.overlap_ok
            vol = store.volume
            assert vol is not None
            group = glog.take_group(vol)
            done = await self._in_thread(lambda: glog.log(vol, group), self.limiter)
            glog.logged(vol, done)
            if done.error is not None:
                # (what was logged before it is applied by ``settle``, the session ending)
                await self._dropped(self.machine.failed("TXN", done.error).drop)
            await self._ack()  # received moved: the source's window opens now
            self.batches += 1
            await self._send.send(done.txns)
        if drain:
            await self.applied_all()

    async def applied_all(self) -> None:
        """Wait until the applier has applied every group handed to it."""
        while self.batches:
            await self._progress.wait()

    async def run_applier(self) -> None:
        """The applier task (until the session ends)."""
        store, machine = self.store, self.machine
        async with self._receive:
            async for txns in self._receive:
                pending = deque(txns)
                while pending:
                    try:
                        store.apply_step(pending)  # one step: whole transactions, no await
                    except (StoreError, OSError, ValueError) as exc:
                        await self._dropped(machine.failed("TXN", exc).drop)
                    if pending:
                        if machine.ack_due(trio.current_time()):
                            await self._ack()
                        await trio.lowlevel.checkpoint()  # FUSE requests between steps
                self.batches -= 1
                self._progress.set()
                self._progress = trio.Event()
                if not self.batches or machine.ack_due(trio.current_time()):
                    await self._ack()
                if store.checkpoints.due(store.volume):
                    await self._checkpoint()

    async def _checkpoint(self) -> None:
        # This task applies nothing meanwhile: last_seq is what the block-file fsync covers.
        vol, clock = self.store.volume, self.store.checkpoints
        assert vol is not None
        await self._in_thread(lambda: clock.presync(vol), None)
        await self._in_thread(lambda: clock.checkpoint(vol), self.limiter)
        clock.done()
