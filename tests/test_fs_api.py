"""The filesystem API on a real volume (no FUSE): semantics, errno cases, setattr, the
lifecycle of open and unlinked inodes. Timestamps: tests/test_fs_times.py; rename:
tests/test_fs_rename.py."""

from __future__ import annotations

import errno
import stat

import pytest

from mirrorfs.fs import fsck
from mirrorfs.fs.filesystem import (
    LINK_MAX,
    MAX_FILE_SIZE,
    Filesystem,
    FsError,
    SetAttr,
)
from mirrorfs.store.volume import Volume
from tests.fs_util import MiB, R, mkfile, names, new_volume, open_filesystem, raises

vol_path = pytest.fixture(new_volume, name="vol_path")
fs = pytest.fixture(open_filesystem, name="fs")

# ------------------------------------------------------------------------------- basics


def test_format_makes_root(fs):
    a = fs.getattr(R)
    assert stat.S_ISDIR(a.mode) and stat.S_IMODE(a.mode) == 0o755
    assert a.nlink == 2 and a.ino == 1
    assert fs.lookup(R, b".").ino == R
    assert fs.lookup(R, b"..").ino == R
    assert [n for n, _, _ in fs.readdir(R, 0)] == [b".", b".."]


def test_dot_lookup_finds_any_inode_by_number(fs):
    """LOOKUP(ino, ".") is how the kernel serves a file handle of an evicted inode, for
    every file type; a deleted or free inode is ENOENT (the kernel's ESTALE)."""
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    f = mkfile(fs, d, b"f", b"x")
    fs.link(f, R, b"f-link")
    fs.forget(f, 1)
    s = fs.symlink(R, b"s", b"target", 0, 0).ino
    for ino in (d, f, s):
        before = fs.getattr(ino)
        got = fs.lookup(ino, b".")
        assert (got.ino, got.generation, got.mode) == (before.ino, before.generation, before.mode)
        fs.forget(ino, 1)  # the lookup took a reference
    gone = mkfile(fs, R, b"gone")
    fs.unlink(R, b"gone")
    raises(errno.ENOENT, fs.lookup, gone, b".")
    raises(errno.ENOENT, fs.lookup, 1999, b".")  # never allocated
    raises(errno.ENOTDIR, fs.lookup, f, b"..")


def test_create_write_read_and_persist(vol_path):
    vol = Volume.open(vol_path)
    fs = Filesystem(vol)
    ino = mkfile(fs, R, b"f", b"hello world")
    assert fs.read(ino, 0, 100) == b"hello world"
    assert fs.read(ino, 6, 3) == b"wor"
    assert fs.read(ino, 50, 3) == b""
    assert fs.write(ino, None, b"!") == 1  # append
    assert fs.write(ino, 20, b"x") == 1  # gap is zero-filled
    assert fs.read(ino, 0, 100) == b"hello world!" + bytes(8) + b"x"
    fs.close()
    vol.close()
    vol = Volume.open(vol_path)
    fs = Filesystem(vol)
    a = fs.lookup(R, b"f")
    assert a.ino == ino and a.size == 21
    assert fs.read(ino, 0, 100) == b"hello world!" + bytes(8) + b"x"
    fs.close()
    vol.close()


def test_new_inode_owner_and_mode(fs):
    a = fs.create(R, b"f", 0o640, 1000, 1001)
    assert (a.uid, a.gid, a.mode) == (1000, 1001, stat.S_IFREG | 0o640)
    assert a.nlink == 1 and a.size == 0
    d = fs.mkdir(R, b"d", 0o750, 1000, 1001)
    assert d.mode == stat.S_IFDIR | 0o750 and d.nlink == 2
    assert fs.getattr(R).nlink == 3


