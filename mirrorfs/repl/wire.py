"""Replication wire protocol: frames and messages (sans-IO, no sockets, no trio).

Everything the source and the target say to each other is a sequence of frames on one TCP
stream. This module turns messages into bytes (``Message.encode``) and bytes into messages
(``FrameDecoder``); ``mirrorfs.repl.stream`` does the I/O around it.

Frame layout (all integers little-endian)::

    offset size  field
    0      4     magic          b"MFSW"
    4      1     version        FRAME_VERSION (1): the layout of this header
    5      1     type           MsgType
    6      2     flags          reserved, must be 0 (a receiver rejects unknown bits)
    8      4     length         payload bytes that follow the header, <= MAX_FRAME (64 MiB)
    12     4     hcrc           crc32 of bytes 0..12
    16     4     crc            crc32 of the 20 header bytes with this field zeroed,
                                continued over the payload
    20     ...   payload        ``length`` bytes, laid out per message type (below)

``hcrc`` lets a receiver trust ``length`` and ``type`` before it buffers the payload: a
damaged header is reported at once instead of making the receiver wait for (or allocate) a
payload that never comes. ``length`` is checked against MAX_FRAME before any payload byte is
buffered, and the magic as soon as its bytes arrive (a stranger is turned away at once).

The frame version is distinct from the protocol version carried in HELLO: the header layout
is meant to stay fixed, so a peer speaking another protocol version can still read the
REFUSE that tells it so.

Payloads. ``str`` = u16 byte length + UTF-8 (node ids <= 255 bytes, texts <= 1024 bytes);
``epochs`` = u32 count + count x (epoch u64, start_seq u64), oldest first, count <= 4096.
Every reserved field must be 0, unknown enum values and flag bits are rejected, and a
payload must be consumed exactly, so that a decoded message re-encodes to the very same bytes
(the fuzz tests check this). The one exception: REFUSE, ERROR_STATE and SWITCHOVER_DONE texts
are normalised to one line (whitespace runs become one space) when a message is built, sent
or received.
The SAM record in TXN is at most MAX_TXN_RECORD (MAX_FRAME - 8) bytes::

    HELLO        (1, source -> target) protocol_version u16, flags u16 (HelloFlags),
                 reserved u32, volume_uuid 16s, nonce 32s, last_seq u64, node_id str, epochs
    HELLO_REPLY  (2, target -> source) protocol_version u16, reserved u16, reserved u32,
                 volume_uuid 16s (all zero: the target is empty and wants an initial sync),
                 nonce 32s, proof 32s (over the source's nonce, see repl.auth),
                 received_seq u64, applied_seq u64, node_id str, epochs
    AUTH         (3, source -> target) proof 32s (over the target's nonce)
    ACCEPT       (4, target -> source) empty: the handshake succeeded
    REFUSE       (5, either side) reason u16 (RefuseReason), text str (one line)
    TXN          (16, source -> target) seq u64, then a SAM log record (store.record), verbatim
                 to the end of the payload (the record carries its own checksum)
    ACK          (17, target -> source) received_seq u64, applied_seq u64, target_time_ns u64
    SYNC_BEGIN   (32, source -> target) kind u8 (SyncKind), reserved u8, reserved u16,
                 block_size u32, block_count u64, start_seq u64
    SYNC_BLOCKS  (33, source -> target) first_block u64, nblocks u32 (>= 1),
                 flags u32 (SyncFlags: bit 0 = data is lz4.block without size prefix),
                 data (the rest; nblocks * block_size bytes once decompressed)
    SYNC_END     (34, source -> target) consistent_at_seq u64
    VERIFY_REQ   (48, source -> target) seq u64, u32 count, count x (first_block u64,
                 nblocks u32)
    VERIFY_REPLY (49, target -> source) seq u64, u32 count, count x digest 32s
    PING         (64, either side) timestamp_ns u64
    PONG         (65, either side) timestamp_ns u64 (the PING's, echoed)
    ERROR_STATE  (80, target -> source) state u16 (PeerState; OK clears), text str
    SWITCHOVER   (96, source -> target) seq u64, mirror_to str (HOST:PORT, <= 1024 bytes):
                 the source stopped at ``seq``; take over and mirror back to it there
    SWITCHOVER_DONE (97, target -> source) result u16 (SwitchoverResult), reserved u16,
                 reserved u32, epoch u64, start_seq u64, text str (one line; why refused)

Errors: anything wrong in the bytes raises ``ProtocolError`` with a one-line message naming
the stream offset of the frame and what is wrong. A decoder that raised stays failed (the
stream cannot be resynchronised); the connection must be dropped.
"""

