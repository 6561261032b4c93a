"""The replication handshake as two pure state machines (no trio, no sockets, no clock).

The exchange (the source connects, the target listens)::

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

``SourceHandshake`` and ``TargetHandshake`` take each received message (``receive``, or
``bad_frame`` when the bytes did not decode) and answer with a ``Step``: the messages to
send, a REFUSE to send best effort, the error to raise, or the ``Peer`` once the handshake
succeeded. ``mirrorfs.repl.stream`` drives them over a ``FramedStream`` with a deadline.

A side that refuses sends REFUSE and raises ``HandshakeRefused``; the other side receives
the REFUSE and raises ``HandshakeRefused`` too, with ``by_peer`` set. The target checks
volume and epoch only after the source has proven itself, so an unauthenticated peer learns
nothing but the protocol version. Nothing is applied or shipped before ACCEPT.

The target's ``TargetGate`` is where its caller decides about what a source holds (the
replica's one source slot). ``gate.hello`` sees the HELLO and may refuse at once (BUSY:
another source holds the slot), which holds nothing; ``gate.admit`` is called only once the
source has proved the secret, in the same step as the ACCEPT that follows, and is where
the slot is taken (or BUSY answered, if another source took it meanwhile). A stale source
is told FENCED, busy or not, but only once it has proved itself.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mirrorfs.repl.auth import AuthRole, compute_proof, new_nonce, verify_proof
from mirrorfs.repl.wire import (
    PROTOCOL_VERSION,
    UUID_SIZE,
    ZERO_UUID,
    Accept,
    Auth,
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


class HandshakeRefused(ReplError):
    """The handshake failed: we refused the peer, or it refused us (``by_peer``)."""

    def __init__(self, reason: RefuseReason, message: str, *, by_peer: bool):
        super().__init__(message)
        self.reason = reason
        self.by_peer = by_peer


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
    partial_seq: int = 0  # target: holds the first partial_offset bytes of this record
    partial_offset: int = 0
    copy_seq: int = 0  # empty target: it holds the initial-sync copy from this seq ...
    copy_block: int = 0  # ... below this block (0: none)
    resync_seq: int = 0  # target: holds the stage of a resync from this seq (0: none) ...
    resync_block: int = 0  # ... with every differing block below this one ...
    resync_txn: int = 0  # ... and S+1..resync_txn staged
    empty: bool = False  # target: holds no volume yet and wants an initial sync
    initial_sync_allowed: bool = False  # source

    @property
    def epoch(self) -> int:
        """The peer's current epoch (0 if it has no history yet)."""
        return self.epochs[-1][0] if self.epochs else 0


@dataclass(slots=True)
class Step:
    """What the driver does after one message: send ``send`` in order, then ``refuse`` (best
    effort, with a short grace), then raise ``error``; ``peer`` is set once it succeeded."""

    send: list[Message] = field(default_factory=list)
    refuse: Refuse | None = None
    error: ReplError | None = None
    peer: Peer | None = None


class _Phase(enum.Enum):
    HELLO = "hello"  # target: waiting for HELLO
    REPLY = "reply"  # source: waiting for HELLO_REPLY
    AUTH = "auth"  # target: waiting for AUTH
    ACCEPT = "accept"  # source: waiting for ACCEPT
    DONE = "done"
    FAILED = "failed"


def _last_epoch(epochs: Sequence[tuple[int, int]]) -> int:
    return epochs[-1][0] if epochs else 0


def _refusal(reason: RefuseReason, text: str) -> Step:
    return Step(refuse=Refuse(reason, text), error=HandshakeRefused(reason, text, by_peer=False))


def _auth_failed(who: str) -> Step:
    return _refusal(
        RefuseReason.AUTH,
        f"{who} failed authentication (the shared secrets differ, or only one side has one)",
    )


def check_volume(
    source_uuid: bytes, target_uuid: bytes, initial_sync_allowed: bool
) -> tuple[RefuseReason, str] | None:
    """Why a source with ``source_uuid`` cannot serve a target with ``target_uuid``."""
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