def test_setgid_directory_inheritance(fs):
    d = fs.mkdir(R, b"d", 0o2775, 1000, 50)
    assert d.mode & stat.S_ISGID
    f = fs.create(d.ino, b"f", 0o644, 1001, 1001)
    assert f.gid == 50 and not f.mode & stat.S_ISGID
    sub = fs.mkdir(d.ino, b"sub", 0o755, 1001, 1001)
    assert sub.gid == 50 and sub.mode & stat.S_ISGID
    n = fs.mknod(sub.ino, b"fifo", stat.S_IFIFO | 0o600, 0, 1001, 1001)
    assert n.gid == 50
    plain = fs.mkdir(R, b"plain", 0o755, 1001, 1001)
    assert fs.create(plain.ino, b"g", 0o644, 1001, 1001).gid == 1001


@pytest.mark.parametrize(
    "fmt,rdev",
    [
        (stat.S_IFREG, 0),
        (stat.S_IFIFO, 0),
        (stat.S_IFCHR, 0x0501),
        (stat.S_IFBLK, 0x0802),
        (stat.S_IFSOCK, 0),
        (0, 0),
    ],
)
def test_mknod_types(fs, fmt, rdev):
    a = fs.mknod(R, b"n", fmt | 0o600, rdev, 0, 0)
    want = fmt or stat.S_IFREG
    assert stat.S_IFMT(a.mode) == want and a.rdev == rdev
    names = {n: at for n, at, _ in fs.readdir(R, 0)}
    assert stat.S_IFMT(names[b"n"].mode) == want


def test_symlink_and_readlink(fs):
    for target in (b"t", b"x" * 160, b"y" * 161, b"z" * 4095):
        a = fs.symlink(R, b"l", target, 0, 0)
        assert stat.S_ISLNK(a.mode) and a.size == len(target)
        assert fs.readlink(a.ino) == target
        fs.unlink(R, b"l")
    raises(errno.ENAMETOOLONG, fs.symlink, R, b"l", b"x" * 4096, 0, 0)
    raises(errno.ENOENT, fs.symlink, R, b"l", b"", 0, 0)
    ino = mkfile(fs, R, b"f")
    raises(errno.EINVAL, fs.readlink, ino)
    raises(errno.EINVAL, fs.readlink, R)


def test_hard_links(fs):
    ino = mkfile(fs, R, b"a", b"data")
    d = fs.mkdir(R, b"d", 0o755, 0, 0)
    a = fs.link(ino, d.ino, b"b")
    assert a.nlink == 2
    assert fs.lookup(d.ino, b"b").ino == ino
    fs.unlink(R, b"a")
    assert fs.getattr(ino).nlink == 1
    assert fs.read(ino, 0, 10) == b"data"
    raises(errno.EPERM, fs.link, d.ino, R, b"dl")
    raises(errno.EEXIST, fs.link, ino, d.ino, b"b")
    raises(errno.ENOENT, fs.link, ino, 999, b"x")
    raises(errno.ENOTDIR, fs.link, ino, ino, b"x")


def test_link_max(fs):
    ino = mkfile(fs, R, b"a")
    node = fs.inodes.get(ino)
    node.nlink = LINK_MAX
    fs.inodes.put(node)
    raises(errno.EMLINK, fs.link, ino, R, b"b")
    root = fs.inodes.get(R)
    root.nlink = LINK_MAX
    fs.inodes.put(root)
    raises(errno.EMLINK, fs.mkdir, R, b"d", 0o755, 0, 0)


# ------------------------------------------------------------------------------- errnos


@pytest.mark.parametrize(
    "op",
    [
        lambda fs, f: fs.create(R, b"f", 0o644, 0, 0),
        lambda fs, f: fs.mkdir(R, b"f", 0o755, 0, 0),
        lambda fs, f: fs.mknod(R, b"f", stat.S_IFIFO | 0o644, 0, 0, 0),
        lambda fs, f: fs.symlink(R, b"f", b"t", 0, 0),
        lambda fs, f: fs.link(f, R, b"f"),
        lambda fs, f: fs.mkdir(R, b".", 0o755, 0, 0),
        lambda fs, f: fs.mkdir(R, b"..", 0o755, 0, 0),
    ],
)
def test_eexist(fs, op):
    f = mkfile(fs, R, b"f")
    raises(errno.EEXIST, op, fs, f)


