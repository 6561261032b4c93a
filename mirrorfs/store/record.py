"""SAM log records: encode, decode and validate (pure, no I/O).

A record is self-describing and verifiable on its own: the same bytes are written to a log
segment, shipped over the network and appended verbatim to the target's log.

Record layout (all integers little-endian)::

    offset size  field
    0      4     magic          b"MFSR"
    4      1     version        1
    5      1     type           RecordType: 1 = TXN, 2 = SEAL
    6      2     flags          bit 0 = payload is lz4-compressed (lz4.block, no size prefix);
                                every other bit must be 0
    8      4     length         stored payload bytes that follow the header
    12     4     raw_length     payload bytes after decompression (== length if uncompressed,
                                > length if compressed: we only compress when it saves space)
    16     8     seq            TXN: the transaction's sequence number (>= 1);
                                SEAL: the last sequence number of the segment
    24     8     epoch
    32     8     timestamp_ns
    40     4     hcrc           crc32 of bytes 0..40 (lets a reader trust ``length`` before
                                reading the payload, so a damaged length is never taken for a
                                torn tail)
    44     4     crc            crc32 of bytes 0..40 followed by the stored payload
    48     ...   payload        ``length`` bytes

Both lengths are at most ``MAX_PAYLOAD`` (256 MiB); larger values are rejected before anything
is allocated.

TXN payload (before compression)::

    TXN_HEAD  block_size u32, nhints u32, nruns u32, reserved u32 (0)
    nhints x  HINT: kind u8 (HintKind), reserved u8 (0), name_len u16, ino u64, parent u64,
              followed by ``name_len`` bytes of name
    nruns x   RUN:  first_block u64, nblocks u32, reserved u32 (0)
    data      the runs' block images, concatenated in run order;
              exactly sum(nblocks) * block_size bytes

``block_size`` is a power of two in 512 .. 1 MiB; every run has nblocks >= 1 and
first_block + nblocks <= 2**64.

SEAL payload (never compressed; the record closes a segment and is its commit marker)::

    first_seq u64, last_seq u64 (first_seq - 1 for an empty segment),
    offset u64 (file offset of this SEAL record), volume_uuid 16 bytes

Segment header (64 bytes at offset 0 of every segment file ``%020d.seg``, named by the
sequence number of its first record; records follow it back to back, the last one of a
closed segment being its SEAL)::

    magic b"MFSSAMLG", version u16 (1), flags u16 (0), block_size u32, volume_uuid 16 bytes,
    first_seq u64, generation u64 (raised by a log reset), reserved 12 bytes (0),
    hcrc u32 = crc32 of bytes 0..60

Errors: a buffer that ends inside a record (header or payload incomplete) raises
``TornRecord``; a complete record that is wrong raises ``CorruptRecord``. Messages name the
segment (when known), the byte offset and the sequence number (when the header was readable,
else the expected one when the caller knows it).
"""

from __future__ import annotations

import enum
import logging
import struct
import zlib
from dataclasses import dataclass

import lz4.block

from mirrorfs.store.errors import CorruptRecord, TornRecord
from mirrorfs.store.txn import Hint, HintKind, Transaction

log = logging.getLogger(__name__)

MAGIC = b"MFSR"
VERSION = 1
MAX_PAYLOAD = 256 << 20
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 1 << 20
# Below this many payload bytes compression cannot pay for itself.
_MIN_COMPRESS = 64
# Payloads larger than this are sampled before lz4 is tried on all of them: _SAMPLES slices
# of _SAMPLE_SLICE bytes; lz4 runs on the whole payload only if they shrink below _WORTH.
_SAMPLE = 64 << 10
_SAMPLES = 16
_SAMPLE_SLICE = 4 << 10
_WORTH = 0.75
_U64 = 1 << 64

HEADER = struct.Struct("<4sBBHIIQQQII")
assert HEADER.size == 48
_HCRC_SPAN = 40  # header bytes covered by hcrc (everything before the two crc fields)

TXN_HEAD = struct.Struct("<IIII")
assert TXN_HEAD.size == 16
HINT = struct.Struct("<BBHQQ")
assert HINT.size == 20
RUN = struct.Struct("<QII")
assert RUN.size == 16
SEAL = struct.Struct("<QQQ16s")
assert SEAL.size == 40
SEAL_RECORD_SIZE = HEADER.size + SEAL.size
SEG_MAGIC = b"MFSSAMLG"
SEG_VERSION = 1
SEG_HEADER = struct.Struct("<8sHHI16sQQ12sI")
assert SEG_HEADER.size == 64


