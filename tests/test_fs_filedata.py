"""File data on a real volume: writes, reads, holes, truncate, fallocate, extents, costs."""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirrorfs.fs.extents import UNWRITTEN
from mirrorfs.fs.filedata import FileData
from mirrorfs.fs.filesystem import MAX_FILE_SIZE, FsError
from mirrorfs.fs.inodes import InodeTable, format_layout, read_super
from mirrorfs.fs.layout import FLAG_INLINE_DATA, Inode
from mirrorfs.store.volume import Volume

TIB = 1 << 40


@dataclass
class Env:
    path: str
    vol: Volume
    table: InodeTable
    fd: FileData

    def new_file(self) -> Inode:
        return self.table.allocate(0o100644, 0, 0, 1)

    def reopen(self) -> None:
        self.vol.close()
        self.vol = Volume.open(self.path)
        self.table = InodeTable(self.vol, read_super(self.vol))
        self.fd = FileData(self.vol, self.table)


def make_env(path, size: int, block_size: int = 4096) -> Env:
    Volume.create(str(path), size, block_size=block_size)
    vol = Volume.open(str(path))
    table = InodeTable(vol, format_layout(vol, 64))
    vol.commit()
    return Env(str(path), vol, table, FileData(vol, table))


@pytest.fixture
def env(tmp_path):
    e = make_env(tmp_path / "vol", 64 << 20)
    yield e
    e.vol.close()


@pytest.fixture
def env512(tmp_path):
    e = make_env(tmp_path / "vol512", 64 << 20, block_size=512)
    yield e
    e.vol.close()


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def charged(env: Env, inode: Inode) -> int:
    return sum(n for _, n in env.fd.runs(inode))


class WriteCounter:
    """Wraps volume.write/read on the instance to count calls and blocks."""

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self.writes: list[tuple[int, int]] = []
        self.reads = 0
        self._write, self._read = vol.write, vol.read

        def write(block, data):
            self.writes.append((block, len(data) // vol.block_size))
            return self._write(block, data)

        def read(block, count=1):
            self.reads += 1
            return self._read(block, count)

        vol.write, vol.read = write, read

    def reset(self) -> None:
        self.writes.clear()
        self.reads = 0

    def close(self) -> None:
        del self.vol.write, self.vol.read


# ----------------------------------------------------------------------------- model test

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 70_000), st.integers(1, 12_000)),
        st.tuples(st.just("truncate"), st.integers(0, 80_000)),
        st.tuples(
            st.just("fallocate"), st.integers(0, 70_000), st.integers(1, 12_000), st.booleans()
        ),
        st.tuples(st.just("noise"), st.integers(0, 200)),
    ),
    max_size=14,
)


