"""Holes in the SAM log: acknowledged transactions missing are refused, not taken for a torn
tail; a repair accepts the loss explicitly (store level, no mount: tests/test_log_holes_mount.py
does the same through the command line and a real mount)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from mirrorfs.fs import fsck
from mirrorfs.fs.filesystem import ROOT_INO, Filesystem
from mirrorfs.store import record, syncmark
from mirrorfs.store.archive import archive_hole, read_archive
from mirrorfs.store.errors import LogError, LogHole
from mirrorfs.store.files import LOG_DIR, NODE_FILE
from mirrorfs.store.samlog import SamLog
from mirrorfs.store.segments import segment_name
from mirrorfs.store.txn import Hint, HintKind, Transaction
from mirrorfs.store.volume import Volume
from tests.log_util import crash

# A repair that gives up seqs says so at ERROR: expected in every test here that repairs.
pytestmark = pytest.mark.log_expected(r"repair (accepted a hole|cut the log)")

UUID = bytes(range(16))
BS = 512
MiB = 1 << 20


def txn(seq: int) -> Transaction:
    data = random.Random(seq).randbytes(BS)
    return Transaction(seq, 1, 1000 + seq, [(seq * 8, data)], [Hint(HintKind.INODE_UPDATED, seq)])


def open_log(path: Path, **kw) -> SamLog:
    return SamLog.open(path, volume_uuid=UUID, block_size=BS, **kw)


def written_log(path: Path, n: int, *, synced: int) -> SamLog:
    """A log with seq 1..n appended, 1..``synced`` of them synced (the mark names it)."""
    SamLog.create(path, volume_uuid=UUID, block_size=BS)
    log = open_log(path)
    for s in range(1, n + 1):
        log.append(txn(s))
        if s == synced:
            log.sync()
    return log


def offsets(seg: Path) -> dict[int, int]:
    """seq -> offset of every record of a segment file."""
    buf, off, out = seg.read_bytes(), 64, {}
    while off < len(buf) and buf[off:].strip(b"\0"):  # (an open log has zeros ahead)
        rec, end = record.decode(buf, off)
        out[rec.seq] = off
        off = end
    return out


def test_log_cut_short_of_its_sync_mark_is_a_hole_and_repair_accepts_it(tmp_path):
    d = tmp_path / "log"
    log = written_log(d, 10, synced=10)
    log.close()
    seg = d / segment_name(1)
    at = offsets(seg)[5]
    os.truncate(seg, at + 40)  # in the middle of seq 5: like a torn tail, but 5..10 were synced
    before = seg.read_bytes()
    for look_only in (False, True):
        with pytest.raises(LogHole) as ei:
            open_log(d, look_only=look_only)
        msg = str(ei.value)
        assert "\n" not in msg and "hole" in msg and "fsck --repair" in msg, msg
        assert "seq 5..10 were durable" in msg and f"offset {at} of segment {seg.name}" in msg
        assert (ei.value.first, ei.value.last, ei.value.segment, ei.value.offset) == (
            5,
            10,
            seg.name,
            at,
        )
        assert seg.read_bytes() == before  # refused: the log is left as it was found

    log = open_log(d, repair=True)
    rep = log.recovery_report
    assert log.last_seq == 4 and (rep.lost_first, rep.lost_last) == (5, 10)
    assert "gave up seq 5..10" in rep.describe() and os.path.getsize(seg) == at
    assert syncmark.read(d) is None  # the loss is accepted: the old mark says nothing more
    log.append(txn(5))
    log.close()
    log = open_log(d)
    assert log.recovery_report.describe() == "clean" and log.last_seq == 5
    assert [t.seq for t in log.scan(1)] == [1, 2, 3, 4, 5]
    log.close()


def test_unsynced_tail_torn_by_a_crash_is_no_hole(tmp_path):
    """Only what was synced counts: a crash that tears records appended after the last sync
    is the ordinary torn tail, dropped without a word."""
    d = tmp_path / "log"
    log = written_log(d, 8, synced=5)
    crash(log)
    seg = d / segment_name(1)
    os.truncate(seg, offsets(seg)[7] + 30)  # 6 is whole, 7 torn, 8 never written
    log = open_log(d)
    assert log.last_seq == 6 and log.recovery_report.torn_bytes == 30
    assert not log.recovery_report.repaired
    assert syncmark.read(d).seq == 5  # 6 was never synced: a crash could have torn it too
    log.close()


@pytest.mark.parametrize("left", [0, 1, 10, 40])
def test_losing_exactly_the_last_acknowledged_record_is_a_hole(tmp_path, left):
    """No slack: seq 7 was synced (so acknowledged), and a log cut anywhere inside its record
    (or before it: ``left`` 0) lost it. A crash cannot do that; one record is a loss too."""
    d = tmp_path / "log"
    written_log(d, 7, synced=7).close()
    seg = d / segment_name(1)
    at = offsets(seg)[7]
    os.truncate(seg, at + left)
    before = seg.read_bytes()
    with pytest.raises(LogHole) as ei:
        open_log(d)
    msg = str(ei.value)
    assert "\n" not in msg and "seq 7..7 were durable" in msg, msg
    assert f"offset {at} of segment {seg.name} after seq 6" in msg, msg
    assert (ei.value.first, ei.value.last) == (7, 7)
    assert seg.read_bytes() == before
    log = open_log(d, repair=True)
    assert log.last_seq == 6 and "gave up seq 7..7" in log.recovery_report.describe()
    log.close()
    # The same cut of a record that was never synced is a torn tail (the crash's own).
    d2 = tmp_path / "crashed"
    log = written_log(d2, 7, synced=6)
    crash(log)
    seg2 = d2 / segment_name(1)
    os.truncate(seg2, offsets(seg2)[7] + left)
    log = open_log(d2)
    assert log.last_seq == 6 and log.recovery_report.torn_bytes == left
    assert not log.recovery_report.repaired
    log.close()


def test_sync_mark_of_an_older_generation_says_nothing(tmp_path):
    d = tmp_path / "log"
    log = written_log(d, 6, synced=6)
    log.reset(3)  # a re-seeded replica: the log starts over at seq 3, a new generation
    log.close()
    assert syncmark.read(d).seq == 6  # nothing synced since: the old mark is still there
    log = open_log(d)
    assert log.last_seq == 2 and log.recovery_report.describe() == "clean"
    log.append(txn(3))
    log.close()
    assert syncmark.read(d).seq == 3


def test_a_new_log_forgets_a_stale_sync_mark(tmp_path):
    """A log made in a directory that still holds a mark (the segments of an old log were
    removed, the mark left): the mark named seqs of that log, not of this one."""
    d = tmp_path / "log"
    written_log(d, 6, synced=6).close()
    for seg in d.glob("*.seg"):
        seg.unlink()
    assert syncmark.read(d).seq == 6
    SamLog.create(d, volume_uuid=UUID, block_size=BS)
    assert syncmark.read(d) is None
    log = open_log(d)
    assert log.last_seq == 0 and log.recovery_report.describe() == "clean"
    log.close()


def test_sequence_gap_inside_a_segment_is_a_hole(tmp_path):
    d = tmp_path / "log"
    written_log(d, 6, synced=6).close()
    seg = d / segment_name(1)
    at = offsets(seg)
    buf = seg.read_bytes()
    seg.write_bytes(buf[: at[3]] + buf[at[4] :])  # seq 3 taken out: 4 follows 2
    with pytest.raises(LogHole) as ei:
        open_log(d)
    msg = str(ei.value)
    assert "\n" not in msg and f"segment {seg.name} at offset {at[3]}" in msg, msg
    assert "sequence gap: expected seq 3" in msg and "seq 3..6" in msg, msg
    log = open_log(d, repair=True)
    assert log.last_seq == 2 and "gave up seq 3..6" in log.recovery_report.describe()
    log.close()


def test_sealed_segment_cut_short_names_the_missing_seqs(tmp_path):
    d = tmp_path / "log"
    SamLog.create(d, volume_uuid=UUID, block_size=BS)
    log = open_log(d, segment_bytes=2048)
    for s in range(1, 10):
        log.append(txn(s))
    log.close()
    first = d / segment_name(1)
    at = offsets(first)
    os.truncate(first, at[2] + 20)  # the seal and seq 2.. of the first segment are gone
    with pytest.raises(LogHole) as ei:
        open_log(d, segment_bytes=2048)
    msg = str(ei.value)
    nxt = sorted(n for n in os.listdir(d) if n.endswith(".seg"))[1]
    assert f"segment {first.name} at offset {at[2]}" in msg and "next segment starts" in msg
    assert f"seq 2..{int(nxt[:20]) - 1}" in msg, msg


# -- the volume: checkpointed_seq, replay over a block file that is ahead, fsck --repair


@pytest.fixture
def vol_path(tmp_path):
    path = str(tmp_path / "vol")
    Volume.create(path, 32 * MiB)
    vol = Volume.open(path)
    Filesystem.format(vol, inode_count=512)
    vol.close()
    return path


def files_then_crash(path: str, n: int) -> list[tuple[int, int]]:
    """Create ``n`` files, one committed transaction each, all written in place, and stop
    as a killed process would; the (offset, seq) of each file's record in the log."""
    vol = Volume.open(path)
    vol.checkpointer.every_seconds = 1e9  # no checkpoint: the log holds them all
    fs = Filesystem(vol)
    seqs = []
    for i in range(n):
        node = fs.create(ROOT_INO, f"f{i}".encode(), 0o644, 0, 0)
        fs.write(node.ino, 0, bytes([i + 1]) * 5000)
        fs.release(node.ino)
        seqs.append(vol.commit())
    vol.device.flush()  # the block file is ahead of any prefix of the log
    os.close(vol._lock_fd)
    vol._lock_fd = -1
    vol.samlog.close()
    vol.device.close()
    seg = sorted(Path(path, LOG_DIR).glob("*.seg"))[-1]
    where = offsets(seg)
    return [(where[s], s) for s in seqs]


