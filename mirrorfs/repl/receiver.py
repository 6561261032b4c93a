"""The target side of replication: receive, log, apply and acknowledge, one source at a time.

A ``Receiver`` belongs to one target volume directory and serves the connections that reach
it (``serve``, one call per accepted stream). The session is the one of mirrorfs/INTERNALS.md
("Replication session"):

    handshake_target         what this node has: an all-zero uuid when it is empty or an
                             initial sync never completed, else its uuid, epochs, positions
    SYNC_BEGIN/BLOCKS/END    initial sync of an empty target (Volume.create_replica,
                             write_sync_blocks, finish_sync_copy), then ACK(S, S); or a
                             resync of a consistent one (repl/resync.py: staged, then
                             applied as one group when TXN T is staged)
    TXN                      Volume.receive (log + fsync) and Volume.apply, then ACK
    PING / VERIFY_REQ        PONG / VERIFY_REPLY (once applied_seq reaches the asked seq)
    SWITCHOVER               SWITCHOVER_DONE: checked (repl/switchover.py), then promoted by
                             ``on_switchover`` in the same step; no TXN is taken after that

Anything wrong with a frame (ProtocolError, a LogError such as out of sequence, a bad
record, an unexpected message) drops the connection with a one-line reason in the log;
nothing of that frame is applied and the source resumes from our position when it
reconnects. A full disk (ENOSPC / VolumeFailed) is reported with ERROR_STATE first.

Concurrency (one trio loop, shared with the FUSE handlers of a read-only mount):

- ``serve`` checks and sets ``_active`` without awaiting in between, so two connections can
  never both become the active source.
- Per session, a reader task decodes frames into a bounded channel (back-pressure on the
  TCP stream), a processor task handles them, and a keepalive task pings.
- The processor handles a TXN between two awaits: receive, apply, refresh the allocator,
  then ``on_applied(txn)`` (which drops the filesystem's caches of what changed). A FUSE
  request served by the same loop therefore sees a replica before or after a whole
  transaction, never in between, and never with caches older than the blocks.
- ACKs are coalesced: one after the processor has drained what the reader had queued, and
  at least every ``ACK_DELAY`` while it keeps draining.
- During a resync nothing is applied (frames go to the stage, VERIFY_REQ is answered at the
  unchanging applied seq A); the frame that completes the stage applies the whole group and
  calls ``on_resynced`` in the same step, so a reader sees A, then T, never a mix.
"""

from __future__ import annotations

import enum
import errno
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from mirrorfs.repl.fork import judge
from mirrorfs.repl.initial_sync import finish_copy, start_replica
from mirrorfs.repl.lag import RateMeter
from mirrorfs.repl.resync import TargetResync
from mirrorfs.repl.stream import (
    ConnectionClosed,
    FramedStream,
    HandshakeRefused,
    HandshakeTimeout,
    Peer,
    handshake_target,
)
from mirrorfs.repl.switchover import switchover_refusal
from mirrorfs.repl.verify import range_digests
from mirrorfs.repl.wire import (
    Ack,
    ErrorState,
    Hello,
    Message,
    PeerState,
    Ping,
    Pong,
    ProtocolError,
    Refuse,
    RefuseReason,
    ReplError,
    Switchover,
    SwitchoverDone,
    SwitchoverResult,
    SyncBegin,
    SyncBlocks,
    SyncEnd,
    SyncKind,
    Txn,
    VerifyReply,
    VerifyReq,
)
from mirrorfs.store.errors import StoreError, VolumeFailed
from mirrorfs.store.nodestate import Role
from mirrorfs.store.txn import Transaction
from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)

KEEPALIVE = 5.0  # send a PING after this long without sending anything
SILENCE_TIMEOUT = 30.0  # drop a source that sent nothing for this long
ACK_DELAY = 0.05  # never hold an ACK back longer than this while draining
QUEUE_FRAMES = 64  # frames decoded ahead of the processor
BUSY_GRACE = 5.0  # how long a refused second source has to send its HELLO
THROUGHPUT_WINDOW = 10.0  # seconds of history behind the throughput figure


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
    bytes_received: int = 0  # over every session since the node started
    throughput: float = 0.0  # bytes/s received over the last THROUGHPUT_WINDOW seconds
    sync_blocks_copied: int = 0
    sync_blocks_total: int = 0  # block count of the volume being copied
    sessions: int = 0
    last_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value, "throughput": round(self.throughput, 1)}