def check_epochs(
    source_epochs: Sequence[tuple[int, int]], target_epochs: Sequence[tuple[int, int]]
) -> tuple[RefuseReason, str] | None:
    """FENCED when the source's epoch is older than the target's (split brain)."""
    source_epoch, target_epoch = _last_epoch(source_epochs), _last_epoch(target_epochs)
    if source_epoch < target_epoch:
        return (
            RefuseReason.FENCED,
            f"fenced: the source is at epoch {source_epoch} but the target is at epoch "
            f"{target_epoch} (it was promoted); the source must stop and be demoted",
        )
    return None


class _Machine:
    """What both sides share: the expected message, REFUSE handling, bad frames."""

    _phase: _Phase
    _expected: type[Message]
    _peer_name: str

    @property
    def done(self) -> bool:
        return self._phase is _Phase.DONE

    def bad_frame(self, exc: ProtocolError) -> Step:
        """The next frame did not decode: REFUSE PROTOCOL, and the ProtocolError is raised."""
        self._phase = _Phase.FAILED
        text = f"bad frame from {self._peer_name}: {exc}"
        return Step(refuse=Refuse(RefuseReason.PROTOCOL, text), error=exc)

    def receive(self, msg: Message) -> Step:
        """The next message from the peer; what to do about it."""
        if self._phase in (_Phase.DONE, _Phase.FAILED):
            raise RuntimeError(f"handshake already {self._phase.value}")
        if isinstance(msg, Refuse):
            self._phase = _Phase.FAILED
            text = f"refused by {self._peer_name}: {msg.text or msg.reason.name.lower()}"
            return Step(error=HandshakeRefused(msg.reason, text, by_peer=True))
        if not isinstance(msg, self._expected):
            self._phase = _Phase.FAILED
            return _refusal(
                RefuseReason.PROTOCOL,
                f"expected {self._expected.TYPE.name} from {self._peer_name}, got {msg.TYPE.name}",
            )
        step = self._on_expected(msg)
        if step.error is not None:
            self._phase = _Phase.FAILED
        return step

    def _on_expected(self, msg: Message) -> Step:
        raise NotImplementedError