def test_block_file_ahead_of_a_cut_log_is_refused_then_repaired_clean(vol_path, capsys):
    from mirrorfs.node import volume_commands

    recs = files_then_crash(vol_path, 40)  # inodes in several table blocks
    seg = sorted(Path(vol_path, LOG_DIR).glob("*.seg"))[-1]
    off, seq = recs[6]
    os.truncate(seg, off + 50)
    last = recs[-1][1]
    with pytest.raises(LogHole, match=f"seq {seq}..{last} were durable"):
        Volume.open(vol_path)

    args = type("Args", (), {"dir": vol_path, "repair": True, "debug": False})()
    assert volume_commands.cmd_fsck(args) == 0
    out = capsys.readouterr().out
    assert f"gave up seq {seq}..{last}" in out, out
    assert "stale slot cleared" in out or "marked used" in out, out  # the table was ahead
    vol = Volume.open(vol_path)
    try:
        assert fsck.check(vol).clean
        fs = Filesystem(vol)
        names = {name for name, _, _ in fs.readdir(ROOT_INO, 0)} - {b".", b".."}
        for i in range(6):
            assert fs.lookup(ROOT_INO, f"f{i}".encode()).size == 5000
        assert f"f{i}".encode() in names and len(names) < 40
        assert vol.state.epochs[-1] == [2, seq]  # the lost seqs are never taken for these
        new = fs.create(ROOT_INO, b"after", 0o644, 0, 0)
        fs.release(new.ino)
        assert vol.commit() > seq  # (seq itself went to fsck's fixes), in the new epoch
        assert [t.epoch for t in vol.samlog.scan(vol.last_seq)] == [2]
    finally:
        vol.close()


