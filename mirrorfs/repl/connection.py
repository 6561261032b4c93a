"""One connection of a shipper, after the handshake: the sender, reader and control tasks.

``Connection.run`` starts three tasks and the first failure ends all three:

- the sender: the initial sync or resync the plan asked for, then TXN frames in sequence
  order within the window (``SourceSession.may_send``; the connection's first record, when
  larger than a chunk, as TXN_PARTs from where the target holds it, later ones whole:
  mirrorfs.repl.txn_parts.chunk_for), and VERIFY_REQ once
  caught up;
- the reader: every frame from the target, routed by ``SourceSession.handle`` (ACKs move
  the target's positions and open the window, VERIFY_REPLY goes to the resync or the verify
  channel, REFUSE ends the connection), with a silence deadline;
- the control task: PONG what the target PINGed, PING when a direction was idle
  (``Keepalive``).

The per-target state lives in the shipper (mirrorfs.repl.shipper), seen here through
``ShipperSide``; the decisions live in mirrorfs.repl.source_session. Everything the sender
does between two awaits runs without commits in between (one trio thread).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import trio

from mirrorfs.repl.initial_sync import SyncProgress, run_initial_sync
from mirrorfs.repl.lag import CommitTracker, RateMeter
from mirrorfs.repl.resync import ReplyQueue, ResyncProgress, run_resync
from mirrorfs.repl.source_session import (
    Keepalive,
    LogView,
    Route,
    ShipperState,
    SourceSession,
    SourceVolume,
    TargetPositions,
)
from mirrorfs.repl.stream import ConnectionClosed, FramedStream
from mirrorfs.repl.txn_parts import chunk_for, resume_offset, split_record
from mirrorfs.repl.verify import VerifyChannel
from mirrorfs.repl.wire import Ack, Message, Ping, ReplError, VerifyReply
from mirrorfs.store.errors import LogError, StoreError

log = logging.getLogger(__name__)

#: A record this large (by its commit's size) is read from the log in a worker thread.
READ_IN_THREAD = 1 << 20


class OutOfSync(ReplError):
    """The target needs transactions this log no longer holds (or diverged from it)."""


class Fenced(ReplError):
    """The target belongs to a newer epoch: this source is stale."""


class Wakeup:
    """The sender's doorbell: commits, ACKs, verify requests and pin drops ring it."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        """Wait for the next ring after this call."""
        self._event = trio.Event()
        await self._event.wait()


class ShipperSide(Protocol):
    """What a connection needs of its shipper (per-target state, kept across connections)."""

    volume: SourceVolume
    positions: TargetPositions
    tracker: CommitTracker
    acked: RateMeter
    verify: VerifyChannel
    wakeup: Wakeup
    on_message: dict[type[Message], Callable[[Message], None]]
    sync: SyncProgress | None
    silence: float
    keepalive: float

    @property
    def label(self) -> str: ...

    def set_state(self, state: ShipperState, reason: str = "") -> None: ...

    def log_view(self) -> LogView: ...


