"""Extended attributes on a real volume: one block per inode, limits, freeing."""

from __future__ import annotations

import errno

import pytest

from mirrorfs.fs.filedata import FileData
from mirrorfs.fs.filesystem import FsError
from mirrorfs.fs.inodes import InodeTable, format_layout, read_super
from mirrorfs.fs.xattrs import XATTR_CREATE, XATTR_REPLACE, XattrStore
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
    room = vol.block_size - 16 - 6 - 255 - 1  # what one block holds after the first entry
    assert err(xs.set, f, b"user.fill", bytes(room)) == errno.ENOSPC
    xs.set(f, b"user.fill", bytes(room - 6 - len(b"user.fill")))
    assert err(xs.set, f, b"user.x", b"") == errno.ENOSPC
    assert xs.list(f) == [b"n" * 255, b"user.fill"]
    before = vol.allocator.free_count
    xs.free(f)
    assert f.xattr_block == 0 and f.blocks == 0
    assert vol.allocator.free_count == before + 1


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
