"""Property and unit tests of the SAM log record format (mirrorfs.store.record)."""

from __future__ import annotations

import random
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirrorfs.store import record
from mirrorfs.store.errors import CorruptRecord, LogError, TornRecord
from mirrorfs.store.record import HEADER, RecordFlag, RecordType, Seal, SegmentHeader
from mirrorfs.store.txn import Hint, HintKind, Transaction

BLOCK_SIZES = [512, 1024, 2048, 4096, 8192]
U64 = 2**64 - 1
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def block_data(seed: int, nbytes: int, compressible: bool) -> bytes:
    """Random (incompressible) or repetitive block data, cheap to make at any size."""
    if compressible:
        return bytes([seed % 256]) * (nbytes // 2) + bytes(nbytes - nbytes // 2)
    return random.Random(seed).randbytes(nbytes)


hints = st.builds(
    Hint,
    kind=st.sampled_from(list(HintKind)),
    ino=st.integers(0, U64),
    parent=st.integers(0, U64),
    name=st.binary(max_size=40),
)


@st.composite
def transactions(draw, block_sizes=BLOCK_SIZES, max_runs=4, max_blocks=3):
    bs = draw(st.sampled_from(block_sizes))
    runs = []
    for _ in range(draw(st.integers(0, max_runs))):
        n = draw(st.integers(1, max_blocks))
        first = draw(st.integers(0, U64 - n + 1))
        data = block_data(draw(st.integers(0, 2**32)), n * bs, draw(st.booleans()))
        runs.append((first, data))
    txn = Transaction(
        seq=draw(st.integers(1, U64)),
        epoch=draw(st.integers(0, U64)),
        timestamp_ns=draw(st.integers(0, U64)),
        runs=runs,
        hints=draw(st.lists(hints, max_size=4)),
    )
    return txn, bs


@SETTINGS
@given(transactions(), st.booleans(), st.binary(max_size=20))
def test_round_trip(tb, compress, prefix):
    txn, bs = tb
    buf = record.encode_txn(txn, block_size=bs, compress=compress)
    rec, end = record.decode(prefix + buf + b"trailing", len(prefix), block_size=bs)
    assert end == len(prefix) + len(buf)
    assert rec.type == RecordType.TXN
    assert (rec.seq, rec.epoch, rec.timestamp_ns, rec.size) == (
        txn.seq,
        txn.epoch,
        txn.timestamp_ns,
        len(buf),
    )
    assert rec.txn == txn
    assert record.decode_txn(buf, block_size=bs) == txn
    flags = RecordFlag(HEADER.unpack_from(buf)[3])
    if not compress:
        assert not flags & RecordFlag.LZ4


@SETTINGS
@given(transactions(), st.booleans(), st.data())
def test_any_flipped_byte_is_detected(tb, compress, data):
    txn, bs = tb
    buf = bytearray(record.encode_txn(txn, block_size=bs, compress=compress))
    pos = data.draw(st.integers(0, len(buf) - 1))
    buf[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises((CorruptRecord, TornRecord)):
        record.decode(bytes(buf), block_size=bs)
    with pytest.raises((CorruptRecord, TornRecord)):
        record.decode_txn(bytes(buf))


@settings(max_examples=60, deadline=None)
@given(transactions(block_sizes=[512], max_runs=2, max_blocks=2), st.booleans())
def test_truncation_at_every_offset_is_torn(tb, compress):
    txn, bs = tb
    buf = record.encode_txn(txn, block_size=bs, compress=compress)
    for cut in range(len(buf)):
        with pytest.raises(TornRecord):
            record.decode(buf[:cut])


def test_every_single_byte_flip_of_one_record():
    """Exhaustive over positions for one compressed record with hints and runs."""
    txn = Transaction(
        7, 2, 123, [(5, bytes(1024)), (99, block_data(1, 512, False))], [Hint(3, 4, 1, b"x")]
    )
    good = record.encode_txn(txn, block_size=512)
    assert HEADER.unpack_from(good)[3] & RecordFlag.LZ4  # the zeros compress
    for pos in range(len(good)):
        bad = bytearray(good)
        bad[pos] ^= 0x40
        with pytest.raises((CorruptRecord, TornRecord)):
            record.decode(bytes(bad))


def test_compression_only_when_it_saves_space():
    bs = 4096
    zeros = Transaction(1, 0, 0, [(0, bytes(16 * bs))])
    noise = Transaction(1, 0, 0, [(0, block_data(3, 4 * bs, False))])
    packed = record.encode_txn(zeros, block_size=bs)
    assert len(packed) < bs and HEADER.unpack_from(packed)[3] & RecordFlag.LZ4
    raw = record.encode_txn(zeros, block_size=bs, compress=False)
    assert len(raw) > 16 * bs
    noisy = record.encode_txn(noise, block_size=bs)
    assert not HEADER.unpack_from(noisy)[3] & RecordFlag.LZ4
    for buf in (packed, raw, noisy):
        assert record.decode_txn(buf, block_size=bs) in (zeros, noise)


def test_error_message_names_segment_offset_and_seq():
    txn = Transaction(17, 1, 5, [(3, block_data(2, 512, False))])
    buf = bytearray(b"\0" * 100 + record.encode_txn(txn, block_size=512))
    buf[-1] ^= 1
    with pytest.raises(CorruptRecord) as ei:
        record.decode(bytes(buf), 100, segment="00000000000000000001.seg", file_offset=8192)
    msg = str(ei.value)
    assert msg == (
        "corrupt log record in segment 00000000000000000001.seg at offset 8192 (seq 17): "
        "checksum mismatch"
    )
    assert (ei.value.segment, ei.value.offset, ei.value.seq) == (
        "00000000000000000001.seg",
        8192,
        17,
    )
    # An unreadable header: the caller's expected seq is named instead.
    buf[100 + 20] ^= 1
    with pytest.raises(CorruptRecord, match=r"at offset 100 \(expected seq 17\): header"):
        record.decode(bytes(buf), 100, expect_seq=17)
    with pytest.raises(TornRecord, match=r"at offset 0: header incomplete \(10 of 48"):
        record.decode(b"MFSR" + bytes(6))


def _header(length: int, raw_length: int, flags: int = 0, rtype: int = 1) -> bytes:
    head = HEADER.pack(record.MAGIC, 1, rtype, flags, length, raw_length, 1, 0, 0, 0, 0)[:40]
    return head + struct.pack("<II", zlib.crc32(head), 0)


def test_oversized_record_rejected_before_reading_payload():
    huge = record.MAX_PAYLOAD + 1
    with pytest.raises(CorruptRecord, match="exceeds"):
        record.decode(_header(huge, huge))
    with pytest.raises(CorruptRecord, match="exceeds"):
        record.decode(_header(100, huge, flags=RecordFlag.LZ4))
    with pytest.raises(CorruptRecord, match="inconsistent payload sizes"):
        record.decode(_header(100, 50))
    with pytest.raises(CorruptRecord, match="unknown record type"):
        record.decode(_header(0, 0, rtype=9))
    with pytest.raises(CorruptRecord, match="unknown flags"):
        record.decode(_header(0, 0, flags=4))
    # A valid header with a short buffer is torn, not corrupt.
    with pytest.raises(TornRecord, match="payload incomplete"):
        record.decode(_header(100, 100) + bytes(10))


def test_block_size_is_checked():
    txn = Transaction(1, 0, 0, [(0, bytes(1024))])
    buf = record.encode_txn(txn, block_size=512)
    assert record.decode_txn(buf, block_size=512) == txn
    with pytest.raises(CorruptRecord, match="block size 512 does not match the log's 1024"):
        record.decode_txn(buf, block_size=1024)
    with pytest.raises(ValueError, match="not whole blocks"):
        record.encode_txn(txn, block_size=4096)
    with pytest.raises(ValueError, match="not whole blocks"):
        record.encode_txn(Transaction(1, 0, 0, [(0, b"")]), block_size=512)
    with pytest.raises(ValueError, match="power of two"):
        record.encode_txn(txn, block_size=1000)
    with pytest.raises(ValueError, match="out of range"):
        record.encode_txn(Transaction(0, 0, 0), block_size=512)
    with pytest.raises(ValueError, match="out of range"):
        record.encode_txn(Transaction(1, 0, 0, [(U64, bytes(1024))]), block_size=512)


def test_decode_txn_wants_exactly_one_txn_record():
    txn = Transaction(3, 0, 0, hints=[Hint(HintKind.INODE_DELETED, 9)])
    buf = record.encode_txn(txn, block_size=512)
    with pytest.raises(CorruptRecord, match="bytes after the record"):
        record.decode_txn(buf + b"x")
    seal = record.encode_seal(Seal(1, 5, 4096, bytes(16)))
    with pytest.raises(CorruptRecord, match="expected a TXN record, got SEAL"):
        record.decode_txn(seal)


def test_decoded_runs_share_an_immutable_record_and_copy_a_mutable_one():
    """Runs decoded from bytes are views of them (no copy of megabytes on the apply path);
    from a bytearray, which its owner may change later, they are copies."""
    data = random.Random(5).randbytes(64 * 4096)  # incompressible: the payload stays raw
    buf = record.encode_txn(Transaction(7, 0, 0, [(10, data), (500, data[:4096])]), block_size=4096)
    shared = record.decode_txn(buf)
    assert [type(d) for _, d in shared.runs] == [memoryview, memoryview]
    assert all(d.obj is buf for _, d in shared.runs)
    assert [(s, bytes(d)) for s, d in shared.runs] == [(10, data), (500, data[:4096])]
    owned = bytearray(buf)
    copied = record.decode_txn(owned)
    owned[:] = bytes(len(owned))
    assert [(s, type(d), d) for s, d in copied.runs] == [
        (10, bytes, data),
        (500, bytes, data[:4096]),
    ]


def test_seal_round_trip():
    seal = Seal(10, 42, 123456, bytes(range(16)))
    buf = record.encode_seal(seal, epoch=3, timestamp_ns=99)
    assert len(buf) == record.SEAL_RECORD_SIZE
    rec, end = record.decode(buf)
    assert (rec.type, rec.seq, rec.epoch, rec.seal, end) == (RecordType.SEAL, 42, 3, seal, len(buf))
    empty = record.encode_seal(Seal(10, 9, 64, bytes(16)))  # a segment that holds nothing
    assert record.decode(empty)[0].seal.last_seq == 9
    with pytest.raises(ValueError):
        record.encode_seal(Seal(10, 8, 64, bytes(16)))


def test_segment_header():
    hdr = SegmentHeader(4096, bytes(range(16)), 77, 3)
    buf = hdr.pack()
    assert len(buf) == 64
    assert SegmentHeader.unpack(buf, "x.seg") == hdr
    for pos in range(64):
        bad = bytearray(buf)
        bad[pos] ^= 1
        with pytest.raises(CorruptRecord, match="corrupt segment header in segment x.seg"):
            SegmentHeader.unpack(bytes(bad), "x.seg")
    with pytest.raises(CorruptRecord, match="incomplete"):
        SegmentHeader.unpack(buf[:63], "x.seg")


def test_large_transaction_round_trip():
    """Tens of MiB of blocks in a few big runs and many small ones."""
    bs = 4096
    big = block_data(5, 16 << 20, False)
    runs = [(1000, big), (10, bytes(4 << 20))] + [(i * 2, big[i * bs : (i + 1) * bs]) for i in
                                                  range(2000)]  # fmt: skip
    txn = Transaction(1, 1, 1, runs, [Hint(HintKind.INODE_UPDATED, 1)])
    for compress in (True, False):
        buf = record.encode_txn(txn, block_size=bs, compress=compress)
        assert record.decode_txn(buf, block_size=bs) == txn


def test_errors_are_log_errors():
    assert issubclass(TornRecord, LogError) and issubclass(CorruptRecord, LogError)