@pytest.mark.parametrize(
    "op,code",
    [
        (lambda fs, f, d: fs.lookup(R, b"missing"), errno.ENOENT),
        (lambda fs, f, d: fs.unlink(R, b"missing"), errno.ENOENT),
        (lambda fs, f, d: fs.rmdir(R, b"missing"), errno.ENOENT),
        (lambda fs, f, d: fs.rename(R, b"missing", R, b"x"), errno.ENOENT),
        (lambda fs, f, d: fs.getattr(1999), errno.ENOENT),
        (lambda fs, f, d: fs.lookup(f, b"x"), errno.ENOTDIR),
        (lambda fs, f, d: fs.create(f, b"x", 0o644, 0, 0), errno.ENOTDIR),
        (lambda fs, f, d: fs.mkdir(f, b"x", 0o755, 0, 0), errno.ENOTDIR),
        (lambda fs, f, d: list(fs.readdir(f, 0)), errno.ENOTDIR),
        (lambda fs, f, d: fs.rmdir(R, b"f"), errno.ENOTDIR),
        (lambda fs, f, d: fs.unlink(R, b"d"), errno.EISDIR),
        (lambda fs, f, d: fs.read(d, 0, 10), errno.EISDIR),
        (lambda fs, f, d: fs.write(d, 0, b"x"), errno.EISDIR),
        (lambda fs, f, d: fs.setattr(d, SetAttr(size=0)), errno.EISDIR),
        (lambda fs, f, d: fs.rmdir(R, b"."), errno.EINVAL),
        (lambda fs, f, d: fs.rmdir(R, b".."), errno.ENOTEMPTY),
        (lambda fs, f, d: fs.create(R, b"a/b", 0o644, 0, 0), errno.EINVAL),
        (lambda fs, f, d: fs.create(R, b"a\0b", 0o644, 0, 0), errno.EINVAL),
        (lambda fs, f, d: fs.create(R, b"", 0o644, 0, 0), errno.EINVAL),
        (lambda fs, f, d: fs.create(R, b"n" * 256, 0o644, 0, 0), errno.ENAMETOOLONG),
        (lambda fs, f, d: fs.mkdir(R, b"n" * 256, 0o755, 0, 0), errno.ENAMETOOLONG),
        (lambda fs, f, d: fs.lookup(R, b"n" * 256), errno.ENAMETOOLONG),
        (lambda fs, f, d: fs.rename(R, b"f", R, b"n" * 256), errno.ENAMETOOLONG),
        (lambda fs, f, d: fs.mknod(R, b"x", stat.S_IFDIR | 0o755, 0, 0, 0), errno.EPERM),
        (lambda fs, f, d: fs.setattr(f, SetAttr(size=MAX_FILE_SIZE + 1)), errno.EFBIG),
        (lambda fs, f, d: fs.setattr(f, SetAttr(size=999999999999999)), errno.EFBIG),
        (lambda fs, f, d: fs.write(f, MAX_FILE_SIZE, b"x"), errno.EFBIG),
        (lambda fs, f, d: fs.write(f, MAX_FILE_SIZE + 5, b"x"), errno.EFBIG),
        (lambda fs, f, d: fs.fallocate(f, 0, MAX_FILE_SIZE, 10), errno.EFBIG),
        (lambda fs, f, d: fs.fallocate(f, 0x02, 0, 10), errno.EOPNOTSUPP),
        (lambda fs, f, d: fs.fallocate(f, 0, 0, 0), errno.EINVAL),
        (lambda fs, f, d: fs.getxattr(f, b"user.none"), errno.ENODATA),
        (lambda fs, f, d: fs.removexattr(f, b"user.none"), errno.ENODATA),
        (lambda fs, f, d: fs.setxattr(f, b"system.foo", b"v"), errno.EOPNOTSUPP),
        (lambda fs, f, d: fs.setxattr(f, b"other", b"v"), errno.EOPNOTSUPP),
        (lambda fs, f, d: fs.getxattr(f, b"os2.x"), errno.EOPNOTSUPP),
        (lambda fs, f, d: fs.setxattr(f, b"user.", b"v"), errno.EINVAL),
    ],
)
def test_errno(fs, op, code):
    f = mkfile(fs, R, b"f", b"abc")
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    raises(code, op, fs, f, d)


