"""Frames over a trio stream, and the replication handshake.

``FramedStream`` sends and receives ``wire`` messages over any ``trio.abc.Stream`` (a TCP
socket, a TLS stream, or ``trio.testing.memory_stream_pair`` in tests).

The handshake (the source connects, the target listens)::

    source                                   target
    HELLO (version, uuid, id, epochs,   ->   version incompatible?       -> REFUSE VERSION
           last_seq, nonce_s, flags)
                                        <-   HELLO_REPLY (version, uuid or zeros, id, epochs,
                                             received/applied seq, nonce_t, proof over nonce_s)
    version incompatible? -> REFUSE VERSION
    target proof wrong?   -> REFUSE AUTH
    volume mismatch?      -> REFUSE WRONG_VOLUME / NO_INITIAL_SYNC
    target epoch newer?   -> REFUSE FENCED (this source is stale)
    AUTH (proof over nonce_t)           ->   source proof wrong?         -> REFUSE AUTH
                                             volume / epoch checks again (a buggy or hostile
                                             source cannot skip them)
                                        <-   ACCEPT

A side that refuses sends REFUSE (best effort) and raises ``HandshakeRefused``; the other
side receives the REFUSE and raises ``HandshakeRefused`` too, with ``by_peer`` set. The
target checks volume and epoch only after the source has proven itself, so an unauthenticated
peer learns nothing but the protocol version. Nothing is applied or shipped before ACCEPT.

Concurrency: ``send`` may be called from several tasks (a lock serialises whole frames);
``receive`` from one task at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from mirrorfs.repl.auth import AuthRole, compute_proof, new_nonce, verify_proof
from mirrorfs.repl.wire import (
    PROTOCOL_VERSION,
    UUID_SIZE,
    ZERO_UUID,
    Accept,
    Auth,
    FrameDecoder,
    Hello,
    HelloFlags,
    HelloReply,
    Message,
    ProtocolError,
    Refuse,
    RefuseReason,
    ReplError,
)

log = logging.getLogger(__name__)

RECEIVE_SIZE = 256 * 1024
# How long we wait for the peer to take a REFUSE before giving up on telling it.
_REFUSE_GRACE = 1.0


class ConnectionClosed(ReplError):
    """The peer closed or reset the connection."""


class HandshakeRefused(ReplError):
    """The handshake failed: we refused the peer, or it refused us (``by_peer``)."""

    def __init__(self, reason: RefuseReason, message: str, *, by_peer: bool):
        super().__init__(message)
        self.reason = reason
        self.by_peer = by_peer


class HandshakeTimeout(ReplError):
    """The peer did not complete the handshake in time."""


class FramedStream:
    """Whole messages over a byte stream. Owns the stream: ``aclose()`` closes it."""

    def __init__(self, stream: trio.abc.Stream, *, receive_size: int = RECEIVE_SIZE):
        self.stream = stream
        self._decoder = FrameDecoder()
        self._receive_size = receive_size
        self._send_lock = trio.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

    async def send(self, msg: Message) -> None:
        """Send one message (ConnectionClosed if the peer is gone)."""
        data = msg.encode()
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionClosed(f"connection lost while sending {msg.TYPE.name}: {exc}")
        self.bytes_sent += len(data)

    async def receive(self) -> Message:
        """The next message; ProtocolError on a bad frame, ConnectionClosed at EOF."""
        while (msg := self._decoder.next_message()) is None:
            try:
                data = await self.stream.receive_some(self._receive_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionClosed(f"connection lost: {exc}")
            if not data:
                if self._decoder.buffered:
                    raise ConnectionClosed(
                        f"connection closed by peer inside a frame "
                        f"(stream offset {self._decoder.offset}, {self._decoder.buffered} bytes)"
                    )
                raise ConnectionClosed("connection closed by peer")
            self.bytes_received += len(data)
            self._decoder.feed(data)
        return msg

    async def aclose(self) -> None:
        await self.stream.aclose()


@dataclass(slots=True, frozen=True)
class Peer:
    """What the handshake learned about the other side."""

    role: AuthRole
    node_id: str
    volume_uuid: bytes  # as announced; all zero for an empty target
    epochs: tuple[tuple[int, int], ...]
    protocol_version: int
    last_seq: int = 0  # source: its last committed transaction
    received_seq: int = 0  # target: durable in its log
    applied_seq: int = 0  # target: applied to its block file
    empty: bool = False  # target: holds no volume yet and wants an initial sync
    initial_sync_allowed: bool = False  # source

    @property
    def epoch(self) -> int:
        """The peer's current epoch (0 if it has no history yet)."""
        return self.epochs[-1][0] if self.epochs else 0