class Connection:
    """One connection's tasks (module docstring)."""

    def __init__(self, fs: FramedStream, side: ShipperSide, window_bytes: int) -> None:
        self.fs = fs
        self.side = side
        self.machine = SourceSession(side.label, window_bytes)
        self.resync: ResyncProgress | None = None  # a resync to run before streaming
        # (first_block, staged_txn): that resync goes on where the target's stage ends
        self.resync_resume: tuple[int, int] | None = None
        self.replies: ReplyQueue | None = None  # where VERIFY_REPLY goes while it runs
        self._log_reader: Iterator[tuple[int, bytes]] | None = None
        self._reader_next = 0
        # What the target holds of a record sent in parts: (seq, offset) from its HELLO_REPLY.
        self.resume: tuple[int, int] = (0, 0)
        self._carried_one = False  # a record went out on this connection (txn_parts.chunk_for)
        # What an empty target holds of an initial-sync copy: (S, block) from its HELLO_REPLY.
        self.copy_resume: tuple[int, int] = (0, 0)
        self._control_wake = trio.Event()
        self._scope: trio.CancelScope | None = None
        self.last_contact = 0.0  # wall clock of the last frame from the target (0: none)

    def cancel(self) -> None:
        """End the connection's tasks (retention dropped the pin)."""
        if self._scope is not None:
            self._scope.cancel()

    def close(self) -> None:
        if self._log_reader is not None:
            self._log_reader.close()  # type: ignore[attr-defined]
            self._log_reader = None

    async def run(self, next_seq: int) -> None:
        """Run sender, reader and control tasks; the first failure ends all three.

        ``next_seq`` 0: an initial sync first.
        """
        failure: list[BaseException] = []
        label = self.side.label

        async def guard(fn: Callable, *args: object) -> None:
            try:
                await fn(*args)
            except (ReplError, StoreError, OSError) as exc:
                failure.append(exc)
                nursery.cancel_scope.cancel()
            except Exception as exc:  # a bug: end this connection, keep the shipper alive
                log.exception("target %s: unexpected error in %s", label, fn.__name__)
                failure.append(ReplError(f"internal error: {exc!r}"))
                nursery.cancel_scope.cancel()

        with trio.CancelScope() as scope:
            self._scope = scope
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(guard, self._read_loop)
                    nursery.start_soon(guard, self._control_loop)
                    nursery.start_soon(guard, self._send_loop, next_seq)
            finally:
                self._scope = None
        if failure:
            raise failure[0]
        if self.side.positions.pin_dropped:
            raise OutOfSync(self.side.positions.pin_dropped)

    # ------------------------------------------------------------------ sender

    async def _prelude(self, next_seq: int) -> int:
        """The initial sync or the resync that comes before streaming; the next seq."""
        side, m = self.side, self.machine
        vol = side.volume
        if next_seq == 0:
            sync_start = side.sync.start_seq if side.sync is not None else None
            first_block = side.positions.copy_to_resume(
                sync_start, self.copy_resume, vol.block_count
            )
            if first_block:
                assert side.sync is not None
                start = side.sync.start_seq  # S+1 stayed pinned since that copy began
            else:
                start = vol.last_seq
                # Pinned before the first await, so no checkpoint can retire S+1 from under us.
                side.positions.pin_sync(start)
                side.sync = SyncProgress(start, vol.block_count)
            side.set_state(ShipperState.INITIAL_SYNC)
            m.last_sent = start
            next_seq = await run_initial_sync(
                vol, self.fs, side.sync, side.label, first_block=first_block
            )
            side.set_state(ShipperState.STREAMING)
        elif self.resync is not None:
            self.replies = ReplyQueue()
            resume = self.resync_resume
            m.last_sent = resume[1] if resume is not None else self.resync.start_seq
            try:
                next_seq = await run_resync(
                    vol, self.fs, self.resync, self.replies, side.label, resume=resume
                )
            finally:
                self.replies = None
            # RESYNCING until the target acks T applied (_on_ack)
        else:
            m.last_sent = next_seq - 1
            side.set_state(ShipperState.STREAMING)
        return next_seq

    async def _send_loop(self, next_seq: int) -> None:
        next_seq = await self._prelude(next_seq)
        side, m = self.side, self.machine
        vol = side.volume
        pending: tuple[int, bytes] | None = None
        while True:
            if pending is None and next_seq <= vol.last_seq:
                size = side.tracker.size_of(next_seq)
                if size is not None and size >= READ_IN_THREAD:
                    # Megabytes read and checked (pread, crc32: both let go of the GIL)
                    # in a worker thread, while the loop serves FUSE.
                    pending = await trio.to_thread.run_sync(self._read_record, next_seq)
                if pending is None:
                    pending = self._read_record(next_seq)
            # Everything from here to the next await runs without commits in between.
            if pending is not None:
                seq, rec = pending
                if m.may_send(len(rec)):
                    m.txn_sent(seq, len(rec))
                    side.tracker.set_size(seq, len(rec))
                    pending = None
                    next_seq = seq + 1
                    await self._send_record(seq, rec)
                    continue
            elif side.verify.wanted:
                # Caught up: every transaction up to last_seq is sent, and the digests are
                # computed before the next await, so they are of exactly that seq.
                req = side.verify.next_request(vol)
                if req is not None:
                    await self.fs.send(req)
                continue
            # Nothing to do until a commit, an ACK (window) or a verify request.
            await side.wakeup.wait()

    async def _send_record(self, seq: int, rec: bytes) -> None:
        """TXN ``seq``: one TXN frame, or TXN_PARTs from where the target holds it up to
        (mirrorfs.repl.txn_parts), so a cut connection costs one part, not the record."""
        start = resume_offset(seq, rec, *self.resume)
        if start:
            log.info(
                "target %s: resuming seq %d at byte %d of %d",
                self.side.label,
                seq,
                start,
                len(rec),
            )
        chunk = chunk_for(first_of_connection=not self._carried_one)
        for frame in split_record(seq, rec, start=start, chunk=chunk):
            await self.fs.send(frame)
        self._carried_one = True

    def _read_record(self, seq: int) -> tuple[int, bytes] | None:
        """Record ``seq`` from the log (synchronous); None if it is not committed yet."""
        try:
            if self._log_reader is None or self._reader_next != seq:
                self.close()
                self._log_reader = self.side.volume.samlog.scan_encoded(seq)
            got = next(self._log_reader, None)
        except LogError as exc:
            self._log_reader = None
            view = self.side.log_view()
            if not view.holds(seq):
                raise OutOfSync(view.missing(seq))
            raise LogError(f"cannot read seq {seq} from the log to ship it: {exc}", seq=seq)
        if got is None:
            self._log_reader = None
            return None
        self._reader_next = got[0] + 1
        return got

    # ------------------------------------------------------------------ reader / control

    async def _read_loop(self) -> None:
        silence = self.side.silence
        while True:
            with trio.move_on_after(silence):
                msg = await self.fs.receive()
                self.last_contact = time.time()
                self._handle(msg)
                continue
            raise ConnectionClosed(f"target silent for {silence:g} s")

    def _handle(self, msg: Message) -> None:
        side = self.side
        got = self.machine.handle(msg, tuple(side.on_message))
        if got.route is Route.ACK:
            assert isinstance(msg, Ack)
            self._on_ack(msg, got.acked)
        elif got.route is Route.PONG:
            self._control_wake.set()
        elif got.route is Route.VERIFY:
            assert isinstance(msg, VerifyReply)
            if self.replies is not None:
                self.replies.put(msg)  # a resync's comparison
            else:
                side.verify.on_reply(msg)
        elif got.route is Route.HOOK:
            side.on_message[type(msg)](msg)
        elif got.route is Route.FENCED:
            raise Fenced(got.text)
        elif got.route is Route.REFUSED:
            raise ConnectionClosed(got.text)

    def _on_ack(self, ack: Ack, acked: int) -> None:
        side = self.side
        if acked:
            side.acked.add(acked)
        before = side.positions.applied_seq
        r = self.resync
        end = r.end_seq if r is not None and not r.done else None
        finished = side.positions.on_ack(ack, resyncing=r is not None, resync_end=end)
        if side.positions.applied_seq != before:
            side.tracker.forget_upto(ack.applied_seq)
        if finished and r is not None:
            r.finish()
            side.set_state(ShipperState.STREAMING)
            log.info(
                "target %s: resync done in %.1f s, consistent at seq %d",
                side.label,
                r.seconds,
                ack.applied_seq,
            )
        side.wakeup.set()

    async def _control_loop(self) -> None:
        """PONG what the target PINGed; PING when a direction has been idle."""
        fs = self.fs
        ka = Keepalive(self.side.keepalive)
        ka.arm(trio.current_time(), fs.bytes_sent, fs.bytes_received)
        while True:
            self._control_wake = trio.Event()
            with trio.move_on_at(ka.next_tick):
                await self._control_wake.wait()
            for pong in self.machine.pongs():
                await fs.send(pong)
            if ka.due(trio.current_time()):
                if ka.idle(fs.bytes_sent, fs.bytes_received):
                    await fs.send(Ping(time.time_ns()))
                ka.arm(trio.current_time(), fs.bytes_sent, fs.bytes_received)
