"""Inode table on a real volume: layout, allocation, persistence, generations, orphans."""

from __future__ import annotations

import errno

import pytest

from mirrorfs.fs.filesystem import FsError
from mirrorfs.fs.inodes import GENERATION_BATCH, InodeTable, format_layout, read_super
from mirrorfs.fs.layout import INODE_SIZE, FsSuper, Inode
from mirrorfs.store.txn import HintKind
from mirrorfs.store.volume import CLIENT_SUPER, Volume


@pytest.fixture
def vol(tmp_path):
    path = str(tmp_path / "vol")
    Volume.create(path, 16 << 20)
    v = Volume.open(path)
    yield v
    v.close()


def reopen(vol: Volume) -> tuple[Volume, InodeTable]:
    vol.close()
    v = Volume.open(vol.path)
    return v, InodeTable(v, read_super(v))


def test_format_layout_and_super_roundtrip(vol):
    free = vol.allocator.free_count
    sb = format_layout(vol, 1000)
    per_block = vol.block_size // INODE_SIZE
    assert sb.inode_count >= 1001 and sb.inode_count % per_block == 0
    assert sb.inode_table_start == sb.inode_bitmap_start + sb.inode_bitmap_blocks
    assert sb.inode_table_blocks * per_block == sb.inode_count
    assert free - vol.allocator.free_count == sb.inode_bitmap_blocks + sb.inode_table_blocks
    assert read_super(vol) == sb
    assert FsSuper.unpack(sb.pack(vol.block_size)) == sb
    table = InodeTable(vol, sb)
    assert table.total == sb.inode_count - 1 and table.free_count == table.total
    bad = bytearray(sb.pack(vol.block_size))
    bad[0] ^= 0xFF
    with pytest.raises(FsError) as e:
        FsSuper.unpack(bytes(bad))
    assert e.value.errno == errno.EUCLEAN and "magic" in str(e.value)
    bad = bytearray(sb.pack(vol.block_size))
    bad[70] ^= 1
    with pytest.raises(FsError, match="checksum"):
        FsSuper.unpack(bytes(bad))


def test_allocate_put_get_release_persist(vol):
    table = InodeTable(vol, format_layout(vol, 100))
    root = table.allocate(0o40755, 0, 0, 123)
    assert root.ino == 1 and root.nlink == 0 and root.generation > 0
    f = table.allocate(0o100600, 1000, 100, 456)
    assert f.ino == 2 and f.generation != root.generation
    assert table.get(2) is f  # one object per inode while it is held
    f.nlink, f.size, f.rdev, f.mtime_ns, f.atime_ns = 3, 1 << 40, 7, -5, 2**62
    table.put(f)
    for bad in (0, 3, 10_000, -1):
        with pytest.raises(FsError) as e:
            table.get(bad)
        assert e.value.errno == errno.ENOENT
    vol.commit()
    vol, table = reopen(vol)
    g = table.get(2)
    assert (g.mode, g.nlink, g.uid, g.gid, g.size, g.rdev, g.mtime_ns, g.atime_ns, g.ctime_ns) == (
        0o100600,
        3,
        1000,
        100,
        1 << 40,
        7,
        -5,
        2**62,
        456,
    )
    assert g.generation == f.generation
    table.release(g)
    with pytest.raises(FsError):
        table.get(2)
    assert table.allocate(0o100644, 0, 0, 1).ino == 2  # lowest free number again
    vol.close()


def test_put_writes_one_block_and_hints(vol):
    table = InodeTable(vol, format_layout(vol, 100))
    f = table.allocate(0o100644, 0, 0, 1)
    vol.commit()
    writes = []
    real = vol.write
    vol.write = lambda b, d: (writes.append((b, len(d))), real(b, d))[1]
    try:
        f.size = 42
        table.put(f)
    finally:
        del vol.write
    assert writes == [(table.sb.inode_table_start, vol.block_size)]
    assert vol._hints[-1].kind == HintKind.INODE_UPDATED and vol._hints[-1].ino == f.ino


def test_generations_never_repeat(vol):
    table = InodeTable(vol, format_layout(vol, 3000))
    gens = []
    for _ in range(GENERATION_BATCH + 10):
        inode = table.allocate(0o100644, 0, 0, 1)
        gens.append(inode.generation)
        table.release(inode)
    assert len(set(gens)) == len(gens)
    vol.commit()
    vol, table = reopen(vol)  # the unused rest of a reserved batch is skipped
    assert table.allocate(0o100644, 0, 0, 1).generation > max(gens)
    vol.close()


def test_enospc_when_full(vol):
    table = InodeTable(vol, format_layout(vol, 10))
    held = [table.allocate(0o100644, 0, 0, 1) for _ in range(table.total)]
    assert table.free_count == 0
    with pytest.raises(FsError) as e:
        table.allocate(0o100644, 0, 0, 1)
    assert e.value.errno == errno.ENOSPC
    assert len({i.ino for i in held}) == table.total


def test_orphan_list(vol):
    table = InodeTable(vol, format_layout(vol, 100))
    a, b, c, d = (table.allocate(0o100644, 0, 0, 1) for _ in range(4))
    for inode in (a, b, c):
        table.add_orphan(inode)
    table.add_orphan(b)  # already there: no change
    assert table.orphans() == [c.ino, b.ino, a.ino]
    table.remove_orphan(b)  # middle
    assert table.orphans() == [c.ino, a.ino]
    table.remove_orphan(d)  # not on the list: no-op
    vol.commit()
    inos = (a.ino, c.ino)
    del a, b, c, d
    vol, table = reopen(vol)
    assert table.orphans() == [inos[1], inos[0]]
    table.remove_orphan(table.get(inos[1]))  # head
    assert table.orphans() == [inos[0]]
    table.release(table.get(inos[0]))  # release takes it off the list
    assert table.orphans() == [] and table.sb.orphan_head == 0
    assert read_super(vol).orphan_head == 0
    vol.close()


def test_inode_pack_roundtrip():
    inode = Inode(ino=77, mode=0o120777, nlink=1, size=12, ctime_ns=-(2**63), blocks=5)
    raw = inode.pack()
    assert len(raw) == INODE_SIZE
    back = Inode.unpack(77, raw)
    assert back.pack() == raw and back.ctime_ns == -(2**63)


def test_client_super_is_block_one(vol):
    sb = format_layout(vol, 10)
    assert FsSuper.unpack(vol.read(CLIENT_SUPER)) == sb