def run_model(env: Env, ops) -> None:
    alloc = env.vol.allocator
    start_free = alloc.free_count
    f, noise = env.new_file(), env.new_file()
    model = bytearray()
    for i, op in enumerate(ops):
        shrunk = False
        if op[0] == "write":
            _, off, n = op
            data = pattern(i * 7919 + off, n)
            assert env.fd.write(f, off, data) == n
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + n] = data
        elif op[0] == "truncate":
            _, size = op
            shrunk = size <= len(model)
            env.fd.truncate(f, size)
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))
        elif op[0] == "fallocate":
            _, off, n, keep = op
            env.fd.fallocate(f, off, n, keep)
            if not keep and off + n > len(model):
                model.extend(bytes(off + n - len(model)))
        else:  # interleave another file's blocks to fragment the free space
            env.fd.write(noise, op[1] * env.vol.block_size, b"n" * 100)
        assert f.size == len(model)
        eof_block = -(-f.size // env.vol.block_size)
        for e in env.fd.extents(f):  # only unwritten (fallocated) blocks may lie past EOF
            assert e.end <= eof_block or (e.flags & UNWRITTEN and not shrunk)
        assert env.fd.read(f, 0, len(model) + 10) == bytes(model)
        assert charged(env, f) == f.blocks
        if model:
            a = (i * 4099) % len(model)
            assert env.fd.read(f, a, 5000) == bytes(model[a : a + 5000])
            # Inside one block, and from an unaligned offset to EOF (one extent or several).
            assert env.fd.read(f, a, 1) == bytes(model[a : a + 1])
            assert env.fd.read(f, a, len(model) - a) == bytes(model[a:])
    env.table.put(f)
    assert env.table.get(f.ino) is f
    for inode in (f, noise):
        env.fd.free_all(inode)
        assert inode.blocks == 0
        env.table.release(inode)
    assert alloc.free_count == start_free
    alloc.check(against_io=True)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_model_4k(env, ops):
    run_model(env, ops)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_model_512(env512, ops):
    run_model(env512, ops)


# ------------------------------------------------------------------------ specific cases


def test_holes_and_tail_zeroing(env):
    f = env.new_file()
    env.fd.write(f, 10_000, b"a" * 5000)
    assert f.size == 15_000
    assert env.fd.read(f, 0, 10_000) == bytes(10_000)
    assert f.blocks == 2  # blocks 2 and 3 only: 0 and 1 are a hole
    env.fd.truncate(f, 12_345)
    env.fd.truncate(f, 20_000)
    assert env.fd.read(f, 10_000, 10_000) == b"a" * 2345 + bytes(20_000 - 12_345)
    env.fd.truncate(f, 0)
    assert f.blocks == 0 and f.size == 0 and env.fd.read(f, 0, 100) == b""


def test_fallocate_then_write_converts(env):
    f = env.new_file()
    env.fd.fallocate(f, 0, 64 * 1024, keep_size=False)
    assert f.size == 64 * 1024 and f.blocks == 16
    assert env.fd.read(f, 0, 1 << 20) == bytes(64 * 1024)
    assert all(e.flags & UNWRITTEN for e in env.fd.extents(f))
    env.fd.write(f, 5000, b"x" * 100)
    assert f.blocks == 16
    written = [e for e in env.fd.extents(f) if not e.flags & UNWRITTEN]
    assert [(e.lblk, e.length) for e in written] == [(1, 1)]
    assert env.fd.read(f, 0, 1 << 20) == bytes(5000) + b"x" * 100 + bytes(64 * 1024 - 5100)
    # KEEP_SIZE allocates past EOF without changing the size; reads there stay empty.
    env.fd.fallocate(f, 64 * 1024, 8192, keep_size=True)
    assert f.size == 64 * 1024 and f.blocks == 18
    env.fd.write(f, 64 * 1024 + 10, b"y")
    assert env.fd.read(f, 64 * 1024, 100) == bytes(10) + b"y"
    # Truncating to the current size drops what lies past EOF.
    env.fd.truncate(f, f.size)
    assert f.blocks == 17 and charged(env, f) == 17


def test_sparse_far_offsets_and_efbig(env):
    alloc = env.vol.allocator
    f = env.new_file()
    env.fd.write(f, TIB, b"z" * 4096)
    assert f.size == TIB + 4096 and f.blocks <= 2
    assert env.fd.read(f, TIB - 10, 20) == bytes(10) + b"z" * 10
    env.fd.write(f, MAX_FILE_SIZE - 1, b"!")
    assert f.size == MAX_FILE_SIZE and f.blocks <= 4
    assert env.fd.read(f, MAX_FILE_SIZE - 2, 10) == b"\0!"
    assert charged(env, f) == f.blocks
    before = (alloc.free_count, f.size, f.blocks, f.extent_area)
    with pytest.raises(FsError) as e:
        env.fd.write(f, MAX_FILE_SIZE, b"x")
    assert e.value.errno == errno.EFBIG
    for bad in (MAX_FILE_SIZE + 1, 999_999_999_999_999):
        with pytest.raises(FsError) as e:
            env.fd.truncate(f, bad)
        assert e.value.errno == errno.EFBIG
    with pytest.raises(FsError) as e:
        env.fd.fallocate(f, MAX_FILE_SIZE - 4096, 8192, keep_size=False)
    assert e.value.errno == errno.EFBIG
    assert (alloc.free_count, f.size, f.blocks, f.extent_area) == before
    # A write across the limit is cut short at it, as on Linux.
    g = env.new_file()
    assert env.fd.write(g, MAX_FILE_SIZE - 10, b"q" * 100) == 10
    env.fd.truncate(f, 0)
    env.fd.free_all(g)
    assert f.blocks == 0 and g.blocks == 0


def test_enospc_changes_nothing(tmp_path):
    env = make_env(tmp_path / "small", 1 << 20)  # 256 blocks of 4 KiB
    try:
        alloc = env.vol.allocator
        f = env.new_file()
        chunk = pattern(1, 64 * 1024)
        with pytest.raises(FsError) as e:
            while True:
                env.fd.write(f, f.size, chunk)
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(FsError) as e:
            while True:
                env.fd.write(f, f.size, chunk[:4096])
        assert e.value.errno == errno.ENOSPC
        assert alloc.free_count <= 3  # what is left is the reserve for extent nodes
        env.fd.truncate(f, f.size - 3 * 4096 - 100)  # free a few blocks, leave a tail
        env.fd.truncate(f, f.size + 50_000)  # a hole at the end
        snap = (alloc.free_count, f.size, f.blocks, f.extent_area)
        content = env.fd.read(f, 0, f.size)
        for attempt in (
            lambda: env.fd.write(f, f.size - 50_000, bytes(50_000)),
            lambda: env.fd.write(f, f.size + 1_000_000, b"x" * 20_000),
            lambda: env.fd.fallocate(f, 0, f.size + (1 << 20), keep_size=False),
        ):
            with pytest.raises(FsError) as e:
                attempt()
            assert e.value.errno == errno.ENOSPC
            assert (alloc.free_count, f.size, f.blocks, f.extent_area) == snap
            assert env.fd.read(f, 0, f.size) == content
        alloc.check(against_io=True)
    finally:
        env.vol.close()


def test_fragmented_file_many_extents(env512):
    """Two files written block by block in turn: thousands of extents each, deep trees."""
    env = env512
    alloc = env.vol.allocator
    start_free = alloc.free_count
    bs = env.vol.block_size
    a, b = env.new_file(), env.new_file()
    n = 2500
    for i in range(n):
        env.fd.write(a, i * bs, pattern(i, bs))
        env.fd.write(b, i * bs, pattern(-i - 1, bs))
    assert len(env.fd.extents(a)) > n // 2
    assert env.fd.tree.depth(a) >= 2
    for f in (a, b):
        assert charged(env, f) == f.blocks > n
        env.table.put(f)
    ino_a, ino_b = a.ino, b.ino
    del a, b
    env.vol.commit()
    env.reopen()  # everything comes back from the blocks
    a, b = env.table.get(ino_a), env.table.get(ino_b)
    alloc = env.vol.allocator
    got = env.fd.read(a, 0, n * bs)
    assert got == b"".join(pattern(i, bs) for i in range(n))
    assert env.fd.read(b, 777 * bs + 3, bs) == (pattern(-778, bs) + pattern(-779, bs))[3 : bs + 3]
    # Overwriting one block in the middle of a fragmented file writes that block only.
    counter = WriteCounter(env.vol)
    env.fd.write(a, 1234 * bs, b"w" * bs)
    assert [n for _, n in counter.writes] == [1]
    counter.close()
    env.fd.truncate(a, 1000 * bs + 7)
    assert charged(env, a) == a.blocks
    assert max(e.end for e in env.fd.extents(a)) == 1001
    assert a.blocks == 1001 + len(list(env.fd.tree.node_blocks(a)))
    assert env.fd.read(a, 999 * bs, 2 * bs) == pattern(999, bs) + pattern(1000, bs)[:7]
    env.fd.free_all(a)
    env.fd.free_all(b)
    assert a.blocks == 0 and b.blocks == 0
    assert alloc.free_count == start_free
    alloc.check(against_io=True)


def test_large_aligned_write_moves_runs(env):
    vol = env.vol
    f = env.new_file()
    data = pattern(5, 1 << 20)
    counter = WriteCounter(vol)
    try:
        env.fd.write(f, 0, data)
        assert len(counter.writes) <= 4
        assert max(n for _, n in counter.writes) == 256
        counter.reset()
        assert env.fd.read(f, 0, 1 << 20) == data
        assert counter.reads <= 2
        counter.reset()
        env.fd.write(f, 0, data[::-1])  # pure overwrite: the data run, no metadata
        assert len(counter.writes) == 1
        counter.reset()
        env.fd.write(f, 3 << 20, data)  # past a hole
        assert len(counter.writes) <= 4
        counter.reset()
        env.fd.write(f, 512 * 1024 + 100, b"m" * 4096)  # unaligned: two partial blocks
        assert len(counter.writes) == 2 and counter.writes[0][1] == 1
    finally:
        counter.close()
    assert f.blocks == 512 and charged(env, f) == 512


def test_symlinks_inline_and_block(env):
    short, long_ = env.new_file(), env.new_file()
    env.fd.write_symlink(short, b"../target")
    assert short.flags & FLAG_INLINE_DATA and short.blocks == 0
    env.fd.write_symlink(long_, b"x/" * 300)
    assert long_.blocks == 1
    env.table.put(short)
    env.table.put(long_)
    ino_s, ino_l = short.ino, long_.ino
    del short, long_
    env.reopen()
    assert env.fd.read_symlink(env.table.get(ino_s)) == b"../target"
    assert env.fd.read_symlink(env.table.get(ino_l)) == b"x/" * 300
    s = env.table.get(ino_s)
    assert list(env.fd.runs(s)) == []
    env.fd.free_all(s)
    assert s.size == 0 and not s.flags & FLAG_INLINE_DATA