class RecordType(enum.IntEnum):
    """What a record holds."""

    TXN = 1
    SEAL = 2


class RecordFlag(enum.IntFlag):
    """Header flag bits."""

    LZ4 = 1


@dataclass(slots=True, frozen=True)
class RecordHeader:
    """A parsed and header-checksummed record header."""

    type: RecordType
    flags: RecordFlag
    length: int
    raw_length: int
    seq: int
    epoch: int
    timestamp_ns: int
    crc: int

    @property
    def size(self) -> int:
        """Bytes of the whole record (header + stored payload)."""
        return HEADER.size + self.length


@dataclass(slots=True, frozen=True)
class Seal:
    """Payload of a SEAL record."""

    first_seq: int
    last_seq: int
    offset: int
    volume_uuid: bytes


@dataclass(slots=True)
class Record:
    """A decoded record: ``txn`` is set for TXN records, ``seal`` for SEAL records."""

    type: RecordType
    seq: int
    epoch: int
    timestamp_ns: int
    size: int
    txn: Transaction | None = None
    seal: Seal | None = None


def _where(segment: str | None, offset: int, seq: int | None, expect_seq: int | None) -> str:
    where = f" in segment {segment}" if segment else ""
    if seq is not None:
        return f"{where} at offset {offset} (seq {seq})"
    if expect_seq is not None:
        return f"{where} at offset {offset} (expected seq {expect_seq})"
    return f"{where} at offset {offset}"


def corrupt(
    why: str, segment: str | None, offset: int, seq: int | None, expect_seq: int | None = None
) -> CorruptRecord:
    """A CorruptRecord whose message names segment, offset and seq in the standard way."""
    return CorruptRecord(
        f"corrupt log record{_where(segment, offset, seq, expect_seq)}: {why}",
        segment=segment or "",
        offset=offset,
        seq=seq if seq is not None else (expect_seq if expect_seq is not None else -1),
    )


def _torn(
    why: str, segment: str | None, offset: int, seq: int | None, expect_seq: int | None
) -> TornRecord:
    return TornRecord(
        f"torn log record{_where(segment, offset, seq, expect_seq)}: {why}",
        segment=segment or "",
        offset=offset,
        seq=seq if seq is not None else (expect_seq if expect_seq is not None else -1),
    )


def check_block_size(block_size: int) -> None:
    """Raise ValueError unless ``block_size`` is a power of two in 512 .. 1 MiB."""
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and block_size & (block_size - 1) == 0):
        raise ValueError(f"block size {block_size} is not a power of two in 512 .. 1 MiB")


# ---------------------------------------------------------------------------- encoding


def _worth_compressing(parts: list, raw_length: int) -> bool:
    """Guess from small samples whether lz4 will save space, without joining anything.

    Random or already-compressed file data is common; joining and compressing tens of MiB
    of it costs more than the write itself. Small payloads (metadata) are tried whole.
    Larger ones are sampled at ``_SAMPLES`` points spread evenly over the payload bytes,
    each slice taken from within one part and compressed on its own, so the very
    compressible headers and metadata blocks weigh in by their size, not more: a little
    metadata in front of megabytes of random data does not make the whole payload look
    compressible. Compress only when the samples promise a real saving.
    """
    if raw_length <= _SAMPLE:
        return True
    step = raw_length / _SAMPLES
    packed = taken = 0
    i, part_start = 0, 0
    for k in range(_SAMPLES):
        at = int((k + 0.5) * step)
        while part_start + len(parts[i]) <= at:
            part_start += len(parts[i])
            i += 1
        off = at - part_start
        piece = parts[i][off : off + _SAMPLE_SLICE]
        taken += len(piece)
        packed += len(lz4.block.compress(piece, store_size=False))
    return packed < _WORTH * taken


def _frame_parts(
    rtype: RecordType, seq: int, epoch: int, timestamp_ns: int, parts: list, compress: bool
) -> list:
    """Header + payload parts -> the record as a list of buffers (the crc is chained)."""
    raw_length = sum(len(p) for p in parts)
    if raw_length > MAX_PAYLOAD:
        raise ValueError(f"record payload of {raw_length} bytes exceeds {MAX_PAYLOAD}")
    flags, stored = 0, parts
    if compress and raw_length >= _MIN_COMPRESS and _worth_compressing(parts, raw_length):
        joined = b"".join(parts)
        packed = lz4.block.compress(joined, store_size=False)
        if len(packed) < raw_length:
            flags, stored = RecordFlag.LZ4, [packed]
    length = sum(len(p) for p in stored)
    head = HEADER.pack(
        MAGIC, VERSION, rtype, flags, length, raw_length, seq, epoch, timestamp_ns, 0, 0
    )[:_HCRC_SPAN]
    hcrc = zlib.crc32(head)
    crc = hcrc
    for part in stored:
        crc = zlib.crc32(part, crc)
    return [head, struct.pack("<II", hcrc, crc), *stored]