def _last_epoch(epochs: Sequence[tuple[int, int]]) -> int:
    return epochs[-1][0] if epochs else 0


async def _refuse(fs: FramedStream, reason: RefuseReason, text: str) -> HandshakeRefused:
    """Tell the peer (best effort) and return the exception for our side to raise."""
    log.warning("refusing peer: %s", text)
    with trio.move_on_after(_REFUSE_GRACE):
        try:
            await fs.send(Refuse(reason, text))
        except ConnectionClosed:
            pass
    return HandshakeRefused(reason, text, by_peer=False)


async def _check_proof(
    fs: FramedStream, who: str, secret: bytes | None, proof: bytes, role: AuthRole, **fields
) -> None:
    """Refuse the peer (REFUSE sent, HandshakeRefused raised) unless its proof is right."""
    if not verify_proof(secret, proof, role, **fields):
        raise await _refuse(
            fs,
            RefuseReason.AUTH,
            f"{who} failed authentication (the shared secrets differ, or only one side has one)",
        )


async def _expect(fs: FramedStream, cls: type[Message], peer: str) -> Message:
    """The next message, which must be ``cls``; a REFUSE becomes HandshakeRefused."""
    try:
        msg = await fs.receive()
    except ProtocolError as exc:
        await _refuse(fs, RefuseReason.PROTOCOL, f"bad frame from {peer}: {exc}")
        raise
    if isinstance(msg, Refuse):
        text = f"refused by {peer}: {msg.text or msg.reason.name.lower()}"
        raise HandshakeRefused(msg.reason, text, by_peer=True)
    if not isinstance(msg, cls):
        raise await _refuse(
            fs, RefuseReason.PROTOCOL, f"expected {cls.TYPE.name} from {peer}, got {msg.TYPE.name}"
        )
    return msg


def _check_volume(
    source_uuid: bytes, target_uuid: bytes, initial_sync_allowed: bool
) -> tuple[RefuseReason, str] | None:
    if target_uuid == ZERO_UUID:
        if initial_sync_allowed:
            return None
        return (
            RefuseReason.NO_INITIAL_SYNC,
            "the target is empty and the source does not allow an initial sync",
        )
    if source_uuid != target_uuid:
        return (
            RefuseReason.WRONG_VOLUME,
            f"wrong volume: source has {source_uuid.hex()}, target has {target_uuid.hex()}",
        )
    return None


def _check_epochs(
    source_epochs: Sequence[tuple[int, int]], target_epochs: Sequence[tuple[int, int]]
) -> tuple[RefuseReason, str] | None:
    source_epoch, target_epoch = _last_epoch(source_epochs), _last_epoch(target_epochs)
    if source_epoch < target_epoch:
        return (
            RefuseReason.FENCED,
            f"fenced: the source is at epoch {source_epoch} but the target is at epoch "
            f"{target_epoch} (it was promoted); the source must stop and be demoted",
        )
    return None


async def handshake_source(
    fs: FramedStream,
    *,
    secret: bytes | None,
    volume_uuid: bytes,
    node_id: str,
    epochs: Sequence[tuple[int, int]],
    last_seq: int,
    allow_initial_sync: bool = False,
    protocol_version: int = PROTOCOL_VERSION,
    timeout: float = 10.0,
) -> Peer:
    """Run the source's half of the handshake; return the target as a Peer.

    Raises HandshakeRefused (either side refused), HandshakeTimeout, ConnectionClosed or
    ProtocolError; in every case nothing has been shipped.
    """
    if len(volume_uuid) != UUID_SIZE or volume_uuid == ZERO_UUID:
        raise ValueError("a source needs a volume uuid")
    nonce = new_nonce()
    flags = HelloFlags.INITIAL_SYNC_ALLOWED if allow_initial_sync else HelloFlags.NONE
    hello = Hello(volume_uuid, node_id, list(epochs), last_seq, nonce, flags, protocol_version)
    try:
        with trio.fail_after(timeout):
            await fs.send(hello)
            reply = await _expect(fs, HelloReply, "target")
            assert isinstance(reply, HelloReply)
            who = f"target {reply.node_id!r}"
            if reply.protocol_version != protocol_version:
                raise await _refuse(
                    fs,
                    RefuseReason.VERSION,
                    f"{who} speaks protocol version {reply.protocol_version}, "
                    f"the source speaks {protocol_version}",
                )
            await _check_proof(
                fs,
                who,
                secret,
                reply.proof,
                AuthRole.TARGET,
                own_nonce=reply.nonce,
                peer_nonce=nonce,
                volume_uuid=volume_uuid,
                own_node_id=reply.node_id,
                peer_node_id=node_id,
            )
            problem = _check_volume(volume_uuid, reply.volume_uuid, allow_initial_sync)
            problem = problem or _check_epochs(epochs, reply.epochs)
            if problem:
                raise await _refuse(fs, problem[0], f"{who}: {problem[1]}")
            proof = compute_proof(
                secret,
                AuthRole.SOURCE,
                own_nonce=nonce,
                peer_nonce=reply.nonce,
                volume_uuid=volume_uuid,
                own_node_id=node_id,
                peer_node_id=reply.node_id,
            )
            await fs.send(Auth(proof))
            await _expect(fs, Accept, who)
    except trio.TooSlowError:
        raise HandshakeTimeout(f"handshake with the target timed out after {timeout:g} s")
    log.info(
        "handshake with %s done: epoch %d, received %d, applied %d%s",
        who,
        _last_epoch(reply.epochs),
        reply.received_seq,
        reply.applied_seq,
        " (empty: initial sync)" if reply.volume_uuid == ZERO_UUID else "",
    )
    return Peer(
        role=AuthRole.TARGET,
        node_id=reply.node_id,
        volume_uuid=reply.volume_uuid,
        epochs=tuple(tuple(e) for e in reply.epochs),
        protocol_version=reply.protocol_version,
        received_seq=reply.received_seq,
        applied_seq=reply.applied_seq,
        empty=reply.volume_uuid == ZERO_UUID,
    )