class SourceHandshake(_Machine):
    """The source's half: ``hello()`` first, then ``receive`` HELLO_REPLY and ACCEPT."""

    def __init__(
        self,
        *,
        secret: bytes | None,
        volume_uuid: bytes,
        node_id: str,
        epochs: Sequence[tuple[int, int]],
        last_seq: int,
        allow_initial_sync: bool = False,
        protocol_version: int = PROTOCOL_VERSION,
        nonce: bytes | None = None,
    ) -> None:
        if len(volume_uuid) != UUID_SIZE or volume_uuid == ZERO_UUID:
            raise ValueError("a source needs a volume uuid")
        self.secret = secret
        self.volume_uuid = volume_uuid
        self.node_id = node_id
        self.epochs = list(epochs)
        self.last_seq = last_seq
        self.allow_initial_sync = allow_initial_sync
        self.protocol_version = protocol_version
        self.nonce = nonce if nonce is not None else new_nonce()
        self._phase = _Phase.REPLY
        self._expected = HelloReply
        self._peer_name = "target"
        self._reply: HelloReply | None = None

    def hello(self) -> Hello:
        """The first message: HELLO with our challenge."""
        flags = HelloFlags.INITIAL_SYNC_ALLOWED if self.allow_initial_sync else HelloFlags.NONE
        return Hello(
            self.volume_uuid,
            self.node_id,
            list(self.epochs),
            self.last_seq,
            self.nonce,
            flags,
            self.protocol_version,
        )

    def _on_expected(self, msg: Message) -> Step:
        if isinstance(msg, HelloReply):
            return self._on_reply(msg)
        assert isinstance(msg, Accept) and self._reply is not None
        reply = self._reply
        self._phase = _Phase.DONE
        log.info(
            "handshake with %s done: epoch %d, received %d, applied %d%s",
            self._peer_name,
            _last_epoch(reply.epochs),
            reply.received_seq,
            reply.applied_seq,
            " (empty: initial sync)" if reply.volume_uuid == ZERO_UUID else "",
        )
        return Step(
            peer=Peer(
                role=AuthRole.TARGET,
                node_id=reply.node_id,
                volume_uuid=reply.volume_uuid,
                epochs=tuple(tuple(e) for e in reply.epochs),  # type: ignore[misc]
                protocol_version=reply.protocol_version,
                received_seq=reply.received_seq,
                applied_seq=reply.applied_seq,
                partial_seq=reply.partial_seq,
                partial_offset=reply.partial_offset,
                copy_seq=reply.copy_seq,
                copy_block=reply.copy_block,
                resync_seq=reply.resync_seq,
                resync_block=reply.resync_block,
                resync_txn=reply.resync_txn,
                empty=reply.volume_uuid == ZERO_UUID,
            )
        )

    def _on_reply(self, reply: HelloReply) -> Step:
        who = f"target {reply.node_id!r}"
        if reply.protocol_version != self.protocol_version:
            return _refusal(
                RefuseReason.VERSION,
                f"{who} speaks protocol version {reply.protocol_version}, "
                f"the source speaks {self.protocol_version}",
            )
        if not verify_proof(
            self.secret,
            reply.proof,
            AuthRole.TARGET,
            own_nonce=reply.nonce,
            peer_nonce=self.nonce,
            volume_uuid=self.volume_uuid,
            own_node_id=reply.node_id,
            peer_node_id=self.node_id,
        ):
            return _auth_failed(who)
        problem = check_volume(self.volume_uuid, reply.volume_uuid, self.allow_initial_sync)
        problem = problem or check_epochs(self.epochs, reply.epochs)
        if problem:
            return _refusal(problem[0], f"{who}: {problem[1]}")
        proof = compute_proof(
            self.secret,
            AuthRole.SOURCE,
            own_nonce=self.nonce,
            peer_nonce=reply.nonce,
            volume_uuid=self.volume_uuid,
            own_node_id=self.node_id,
            peer_node_id=reply.node_id,
        )
        self._reply = reply
        self._phase, self._expected, self._peer_name = _Phase.ACCEPT, Accept, who
        return Step(send=[Auth(proof)])


class TargetGate(Protocol):
    """What the target's caller decides during the handshake (see ``TargetHandshake``)."""

    def hello(self, hello: Hello) -> Refuse | None:
        """Before HELLO_REPLY, unauthenticated: a REFUSE to send instead, or None."""
        ...

    def admit(self, peer: Peer, acceptable: bool) -> Refuse | None:
        """The source proved the secret: a REFUSE to send instead of ACCEPT, or None."""
        ...