def _frame(
    rtype: RecordType, seq: int, epoch: int, timestamp_ns: int, parts: list, compress: bool
) -> bytes:
    return b"".join(_frame_parts(rtype, seq, epoch, timestamp_ns, parts, compress))


def encode_txn(txn: Transaction, *, block_size: int, compress: bool = True) -> bytes:
    """Encode ``txn`` as one TXN record (bytes); see ``encode_txn_parts``."""
    return b"".join(encode_txn_parts(txn, block_size=block_size, compress=compress))


def encode_txn_parts(txn: Transaction, *, block_size: int, compress: bool = True) -> list:
    """Encode ``txn`` as one TXN record, returned as a list of buffers for os.writev.

    Block data is not copied: the runs' buffers are returned as they are (or handed to lz4
    once, when a sample says it pays), so encoding tens of MiB costs a crc32. Raises
    ValueError for a transaction that cannot be represented (bad seq, run not a multiple of
    the block size, name too long, payload over MAX_PAYLOAD).
    """
    check_block_size(block_size)
    if not (1 <= txn.seq < _U64 and 0 <= txn.epoch < _U64 and 0 <= txn.timestamp_ns < _U64):
        raise ValueError(
            f"seq/epoch/timestamp out of range: {txn.seq}/{txn.epoch}/{txn.timestamp_ns}"
        )
    parts: list = [TXN_HEAD.pack(block_size, len(txn.hints), len(txn.runs), 0)]
    for h in txn.hints:
        if len(h.name) > 0xFFFF:
            raise ValueError(f"hint name of {len(h.name)} bytes is too long")
        try:
            parts.append(HINT.pack(HintKind(h.kind), 0, len(h.name), h.ino, h.parent))
        except struct.error as exc:
            raise ValueError(f"hint {h} out of range: {exc}")
        if h.name:
            parts.append(h.name)
    heads = []
    for first, data in txn.runs:
        n, rest = divmod(len(data), block_size)
        if rest or n == 0:
            raise ValueError(f"run at block {first}: {len(data)} bytes is not whole blocks")
        if first < 0 or first + n > _U64 or n > 0xFFFFFFFF:
            raise ValueError(f"run at block {first} of {n} blocks is out of range")
        heads.append(RUN.pack(first, n, 0))
    parts.append(b"".join(heads))
    parts.extend(data for _, data in txn.runs)
    return _frame_parts(RecordType.TXN, txn.seq, txn.epoch, txn.timestamp_ns, parts, compress)


def encode_seal(seal: Seal, *, epoch: int = 0, timestamp_ns: int = 0) -> bytes:
    """Encode the SEAL record that closes a segment (always ``SEAL_RECORD_SIZE`` bytes)."""
    if len(seal.volume_uuid) != 16 or seal.last_seq < seal.first_seq - 1:
        raise ValueError(f"bad seal {seal}")
    payload = SEAL.pack(seal.first_seq, seal.last_seq, seal.offset, seal.volume_uuid)
    return _frame(RecordType.SEAL, seal.last_seq, epoch, timestamp_ns, [payload], False)


# ---------------------------------------------------------------------------- decoding