def test_enotempty(fs):
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    mkfile(fs, d, b"x")
    raises(errno.ENOTEMPTY, fs.rmdir, R, b"d")
    fs.unlink(d, b"x")
    fs.rmdir(R, b"d")
    raises(errno.ENOENT, fs.lookup, R, b"d")
    assert fs.getattr(R).nlink == 2


def test_erofs_on_every_change(vol_path):
    vol = Volume.open(vol_path)
    fs = Filesystem(vol)
    f = mkfile(fs, R, b"f", b"abc")
    fs.mkdir(R, b"d", 0o755, 0, 0)
    fs.close()
    vol.close()
    vol = Volume.open(vol_path, read_only=True)
    fs = Filesystem(vol, read_only=True)
    try:
        changes = [
            lambda: fs.create(R, b"n", 0o644, 0, 0),
            lambda: fs.mkdir(R, b"n", 0o755, 0, 0),
            lambda: fs.mknod(R, b"n", stat.S_IFIFO, 0, 0, 0),
            lambda: fs.symlink(R, b"n", b"t", 0, 0),
            lambda: fs.link(f, R, b"n"),
            lambda: fs.unlink(R, b"f"),
            lambda: fs.rmdir(R, b"d"),
            lambda: fs.rename(R, b"f", R, b"g"),
            lambda: fs.setattr(f, SetAttr(mode=0o600)),
            lambda: fs.write(f, 0, b"x"),
            lambda: fs.fallocate(f, 0, 0, 10),
            lambda: fs.setxattr(f, b"user.a", b"v"),
            lambda: fs.removexattr(f, b"user.a"),
        ]
        for change in changes:
            raises(errno.EROFS, change)
        assert fs.read(f, 0, 10) == b"abc"
        assert fs.lookup(R, b"d").nlink == 2
    finally:
        fs.close()
        vol.close()


# ------------------------------------------------------------------------------ setattr


def test_setattr_chmod_chown_utimes(fs):
    a = fs.create(R, b"f", 0o644, 0, 0)
    before = fs.getattr(a.ino)
    a2 = fs.setattr(a.ino, SetAttr(mode=0o4755))
    assert a2.mode == stat.S_IFREG | 0o4755
    assert a2.ctime_ns >= before.ctime_ns and a2.mtime_ns == before.mtime_ns
    a3 = fs.setattr(a.ino, SetAttr(atime_ns=123, mtime_ns=456_789))
    assert (a3.atime_ns, a3.mtime_ns) == (123, 456_789)
    a4 = fs.setattr(a.ino, SetAttr(mode=0o6755))
    a4 = fs.setattr(a.ino, SetAttr(uid=1000, gid=1000))
    assert (a4.uid, a4.gid) == (1000, 1000)
    assert stat.S_IMODE(a4.mode) == 0o755  # suid and (group-exec) sgid dropped
    fs.setattr(a.ino, SetAttr(mode=0o2644))  # sgid without group exec: mandatory locking
    a5 = fs.setattr(a.ino, SetAttr(gid=5))
    assert stat.S_IMODE(a5.mode) == 0o2644
    d = fs.mkdir(R, b"d", 0o2755, 0, 0)
    assert fs.setattr(d.ino, SetAttr(uid=7)).mode & stat.S_ISGID


