"""Directories: record format, stable cookies, space reuse, the index, large directories."""

from __future__ import annotations

import random
import stat
import time

import pytest

from mirrorfs.fs import fsck
from mirrorfs.fs.directories import (
    REC,
    DirCorrupt,
    empty_block,
    parse_block,
    rec_size,
    scan_room,
)
from mirrorfs.fs.filesystem import ROOT_INO, Filesystem, FsError
from mirrorfs.store.txn import HintKind
from mirrorfs.store.volume import Volume

MiB = 1 << 20
R = ROOT_INO
BS = 4096


def make_fs(tmp_path, size=64 * MiB, inodes=5000) -> Filesystem:
    path = str(tmp_path / "vol")
    Volume.create(path, size)
    vol = Volume.open(path)
    Filesystem.format(vol, inode_count=inodes)
    return Filesystem(vol)


@pytest.fixture
def fs(tmp_path):
    f = make_fs(tmp_path)
    yield f
    f.close()
    f.volume.close()


def touch(fs: Filesystem, parent: int, name: bytes) -> int:
    ino = fs.mknod(parent, name, stat.S_IFREG | 0o644, 0, 0, 0).ino
    fs.forget(ino, 1)
    return ino


def listing(fs: Filesystem, d: int, cookie: int = 0) -> list[tuple[bytes, int, int]]:
    return [(n, a.ino, c) for n, a, c in fs.readdir(d, cookie)]


def blocks_written(fs: Filesystem, op) -> int:
    """Distinct blocks that ``op`` adds to a freshly committed transaction."""
    fs.volume.commit()
    assert fs.volume.pending_bytes == 0
    op()
    return fs.volume.pending_bytes // fs.volume.block_size


# --------------------------------------------------------------------------- format


def test_record_format_roundtrip():
    assert rec_size(1) == 12 and rec_size(4) == 12 and rec_size(5) == 16 and rec_size(255) == 264
    buf = bytearray(empty_block(BS))
    recs = parse_block(buf)
    assert len(recs) == 1 and recs[0].ino == 0 and recs[0].rec_len == BS
    REC.pack_into(buf, 0, 7, 12, 3, 8)
    buf[8:11] = b"abc"
    REC.pack_into(buf, 12, 0, BS - 12, 0, 0)
    recs = parse_block(buf)
    assert [(r.ino, r.name, r.dtype, r.offset) for r in recs] == [
        (7, b"abc", 8, 0),
        (0, b"", 0, 12),
    ]


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: REC.pack_into(b, 0, 7, 0, 3, 8),  # zero record length
        lambda b: REC.pack_into(b, 0, 7, 13, 3, 8),  # unaligned
        lambda b: REC.pack_into(b, 0, 7, BS + 4, 3, 8),  # past the block
        lambda b: REC.pack_into(b, 0, 7, 12, 0, 8),  # empty name in use
        lambda b: REC.pack_into(b, 0, 7, 12, 200, 8),  # name longer than record
        lambda b: b.__setitem__(slice(8, 9), b"/"),  # slash in name
    ],
)
def test_parse_rejects_damage(damage):
    buf = bytearray(empty_block(BS))
    REC.pack_into(buf, 0, 7, 12, 3, 8)
    buf[8:11] = b"abc"
    REC.pack_into(buf, 12, 0, BS - 12, 0, 0)
    damage(buf)
    with pytest.raises(DirCorrupt):
        parse_block(buf)


@pytest.mark.log_expected(r"is damaged")
def test_damaged_directory_is_eio_not_a_crash(fs):
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    touch(fs, d, b"x")
    dinode = fs.inodes.get(d)
    (pblk, _), *_ = [r for r in fs.data.runs(dinode)]
    fs.volume.write(pblk, bytes(BS))  # all zeros: record length 0
    fs.dirs.clear()
    with pytest.raises(FsError) as ei:
        fs.lookup(d, b"x")
    assert ei.value.errno == 5
    with pytest.raises(FsError):
        list(fs.readdir(d, 0))


# ----------------------------------------------------------------------- store level


