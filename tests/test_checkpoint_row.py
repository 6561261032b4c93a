"""Overwriting what a checkpoint holds, in process: large writes go to new blocks
(redirect-on-write), small ones save the old block (copy-on-first-write), each falls back
to the other when its space is short; the allocator never hands out a block a checkpoint
still reads; deleting the checkpoint gives those blocks back. A randomized run compares
every checkpoint with the tree recorded when it was made."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirrorfs.fs import fsck
from mirrorfs.fs.api import SetAttr
from mirrorfs.fs.filedata import REDIRECT_MIN
from mirrorfs.fs.filesystem import ROOT_INO as R
from mirrorfs.fs.filesystem import Filesystem
from mirrorfs.store.allocator import ExtentAllocator
from mirrorfs.store.errors import AllocatorError
from mirrorfs.store.snapshots import CheckpointError, CheckpointView
from mirrorfs.store.volume import Volume

MiB = 1 << 20
BS = 4096


def _volume(tmp_path, size: int = 32 * MiB, space: float = 0.25) -> tuple[Volume, Filesystem]:
    path = str(tmp_path / "vol")
    Volume.create(path, size, checkpoint_space=space)
    vol = Volume.open(path)
    Filesystem.format(vol, inode_count=200, uid=0, gid=0)
    return vol, Filesystem(vol)


def _mkfile(fs: Filesystem, name: bytes, data: bytes) -> int:
    a = fs.create(R, name, 0o100644, 0, 0)
    fs.write(a.ino, 0, data)
    fs.release(a.ino)
    return a.ino


def _blocks(fs: Filesystem, ino: int) -> set[int]:
    return {e.pblk + i for e in fs.data.extents(fs.inodes.get(ino)) for i in range(e.length)}


def _read(fs: Filesystem, name: bytes) -> bytes:
    ino = fs.lookup(R, name).ino
    return fs.read(ino, 0, fs.getattr(ino).size + 1)


def _cid(vol: Volume, name: str) -> int:
    assert vol.snapshots is not None
    return vol.snapshots.find(name).id


def test_large_overwrite_moves_the_data_and_saves_none_of_it(tmp_path):
    vol, fs = _volume(tmp_path)
    old = os.urandom(4 * MiB)
    ino = _mkfile(fs, b"big", old)
    vol.commit()
    vol.checkpoint_create("c")
    before = _blocks(fs, ino)
    free0 = vol.allocator.free_count
    new = bytearray(os.urandom(4 * MiB))
    fs.write(ino, 0, new)
    # A write that starts and ends inside blocks: the moved head and tail keep the bytes
    # around it (read from the old blocks), the checkpoint keeps all of the old ones.
    patch = os.urandom(200_000)
    fs.write(ino, 1000, patch)
    new[1000 : 1000 + len(patch)] = patch
    vol.commit()

    assert _read(fs, b"big") == bytes(new)
    view = Filesystem(vol.checkpoint_view("c"), read_only=True)
    assert _read(view, b"big") == old
    assert not _blocks(fs, ino) & before, "the live file still uses blocks the checkpoint reads"
    assert vol.snapshots is not None
    saved = len(vol.snapshots.maps[_cid(vol, "c")])
    assert saved < 16, f"{saved} blocks saved: only metadata should be"
    assert vol.allocator.free_count <= free0 - len(before)
    # The blocks stay held: a new file gets other ones.
    other = _mkfile(fs, b"other", os.urandom(2 * MiB))
    vol.commit()
    assert not _blocks(fs, other) & before
    held = vol.snapshots.listing()[0].held
    assert held >= len(before) + saved
    vol.allocator.check(against_io=True)
    assert fsck.check(vol).clean

    free1 = vol.allocator.free_count
    freed = vol.checkpoint_delete("c")
    assert freed >= len(before)
    assert vol.allocator.free_count >= free1 + len(before)
    vol.allocator.check(against_io=True)
    fs.close()
    vol.close()
    vol = Volume.open(str(tmp_path / "vol"))
    report = fsck.check(vol)
    assert report.clean, report.problems
    vol.close()


def test_small_overwrite_saves_the_old_block_in_place(tmp_path):
    vol, fs = _volume(tmp_path)
    old = os.urandom(MiB)
    ino = _mkfile(fs, b"f", old)
    vol.commit()
    vol.checkpoint_create("c")
    before = _blocks(fs, ino)
    size = (REDIRECT_MIN - 1) * BS
    fs.write(ino, 8 * BS, b"x" * size)
    vol.commit()
    assert _blocks(fs, ino) == before  # in place
    assert vol.snapshots is not None
    assert len(vol.snapshots.maps[_cid(vol, "c")]) >= REDIRECT_MIN - 1
    view = Filesystem(vol.checkpoint_view("c"), read_only=True)
    assert _read(view, b"f") == old
    expect = old[: 8 * BS] + b"x" * size + old[8 * BS + size :]
    assert _read(fs, b"f") == expect
    fs.close()
    vol.close()


def test_a_full_save_area_sends_small_overwrites_to_new_blocks(tmp_path):
    vol, fs = _volume(tmp_path, size=32 * MiB, space=0.02)  # about 160 save slots
    old = os.urandom(4 * MiB)
    ino = _mkfile(fs, b"f", old)
    vol.commit()
    vol.checkpoint_create("c")
    model = bytearray(old)
    for off in range(0, 4 * MiB, 2 * BS):
        data = os.urandom(BS)
        fs.write(ino, off, data)
        model[off : off + BS] = data
        vol.commit()
    assert _read(fs, b"f") == bytes(model)
    assert _read(Filesystem(vol.checkpoint_view("c"), read_only=True), b"f") == old
    assert vol.snapshots is not None
    assert vol.snapshots.free_slot_count >= 16  # headroom kept for metadata
    assert vol.allocator.held_count > 0, "no small overwrite went to new blocks"
    report = fsck.check(vol)
    assert report.clean, report.problems
    fs.close()
    vol.close()


class _Bits:
    """A block store of one bitmap block for the allocator."""

    block_size = BS

    def __init__(self) -> None:
        self.blocks = {0: bytes(BS)}

    def read(self, block: int, count: int = 1) -> bytes:
        return b"".join(self.blocks.get(b, bytes(BS)) for b in range(block, block + count))

    def write(self, block: int, data) -> None:
        for i in range(len(data) // BS):
            self.blocks[block + i] = bytes(data[i * BS : (i + 1) * BS])


def _mask(units: set[int]) -> bytearray:
    m = bytearray(BS)
    for u in units:
        m[u >> 3] |= 1 << (u & 7)
    return m


def test_allocator_never_hands_out_held_units():
    alloc = ExtentAllocator(_Bits(), 0, 1000)
    used = alloc.allocate(100)
    assert used == [(0, 100)]
    alloc.set_held(_mask(set(range(0, 100)) | {500, 501}))
    assert alloc.free_count == 900 - 2
    alloc.free(10, 20)  # freed in the bitmap, still held: not free to hand out
    assert not alloc.is_used(15)
    assert alloc.free_count == 898
    got = alloc.allocate(898)
    units = {s + i for s, n in got for i in range(n)}
    assert not units & (set(range(10, 30)) | {500, 501})
    with pytest.raises(AllocatorError, match="already free"):
        alloc.free(12, 1)  # a double free of a held unit is still a double free
    alloc.check()
    assert list(alloc.used_runs())[0] == (0, 10)  # the bitmap's view: held-free is free
    alloc.set_held(None)  # the checkpoint is gone: what only it held is free again
    assert alloc.free_count == 22
    alloc.check(against_io=True)
    alloc.mark_used(10, 20)
    alloc.check(against_io=True)


def _digest(fs: Filesystem) -> dict[bytes, str]:
    out = {}
    for name, attr, _ in fs.readdir(R, 0):
        if name not in (b".", b".."):
            out[name] = hashlib.sha256(fs.read(attr.ino, 0, attr.size + 1)).hexdigest()
    return out


_OP = st.tuples(
    st.sampled_from(["write", "write", "write", "truncate", "create", "unlink", "ck", "del"]),
    st.integers(0, 3),
    st.integers(0, 3 * MiB),
    st.sampled_from([1, 100, BS, 5 * BS, REDIRECT_MIN * BS, 300_000, MiB]),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(_OP, min_size=5, max_size=40), seed=st.integers(0, 2**32 - 1))
def test_random_operations_keep_every_checkpoint_exact(tmp_path_factory, ops, seed):
    tmp = tmp_path_factory.mktemp("row")
    vol, fs = _volume(tmp, size=48 * MiB, space=0.1)
    rnd = random.Random(seed)
    recorded: dict[str, dict[bytes, str]] = {}
    model: dict[bytes, bytearray] = {}  # the live files as they must read
    n = 0
    try:
        for f in range(2):
            model[b"f%d" % f] = bytearray(os.urandom(MiB))
            _mkfile(fs, b"f%d" % f, bytes(model[b"f%d" % f]))
        vol.commit()
        for op, f, off, size in ops:
            name = b"f%d" % f
            exists = name in model
            try:
                if op == "write" and exists:
                    data = rnd.randbytes(size)
                    fs.write(fs.lookup(R, name).ino, off, data)
                    m = model[name]
                    m.extend(bytes(max(0, off - len(m))))
                    m[off : off + size] = data
                elif op == "truncate" and exists:
                    fs.setattr(fs.lookup(R, name).ino, SetAttr(size=off))
                    m = model[name]
                    del m[off:]
                    m.extend(bytes(off - len(m)))
                elif op == "create" and not exists:
                    data = rnd.randbytes(size)
                    _mkfile(fs, name, data)
                    model[name] = bytearray(data)
                elif op == "unlink" and exists:
                    fs.unlink(R, name)
                    del model[name]
                elif op == "ck" and len(recorded) < 4:
                    n += 1
                    vol.commit()
                    vol.checkpoint_create(f"c{n}")
                    recorded[f"c{n}"] = _digest(fs)
                elif op == "del" and recorded:
                    victim = rnd.choice(sorted(recorded))
                    vol.checkpoint_delete(victim)
                    del recorded[victim]
            except OSError as exc:  # never expected: the volume has room for all of it
                raise AssertionError(f"{op} {name!r}: {exc}") from exc
            vol.commit()
            for name, m in model.items():
                assert _read(fs, name) == bytes(m), name
            for ck, tree in recorded.items():
                assert _digest(Filesystem(vol.checkpoint_view(ck), read_only=True)) == tree, ck
        vol.allocator.check(against_io=True)
        vol.flush_in_place()
        for ck, tree in recorded.items():  # as another process reads the block file
            raw = CheckpointView(vol.device.read, vol.sb, ck)
            assert _digest(Filesystem(raw, read_only=True)) == tree, ck
        report = fsck.check(vol)
        assert report.clean, report.problems
    finally:
        fs.close()
        vol.close()


def test_a_move_that_could_run_out_of_save_slots_is_refused_up_front(tmp_path):
    """Moving a file's data rewrites bitmap blocks that the checkpoint holds, and each
    needs a saved copy once: with 512-byte blocks, a file spread over many bitmap regions
    and the save area nearly full, the write gets ENOSPC before it changes anything
    (not half-way, which would commit a half-moved file)."""
    bs = 512
    path = str(tmp_path / "vol")
    Volume.create(path, 64 * MiB, block_size=bs, checkpoint_space=0.002)
    vol = Volume.open(path)
    Filesystem.format(vol, inode_count=400, uid=0, gid=0)
    fs = Filesystem(vol)
    f = fs.create(R, b"F", 0o100644, 0, 0).ino
    for i in range(24):  # F's extents interleaved with 2 MiB spacers: one per bitmap region
        _mkfile(fs, b"s%d" % i, b"s" * (2 * MiB - 8192))
        fs.write(f, fs.getattr(f).size, os.urandom(16 * bs))
    spare = [fs.create(R, b"m%d" % i, 0o100644, 0, 0).ino for i in range(150)]
    vol.commit()
    vol.checkpoint_create("c")
    snaps = vol.snapshots
    assert snaps is not None
    k = 0
    while snaps.free_slot_count > 40:  # small overwrites of the spacers save blocks
        spacer = fs.lookup(R, b"s%d" % (k % 24)).ino
        fs.write(spacer, (k // 24) * bs * 3, b"z" * bs)
        vol.commit()
        k += 1
    for ino in spare:  # each chmod saves an inode-table block: down to 18 free slots
        if snaps.free_slot_count <= 18:
            break
        fs.setattr(ino, SetAttr(mode=0o100600))
        vol.commit()
    assert snaps.free_slot_count <= 18
    size = fs.getattr(f).size
    old = _read(fs, b"F")
    blocks = fs.inodes.get(f).blocks
    with pytest.raises(OSError) as ei:
        fs.write(f, 0, os.urandom(size))
    assert ei.value.errno == 28
    assert fs.inodes.get(f).blocks == blocks
    assert _read(fs, b"F") == old
    vol.commit()
    vol.allocator.check(against_io=True)
    report = fsck.check(vol)
    assert report.clean, report.problems
    assert _read(Filesystem(vol.checkpoint_view("c"), read_only=True), b"F") == old
    fs.close()
    vol.close()


def test_a_checkpoint_of_uncommitted_changes_is_refused(tmp_path):
    vol, fs = _volume(tmp_path)
    _mkfile(fs, b"f", b"x" * BS)
    assert vol.snapshots is not None
    with pytest.raises(CheckpointError, match="commit first"):
        vol.snapshots.create("c")
    vol.commit()
    vol.checkpoint_create("c")  # the volume's own create commits first
    fs.close()
    vol.close()
