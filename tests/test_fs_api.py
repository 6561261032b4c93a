"""The filesystem API on a real volume (no FUSE): semantics, errno cases, timestamps."""

from __future__ import annotations

import errno
import stat

import pytest

from mirrorfs.fs import fsck
from mirrorfs.fs.filesystem import (
    LINK_MAX,
    MAX_FILE_SIZE,
    ROOT_INO,
    Filesystem,
    FsError,
    SetAttr,
)
from mirrorfs.store.txn import HintKind
from mirrorfs.store.volume import Volume

MiB = 1 << 20
R = ROOT_INO


@pytest.fixture
def vol_path(tmp_path):
    path = str(tmp_path / "vol")
    Volume.create(path, 32 * MiB)
    vol = Volume.open(path)
    Filesystem.format(vol, inode_count=2000, uid=0, gid=0)
    vol.close()
    return path


@pytest.fixture
def fs(vol_path):
    vol = Volume.open(vol_path)
    f = Filesystem(vol)
    yield f
    f.close()
    vol.close()


def err(exc_info) -> int:
    return exc_info.value.errno


def raises(code: int, fn, *args, **kw) -> None:
    with pytest.raises(FsError) as ei:
        fn(*args, **kw)
    assert ei.value.errno == code, f"expected {errno.errorcode[code]}, got {ei.value}"


def mkfile(fs: Filesystem, parent: int, name: bytes, data: bytes = b"", mode=0o644) -> int:
    a = fs.create(parent, name, mode, 0, 0)
    if data:
        fs.write(a.ino, 0, data)
    fs.release(a.ino)
    fs.forget(a.ino, 1)  # as the kernel would, eventually
    return a.ino


# ------------------------------------------------------------------------------- basics


def test_format_makes_root(fs):
    a = fs.getattr(R)
    assert stat.S_ISDIR(a.mode) and stat.S_IMODE(a.mode) == 0o755
    assert a.nlink == 2 and a.ino == 1
    assert fs.lookup(R, b".").ino == R
    assert fs.lookup(R, b"..").ino == R
    assert [n for n, _, _ in fs.readdir(R, 0)] == [b".", b".."]


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


# ------------------------------------------------------------------------------- times


def _age(fs: Filesystem, ino: int, t: int = 1_000) -> None:
    node = fs.inodes.get(ino)
    node.atime_ns = node.mtime_ns = node.ctime_ns = t
    fs.inodes.put(node)


def _times(fs, ino):
    a = fs.getattr(ino)
    return a.atime_ns, a.mtime_ns, a.ctime_ns


def test_times_create_and_unlink(fs):
    _age(fs, R)
    a = fs.create(R, b"f", 0o644, 0, 0)
    assert a.atime_ns == a.mtime_ns == a.ctime_ns > 1_000
    ra, rm, rc = _times(fs, R)
    assert ra == 1_000 and rm == rc == a.ctime_ns
    fs.link(a.ino, R, b"g")
    _age(fs, R)
    _age(fs, a.ino)
    fs.unlink(R, b"g")
    assert _times(fs, R)[0] == 1_000 and _times(fs, R)[1] > 1_000
    at, mt, ct = _times(fs, a.ino)
    assert at == mt == 1_000 and ct > 1_000


def test_times_link_mkdir_rmdir(fs):
    ino = mkfile(fs, R, b"f")
    _age(fs, R)
    _age(fs, ino)
    fs.link(ino, R, b"g")
    assert _times(fs, ino)[1:] == (1_000, _times(fs, ino)[2]) and _times(fs, ino)[2] > 1_000
    assert _times(fs, R)[1] > 1_000 and _times(fs, R)[2] > 1_000
    _age(fs, R)
    fs.mkdir(R, b"d", 0o755, 0, 0)
    assert _times(fs, R)[1] > 1_000
    _age(fs, R)
    fs.rmdir(R, b"d")
    assert _times(fs, R)[1] > 1_000 and _times(fs, R)[2] > 1_000


def test_times_write_and_read_relatime(fs):
    ino = mkfile(fs, R, b"f", b"abc")
    _age(fs, ino)
    fs.write(ino, 0, b"x")
    at, mt, ct = _times(fs, ino)
    assert at == 1_000 and mt == ct > 1_000
    fs.read(ino, 0, 1)  # atime older than mtime: updated
    at2 = _times(fs, ino)[0]
    assert at2 >= mt
    fs.read(ino, 0, 1)  # atime newer than mtime and ctime: left alone (no metadata write)
    assert _times(fs, ino)[0] == at2


