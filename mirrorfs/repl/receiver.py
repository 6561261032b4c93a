"""The target side of replication: receive, log, apply and acknowledge, one source at a time.

A ``Receiver`` belongs to one target volume directory and serves the connections that reach
it (``serve``, one call per accepted stream). It is the trio driver of two pure parts: the
handshake (mirrorfs.repl.handshake, through ``handshake_target``) and, frame by frame, the
session (``TargetSession``, mirrorfs.repl.target_session), whose store is the replica volume
behind ``ReplicaStore`` (mirrorfs.repl.replica_store). The session is the one of
mirrorfs/INTERNALS.md ("Replication session"):

    handshake_target         what this node has: an all-zero uuid when it is empty or an
                             initial sync never completed, else its uuid, epochs, positions
    SYNC_BEGIN/BLOCKS/END    initial sync of an empty target (Volume.create_replica,
                             write_sync_blocks, finish_sync_copy), then ACK(S, S); or a
                             resync of a consistent one (repl/resync.py: staged, then
                             applied as one group when TXN T is staged)
    TXN                      logged in groups (one fsync each), ACK(received); applied in
                             batches, ACK(applied) (mirrorfs.repl.txn_pipeline)
    TXN_PART                 a part of a large record, kept across sessions (in memory,
                             ``ReplicaStore.partial``) and announced in the next HELLO_REPLY;
                             the complete record goes on as a TXN (mirrorfs.repl.txn_parts)
    PING / VERIFY_REQ        PONG / VERIFY_REPLY (once applied_seq reaches the asked seq)
    SWITCHOVER               SWITCHOVER_DONE: checked (repl/switchover.py), then promoted by
                             ``on_switchover`` in the same step; no TXN is taken after that

Anything wrong with a frame (ProtocolError, a LogError such as out of sequence, a bad
record, an unexpected message) drops the connection with a one-line reason in the log;
nothing of that frame is applied and the source resumes from our position when it
reconnects. A full disk (ENOSPC / VolumeFailed) is reported with ERROR_STATE first.

Concurrency (one trio loop, shared with the FUSE handlers of a read-only mount):

- Nothing is held for a connection before its peer has proved the secret (with no secret,
  before its handshake completed): until then it only counts against ``limiter``
  (mirrorfs.repl.admission: handshakes in progress per address and in total; beyond a cap
  a newcomer displaces the least advanced, oldest one, whose handshake is cancelled at
  once), under one deadline for the whole handshake. The source slot (``_busy``) is
  checked and taken by ``_SlotGate.admit``, called by the handshake machine in the step
  that sends ACCEPT, with no await in between, so two connections can never both become
  the active source, and a slow or hostile client never holds it.
- Per session, a reader task decodes frames into a bounded channel (back-pressure on the
  TCP stream), a processor task handles them, an applier task applies what is logged, and
  a keepalive task pings.
- TXNs are a pipeline (mirrorfs.repl.txn_pipeline): the processor collects the TXNs that
  the reader queued into a group, a worker thread under ``log_limiter`` (a
  ``trio.CapacityLimiter(1)``) appends them and fsyncs ONCE while the loop serves FUSE
  requests, then one ACK says received = the group's last seq (never before the fsync
  returned); the applier task applies whole transactions in steps, ``on_applied`` for each
  in the same step with no await inside, so a FUSE request served by the same loop sees a
  replica before or after each whole transaction, never in between, and never with caches
  older than the blocks. A frame that is not a TXN waits until every TXN before it is
  logged and applied; what a session that ends logged is applied by
  ``ReplicaStore.settle``.
- ACKs are coalesced: one after the processor has drained what the reader had queued (and
  logged it), one when the applier has applied everything queued, and at least every
  ``ACK_DELAY`` while either keeps working.
- During a resync nothing is applied (frames go to the stage, VERIFY_REQ is answered at the
  unchanging applied seq A); the frame that completes the stage applies the whole group and
  calls ``on_resynced`` in the same step, so a reader sees A, then T, never a mix.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from mirrorfs.repl.admission import HandshakeLimiter, Ticket, host_of
from mirrorfs.repl.lag import RateMeter
from mirrorfs.repl.receiver_session import (
    _PHASE_STATE,
    ReceiverState,
    ReceiverStatus,
    _Drop,
    _Session,
)
from mirrorfs.repl.replica_store import OnApplied, OnSwitchover, OnVolume, ReplicaStore
from mirrorfs.repl.stream import (
    ConnectionClosed,
    FramedStream,
    HandshakeRefused,
    HandshakeTimeout,
    Peer,
    handshake_target,
)
from mirrorfs.repl.target_session import (
    ACK_DELAY,
    Drop,
    TargetSession,
    failure_report,
)
from mirrorfs.repl.txn_pipeline import TxnPipeline
from mirrorfs.repl.wire import (
    ErrorState,
    Hello,
    Message,
    Ping,
    ProtocolError,
    Refuse,
    RefuseReason,
    ReplError,
    Txn,
    TxnPart,
    VerifyReply,
)
from mirrorfs.store.errors import StoreError
from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)

#: What a listener does with a new stream before the handshake (its TLS handshake): the
#: stream to serve, or None when it refused the peer (and closed the stream).
Prepare = Callable[[trio.abc.Stream], Awaitable["trio.abc.Stream | None"]]

KEEPALIVE = 5.0  # send a PING after this long without sending anything
SILENCE_TIMEOUT = 30.0  # drop a source that sent nothing for this long
QUEUE_FRAMES = 64  # frames decoded ahead of the processor
THROUGHPUT_WINDOW = 10.0  # seconds of history behind the throughput figure


class Receiver:
    """Serves replication connections for one target volume directory.

    ``volume`` is the open replica, or None when ``volume_dir`` is empty (the first source
    fills it with an initial sync). Callbacks, all called between awaits:
    ``on_created(volume)`` after an initial sync created a new volume (the directory was
    wiped: node-local files must be restored); ``on_consistent(volume)`` once the replica
    becomes consistent (mount it now); ``on_applied(txn)`` after each applied transaction;
    ``on_resynced(volume)`` after a resync group was applied: any block may have changed, so
    every cache above the volume must go (without it, ``on_applied`` gets one transaction
    carrying the hints of S+1..T, which does not cover the resynced blocks);
    ``on_switchover(msg)`` promotes the replica for a planned switchover once the receiver
    found it at the source's seq, and returns the answer.
    """

    def __init__(
        self,
        volume_dir: str,
        volume: Volume | None,
        *,
        secret: bytes | None,
        node_id: str = "",
        on_applied: OnApplied | None = None,
        on_consistent: OnVolume | None = None,
        on_created: OnVolume | None = None,
        on_resynced: OnVolume | None = None,
        on_switchover: OnSwitchover | None = None,
        keepalive: float = KEEPALIVE,
        silence_timeout: float = SILENCE_TIMEOUT,
        handshake_timeout: float = 10.0,
        limiter: HandshakeLimiter | None = None,
    ) -> None:
        self.volume_dir = volume_dir
        self.secret = secret
        self.store = ReplicaStore(
            volume_dir,
            volume,
            node_id=node_id or secrets.token_hex(8),
            on_applied=on_applied,
            on_consistent=on_consistent,
            on_created=on_created,
            on_resynced=on_resynced,
            on_switchover=on_switchover,
        )
        self.keepalive = keepalive
        self.silence_timeout = silence_timeout
        self.handshake_timeout = handshake_timeout
        self.limiter = limiter or HandshakeLimiter()
        self._status = ReceiverStatus()
        self._active: _Session | None = None
        self._busy = False
        self._rate = RateMeter(window=THROUGHPUT_WINDOW)
        self._bytes_before = 0  # bytes received by the sessions that ended
        self._log_limiter: trio.CapacityLimiter | None = None  # one thread owns the SAM log
        self._handshakes: dict[Ticket, trio.CancelScope] = {}  # in progress, to evict

    # ------------------------------------------------------------------------------ status

    @property
    def volume(self) -> Volume | None:
        """The replica volume (None while the directory is empty)."""
        return self.store.volume

    @volume.setter
    def volume(self, volume: Volume | None) -> None:
        self.store.volume = volume

    @property
    def last_resync(self) -> dict[str, Any] | None:
        return self.store.last_resync

    @property
    def node_id(self) -> str:
        return self.store.node_id

    @property
    def state(self) -> ReceiverState:
        active = self._active
        if active is not None:
            return _PHASE_STATE[active.machine.phase]
        return self._status.state

    @property
    def busy(self) -> bool:
        """TXNs are being logged or applied (tests wait for this to end, as worker threads
        do not count as running tasks for ``trio.testing.wait_all_tasks_blocked``)."""
        active = self._active
        return active is not None and active.pipeline is not None and active.pipeline.busy

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot (positions read from the volume now)."""
        st = self._status
        store = self.store
        if store.present:
            st.received_seq, st.applied_seq = store.positions()
            st.consistent = bool(store.volume and store.volume.consistent)
        st.state = self.state
        st.sync_blocks_copied = store.sync_blocks_copied
        st.sync_blocks_total = store.sync_blocks_total
        self._sample()
        st.throughput = self._rate.rate()
        out = st.as_dict()
        out["node_id"] = self.node_id
        out.update(store.status())
        return out

    def _sample(self) -> None:
        """Bring bytes_received and the rate meter up to date."""
        active = self._active
        total = self._bytes_before + (active.fs.bytes_received if active is not None else 0)
        if total > self._rate.total:
            self._rate.add(total - self._rate.total)
        self._status.bytes_received = total

    # ------------------------------------------------------------------------- connections

    async def serve(
        self, stream: trio.abc.Stream, address: str = "", prepare: Prepare | None = None
    ) -> None:
        """Serve one connected source until it goes away or something is wrong.

        Nothing is held for the connection until its peer has proved the secret: before
        that it only counts against the caps on handshakes in progress (``limiter``: beyond
        them it displaces the least advanced, oldest one), and its handshake has one
        deadline. ``prepare`` (the listener's TLS handshake, repl/tls.py ``accept``) runs
        inside that count too: the stream to serve, or None when it refused the peer.
        Never raises for what the peer does: every ending is logged as one line (a
        displaced handshake: one line per ``limiter.log_every`` for all of them).
        """
        address = address or _peer_address(stream)
        admission = self.limiter.admit(host_of(address), trio.current_time())
        for victim in admission.evicted:
            scope = self._handshakes.pop(victim, None)
            if scope is not None:
                scope.cancel()
        if admission.log:
            more = f" ({admission.suppressed} more since)" if admission.suppressed else ""
            log.warning(
                "dropped an unauthenticated connection for one from %s: %s%s",
                address or "?",
                admission.reason,
                more,
            )
        ticket = admission.ticket
        fs: FramedStream | None = None
        gate = _SlotGate(self, address, self.store.handshake_args(), ticket)
        peer: Peer | None = None
        try:
            try:
                with trio.CancelScope() as scope:
                    self._handshakes[ticket] = scope
                    served = stream if prepare is None else await prepare(stream)
                    if served is not None:
                        fs = FramedStream(served)
                        peer = await self._authenticate(fs, address, gate)
                if scope.cancelled_caught:
                    peer = None  # displaced by a newer connection (the line above says so)
            finally:
                self._handshakes.pop(ticket, None)
                self.limiter.release(ticket)
            if peer is not None and fs is not None:
                await self._serve_locked(fs, address, peer)
        finally:
            if gate.held:
                self._busy = False
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await (fs.aclose() if fs is not None else stream.aclose())

    async def _authenticate(self, fs: FramedStream, address: str, gate: _SlotGate) -> Peer | None:
        """The handshake, with ``gate`` deciding about the slot; None (logged) if it failed."""
        try:
            return await handshake_target(
                fs,
                secret=self.secret,
                timeout=self.handshake_timeout,
                gate=gate,
                **gate.announced,
            )
        except (HandshakeRefused, HandshakeTimeout, ConnectionClosed, ProtocolError) as exc:
            if isinstance(exc, HandshakeRefused):  # status: why no source is connected
                self._status.last_refused = f"{address or '?'}: {exc}"
            # The first few of an address, then one line per period: a flood cannot fill the disk.
            show, quiet = self.limiter.failed(host_of(address), trio.current_time())
            if show:
                refused = isinstance(exc, HandshakeRefused) and not exc.by_peer
                what = "refused source at %s: %s%s" if refused else "handshake with %s failed: %s%s"
                more = f" ({quiet} more from this address not logged)" if quiet else ""
                log.warning(what, address or ("?" if refused else "source"), exc, more)
            return None

    async def _serve_locked(self, fs: FramedStream, address: str, peer: Peer) -> None:
        store = self.store
        empty = store.empty
        fork = store.judge_fork(peer) if not empty else None
        machine = TargetSession(
            store,
            peer,
            empty=empty,
            fork_seq=fork,
            now=trio.current_time(),
            ack_delay=ACK_DELAY,
            keepalive=self.keepalive,
        )
        ses = _Session(fs, machine, address)
        st = self._status
        st.sessions += 1
        st.source_address, st.source_node_id = address, peer.node_id
        st.source_last_seq = peer.last_seq
        st.last_error = ""
        self._active = ses
        log.info(
            "source %r at %s connected (its last seq %d)", peer.node_id, address, peer.last_seq
        )
        try:
            with ses.cancel:
                if store.failed:
                    await self._report(ses, failure_report(store.failed, full=False))
                    raise _Drop(f"the replica volume is failed: {store.failed}", error=True)
                async with trio.open_nursery() as nursery:
                    send, receive = trio.open_memory_channel[Message](QUEUE_FRAMES)
                    ses.pipeline = pipe = TxnPipeline(
                        store,
                        machine,
                        self.log_limiter,
                        ack=lambda: self._ack(ses),
                        dropped=lambda drop: self._dropped(ses, drop),
                    )
                    nursery.start_soon(self._guard, ses, self._read, send)
                    nursery.start_soon(self._guard, ses, self._process, receive, pipe)
                    nursery.start_soon(self._guard, ses, self._apply, pipe)
                    nursery.start_soon(self._guard, ses, self._keepalive)
        except _Drop as exc:  # raised before the nursery started
            ses.drop(str(exc), error=exc.error)
        finally:
            machine.close(ses.reason or "session ended")
            try:  # every task and thread has ended: apply what was logged and not applied
                store.settle()
            except (StoreError, OSError) as exc:
                log.error("cannot apply what the last session logged: %s", exc)
            self._sample()
            self._bytes_before += fs.bytes_received
            self._active = None
            st.state = ReceiverState.ERROR if ses.error else ReceiverState.DISCONNECTED
            if ses.error:
                st.last_error = ses.reason
            # A source that closes cleanly is routine; anything else is worth a warning.
            quiet = ses.reason.startswith("closed:") or not ses.reason
            log.log(
                logging.INFO if quiet and not ses.error else logging.WARNING,
                "dropped source %r at %s: %s",
                peer.node_id,
                address,
                ses.reason.removeprefix("closed: ") or "session ended",
            )

    async def _guard(self, ses: _Session, fn: Callable[..., Any], *args: Any) -> None:
        """Run a session task; any ending becomes ``ses.drop(reason)``."""
        try:
            await fn(ses, *args)
        except _Drop as exc:
            ses.drop(str(exc), error=exc.error)
        except ConnectionClosed as exc:
            ses.drop(f"closed: {exc}")
        except (ProtocolError, HandshakeRefused) as exc:
            ses.drop(str(exc))
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
            # The reader and the processor share a channel: when one ends (with the real
            # reason, recorded first), the other sees the channel end. Routine, not a bug.
            ses.drop("closed: the session's other task ended")
        except Exception as exc:
            log.exception("receiver bug")
            ses.drop(f"internal error: {exc!r}")

    # ------------------------------------------------------------------------------ tasks

    async def _read(self, ses: _Session, send: trio.MemorySendChannel[Message]) -> None:
        async with send:
            while True:
                with trio.move_on_after(self.silence_timeout) as cs:
                    msg = await ses.fs.receive()
                if cs.cancelled_caught:
                    raise _Drop(f"the source was silent for {self.silence_timeout:g} s")
                ses.machine.received(trio.current_time())
                self._status.last_contact = time.time()
                await send.send(msg)

    async def _keepalive(self, ses: _Session) -> None:
        while True:
            await trio.sleep(self.keepalive / 2)
            if ses.machine.ping_due(trio.current_time()):
                await self._send(ses, Ping(time.time_ns()))

    @property
    def log_limiter(self) -> trio.CapacityLimiter:
        """The one worker thread that appends to / fsyncs / checkpoints the SAM log."""
        if self._log_limiter is None:
            self._log_limiter = trio.CapacityLimiter(1)
        return self._log_limiter

    async def _process(
        self,
        ses: _Session,
        receive: trio.MemoryReceiveChannel[Message],
        pipe: TxnPipeline,
    ) -> None:
        machine = ses.machine
        async with receive:
            while True:
                msg = await receive.receive()
                # Drain what the reader has queued (TXNs join the group), then log the group
                # and acknowledge once (coalesced), never holding an ACK back > ACK_DELAY.
                while True:
                    if not isinstance(msg, (Txn, TxnPart)):
                        await pipe.flush(drain=True)
                    out = machine.handle(msg)
                    for reply in out.send:
                        await self._send(ses, reply)
                    if out.drop is not None:
                        await pipe.flush()  # the TXNs before it count
                        await self._dropped(ses, out.drop)
                    if self.store.group.full:
                        await pipe.flush()
                    await self._answer_verify(ses)
                    if machine.ack_due(trio.current_time()):
                        await self._ack(ses)
                    try:
                        msg = receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                await pipe.flush()
                await self._ack(ses)

    async def _apply(self, ses: _Session, pipe: TxnPipeline) -> None:
        await pipe.run_applier()

    async def _dropped(self, ses: _Session, drop: Drop) -> None:
        if drop.report is not None:
            await self._report(ses, drop.report)
        raise _Drop(drop.reason, error=drop.error)

    async def _answer_verify(self, ses: _Session) -> None:
        if ses.machine.pending_verify and ses.pipeline is not None:
            # Nothing may be applied while the digests are computed: let the applier finish
            # (the processor, which feeds it, waits here and below).
            await ses.pipeline.flush(drain=True)
        while (item := ses.machine.next_verify()) is not None:
            if isinstance(item, VerifyReply):
                await self._send(ses, item)
                continue
            # The processor is the only task that applies, and it waits here: the block
            # file stays at item.seq while the worker thread reads it.
            digests = await trio.to_thread.run_sync(self.store.digests, item.ranges)
            await self._send(ses, VerifyReply(item.seq, digests))

    # ------------------------------------------------------------------------------ helpers

    async def _send(self, ses: _Session, msg: Message) -> None:
        await ses.fs.send(msg)
        ses.machine.sent(trio.current_time())

    async def _ack(self, ses: _Session) -> None:
        ack = ses.machine.ack(trio.current_time(), time.time_ns())
        if ack is None:
            return
        await self._send(ses, ack)
        self._status.last_ack_time = time.time()
        self._sample()

    async def _report(self, ses: _Session, report: ErrorState) -> None:
        with trio.move_on_after(1.0):
            try:
                await self._send(ses, report)
            except ReplError:
                pass


