"""SAM log segments, scanning, retiring and crash recovery, on real files (tmp_path)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from mirrorfs.store import record, syncmark
from mirrorfs.store.errors import CorruptRecord, LogError
from mirrorfs.store.record import RecordType, SegmentHeader
from mirrorfs.store.samlog import SamLog
from mirrorfs.store.segments import segment_name
from mirrorfs.store.txn import Hint, HintKind, Transaction
from tests.log_util import crash, unsync

UUID = bytes(range(16))
OTHER_UUID = bytes(range(1, 17))
BS = 512


def txn(seq: int, nblocks: int = 1) -> Transaction:
    """A transaction with incompressible data, so record sizes are predictable."""
    data = random.Random(seq).randbytes(nblocks * BS)
    return Transaction(seq, 1, 1000 + seq, [(seq * 8, data)], [Hint(HintKind.INODE_UPDATED, seq)])


def new_log(path: Path, **kw) -> SamLog:
    SamLog.create(path, volume_uuid=UUID, block_size=BS)
    return SamLog.open(path, volume_uuid=UUID, block_size=BS, **kw)


def reopen(path: Path, **kw) -> SamLog:
    return SamLog.open(path, volume_uuid=UUID, block_size=BS, **kw)


def segments(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".seg"))


def record_offsets(path: Path) -> list[tuple[int, int, int]]:
    """(offset, end, seq) of every record of a segment file."""
    buf = path.read_bytes()
    out, off = [], 64
    while off < len(buf) and buf[off:].strip(b"\0"):  # (an open log has zeros ahead)
        rec, end = record.decode(buf, off)
        out.append((off, end, rec.seq))
        off = end
    return out


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def test_append_scan_round_trip_across_segments(tmp_path):
    d = tmp_path / "log"
    log = new_log(d, segment_bytes=2048)
    txns = [txn(s) for s in range(1, 31)]
    for t in txns:
        assert log.append(t) > BS
    log.sync()
    names = segments(d)
    assert len(names) >= 8 and names[0] == segment_name(1)
    assert (log.first_seq, log.last_seq) == (1, 30)
    # The current segment has zeros written ahead of its records; they go at close.
    assert log.size_bytes <= sum(os.path.getsize(d / n) for n in names)
    assert list(log.scan(1)) == txns
    assert list(log.scan(17)) == txns[16:]
    assert list(log.scan(31)) == []
    assert log.verify() == 30
    log.close()
    # Every segment but the last ends with a SEAL naming its range; no segment is too big.
    for name in names[:-1]:
        buf = (d / name).read_bytes()
        assert len(buf) <= 2048 + record.SEAL_RECORD_SIZE
        rec, _ = record.decode(buf, len(buf) - record.SEAL_RECORD_SIZE)
        assert rec.type == RecordType.SEAL and rec.seal.first_seq == int(name[:20])
    log = reopen(d, segment_bytes=2048)
    assert log.recovery_report.describe() == "clean"
    assert (log.first_seq, log.last_seq) == (1, 30)
    assert list(log.scan(5)) == txns[4:]
    log.append(txn(31))
    assert [t.seq for t in log.scan(29)] == [29, 30, 31]
    log.close()


def test_append_is_written_before_it_returns(tmp_path):
    d = tmp_path / "log"
    log = new_log(d)
    n = log.append(txn(1))
    # Another reader of the file sees the whole record without any sync.
    buf = (d / segment_name(1)).read_bytes()
    assert len(buf) >= 64 + n and not buf[64 + n :].strip(b"\0")  # zeros written ahead
    assert record.decode_txn(buf[64 : 64 + n], block_size=BS) == txn(1)
    log.sync()
    log.close()
    assert (d / segment_name(1)).stat().st_size == 64 + n  # close cut the zeros


def test_small_appends_overwrite_zeros_written_ahead_and_a_crash_leaves_them(tmp_path):
    """fdatasync of an append that grows the file waits for the host's journal; small
    records go into zeros written ahead instead. After a crash (the log never closed) the
    zero tail is no torn record: recovery drops it without a word."""
    d = tmp_path / "log"
    log = new_log(d)
    sizes = [log.append(txn(s)) for s in range(1, 6)]
    log.sync()
    path = d / segment_name(1)
    ahead = path.stat().st_size
    assert ahead >= 64 + sum(sizes) + (32 << 10)  # one stretch of zeros for all five
    crashed = reopen(d)  # as after a SIGKILL: the first log is still open, never closed
    assert crashed.recovery_report.describe() == "clean"
    assert crashed.last_seq == 5 and list(crashed.scan(1)) == [txn(s) for s in range(1, 6)]
    assert path.stat().st_size == 64 + sum(sizes)
    crashed.close()
    os.close(log._fd)  # the "crashed" one, without its close


def test_a_torn_record_in_the_zeros_ahead_is_still_a_torn_tail(tmp_path):
    d = tmp_path / "log"
    log = new_log(d)
    n1 = log.append(txn(1))
    n2 = log.append(txn(2))
    log.sync()
    path = d / segment_name(1)
    with open(path, "r+b") as f:  # the second record half written, zeros after it
        f.seek(64 + n1 + n2 // 2)
        f.write(bytes(n2 - n2 // 2))
    unsync(d, 2)  # a crash tore it: its fdatasync never returned, so the mark is before it
    torn = reopen(d)
    assert torn.last_seq == 1
    assert torn.recovery_report.torn_bytes > 0 and "torn tail" in torn.recovery_report.describe()
    torn.close()
    os.close(log._fd)


def test_scan_is_lazy_and_follows_appends(tmp_path):
    log = new_log(tmp_path / "log", segment_bytes=1500)
    for s in range(1, 4):
        log.append(txn(s))
    it = log.scan(2)
    assert next(it).seq == 2
    for s in range(4, 8):  # rolls segments while the reader is in the middle
        log.append(txn(s))
    assert [t.seq for t in it] == [3, 4, 5, 6, 7]
    log.close()


def test_sequence_continuity(tmp_path):
    log = new_log(tmp_path / "log")
    log.append(txn(1))
    with pytest.raises(LogError, match="out-of-sequence append: seq 3 after 1"):
        log.append(txn(3))
    with pytest.raises(LogError, match="out-of-sequence"):
        log.append(txn(1))
    log.append(txn(2))
    good = record.encode_txn(txn(3), block_size=BS)
    with pytest.raises(LogError, match="carries seq 4, expected 3"):
        log.append_encoded(3, record.encode_txn(txn(4), block_size=BS))
    with pytest.raises(LogError, match="out-of-sequence append: seq 4 after 2"):
        log.append_encoded(4, record.encode_txn(txn(4), block_size=BS))
    bad = bytearray(good)
    bad[-1] ^= 1
    with pytest.raises(CorruptRecord, match="checksum mismatch"):
        log.append_encoded(3, bytes(bad))
    SamLog.create(tmp_path / "kb", volume_uuid=UUID, block_size=1024)
    with SamLog.open(tmp_path / "kb", volume_uuid=UUID, block_size=1024) as other:
        with pytest.raises(CorruptRecord, match="block size 512 does not match the log's 1024"):
            other.append_encoded(3, good)
        assert other.last_seq == 0
    assert log.append_encoded(3, good) == len(good)
    assert log.last_seq == 3
    assert [t.seq for t in log.scan(1)] == [1, 2, 3]
    assert next(log.scan_encoded(3)) == (3, good)
    log.close()


def test_fresh_log_starts_at_any_seq(tmp_path):
    d = tmp_path / "log"
    log = new_log(d)
    assert (log.first_seq, log.last_seq) == (0, 0)
    log.append(txn(100))
    assert segments(d) == [segment_name(100)]
    assert (log.first_seq, log.last_seq) == (100, 100)
    log.close()
    log = reopen(d)
    assert [t.seq for t in log.scan(100)] == [100]
    log.close()


def test_retire_removes_only_covered_segments(tmp_path):
    d = tmp_path / "log"
    log = new_log(d, segment_bytes=2048)
    for s in range(1, 21):
        log.append(txn(s))
    firsts = [int(n[:20]) for n in segments(d)]
    assert len(firsts) >= 5
    # Retiring up to the middle of the second segment removes only the first one.
    assert log.retire(firsts[2] - 2) == 1
    assert log.first_seq == firsts[1]
    with pytest.raises(LogError, match=f"seq 1 is not available .*holds {firsts[1]}..20"):
        log.scan(1)
    assert [t.seq for t in log.scan(firsts[1])] == list(range(firsts[1], 21))
    assert log.retire(firsts[3] - 1) == 2
    assert log.first_seq == firsts[3]
    with pytest.raises(LogError, match="not available"):
        log.scan(22)
    # A full retire empties the log, which keeps its position.
    log.retire(20)
    assert (log.first_seq, log.last_seq) == (0, 20)
    assert segments(d) == [segment_name(21)]
    assert list(log.scan(21)) == []
    with pytest.raises(LogError, match="holds nothing"):
        log.scan(20)
    log.close()
    log = reopen(d, segment_bytes=2048)
    assert (log.first_seq, log.last_seq) == (0, 20)
    with pytest.raises(LogError, match="out-of-sequence"):
        log.append(txn(5))
    log.append(txn(21))
    assert [t.seq for t in log.scan(21)] == [21]
    assert log.retire(20) == 0  # the current segment is never removed
    log.close()


@pytest.mark.parametrize("compressed", [True, False])
def test_recovery_after_last_record_cut_at_every_offset(tmp_path, compressed):
    d = tmp_path / "log"
    log = new_log(d)
    n = 4
    # The last record: lz4-compressed (small: every offset) or raw block data (larger: every
    # header offset, then every 7th, to keep the fsyncs of 600 reopenings out of the run).
    last = txn(n)
    if compressed:
        last.runs = [(3, bytes(BS))]
    for t in [txn(s) for s in range(1, n)]:
        log.append(t)
    log.sync()
    log.append(last)
    crash(log)  # the last record written, its fdatasync never done: what a crash can tear
    assert syncmark.read(d).seq == n - 1
    seg = d / segment_name(1)
    start, end, seq = record_offsets(seg)[-1]
    data = seg.read_bytes()
    assert seq == n and not data[end:].strip(b"\0")  # (after it: only the zeros written ahead)
    full = data[:end]
    assert (end - start < 200) == compressed
    cuts = range(start, end) if compressed else [*range(start, start + 64), *range(start, end, 7)]
    for cut in cuts:
        seg.write_bytes(full[:cut])
        log = reopen(d)
        rep = log.recovery_report
        assert log.last_seq == n - 1
        assert os.path.getsize(seg) == start
        assert rep.torn_bytes == cut - start
        if cut > start:
            assert (rep.segment, rep.offset, rep.last_seq) == (seg.name, start, n - 1)
            assert f"torn tail of {cut - start} bytes at offset {start}" in rep.describe()
        log.append(last)
        assert list(log.scan(n)) == [last]
        assert [t.seq for t in log.scan(1)] == list(range(1, n + 1))
        crash(log)
    assert seg.read_bytes()[:end] == full


def test_torn_seal_and_missing_next_segment(tmp_path):
    """A crash while rolling: the SEAL is cut short and the next segment never appeared."""
    d = tmp_path / "log"
    log = new_log(d, segment_bytes=1400)
    for s in range(1, 3):
        log.append(txn(s))
    log.sync()
    log.append(txn(3))  # seals 1..2 (fsync, mark 2) and starts segment 3
    log.close()
    names = segments(d)
    assert len(names) == 2
    os.unlink(d / names[1])
    first = d / names[0]
    size = os.path.getsize(first)
    os.truncate(first, size - 10)
    unsync(d, 3)  # the crash came before the seal's fsync returned: the mark still says 2
    log = reopen(d, segment_bytes=1400)
    assert log.recovery_report.torn_bytes == record.SEAL_RECORD_SIZE - 10
    assert log.last_seq == 2
    log.append(txn(3))
    assert [t.seq for t in log.scan(1)] == [1, 2, 3]
    log.close()
    # A sealed last segment (crash right after sealing) is fine as it is.
    log = new_log(tmp_path / "b", segment_bytes=1400)
    for s in range(1, 4):
        log.append(txn(s))
    log.close()
    os.unlink(tmp_path / "b" / segments(tmp_path / "b")[1])
    unsync(tmp_path / "b", 3)  # sealed (mark 2), the next segment not created yet
    log = reopen(tmp_path / "b", segment_bytes=1400)
    assert log.recovery_report.describe() == "clean" and log.last_seq == 2
    log.append(txn(3))
    assert segments(tmp_path / "b") == [segment_name(1), segment_name(3)]
    log.close()


@pytest.mark.parametrize("where", ["payload", "header"])
@pytest.mark.log_expected(r"repair cut the log")
def test_corrupt_middle_record(tmp_path, where):
    d = tmp_path / "log"
    log = new_log(d)
    for s in range(1, 6):
        log.append(txn(s))
    log.close()
    seg = d / segment_name(1)
    off, end, _ = record_offsets(seg)[2]  # seq 3
    flip(seg, off + 300 if where == "payload" else off + 17)
    with pytest.raises(CorruptRecord) as ei:
        reopen(d)
    msg = str(ei.value)
    assert f"segment {seg.name} at offset {off} (" in msg and "seq 3)" in msg
    assert "not a torn tail" in msg and "repair" in msg
    assert (ei.value.segment, ei.value.offset, ei.value.seq) == (seg.name, off, 3)
    log = reopen(d, repair=True)
    rep = log.recovery_report
    assert log.last_seq == 2 and os.path.getsize(seg) == off
    assert (
        rep.repaired
        and rep.discarded_records == 2
        and (rep.segment, rep.offset)
        == (
            seg.name,
            off,
        )
    )
    assert "discarded 2 record(s)" in rep.describe()
    log.append(txn(3))
    assert [t.seq for t in log.scan(1)] == [1, 2, 3]
    log.close()


def test_corruption_in_sealed_segment_found_on_read(tmp_path):
    d = tmp_path / "log"
    log = new_log(d, segment_bytes=2048)
    for s in range(1, 10):
        log.append(txn(s))
    log.close()
    first = d / segments(d)[0]
    off, _, seq = record_offsets(first)[1]
    flip(first, off + 200)
    log = reopen(d, segment_bytes=2048)  # sealed segments are only checked cheaply
    with pytest.raises(CorruptRecord, match=f"segment {first.name} at offset {off} .seq {seq}."):
        list(log.scan(1))
    with pytest.raises(CorruptRecord):
        log.verify()
    assert [t.seq for t in log.scan(seq + 1)][-1] == 9
    log.close()


def test_bad_seal_trailer_is_corruption_and_repair_reseals(tmp_path):
    d = tmp_path / "log"
    log = new_log(d, segment_bytes=2048)
    for s in range(1, 10):
        log.append(txn(s))
    log.close()
    first = d / segments(d)[0]
    flip(first, os.path.getsize(first) - 5)
    with pytest.raises(CorruptRecord, match=f"segment {first.name}"):
        reopen(d, segment_bytes=2048)
    log = reopen(d, segment_bytes=2048, repair=True)
    assert log.recovery_report.resealed_segments == [first.name]
    assert log.last_seq == 9 and log.verify() == 9
    log.close()
    assert reopen(d).recovery_report.describe() == "clean"


@pytest.mark.log_expected(r"repair cut the log")
def test_sequence_gap_between_segments(tmp_path):
    d = tmp_path / "log"
    log = new_log(d, segment_bytes=2048)
    for s in range(1, 16):
        log.append(txn(s))
    log.close()
    names = segments(d)
    assert len(names) >= 4
    os.unlink(d / names[1])
    with pytest.raises(CorruptRecord, match=f"segment {names[2]} at offset 0 .seq .*gap"):
        reopen(d)
    log = reopen(d, repair=True)
    last_of_first = int(names[1][:20]) - 1
    assert log.last_seq == last_of_first
    assert segments(d) == names[:1]
    rep = log.recovery_report
    assert rep.removed_segments == names[2:]
    assert rep.discarded_records == 15 - int(names[2][:20]) + 1
    log.append(txn(last_of_first + 1))
    log.close()


def test_other_volume_or_block_size_refused(tmp_path):
    d = tmp_path / "log"
    log = new_log(d)
    log.append(txn(1))
    log.close()
    with pytest.raises(LogError, match="belongs to volume 00010203-.*, not 01020304-") as ei:
        SamLog.open(d, volume_uuid=OTHER_UUID, block_size=BS)
    assert not isinstance(ei.value, CorruptRecord)
    with pytest.raises(LogError, match="has block size 512, the volume 4096"):
        SamLog.open(d, volume_uuid=UUID, block_size=4096)
    # A segment of another volume slipped into the directory.
    SamLog.create(tmp_path / "other", volume_uuid=OTHER_UUID, block_size=BS)
    shutil.copy(tmp_path / "other" / segment_name(1), d / segment_name(2))
    with pytest.raises(LogError, match=f"{segment_name(2)} .*belongs to volume"):
        reopen(d, repair=True)
    with pytest.raises(LogError, match="already holds a SAM log"):
        SamLog.create(d, volume_uuid=UUID, block_size=BS)
    with pytest.raises(LogError, match="no SAM log"):
        reopen(tmp_path / "missing")


def test_reset_and_interrupted_reset(tmp_path):
    d = tmp_path / "log"
    log = new_log(d, segment_bytes=2048)
    for s in range(1, 10):
        log.append(txn(s))
    log.reset(50)
    assert (log.first_seq, log.last_seq) == (0, 49)
    assert segments(d) == [segment_name(50)]
    with pytest.raises(LogError):
        log.append(txn(10))
    log.append(txn(50))
    log.close()
    log = reopen(d)
    assert [t.seq for t in log.scan(50)] == [50]
    log.close()
    # A crash in the middle of a reset: the new-generation segment exists, old ones too.
    gen = SegmentHeader.unpack((d / segment_name(50)).read_bytes()[:64], "x").generation
    (d / segment_name(7)).write_bytes(SegmentHeader(BS, UUID, 7, gen + 1).pack())
    log = reopen(d)
    assert log.recovery_report.superseded_segments == [segment_name(50)]
    assert (log.first_seq, log.last_seq) == (0, 6)
    log.append(txn(7))
    log.close()


@pytest.mark.log_expected(r"repair cut the log")
def test_corrupt_segment_header(tmp_path):
    d = tmp_path / "log"
    log = new_log(d, segment_bytes=2048)
    for s in range(1, 10):
        log.append(txn(s))
    log.close()
    names = segments(d)
    flip(d / names[-1], 30)
    with pytest.raises(CorruptRecord, match=f"corrupt segment header in segment {names[-1]}"):
        reopen(d)
    log = reopen(d, repair=True)
    assert log.last_seq == int(names[-1][:20]) - 1
    assert log.recovery_report.removed_segments == names[-1:]
    log.close()
    (d / "00000000000000000001.seg.tmp").write_bytes(b"half")  # an unfinished creation
    log = reopen(d)
    assert not (d / "00000000000000000001.seg.tmp").exists()
    log.close()
