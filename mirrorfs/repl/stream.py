"""Frames over a trio stream, and the replication handshake.

``FramedStream`` sends and receives ``wire`` messages over any ``trio.abc.Stream`` (a TCP
socket, a TLS stream, or ``trio.testing.memory_stream_pair`` in tests).

The handshake itself is pure (``mirrorfs.repl.handshake``: ``SourceHandshake`` and
``TargetHandshake``, with the exchange drawn in its docstring); ``handshake_source`` and
``handshake_target`` drive it over a ``FramedStream`` with one deadline for the whole
exchange (a peer that trickles a byte at a time cannot stretch it), and send its REFUSE
best effort (``_REFUSE_GRACE``, inside that deadline). While a handshake runs, the stream
buffers at most ``HANDSHAKE_BUFFER`` bytes of an incomplete frame (a handshake frame is
small; an unauthenticated peer must not make us hold up to MAX_FRAME per connection).

Concurrency: ``send`` may be called from several tasks (a lock serialises whole frames);
``receive`` from one task at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from mirrorfs.repl.handshake import (
    HandshakeRefused,
    Peer,
    SourceHandshake,
    Step,
    TargetGate,
    TargetHandshake,
)
from mirrorfs.repl.wire import (
    PROTOCOL_VERSION,
    FrameDecoder,
    Hello,
    Message,
    ProtocolError,
    Refuse,
    ReplError,
    Txn,
    frame_header,
)

log = logging.getLogger(__name__)

RECEIVE_SIZE = 256 * 1024
# How long we wait for the peer to take a REFUSE before giving up on telling it.
_REFUSE_GRACE = 1.0
# The most a handshake may buffer: a HELLO with MAX_EPOCHS epochs is about 64 KiB.
HANDSHAKE_BUFFER = 256 * 1024
#: TXN records at least this large are framed in a worker thread (``FramedStream.send``).
ENCODE_IN_THREAD = 1 << 20


class ConnectionClosed(ReplError):
    """The peer closed or reset the connection."""


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
        #: The most bytes ``receive`` buffers towards one frame (None: MAX_FRAME's bound).
        self.receive_limit: int | None = None

    async def send(self, msg: Message) -> None:
        """Send one message (ConnectionClosed if the peer is gone)."""
        async with self._send_lock:
            if isinstance(msg, Txn) and len(msg.record) >= ENCODE_IN_THREAD:
                # A whole transaction is not copied into a frame: its header (a crc32 of
                # megabytes, for which zlib lets go of the GIL) is made in a worker thread
                # while the loop serves FUSE, and the record goes out from where it lies.
                parts = msg.payload_parts()
                head = await trio.to_thread.run_sync(frame_header, msg.TYPE, parts)
                pieces = [head + b"".join(parts[:-1]), parts[-1]]
            else:
                pieces = [msg.encode()]
            try:
                for piece in pieces:
                    await self.stream.send_all(piece)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                why = str(exc) or type(exc).__name__
                raise ConnectionClosed(f"connection lost while sending {msg.TYPE.name}: {why}")
        self.bytes_sent += sum(len(piece) for piece in pieces)

    async def receive(self) -> Message:
        """The next message; ProtocolError on a bad frame, ConnectionClosed at EOF."""
        while (msg := self._decoder.next_message()) is None:
            try:
                data = await self.stream.receive_some(self._receive_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionClosed(f"connection lost: {str(exc) or type(exc).__name__}")
            if not data:
                if self._decoder.buffered:
                    raise ConnectionClosed(
                        f"connection closed by peer inside a frame "
                        f"(stream offset {self._decoder.offset}, {self._decoder.buffered} bytes)"
                    )
                raise ConnectionClosed("connection closed by peer")
            self.bytes_received += len(data)
            self._decoder.feed(data)
            limit = self.receive_limit
            if limit is not None and self._decoder.buffered > limit:
                raise ProtocolError(f"more than {limit} bytes without a complete frame")
        return msg

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _refuse(fs: FramedStream, refuse: Refuse) -> None:
    """Tell the peer (best effort, with a short grace). The caller logs the refusal once,
    with the peer's address (HandshakeRefused carries the same text)."""
    log.debug("refusing peer: %s", refuse.text)
    with trio.move_on_after(_REFUSE_GRACE):
        try:
            await fs.send(refuse)
        except ConnectionClosed:
            pass


async def _drive(fs: FramedStream, machine: SourceHandshake | TargetHandshake, step: Step) -> Peer:
    """Carry out ``step`` and the machine's next ones until it succeeds or fails."""
    while True:
        for msg in step.send:
            await fs.send(msg)
        if step.refuse is not None:
            await _refuse(fs, step.refuse)
        if step.error is not None:
            raise step.error
        if step.peer is not None:
            return step.peer
        try:
            msg = await fs.receive()
        except ProtocolError as exc:
            step = machine.bad_frame(exc)
        else:
            step = machine.receive(msg)


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
    """Run the source's half of the handshake (``SourceHandshake``); return the target.

    Raises HandshakeRefused (either side refused), HandshakeTimeout, ConnectionClosed or
    ProtocolError; in every case nothing has been shipped.
    """
    machine = SourceHandshake(
        secret=secret,
        volume_uuid=volume_uuid,
        node_id=node_id,
        epochs=epochs,
        last_seq=last_seq,
        allow_initial_sync=allow_initial_sync,
        protocol_version=protocol_version,
    )
    try:
        with trio.fail_after(timeout):
            return await _drive(fs, machine, Step(send=[machine.hello()]))
    except trio.TooSlowError:
        raise HandshakeTimeout(f"handshake with the target timed out after {timeout:g} s")


async def handshake_target(
    fs: FramedStream,
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
    timeout: float = 10.0,
    hello: Hello | None = None,
    gate: TargetGate | None = None,
) -> Peer:
    """Run the target's half of the handshake (``TargetHandshake``); return the source.

    ``volume_uuid`` None (or all zero) means this target is empty and wants an initial
    sync. ``hello``: the source's HELLO, already read by the caller. ``gate``: the caller's
    decisions on the HELLO and, once the source proved the secret, before ACCEPT (see
    ``TargetHandshake``); what ``gate.admit`` takes, the caller gives back if this raises.
    ``timeout`` bounds the whole exchange. Raises like ``handshake_source``; nothing may be
    applied unless this returns.
    """
    machine = TargetHandshake(
        secret=secret,
        volume_uuid=volume_uuid,
        node_id=node_id,
        epochs=epochs,
        received_seq=received_seq,
        applied_seq=applied_seq,
        partial_seq=partial_seq,
        partial_offset=partial_offset,
        copy_seq=copy_seq,
        copy_block=copy_block,
        resync=resync,
        protocol_version=protocol_version,
        gate=gate,
    )
    fs.receive_limit = HANDSHAKE_BUFFER
    try:
        # One deadline for everything: reads that each bring a byte do not extend it.
        with trio.fail_after(timeout):
            first = machine.receive(hello) if hello is not None else Step()
            return await _drive(fs, machine, first)
    except trio.TooSlowError:
        raise HandshakeTimeout(f"handshake with the source timed out after {timeout:g} s")
    finally:
        fs.receive_limit = None


__all__ = [
    "ConnectionClosed",
    "FramedStream",
    "HandshakeRefused",
    "HandshakeTimeout",
    "Peer",
    "handshake_source",
    "handshake_target",
]