def test_truncate(fs):
    ino = mkfile(fs, R, b"f", b"x" * 10000)
    a = fs.setattr(ino, SetAttr(size=5))
    assert a.size == 5 and fs.read(ino, 0, 100) == b"xxxxx"
    a = fs.setattr(ino, SetAttr(size=20000))
    assert a.size == 20000 and fs.read(ino, 0, 20000) == b"xxxxx" + bytes(19995)
    a = fs.setattr(ino, SetAttr(size=0))
    assert a.size == 0 and a.blocks == 0
    node = fs.inodes.get(ino)
    node.mtime_ns = node.ctime_ns = 1
    fs.inodes.put(node)
    a = fs.setattr(ino, SetAttr(size=0))  # same size: the truncate syscalls still touch times
    assert a.mtime_ns > 1 and a.ctime_ns > 1
    raises(errno.EINVAL, fs.setattr, ino, SetAttr(size=-1))


def test_write_crossing_max_size_is_short(fs):
    ino = mkfile(fs, R, b"f")
    assert fs.write(ino, MAX_FILE_SIZE - 3, b"abcdef") == 3
    assert fs.getattr(ino).size == MAX_FILE_SIZE
    assert fs.read(ino, MAX_FILE_SIZE - 3, 10) == b"abc"


def test_fallocate(fs):
    ino = mkfile(fs, R, b"f")
    fs.fallocate(ino, 0, 0, 10000)
    a = fs.getattr(ino)
    assert a.size == 10000 and a.blocks >= 3 * 8
    assert fs.read(ino, 0, 10000) == bytes(10000)
    fs.fallocate(ino, 1, 0, 50000)  # KEEP_SIZE
    assert fs.getattr(ino).size == 10000


# ----------------------------------------------------------------- lifecycle / orphans


def test_unlink_open_file_lives_until_release_and_forget(fs):
    a = fs.create(R, b"big", 0o644, 0, 0)
    fs.write(a.ino, 0, b"z" * 200_000)
    free_before = fs.statfs().blocks_free
    fs.unlink(R, b"big")
    raises(errno.ENOENT, fs.lookup, R, b"big")
    assert fs.read(a.ino, 0, 3) == b"zzz"  # still readable
    fs.write(a.ino, 0, b"abc")  # and writable
    assert fs.getattr(a.ino).nlink == 0
    assert fs.statfs().blocks_free == free_before
    assert a.ino in fs.inodes.orphans()
    fs.release(a.ino)
    assert fs.statfs().blocks_free == free_before  # the kernel still references it
    fs.forget(a.ino, 1)
    assert fs.statfs().blocks_free >= free_before + 200_000 // 4096
    raises(errno.ENOENT, fs.getattr, a.ino)
    assert fs.inodes.orphans() == []


def test_orphan_freed_after_crash(vol_path):
    vol = Volume.open(vol_path)
    fs = Filesystem(vol)
    files_free = fs.statfs().files_free
    a = fs.create(R, b"f", 0o644, 0, 0)
    fs.write(a.ino, 0, b"q" * 100_000)
    fs.unlink(R, b"f")
    blocks_free = fs.statfs().blocks_free
    vol.commit()  # "crash": committed, never released
    vol.close()
    vol = Volume.open(vol_path)
    fs = Filesystem(vol)
    try:
        raises(errno.ENOENT, fs.getattr, a.ino)
        assert fs.statfs().files_free == files_free
        assert fs.statfs().blocks_free >= blocks_free + 100_000 // 4096
        assert fs.inodes.orphans() == []
    finally:
        fs.close()
        vol.close()


