"""Extended attributes on a real volume: one block per inode, limits, freeing."""

from __future__ import annotations

import errno

import pytest

from mirrorfs.fs.filedata import FileData
from mirrorfs.fs.filesystem import FsError
from mirrorfs.fs.inodes import InodeTable, format_layout, read_super
from mirrorfs.fs.xattrs import MAX_BLOCKS, XATTR_CREATE, XATTR_REPLACE, XattrStore
from mirrorfs.store.volume import Volume


@pytest.fixture
def fs(tmp_path):
    path = str(tmp_path / "vol")
    Volume.create(path, 16 << 20)
    vol = Volume.open(path)
    table = InodeTable(vol, format_layout(vol, 64))
    yield vol, table, XattrStore(vol, FileData(vol, table))
    vol.close()


def err(fn, *args, **kw) -> int:
    with pytest.raises(FsError) as e:
        fn(*args, **kw)
    return e.value.errno


def test_set_get_list_remove(fs):
    vol, table, xs = fs
    free = vol.allocator.free_count
    f = table.allocate(0o100644, 0, 0, 1)
    assert xs.list(f) == [] and f.xattr_block == 0
    assert err(xs.get, f, b"user.a") == errno.ENODATA
    xs.set(f, b"user.a", b"1")
    xs.set(f, b"user.b", b"")
    xs.set(f, b"security.c", b"\0" * 100)
    assert f.blocks == 1 and vol.allocator.free_count == free - 1
    xs.set(f, b"user.a", b"one")  # replace keeps its place
    assert xs.list(f) == [b"user.a", b"user.b", b"security.c"]
    assert xs.get(f, b"user.a") == b"one" and xs.get(f, b"user.b") == b""
    assert err(xs.set, f, b"user.a", b"x", XATTR_CREATE) == errno.EEXIST
    assert err(xs.set, f, b"user.zz", b"x", XATTR_REPLACE) == errno.ENODATA
    table.put(f)
    vol.commit()
    ino = f.ino
    del f
    vol.close()
    vol = Volume.open(vol.path)
    table = InodeTable(vol, read_super(vol))
    xs = XattrStore(vol)
    f = table.get(ino)
    assert xs.items(f) == [(b"user.a", b"one"), (b"user.b", b""), (b"security.c", b"\0" * 100)]
    xs.remove(f, b"user.b")
    assert err(xs.remove, f, b"user.b") == errno.ENODATA
    xs.remove(f, b"user.a")
    xs.remove(f, b"security.c")
    assert f.xattr_block == 0 and f.blocks == 0 and xs.list(f) == []
    assert vol.allocator.free_count == free
    vol.close()


def test_limits(fs):
    vol, table, xs = fs
    f = table.allocate(0o100644, 0, 0, 1)
    assert err(xs.set, f, b"u." + b"n" * 254, b"v") == errno.ERANGE
    assert err(xs.set, f, b"", b"v") == errno.EINVAL
    xs.set(f, b"n" * 255, b"v")
    assert err(xs.set, f, b"user.big", bytes(vol.block_size)) == errno.E2BIG
    # Each chain block holds one value this big: MAX_BLOCKS of them, then ENOSPC.
    big = vol.block_size - 24 - 6 - 16
    for i in range(MAX_BLOCKS - 1):
        xs.set(f, b"user.fill%05d" % i, bytes(big))
    assert f.blocks == MAX_BLOCKS
    before = vol.allocator.free_count
    assert err(xs.set, f, b"user.one-too-many", bytes(big)) == errno.ENOSPC
    assert vol.allocator.free_count == before and f.blocks == MAX_BLOCKS  # nothing changed
    assert len(xs.list(f)) == MAX_BLOCKS
    xs.free(f)
    assert f.xattr_block == 0 and f.blocks == 0
    assert vol.allocator.free_count == before + MAX_BLOCKS


def test_a_thousand_small_xattrs_chain_and_shrink_back(fs):
    """As the POSIX suites expect of FUSE filesystems: 1,000 9-byte values on one file."""
    vol, table, xs = fs
    f = table.allocate(0o100644, 0, 0, 1)
    free = vol.allocator.free_count
    names = [b"user.attr%04d" % i for i in range(1000)]
    for name in names:
        xs.set(f, name, b"value%04d" % int(name[-4:]))
    assert xs.list(f) == names
    assert xs.get(f, b"user.attr0777") == b"value0777"
    assert 2 <= f.blocks <= MAX_BLOCKS and len(xs.blocks(f)) == f.blocks
    assert vol.allocator.free_count == free - f.blocks
    xs.set(f, b"user.attr0500", b"replaced!")  # keeps its place
    assert xs.list(f)[500] == b"user.attr0500" and xs.get(f, b"user.attr0500") == b"replaced!"
    for name in names[1:]:
        xs.remove(f, name)
    # back to the one-block format of a volume written before chains existed
    assert f.blocks == 1 and xs.list(f) == [names[0]]
    assert vol.read(f.xattr_block)[:4] == (0x52544158).to_bytes(4, "little")
    assert vol.allocator.free_count == free - 1
    xs.remove(f, names[0])
    assert f.xattr_block == 0 and f.blocks == 0 and vol.allocator.free_count == free
    vol.close()


def test_runs_include_xattr_block(fs):
    vol, table, xs = fs
    fd = FileData(vol, table)
    f = table.allocate(0o100644, 0, 0, 1)
    xs.set(f, b"user.k", b"v")
    fd.write(f, 0, b"data")
    assert sum(n for _, n in fd.runs(f)) == f.blocks == 2
    fd.free_all(f)
    assert f.blocks == 1  # the xattr block stays until XattrStore.free
    xs.free(f)
    assert f.blocks == 0
