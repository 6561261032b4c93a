"""The source's half of a replication session, as pure state (no trio, no sockets, no clock).

Two objects, both driven by the shipper (mirrorfs.repl.shipper), which does the I/O:

- ``SourceSession``, one per connection: the window of unacknowledged TXN bytes (what may
  be sent now), the check of every ACK against what was sent, where each incoming frame
  goes (``handle``: ACK, PING to answer, VERIFY_REPLY, ERROR_STATE, REFUSE, a reply another
  module waits for, or a ProtocolError), and when to PING (``Keepalive``, ``now`` passed in).
- ``SourceVolume``: what the source side reads of its volume (typed; a Volume is one).
- ``TargetPositions``, one per target, across connections: the target's received/applied
  seqs, the log pins that keep what it still needs (a sync pin at S+1 during an initial sync
  or a resync, else received + 1), and the plan for a new connection from the handshake's
  positions and epoch history (``plan``: stream from N, resync, rewind, or out-of-sync).
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mirrorfs.repl.fork import ForkVerdict, judge
from mirrorfs.repl.wire import (
    Ack,
    ErrorState,
    Message,
    PeerState,
    Ping,
    Pong,
    ProtocolError,
    Refuse,
    RefuseReason,
    VerifyReply,
)
from mirrorfs.store.txn import Transaction

log = logging.getLogger(__name__)


class SourceLog(Protocol):
    """What the shipper reads of the source's SAM log."""

    @property
    def first_seq(self) -> int: ...

    @property
    def last_seq(self) -> int: ...

    def scan_encoded(self, seq: int) -> Iterator[tuple[int, bytes]]: ...


class SourceDevice(Protocol):
    """What the initial sync and the resync read of the source's block file."""

    @property
    def fd(self) -> int: ...

    def read(self, block: int, count: int) -> bytes: ...


class SourceEpochs(Protocol):
    @property
    def epochs(self) -> Sequence[Sequence[int]]: ...


class SourceWriter(Protocol):
    """What shipping needs of the volume's write path (store/writepath.py)."""

    @property
    def in_flight_seq(self) -> int | None: ...

    def subscribe(self, listener: Callable[[Transaction], None]) -> None: ...

    def unsubscribe(self, listener: Callable[[Transaction], None]) -> None: ...


