"""POSIX corner cases on one shared read-write mount, and permissions (allow_other).

The mount runs in a child process (tests/util.py); fsck must be clean after the module.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import subprocess
import time
from types import SimpleNamespace

import pytest

from tests import syscalls
from tests.util import (
    cleanup,
    expect_errno,
    fsck,
    is_mounted,
    mkfs,
    mount,
    mounted,
    mounts_fuse,
    needs_fuse,
    public_dir,
    run_cli,
    umount,
    wait_for,
)

MiB = 1 << 20

pytestmark = needs_fuse


# -- POSIX corner cases on one shared mount


@pytest.fixture(scope="module")
@mounts_fuse
def rw(tmp_path_factory):
    """A read-write mount shared by the tests below; fsck must be clean afterwards."""
    vol = tmp_path_factory.mktemp("rw") / "vol"
    mkfs(vol, "128M")
    with public_dir() as mnt:
        m = mount(vol, mnt)
        try:
            yield SimpleNamespace(vol=str(vol), mnt=mnt, proc=m)
            umount(m)
        finally:
            cleanup(m)
    proc = fsck(vol)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def d(rw, request):
    """A fresh directory on the shared mount for one test."""
    path = os.path.join(rw.mnt, request.node.name.replace("[", "_").replace("]", ""))
    os.mkdir(path)
    return path


def test_o_append(d):
    p = os.path.join(d, "log")
    with open(p, "wb") as f:
        f.write(b"one\n")
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"two\n")
        os.pwrite(fd, b"three\n", 0)  # Linux: pwrite on O_APPEND appends too
    finally:
        os.close(fd)
    with open(p, "rb") as f:
        assert f.read() == b"one\ntwo\nthree\n"


def test_o_excl_and_o_trunc(d):
    p = os.path.join(d, "f")
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.write(fd, b"hello world")
    os.close(fd)
    expect_errno(errno.EEXIST, os.open, p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    fd = os.open(p, os.O_RDWR | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    with open(p, "rb") as f:
        assert f.read() == b"new"


def test_o_direct(d):
    p = os.path.join(d, "direct")
    size = MiB
    wbuf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT wants
    wbuf.write(os.urandom(size))
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        for off in range(0, 4 * size, size):
            assert os.pwritev(fd, [wbuf], off) == size
        rbuf = mmap.mmap(-1, size)
        assert os.preadv(fd, [rbuf], 2 * size) == size
        assert rbuf[:] == wbuf[:]
    finally:
        os.close(fd)
    assert os.path.getsize(p) == 4 * size
    with open(p, "rb") as f:
        f.seek(3 * size)
        assert f.read() == wbuf[:]


def test_write_past_eof_zero_fills(d):
    p = os.path.join(d, "holes")
    with open(p, "wb") as f:
        f.write(b"a" * 100)
        f.seek(3 * MiB + 17)
        f.write(b"z")
        f.truncate(5 * MiB)
    with open(p, "rb") as f:
        data = f.read()
    assert len(data) == 5 * MiB
    assert data[:100] == b"a" * 100
    assert data[100 : 3 * MiB + 17] == bytes(3 * MiB + 17 - 100)
    assert data[3 * MiB + 17] == ord("z")
    assert data[3 * MiB + 18 :] == bytes(5 * MiB - 3 * MiB - 18)
    # Shrink then grow again: the old bytes past the cut must not come back.
    os.truncate(p, 50)
    os.truncate(p, 200)
    with open(p, "rb") as f:
        assert f.read() == b"a" * 50 + bytes(150)


def test_efbig(rw, d):
    p = os.path.join(d, "big")
    with open(p, "wb") as f:
        f.write(b"x")
    before = os.statvfs(rw.mnt).f_bfree
    expect_errno(errno.EFBIG, os.truncate, p, 999999999999999)
    fd = os.open(p, os.O_WRONLY)
    try:
        expect_errno(errno.EFBIG, os.pwrite, fd, b"y", 999999999999999)
    finally:
        os.close(fd)
    assert os.path.getsize(p) == 1
    assert os.statvfs(rw.mnt).f_bfree >= before - 1


def test_name_too_long(d):
    expect_errno(errno.ENAMETOOLONG, open, os.path.join(d, "n" * 256), "w")
    expect_errno(errno.ENAMETOOLONG, os.mkdir, os.path.join(d, "n" * 256))
    with open(os.path.join(d, "n" * 255), "w") as f:
        f.write("ok")
    assert os.listdir(d) == ["n" * 255]


def test_rename_semantics(d):
    def touch(name: str, data: bytes = b"") -> str:
        p = os.path.join(d, name)
        with open(p, "wb") as f:
            f.write(data)
        return p

    a, b = touch("a", b"A"), touch("b", b"B")
    ino_a = os.stat(a).st_ino
    os.rename(a, b)  # replaces b
    assert sorted(os.listdir(d)) == ["b"]
    assert os.stat(b).st_ino == ino_a
    with open(b, "rb") as f:
        assert f.read() == b"A"
    os.mkdir(os.path.join(d, "d1"))
    os.mkdir(os.path.join(d, "d2"))
    touch("d2/inside")
    os.mkdir(os.path.join(d, "empty"))
    expect_errno(errno.ENOTEMPTY, os.rename, os.path.join(d, "d1"), os.path.join(d, "d2"))
    expect_errno(errno.EISDIR, os.rename, b, os.path.join(d, "d1"))
    expect_errno(errno.ENOTDIR, os.rename, os.path.join(d, "d1"), b)
    expect_errno(errno.EINVAL, os.rename, os.path.join(d, "d2"), os.path.join(d, "d2", "sub"))
    os.rename(os.path.join(d, "d1"), os.path.join(d, "empty"))  # over an empty directory
    os.rename(b, os.path.join(d, "d2", "moved"))  # across directories
    os.rename(os.path.join(d, "d2", "moved"), os.path.join(d, "d2", "moved"))  # no-op
    assert sorted(os.listdir(d)) == ["d2", "empty"]
    assert sorted(os.listdir(os.path.join(d, "d2"))) == ["inside", "moved"]
    assert os.stat(d).st_nlink == 4  # ".", its entry, and two subdirectories' ".."


def test_hard_links_and_symlinks(d):
    p = os.path.join(d, "f")
    with open(p, "wb") as f:
        f.write(b"data")
    os.link(p, os.path.join(d, "g"))
    assert os.stat(p).st_nlink == 2
    assert os.stat(p).st_ino == os.stat(os.path.join(d, "g")).st_ino
    os.unlink(p)
    assert os.stat(os.path.join(d, "g")).st_nlink == 1
    os.symlink("g", os.path.join(d, "s"))
    assert os.readlink(os.path.join(d, "s")) == "g"
    with open(os.path.join(d, "s"), "rb") as f:
        assert f.read() == b"data"
    expect_errno(errno.EPERM, os.link, d, os.path.join(d, "dirlink"))


def test_unlink_while_open(rw, d):
    p = os.path.join(d, "tmp")
    data = os.urandom(3 * MiB)
    with open(p, "wb") as f:
        f.write(data)
    free_before = os.statvfs(rw.mnt).f_bfree
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        assert not os.path.exists(p)
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, len(data), 0) == data
        os.pwrite(fd, b"still writable", 0)
        assert os.pread(fd, 14, 0) == b"still writable"
    finally:
        os.close(fd)
    # The blocks come back once the last handle (and the kernel's reference) is gone.
    wait_for(
        lambda: os.statvfs(rw.mnt).f_bfree >= free_before + 3 * MiB // 4096 - 8,
        10,
        "the unlinked file's blocks to be freed",
    )


def test_xattrs(d):
    p = os.path.join(d, "x")
    open(p, "w").close()
    os.setxattr(p, "user.color", b"blue")
    os.setxattr(p, "user.empty", b"")
    os.setxattr(p, "user.big", os.urandom(3000))
    assert os.getxattr(p, "user.color") == b"blue"
    assert os.getxattr(p, "user.empty") == b""
    assert sorted(os.listxattr(p)) == ["user.big", "user.color", "user.empty"]
    expect_errno(errno.EEXIST, os.setxattr, p, "user.color", b"red", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, p, "user.none", b"x", os.XATTR_REPLACE)
    os.setxattr(p, "user.color", b"red", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.color") == b"red"
    os.removexattr(p, "user.color")
    expect_errno(errno.ENODATA, os.getxattr, p, "user.color")
    expect_errno(errno.ENODATA, os.removexattr, p, "user.color")
    os.setxattr(d, "user.on-a-dir", b"1")
    assert os.getxattr(d, "user.on-a-dir") == b"1"


def test_a_thousand_xattrs_on_one_file(d):
    p = os.path.join(d, "many")
    open(p, "w").close()
    for i in range(1000):
        os.setxattr(p, f"user.attr{i:04d}", b"value%04d" % i)
    assert len(os.listxattr(p)) == 1000
    assert os.getxattr(p, "user.attr0999") == b"value0999"
    for i in range(0, 1000, 2):
        os.removexattr(p, f"user.attr{i:04d}")
    assert sorted(os.listxattr(p)) == [f"user.attr{i:04d}" for i in range(1, 1000, 2)]


def test_statfs_counts_change(rw, d):
    before = os.statvfs(rw.mnt)
    assert before.f_bsize == 4096 and before.f_blocks > 0 and before.f_files > 0
    assert before.f_namemax == 255
    for i in range(20):
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(os.urandom(256 * 1024))
    after = os.statvfs(rw.mnt)
    assert after.f_ffree <= before.f_ffree - 20
    assert after.f_bfree <= before.f_bfree - 20 * 64
    for i in range(20):
        os.unlink(os.path.join(d, f"f{i}"))
    wait_for(lambda: os.statvfs(rw.mnt).f_ffree >= before.f_ffree, 10, "inodes to be freed")


def test_attributes(d):
    p = os.path.join(d, "f")
    with open(p, "wb") as f:
        f.write(b"x" * 10000)
    os.chmod(p, 0o4711)
    os.chown(p, 4321, 8765)
    os.utime(p, ns=(1_111_111_111_222_333_444, 1_234_567_890_123_456_789))
    st = os.stat(p)
    assert stat.S_IMODE(st.st_mode) == 0o711  # chown clears setuid
    assert (st.st_uid, st.st_gid) == (4321, 8765)
    assert st.st_atime_ns == 1_111_111_111_222_333_444
    assert st.st_mtime_ns == 1_234_567_890_123_456_789
    assert st.st_blocks * 512 >= 10000
    ctime = st.st_ctime_ns
    time.sleep(0.01)
    os.chmod(p, 0o600)
    assert os.stat(p).st_ctime_ns > ctime
    os.utime(p)  # "now"
    assert abs(os.stat(p).st_mtime_ns - time.time_ns()) < 5 * 10**9


def test_times_past_the_format_keep_the_mount_writable(d):
    """touch -d with years 1800 and 2600: clamped to the inode format, the mount stays
    read-write (it once turned the whole volume read-only)."""
    p = os.path.join(d, "t")
    with open(p, "wb") as f:
        f.write(b"x")
    for stamp in ("1800-01-01 00:00:00 UTC", "2600-01-01 00:00:00 UTC"):
        subprocess.run(["touch", "-d", stamp, p], check=True, capture_output=True)
    st = os.stat(p)
    assert st.st_mtime_ns == (1 << 63) - 1  # 2262-04-11, the format's last instant
    subprocess.run(["touch", "-d", "1800-01-01 00:00:00 UTC", p], check=True)
    assert os.stat(p).st_mtime_ns == -5364662400 * 10**9
    with open(os.path.join(d, "after"), "wb") as f:
        f.write(b"still writable")
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(d, "after"), "rb") as f:
        assert f.read() == b"still writable"


def test_file_handles_survive_dropped_caches(rw, d):
    """name_to_handle_at + open_by_handle_at after the kernel evicted the inodes: the
    kernel finds them again with LOOKUP(ino, "."), for files, hard links and directories;
    a deleted inode (and a reused inode number) is ESTALE."""
    if os.geteuid() != 0:
        pytest.skip("open_by_handle_at and drop_caches need root")
    sub = os.path.join(d, "sub")
    os.mkdir(sub)
    with open(os.path.join(sub, "f"), "wb") as f:
        f.write(b"hello")
    os.link(os.path.join(sub, "f"), os.path.join(d, "f-link"))
    with open(os.path.join(d, "gone"), "wb") as f:
        f.write(b"gone")
    handles = {
        name: syscalls.name_to_handle_at(os.path.join(d, name))
        for name in ("sub", "sub/f", "f-link", "gone")
    }
    inos = {name: os.stat(os.path.join(d, name)).st_ino for name in handles}
    os.unlink(os.path.join(d, "gone"))
    with open(os.path.join(d, "new"), "wb") as f:  # may take the freed inode number
        f.write(b"new")
    syscalls.drop_caches()
    mount_fd = os.open(rw.mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in ("sub/f", "f-link"):
            fd = syscalls.open_by_handle_at(mount_fd, handles[name])
            try:
                assert os.fstat(fd).st_ino == inos[name]
                assert os.pread(fd, 100, 0) == b"hello"
            finally:
                os.close(fd)
        fd = syscalls.open_by_handle_at(mount_fd, handles["sub"], os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert os.fstat(fd).st_ino == inos["sub"]
            assert os.listdir(fd) == ["f"]
        finally:
            os.close(fd)
        expect_errno(errno.ESTALE, syscalls.open_by_handle_at, mount_fd, handles["gone"])
    finally:
        os.close(mount_fd)


def test_file_handles_survive_a_remount(tmp_path):
    """A handle is the inode number and its generation, both on disk: it opens the same
    file and directory through the next mount of the volume (what NFS needs of a server
    restart)."""
    if os.geteuid() != 0:
        pytest.skip("open_by_handle_at needs root")
    vol = tmp_path / "vol"
    mkfs(vol, "64M")
    with public_dir() as mnt:
        with mounted(vol, mnt):
            with open(os.path.join(mnt, "f"), "wb") as f:
                f.write(b"kept")
            os.mkdir(os.path.join(mnt, "d"))
            handles = {n: syscalls.name_to_handle_at(os.path.join(mnt, n)) for n in ("f", "d")}
            inos = {n: os.stat(os.path.join(mnt, n)).st_ino for n in ("f", "d")}
        with mounted(vol, mnt):
            mount_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for name, flags in (("f", os.O_RDONLY), ("d", os.O_RDONLY | os.O_DIRECTORY)):
                    fd = syscalls.open_by_handle_at(mount_fd, handles[name], flags)
                    try:
                        assert os.fstat(fd).st_ino == inos[name]
                        if name == "f":
                            assert os.pread(fd, 10, 0) == b"kept"
                    finally:
                        os.close(fd)
            finally:
                os.close(mount_fd)


def test_rename_whiteout(d):
    """renameat2(RENAME_WHITEOUT), as overlayfs uses it: the source name becomes a
    character device 0:0, the target gets the file; the flag combinations Linux refuses."""
    src, dst = os.path.join(d, "src"), os.path.join(d, "dst")
    with open(src, "wb") as f:
        f.write(b"payload")
    ino = os.stat(src).st_ino
    syscalls.renameat2(src, dst, syscalls.RENAME_WHITEOUT)
    st = os.lstat(src)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and st.st_ino != ino
    assert os.stat(dst).st_ino == ino
    with open(dst, "rb") as f:
        assert f.read() == b"payload"
    for flags in (
        syscalls.RENAME_WHITEOUT | syscalls.RENAME_EXCHANGE,
        syscalls.RENAME_NOREPLACE | syscalls.RENAME_EXCHANGE,
    ):
        expect_errno(errno.EINVAL, syscalls.renameat2, dst, src, flags)
    expect_errno(
        errno.EEXIST,
        syscalls.renameat2,
        dst,
        src,
        syscalls.RENAME_WHITEOUT | syscalls.RENAME_NOREPLACE,
    )
    os.unlink(src)  # a whiteout is an ordinary name outside an overlay
    assert os.listdir(d) == ["dst"]


def test_readdir_large_directory(d):
    names = {f"entry-{i:05d}-{'x' * (i % 50)}" for i in range(1500)}
    for name in names:
        os.close(os.open(os.path.join(d, name), os.O_CREAT | os.O_WRONLY, 0o644))
    assert set(os.listdir(d)) == names
    for name in sorted(names)[::3]:
        os.unlink(os.path.join(d, name))
    assert set(os.listdir(d)) == {n for n in names if n not in set(sorted(names)[::3])}


def test_second_mount_refused(rw, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    proc = run_cli("mount", rw.vol, other)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mirrorfs: error: "), proc.stderr
    assert "in use" in lines[0]
    assert not is_mounted(other)
    proc = run_cli("fsck", rw.vol)
    assert proc.returncode == 1 and "in use" in proc.stderr


def _as_user(uid: int, gid: int, fn) -> int:
    """Run ``fn`` in a forked child with uid/gid; return its exit status (fn's int result)."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        status = 99
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            status = fn()
        except BaseException:
            status = 98
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_no_access_for_others_without_allow_other(rw):
    def probe() -> int:
        try:
            os.listdir(rw.mnt)
        except PermissionError:
            return 0
        return 1

    assert _as_user(65534, 65534, probe) == 0


def test_allow_other_and_ownership(tmp_path):
    vol = tmp_path / "vol"
    mkfs(vol, "16M")
    # The mountpoint must be reachable for the other user: not under pytest's 0700 dirs.
    with public_dir() as mnt, mounted(vol, mnt, "-o", "allow_other"):
        shared = os.path.join(mnt, "shared")
        os.mkdir(shared)
        os.chmod(shared, 0o777)
        os.mkdir(os.path.join(mnt, "private"), 0o700)
        os.mkdir(os.path.join(mnt, "sgid"))
        os.chown(os.path.join(mnt, "sgid"), 0, 4242)
        os.chmod(os.path.join(mnt, "sgid"), 0o2777)

        def work() -> int:
            os.umask(0o022)
            with open(os.path.join(shared, "mine"), "w") as f:
                f.write("hello")
            os.mkdir(os.path.join(mnt, "sgid", "sub"))
            with open(os.path.join(mnt, "sgid", "file"), "w"):
                pass
            try:
                os.listdir(os.path.join(mnt, "private"))
                return 2
            except PermissionError:
                pass
            try:
                open(os.path.join(mnt, "rootfile"), "w").close()
                return 3
            except PermissionError:
                pass
            return 0

        assert _as_user(65534, 65533, work) == 0
        st = os.stat(os.path.join(shared, "mine"))
        assert (st.st_uid, st.st_gid) == (65534, 65533)
        assert stat.S_IMODE(st.st_mode) == 0o644  # umask applied by the kernel
        sub = os.stat(os.path.join(mnt, "sgid", "sub"))
        assert sub.st_gid == 4242 and sub.st_mode & stat.S_ISGID
        assert os.stat(os.path.join(mnt, "sgid", "file")).st_gid == 4242


def test_atime_mount_options_are_applied_by_mirrorfs(tmp_path):
    """noatime keeps atime still; strictatime moves it on every read; nodiratime and
    relatime are accepted (libfuse rejects all but noatime: mirrorfs applies them)."""
    vol = tmp_path / "vol"
    mkfs(vol, "16M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    path = os.path.join(mnt, "f")
    with mounted(vol, mnt):
        with open(path, "wb") as f:
            f.write(b"data")
        os.utime(path, ns=(10**18, 10**18 + 1))  # atime older than mtime: relatime moves it
    with mounted(vol, mnt, "-o", "noatime,nodiratime"):
        with open(path, "rb") as f:
            f.read()
        os.listdir(mnt)
        assert os.stat(path).st_atime_ns == 10**18
    with mounted(vol, mnt, "-o", "strictatime"):
        seen = []
        for _ in range(2):  # relatime would move it once (atime <= ctime), then not again
            with open(path, "rb") as f:
                # A read served from the kernel's page cache never reaches a FUSE
                # filesystem (no filesystem of FUSE sees it): drop the file's pages first.
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                f.read()
            seen.append(os.stat(path).st_atime_ns)
        assert 10**18 < seen[0] < seen[1]
    with mounted(vol, mnt, "-o", "relatime"), open(path, "rb") as f:
        assert f.read() == b"data"