@dataclass(slots=True)
class _Session:
    """One connected, authenticated source."""

    fs: FramedStream
    peer: Peer
    address: str
    expect_full_sync: bool  # we told the source we are empty
    syncing: bool = False  # between SYNC_BEGIN and SYNC_END
    ready: bool = False  # TXNs welcome: not empty, or the initial-sync copy is done
    acked: tuple[int, int] = (-1, -1)
    last_sent: float = 0.0
    last_received: float = 0.0
    last_ack_at: float = 0.0
    pending_verify: list[VerifyReq] = field(default_factory=list)
    resync: TargetResync | None = None  # between SYNC_BEGIN(RESYNC) and its group
    fork_seq: int | None = None  # diverged after this seq: only a rewind resync is welcome
    reason: str = ""
    error: bool = False
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)

    def drop(self, reason: str, *, error: bool = False) -> None:
        """Record the first reason and end every task of the session."""
        if not self.reason:
            self.reason, self.error = reason, error
        self.cancel.cancel()


OnApplied = Callable[[Transaction], None]
OnVolume = Callable[[Volume], None]
OnSwitchover = Callable[[Switchover], SwitchoverDone]


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
    ) -> None:
        self.volume_dir = volume_dir
        self.volume = volume
        self.secret = secret
        self._node_id = node_id or secrets.token_hex(8)
        self.on_applied = on_applied
        self.on_consistent = on_consistent
        self.on_created = on_created
        self.on_resynced = on_resynced
        self.on_switchover = on_switchover
        self.last_resync: dict[str, Any] | None = None  # what the last resync did
        self.keepalive = keepalive
        self.silence_timeout = silence_timeout
        self.handshake_timeout = handshake_timeout
        self._status = ReceiverStatus()
        self._active: _Session | None = None
        self._busy = False
        self._rate = RateMeter(window=THROUGHPUT_WINDOW)
        self._bytes_before = 0  # bytes received by the sessions that ended
        self._consistent_reported = volume is not None and volume.consistent

    # ------------------------------------------------------------------------------ status

    @property
    def node_id(self) -> str:
        return self.volume.state.node_id if self.volume is not None else self._node_id

    @property
    def state(self) -> ReceiverState:
        return self._status.state

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot (positions read from the volume now)."""
        st = self._status
        vol = self.volume
        if vol is not None:
            st.received_seq, st.applied_seq = vol.received_seq, vol.last_seq
            st.consistent = vol.consistent
        self._sample()
        st.throughput = self._rate.rate()
        out = st.as_dict()
        out["node_id"] = self.node_id
        out["volume_uuid"] = vol.uuid.hex() if vol is not None and not vol.state.sync_state else ""
        out["volume_failed"] = vol.failed if vol is not None and vol.failed else ""
        active = self._active
        resync = active.resync if active is not None else None
        out["resync"] = resync.as_dict() if resync is not None else self.last_resync
        out["archives"] = list(vol.state.archives) if vol is not None else []
        out["log_kept_from"] = vol.state.keep_log_from if vol is not None else 0
        return out

    def _sample(self) -> None:
        """Bring bytes_received and the rate meter up to date."""
        active = self._active
        total = self._bytes_before + (active.fs.bytes_received if active is not None else 0)
        if total > self._rate.total:
            self._rate.add(total - self._rate.total)
        self._status.bytes_received = total

    # ------------------------------------------------------------------------- connections

    async def serve(self, stream: trio.abc.Stream, address: str = "") -> None:
        """Serve one connected source until it goes away or something is wrong.

        Never raises for what the peer does: every ending is logged as one line.
        """
        address = address or _peer_address(stream)
        fs = FramedStream(stream)
        try:
            # Checked and set with no await in between: at most one active source.
            if self._busy:
                await self._refuse_busy(fs, address)
                return
            self._busy = True
            try:
                await self._serve_locked(fs, address)
            finally:
                self._busy = False
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await fs.aclose()

    async def _refuse_busy(self, fs: FramedStream, address: str) -> None:
        active = self._active
        who = f"{active.address} ({active.peer.node_id!r})" if active else "another source"
        text = f"this target already follows {who}"
        log.warning("refusing source at %s: %s", address or "?", text)
        # Read its HELLO first: closing with unread data would reset the connection and the
        # peer might never see the REFUSE.
        with trio.move_on_after(BUSY_GRACE):
            try:
                hello = await fs.receive()
                vol = self.volume
                if (
                    isinstance(hello, Hello)
                    and vol is not None
                    and not vol.state.sync_state
                    and (hello.epochs[-1][0] if hello.epochs else 0) < vol.state.epoch
                ):
                    # A stale source (split brain): tell it that it is fenced, not merely
                    # that we are busy, or it would retry and keep taking writes. The
                    # handshake authenticates it first and refuses FENCED (nothing applied).
                    await self._fence_stale(fs, address, hello, vol)
                    return
                if (
                    isinstance(hello, Hello)
                    and active is not None
                    and hello.node_id == active.peer.node_id
                    and trio.current_time() - active.last_received > 2 * self.keepalive
                ):
                    # The same source, back from a crash or a cut, while its old connection
                    # looks dead (a live one pings): drop the old one so that its retry
                    # succeeds now instead of after SILENCE_TIMEOUT.
                    active.drop(f"the source reconnected from {address}")
                await fs.send(Refuse(RefuseReason.BUSY, text))
            except (ReplError, trio.BrokenResourceError):
                pass

    async def _fence_stale(self, fs: FramedStream, address: str, hello: Hello, vol: Volume) -> None:
        try:
            await handshake_target(
                fs,
                secret=self.secret,
                volume_uuid=vol.uuid,
                node_id=self.node_id,
                epochs=[tuple(e) for e in vol.state.epochs],
                received_seq=vol.received_seq,
                applied_seq=vol.last_seq,
                timeout=self.handshake_timeout,
                hello=hello,
            )
        except (HandshakeRefused, HandshakeTimeout, ConnectionClosed, ProtocolError) as exc:
            log.warning("stale source at %s: %s", address or "?", exc)
            return
        # (only if its history was not older after all: then we are just busy)
        await fs.send(Refuse(RefuseReason.BUSY, "this target already follows another source"))

    async def _serve_locked(self, fs: FramedStream, address: str) -> None:
        vol = self.volume
        empty = vol is None or bool(vol.state.sync_state)
        try:
            peer = await handshake_target(
                fs,
                secret=self.secret,
                volume_uuid=None if empty else vol.uuid,
                node_id=self.node_id,
                epochs=[] if vol is None or empty else [tuple(e) for e in vol.state.epochs],
                received_seq=0 if empty else vol.received_seq,
                applied_seq=0 if empty else vol.last_seq,
                timeout=self.handshake_timeout,
            )
        except (HandshakeRefused, HandshakeTimeout, ConnectionClosed, ProtocolError) as exc:
            log.warning("handshake with %s failed: %s", address or "source", exc)
            return
        ses = _Session(fs, peer, address, expect_full_sync=empty, ready=not empty)
        if vol is not None and not empty:
            self._judge_fork(ses, vol)
        ses.last_received = ses.last_sent = trio.current_time()
        st = self._status
        st.sessions += 1
        st.source_address, st.source_node_id = address, peer.node_id
        st.source_last_seq = peer.last_seq
        st.state = ReceiverState.INITIAL_SYNC if empty else ReceiverState.STREAMING
        st.last_error = ""
        self._active = ses
        log.info(
            "source %r at %s connected (its last seq %d)", peer.node_id, address, peer.last_seq
        )
        try:
            with ses.cancel:
                if vol is not None and vol.failed:
                    await self._report_failure(ses, vol.failed, disk_full=False)
                    raise _Drop(f"the replica volume is failed: {vol.failed}", error=True)
                async with trio.open_nursery() as nursery:
                    send, receive = trio.open_memory_channel[Message](QUEUE_FRAMES)
                    nursery.start_soon(self._guard, ses, self._read, send)
                    nursery.start_soon(self._guard, ses, self._process, receive)
                    nursery.start_soon(self._guard, ses, self._keepalive)
        except _Drop as exc:  # raised before the nursery started
            ses.drop(str(exc), error=exc.error)
        finally:
            if ses.resync is not None:
                ses.resync.abort(ses.reason or "session ended")
                ses.resync = None
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

    def _judge_fork(self, ses: _Session, vol: Volume) -> None:
        """Compare epoch histories (failback): adopt the source's, or wait for a rewind."""
        verdict = judge(ses.peer.epochs, vol.state.epochs, vol.received_seq)
        if verdict.diverged:
            ses.fork_seq = verdict.fork_seq
            log.warning(
                "source %r: this replica %s; it takes a resync (its own seqs after the fork "
                "are archived first), not transactions",
                ses.peer.node_id,
                verdict.describe(vol.received_seq),
            )
        elif verdict.adopt:
            vol.applier.adopt_epochs([list(e) for e in ses.peer.epochs])

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
                ses.last_received = trio.current_time()
                await send.send(msg)

    async def _keepalive(self, ses: _Session) -> None:
        while True:
            await trio.sleep(self.keepalive / 2)
            if trio.current_time() - ses.last_sent >= self.keepalive:
                await self._send(ses, Ping(time.time_ns()))

    async def _process(self, ses: _Session, receive: trio.MemoryReceiveChannel[Message]) -> None:
        async with receive:
            while True:
                msg = await receive.receive()
                # Drain what the reader has queued, then acknowledge once (coalesced ACKs),
                # but never hold an ACK back longer than ACK_DELAY.
                while True:
                    await self._handle(ses, msg)
                    await self._answer_verify(ses)
                    if trio.current_time() - ses.last_ack_at >= ACK_DELAY:
                        await self._ack(ses)
                    try:
                        msg = receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                await self._ack(ses)

    # ---------------------------------------------------------------------------- messages

    async def _handle(self, ses: _Session, msg: Message) -> None:
        what = msg.TYPE.name
        try:
            if isinstance(msg, Txn):
                self._on_txn(ses, msg)
            elif isinstance(msg, SyncBegin):
                self._on_sync_begin(ses, msg)
            elif isinstance(msg, SyncBlocks):
                self._on_sync_blocks(ses, msg)
            elif isinstance(msg, SyncEnd):
                self._on_sync_end(ses, msg)
            elif isinstance(msg, Ping):
                await self._send(ses, Pong(msg.timestamp_ns))
            elif isinstance(msg, Pong):
                pass
            elif isinstance(msg, VerifyReq):
                self._on_verify(ses, msg)
            elif isinstance(msg, Switchover):
                await self._send(ses, self._on_switchover(ses, msg))
            elif isinstance(msg, Refuse):
                raise _Drop(f"refused by the source: {msg.text or msg.reason.name.lower()}")
            else:
                raise _Drop(f"unexpected {what} from the source")
        except VolumeFailed as exc:
            await self._report_failure(ses, str(exc), disk_full=_disk_full(exc))
            raise _Drop(f"{what}: {exc}", error=True)
        except OSError as exc:
            await self._report_failure(ses, str(exc), disk_full=_disk_full(exc))
            raise _Drop(f"{what}: {exc.strerror or exc}", error=True)
        except (StoreError, ProtocolError, ValueError) as exc:
            # LogError: out of sequence, bad record, old epoch; VolumeError: a bad sync run.
            raise _Drop(f"{what}: {exc}")

    def _on_txn(self, ses: _Session, msg: Txn) -> None:
        vol = self.volume
        if vol is None or not ses.ready:
            raise _Drop(f"TXN {msg.seq} before the initial sync completed")
        if ses.resync is not None:
            if ses.resync.on_txn(msg):
                self._finish_resync(ses)
            return
        if vol.state.role != Role.TARGET.value:
            raise _Drop(f"TXN {msg.seq}, but this node was promoted: it is a source now")
        if ses.fork_seq is not None:
            raise _Drop(
                f"TXN {msg.seq}, but this replica diverged after seq {ses.fork_seq}: it needs "
                "a resync first"
            )
        # No await from here to the end: the transaction is received, applied, and the
        # caches above are told, as one step of the trio loop.
        txn = vol.applier.receive(msg.seq, msg.record)
        vol.applier.apply(txn)
        if self.on_applied is not None:
            try:
                self.on_applied(txn)
            except Exception:
                log.exception("on_applied failed for seq %d", txn.seq)
        self._check_consistent(vol)

    def _on_sync_begin(self, ses: _Session, msg: SyncBegin) -> None:
        if msg.kind is SyncKind.RESYNC:
            self._begin_resync(ses, msg)
            return
        if not ses.expect_full_sync or ses.syncing or ses.ready:
            raise _Drop("SYNC_BEGIN, but this target did not ask for an initial sync")
        # (the id the source just saw stays ours)
        old, self.volume = self.volume, None
        self.volume = start_replica(self.volume_dir, old, msg, ses.peer, self.node_id)
        self._consistent_reported = False
        ses.syncing = True
        st = self._status
        st.state = ReceiverState.INITIAL_SYNC
        st.sync_blocks_copied, st.sync_blocks_total = 0, msg.block_count
        if self.on_created is not None:
            self.on_created(self.volume)

    def _on_sync_blocks(self, ses: _Session, msg: SyncBlocks) -> None:
        if ses.resync is not None:
            ses.resync.on_blocks(msg)
            return
        vol = self.volume
        if not ses.syncing or vol is None:
            raise _Drop("SYNC_BLOCKS outside of an initial sync")
        vol.applier.write_sync_blocks(msg.first_block, msg.blocks(vol.block_size))
        self._status.sync_blocks_copied += msg.nblocks

    def _on_sync_end(self, ses: _Session, msg: SyncEnd) -> None:
        if ses.resync is not None:
            if ses.resync.on_end(msg):
                self._finish_resync(ses)
            return
        vol = self.volume
        if not ses.syncing or vol is None:
            raise _Drop("SYNC_END outside of an initial sync")
        finish_copy(vol, msg, ses.peer.volume_uuid)
        ses.syncing = False
        ses.ready = True
        self._status.state = ReceiverState.STREAMING
        log.info(
            "initial-sync copy done: %d blocks; consistent once seq %d is applied",
            self._status.sync_blocks_copied,
            msg.consistent_at_seq,
        )
        # The ACK(S, S) that the contract asks for is the next coalesced ACK.
        self._check_consistent(vol)

    def _begin_resync(self, ses: _Session, msg: SyncBegin) -> None:
        vol = self.volume
        if vol is None or not ses.ready or ses.syncing or ses.resync is not None:
            raise _Drop("SYNC_BEGIN(RESYNC), but this target is not a consistent replica")
        epochs = [list(e) for e in ses.peer.epochs]
        ses.resync = TargetResync(vol, msg, fork_seq=ses.fork_seq, source_epochs=epochs)
        self._status.state = ReceiverState.RESYNCING

    def _finish_resync(self, ses: _Session) -> None:
        """Apply the staged group and tell the layers above, in one step (no await)."""
        resync, vol = ses.resync, self.volume
        assert resync is not None and vol is not None
        ses.resync = None  # (a failure below is not an abandoned stage: the record is set)
        result = resync.commit()
        ses.fork_seq = None  # (a rewind adopted the source's history with the group)
        self.last_resync = {**resync.as_dict(), "blocks_applied": result.blocks}
        self._status.state = ReceiverState.STREAMING
        try:
            if self.on_resynced is not None:
                self.on_resynced(vol)
            elif self.on_applied is not None:
                hints = result.hints
                self.on_applied(Transaction(result.end_seq, vol.state.epoch, 0, [], hints))
        except Exception:
            log.exception("resync hooks failed after seq %d", result.end_seq)
        self._check_consistent(vol)

    def _on_switchover(self, ses: _Session, msg: Switchover) -> SwitchoverDone:
        """Check and promote in one step (no await): nothing can be applied in between."""
        busy = not ses.ready or ses.resync is not None or ses.fork_seq is not None
        why = switchover_refusal(self.volume, msg.seq, busy=busy)
        if why is None and self.on_switchover is None:
            why = "this target cannot be promoted by a switchover"
        if why is not None:
            log.warning("switchover to seq %d refused: %s", msg.seq, why)
            return SwitchoverDone(SwitchoverResult.REFUSED, text=why)
        assert self.on_switchover is not None
        return self.on_switchover(msg)

    def _on_verify(self, ses: _Session, msg: VerifyReq) -> None:
        vol = self.volume
        if vol is None or not ses.ready:
            raise _Drop("VERIFY_REQ before the initial sync completed")
        for first, n in msg.ranges:
            if n < 0 or first + n > vol.block_count:
                raise _Drop(f"VERIFY_REQ range {first}+{n} outside the volume")
        ses.pending_verify.append(msg)

    async def _answer_verify(self, ses: _Session) -> None:
        vol = self.volume
        if not ses.pending_verify or vol is None:
            return
        while ses.pending_verify and ses.pending_verify[0].seq <= vol.last_seq:
            req = ses.pending_verify.pop(0)
            if req.seq < vol.last_seq:
                # Past state cannot be digested: (our applied seq, no digests) = "try again".
                log.info("VERIFY_REQ for seq %d, but applied is %d", req.seq, vol.last_seq)
                await self._send(ses, VerifyReply(vol.last_seq, []))
                continue
            # The processor is the only task that applies, and it waits here: the block
            # file stays at req.seq while the worker thread reads it.
            digests = await trio.to_thread.run_sync(range_digests, vol, req.ranges)
            await self._send(ses, VerifyReply(req.seq, digests))

    # ------------------------------------------------------------------------------ helpers

    def _check_consistent(self, vol: Volume) -> None:
        if self._consistent_reported or not vol.consistent:
            return
        self._consistent_reported = True
        vol.applier.reload_geometry()
        log.info("%s: replica is consistent at seq %d", self.volume_dir, vol.last_seq)
        if self.on_consistent is not None:
            self.on_consistent(vol)

    async def _send(self, ses: _Session, msg: Message) -> None:
        await ses.fs.send(msg)
        ses.last_sent = trio.current_time()

    async def _ack(self, ses: _Session) -> None:
        vol = self.volume
        if vol is None or not ses.ready:
            return  # nothing to acknowledge before the initial-sync copy is complete
        if ses.resync is not None:
            pos = ses.resync.positions()
        elif ses.fork_seq is not None:  # diverged: only seqs up to the fork are the source's
            pos = (ses.fork_seq, ses.fork_seq)
        else:
            pos = (vol.received_seq, vol.last_seq)
        if pos == ses.acked:
            return
        await self._send(ses, Ack(pos[0], pos[1], time.time_ns()))
        ses.acked = pos
        ses.last_ack_at = trio.current_time()
        self._status.last_ack_time = time.time()
        self._sample()

    async def _report_failure(self, ses: _Session, text: str, *, disk_full: bool) -> None:
        state = PeerState.DISK_FULL if disk_full else PeerState.IO_ERROR
        log.error("replica volume cannot go on (%s): %s", state.name, text)
        with trio.move_on_after(1.0):
            try:
                await self._send(ses, ErrorState(state, text))
            except ReplError:
                pass


def _peer_address(stream: trio.abc.Stream) -> str:
    """``host:port`` of a socket stream's peer ("" for other streams)."""
    sock = getattr(stream, "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("", 0)
    except (OSError, ValueError, TypeError):
        return ""
    if not host:
        return ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is ENOSPC / EDQUOT."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
