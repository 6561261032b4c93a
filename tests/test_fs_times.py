"""The filesystem API on a real volume (no FUSE): timestamps (ctime, mtime, relatime) and
xattr values."""

from __future__ import annotations

import errno
import stat

import pytest

from mirrorfs.fs.filesystem import Filesystem
from tests.fs_util import R, mkfile, new_volume, open_filesystem, raises

vol_path = pytest.fixture(new_volume, name="vol_path")
fs = pytest.fixture(open_filesystem, name="fs")

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


def test_times_outside_the_format_are_clamped_and_the_volume_stays_writable(vol_path):
    """A caller can set any time; the inode holds int64 ns, so extremes are clamped (as
    Linux clamps to ext4's range) instead of failing the volume."""
    from mirrorfs.fs.api import TIME_MAX_NS, TIME_MIN_NS, SetAttr
    from mirrorfs.store.volume import Volume

    year = 365 * 86400 * 10**9
    cases = [
        ((2600 - 1970) * year, TIME_MAX_NS),
        (-(1970 - 1800) * year, -(1970 - 1800) * year),  # inside the format: kept
        (-(1 << 80), TIME_MIN_NS),
        (1 << 80, TIME_MAX_NS),
        (TIME_MIN_NS, TIME_MIN_NS),
        (TIME_MAX_NS, TIME_MAX_NS),
    ]
    vol = Volume.open(vol_path)
    fs = Filesystem(vol)
    inos = []
    for i, (given, want) in enumerate(cases):
        ino = mkfile(fs, R, b"f%d" % i, b"data")
        a = fs.setattr(ino, SetAttr(atime_ns=given, mtime_ns=given))
        assert (a.atime_ns, a.mtime_ns) == (want, want)
        inos.append(ino)
    last = mkfile(fs, R, b"after", b"more")  # the volume still takes writes
    fs.close()
    vol.close()
    # the clamped times are what the blocks hold
    vol = Volume.open(vol_path)
    fs = Filesystem(vol)
    try:
        for ino, (_, want) in zip(inos, cases, strict=True):
            a = fs.getattr(ino)
            assert (a.atime_ns, a.mtime_ns) == (want, want)
        assert fs.read(last, 0, 4) == b"more"
    finally:
        fs.close()
        vol.close()


@pytest.mark.parametrize(
    "policy, diratime, file_moves, dir_moves",
    [
        ("relatime", True, False, False),  # atime newer than mtime/ctime, less than a day old
        ("strictatime", True, True, True),
        ("strictatime", False, True, False),  # nodiratime
        ("noatime", True, False, False),
    ],
)
def test_atime_policies(vol_path, policy, diratime, file_moves, dir_moves):
    from mirrorfs.fs.api import AtimePolicy
    from mirrorfs.store.volume import Volume

    vol = Volume.open(vol_path)
    fs = Filesystem(vol, atime=AtimePolicy(policy), diratime=diratime)
    try:
        ino = mkfile(fs, R, b"f", b"data")
        d = fs.mkdir(R, b"d", 0o755, 0, 0).ino
        for i in (ino, d):  # atime just after mtime/ctime: relatime leaves it alone
            node = fs.inodes.get(i)
            node.atime_ns = max(node.mtime_ns, node.ctime_ns) + 1
            fs.inodes.put(node)
        before_f, before_d = fs.getattr(ino).atime_ns, fs.getattr(d).atime_ns
        fs.open(ino)
        fs.read(ino, 0, 4)
        fs.release(ino)
        list(fs.readdir(d, 0))
        assert (fs.getattr(ino).atime_ns != before_f) == file_moves
        assert (fs.getattr(d).atime_ns != before_d) == dir_moves
        # noatime: not even an atime older than mtime moves (relatime would refresh it)
        if policy == "noatime":
            _age(fs, ino)
            fs.read(ino, 0, 4)
            assert fs.getattr(ino).atime_ns == 1_000
    finally:
        fs.close()
        vol.close()
