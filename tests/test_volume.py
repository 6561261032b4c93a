"""The volume: creation, the write choke point, write-ahead commit, replay, locking."""

from __future__ import annotations

import os

import pytest

from mirrorfs.store.errors import VolumeError, VolumeLocked
from mirrorfs.store.files import BLOCK_FILE, LOG_DIR
from mirrorfs.store.txn import Hint, HintKind
from mirrorfs.store.volume import BITMAP_START, Volume
from tests.log_util import unsync

MiB = 1 << 20


@pytest.fixture
def vol_path(tmp_path):
    path = str(tmp_path / "vol")
    Volume.create(path, 8 * MiB)
    return path


def block_file(path: str) -> bytes:
    with open(os.path.join(path, BLOCK_FILE), "rb") as f:
        return f.read()


def test_create_makes_a_volume_directory(vol_path):
    assert sorted(os.listdir(vol_path)) == ["blocks", "lock", "log", "node.json"]
    assert os.path.getsize(os.path.join(vol_path, BLOCK_FILE)) == 8 * MiB
    vol = Volume.open(vol_path)
    try:
        assert vol.block_size == 4096 and vol.block_count == 2048
        assert len(vol.uuid) == 16
        # superblock, client superblock and one bitmap block are in use
        assert vol.allocator.free_count == 2048 - (BITMAP_START + 1)
        assert vol.last_seq == 1
    finally:
        vol.close()


def test_create_refuses_existing_volume(vol_path):
    with pytest.raises(VolumeError, match="already holds a volume"):
        Volume.create(vol_path, 8 * MiB)
    Volume.create(vol_path, 4 * MiB, force=True)
    vol = Volume.open(vol_path)
    assert vol.block_count == 1024
    vol.close()


@pytest.mark.parametrize("size,bs", [(1000, 4096), (8 * MiB, 3000)])
def test_create_rejects_bad_geometry(tmp_path, size, bs):
    with pytest.raises(VolumeError):
        Volume.create(str(tmp_path / "v"), size, block_size=bs)


