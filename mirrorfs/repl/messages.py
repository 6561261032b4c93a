"""Replication messages: one dataclass per message type, encoded per its layout (sans-IO).

Each class is declared with ``@_message(type, layout)`` (mirrorfs.repl.payload explains the
layout codes); encoding and decoding follow from it, and the payload table in the docstring of
mirrorfs.repl.wire says what every field is. ``decode_payload`` turns a frame's payload back
into a message.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import lz4.block

from mirrorfs.repl.frames import PROTOCOL_VERSION, ProtocolError, encode_frame
from mirrorfs.repl.payload import (
    _READERS,
    _WRITERS,
    MAX_SYNC_RAW,
    MAX_TXN_RECORD,
    _compile,
    _Fixed,
    _Reader,
    _Segment,
    one_line,
)


class MsgType(enum.IntEnum):
    """Message type codes (frame header byte 5)."""

    HELLO = 1
    HELLO_REPLY = 2
    AUTH = 3
    ACCEPT = 4
    REFUSE = 5
    TXN = 16
    ACK = 17
    TXN_PART = 18
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
        return b"".join(self.payload_parts())

    def payload_parts(self) -> list[bytes | memoryview]:
        """The payload as the pieces it is made of (a large REST field as it is, not
        copied): what ``FramedStream.send`` puts on the wire without joining them."""
        self.check()
        out: list[bytes | memoryview] = []
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
        return out

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
    " applied_seq:Q partial_seq:Q partial_offset:Q copy_seq:Q copy_block:Q resync_seq:Q"
    " resync_block:Q resync_txn:Q node_id:NODE_ID"
    " epochs:EPOCHS",
)
@dataclass(slots=True)
class HelloReply(Message):
    """Target -> source: who I am, my positions, my challenge and my proof over yours.

    ``partial_seq``/``partial_offset``: the first ``partial_offset`` bytes of the record of
    transaction ``partial_seq`` arrived in TXN_PART frames and are kept (0, 0: none); the
    source resumes that record there. ``copy_seq``/``copy_block``: an empty target (all-zero
    uuid) that holds an unfinished initial-sync copy from ``copy_seq`` of the source's volume,
    every block below ``copy_block`` of it (0, 0: none); the source may resume it there.
    ``resync_seq``/``resync_block``/``resync_txn``: a consistent target that holds the stage
    of an unfinished resync from ``resync_seq`` (S): every differing block below
    ``resync_block`` and the transactions S+1..``resync_txn`` (0, 0, 0: none); the source
    may resume that resync there (repl.resync).
    """

    volume_uuid: bytes
    node_id: str
    epochs: list[tuple[int, int]]
    received_seq: int
    applied_seq: int
    nonce: bytes
    proof: bytes
    protocol_version: int = PROTOCOL_VERSION
    partial_seq: int = 0
    partial_offset: int = 0
    copy_seq: int = 0
    copy_block: int = 0
    resync_seq: int = 0
    resync_block: int = 0
    resync_txn: int = 0

    def check(self) -> None:
        if (self.resync_block or self.resync_txn) and not self.resync_seq:
            raise ValueError("a resync stage to resume without its start seq")
        if self.resync_seq and (self.resync_txn < self.resync_seq or not any(self.volume_uuid)):
            raise ValueError("a resync stage to resume, but not of a consistent target")
        if self.partial_offset and not self.partial_seq:
            raise ValueError("a partial offset without a partial seq")
        if self.copy_block and any(self.volume_uuid):
            raise ValueError("an initial-sync copy to resume, but the target is not empty")


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
    record: bytes | memoryview  # a view of the frame payload once decoded (large)


@_message(MsgType.TXN_PART, "seq:Q total:I crc:I offset:I -:I data:REST")
@dataclass(slots=True)
class TxnPart(Message):
    """Source -> target: bytes ``offset`` .. ``offset + len(data)`` of the SAM record of
    transaction ``seq``, which is ``total`` bytes long with crc32 ``crc`` (a record larger
    than one chunk travels in parts, so that a connection cut inside it loses one part at
    most: mirrorfs.repl.txn_parts)."""

    seq: int
    total: int
    crc: int
    offset: int
    data: bytes | memoryview

    def check(self) -> None:
        if not self.data:
            raise ValueError("an empty part")
        if self.offset + len(self.data) > self.total:
            raise ValueError(
                f"part {self.offset}+{len(self.data)} runs past the record's {self.total} bytes"
            )
        if self.total > MAX_TXN_RECORD:
            raise ValueError(f"record of {self.total} bytes exceeds {MAX_TXN_RECORD}")


@_message(MsgType.ACK, "received_seq:Q applied_seq:Q target_time_ns:Q")
@dataclass(slots=True)
class Ack(Message):
    """Target -> source: positions (durable in the target's log / applied), target clock."""

    received_seq: int
    applied_seq: int
    target_time_ns: int


@_message(
    MsgType.SYNC_BEGIN,
    "kind:B -:B -:H block_size:I block_count:Q start_seq:Q first_block:Q",
    kind=SyncKind,
)
@dataclass(slots=True)
class SyncBegin(Message):
    """Source -> target: a block sync of the given geometry starts at ``start_seq``.

    ``first_block`` > 0 (FULL): the initial-sync copy from ``start_seq`` that the target
    holds below that block goes on from there (the target announced it in HELLO_REPLY); at
    ``block_count``, only SYNC_END is left to send. RESYNC: the target resumes the stage of
    the resync from ``start_seq`` that it announced with ``resync_block`` == ``first_block``
    (any other SYNC_BEGIN(RESYNC) replaces that stage); no VERIFY_REQ follows, only the
    differing blocks from ``first_block`` on.
    """

    kind: SyncKind
    block_size: int
    block_count: int
    start_seq: int
    first_block: int = 0

    def check(self) -> None:
        if self.first_block > self.block_count:
            raise ValueError(f"first block {self.first_block} outside the volume")


@_message(MsgType.SYNC_BLOCKS, "first_block:Q nblocks:I flags:I data:REST", flags=SyncFlags)
@dataclass(slots=True)
class SyncBlocks(Message):
    """Source -> target: the current content of ``nblocks`` blocks from ``first_block``.

    ``data`` is as on the wire (lz4-compressed when ``flags`` has LZ4); build one with
    ``SyncBlocks.pack`` and read it with ``blocks(block_size)``.
    """

    first_block: int
    nblocks: int
    data: bytes | memoryview
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


def decode_payload(msg_type: int, payload: bytes | memoryview) -> Message:
    """The message of type ``msg_type`` in ``payload`` (ProtocolError if malformed)."""
    cls = _MESSAGES.get(msg_type)
    if cls is None:
        raise ProtocolError(f"unknown message type {msg_type}")
    r = _Reader(memoryview(payload), cls.TYPE.name)
    msg = cls.parse(r)
    r.end()
    return msg


def type_name(code: int) -> str:
    try:
        return MsgType(code).name
    except ValueError:
        return f"type {code}"