from __future__ import annotations

import enum
import functools
import logging
import operator
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import lz4.block

log = logging.getLogger(__name__)

MAGIC = b"MFSW"
FRAME_VERSION = 1
PROTOCOL_VERSION = 1
MAX_FRAME = 64 << 20
HEADER = struct.Struct("<4sBBHIII")
assert HEADER.size == 20
_HCRC_SPAN = 12
_PREFIX = struct.Struct("<4sBBHI")
assert _PREFIX.size == _HCRC_SPAN

UUID_SIZE = 16
NONCE_SIZE = 32
PROOF_SIZE = 32
DIGEST_SIZE = 32
ZERO_UUID = bytes(UUID_SIZE)
MAX_NODE_ID = 255
MAX_TEXT = 1024
MAX_EPOCHS = 4096
MAX_RANGES = 1 << 20
# Largest decompressed SYNC_BLOCKS data we agree to inflate (lz4 ratio is at most ~255).
MAX_SYNC_RAW = 256 * MAX_FRAME
# Largest SAM record a TXN frame can carry.
MAX_TXN_RECORD = MAX_FRAME - 8

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_EPOCH = struct.Struct("<QQ")
_RANGE = struct.Struct("<QI")
_DIGEST = struct.Struct("<32s")


class ReplError(Exception):
    """Base class of replication errors (one-line message)."""


class ProtocolError(ReplError):
    """The peer sent bytes that are not a valid frame or message."""


class MsgType(enum.IntEnum):
    """Message type codes (frame header byte 5)."""

    HELLO = 1
    HELLO_REPLY = 2
    AUTH = 3
    ACCEPT = 4
    REFUSE = 5
    TXN = 16
    ACK = 17
    SYNC_BEGIN = 32
    SYNC_BLOCKS = 33
    SYNC_END = 34
    VERIFY_REQ = 48
    VERIFY_REPLY = 49
    PING = 64
    PONG = 65
    ERROR_STATE = 80
    SWITCHOVER = 96
    SWITCHOVER_DONE = 97


class HelloFlags(enum.IntFlag):
    """What the source allows, announced in HELLO."""

    NONE = 0
    INITIAL_SYNC_ALLOWED = 1  # an empty target may receive a full copy of the volume


class RefuseReason(enum.IntEnum):
    """Why a side refuses the connection (REFUSE)."""

    OTHER = 0
    VERSION = 1  # incompatible protocol version
    WRONG_VOLUME = 2  # the volume uuids differ
    FENCED = 3  # the source's epoch is older than the target's: split brain prevented
    AUTH = 4  # a proof did not verify (secrets differ, or only one side has one)
    NO_INITIAL_SYNC = 5  # the target is empty and the source does not allow an initial sync
    BUSY = 6  # the target already has a source connected
    PROTOCOL = 7  # unexpected message or malformed frame


class SyncKind(enum.IntEnum):
    """What a SYNC_BEGIN .. SYNC_END sequence sends."""

    FULL = 1  # every used block: initial sync of an empty target
    RESYNC = 2  # the blocks of a dirty bitmap or a fork: only what differs


class SyncFlags(enum.IntFlag):
    NONE = 0
    LZ4 = 1


class PeerState(enum.IntEnum):
    """A side's health, sent in ERROR_STATE. Anything but OK means "I stopped acking"."""

    OK = 0
    DISK_FULL = 1
    IO_ERROR = 2
    READ_ONLY = 3


