"""Checkpoints (snapshots) in process: the save area, copy-on-first-write, reading a
checkpoint through the filesystem code, delete freeing what only it held, fsck."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from mirrorfs.fs import fsck
from mirrorfs.fs.api import SetAttr
from mirrorfs.fs.filesystem import ROOT_INO as R
from mirrorfs.fs.filesystem import Filesystem, FsError
from mirrorfs.store.geometry import BITMAP_START
from mirrorfs.store.snapshots import CheckpointError, CheckpointView, SaveLayout, Table
from mirrorfs.store.volume import Volume

MiB = 1 << 20


@pytest.fixture(name="vol_path")
def _vol_path(tmp_path) -> str:
    path = str(tmp_path / "vol")
    Volume.create(path, 32 * MiB, checkpoint_space=0.25)
    vol = Volume.open(path)
    Filesystem.format(vol, inode_count=500, uid=0, gid=0)
    vol.close()
    return path


def _mkfile(fs: Filesystem, parent: int, name: bytes, data: bytes) -> int:
    a = fs.create(parent, name, 0o100644, 0, 0)
    fs.write(a.ino, 0, data)
    fs.release(a.ino)
    return a.ino


def _tree(fs: Filesystem, ino: int = R, prefix: bytes = b"") -> dict[bytes, str]:
    """path -> sha256 of content ('dir' for directories), read through ``fs``."""
    out: dict[bytes, str] = {}
    for name, attr, _ in fs.readdir(ino, 0):
        if name in (b".", b".."):
            continue
        path = prefix + b"/" + name
        if attr.mode & 0o170000 == 0o040000:
            out[path] = "dir"
            out.update(_tree(fs, attr.ino, path))
        else:
            out[path] = hashlib.sha256(fs.read(attr.ino, 0, attr.size + 1)).hexdigest()
    return out


def _populate(fs: Filesystem) -> None:
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    for i in range(5):
        _mkfile(fs, d, b"f%d" % i, os.urandom(20000 + i * 5000))
    _mkfile(fs, R, b"big", os.urandom(MiB))
    _mkfile(fs, R, b"small", b"hello")


def _mutate(fs: Filesystem) -> None:
    d = fs.lookup(R, b"d").ino
    fs.unlink(d, b"f0")
    fs.write(fs.lookup(d, b"f1").ino, 100, b"X" * 9000)
    fs.setattr(fs.lookup(d, b"f2").ino, SetAttr(size=10))
    fs.rename(d, b"f3", R, b"moved")
    fs.write(fs.lookup(R, b"big").ino, 0, os.urandom(MiB))
    _mkfile(fs, R, b"new", os.urandom(50000))


def test_layout_and_table_roundtrip():
    lay = SaveLayout.compute(10, 1000, 4096)
    assert lay is not None
    assert lay.start + lay.slots == lay.map_start
    assert lay.slots <= lay.map_blocks * lay.per_map_block
    assert lay.frozen_start + lay.max_checkpoints == lay.table == 10 + 999
    assert SaveLayout.compute(10, 5, 4096) is None
    t = Table.unpack(bytes(4096))
    assert t.checkpoints == []
    buf = bytearray(Table(3, 7, []).pack(4096))
    assert Table.unpack(bytes(buf)).generation == 3
    buf[10] ^= 1
    with pytest.raises(ValueError):
        Table.unpack(bytes(buf))


def test_checkpoint_keeps_old_state_while_live_changes(vol_path):
    vol = Volume.open(vol_path)
    fs = Filesystem(vol)
    _populate(fs)
    before = _tree(fs)
    info = vol.checkpoint_create("one")
    assert info.seq == vol.last_seq - 1
    _mutate(fs)
    vol.commit()
    after = _tree(fs)
    assert after != before
    view = vol.checkpoint_view("one")
    assert _tree(Filesystem(view, read_only=True)) == before
    held = vol.snapshots.listing()[0].held
    assert held > 0
    fs.close()
    vol.close()
    # Reopened, and read from the block file as another process would.
    vol = Volume.open(vol_path)
    assert [c.name for c in vol.snapshots.listing()] == ["one"]
    assert vol.snapshots.listing()[0].held == held
    assert _tree(Filesystem(vol.checkpoint_view("one"), read_only=True)) == before
    assert _tree(Filesystem(vol)) == after
    raw = CheckpointView(vol.device.read, vol.sb, "one")
    assert _tree(Filesystem(raw, read_only=True)) == before
    report = fsck.check(vol)
    assert report.clean, report.problems
    vol.close()


def test_two_checkpoints_and_delete_frees(vol_path):
    vol = Volume.open(vol_path)
    fs = Filesystem(vol)
    _populate(fs)
    t0 = _tree(fs)
    vol.checkpoint_create("a")
    _mutate(fs)
    t1 = _tree(fs)
    vol.checkpoint_create("b")
    big = fs.lookup(R, b"big").ino
    fs.write(big, 0, os.urandom(MiB))
    fs.unlink(R, b"small")
    vol.commit()
    t2 = _tree(fs)
    assert _tree(Filesystem(vol.checkpoint_view("a"), read_only=True)) == t0
    assert _tree(Filesystem(vol.checkpoint_view("b"), read_only=True)) == t1
    free0 = fs.statfs().blocks_free
    # Deleting the newer one keeps what the older still needs (handed down to it).
    freed_b = vol.checkpoint_delete("b")
    assert _tree(Filesystem(vol.checkpoint_view("a"), read_only=True)) == t0
    free1 = fs.statfs().blocks_free
    assert free1 == free0 + freed_b
    freed_a = vol.checkpoint_delete("a")
    assert freed_a > 0
    assert fs.statfs().blocks_free == free1 + freed_a
    assert vol.snapshots.free_slot_count == vol.snapshots.layout.slots
    assert _tree(fs) == t2
    with pytest.raises(CheckpointError):
        vol.checkpoint_view("a")
    fs.close()
    vol.close()


def test_names_and_limits(vol_path):
    vol = Volume.open(vol_path)
    vol.checkpoint_create("x")
    with pytest.raises(CheckpointError, match="exists"):
        vol.checkpoint_create("x")
    for bad in ("", "a/b", "n" * 65):
        with pytest.raises(CheckpointError, match="bad checkpoint name"):
            vol.checkpoint_create(bad)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        vol.checkpoint_delete("nope")
    vol.close()


def test_full_save_area_gives_enospc_and_keeps_checkpoint(tmp_path):
    path = str(tmp_path / "vol")
    Volume.create(path, 16 * MiB, checkpoint_space=0.02)
    vol = Volume.open(path)
    Filesystem.format(vol, inode_count=100, uid=0, gid=0)
    fs = Filesystem(vol)
    ino = _mkfile(fs, R, b"f", os.urandom(10 * MiB))
    vol.commit()
    t0 = _tree(fs)
    vol.checkpoint_create("keep")
    # 64 KiB overwrites go to new blocks while the data area has room (about 5 MiB), then
    # save the old blocks while the save area has room, then get ENOSPC.
    written = 0
    with pytest.raises(FsError) as ei:
        for off in range(0, 10 * MiB, 64 * 1024):
            fs.write(ino, off, os.urandom(64 * 1024))
            vol.commit()
            written += 64 * 1024
    assert ei.value.errno == errno.ENOSPC
    assert 4 * MiB < written < 10 * MiB, written
    assert vol.allocator.free_count < 16  # the data area is full, not only the save area
    assert vol.commit() is None  # the refused write left nothing half-done
    assert vol.snapshots.free_slot_count > 0
    assert [c.name for c in vol.snapshots.listing()] == ["keep"]
    assert _tree(Filesystem(vol.checkpoint_view("keep"), read_only=True)) == t0
    fs.close()
    vol.close()
    vol = Volume.open(path)
    assert fsck.check(vol).clean
    vol.close()


def test_volume_without_save_area_refuses(tmp_path):
    path = str(tmp_path / "vol")
    Volume.create(path, 16 * MiB)
    vol = Volume.open(path)
    with pytest.raises(CheckpointError, match="no save area"):
        vol.checkpoint_create("x")
    vol.close()


def test_fsck_checks_checkpoints(vol_path):
    vol = Volume.open(vol_path)
    fs = Filesystem(vol)
    _populate(fs)
    vol.checkpoint_create("a")
    _mutate(fs)
    vol.commit()
    vol.checkpoint_create("b")
    fs.unlink(R, b"big")
    vol.commit()
    assert fsck.check(vol).clean
    lay = vol.snapshots.layout
    # The saved copy of the block bitmap as checkpoint "a" had it, zeroed: the checkpoint's
    # own filesystem no longer checks out (its blocks look free).
    slot = vol.snapshots.maps[vol.snapshots.find("a").id][BITMAP_START]
    vol.device.write(lay.start + slot, bytes(vol.block_size))
    report = fsck.check(vol)
    assert any(p.startswith("checkpoint 'a'") for p in report.problems), report.problems
    # A map entry damaged: its checksum says so.
    where = lay.map_start + slot // lay.per_map_block
    raw = bytearray(vol.device.read(where, 1))
    raw[slot % lay.per_map_block * 16] ^= 0xFF
    vol.device.write(where, bytes(raw))
    report = fsck.check(vol)
    assert any("checksum" in p for p in report.problems), report.problems
    fs.close()
    vol.close()


def test_rollback_keeps_or_deletes_later_checkpoints(vol_path):
    vol = Volume.open(vol_path)
    fs = Filesystem(vol)
    _populate(fs)
    t0 = _tree(fs)
    vol.checkpoint_create("a")
    _mutate(fs)
    vol.commit()
    t1 = _tree(fs)
    vol.checkpoint_create("b")
    fs.unlink(R, b"new")
    fs.close()
    vol.commit()
    n = vol.checkpoint_rollback("a")
    assert n > 1
    fs = Filesystem(vol)
    assert _tree(fs) == t0
    assert _tree(Filesystem(vol.checkpoint_view("b"), read_only=True)) == t1  # kept
    assert fsck.check(vol).clean
    # The rolled-back volume takes writes again, and a second rollback drops "b".
    _mkfile(fs, R, b"after", b"x" * 10000)
    fs.close()
    vol.commit()
    vol.checkpoint_rollback("a", delete_later=True)
    assert [c.name for c in vol.snapshots.listing()] == ["a"]
    fs = Filesystem(vol)
    assert _tree(fs) == t0
    fs.close()
    vol.close()
    vol = Volume.open(vol_path)
    assert _tree(Filesystem(vol)) == t0
    assert fsck.check(vol).clean
    vol.close()


def test_a_view_of_a_deleted_checkpoint_answers_nothing(vol_path):
    from mirrorfs.store.snapshots import CheckpointGone

    vol = Volume.open(vol_path)
    fs = Filesystem(vol)
    _populate(fs)
    vol.checkpoint_create("gone")
    _mutate(fs)
    vol.commit()
    view = CheckpointView(vol.device.read, vol.sb, "gone")  # as another process has it
    big = Filesystem(view, read_only=True).lookup(R, b"big")
    vol.checkpoint_delete("gone")
    with pytest.raises(CheckpointGone):
        view.read(0, 1)
    assert big.size == MiB
    fs.close()
    vol.close()