def test_checkpointed_seq_past_the_log_is_a_hole(vol_path):
    recs = files_then_crash(vol_path, 3)
    node = Path(vol_path, NODE_FILE)
    state = json.loads(node.read_text())
    state["checkpointed_seq"] = recs[-1][1] + 5
    node.write_text(json.dumps(state))
    with pytest.raises(LogHole) as ei:
        Volume.open(vol_path)
    msg = str(ei.value)
    assert "\n" not in msg and "checkpointed" in msg, msg
    assert f"seq {recs[-1][1] + 1}..{recs[-1][1] + 5} are missing" in msg, msg
    with pytest.raises(LogHole):
        Volume.open(vol_path, read_only=True)  # fsck without --repair says the same
    vol = Volume.open(vol_path, repair_log=True)
    try:
        assert vol.state.checkpointed_seq == vol.last_seq == recs[-1][1]
        assert f"gave up seq {recs[-1][1] + 1}..{recs[-1][1] + 5}" in vol.recovery.log_note
        assert fsck.check(vol).clean
    finally:
        vol.close()
    Volume.open(vol_path).close()  # opens silently now


def test_replica_repair_cuts_its_log_and_leaves_its_blocks_to_the_source(vol_path, capsys):
    """On a replica (role target) the repair gives up the seqs but adds no transaction of its
    own (the source resends what is missing); it is not consistent until it has them."""
    from mirrorfs.node import volume_commands

    recs = files_then_crash(vol_path, 40)
    node = Path(vol_path, NODE_FILE)
    state = json.loads(node.read_text())
    state["role"] = "target"
    node.write_text(json.dumps(state))
    seg = sorted(Path(vol_path, LOG_DIR).glob("*.seg"))[-1]
    off, seq = recs[6]
    last = recs[-1][1]
    os.truncate(seg, off + 50)

    args = type("Args", (), {"dir": vol_path, "repair": True, "debug": False})()
    volume_commands.cmd_fsck(args)  # (the filesystem may well be NOT clean: it is a mix)
    out = capsys.readouterr().out
    assert f"gave up seq {seq}..{last}" in out and f"before seq {last} is received" in out, out
    assert "replica: the filesystem is only checked" in out, out
    vol = Volume.open(vol_path)
    try:
        assert vol.last_seq == seq - 1  # no local transaction
        assert vol.state.consistent_at == last and not vol.consistent
        assert vol.state.epochs == [[1, 1]]  # the source owns the epoch history
    finally:
        vol.close()