class SwitchoverResult(enum.IntEnum):
    """The target's answer to SWITCHOVER."""

    PROMOTED = 0  # it is the source now, in ``epoch`` from ``start_seq``
    REFUSED = 1  # nothing changed on the target; ``text`` says why


# ---------------------------------------------------------------------------- payload reading


class _Reader:
    """Reads a payload front to back; every shortfall is a ProtocolError."""

    __slots__ = ("_buf", "_pos", "_what")

    def __init__(self, buf: memoryview, what: str):
        self._buf = buf
        self._pos = 0
        self._what = what

    def fail(self, why: str) -> ProtocolError:
        return ProtocolError(f"malformed {self._what} payload: {why}")

    def take(self, n: int) -> memoryview:
        if n > len(self._buf) - self._pos:
            raise self.fail(f"truncated at payload byte {self._pos}")
        view = self._buf[self._pos : self._pos + n]
        self._pos += n
        return view

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size))

    def count(self, item_size: int, limit: int) -> int:
        (n,) = self.unpack(_U32)
        # Checked before looping, so a huge count costs nothing.
        if n > limit or n * item_size > len(self._buf) - self._pos:
            raise self.fail(f"count {n} does not fit")
        return n

    def text(self, limit: int) -> str:
        (n,) = self.unpack(_U16)
        if n > limit:
            raise self.fail(f"string of {n} bytes exceeds {limit}")
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError:
            raise self.fail("string is not UTF-8")

    def rest(self) -> bytes:
        view = self._buf[self._pos :]
        self._pos = len(self._buf)
        return bytes(view)

    def convert(self, cls: type[enum.IntEnum] | type[enum.IntFlag], value: int, name: str):
        if issubclass(cls, enum.IntFlag):
            known = functools.reduce(operator.or_, (m.value for m in cls), 0)
            if value & ~known:
                raise self.fail(f"unknown {name} bits {value & ~known:#x}")
            return cls(value)
        try:
            return cls(value)
        except ValueError:
            raise self.fail(f"unknown {name} {value}")

    def end(self) -> None:
        if self._pos != len(self._buf):
            raise self.fail(f"{len(self._buf) - self._pos} trailing bytes")


def one_line(value: str) -> str:
    """``value`` as one line of at most MAX_TEXT UTF-8 bytes (cut at a character boundary).

    REFUSE and ERROR_STATE texts end up in logs and on terminals: one line, so that a peer
    cannot forge log lines.
    """
    raw = " ".join(value.split()).encode("utf-8")[:MAX_TEXT]
    return raw.decode("utf-8", "ignore")


def _write_text(value: str, limit: int) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > limit:
        raise ValueError(f"string of {len(raw)} bytes exceeds {limit}")
    return _U16.pack(len(raw)) + raw


def _write_list(items: Sequence, item: struct.Struct, limit: int, what: str) -> bytes:
    if len(items) > limit:
        raise ValueError(f"{len(items)} {what} exceed {limit}")
    return _U32.pack(len(items)) + b"".join(item.pack(*x) for x in items)


def _write_digests(items: Sequence[bytes]) -> bytes:
    if any(len(d) != DIGEST_SIZE for d in items):
        raise ValueError(f"digests must be {DIGEST_SIZE} bytes")
    return _write_list([(d,) for d in items], _DIGEST, MAX_RANGES, "digests")


def _write_rest(value: bytes) -> bytes:
    if not value:
        raise ValueError("empty data")
    return value


def _read_rest(r: _Reader) -> bytes:
    value = r.rest()
    if not value:
        raise r.fail("empty data")
    return value


class _Part(enum.Enum):
    """Variable-length payload parts (module docstring); fixed parts are struct codes."""

    NODE_ID = "node_id"
    TEXT = "text"
    EPOCHS = "epochs"
    RANGES = "ranges"
    DIGESTS = "digests"
    REST = "rest"