def parse_header(
    buf: bytes | bytearray | memoryview,
    offset: int = 0,
    *,
    segment: str | None = None,
    file_offset: int | None = None,
    expect_seq: int | None = None,
) -> RecordHeader:
    """Parse and check the header at ``buf[offset:]`` (header crc, magic, version, sizes).

    The payload is not looked at. ``file_offset`` is the offset reported in errors (defaults
    to ``offset``), for callers that read one record into its own buffer.
    """
    at = offset if file_offset is None else file_offset
    avail = len(buf) - offset
    n = min(avail, len(MAGIC))
    if bytes(buf[offset : offset + n]) != MAGIC[:n]:
        raise corrupt("bad magic", segment, at, None, expect_seq)
    if avail < HEADER.size:
        raise _torn(
            f"header incomplete ({avail} of {HEADER.size} bytes)", segment, at, None, expect_seq
        )
    _, version, rtype, flags, length, raw_length, seq, epoch, ts, hcrc, crc = HEADER.unpack_from(
        buf, offset
    )
    if zlib.crc32(buf[offset : offset + _HCRC_SPAN]) != hcrc:
        raise corrupt("header checksum mismatch", segment, at, None, expect_seq)
    if version != VERSION:
        raise corrupt(f"unsupported version {version}", segment, at, seq, expect_seq)
    if rtype not in RecordType._value2member_map_:
        raise corrupt(f"unknown record type {rtype}", segment, at, seq, expect_seq)
    if flags & ~int(RecordFlag.LZ4):  # (~ on an IntFlag stays inside its members)
        raise corrupt(f"unknown flags {flags:#x}", segment, at, seq, expect_seq)
    if length > MAX_PAYLOAD or raw_length > MAX_PAYLOAD:
        raise corrupt(
            f"payload size {max(length, raw_length)} exceeds {MAX_PAYLOAD}",
            segment,
            at,
            seq,
            expect_seq,
        )
    if (flags & RecordFlag.LZ4 and raw_length <= length) or (
        not flags & RecordFlag.LZ4 and raw_length != length
    ):
        raise corrupt(
            f"inconsistent payload sizes {length}/{raw_length}", segment, at, seq, expect_seq
        )
    return RecordHeader(
        RecordType(rtype), RecordFlag(flags), length, raw_length, seq, epoch, ts, crc
    )


def verify(
    buf: bytes | bytearray | memoryview,
    offset: int = 0,
    *,
    segment: str | None = None,
    file_offset: int | None = None,
    expect_seq: int | None = None,
) -> tuple[RecordHeader, int]:
    """Check the header and the crc of the record at ``buf[offset:]`` without decoding it.

    Returns the header and the offset after the record. Enough to forward a record verbatim.
    """
    at = offset if file_offset is None else file_offset
    hdr = parse_header(buf, offset, segment=segment, file_offset=file_offset, expect_seq=expect_seq)
    end = offset + hdr.size
    if len(buf) < end:
        got = len(buf) - offset - HEADER.size
        raise _torn(
            f"payload incomplete ({got} of {hdr.length} bytes)", segment, at, hdr.seq, expect_seq
        )
    view = memoryview(buf)
    crc = zlib.crc32(
        view[offset + HEADER.size : end], zlib.crc32(view[offset : offset + _HCRC_SPAN])
    )
    if crc != hdr.crc:
        raise corrupt("checksum mismatch", segment, at, hdr.seq, expect_seq)
    return hdr, end


def decode(
    buf: bytes | bytearray | memoryview,
    offset: int = 0,
    *,
    segment: str | None = None,
    file_offset: int | None = None,
    block_size: int | None = None,
    expect_seq: int | None = None,
) -> tuple[Record, int]:
    """Decode and fully validate the record at ``buf[offset:]``; return it and the next offset.

    ``block_size``, when given, must match the block size recorded in a TXN payload.
    Raises TornRecord if ``buf`` ends inside the record, CorruptRecord if it is wrong.
    """
    at = offset if file_offset is None else file_offset
    hdr, end = verify(buf, offset, segment=segment, file_offset=file_offset, expect_seq=expect_seq)

    def bad(why: str) -> CorruptRecord:
        return corrupt(why, segment, at, hdr.seq, expect_seq)

    payload = memoryview(buf)[offset + HEADER.size : end]
    if hdr.flags & RecordFlag.LZ4:
        try:
            raw = lz4.block.decompress(payload, uncompressed_size=hdr.raw_length)
        except lz4.block.LZ4BlockError as exc:
            raise bad(f"lz4 payload does not decompress ({exc})")
        if len(raw) != hdr.raw_length:
            raise bad(f"lz4 payload decompresses to {len(raw)} bytes, not {hdr.raw_length}")
        payload = memoryview(raw)
    rec = Record(hdr.type, hdr.seq, hdr.epoch, hdr.timestamp_ns, hdr.size)
    if hdr.type == RecordType.SEAL:
        if len(payload) != SEAL.size:
            raise bad(f"seal payload of {len(payload)} bytes")
        seal = Seal(*SEAL.unpack(payload))
        if seal.last_seq != hdr.seq or seal.last_seq < seal.first_seq - 1:
            raise bad(f"seal range {seal.first_seq}..{seal.last_seq} is inconsistent")
        rec.seal = seal
    else:
        rec.txn = _decode_txn_payload(payload, hdr, block_size, bad)
    return rec, end