def test_rmdir_while_referenced(fs):
    d = fs.mkdir(R, b"d", 0o755, 0, 0)
    fs.rmdir(R, b"d")
    assert fs.getattr(d.ino).nlink == 0
    raises(errno.ENOENT, fs.create, d.ino, b"x", 0o644, 0, 0)
    assert [n for n, _, _ in fs.readdir(d.ino, 0)] == [b".", b".."]
    fs.forget(d.ino, 1)
    raises(errno.ENOENT, fs.getattr, d.ino)


def test_statfs_counts(fs):
    s = fs.statfs()
    assert s.name_max == 255 and s.block_size == 4096
    assert s.blocks == fs.volume.block_count
    a = fs.create(R, b"f", 0o644, 0, 0)
    fs.write(a.ino, 0, b"x" * 8192)
    s2 = fs.statfs()
    assert s2.files_free == s.files_free - 1
    assert s2.blocks_free <= s.blocks_free - 2


def test_enospc_changes_nothing(tmp_path):
    path = str(tmp_path / "small")
    Volume.create(path, 2 * MiB)
    vol = Volume.open(path)
    Filesystem.format(vol, inode_count=100)
    fs = Filesystem(vol)
    try:
        a = fs.create(R, b"f", 0o644, 0, 0)
        with pytest.raises(FsError) as ei:
            fs.write(a.ino, 0, b"x" * 4 * MiB)
        assert ei.value.errno == errno.ENOSPC
        assert fs.getattr(a.ino).size == 0
        # fill the inode table: the next create fails cleanly
        n = 0
        with pytest.raises(FsError) as ei:
            while True:
                fs.mknod(R, b"n%d" % n, stat.S_IFREG | 0o644, 0, 0, 0)
                n += 1
        assert ei.value.errno == errno.ENOSPC
        assert len(names(fs, R)) == n + 1
    finally:
        fs.close()
        vol.close()


def test_enospc_on_blocks_leaves_a_consistent_filesystem(tmp_path):
    path = str(tmp_path / "small")
    Volume.create(path, 2 * MiB)
    vol = Volume.open(path)
    Filesystem.format(vol, inode_count=2000)
    fs = Filesystem(vol)
    try:
        d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
        a = fs.create(R, b"fill", 0o644, 0, 0)
        off = 0
        with pytest.raises(FsError) as ei:
            while True:
                off += fs.write(a.ino, off, b"x" * 4096)
        assert ei.value.errno == errno.ENOSPC
        assert fs.getattr(a.ino).size == off
        # the directory fills its blocks, then cannot grow: a clean ENOSPC each time
        failures = 0
        for i in range(600):
            try:
                fs.symlink(d, b"name-%04d" % i, b"t" * (200 if i % 2 else 10), 0, 0)
            except FsError as exc:
                assert exc.errno == errno.ENOSPC
                failures += 1
        assert failures
        fs.release(a.ino)
        for ino, n in list(fs._refs.items()):
            fs.forget(ino, n)
        vol.commit()
        report = fsck.check(vol)
        assert report.clean, report.describe()
    finally:
        fs.close()
        vol.close()


def test_invalidate_with_hints_refreshes_a_reader(fs):
    """A replica's read-only Filesystem sees whole transactions after invalidate(hints)."""
    vol = fs.volume
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    f = mkfile(fs, d, b"f", b"old")
    vol.commit()
    reader = Filesystem(vol, read_only=True)
    assert reader.lookup(d, b"f").size == 3
    assert [n for n, _, _ in reader.readdir(d, 0)][2:] == [b"f"]
    committed = []
    vol.writer.subscribe(committed.append)
    fs.write(f, 0, b"newer")
    mkfile(fs, d, b"g")
    fs.rename(d, b"f", R, b"moved")
    vol.commit()
    reader.invalidate(committed[-1].hints)
    assert reader.getattr(f).size == 5
    assert reader.read(f, 0, 10) == b"newer"
    assert [n for n, _, _ in reader.readdir(d, 0)][2:] == [b"g"]
    assert reader.lookup(R, b"moved").ino == f
    raises(errno.ENOENT, reader.lookup, d, b"f")