class TargetHandshake(_Machine):
    """The target's half: ``receive`` HELLO, then AUTH.

    ``volume_uuid`` None (or all zero) means this target is empty and wants an initial sync.
    ``partial_seq``/``partial_offset``: what it holds of a record sent in parts
    (mirrorfs.repl.txn_parts), announced so that the source resumes it there; likewise
    ``copy_seq``/``copy_block``, an unfinished initial-sync copy of an empty target, and
    ``resync``: (S, block, txn) of a resync stage it holds (HelloReply).
    ``gate``, if given: ``gate.hello(hello)`` once the HELLO's version is right, before
    anything is answered; ``gate.admit(peer, acceptable)`` once the source has proved the
    secret (not when the checks find it fenced), ``acceptable`` saying whether the volume
    and epoch checks passed. Each returns a REFUSE to send instead, or None; ``admit``
    returning None with ``acceptable`` means the caller has admitted the source, and
    ACCEPT follows.
    """

    def __init__(
        self,
        *,
        secret: bytes | None,
        volume_uuid: bytes | None,
        node_id: str,
        epochs: Sequence[tuple[int, int]],
        received_seq: int,
        applied_seq: int,
        partial_seq: int = 0,
        partial_offset: int = 0,
        copy_seq: int = 0,
        copy_block: int = 0,
        resync: tuple[int, int, int] = (0, 0, 0),
        protocol_version: int = PROTOCOL_VERSION,
        nonce: bytes | None = None,
        gate: TargetGate | None = None,
    ) -> None:
        self.gate = gate
        self.own_uuid = volume_uuid or ZERO_UUID
        if len(self.own_uuid) != UUID_SIZE:
            raise ValueError(f"volume uuid must be {UUID_SIZE} bytes")
        self.secret = secret
        self.node_id = node_id
        self.epochs = list(epochs)
        self.received_seq = received_seq
        self.applied_seq = applied_seq
        self.partial_seq = partial_seq
        self.partial_offset = partial_offset
        self.copy_seq = copy_seq
        self.copy_block = copy_block
        self.resync = resync
        self.protocol_version = protocol_version
        self.nonce = nonce if nonce is not None else new_nonce()
        self._phase = _Phase.HELLO
        self._expected = Hello
        self._peer_name = "source"
        self._hello: Hello | None = None

    def _on_expected(self, msg: Message) -> Step:
        if isinstance(msg, Hello):
            return self._on_hello(msg)
        assert isinstance(msg, Auth) and self._hello is not None
        return self._on_auth(self._hello, msg)

    def _on_hello(self, hello: Hello) -> Step:
        who = f"source {hello.node_id!r}"
        if hello.protocol_version != self.protocol_version:
            return _refusal(
                RefuseReason.VERSION,
                f"{who} speaks protocol version {hello.protocol_version}, "
                f"the target speaks {self.protocol_version}",
            )
        if hello.volume_uuid == ZERO_UUID:
            return _refusal(RefuseReason.PROTOCOL, f"{who} announced no volume")
        refuse = self.gate.hello(hello) if self.gate is not None else None
        if refuse is not None:
            return _refusal(refuse.reason, refuse.text)
        proof = compute_proof(
            self.secret,
            AuthRole.TARGET,
            own_nonce=self.nonce,
            peer_nonce=hello.nonce,
            volume_uuid=hello.volume_uuid,
            own_node_id=self.node_id,
            peer_node_id=hello.node_id,
        )
        reply = HelloReply(
            self.own_uuid,
            self.node_id,
            list(self.epochs),
            self.received_seq,
            self.applied_seq,
            self.nonce,
            proof,
            self.protocol_version,
            self.partial_seq,
            self.partial_offset,
            self.copy_seq if self.own_uuid == ZERO_UUID else 0,
            self.copy_block if self.own_uuid == ZERO_UUID else 0,
            *(self.resync if self.own_uuid != ZERO_UUID else (0, 0, 0)),
        )
        self._hello = hello
        self._phase, self._expected, self._peer_name = _Phase.AUTH, Auth, who
        return Step(send=[reply])

    def _on_auth(self, hello: Hello, auth: Auth) -> Step:
        who = self._peer_name
        if not verify_proof(
            self.secret,
            auth.proof,
            AuthRole.SOURCE,
            own_nonce=hello.nonce,
            peer_nonce=self.nonce,
            volume_uuid=hello.volume_uuid,
            own_node_id=hello.node_id,
            peer_node_id=self.node_id,
        ):
            return _auth_failed(who)
        initial = bool(hello.flags & HelloFlags.INITIAL_SYNC_ALLOWED)
        peer = Peer(
            role=AuthRole.SOURCE,
            node_id=hello.node_id,
            volume_uuid=hello.volume_uuid,
            epochs=tuple(tuple(e) for e in hello.epochs),  # type: ignore[misc]
            protocol_version=hello.protocol_version,
            last_seq=hello.last_seq,
            initial_sync_allowed=initial,
        )
        problem = check_volume(hello.volume_uuid, self.own_uuid, initial)
        problem = problem or check_epochs(hello.epochs, self.epochs)
        fenced = problem is not None and problem[0] is RefuseReason.FENCED
        if self.gate is not None and not fenced:
            refuse = self.gate.admit(peer, problem is None)
            if refuse is not None:
                return _refusal(refuse.reason, refuse.text)
        if problem:
            return _refusal(problem[0], f"{who}: {problem[1]}")
        self._phase = _Phase.DONE
        log.info(
            "handshake with %s done: epoch %d, last seq %d",
            who,
            _last_epoch(hello.epochs),
            hello.last_seq,
        )
        return Step(send=[Accept()], peer=peer)