# -- what a replica's cut would throw away: the valid records after the hole


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("damage", ["bad record", "segment missing"])
def test_archive_hole_keeps_the_valid_records_that_the_cut_removes(tmp_path, damage):
    d = tmp_path / LOG_DIR
    SamLog.create(d, volume_uuid=UUID, block_size=BS)
    log = open_log(d, segment_bytes=4096)
    for s in range(1, 16):
        log.append(txn(s))
    log.close()
    names = sorted(n.name for n in d.glob("*.seg"))
    assert len(names) >= 3, names
    if damage == "bad record":  # in the last segment (a sealed one is checked by its seal)
        seg = d / names[-1]
        lost = int(names[-1][:20]) + 1
        at = offsets(seg)[lost]
        flip(seg, at + 60)
        where, kept = (names[-1], at), list(range(lost + 1, 16))
    else:  # the middle segment is gone: the next one starts past the end of the first
        os.unlink(d / names[1])
        lost = int(names[1][:20])
        where, kept = (names[2], 0), list(range(int(names[2][:20]), 16))
    with pytest.raises(LogHole) as ei:
        open_log(d, segment_bytes=4096)
    hole = ei.value
    assert (hole.first, hole.segment, hole.offset) == (lost, *where)
    info = archive_hole(
        str(tmp_path), hole, volume_uuid=UUID.hex(), node_id="n1", epoch=1, block_size=BS
    )
    assert info is not None
    assert Path(info.path).name == f"hole-epoch1-seq{lost}-{hole.last}.samlog"
    assert (info.kind, info.records, info.first_seq, info.last_seq) == (
        "hole",
        len(kept),
        kept[0],
        15,
    )
    meta, recs = read_archive(info.path, block_size=BS)
    assert meta["kind"] == "hole" and meta["fork_seq"] == lost - 1
    assert hole.detail in meta["note"]
    assert [s for s, _ in recs] == kept
    for s, rec in recs:  # verbatim: each one is the transaction that was logged
        assert record.decode_txn(rec, block_size=BS).runs == txn(s).runs
    log = open_log(d, repair=True, segment_bytes=4096)  # the cut, as the replica then does
    assert log.last_seq == lost - 1
    log.close()
    assert read_archive(info.path, block_size=BS)[1] == recs  # the archive outlives it


