"""Replication frames: the header, its two CRCs, and an incremental decoder (sans-IO).

The frame layout (a 20-byte header: magic, version, type, flags, length, a CRC of the
header and a CRC over header and payload) is specified once, in the docstring of
mirrorfs.repl.wire, which documents the whole format; what the payloads mean is
mirrorfs.repl.messages.
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview

MAGIC = b"MFSW"
FRAME_VERSION = 1
PROTOCOL_VERSION = 2  # 2: TXN_PART, and HELLO_REPLY's partial_seq/partial_offset
MAX_FRAME = 64 << 20
HEADER = struct.Struct("<4sBBHIII")
assert HEADER.size == 20
_HCRC_SPAN = 12
_PREFIX = struct.Struct("<4sBBHI")
_U32 = struct.Struct("<I")
assert _PREFIX.size == _HCRC_SPAN


class ReplError(Exception):
    """Base class of replication errors (one-line message)."""


class ProtocolError(ReplError):
    """The peer sent bytes that are not a valid frame or message."""


def encode_frame(msg_type: int, payload: bytes) -> bytes:
    """A whole frame: header (with both CRCs) + payload."""
    return frame_header(msg_type, (payload,)) + payload


def frame_header(msg_type: int, parts: Sequence[Buffer]) -> bytes:
    """The 20-byte header of a frame whose payload is ``parts`` joined, without joining
    them: a large payload goes on the wire from where it lies (zlib's crc32 lets go of the
    GIL for it)."""
    length = sum(len(part) for part in parts)
    if length > MAX_FRAME:
        raise ValueError(f"payload of {length} bytes exceeds MAX_FRAME ({MAX_FRAME})")
    prefix = _PREFIX.pack(MAGIC, FRAME_VERSION, int(msg_type), 0, length)
    head = prefix + _U32.pack(zlib.crc32(prefix))
    crc = zlib.crc32(head + b"\0\0\0\0")
    for part in parts:
        crc = zlib.crc32(part, crc)
    return head + _U32.pack(crc)


@dataclass(slots=True, frozen=True)
class _Header:
    type: int
    length: int
    crc: int
    head: bytes  # the 20 header bytes with crc zeroed, for the payload CRC


class FrameReader:
    """Incremental frame decoder: ``feed(bytes)``, then ``next_message()`` until None.

    Generic over the messages: ``decode(type, payload)`` turns a payload into a message,
    ``known`` holds the type codes, ``type_name(code)`` names one in errors
    (``mirrorfs.repl.wire.FrameDecoder`` binds the replication messages).

    Raises only ``ProtocolError``, whatever the input; after one it stays failed (the stream
    cannot be resynchronised). A header is validated as soon as its 20 bytes are in (its
    magic as soon as that is in), before any of its payload is buffered, so a bogus length
    never makes us wait or allocate.
    """

    def __init__(
        self,
        decode: Callable[[int, bytes], Any],
        known: Container[int],
        type_name: Callable[[int], str],
        *,
        max_frame: int = MAX_FRAME,
    ):
        self._decode = decode  # payload -> message (ProtocolError if malformed)
        self._known = known  # message type codes
        self._type_name = type_name
        self._buf = bytearray()
        # Consumed bytes at the front of _buf: compacted lazily, so that many small frames
        # in one chunk do not each move the rest of the buffer.
        self._start = 0
        self._max_frame = max_frame
        self._header: _Header | None = None
        self._error: ProtocolError | None = None
        self.offset = 0  # stream offset of the first buffered byte
        self.frames = 0

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as messages (non-zero at EOF: a torn frame)."""
        return len(self._buf) - self._start

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._buf += data
        if self._header is None:
            self._check_header()

    def next_message(self) -> Any | None:
        """The next complete message, or None when more bytes are needed."""
        if self._error is not None:
            raise self._error
        if self._header is None:
            self._check_header()
        hdr = self._header
        if hdr is None:
            return None
        size = HEADER.size + hdr.length
        end = self._start + size
        if len(self._buf) < end:
            return None
        with memoryview(self._buf) as view:  # one copy, not a slice and then a copy of it
            payload = bytes(view[self._start + HEADER.size : end])
        if zlib.crc32(payload, zlib.crc32(hdr.head)) != hdr.crc:
            self._fail(f"CRC mismatch ({self._type_name(hdr.type)}, {hdr.length} bytes)")
        try:
            msg = self._decode(hdr.type, payload)
        except ProtocolError as exc:
            self._fail(str(exc))
        except Exception as exc:  # a parser bug must still surface as a ProtocolError
            log.exception("unexpected error decoding %s", self._type_name(hdr.type))
            self._fail(f"undecodable {self._type_name(hdr.type)} payload: {exc!r}")
        self._start = end
        if end == len(self._buf):
            self._buf.clear()
            self._start = 0
        elif end >= 1 << 20 or end * 2 >= len(self._buf):
            del self._buf[:end]
            self._start = 0
        self.offset += size
        self.frames += 1
        self._header = None
        return msg

    def _check_header(self) -> None:
        """Validate the buffered header once it is complete (the magic as soon as it is in)."""
        start = self._start
        if len(self._buf) - start < HEADER.size:
            # Tell a stranger (an HTTP probe, a port scanner) at once, not after 20 bytes.
            have = bytes(self._buf[start : start + len(MAGIC)])
            if have != MAGIC[: len(have)]:
                self._fail(f"bad magic {have!r}")
            return
        head = bytes(self._buf[start : start + HEADER.size])
        magic, version, msg_type, flags, length, hcrc, crc = HEADER.unpack(head)
        if magic != MAGIC:
            self._fail(f"bad magic {magic!r}")
        if version != FRAME_VERSION:
            self._fail(f"unsupported frame version {version} (this side speaks {FRAME_VERSION})")
        if zlib.crc32(head[:_HCRC_SPAN]) != hcrc:
            self._fail("header CRC mismatch")
        if msg_type not in self._known:
            self._fail(f"unknown message type {msg_type}")
        if flags:
            self._fail(f"unknown frame flags {flags:#x}")
        if length > self._max_frame:
            self._fail(f"{self._type_name(msg_type)} length {length} exceeds {self._max_frame}")
        self._header = _Header(msg_type, length, crc, head[:16] + b"\0\0\0\0")

    def _fail(self, why: str) -> None:
        self._error = ProtocolError(f"bad frame at stream offset {self.offset}: {why}")
        raise self._error