def test_times_rename(fs):
    a = fs.mkdir(R, b"a", 0o755, 0, 0).ino
    b = fs.mkdir(R, b"b", 0o755, 0, 0).ino
    f = mkfile(fs, a, b"f")
    t = mkfile(fs, b, b"t")
    for ino in (R, a, b, f, t):
        _age(fs, ino)
    fs.rename(a, b"f", b, b"t")
    for ino in (a, b):
        assert _times(fs, ino)[1] > 1_000 and _times(fs, ino)[2] > 1_000
    assert _times(fs, f)[1] == 1_000 and _times(fs, f)[2] > 1_000
    assert _times(fs, R)[1:] == (1_000, 1_000)


def test_xattr_ctime_and_values(fs):
    ino = mkfile(fs, R, b"f")
    _age(fs, ino)
    fs.setxattr(ino, b"user.k", b"v1")
    assert _times(fs, ino)[2] > 1_000 and _times(fs, ino)[1] == 1_000
    fs.setxattr(ino, b"trusted.t", b"v2")
    fs.setxattr(ino, b"security.s", b"")
    assert fs.getxattr(ino, b"user.k") == b"v1"
    assert fs.getxattr(ino, b"security.s") == b""
    assert sorted(fs.listxattr(ino)) == [b"security.s", b"trusted.t", b"user.k"]
    fs.removexattr(ino, b"user.k")
    assert sorted(fs.listxattr(ino)) == [b"security.s", b"trusted.t"]
    d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
    fs.setxattr(d, b"user.k", b"dir")
    assert fs.getxattr(d, b"user.k") == b"dir"


def test_user_xattr_only_on_files_and_dirs(fs):
    link = fs.symlink(R, b"l", b"target", 0, 0).ino
    fifo = fs.mknod(R, b"p", stat.S_IFIFO | 0o644, 0, 0, 0).ino
    for ino in (link, fifo):
        raises(errno.EPERM, fs.setxattr, ino, b"user.a", b"v")
        raises(errno.ENODATA, fs.getxattr, ino, b"user.a")
        fs.setxattr(ino, b"trusted.a", b"v")
        assert fs.getxattr(ino, b"trusted.a") == b"v"


# ---------------------------------------------------------------------- rename matrix


def _tree(fs):
    """root/{a/{f, sub/{x}}, b/{g, empty/}, file}"""
    a = fs.mkdir(R, b"a", 0o755, 0, 0).ino
    b = fs.mkdir(R, b"b", 0o755, 0, 0).ino
    sub = fs.mkdir(a, b"sub", 0o755, 0, 0).ino
    empty = fs.mkdir(b, b"empty", 0o755, 0, 0).ino
    ids = dict(
        a=a,
        b=b,
        sub=sub,
        empty=empty,
        f=mkfile(fs, a, b"f", b"F"),
        x=mkfile(fs, sub, b"x", b"X"),
        g=mkfile(fs, b, b"g", b"G"),
        file=mkfile(fs, R, b"file"),
    )
    return ids


def names(fs, d):
    return sorted(n for n, _, _ in fs.readdir(d, 0) if n not in (b".", b".."))


def test_rename_file_same_dir_and_across(fs):
    t = _tree(fs)
    fs.rename(t["a"], b"f", t["a"], b"f2")
    assert names(fs, t["a"]) == [b"f2", b"sub"]
    fs.rename(t["a"], b"f2", t["b"], b"f3")
    assert names(fs, t["a"]) == [b"sub"]
    assert names(fs, t["b"]) == [b"empty", b"f3", b"g"]
    assert fs.lookup(t["b"], b"f3").ino == t["f"]


def test_rename_file_over_file(fs):
    t = _tree(fs)
    fs.rename(t["a"], b"f", t["b"], b"g")
    assert fs.lookup(t["b"], b"g").ino == t["f"]
    raises(errno.ENOENT, fs.getattr, t["g"])  # no references left: freed at once
    assert fs.read(t["f"], 0, 9) == b"F"