def _decode_txn_payload(
    payload: memoryview, hdr: RecordHeader, block_size: int | None, bad
) -> Transaction:
    if hdr.seq < 1:
        raise bad("transaction seq 0")
    size = len(payload)
    if size < TXN_HEAD.size:
        raise bad("transaction payload too short")
    bs, nhints, nruns, reserved = TXN_HEAD.unpack_from(payload, 0)
    if reserved:
        raise bad("reserved field is not zero")
    try:
        check_block_size(bs)
    except ValueError as exc:
        raise bad(str(exc))
    if block_size is not None and bs != block_size:
        raise bad(f"block size {bs} does not match the log's {block_size}")
    # Bound the counts by the bytes present before looping over them.
    if TXN_HEAD.size + nhints * HINT.size + nruns * RUN.size > size:
        raise bad(f"{nhints} hints and {nruns} runs do not fit in {size} bytes")
    pos = TXN_HEAD.size
    hints = []
    for _ in range(nhints):
        if pos + HINT.size > size:
            raise bad("hint table overruns the payload")
        kind, res, name_len, ino, parent = HINT.unpack_from(payload, pos)
        pos += HINT.size
        if res or kind not in HintKind._value2member_map_:
            raise bad(f"bad hint (kind {kind})")
        if pos + name_len > size:
            raise bad("hint name overruns the payload")
        hints.append(Hint(HintKind(kind), ino, parent, bytes(payload[pos : pos + name_len])))
        pos += name_len
    if pos + nruns * RUN.size > size:
        raise bad("run table overruns the payload")
    heads = list(RUN.iter_unpack(payload[pos : pos + nruns * RUN.size]))
    pos += nruns * RUN.size
    total = 0
    for first, n, res in heads:
        if n == 0 or res or first + n > _U64:
            raise bad(f"bad run at block {first} ({n} blocks)")
        total += n
    if total * bs != size - pos:
        raise bad(f"runs declare {total * bs} data bytes, payload holds {size - pos}")
    # Over immutable bytes (a record read or received whole, or inflated by lz4) the runs
    # are views of it: no copy of the data; over a mutable buffer, copies.
    share = type(payload.obj) is bytes
    runs: list[tuple[int, bytes | memoryview]] = []
    for first, n, _ in heads:
        end = pos + n * bs
        runs.append((first, payload[pos:end] if share else bytes(payload[pos:end])))
        pos = end
    return Transaction(hdr.seq, hdr.epoch, hdr.timestamp_ns, runs, hints)


def decode_txn(
    buf: bytes | bytearray | memoryview, *, block_size: int | None = None
) -> Transaction:
    """Decode a standalone TXN record (e.g. received from the network).

    The buffer must hold exactly one complete, valid TXN record.
    """
    rec, end = decode(buf, 0, block_size=block_size)
    if rec.txn is None:
        raise corrupt(f"expected a TXN record, got {rec.type.name}", None, 0, rec.seq, None)
    if end != len(buf):
        raise corrupt(f"{len(buf) - end} bytes after the record", None, 0, rec.seq, None)
    return rec.txn


@dataclass(slots=True, frozen=True)
class SegmentHeader:
    """The fixed header at offset 0 of every segment file."""

    block_size: int
    volume_uuid: bytes
    first_seq: int
    generation: int

    def pack(self) -> bytes:
        fields = (self.block_size, self.volume_uuid, self.first_seq, self.generation)
        head = SEG_HEADER.pack(SEG_MAGIC, SEG_VERSION, 0, *fields, bytes(12), 0)[:-4]
        return head + struct.pack("<I", zlib.crc32(head))

    @classmethod
    def unpack(cls, buf: bytes, segment: str) -> SegmentHeader:
        """Parse and check a segment header; CorruptRecord if it is not a valid one."""

        def bad(why: str) -> CorruptRecord:
            msg = f"corrupt segment header in segment {segment} at offset 0: {why}"
            return CorruptRecord(msg, segment=segment, offset=0)

        if len(buf) < SEG_HEADER.size:
            raise bad(f"incomplete ({len(buf)} of {SEG_HEADER.size} bytes)")
        magic, version, flags, bs, vol, first, gen, reserved, hcrc = SEG_HEADER.unpack(buf)
        if magic != SEG_MAGIC:
            raise bad("bad magic (not a SAM log segment)")
        if zlib.crc32(buf[: SEG_HEADER.size - 4]) != hcrc:
            raise bad("header checksum mismatch")
        if version != SEG_VERSION or flags or any(reserved):
            raise bad(f"unsupported version {version} or flags {flags:#x}")
        return cls(bs, vol, first, gen)