async def handshake_target(
    fs: FramedStream,
    *,
    secret: bytes | None,
    volume_uuid: bytes | None,
    node_id: str,
    epochs: Sequence[tuple[int, int]],
    received_seq: int,
    applied_seq: int,
    protocol_version: int = PROTOCOL_VERSION,
    timeout: float = 10.0,
    hello: Hello | None = None,
) -> Peer:
    """Run the target's half of the handshake; return the source as a Peer.

    ``volume_uuid`` None (or all zero) means this target is empty and wants an initial
    sync. ``hello``: the source's HELLO, already read by the caller. Raises like
    ``handshake_source``; nothing may be applied unless this returns.
    """
    own_uuid = volume_uuid or ZERO_UUID
    if len(own_uuid) != UUID_SIZE:
        raise ValueError(f"volume uuid must be {UUID_SIZE} bytes")
    nonce = new_nonce()
    try:
        with trio.fail_after(timeout):
            if hello is None:
                hello = await _expect(fs, Hello, "source")  # type: ignore[assignment]
            assert isinstance(hello, Hello)
            who = f"source {hello.node_id!r}"
            if hello.protocol_version != protocol_version:
                raise await _refuse(
                    fs,
                    RefuseReason.VERSION,
                    f"{who} speaks protocol version {hello.protocol_version}, "
                    f"the target speaks {protocol_version}",
                )
            if hello.volume_uuid == ZERO_UUID:
                raise await _refuse(fs, RefuseReason.PROTOCOL, f"{who} announced no volume")
            proof = compute_proof(
                secret,
                AuthRole.TARGET,
                own_nonce=nonce,
                peer_nonce=hello.nonce,
                volume_uuid=hello.volume_uuid,
                own_node_id=node_id,
                peer_node_id=hello.node_id,
            )
            await fs.send(
                HelloReply(
                    own_uuid,
                    node_id,
                    list(epochs),
                    received_seq,
                    applied_seq,
                    nonce,
                    proof,
                    protocol_version,
                )
            )
            auth = await _expect(fs, Auth, who)
            assert isinstance(auth, Auth)
            await _check_proof(
                fs,
                who,
                secret,
                auth.proof,
                AuthRole.SOURCE,
                own_nonce=hello.nonce,
                peer_nonce=nonce,
                volume_uuid=hello.volume_uuid,
                own_node_id=hello.node_id,
                peer_node_id=node_id,
            )
            initial = bool(hello.flags & HelloFlags.INITIAL_SYNC_ALLOWED)
            problem = _check_volume(hello.volume_uuid, own_uuid, initial)
            problem = problem or _check_epochs(hello.epochs, epochs)
            if problem:
                raise await _refuse(fs, problem[0], f"{who}: {problem[1]}")
            await fs.send(Accept())
    except trio.TooSlowError:
        raise HandshakeTimeout(f"handshake with the source timed out after {timeout:g} s")
    log.info(
        "handshake with %s done: epoch %d, last seq %d",
        who,
        _last_epoch(hello.epochs),
        hello.last_seq,
    )
    return Peer(
        role=AuthRole.SOURCE,
        node_id=hello.node_id,
        volume_uuid=hello.volume_uuid,
        epochs=tuple(tuple(e) for e in hello.epochs),
        protocol_version=hello.protocol_version,
        last_seq=hello.last_seq,
        initial_sync_allowed=bool(hello.flags & HelloFlags.INITIAL_SYNC_ALLOWED),
    )