_WRITERS: dict[_Part, Callable[[Any], bytes]] = {
    _Part.NODE_ID: lambda v: _write_text(v, MAX_NODE_ID),
    _Part.TEXT: lambda v: _write_text(v, MAX_TEXT),
    _Part.EPOCHS: lambda v: _write_list(v, _EPOCH, MAX_EPOCHS, "epochs"),
    _Part.RANGES: lambda v: _write_list(v, _RANGE, MAX_RANGES, "ranges"),
    _Part.DIGESTS: _write_digests,
    _Part.REST: _write_rest,
}
_READERS: dict[_Part, Callable[[_Reader], Any]] = {
    _Part.NODE_ID: lambda r: r.text(MAX_NODE_ID),
    _Part.TEXT: lambda r: r.text(MAX_TEXT),
    _Part.EPOCHS: lambda r: [r.unpack(_EPOCH) for _ in range(r.count(_EPOCH.size, MAX_EPOCHS))],
    _Part.RANGES: lambda r: [r.unpack(_RANGE) for _ in range(r.count(_RANGE.size, MAX_RANGES))],
    _Part.DIGESTS: lambda r: [
        bytes(r.take(DIGEST_SIZE)) for _ in range(r.count(DIGEST_SIZE, MAX_RANGES))
    ],
    _Part.REST: _read_rest,
}


@dataclass(slots=True, frozen=True)
class _Fixed:
    """Consecutive fixed-size fields, packed with one struct."""

    st: struct.Struct
    names: tuple[str | None, ...]  # None: a reserved field, 0 on the wire
    convs: tuple[type | None, ...]  # the enum a value converts to
    sizes: tuple[int | None, ...]  # byte length of "Ns" fields, checked on encode


_Segment = _Fixed | tuple[str, _Part]


def _compile(layout: str, enums: dict[str, type]) -> tuple[_Segment, ...]:
    """Parse a layout ("name:code ...", name "-" for reserved) into struct runs and parts."""
    segments: list[_Segment] = []
    run: list[tuple[str | None, str]] = []

    def flush() -> None:
        if run:
            st = struct.Struct("<" + "".join(code for _, code in run))
            names = tuple(name for name, _ in run)
            convs = tuple(enums.get(name) if name else None for name in names)
            sizes = tuple(int(code[:-1]) if code.endswith("s") else None for _, code in run)
            segments.append(_Fixed(st, names, convs, sizes))
            run.clear()

    for token in layout.split():
        name, code = token.split(":")
        if code in _Part.__members__:
            flush()
            segments.append((name, _Part[code]))
        else:
            run.append((None if name == "-" else name, code))
    flush()
    return tuple(segments)


# ---------------------------------------------------------------------------- messages


class Message:
    """Base of every message: ``encode()`` gives the whole frame.

    Each subclass is declared with ``@_message(type, layout)``: its payload field by field,
    as in the module docstring; encoding and decoding follow from the layout.
    """

    __slots__ = ()
    TYPE: ClassVar[MsgType]
    _SEGMENTS: ClassVar[tuple[_Segment, ...]]

    def check(self) -> None:
        """Raise ValueError if the fields are inconsistent (checked on encode and decode)."""

    def payload(self) -> bytes:
        self.check()
        out = []
        for seg in self._SEGMENTS:
            if isinstance(seg, _Fixed):
                values = []
                for name, size in zip(seg.names, seg.sizes, strict=True):
                    value = 0 if name is None else getattr(self, name)
                    if size is not None and len(value) != size:
                        raise ValueError(f"{name} must be {size} bytes, not {len(value)}")
                    values.append(value)
                out.append(seg.st.pack(*values))
            else:
                out.append(_WRITERS[seg[1]](getattr(self, seg[0])))
        return b"".join(out)

    @classmethod
    def parse(cls, r: _Reader) -> Message:
        kwargs: dict[str, Any] = {}
        for seg in cls._SEGMENTS:
            if isinstance(seg, _Fixed):
                for name, conv, value in zip(seg.names, seg.convs, r.unpack(seg.st), strict=True):
                    if name is None:
                        if value:
                            raise r.fail("reserved field is not zero")
                    else:
                        kwargs[name] = r.convert(conv, value, name) if conv else value
            else:
                kwargs[seg[0]] = _READERS[seg[1]](r)
        msg = cls(**kwargs)
        try:
            msg.check()
        except ValueError as exc:
            raise r.fail(str(exc))
        return msg

    def encode(self) -> bytes:
        """The whole frame (ValueError if a field cannot be represented)."""
        try:
            payload = self.payload()
        except (struct.error, TypeError) as exc:
            raise ValueError(f"cannot encode {self.TYPE.name}: {exc}")
        return encode_frame(self.TYPE, payload)