def test_rename_dir_across_updates_dotdot_and_nlink(fs):
    t = _tree(fs)
    fs.rename(t["a"], b"sub", t["b"], b"moved")
    assert fs.lookup(t["sub"], b"..").ino == t["b"]
    assert fs.getattr(t["a"]).nlink == 2
    assert fs.getattr(t["b"]).nlink == 4
    # persisted: ".." survives a fresh Filesystem on the same volume
    fs2 = Filesystem(fs.volume)
    assert fs2.lookup(t["sub"], b"..").ino == t["b"]


def test_rename_dir_over_empty_dir(fs):
    t = _tree(fs)
    fs.rename(t["a"], b"sub", t["b"], b"empty")
    assert fs.lookup(t["b"], b"empty").ino == t["sub"]
    assert fs.getattr(t["a"]).nlink == 2 and fs.getattr(t["b"]).nlink == 3
    assert fs.lookup(t["sub"], b"..").ino == t["b"]


@pytest.mark.parametrize(
    "src,dst,code",
    [
        (("a", b"sub"), ("b", b"g"), errno.ENOTDIR),  # dir over file
        (("a", b"f"), ("b", b"empty"), errno.EISDIR),  # file over dir
        (("b", b"empty"), ("R", b"a"), errno.ENOTEMPTY),  # dir over non-empty dir
        (("R", b"a"), ("sub", b"inside"), errno.EINVAL),  # into its own subtree
        (("R", b"a"), ("a", b"self"), errno.EINVAL),  # into itself
        (("a", b"."), ("b", b"x"), errno.EINVAL),
        (("a", b"f"), ("b", b".."), errno.EINVAL),
        (("a", b"nope"), ("b", b"x"), errno.ENOENT),
        (("a", b"f"), ("f", b"x"), errno.ENOTDIR),
    ],
)
def test_rename_errors(fs, src, dst, code):
    t = _tree(fs)
    t["R"] = R
    raises(code, fs.rename, t[src[0]], src[1], t[dst[0]], dst[1])
    # nothing changed
    assert names(fs, t["a"]) == [b"f", b"sub"]
    assert names(fs, t["b"]) == [b"empty", b"g"]


def test_rename_noreplace_and_exchange(fs):
    t = _tree(fs)
    raises(errno.EEXIST, fs.rename, t["a"], b"f", t["b"], b"g", 1)
    fs.rename(t["a"], b"f", t["b"], b"new", 1)
    assert fs.lookup(t["b"], b"new").ino == t["f"]
    raises(errno.ENOENT, fs.rename, t["b"], b"new", t["a"], b"missing", 2)
    raises(errno.EINVAL, fs.rename, t["b"], b"new", t["a"], b"sub", 3)
    # exchange a file with a directory across directories
    fs.rename(t["b"], b"new", t["a"], b"sub", 2)
    assert fs.lookup(t["b"], b"new").ino == t["sub"]
    assert fs.lookup(t["a"], b"sub").ino == t["f"]
    assert fs.lookup(t["sub"], b"..").ino == t["b"]
    assert fs.getattr(t["a"]).nlink == 2 and fs.getattr(t["b"]).nlink == 4
    # exchange a directory with its own descendant's parent: EINVAL
    raises(errno.EINVAL, fs.rename, R, b"b", t["b"], b"new", 2)


def test_rename_same_inode_is_noop(fs):
    t = _tree(fs)
    fs.link(t["f"], t["b"], b"hard")
    fs.rename(t["a"], b"f", t["b"], b"hard")
    assert names(fs, t["a"]) == [b"f", b"sub"]  # both names stay (POSIX)
    assert fs.getattr(t["f"]).nlink == 2
    fs.rename(t["a"], b"f", t["a"], b"f")


def test_rename_hints(fs):
    t = _tree(fs)
    fs.volume.commit()
    fs.rename(t["a"], b"f", t["b"], b"g")
    hints = fs.volume._hints
    kinds = [(h.kind, h.parent, h.name) for h in hints if h.parent]
    assert (HintKind.ENTRY_REMOVED, t["a"], b"f") in kinds
    assert (HintKind.ENTRY_REMOVED, t["b"], b"g") in kinds
    assert (HintKind.ENTRY_ADDED, t["b"], b"g") in kinds
    assert any(h.kind == HintKind.INODE_DELETED and h.ino == t["g"] for h in hints)


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