class _SlotGate:
    """One connection's say on the single source slot (a ``TargetGate``).

    Called by the handshake machine between two awaits, so each check and the claim are one
    step. Nothing is taken before the peer proved the secret: ``hello`` only reads the
    slot (and refuses a second source at once, as BUSY, holding nothing); ``admit`` takes
    it (``held``), which the connection gives back when it ends. The connection's
    ``ticket`` with the handshake limiter advances at HELLO and is given back at the
    proof, so that an authenticated peer is never displaced by a newcomer.
    """

    def __init__(
        self,
        receiver: Receiver,
        address: str,
        announced: dict[str, Any],
        ticket: Ticket | None = None,
    ) -> None:
        self.receiver = receiver
        self.address = address
        self.announced = announced  # what our HELLO_REPLY says of the replica
        self.ticket = ticket
        self.held = False

    def _text(self) -> str:
        active = self.receiver._active
        who = f"{active.address} ({active.peer.node_id!r})" if active else "another source"
        return f"this target already follows {who}"

    def hello(self, hello: Hello) -> Refuse | None:
        rcv = self.receiver
        if self.ticket is not None:
            rcv.limiter.hello(self.ticket, trio.current_time())
        if not rcv._busy:
            return None
        active = rcv._active
        if active is not None and hello.node_id == active.peer.node_id:
            return None  # maybe that source back from a cut: ``admit`` decides, authenticated
        vol = rcv.volume
        if (
            vol is not None
            and not vol.state.sync_state
            and (hello.epochs[-1][0] if hello.epochs else 0) < vol.state.epoch
        ):
            # A stale source (split brain): once it proved itself, the handshake tells it
            # that it is fenced, not merely that we are busy, or it would retry and keep
            # taking writes.
            return None
        return Refuse(RefuseReason.BUSY, self._text())

    def admit(self, peer: Peer, acceptable: bool) -> Refuse | None:
        rcv = self.receiver
        if self.ticket is not None:  # proved the secret: no longer unauthenticated
            rcv._handshakes.pop(self.ticket, None)
            rcv.limiter.release(self.ticket)
        if rcv._busy:
            active = rcv._active
            if (
                active is not None
                and peer.node_id == active.peer.node_id
                and active.machine.looks_dead(trio.current_time())
            ):
                # The same source, back from a crash or a cut, while its old connection looks
                # dead (a live one pings): drop the old one so that its retry succeeds now
                # instead of after SILENCE_TIMEOUT.
                active.drop(f"the source reconnected from {self.address}")
            return Refuse(RefuseReason.BUSY, self._text())
        if not acceptable:
            return None  # the handshake refuses it (wrong volume ...): nothing taken
        if rcv.store.handshake_args() != self.announced:
            # Another source was served during this handshake: what our HELLO_REPLY
            # announced is out of date, and this source would plan from it.
            return Refuse(RefuseReason.BUSY, "the target moved on during the handshake")
        rcv._busy = self.held = True
        return None


def _peer_address(stream: trio.abc.Stream) -> str:
    """``host:port`` of a socket stream's peer ("" for other streams).

    A wrapped stream (``trio.SSLStream``) is looked through to its transport, so that the
    per-address cap on handshakes counts TLS peers by their address too.
    """
    for _ in range(8):  # (a bound, against a stream that wraps itself)
        inner = getattr(stream, "transport_stream", None)
        if getattr(stream, "socket", None) is not None or inner is None:
            break
        stream = inner
    sock = getattr(stream, "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("", 0)
    except (OSError, ValueError, TypeError):
        return ""
    if not host:
        return ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