_MESSAGES: dict[int, type[Message]] = {}
_M = TypeVar("_M", bound=type[Message])


def _message(msg_type: MsgType, layout: str, **enums: type) -> Callable[[_M], _M]:
    """Class decorator: register a message type with its payload layout."""

    def register(cls: _M) -> _M:
        cls.TYPE = msg_type
        cls._SEGMENTS = _compile(layout, enums)
        _MESSAGES[msg_type] = cls
        return cls

    return register


@_message(
    MsgType.HELLO,
    "protocol_version:H flags:H -:I volume_uuid:16s nonce:32s last_seq:Q"
    " node_id:NODE_ID epochs:EPOCHS",
    flags=HelloFlags,
)
@dataclass(slots=True)
class Hello(Message):
    """Source -> target: who I am, which volume, where my log ends, my challenge."""

    volume_uuid: bytes
    node_id: str
    epochs: list[tuple[int, int]]
    last_seq: int
    nonce: bytes
    flags: HelloFlags = HelloFlags.NONE
    protocol_version: int = PROTOCOL_VERSION


@_message(
    MsgType.HELLO_REPLY,
    "protocol_version:H -:H -:I volume_uuid:16s nonce:32s proof:32s received_seq:Q"
    " applied_seq:Q node_id:NODE_ID epochs:EPOCHS",
)
@dataclass(slots=True)
class HelloReply(Message):
    """Target -> source: who I am, my positions, my challenge and my proof over yours."""

    volume_uuid: bytes
    node_id: str
    epochs: list[tuple[int, int]]
    received_seq: int
    applied_seq: int
    nonce: bytes
    proof: bytes
    protocol_version: int = PROTOCOL_VERSION


@_message(MsgType.AUTH, "proof:32s")
@dataclass(slots=True)
class Auth(Message):
    """Source -> target: the source's proof over the target's nonce."""

    proof: bytes


@_message(MsgType.ACCEPT, "")
@dataclass(slots=True)
class Accept(Message):
    """Target -> source: the handshake succeeded; shipping may start."""


@_message(MsgType.REFUSE, "reason:H text:TEXT", reason=RefuseReason)
@dataclass(slots=True)
class Refuse(Message):
    """Either side: I will not go on, because ``reason``; ``text`` says it for humans."""

    reason: RefuseReason
    text: str = ""

    def __post_init__(self) -> None:
        self.text = one_line(self.text)


@_message(MsgType.TXN, "seq:Q record:REST")
@dataclass(slots=True)
class Txn(Message):
    """Source -> target: transaction ``seq`` as its SAM log record, byte for byte.

    The frame does not look inside the record: the receiver decodes it with store.record
    (which checks its CRC) and checks that the record's seq is ``seq``.
    """

    seq: int
    record: bytes


@_message(MsgType.ACK, "received_seq:Q applied_seq:Q target_time_ns:Q")
@dataclass(slots=True)
class Ack(Message):
    """Target -> source: positions (durable in the target's log / applied), target clock."""

    received_seq: int
    applied_seq: int
    target_time_ns: int


@_message(
    MsgType.SYNC_BEGIN, "kind:B -:B -:H block_size:I block_count:Q start_seq:Q", kind=SyncKind
)
@dataclass(slots=True)
class SyncBegin(Message):
    """Source -> target: a block sync of the given geometry starts at ``start_seq``."""

    kind: SyncKind
    block_size: int
    block_count: int
    start_seq: int


