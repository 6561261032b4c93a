"""The target's half of a replication session, as a pure state machine.

``TargetSession`` takes each frame the source sent after the handshake (``handle``) and
decides, per mirrorfs/INTERNALS.md "Replication session": which frames are welcome in which
phase, what goes to the store (receive and apply, initial-sync copy, resync stage), what to
answer (PONG, SWITCHOVER_DONE, VERIFY_REPLY once applied reaches the asked seq), when to
acknowledge (coalesced, never held back more than ``ack_delay``), when to PING, and when to
drop the connection and with which one-line reason. It does no I/O of its own: no trio, no
sockets, no clock (``now`` is passed in); the store is what the caller gives it, behind the
``TargetStore`` protocol (mirrorfs.repl.replica_store adapts a Volume), and its calls are
synchronous, so each ``handle`` is one step between two awaits of the driver
(mirrorfs.repl.receiver).

Phases::

    INITIAL_SYNC   empty target: SYNC_BEGIN(FULL), SYNC_BLOCKS*, SYNC_END; nothing acked yet
    STREAMING      TXN applied in order; SYNC_BEGIN(RESYNC) starts a resync
    RESYNCING      SYNC_BLOCKS / SYNC_END / TXN staged; applied as one group once complete

A replica that diverged after ``fork_seq`` (failback) takes no TXN until a rewind resync,
and acknowledges (fork_seq, fork_seq) until then.
"""

from __future__ import annotations

import enum
import errno
import logging
from dataclasses import dataclass, field
from typing import Protocol

from mirrorfs.repl.handshake import Peer
from mirrorfs.repl.wire import (
    Ack,
    ErrorState,
    Message,
    PeerState,
    Ping,
    Pong,
    ProtocolError,
    Refuse,
    Switchover,
    SwitchoverDone,
    SwitchoverResult,
    SyncBegin,
    SyncBlocks,
    SyncEnd,
    SyncKind,
    Txn,
    TxnPart,
    VerifyReply,
    VerifyReq,
)
from mirrorfs.store.errors import StoreError, VolumeFailed

log = logging.getLogger(__name__)

ACK_DELAY = 0.05  # never hold an ACK back longer than this while draining
KEEPALIVE = 5.0  # send a PING after this long without sending anything


class ResyncStage(Protocol):
    """A resync being staged (mirrorfs.repl.resync.TargetResync); nothing is applied."""

    def on_blocks(self, msg: SyncBlocks) -> None: ...

    def on_end(self, msg: SyncEnd) -> bool:
        """SYNC_END(T); True when the group is complete."""

    def on_txn(self, msg: Txn) -> bool:
        """TXN S+1..T staged; True when the group is complete."""

    def positions(self) -> tuple[int, int]:
        """(received, applied) for an ACK while staging."""


class TargetStore(Protocol):
    """What a target session needs of its replica store; every call is synchronous.

    The hooks above the store (caches, mounts) run inside these calls, so that a
    transaction and what it tells the layers above are one step of the event loop.
    """

    @property
    def present(self) -> bool:
        """A volume exists (it may still be an initial-sync copy)."""

    @property
    def is_source(self) -> bool:
        """This node was promoted."""

    @property
    def applied_seq(self) -> int: ...

    @property
    def block_count(self) -> int: ...

    def positions(self) -> tuple[int, int]:
        """(received, applied) as an ACK reports them outside a resync."""

    def take_part(self, part: TxnPart) -> bytes | None:
        """Keep TXN_PART ``part`` (across sessions); the whole record once it is complete
        and its crc32 checks (mirrorfs.repl.txn_parts). ProtocolError if it does not
        continue what is held."""

    def receive_apply(self, seq: int, record: bytes) -> None:
        """Take TXN ``seq``: logged durably, applied, and told to the layers above, now or
        by the driver's pipeline (mirrorfs.repl.replica_store: group fsync, batch apply);
        ``positions`` never reports it received before it is durable."""

    def start_copy(self, msg: SyncBegin, peer: Peer) -> None:
        """SYNC_BEGIN(FULL): a new, empty replica of the announced geometry."""

    def copy_blocks(self, msg: SyncBlocks) -> None: ...

    def finish_copy(self, msg: SyncEnd, volume_uuid: bytes) -> None: ...

    def begin_resync(self, msg: SyncBegin, fork_seq: int | None, peer: Peer) -> ResyncStage:
        """SYNC_BEGIN(RESYNC): open a stage over the replica as it is (A)."""

    def commit_resync(self, stage: ResyncStage) -> None:
        """Apply the complete group in one step and tell the layers above."""

    def suspend_resync(self, stage: ResyncStage, why: str) -> None:
        """The session ended first: the stage is kept (the replica stays at A) for the next
        session's source to resume (SYNC_BEGIN(RESYNC, S, first_block)), or replace."""

    def switchover_refusal(self, seq: int, *, busy: bool) -> str | None: ...

    def promote(self, msg: Switchover) -> SwitchoverDone | None:
        """Promote for a planned switchover; None if this node cannot be promoted so."""