def test_open_rejects_non_volumes(tmp_path):
    with pytest.raises(VolumeError, match="no such volume"):
        Volume.open(str(tmp_path / "missing"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(VolumeError, match="not a mirrorfs volume"):
        Volume.open(str(tmp_path / "plain"))


def test_damaged_superblock_is_refused(vol_path):
    with open(os.path.join(vol_path, BLOCK_FILE), "r+b") as f:
        f.write(b"garbage!" * 8)
    with pytest.raises(VolumeError, match="not a mirrorfs volume|damaged superblock"):
        Volume.open(vol_path)


def test_second_open_is_locked(vol_path):
    vol = Volume.open(vol_path)
    try:
        with pytest.raises(VolumeLocked):
            Volume.open(vol_path)
    finally:
        vol.close()
    Volume.open(vol_path).close()


def test_writes_are_visible_before_commit_and_in_place_after(vol_path):
    vol = Volume.open(vol_path)
    try:
        blk = vol.allocator.allocate_one()
        data = b"x" * 4096
        vol.write(blk, data)
        vol.hint(Hint(HintKind.INODE_UPDATED, 7))
        assert vol.read(blk) == data
        assert block_file(vol_path)[blk * 4096 : (blk + 1) * 4096] != data
        assert vol.pending_bytes >= 4096
        seq = vol.commit()
        assert seq == 2 and vol.last_seq == 2 and vol.pending_bytes == 0
        assert vol.read(blk) == data  # committed, maybe not in place yet: still seen
        vol.flush_in_place()  # (the in-place write is deferred to the flusher)
        assert block_file(vol_path)[blk * 4096 : (blk + 1) * 4096] == data
        assert vol.commit() is None
        txns = list(vol.samlog.scan(2))
        assert [t.seq for t in txns] == [2]
        assert Hint(HintKind.INODE_UPDATED, 7) in txns[0].hints
        assert any(s <= blk < s + len(d) // 4096 for s, d in txns[0].runs)
    finally:
        vol.close()


def test_partial_block_writes_are_rejected(vol_path):
    vol = Volume.open(vol_path)
    try:
        with pytest.raises(ValueError):
            vol.write(100, b"short")
        with pytest.raises(ValueError):
            vol.write(vol.block_count, b"\0" * 4096)
    finally:
        vol.close()


def test_replay_restores_blocks_lost_after_commit(vol_path):
    """Committed transactions are in the log; recovery writes them in place again."""
    vol = Volume.open(vol_path)
    blk = vol.allocator.allocate_one()
    vol.write(blk, b"A" * 4096)
    vol.commit()
    vol.checkpointer.every_seconds = 1e9
    vol.write(blk, b"B" * 4096)
    vol.commit()
    # Simulate a crash after the log fsync but before the in-place write reached the disk:
    # drop the lock without checkpointing and put the old content back in the block file.
    os.close(vol._lock_fd)
    vol._lock_fd = -1
    vol.samlog.close()
    vol.device.close()
    with open(os.path.join(vol_path, BLOCK_FILE), "r+b") as f:
        f.seek(blk * 4096)
        f.write(b"A" * 4096)
    vol2 = Volume.open(vol_path)
    try:
        assert vol2.recovery.replayed >= 1
        assert vol2.read(blk) == b"B" * 4096
        assert block_file(vol_path)[blk * 4096 : (blk + 1) * 4096] == b"B" * 4096
    finally:
        vol2.close()


def test_torn_log_tail_is_dropped(vol_path):
    vol = Volume.open(vol_path)
    vol.checkpointer.every_seconds = 1e9
    blk = vol.allocator.allocate_one()
    vol.commit()
    vol.write(blk, b"C" * 4096)
    vol.commit()
    last = vol.last_seq
    os.close(vol._lock_fd)
    vol._lock_fd = -1
    vol.samlog.close()
    vol.device.close()
    logdir = os.path.join(vol_path, LOG_DIR)
    seg = sorted(os.listdir(logdir))[-1]
    segpath = os.path.join(logdir, seg)
    os.truncate(segpath, os.path.getsize(segpath) - 10)
    unsync(logdir, last)  # torn by a crash: its commit's fdatasync never returned
    with open(os.path.join(vol_path, BLOCK_FILE), "r+b") as f:
        f.seek(blk * 4096)
        f.write(b"\0" * 4096)
    vol2 = Volume.open(vol_path)
    try:
        assert vol2.last_seq == last - 1
        assert vol2.read(blk) == b"\0" * 4096
        assert vol2.recovery.log_note
    finally:
        vol2.close()


def test_checkpoint_retires_log_segments(vol_path):
    vol = Volume.open(vol_path)
    try:
        vol.samlog.segment_bytes = 64 * 1024
        blk = vol.allocator.allocate(16)[0][0]
        for _ in range(40):
            vol.write(blk, os.urandom(16 * 4096))
            vol.commit()
        before = len(os.listdir(os.path.join(vol_path, LOG_DIR)))
        assert before > 2
        vol.checkpoint()
        after = len(os.listdir(os.path.join(vol_path, LOG_DIR)))
        assert after < before
        assert vol.samlog.first_seq == 0 or vol.samlog.first_seq > vol.last_seq - 40
        assert vol.state.checkpointed_seq == vol.last_seq
    finally:
        vol.close()


def test_sealed_transactions_stay_visible_until_finished(vol_path):
    vol = Volume.open(vol_path)
    try:
        blk = vol.allocator.allocate_one()
        vol.write(blk, b"1" * 4096)
        t1 = vol.writer.seal()
        vol.write(blk, b"2" * 4096)
        t2 = vol.writer.seal()
        assert t1.seq + 1 == t2.seq and vol.writer.in_flight_seq == t2.seq
        assert vol.read(blk) == b"2" * 4096  # the newest sealed layer wins
        vol.writer.persist(t1)
        vol.writer.finish(t1)
        assert vol.last_seq == t1.seq and vol.read(blk) == b"2" * 4096
        vol.write(blk, b"3" * 4096)  # open transaction over a sealed one
        assert vol.read(blk) == b"3" * 4096
        vol.close()  # drains t2, commits the open one
        vol = Volume.open(vol_path)
        assert vol.read(blk) == b"3" * 4096
        assert vol.last_seq == t2.seq + 1  # t2 drained, then the open one committed
    finally:
        vol.close()


def _replica_of(src: Volume, path: str) -> Volume:
    """An initial sync of ``src`` into ``path``, done by hand (what the receiver does)."""
    dst = Volume.create_replica(
        path,
        volume_uuid=src.uuid,
        block_size=src.block_size,
        block_count=src.block_count,
        start_seq=src.last_seq,
        epochs=src.state.epochs,
    )
    dst.applier.write_sync_blocks(0, src.device.read(0, src.block_count))
    dst.applier.finish_sync_copy(src.last_seq)
    dst.applier.reload_geometry()
    return dst


def test_apply_keeps_the_allocator_right(vol_path, tmp_path, monkeypatch):
    """Received transactions that allocate and free blocks leave the target's allocator as
    the source's, and each shipped record is decoded once on the way into the log."""
    from mirrorfs.store import record

    src = Volume.open(vol_path)
    dst = _replica_of(src, str(tmp_path / "replica"))
    try:
        assert dst.consistent and dst.allocator.free_count == src.allocator.free_count
        runs = src.allocator.allocate(300)
        src.write(runs[0][0], b"d" * src.block_size)
        src.commit()
        src.allocator.free(runs[0][0] + 1, 10)
        src.commit()
        decodes = []
        real = record.decode_txn

        def counting(buf, **kw):
            decodes.append(1)
            return real(buf, **kw)

        monkeypatch.setattr(record, "decode_txn", counting)  # (the log and the apply path)
        for seq, rec in list(src.samlog.scan_encoded(dst.last_seq + 1)):
            dst.applier.apply(dst.applier.receive(seq, rec))
        assert len(decodes) == 2  # one per record
        assert dst.last_seq == src.last_seq
        assert dst.allocator.free_count == src.allocator.free_count
        assert list(dst.allocator.free_extents()) == list(src.allocator.free_extents())
    finally:
        dst.close()
        src.close()


def test_condition_flags_are_independent(vol_path):
    from mirrorfs.store.volume import VolumeFlag

    vol = Volume.open(vol_path)
    try:
        cond = vol.condition
        cond.freeze("switchover")
        cond.fence("newer epoch")
        assert set(cond.reasons) == {VolumeFlag.FROZEN, VolumeFlag.FENCED}
        assert cond.reason() == "newer epoch" and vol.failed is None
        cond.thaw()
        assert not cond.frozen and cond.fenced == "newer epoch"
        cond.fail("disk on fire")
        cond.clear(VolumeFlag.FAILED)  # only a reopen clears a failure
        assert vol.failed == "disk on fire"
    finally:
        vol.close()