def test_removal_merges_and_space_is_reused(fs):
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    names = [b"entry-%04d" % i for i in range(600)]
    for n in names:
        touch(fs, d, n)
    size = fs.getattr(d).size
    assert size == 3 * BS
    rng = random.Random(1)
    gone = rng.sample(names, 300)
    for n in gone:
        fs.unlink(d, n)
    for n in gone:
        touch(fs, d, n + b"x")  # same length + 1: still fits in the freed space
    assert fs.getattr(d).size == size
    for n in names:
        if n not in gone:
            fs.unlink(d, n)
    for n in gone:
        fs.unlink(d, n + b"x")
    dinode = fs.inodes.get(d)
    # every block is back to one free record
    for b in range(size // BS):
        recs = parse_block(fs.data.read(dinode, b * BS, BS))
        assert [(r.ino, r.rec_len) for r in recs] == [(0, BS)]
    fs.rmdir(R, b"d")


def test_entries_never_move(fs):
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    for i in range(400):
        touch(fs, d, b"n%d" % i)
    before = {n: c for n, _, c in listing(fs, d)[2:]}
    for i in range(0, 400, 3):
        fs.unlink(d, b"n%d" % i)
    for i in range(100):
        touch(fs, d, b"new%d" % i)
    after = {n: c for n, _, c in listing(fs, d)[2:]}
    for n, c in after.items():
        if n in before:
            assert before[n] == c


def test_readdir_cookies_stable_under_changes(fs):
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    for i in range(2000):
        touch(fs, d, b"f%05d" % i)
    present_before = {b"f%05d" % i for i in range(2000)}
    rng = random.Random(7)
    seen: list[bytes] = []
    cookie = 0
    removed: set[bytes] = set()
    added: set[bytes] = set()
    step = 0
    while True:
        batch = []
        for name, _, nxt in fs.readdir(d, cookie):
            batch.append(name)
            cookie = nxt
            if len(batch) == 150:
                break
        if not batch:
            break
        seen.extend(batch)
        # between two readdir calls, the directory changes under the reader
        for n in rng.sample(sorted(present_before - removed), 40):
            fs.unlink(d, n)
            removed.add(n)
        for _ in range(40):
            n = b"g%05d" % step
            step += 1
            touch(fs, d, n)
            added.add(n)
    real = [n for n in seen if n not in (b".", b"..")]
    assert len(real) == len(set(real)), "an entry was returned twice"
    kept = present_before - removed
    assert kept <= set(real), "an entry present throughout was missed"
    assert seen[:2] == [b".", b".."]


def test_readdir_resume_from_every_cookie(fs):
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    for i in range(300):
        touch(fs, d, b"x%d" % i)
    full = listing(fs, d)
    for k in range(len(full)):
        rest = listing(fs, d, full[k][2])
        assert rest == full[k + 1 :]


def test_dotdot_and_types_in_readdir(fs):
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    sub = fs.mkdir(d, b"sub", 0o755, 0, 0).ino
    fs.symlink(d, b"l", b"t", 0, 0)
    got = {n: a for n, a, _ in fs.readdir(sub, 0)}
    assert got[b"."].ino == sub and got[b".."].ino == d
    got = {n: a for n, a, _ in fs.readdir(d, 0)}
    assert stat.S_ISDIR(got[b"sub"].mode) and stat.S_ISLNK(got[b"l"].mode)


def test_index_lru_is_bounded_and_correct(fs):
    fs.dirs.cache_entries = 250
    dirs = [fs.mkdir(R, b"d%d" % i, 0o755, 0, 0).ino for i in range(5)]
    for d in dirs:
        for i in range(100):
            touch(fs, d, b"e%d" % i)
    assert fs.dirs.cached_entries <= 250 + 100
    for d in dirs:
        assert fs.lookup(d, b"e57").ino > 0
        fs.unlink(d, b"e3")
    assert fs.dirs.cached_entries <= 250 + 100
    for d in dirs:
        assert len(listing(fs, d)) == 2 + 99


def test_entries_persist_and_hints(tmp_path):
    fs = make_fs(tmp_path)
    vol = fs.volume
    vol.commit()
    ino = touch(fs, R, b"hello")
    added = [h for h in vol._hints if h.kind == HintKind.ENTRY_ADDED]
    assert [(h.ino, h.parent, h.name) for h in added] == [(ino, R, b"hello")]
    vol.commit()
    fs.unlink(R, b"hello")
    removed = [h for h in vol._hints if h.kind == HintKind.ENTRY_REMOVED]
    assert [(h.ino, h.parent, h.name) for h in removed] == [(ino, R, b"hello")]
    touch(fs, R, b"stays")
    path = vol.path
    fs.close()
    vol.close()
    vol = Volume.open(path)
    fs = Filesystem(vol)
    assert [n for n, _, _ in listing(fs, R)] == [b".", b"..", b"stays"]
    fs.close()
    vol.close()


def test_room_map_stays_exact_under_random_adds_and_removes(fs):
    """The per-block room and hint that removal updates without a walk match a full scan of
    the block after every change (names of many lengths, removals in random order)."""
    rnd = random.Random(8)
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    present: list[bytes] = []
    for step in range(1500):
        if present and (rnd.random() < 0.45 or len(present) > 300):
            name = present.pop(rnd.randrange(len(present)))
            fs.unlink(d, name)
        else:
            name = b"%d-" % step + b"x" * rnd.choice([1, 5, 30, 100, 250])
            touch(fs, d, name)
            present.append(name)
        assert_rooms_exact(fs, d, step)
    assert sorted(n for n, _, _ in listing(fs, d)[2:]) == sorted(present)


def assert_rooms_exact(fs: Filesystem, d: int, where) -> None:
    dinode = fs.inodes.get(d)
    idx = fs.dirs._index(dinode)
    for block in range(len(idx.room)):
        buf = fs.dirs._read_block(dinode, idx, block)
        assert (idx.room[block], idx.hint[block]) == scan_room(buf), (where, block)


def test_room_map_after_removals_at_the_front_and_exact_fits(fs):
    """The cases a random run reaches only by chance: the first record of a block removed
    (it becomes a free record), then the one after it (merged into that free record); and
    an insertion that fills the only slack exactly."""
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    names = [b"n%03d-" % i + b"y" * 51 for i in range(120)]  # 64-byte records
    for name in names:
        touch(fs, d, name)
    assert_rooms_exact(fs, d, "filled")
    idx = fs.dirs._index(fs.inodes.get(d))
    assert idx.room[0] == 0  # 64 records fill the first block exactly: no slack in it
    fs.unlink(d, names[0])
    assert_rooms_exact(fs, d, "first removed")
    fs.unlink(d, names[1])
    assert_rooms_exact(fs, d, "second merged into the free first")
    touch(fs, d, b"z" * 100)
    assert_rooms_exact(fs, d, "reused")
    # Fill the one slack of a block exactly: the room left is 0 and no record has slack.
    # (Long names first, until the tail slack of the last block fits one name.)
    for i in range(20):
        idx = fs.dirs._index(fs.inodes.get(d))
        last = len(idx.room) - 1
        if idx.hint[last] >= 0 and rec_size(1) <= idx.room[last] <= rec_size(255):
            break
        touch(fs, d, b"%02d" % i + b"L" * 198)
    else:
        raise AssertionError("no block with one small slack")
    before = len(idx.room)
    touch(fs, d, b"e" * (idx.room[last] - REC.size))
    idx = fs.dirs._index(fs.inodes.get(d))
    assert len(idx.room) == before and idx.room[last] == 0 and idx.hint[last] == -1
    assert_rooms_exact(fs, d, "exact fit")


def test_cost_of_one_create_and_unlink(fs):
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    for i in range(200):
        touch(fs, d, b"f%d" % i)
    assert blocks_written(fs, lambda: touch(fs, d, b"one more")) <= 5
    assert blocks_written(fs, lambda: fs.unlink(d, b"f100")) <= 4
    assert blocks_written(fs, lambda: fs.rename(d, b"f101", d, b"renamed")) <= 3


# ------------------------------------------------------------------ large directory


def test_directory_of_100k_entries(tmp_path):
    fs = make_fs(tmp_path, size=128 * MiB, inodes=2000)
    vol = fs.volume
    try:
        d = fs.mkdir(R, b"big", 0o755, 0, 0).ino
        # 100,000 names: hard links to two files (each below LINK_MAX), which exercises the
        # directory exactly as files would without 100,000 inode allocations.
        targets = [touch(fs, R, b"t0"), touch(fs, R, b"t1")]
        for i in range(100_000):
            fs.link(targets[i & 1], d, b"file-%06d" % i)
            fs.forget(targets[i & 1], 1)
            if i % 20_000 == 19_999:
                vol.commit()
        vol.commit()
        assert fs.getattr(targets[0]).nlink == 50_001
        size = fs.getattr(d).size
        assert size < 3 * MiB
        # creating files in it is fast and writes a handful of blocks
        t0 = time.perf_counter()
        for i in range(500):
            touch(fs, d, b"new-%d" % i)
        assert time.perf_counter() - t0 < 5.0
        assert blocks_written(fs, lambda: touch(fs, d, b"counted")) <= 6
        assert blocks_written(fs, lambda: fs.unlink(d, b"file-050000")) <= 4
        # lookup, from a cold index too
        assert fs.lookup(d, b"file-099999").ino == targets[1]
        fs.dirs.clear()
        t0 = time.perf_counter()
        assert fs.lookup(d, b"file-012345").ino == targets[1]
        assert time.perf_counter() - t0 < 3.0
        assert fs.dirs.count(fs.inodes.get(d)) == 100_000 - 1 + 501
        vol.commit()
        # readdir sees every name once
        names = [n for n, _, _ in fs.readdir(d, 0)]
        assert len(names) == len(set(names)) == 2 + 100_000 - 1 + 501
        for ino, n in list(fs._refs.items()):
            fs.forget(ino, n)
        vol.commit()
        t0 = time.perf_counter()
        report = fsck.check(vol)
        assert report.clean, report.describe()
        assert time.perf_counter() - t0 < 5.0
    finally:
        fs.close()
        vol.close()