class TargetPhase(enum.Enum):
    """Where a target session is (module docstring)."""

    INITIAL_SYNC = "initial-sync"
    STREAMING = "streaming"
    RESYNCING = "resyncing"


@dataclass(slots=True)
class Drop:
    """End the session: ``reason`` is the one-line reason for the log.

    ``error``: the node itself is at fault (the receiver goes to ERROR); ``report``: an
    ERROR_STATE to send first, best effort.
    """

    reason: str
    error: bool = False
    report: ErrorState | None = None


@dataclass(slots=True)
class Output:
    """What one frame calls for: send ``send`` in order, then ``drop`` if set."""

    send: list[Message] = field(default_factory=list)
    drop: Drop | None = None


class _Drop(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is ENOSPC / EDQUOT."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def failure_report(text: str, *, full: bool) -> ErrorState:
    """The ERROR_STATE that tells the source this replica cannot go on."""
    state = PeerState.DISK_FULL if full else PeerState.IO_ERROR
    log.error("replica volume cannot go on (%s): %s", state.name, text)
    return ErrorState(state, text)


class TargetSession:
    """One authenticated source, frame by frame (module docstring)."""

    def __init__(
        self,
        store: TargetStore,
        peer: Peer,
        *,
        empty: bool,
        fork_seq: int | None = None,
        now: float = 0.0,
        ack_delay: float = ACK_DELAY,
        keepalive: float = KEEPALIVE,
    ) -> None:
        self.store = store
        self.peer = peer
        self.expect_full_sync = empty  # we told the source we are empty
        self.syncing = False  # between SYNC_BEGIN(FULL) and SYNC_END
        self.ready = not empty  # TXNs welcome: not empty, or the copy is done
        self.resync: ResyncStage | None = None  # between SYNC_BEGIN(RESYNC) and its group
        self.fork_seq = fork_seq  # diverged after this seq: only a rewind resync is welcome
        self.ack_delay = ack_delay
        self.keepalive = keepalive
        self.acked: tuple[int, int] = (-1, -1)
        self.last_ack_at = 0.0
        self.last_sent = now
        self.last_received = now
        self.pending_verify: list[VerifyReq] = []

    @property
    def phase(self) -> TargetPhase:
        if self.resync is not None:
            return TargetPhase.RESYNCING
        return TargetPhase.STREAMING if self.ready else TargetPhase.INITIAL_SYNC

    # ------------------------------------------------------------------ frames

    def handle(self, msg: Message) -> Output:
        """One frame from the source: do what it asks of the store, say what to send."""
        try:
            return Output(send=self._dispatch(msg))
        except (_Drop, StoreError, ProtocolError, ValueError, OSError) as exc:
            return self.failed(msg.TYPE.name, exc)

    def failed(self, what: str, exc: Exception) -> Output:
        """The drop for a failure while handling a ``what`` frame (also for work that the
        driver did later for it: a group fsync, a batch apply). Other exceptions: raised."""
        if isinstance(exc, _Drop):
            return Output(drop=Drop(str(exc)))
        if isinstance(exc, VolumeFailed):
            report = failure_report(str(exc), full=disk_full(exc))
            return Output(drop=Drop(f"{what}: {exc}", error=True, report=report))
        if isinstance(exc, OSError):
            report = failure_report(str(exc), full=disk_full(exc))
            return Output(drop=Drop(f"{what}: {exc.strerror or exc}", error=True, report=report))
        if isinstance(exc, (StoreError, ProtocolError, ValueError)):
            # LogError: out of sequence, bad record, old epoch; VolumeError: a bad sync run.
            return Output(drop=Drop(f"{what}: {exc}"))
        raise exc

    def _dispatch(self, msg: Message) -> list[Message]:
        if isinstance(msg, Txn):
            self._on_txn(msg)
        elif isinstance(msg, TxnPart):
            self._on_part(msg)
        elif isinstance(msg, SyncBegin):
            self._on_sync_begin(msg)
        elif isinstance(msg, SyncBlocks):
            self._on_sync_blocks(msg)
        elif isinstance(msg, SyncEnd):
            self._on_sync_end(msg)
        elif isinstance(msg, Ping):
            return [Pong(msg.timestamp_ns)]
        elif isinstance(msg, Pong):
            pass
        elif isinstance(msg, VerifyReq):
            self._on_verify(msg)
        elif isinstance(msg, Switchover):
            return [self._on_switchover(msg)]
        elif isinstance(msg, Refuse):
            raise _Drop(f"refused by the source: {msg.text or msg.reason.name.lower()}")
        else:
            raise _Drop(f"unexpected {msg.TYPE.name} from the source")
        return []

    def _check_txn(self, what: str) -> None:
        """Drop unless a TXN (or a part of one) is welcome now."""
        store = self.store
        if not store.present or not self.ready:
            raise _Drop(f"{what} before the initial sync completed")
        if self.resync is not None:
            return
        if store.is_source:
            raise _Drop(f"{what}, but this node was promoted: it is a source now")
        if self.fork_seq is not None:
            raise _Drop(
                f"{what}, but this replica diverged after seq {self.fork_seq}: it needs "
                "a resync first"
            )

    def _on_txn(self, msg: Txn) -> None:
        self._check_txn(f"TXN {msg.seq}")
        if self.resync is not None:
            if self.resync.on_txn(msg):
                self._finish_resync()
            return
        self.store.receive_apply(msg.seq, msg.record)

    def _on_part(self, msg: TxnPart) -> None:
        """A part of a large record: kept; the record goes on as a TXN once complete."""
        self._check_txn(f"TXN_PART {msg.seq}")
        record = self.store.take_part(msg)
        if record is not None:
            self._on_txn(Txn(msg.seq, record))

    def _on_sync_begin(self, msg: SyncBegin) -> None:
        if msg.kind is SyncKind.RESYNC:
            if not self.store.present or not self.ready or self.syncing or self.resync:
                raise _Drop("SYNC_BEGIN(RESYNC), but this target is not a consistent replica")
            self.resync = self.store.begin_resync(msg, self.fork_seq, self.peer)
            return
        if not self.expect_full_sync or self.syncing or self.ready:
            raise _Drop("SYNC_BEGIN, but this target did not ask for an initial sync")
        self.store.start_copy(msg, self.peer)
        self.syncing = True

    def _on_sync_blocks(self, msg: SyncBlocks) -> None:
        if self.resync is not None:
            self.resync.on_blocks(msg)
            return
        if not self.syncing or not self.store.present:
            raise _Drop("SYNC_BLOCKS outside of an initial sync")
        self.store.copy_blocks(msg)

    def _on_sync_end(self, msg: SyncEnd) -> None:
        if self.resync is not None:
            if self.resync.on_end(msg):
                self._finish_resync()
            return
        if not self.syncing or not self.store.present:
            raise _Drop("SYNC_END outside of an initial sync")
        self.store.finish_copy(msg, self.peer.volume_uuid)
        self.syncing = False
        self.ready = True
        # The ACK(S, S) that the contract asks for is the next coalesced ACK.

    def _finish_resync(self) -> None:
        stage, self.resync = self.resync, None
        assert stage is not None  # (a failure below is not an abandoned stage: it is recorded)
        self.store.commit_resync(stage)
        self.fork_seq = None  # (a rewind adopted the source's history with the group)

    def _on_switchover(self, msg: Switchover) -> SwitchoverDone:
        """Check and promote in one step: nothing can be applied in between."""
        busy = not self.ready or self.resync is not None or self.fork_seq is not None
        why = self.store.switchover_refusal(msg.seq, busy=busy)
        done = self.store.promote(msg) if why is None else None
        if why is None and done is None:
            why = "this target cannot be promoted by a switchover"
        if why is not None:
            log.warning("switchover to seq %d refused: %s", msg.seq, why)
            return SwitchoverDone(SwitchoverResult.REFUSED, text=why)
        assert done is not None
        return done

    def _on_verify(self, msg: VerifyReq) -> None:
        if not self.store.present or not self.ready:
            raise _Drop("VERIFY_REQ before the initial sync completed")
        count = self.store.block_count
        for first, n in msg.ranges:
            if n < 0 or first + n > count:
                raise _Drop(f"VERIFY_REQ range {first}+{n} outside the volume")
        self.pending_verify.append(msg)

    # ------------------------------------------------------------------ answers and timing

    def next_verify(self) -> VerifyReq | VerifyReply | None:
        """The next verify answer that is due: a VERIFY_REPLY to send as it is (the asked
        seq is past: "try again"), or a VERIFY_REQ whose digests the caller computes now,
        before anything else is applied, and sends as VERIFY_REPLY(req.seq, digests)."""
        if not self.pending_verify or not self.store.present:
            return None
        applied = self.store.applied_seq
        if self.pending_verify[0].seq > applied:
            return None
        req = self.pending_verify.pop(0)
        if req.seq < applied:
            # Past state cannot be digested: (our applied seq, no digests) = "try again".
            log.info("VERIFY_REQ for seq %d, but applied is %d", req.seq, applied)
            return VerifyReply(applied, [])
        return req

    def ack_due(self, now: float) -> bool:
        """While draining, whether the last ACK is ``ack_delay`` old (send one now)."""
        return now - self.last_ack_at >= self.ack_delay

    def ack(self, now: float, wall_ns: int) -> Ack | None:
        """The ACK to send now, or None (nothing to acknowledge, or nothing new)."""
        if not self.store.present or not self.ready:
            return None  # nothing to acknowledge before the initial-sync copy is complete
        if self.resync is not None:
            pos = self.resync.positions()
        elif self.fork_seq is not None:  # diverged: only seqs up to the fork are the source's
            pos = (self.fork_seq, self.fork_seq)
        else:
            pos = self.store.positions()
        if pos == self.acked:
            return None
        self.acked = pos
        self.last_ack_at = now
        return Ack(pos[0], pos[1], wall_ns)

    def sent(self, now: float) -> None:
        """A frame went out at ``now`` (keepalive timing)."""
        self.last_sent = now

    def received(self, now: float) -> None:
        """A frame came in at ``now``."""
        self.last_received = now

    def ping_due(self, now: float) -> bool:
        return now - self.last_sent >= self.keepalive

    def looks_dead(self, now: float) -> bool:
        """Silent for longer than a live source's pings allow."""
        return now - self.last_received > 2 * self.keepalive

    def close(self, why: str) -> None:
        """The session ended: an unfinished resync stage is kept for a resume."""
        stage, self.resync = self.resync, None
        if stage is not None:
            self.store.suspend_resync(stage, why or "session ended")
