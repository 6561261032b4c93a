"""The source side of replication: one ``Shipper`` per target.

A shipper connects to its target (``connect``, by default ``trio.open_tcp_stream`` to its
address; backoff 0.1 s doubling to 5 s), runs ``handshake_source``, then, per
mirrorfs/INTERNALS.md "Replication session":

- an initial sync if the target is empty: SYNC_BEGIN(S), the non-zero blocks of the block
  file in chunks of at most 1 MiB (holes skipped with SEEK_DATA/SEEK_HOLE, zero chunks
  skipped, lz4 when it helps), SYNC_END(T); the log is pinned from S+1 meanwhile;
- a resync (mirrorfs.repl.resync) if the target is consistent but needs transactions the log
  no longer holds: only the ranges whose checksums differ, then S+1..; the log is pinned
  from S+1 until the target has applied T;
- the same resync, as a rewind, if the target's epoch history forked from ours and it holds
  seqs past the fork (failback of an old source, mirrorfs.repl.fork): the target archives
  those seqs, and the blocks either side changed since the fork are what differs;
- then TXN frames in sequence order from the target's received_seq + 1, read verbatim from
  the SAM log, with at most ``window_bytes`` of TXN records not yet acknowledged as received;
  the first record of a connection, when larger than a chunk, goes as TXN_PART frames,
  resumed where the target's HELLO_REPLY says it holds it, later ones whole
  (mirrorfs.repl.txn_parts).

Several shippers can serve one volume (fan-out), each at its own pace.

The shipper is the trio driver of pure parts: the handshake (mirrorfs.repl.handshake), the
per-connection window, ACK checks, routing of incoming frames and keepalive timing
(``SourceSession`` and ``Keepalive``, mirrorfs.repl.source_session), and the target's
positions, pins and connection plan (``TargetPositions``, same module).

Concurrency (one trio thread):

- The commit path never waits for a shipper. ``Volume.commit`` calls ``_on_commit``
  synchronously: it notes the commit time and sets an Event, nothing else. Retention
  (``install_retention``) runs inside ``Volume.checkpoint``, also synchronously: it reads the
  shippers' positions and the log directory, and may drop a pin; it never awaits.
- Per connection, three tasks (``Connection``, mirrorfs.repl.connection): the sender (sync,
  TXN stream, VERIFY_REQ), the reader (ACK, PING, ERROR_STATE, VERIFY_REPLY) and a control
  task (PING/PONG), so that the reader never blocks on a send and ACKs keep being read while
  the sender waits for socket space.
- Block file reads for the initial sync happen between awaits, so each chunk is a state at a
  transaction boundary; the target replays S+1..T over the fuzzy copy (physical redo is
  idempotent) and is consistent at T.
- Everything the sender reads from the log is pinned (received_seq + 1 <= next seq), so a
  checkpoint that runs while the sender awaits cannot retire it, unless retention dropped
  the pin, in which case the target is out-of-sync anyway.
- A resync pins S+1 in ``TargetPositions.plan`` (synchronous, before the session's first
  await) and keeps that pin, across a lost connection too, until an ACK says T is applied:
  a target that dies after recording its group comes back at T and streams on from T+1.
  While it runs, the reader hands VERIFY_REPLY frames to the resync (``Connection.replies``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

import trio

from mirrorfs.repl.connection import Connection, Fenced, OutOfSync, Wakeup
from mirrorfs.repl.fork import judge
from mirrorfs.repl.initial_sync import SyncProgress
from mirrorfs.repl.lag import CommitTracker, RateMeter, install_retention, lag_seconds, stage_lag
from mirrorfs.repl.resync import ResyncProgress
from mirrorfs.repl.source_rounds import resync_resume
from mirrorfs.repl.source_session import LogView, Plan, PlanKind, ShipperState, TargetPositions
from mirrorfs.repl.stream import (
    ConnectionClosed,
    FramedStream,
    HandshakeRefused,
    HandshakeTimeout,
    handshake_source,
)
from mirrorfs.repl.verify import Range, VerifyChannel, VerifyError
from mirrorfs.repl.wire import Message, ProtocolError, RefuseReason, ReplError
from mirrorfs.store.errors import StoreError
from mirrorfs.store.txn import Transaction
from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
KEEPALIVE = 5.0
SILENCE = 30.0
PROBE_INTERVAL = 30.0  # how often an out-of-sync or diverged target is looked at again

Connect = Callable[[], Awaitable[trio.abc.Stream]]  # opens one connection to the target


_ROUTINE = (
    ShipperState.CONNECTING,
    ShipperState.INITIAL_SYNC,
    ShipperState.RESYNCING,
    ShipperState.STREAMING,
)


class Shipper:
    """Ships one volume's transactions to one target, until cancelled."""

    def __init__(
        self,
        volume: Volume,
        address: tuple[str, int],
        *,
        secret: bytes | None,
        node_id: str,
        window_bytes: int = 8 << 20,
        max_log_bytes: int | None = None,
        allow_initial_sync: bool = True,
        allow_resync: bool = True,
        probe_interval: float = PROBE_INTERVAL,
        keepalive: float = KEEPALIVE,
        silence: float = SILENCE,
        connect: Connect | None = None,
    ) -> None:
        self.volume = volume
        self.address = address
        # Where connections come from: TCP to ``address`` unless a test (or a relay) injects
        # another stream factory, e.g. one end of trio.testing.memory_stream_pair.
        self._connect: Connect = connect or functools.partial(trio.open_tcp_stream, *address)
        self.secret = secret
        self.node_id = node_id
        self.window_bytes = window_bytes
        self.max_log_bytes = max_log_bytes
        self.allow_initial_sync = allow_initial_sync
        self.allow_resync = allow_resync
        self.probe_interval = probe_interval
        self.keepalive = keepalive
        self.silence = silence
        self.state = ShipperState.CONNECTING
        self.reason = ""
        self.target_node_id = ""
        self.positions = TargetPositions()
        self.sync: SyncProgress | None = None
        self.resync: ResyncProgress | None = None  # the current or last resync
        self.connections = 0
        self.resumed: dict | None = None  # the last record the target held in part
        # What the target said it holds at the last handshake (received seq, and the record
        # it holds in part), and whether that was more than at the one before.
        self._held: tuple[int, int, int, int] | None = None
        self._progressed = False
        self._bytes_sent_before = 0  # wire bytes of finished connections
        self._session: Connection | None = None
        self._last_contact = 0.0  # of the connections that ended (wall clock)
        self._txns_sent_before = 0  # TXN frames of the connections that ended
        self.resyncs = 0  # resyncs started (metrics)
        self.tracker = CommitTracker()
        self.acked = RateMeter()
        self.wakeup = Wakeup()  # the sender looks again (commit, ack, verify, pin drop)
        self._retry = trio.Event()
        self.verify = VerifyChannel(self.label)
        # Replies that other modules wait for (the switchover's), by message class; called
        # by the reader between two awaits.
        self.on_message: dict[type[Message], Callable[[Message], None]] = {}
        # Called when a connection ends (a switchover request waits for its answer or this).
        self.on_session_end: list[Callable[[], None]] = []

    @property
    def label(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    @property
    def received_seq(self) -> int | None:
        """The target's received seq (None until a handshake told it)."""
        return self.positions.received_seq

    @property
    def applied_seq(self) -> int | None:
        """The target's applied seq (None until a handshake told it)."""
        return self.positions.applied_seq

    # ------------------------------------------------------------------ hooks (sync)

    def _on_commit(self, txn: Transaction) -> None:
        # Runs inside Volume.commit(): O(1), no I/O, never awaits.
        self.tracker.note(txn)
        self.wakeup.set()

    def retain_seq(self) -> int | None:
        """Lowest seq this target still needs from the log, None if it pins nothing."""
        stopped = self.state in (ShipperState.FENCED, ShipperState.OUT_OF_SYNC)
        return self.positions.retain_seq(stopped=stopped)

    def drop_pin(self, reason: str) -> None:
        """Stop pinning the log for this target; it becomes out-of-sync.

        Called from retention inside ``Volume.checkpoint`` (synchronously, in the commit path):
        it only flags, wakes the sender and cancels the connection.
        """
        self.positions.pin_dropped = reason
        self._out_of_sync(reason)
        if self._session is not None:
            self._session.cancel()
        self.wakeup.set()

    def retry(self) -> None:
        """Look at an out-of-sync, diverged or fenced target again now."""
        self._retry.set()

    def set_state(self, state: ShipperState, reason: str = "") -> None:
        # out-of-sync, error and fenced log their reasons themselves, at warning level
        if state is not self.state and state in _ROUTINE:
            log.info("target %s: %s%s", self.label, state.value, f" ({reason})" if reason else "")
        self.state = state
        self.reason = reason

    # ------------------------------------------------------------------ status

    @property
    def bytes_sent(self) -> int:
        s = self._session
        return self._bytes_sent_before + (s.fs.bytes_sent if s is not None else 0)

    def status(self) -> dict:
        """This target's state, positions, lag and throughput, as plain JSON-able data."""
        vol = self.volume
        last = vol.last_seq
        applied = self.applied_seq
        lag_txns = lag_bytes = lag_secs = None
        if applied is not None:
            lag_txns = max(0, last - applied)
            lag_bytes = self.tracker.bytes_after(applied) if lag_txns else 0
            lag_secs = round(lag_seconds(self.tracker, vol, applied), 3)
        s = self._session
        sent = s.machine.last_sent if s is not None else None
        received = self.received_seq
        contact = max(self._last_contact, s.last_contact if s is not None else 0.0)
        return {
            "address": self.label,
            "connected": s is not None,
            "sent_seq": sent,
            "last_contact": contact,
            "txns_sent": self._txns_sent_before + (s.machine.txns_sent if s is not None else 0),
            "resyncs": self.resyncs,
            "stages": {
                "committed_not_sent": stage_lag(self.tracker, vol, sent, last),
                "sent_not_received": stage_lag(self.tracker, vol, received, sent),
                "flushed_not_applied": stage_lag(self.tracker, vol, applied, received),
            },
            "state": self.state.value,
            "reason": self.reason,
            "target_node_id": self.target_node_id,
            "source_seq": last,
            "received_seq": self.received_seq,
            "applied_seq": applied,
            "lag_txns": lag_txns,
            "lag_bytes": lag_bytes,
            "lag_seconds": lag_secs,
            "throughput_bps": round(self.acked.rate(), 1),
            "bytes_sent": self.bytes_sent,
            "unacked_bytes": s.machine.unacked if s is not None else 0,
            "window_bytes": self.window_bytes,
            "initial_sync": self.sync.as_dict() if self.sync is not None else None,
            "resync": self.resync.as_dict() if self.resync is not None else None,
            "pinning": self.retain_seq() is not None,
            "connections": self.connections,
            "resumed": self.resumed,
        }

    # ------------------------------------------------------------------ verify

    async def verify_round(
        self, ranges: list[Range], *, timeout: float = 60.0
    ) -> tuple[int, list[bytes], list[bytes]]:
        """Digests of ``ranges`` on both sides at one seq: ``(seq, source, target)``."""
        if self.state is not ShipperState.STREAMING:
            raise VerifyError(f"target {self.label} is {self.state.value}, not streaming")
        return await self.verify.request(ranges, timeout=timeout, wake=self.wakeup.set)

    @property
    def session_id(self) -> int | None:
        """Which connection is up (None: none); changes when a connection ends."""
        return self.connections if self._session is not None else None

    async def send_message(self, msg: Message) -> None:
        """Send ``msg`` on the current connection, between the sender's frames."""
        s = self._session
        if s is None or self.state is not ShipperState.STREAMING:
            raise ConnectionClosed(f"target {self.label} is {self.state.value}, not streaming")
        await s.fs.send(msg)

    # ------------------------------------------------------------------ main loop

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Ship to the target until cancelled (reconnecting with backoff)."""
        self.volume.writer.subscribe(self._on_commit)
        try:
            task_status.started()
            delay = BACKOFF_MIN
            while True:
                if self._idle():
                    await self._wait_for_change()
                elif self.state is ShipperState.ERROR:
                    self.set_state(ShipperState.CONNECTING, self.reason)
                streamed = await self._connect_once()
                if streamed and self.state is not ShipperState.OUT_OF_SYNC:
                    delay = BACKOFF_MIN  # (a resync that keeps failing backs off)
                if self._progressed:
                    # The target holds more than at the handshake before: the link carries
                    # bytes, only not for long. Go on at once (bounded by the data to send).
                    self._progressed = False
                    await trio.sleep(0)
                elif not self._idle():
                    await trio.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX)
        finally:
            self.volume.writer.unsubscribe(self._on_commit)
            self.verify.fail_all("the shipper stopped")

    def _idle(self) -> bool:
        """Whether to wait for a retry() or a probe instead of reconnecting with backoff."""
        if self.state is ShipperState.FENCED:
            return True
        # An out-of-sync target that a resync can serve is reconnected like any other; one
        # that diverged (or with resync disabled) is only probed now and then.
        return self.state is ShipperState.OUT_OF_SYNC and not (
            self.allow_resync and self.positions.pin_dropped
        )

    async def _wait_for_change(self) -> None:
        # No point hammering a target we cannot serve: look again when asked to (retry()),
        # and an out-of-sync one now and then too (it may have been wiped and want an initial
        # sync). A fenced source waits for an explicit retry: a newer epoch does not go away.
        if self.state is ShipperState.FENCED:
            await self._retry.wait()
        else:
            with trio.move_on_after(self.probe_interval):
                await self._retry.wait()
        if self._retry.is_set():
            self._retry = trio.Event()  # consumed (a retry() during backoff is not lost)

    async def _connect_once(self) -> bool:
        """One connection attempt and session; True if it got as far as shipping."""
        vol = self.volume
        try:
            stream = await self._connect()
        except OSError as exc:
            self._note_failure(f"cannot connect: {exc.strerror or exc}")
            return False
        fs = FramedStream(stream)
        self.connections += 1
        streamed = False
        try:
            peer = await handshake_source(
                fs,
                secret=self.secret,
                volume_uuid=vol.uuid,
                node_id=self.node_id,
                epochs=[(e[0], e[1]) for e in vol.state.epochs],
                last_seq=vol.last_seq,
                allow_initial_sync=self.allow_initial_sync,
            )
            self.target_node_id = peer.node_id
            session = Connection(fs, self, self.window_bytes)
            session.resume = (peer.partial_seq, peer.partial_offset)
            session.copy_resume = (peer.copy_seq, peer.copy_block)
            if peer.partial_offset:
                self.resumed = {"seq": peer.partial_seq, "offset": peer.partial_offset}
            held = (
                peer.received_seq,
                peer.partial_seq,
                peer.partial_offset,
                peer.copy_block,
                peer.resync_seq,
                peer.resync_txn,
                peer.resync_block,
            )
            self._progressed = self._held is not None and held > self._held
            self._held = held
            self._session = session
            if peer.empty:
                next_seq = 0
                self.positions.forget()
            else:
                verdict = judge(vol.state.epochs, peer.epochs, peer.received_seq)
                resume = resync_resume(
                    self.resync,
                    (peer.resync_seq, peer.resync_block, peer.resync_txn),
                    peer.applied_seq,
                    verdict.fork_seq if verdict.diverged else None,
                    vol.block_count,
                )
                plan = self.positions.plan(
                    self.log_view(),
                    peer.received_seq,
                    peer.applied_seq,
                    peer.epochs,
                    allow_resync=self.allow_resync,
                    resume_seq=peer.resync_seq if resume is not None else None,
                )
                if plan.resumed:
                    session.resync_resume = resume
                next_seq = self._adopt(session, plan, peer.applied_seq)
            streamed = True
            await session.run(next_seq)
        except HandshakeRefused as exc:
            if exc.reason is RefuseReason.FENCED:
                self._fence(str(exc))
            else:
                self._note_failure(str(exc))
        except Fenced as exc:
            self._fence(str(exc))
        except OutOfSync as exc:
            self._out_of_sync(str(exc))
        except (ConnectionClosed, ProtocolError, HandshakeTimeout, OSError) as exc:
            s = self._session
            why = s.machine.peer_error if s is not None and s.machine.peer_error else str(exc)
            self._note_failure(why)
        except (ReplError, StoreError) as exc:
            log.exception("target %s: shipping failed", self.label)
            self._note_failure(str(exc))
        finally:
            self._end_session(fs)
            with trio.CancelScope(shield=True):
                await fs.aclose()
        return streamed

    def log_view(self) -> LogView:
        vol, slog = self.volume, self.volume.samlog
        return LogView(vol.last_seq, slog.first_seq, slog.last_seq, vol.state.epochs)

    def _adopt(self, s: Connection, plan: Plan, applied: int) -> int:
        """Carry out the plan for a new connection; the next seq to ship (synchronous).

        Pins that the plan set are in place before the caller's next await, so a checkpoint
        that runs meanwhile already sees them.
        """
        if self.positions.applied_seq is not None:
            self.tracker.forget_upto(self.positions.applied_seq)
        if plan.kind is PlanKind.OUT_OF_SYNC:
            raise OutOfSync(plan.reason)
        vol = self.volume
        if plan.kind is PlanKind.STREAM:
            r = self.resync
            if r is not None and not r.done and r.end_seq is not None and applied >= r.end_seq:
                r.finish()  # its group was applied after the connection that sent it ended
            self.set_state(ShipperState.STREAMING)
            return plan.next_seq
        fork = plan.verdict.fork_seq if plan.verdict is not None else None
        if plan.resumed and self.resync is not None:
            s.resync = self.resync  # goes on where the last connection left it
        else:
            s.resync_resume = None
            self.resyncs += 1
            s.resync = self.resync = ResyncProgress(
                applied, plan.start_seq, vol.block_count, fork_seq=fork
            )
        self.set_state(ShipperState.RESYNCING, plan.reason)
        if plan.kind is PlanKind.REWIND:
            log.warning("target %s %s: rewinding it by a resync", self.label, plan.reason)
        return plan.next_seq

    def _out_of_sync(self, why: str) -> None:
        # Logged when the reason changes, not at every probe.
        if (self.state, self.reason) != (ShipperState.OUT_OF_SYNC, why):
            log.warning("target %s is out-of-sync: %s", self.label, why)
        self.set_state(ShipperState.OUT_OF_SYNC, why)

    def _note_failure(self, why: str) -> None:
        if self.state is ShipperState.OUT_OF_SYNC and self.positions.pin_dropped:
            return  # retention already said why
        if (self.state, self.reason) != (ShipperState.ERROR, why):
            log.warning("target %s: %s", self.label, why)
        self.set_state(ShipperState.ERROR, why)

    def _fence(self, why: str) -> None:
        log.error("target %s: stopped shipping: %s", self.label, why)
        self.set_state(ShipperState.FENCED, why)

    def _end_session(self, fs: FramedStream) -> None:
        self._bytes_sent_before += fs.bytes_sent
        s = self._session
        self._session = None
        if s is not None:
            self._last_contact = max(self._last_contact, s.last_contact)
            self._txns_sent_before += s.machine.txns_sent
            self.verify.fail_all(f"connection to {self.label} lost during verify")
            s.close()
        for notify in list(self.on_session_end):
            notify()
        # An initial sync that did not finish keeps its pin (S+1) and progress: the target,
        # if it still holds the copy, resumes it at its next block (repl.initial_sync); if
        # not, the next one starts with a new pin, which replaces this one.


__all__ = ["Shipper", "ShipperState", "SyncProgress", "install_retention"]