@_message(MsgType.SYNC_BLOCKS, "first_block:Q nblocks:I flags:I data:REST", flags=SyncFlags)
@dataclass(slots=True)
class SyncBlocks(Message):
    """Source -> target: the current content of ``nblocks`` blocks from ``first_block``.

    ``data`` is as on the wire (lz4-compressed when ``flags`` has LZ4); build one with
    ``SyncBlocks.pack`` and read it with ``blocks(block_size)``.
    """

    first_block: int
    nblocks: int
    data: bytes
    flags: SyncFlags = SyncFlags.NONE

    def check(self) -> None:
        if self.nblocks < 1:
            raise ValueError("no blocks")

    @classmethod
    def pack(
        cls, first_block: int, raw: bytes, block_size: int, *, compress: bool = True
    ) -> SyncBlocks:
        """Blocks ``raw`` (a multiple of ``block_size``), compressed when that saves space."""
        if not raw or len(raw) % block_size:
            raise ValueError(f"{len(raw)} bytes is not a positive multiple of {block_size}")
        data, flags = raw, SyncFlags.NONE
        if compress:
            packed = lz4.block.compress(raw, store_size=False)
            if len(packed) < len(raw):
                data, flags = packed, SyncFlags.LZ4
        return cls(first_block, len(raw) // block_size, data, flags)

    def blocks(self, block_size: int) -> bytes:
        """The block images, decompressed and length-checked (ProtocolError if wrong)."""
        size = self.nblocks * block_size
        where = f"SYNC_BLOCKS at block {self.first_block}"
        if not self.flags & SyncFlags.LZ4:
            raw = self.data
        elif size > MAX_SYNC_RAW:
            raise ProtocolError(f"{where}: {self.nblocks} blocks is implausibly many")
        else:
            try:
                raw = lz4.block.decompress(self.data, uncompressed_size=size)
            except lz4.block.LZ4BlockError as exc:
                raise ProtocolError(f"{where}: bad lz4 data: {exc}")
        if len(raw) != size:
            raise ProtocolError(f"{where}: {len(raw)} bytes for {self.nblocks} x {block_size}")
        return raw


@_message(MsgType.SYNC_END, "consistent_at_seq:Q")
@dataclass(slots=True)
class SyncEnd(Message):
    """Source -> target: the synced blocks are consistent with transaction ``seq``."""

    consistent_at_seq: int


@_message(MsgType.VERIFY_REQ, "seq:Q ranges:RANGES")
@dataclass(slots=True)
class VerifyReq(Message):
    """Source -> target: digest these (first_block, nblocks) ranges as of transaction ``seq``."""

    seq: int
    ranges: list[tuple[int, int]] = field(default_factory=list)


@_message(MsgType.VERIFY_REPLY, "seq:Q digests:DIGESTS")
@dataclass(slots=True)
class VerifyReply(Message):
    """Target -> source: one 32-byte digest per requested range, in request order."""

    seq: int
    digests: list[bytes] = field(default_factory=list)


@_message(MsgType.PING, "timestamp_ns:Q")
@dataclass(slots=True)
class Ping(Message):
    """Either side: are you there? (keepalive and round-trip time)."""

    timestamp_ns: int


@_message(MsgType.PONG, "timestamp_ns:Q")
@dataclass(slots=True)
class Pong(Message):
    """Either side: answer to PING, echoing its timestamp."""

    timestamp_ns: int


@_message(MsgType.ERROR_STATE, "state:H text:TEXT", state=PeerState)
@dataclass(slots=True)
class ErrorState(Message):
    """Target -> source: I cannot go on (disk full, I/O error) and stop acking; OK clears."""

    state: PeerState
    text: str = ""

    def __post_init__(self) -> None:
        self.text = one_line(self.text)


@_message(MsgType.SWITCHOVER, "seq:Q mirror_to:TEXT")
@dataclass(slots=True)
class Switchover(Message):
    """Source -> target (planned switchover): I stopped taking writes at ``seq``, which you
    have applied; become the source and mirror back to me at ``mirror_to`` (HOST:PORT)."""

    seq: int
    mirror_to: str


@_message(
    MsgType.SWITCHOVER_DONE,
    "result:H -:H -:I epoch:Q start_seq:Q text:TEXT",
    result=SwitchoverResult,
)
@dataclass(slots=True)
class SwitchoverDone(Message):
    """Target -> source: promoted to ``epoch`` starting at ``start_seq``, or refused."""

    result: SwitchoverResult
    epoch: int = 0
    start_seq: int = 0
    text: str = ""

    def __post_init__(self) -> None:
        self.text = one_line(self.text)


# ---------------------------------------------------------------------------- frames


def encode_frame(msg_type: int, payload: bytes) -> bytes:
    """A whole frame: header (with both CRCs) + payload."""
    if len(payload) > MAX_FRAME:
        raise ValueError(f"payload of {len(payload)} bytes exceeds MAX_FRAME ({MAX_FRAME})")
    prefix = _PREFIX.pack(MAGIC, FRAME_VERSION, int(msg_type), 0, len(payload))
    head = prefix + _U32.pack(zlib.crc32(prefix))
    crc = zlib.crc32(payload, zlib.crc32(head + b"\0\0\0\0"))
    return head + _U32.pack(crc) + payload


def decode_payload(msg_type: int, payload: bytes | memoryview) -> Message:
    """The message of type ``msg_type`` in ``payload`` (ProtocolError if malformed)."""
    cls = _MESSAGES.get(msg_type)
    if cls is None:
        raise ProtocolError(f"unknown message type {msg_type}")
    r = _Reader(memoryview(payload), cls.TYPE.name)
    msg = cls.parse(r)
    r.end()
    return msg


@dataclass(slots=True, frozen=True)
class _Header:
    type: int
    length: int
    crc: int
    head: bytes  # the 20 header bytes with crc zeroed, for the payload CRC


class FrameDecoder:
    """Incremental frame decoder: ``feed(bytes)``, then ``next_message()`` until None.

    Raises only ``ProtocolError``, whatever the input; after one it stays failed (the stream
    cannot be resynchronised). A header is validated as soon as its 20 bytes are in (its
    magic as soon as that is in), before any of its payload is buffered, so a bogus length
    never makes us wait or allocate.
    """

    def __init__(self, *, max_frame: int = MAX_FRAME):
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

    def next_message(self) -> Message | None:
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
        payload = bytes(self._buf[self._start + HEADER.size : end])
        if zlib.crc32(payload, zlib.crc32(hdr.head)) != hdr.crc:
            self._fail(f"CRC mismatch ({_type_name(hdr.type)}, {hdr.length} bytes)")
        try:
            msg = decode_payload(hdr.type, payload)
        except ProtocolError as exc:
            self._fail(str(exc))
        except Exception as exc:  # a parser bug must still surface as a ProtocolError
            log.exception("unexpected error decoding %s", _type_name(hdr.type))
            self._fail(f"undecodable {_type_name(hdr.type)} payload: {exc!r}")
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
        if msg_type not in _MESSAGES:
            self._fail(f"unknown message type {msg_type}")
        if flags:
            self._fail(f"unknown frame flags {flags:#x}")
        if length > self._max_frame:
            self._fail(f"{_type_name(msg_type)} length {length} exceeds {self._max_frame}")
        self._header = _Header(msg_type, length, crc, head[:16] + b"\0\0\0\0")

    def _fail(self, why: str) -> None:
        self._error = ProtocolError(f"bad frame at stream offset {self.offset}: {why}")
        raise self._error


def _type_name(code: int) -> str:
    try:
        return MsgType(code).name
    except ValueError:
        return f"type {code}"


def decode_frames(data: bytes) -> list[Message]:
    """Every message in ``data``, which must end on a frame boundary (for tests and tools)."""
    dec = FrameDecoder()
    dec.feed(data)
    out = []
    while (msg := dec.next_message()) is not None:
        out.append(msg)
    if dec.buffered:
        raise ProtocolError(f"torn frame at stream offset {dec.offset}: {dec.buffered} bytes")
    return out