class SourceVolume(Protocol):
    """What the source side of replication needs of its volume (a store Volume is one).

    Reads only, plus ``writer.subscribe``, the hook through which the shipper learns of
    commits.
    """

    @property
    def uuid(self) -> bytes: ...

    @property
    def last_seq(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    @property
    def block_count(self) -> int: ...

    @property
    def state(self) -> SourceEpochs: ...

    @property
    def samlog(self) -> SourceLog: ...

    @property
    def device(self) -> SourceDevice: ...

    @property
    def writer(self) -> SourceWriter: ...


class ShipperState(enum.StrEnum):
    """What a shipper is doing (``status()["state"]``; ``reason`` says why for the last three)."""

    CONNECTING = "connecting"
    INITIAL_SYNC = "initial-sync"
    RESYNCING = "resyncing"
    STREAMING = "streaming"
    OUT_OF_SYNC = "out-of-sync"
    FENCED = "fenced"
    ERROR = "error"


class Route(enum.Enum):
    """Where an incoming frame goes (``SourceSession.handle``)."""

    ACK = "ack"  # positions moved; ``acked`` bytes left the window
    PONG = "pong"  # a PING to answer (queued in ``pong_due``)
    NONE = "none"  # nothing to do (a PONG, an ERROR_STATE noted in ``peer_error``)
    VERIFY = "verify"  # a VERIFY_REPLY: to the resync or to the verify channel
    HOOK = "hook"  # a reply that another module waits for (``hooks``)
    FENCED = "fenced"  # REFUSE(FENCED): this source is stale; ``text`` says so
    REFUSED = "refused"  # any other REFUSE: the connection ends; ``text`` says why


@dataclass(slots=True)
class Incoming:
    route: Route
    msg: Message
    acked: int = 0
    text: str = ""


class SourceSession:
    """One connection's exchange, seen from the source."""

    def __init__(self, label: str, window_bytes: int, *, last_sent: int = 0) -> None:
        self.label = label
        self.window_bytes = window_bytes
        self.inflight: deque[tuple[int, int]] = deque()  # (seq, record bytes), sent order
        self.unacked = 0
        self.last_sent = last_sent  # highest seq sent (or the sync's start seq)
        self.txns_sent = 0  # TXN frames sent on this connection (metrics)
        self.peer_error = ""  # what ERROR_STATE said
        self.pong_due: list[int] = []

    def may_send(self, size: int) -> bool:
        """Whether a TXN record of ``size`` bytes fits the window (one always does)."""
        return not self.unacked or self.unacked + size <= self.window_bytes

    def txn_sent(self, seq: int, size: int) -> None:
        """Record TXN ``seq`` as sent (call it before the send's await)."""
        self.inflight.append((seq, size))
        self.unacked += size
        self.last_sent = seq
        self.txns_sent += 1

    def on_ack(self, ack: Ack) -> int:
        """Check ``ack`` against what was sent; the bytes it took off the window."""
        # ACKs come in order, so positions only move forward; the window opens as they do.
        if ack.applied_seq > ack.received_seq or ack.received_seq > self.last_sent:
            raise ProtocolError(
                f"ACK received={ack.received_seq} applied={ack.applied_seq} but the last "
                f"seq sent is {self.last_sent}"
            )
        acked = 0
        while self.inflight and self.inflight[0][0] <= ack.received_seq:
            acked += self.inflight.popleft()[1]
        self.unacked -= acked
        return acked

    def handle(self, msg: Message, hooks: Sequence[type[Message]] = ()) -> Incoming:
        """Where ``msg`` from the target goes (ProtocolError if it has no business here)."""
        if isinstance(msg, Ack):
            return Incoming(Route.ACK, msg, acked=self.on_ack(msg))
        if isinstance(msg, Ping):
            self.pong_due.append(msg.timestamp_ns)
            return Incoming(Route.PONG, msg)
        if isinstance(msg, Pong):
            return Incoming(Route.NONE, msg)
        if isinstance(msg, VerifyReply):
            return Incoming(Route.VERIFY, msg)
        if isinstance(msg, ErrorState):
            if msg.state is PeerState.OK:
                self.peer_error = ""
            else:
                self.peer_error = f"target reports {msg.state.name.lower()}: {msg.text}"
                log.warning("target %s: %s", self.label, self.peer_error)
            return Incoming(Route.NONE, msg)
        if type(msg) in hooks:
            return Incoming(Route.HOOK, msg)
        if isinstance(msg, Refuse):
            text = f"refused by the target: {msg.text or msg.reason.name.lower()}"
            route = Route.FENCED if msg.reason is RefuseReason.FENCED else Route.REFUSED
            return Incoming(route, msg, text=text)
        raise ProtocolError(f"unexpected {msg.TYPE.name} from target {self.label}")

    def pongs(self) -> list[Pong]:
        """The PONGs due now, in PING order."""
        out = [Pong(t) for t in self.pong_due]
        self.pong_due.clear()
        return out


@dataclass(slots=True)
class Keepalive:
    """PING when a direction has been idle for ``interval`` (``now`` passed in)."""

    interval: float
    next_tick: float = 0.0
    sent: int = 0
    received: int = 0

    def arm(self, now: float, sent: int, received: int) -> None:
        """Start a period at ``now`` with the connection's byte counters."""
        self.next_tick = now + self.interval
        self.sent, self.received = sent, received

    def due(self, now: float) -> bool:
        return now >= self.next_tick

    def idle(self, sent: int, received: int) -> bool:
        """A direction moved no byte this period: a PING is due."""
        return sent == self.sent or received == self.received


class PlanKind(enum.Enum):
    """What a new connection does first (``TargetPositions.plan``)."""

    STREAM = "stream"  # TXN from ``next_seq``
    RESYNC = "resync"  # resync from S = ``start_seq`` (log pinned from S+1), then stream
    REWIND = "rewind"  # the same, as a failback rewind after ``fork_seq``
    OUT_OF_SYNC = "out-of-sync"  # cannot be served; ``reason`` says why


@dataclass(slots=True)
class Plan:
    kind: PlanKind
    next_seq: int = 0
    start_seq: int = 0
    reason: str = ""
    verdict: ForkVerdict | None = None
    resumed: bool = False  # RESYNC/REWIND: the resync from ``start_seq`` goes on (resume_seq)


@dataclass(slots=True)
class LogView:
    """What the plan needs to know of the source's volume and log."""

    last_seq: int  # the volume's last committed seq
    first_seq: int  # the log's first seq (0: empty)
    log_last_seq: int  # the log's last seq
    epochs: Sequence[Sequence[int]] = field(default_factory=list)

    def holds(self, seq: int) -> bool:
        if seq == self.last_seq + 1:
            return True
        return self.first_seq != 0 and self.first_seq <= seq <= self.log_last_seq

    def missing(self, seq: int) -> str:
        held = f"{self.first_seq}..{self.log_last_seq}" if self.first_seq else "nothing"
        return f"the target needs seq {seq} but the log holds {held} (resync needed)"


class TargetPositions:
    """One target's positions and log pins, across connections (module docstring)."""

    def __init__(self) -> None:
        # None until a handshake told them (an unknown target pins nothing); kept across
        # connections, so a known target keeps pinning while away.
        self.received_seq: int | None = None
        self.applied_seq: int | None = None
        self.sync_pin: int | None = None
        self.pin_dropped = ""  # why retention stopped pinning for this target

    def retain_seq(self, *, stopped: bool) -> int | None:
        """Lowest seq the target still needs from the log, None if it pins nothing.

        ``stopped``: the shipper is fenced or the target out-of-sync.
        """
        # An out-of-sync target needs what the log no longer holds: pinning the rest would
        # only make the log grow without bound.
        if self.pin_dropped or stopped:
            return None
        if self.sync_pin is not None:
            return self.sync_pin
        if self.received_seq is None:
            return None
        return self.received_seq + 1

    def pin_sync(self, last_seq: int) -> int:
        """Pin S+1 for an initial sync or a resync from S = ``last_seq``; return S+1."""
        self.sync_pin = last_seq + 1
        self.pin_dropped = ""
        return self.sync_pin

    def copy_to_resume(
        self, sync_start: int | None, announced: tuple[int, int], block_count: int
    ) -> int:
        """The block to resume an initial sync at (0: make a new copy). ``announced``: the
        (S, block) that an empty target says it holds of a copy; ``sync_start``: the S of
        the copy this source began for it (None: none). Only that copy, with S+1 pinned all
        along, can go on: the log from S+1 is what makes the fuzzy copy consistent."""
        seq, block = announced
        if not block or sync_start is None or self.pin_dropped or self.sync_pin is None:
            return 0
        if sync_start != seq or self.sync_pin != seq + 1 or block > block_count:
            return 0
        return block

    def forget(self) -> None:
        """An empty target: its positions are unknown until its copy is acknowledged."""
        self.received_seq = self.applied_seq = None

    def plan(
        self,
        view: LogView,
        received: int,
        applied: int,
        epochs: Sequence[Sequence[int]] | None,
        *,
        allow_resync: bool,
        resume_seq: int | None = None,
    ) -> Plan:
        """Adopt a target's handshake positions; what its connection does first.

        ``epochs``: the target's epoch history; one that forked from ours and holds seqs past
        the fork (an old source after a failover) gets a rewind (mirrorfs.repl.fork).
        ``resume_seq``: S of an unfinished resync that the target holds the stage of
        (``source_rounds.resync_resume``); the resync goes on from it only if S+1 stayed
        pinned since (``Plan.resumed``), else a new one starts at our last seq.
        """
        resume = resume_seq is not None and not self.pin_dropped and self.sync_pin == resume_seq + 1
        start = resume_seq if resume and resume_seq is not None else view.last_seq
        verdict = judge(view.epochs, epochs, received) if epochs is not None else None
        if verdict is not None and verdict.diverged:
            return self._rewind(view, received, applied, verdict, allow_resync, start, resume)
        if received > view.last_seq or applied > received:
            self.pin_dropped = ""  # a diverged target is not one a resync can serve
            return Plan(
                PlanKind.OUT_OF_SYNC,
                reason=f"the target has received seq {received} (applied {applied}) but this "
                f"source is at seq {view.last_seq}: it diverged (failback/resync needed)",
            )
        self.received_seq, self.applied_seq = received, applied
        next_seq = received + 1
        self.pin_dropped = ""
        if not view.holds(next_seq):
            if not allow_resync:
                return Plan(PlanKind.OUT_OF_SYNC, reason=view.missing(next_seq))
            # Resync: pin S+1 now; the sender compares, copies, then streams from S+1.
            return Plan(
                PlanKind.RESYNC,
                next_seq=self.pin_sync(start),
                start_seq=start,
                reason=view.missing(next_seq),
                resumed=resume,
            )
        # Streaming: the target's position pins from here on (a resync pin of an earlier
        # connection is no longer needed: the target applied its group, or never will).
        self.sync_pin = None
        return Plan(PlanKind.STREAM, next_seq=next_seq)

    def _rewind(
        self,
        view: LogView,
        received: int,
        applied: int,
        verdict: ForkVerdict,
        allow: bool,
        start: int,
        resume: bool,
    ) -> Plan:
        """Failback: a target that diverged after the fork F holds a consistent volume at
        ``applied``, so the checksum resync sends only what either side changed since F."""
        assert verdict.fork_seq is not None
        if not allow:
            self.pin_dropped = ""
            return Plan(
                PlanKind.OUT_OF_SYNC, reason=verdict.describe(received) + " (resync disabled)"
            )
        fork = verdict.fork_seq
        # Up to F it has what we have; the rest is its own (and acknowledged as F).
        self.received_seq = self.applied_seq = min(fork, applied)
        return Plan(
            PlanKind.REWIND,
            next_seq=self.pin_sync(start),
            start_seq=start,
            reason=verdict.describe(received),
            verdict=verdict,
            resumed=resume,
        )

    def on_ack(self, ack: Ack, *, resyncing: bool, resync_end: int | None) -> bool:
        """Positions from an ACK; True when it completes the connection's resync, which
        ends at ``resync_end`` once SYNC_END is sent (T applied: its S+1 pin goes)."""
        if self.received_seq is None or ack.received_seq > self.received_seq:
            self.received_seq = ack.received_seq
        if self.applied_seq is None or ack.applied_seq > self.applied_seq:
            self.applied_seq = ack.applied_seq
        if resyncing:
            # A resync's stage is not the replica: S+1 stays pinned until T is applied.
            if resync_end is not None and ack.applied_seq >= resync_end:
                self.sync_pin = None
                return True
        elif self.sync_pin is not None and self.received_seq >= self.sync_pin - 1:
            self.sync_pin = None  # the target has the copy; its position pins from now on
        return False