def test_archive_hole_of_a_log_cut_short_holds_nothing(tmp_path):
    d = tmp_path / LOG_DIR
    written_log(d, 6, synced=6).close()
    seg = d / segment_name(1)
    os.truncate(seg, offsets(seg)[4] + 20)  # nothing valid after the cut: nothing to keep
    with pytest.raises(LogHole) as ei:
        open_log(d)
    info = archive_hole(
        str(tmp_path), ei.value, volume_uuid=UUID.hex(), node_id="n1", epoch=1, block_size=BS
    )
    assert info is None and not (tmp_path / "archive").exists()


def test_replica_archives_before_it_cuts_and_refuses_when_it_cannot(vol_path):
    from mirrorfs.node.replica_volume import ReplicaError, open_replica_volume

    recs = files_then_crash(vol_path, 12)
    node = Path(vol_path, NODE_FILE)
    state = json.loads(node.read_text())
    state["role"] = "target"
    node.write_text(json.dumps(state))
    seg = sorted(Path(vol_path, LOG_DIR).glob("*.seg"))[-1]
    buf = seg.read_bytes()
    (off, seq), (nxt, _) = recs[5], recs[6]
    seg.write_bytes(buf[:off] + buf[nxt:])  # seq taken out: the ones after it are valid
    last = recs[-1][1]
    before = seg.read_bytes()
    Path(vol_path, "archive").write_text("in the way")  # the archive cannot be made
    with pytest.raises(ReplicaError) as ei:
        open_replica_volume(vol_path)
    msg = str(ei.value)
    assert "\n" not in msg and "has a hole" in msg and "cannot be archived" in msg, msg
    assert seg.read_bytes() == before  # nothing cut that was not kept first
    os.unlink(Path(vol_path, "archive"))
    vol = open_replica_volume(vol_path)
    try:
        assert vol.last_seq == seq - 1 and not vol.consistent
        (entry,) = vol.state.archives
        assert entry["kind"] == "hole" and entry["records"] == last - seq
        assert Path(entry["path"]).name == f"hole-epoch1-seq{seq}-{last}.samlog"
    finally:
        vol.close()
    _, records = read_archive(entry["path"], block_size=vol.block_size)
    assert [s for s, _ in records] == list(range(seq + 1, last + 1))
    assert json.loads(node.read_text())["archives"] == [entry]  # what status shows


def test_a_failed_fdatasync_is_never_followed_by_a_mark(tmp_path, monkeypatch):
    """After an fdatasync error, Linux may have dropped the pages that failed and a second
    fdatasync succeeds without them: the log must not name those records durable then."""
    import errno

    d = tmp_path / "log"
    log = written_log(d, 4, synced=3)
    real = os.fdatasync

    def fail(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fail)  # (the kernel's error, which cannot be caused)
    with pytest.raises(OSError):
        log.sync()
    monkeypatch.setattr(os, "fdatasync", real)
    with pytest.raises(LogError, match="failed after an I/O error"):
        log.append(txn(5))
    log.sync()
    log.close()  # (a close syncs: not after a failure)
    assert syncmark.read(d).seq == 3
