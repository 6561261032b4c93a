"""Real mounts: a tree copied in and back, crash safety of fsync, POSIX corner cases.

Each mount runs in a child process (tests/util.py). The first tests drive the adapter
directly with a fake filesystem (no mount) for the error mapping that a mount cannot
provoke on demand.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from mirrorfs.fs.filesystem import MAX_FILE_SIZE, Attr, FsError
from mirrorfs.fuse.operations import Operations
from mirrorfs.store.core import VolumeCondition
from mirrorfs.store.errors import NoSpace, VolumeFailed
from tests.util import (
    cleanup,
    expect_errno,
    fsck,
    fuse_unavailable_reason,
    is_mounted,
    kill_mount,
    mkfs,
    mount,
    mounted,
    needs_fuse,
    pid_alive,
    public_dir,
    run_cli,
    umount,
    wait_for,
)

MiB = 1 << 20

# -- the adapter without a mount


def _attr(ino: int = 5, mode: int = stat.S_IFREG | 0o644, size: int = 0) -> Attr:
    return Attr(ino, 1, mode, 1, 0, 0, 0, size, 0, 4096, 1, 2, 3)


class FakeFs:
    """Records calls; ``fail`` maps a method name to the exception it raises."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.fail: dict[str, BaseException] = {}
        self.refs: dict[int, int] = {}

    def __getattr__(self, name):
        def method(*args):
            self.calls.append((name, *args))
            if name in self.fail:
                raise self.fail[name]
            if name == "readdir":
                return iter(
                    [(b".", _attr(1, stat.S_IFDIR), 1), (b"..", _attr(1, stat.S_IFDIR), 2)]
                    + [(b"f%d" % i, _attr(10 + i), 3 + i) for i in range(5)]
                )
            if name == "add_ref":
                self.refs[args[0]] = self.refs.get(args[0], 0) + 1
            if name in ("write",):
                return len(args[2])
            if name in ("read", "readlink", "getxattr"):
                return b""
            return _attr(mode=stat.S_IFDIR | 0o755) if name == "getattr" else _attr()

        return method


class FakeWriter:
    def __init__(self) -> None:
        self.gate = None

    def attach_gate(self, gate) -> None:
        self.gate = gate


class FakeVolume:
    def __init__(self) -> None:
        self.pending_bytes = 0
        self.commits = 0
        self.condition = VolumeCondition()
        self.writer = FakeWriter()

    @property
    def failed(self):
        return self.condition.failed

    def commit(self, sync: bool = True):
        self.commits += 1
        self.pending_bytes = 0
        return self.commits


CTX = SimpleNamespace(uid=1000, gid=1000, umask=0o022, pid=1)


def make_ops(**kwargs) -> tuple[Operations, FakeFs, FakeVolume]:
    fs, vol = FakeFs(), FakeVolume()
    return Operations(fs, vol, **kwargs), fs, vol


async def fuse_errno(coro) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await coro
    return info.value.errno


async def test_adapter_maps_errors():
    ops, fs, vol = make_ops()
    fs.fail["lookup"] = FsError(errno.ENAMETOOLONG)
    assert await fuse_errno(ops.lookup(1, b"x" * 300, CTX)) == errno.ENAMETOOLONG
    fs.fail["mkdir"] = NoSpace("full")
    assert await fuse_errno(ops.mkdir(1, b"d", 0o755, CTX)) == errno.ENOSPC
    fs.fail["getattr"] = RuntimeError("a bug")
    assert await fuse_errno(ops.getattr(1, CTX)) == errno.EIO  # logged, mount lives on
    assert not ops.failsafe
    fs.fail.clear()
    fs.fail["unlink"] = VolumeFailed("disk on fire")
    assert await fuse_errno(ops.unlink(1, b"f", CTX)) == errno.EIO
    assert ops.failsafe
    fs.fail.clear()
    assert await fuse_errno(ops.create(1, b"g", 0o644, os.O_WRONLY, CTX)) == errno.EROFS
    assert await fuse_errno(ops.mkdir(1, b"d", 0o755, CTX)) == errno.EROFS
    assert (await ops.getattr(1, CTX)).st_ino == 5  # reads go on
    fs.fail["forget"] = RuntimeError("forget must never raise")
    await ops.forget([(5, 1), (6, 2)])
    assert vol.failed is None  # a storage failure: what is open may still be committed


async def test_adapter_bug_in_a_change_discards_the_open_transaction():
    ops, fs, vol = make_ops()
    fs.fail["rename"] = KeyError("a bug half-way through")
    assert await fuse_errno(ops.rename(1, b"a", 1, b"b", 0, CTX)) == errno.EIO
    assert ops.failsafe and vol.failed  # the volume will not commit the half change
    assert await fuse_errno(ops.unlink(1, b"a", CTX)) == errno.EROFS


async def test_adapter_read_only():
    ops, fs, vol = make_ops(read_only=True)
    assert await fuse_errno(ops.mkdir(1, b"d", 0o755, CTX)) == errno.EROFS
    assert await fuse_errno(ops.open(5, os.O_RDWR, CTX)) == errno.EROFS
    fi = await ops.open(5, os.O_RDONLY, CTX)
    assert await ops.read(fi.fh, 0, 10) == b""
    await ops.fsync(fi.fh, False)
    assert vol.commits == 0
    assert not [c for c in fs.calls if c[0] == "mkdir"]


async def test_adapter_efbig_before_the_filesystem():
    ops, fs, vol = make_ops()
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 999999999999999
    fields = SimpleNamespace(
        update_size=True,
        update_mode=False,
        update_uid=False,
        update_gid=False,
        update_atime=False,
        update_mtime=False,
    )
    assert await fuse_errno(ops.setattr(5, attr, fields, None, CTX)) == errno.EFBIG
    fi = await ops.open(5, os.O_WRONLY, CTX)
    assert await fuse_errno(ops.write(fi.fh, MAX_FILE_SIZE, b"x")) == errno.EFBIG
    assert not [c for c in fs.calls if c[0] in ("setattr", "write")]


async def test_adapter_write_append_commit_bound_and_fsync(tmp_path):
    """On a real volume: O_APPEND writes at EOF, the size bound seals, fsync makes durable."""
    from mirrorfs.fs.filesystem import Filesystem
    from mirrorfs.store.volume import Volume

    path = str(tmp_path / "vol")
    Volume.create(path, 16 << 20)
    vol = Volume.open(path)
    Filesystem.format(vol, inode_count=64)
    fs = Filesystem(vol)
    ops = Operations(fs, vol, commit_bound=64 << 10)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(ops.committer.run)
            fi, attr = await ops.create(1, b"f", 0o100644, os.O_WRONLY | os.O_APPEND, CTX)
            assert await ops.write(fi.fh, 12345, b"abc") == 3  # O_APPEND: at EOF, not 12345
            assert fs.getattr(attr.st_ino).size == 3
            fi2 = await ops.open(attr.st_ino, os.O_WRONLY, CTX)
            before = vol.last_seq
            big = os.urandom(256 << 10)  # past the in-flight bound: sealed and persisted
            assert await ops.write(fi2.fh, 4096, big) == len(big)
            await ops.fsync(fi2.fh, True)
            assert vol.last_seq > before and vol.pending_bytes == 0
            seqs = [t.seq for t in vol.samlog.scan(before + 1)]
            assert seqs == list(range(before + 1, vol.last_seq + 1))
            assert fs.read(attr.st_ino, 4096, len(big)) == big
            await ops.release(fi.fh)
            await ops.release(fi2.fh)
            assert await fuse_errno(ops.read(fi.fh, 0, 1)) == errno.EBADF
            nursery.cancel_scope.cancel()
    finally:
        fs.close()
        vol.close()
    # what fsync returned for is in the log and in place after a reopen
    vol = Volume.open(path)
    try:
        fs = Filesystem(vol)
        ino = fs.lookup(1, b"f").ino
        assert fs.read(ino, 0, 3) == b"abc"
        assert fs.read(ino, 4096, len(big)) == big
    finally:
        vol.close()


async def test_adapter_readdir_counts_accepted_entries(monkeypatch):
    ops, fs, vol = make_ops()
    accepted: list[tuple[bytes, int]] = []

    def reply(token, name, attr, next_id):
        if len(accepted) == 4:
            return False
        accepted.append((name, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = await ops.opendir(1, CTX)
    await ops.readdir(fh, 0, object())
    assert [n for n, _ in accepted] == [b".", b"..", b"f0", b"f1"]
    assert fs.refs == {10: 1, 11: 1}  # "." and ".." and the refused entry are not counted


# -- real mounts

STDLIB = os.path.dirname(os.__file__)
STDLIB_PACKAGES = (
    "email",
    "json",
    "asyncio",
    "unittest",
    "xml",
    "encodings",
    "logging",
    "http",
    "importlib",
    "concurrent",
    "multiprocessing",
    "ctypes",
    "urllib",
    "wsgiref",
    "html",
    "tomllib",
    "pydoc_data",
    "lib2to3",
    "idlelib",
)
MAX_TREE_FILES = 3000


def build_tree(dst: str) -> None:
    """A real tree: stdlib packages, large random files, symlinks, hard links, odd modes."""
    os.makedirs(dst)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    count = 0
    for pkg in STDLIB_PACKAGES:
        src = os.path.join(STDLIB, pkg)
        if os.path.isdir(src) and count < MAX_TREE_FILES:
            shutil.copytree(src, os.path.join(dst, "lib", pkg), ignore=ignore, symlinks=True)
            count += sum(len(files) for _, _, files in os.walk(os.path.join(dst, "lib", pkg)))
    big = os.path.join(dst, "big")
    os.makedirs(big)
    for name, size in (("a.bin", 8 * MiB + 12345), ("b.bin", 24 * MiB)):
        with open(os.path.join(big, name), "wb") as f:
            for _ in range(0, size, MiB):
                f.write(os.urandom(min(MiB, size - f.tell())))
    with open(os.path.join(big, "sparse"), "wb") as f:
        f.seek(5 * MiB)
        f.write(b"end")
    os.symlink("a.bin", os.path.join(big, "link-to-a"))
    os.symlink("../lib/json/__init__.py", os.path.join(big, "rel-link"))
    os.symlink("/nonexistent/" + "x" * 200, os.path.join(big, "dangling"))
    os.link(os.path.join(big, "a.bin"), os.path.join(big, "hard-a"))
    os.mkdir(os.path.join(dst, "modes"))
    for mode in (0o600, 0o640, 0o755, 0o4755, 0o2750, 0o1777):
        p = os.path.join(dst, "modes", f"m{mode:o}")
        with open(p, "w") as f:
            f.write(f"{mode:o}\n")
        os.chmod(p, mode)
    os.chown(os.path.join(dst, "modes", "m640"), 1234, 5678)
    os.utime(os.path.join(dst, "modes", "m600"), ns=(1_000_000_123, 1_234_567_891_011_121_314))
    os.mkfifo(os.path.join(dst, "modes", "fifo"))
    os.makedirs(os.path.join(dst, "empty", "deep", "er"))


def tree_signature(root: str) -> dict[str, tuple]:
    """Relative path -> what must survive: type, mode, owner, size, mtime, content hash."""
    sig: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            extra: object = None
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(MiB):
                        h.update(chunk)
                extra = h.hexdigest()
                # Hard links: name the first path seen with this inode.
                extra = (extra, inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else None)
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            size = None if stat.S_ISDIR(st.st_mode) else st.st_size
            sig[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, size, mtime, extra)
    return sig


def compare_trees(expected: dict[str, tuple], actual: dict[str, tuple]) -> None:
    assert sorted(expected) == sorted(actual)
    bad = [(p, expected[p], actual[p]) for p in expected if expected[p] != actual[p]]
    assert not bad, bad[:10]


@needs_fuse
def test_copy_tree_roundtrip(tmp_path):
    src = str(tmp_path / "src")
    build_tree(src)
    expected = tree_signature(src)
    assert len(expected) > 500
    vol, mnt = tmp_path / "vol", tmp_path / "mnt"
    mnt.mkdir()
    mkfs(vol, "256M")

    with mounted(vol, mnt):
        # copytree keeps modes and mtimes; owners and hard links are copied by hand.
        dst = os.path.join(mnt, "tree")
        shutil.copytree(src, dst, symlinks=True, copy_function=_copy_keeping_links(src, dst))
        os.chown(os.path.join(dst, "modes", "m640"), 1234, 5678)
        compare_trees(expected, tree_signature(dst))

    # Remount read-only: what was committed at umount is all there.
    with mounted(vol, mnt, "--read-only"):
        compare_trees(expected, tree_signature(os.path.join(mnt, "tree")))
        expect_errno(errno.EROFS, os.mkdir, os.path.join(mnt, "nope"))
        expect_errno(errno.EROFS, open, os.path.join(mnt, "tree", "big", "a.bin"), "r+b")
    # And read-write again, after which fsck is clean.
    with mounted(vol, mnt):
        compare_trees(expected, tree_signature(os.path.join(mnt, "tree")))
        shutil.rmtree(os.path.join(mnt, "tree", "lib"))
    proc = fsck(vol)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _copy_keeping_links(src_root: str, dst_root: str):
    """A copy_function for copytree that recreates hard links and FIFOs."""
    seen: dict[int, str] = {}

    def copy(src: str, dst: str) -> str:
        st = os.lstat(src)
        if stat.S_ISFIFO(st.st_mode):
            os.mkfifo(dst, stat.S_IMODE(st.st_mode))
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            return dst
        if st.st_nlink > 1 and st.st_ino in seen:
            os.link(seen[st.st_ino], dst)
            return dst
        seen[st.st_ino] = dst
        return shutil.copy2(src, dst)

    return copy


WRITER = r"""
import hashlib, os, sys
d = sys.argv[1]
os.makedirs(d, exist_ok=True)
i = 0
while True:
    data = os.urandom(1 + (i * 7919) % 300000)
    name = "f%05d" % i
    fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)
    os.close(fd)
    sys.stdout.write("%s %s\n" % (name, hashlib.sha256(data).hexdigest()))
    sys.stdout.flush()
    i += 1
"""


@needs_fuse
def test_crash_keeps_every_fsynced_file(tmp_path):
    vol, mnt = tmp_path / "vol", tmp_path / "mnt"
    mnt.mkdir()
    mkfs(vol, "256M")
    m = mount(vol, mnt, foreground=True)
    writer = None
    reported: list[str] = []
    try:
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, os.path.join(mnt, "crash")],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        reader = threading.Thread(target=lambda: reported.extend(writer.stdout), daemon=True)
        reader.start()
        wait_for(lambda: len(reported) >= 5, 20, "the writer's first fsyncs")
        time.sleep(2)
        kill_mount(m)  # SIGKILL in the middle of writes, then fusermount3 -u -z
        writer.kill()
        writer.wait(timeout=30)
        reader.join(timeout=10)
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        cleanup(m)
    fsynced = dict(line.split() for line in reported if line.endswith("\n"))
    assert len(fsynced) >= 5

    with mounted(vol, mnt):
        for name, digest in fsynced.items():
            with open(os.path.join(mnt, "crash", name), "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == digest, name
    proc = fsck(vol)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- POSIX corner cases on one shared mount


@pytest.fixture(scope="module")
def rw(tmp_path_factory):
    """A read-write mount shared by the tests below; fsck must be clean afterwards."""
    if (reason := fuse_unavailable_reason()) is not None:
        pytest.skip(reason)
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


@needs_fuse
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


@needs_fuse
def test_enospc_on_tiny_volume(tmp_path):
    vol, mnt = tmp_path / "vol", tmp_path / "mnt"
    mnt.mkdir()
    mkfs(vol, "2M")
    with mounted(vol, mnt):
        p = os.path.join(mnt, "fill")
        chunk = os.urandom(64 * 1024)
        written = 0
        with pytest.raises(OSError) as info, open(p, "wb", buffering=0) as f:
            for _ in range(1000):
                written += f.write(chunk)
        assert info.value.errno == errno.ENOSPC
        assert 512 * 1024 < written < 2 * MiB
        assert os.statvfs(mnt).f_bavail < 16
        expect_errno(errno.ENOSPC, _fill_files, mnt)
        os.unlink(p)
        wait_for(lambda: os.statvfs(mnt).f_bavail > 100, 10, "space to come back")
        with open(os.path.join(mnt, "after"), "wb") as f:
            f.write(chunk)
    with mounted(vol, mnt), open(os.path.join(mnt, "after"), "rb") as f:
        assert f.read() == chunk
    proc = fsck(vol)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _fill_files(mnt: str) -> None:
    for i in range(100000):
        with open(os.path.join(mnt, f"small{i}"), "wb") as f:
            f.write(b"x" * 4096)


@needs_fuse
def test_umount_busy_then_waits_for_the_process(tmp_path):
    vol, mnt = tmp_path / "vol", tmp_path / "mnt"
    mnt.mkdir()
    mkfs(vol, "64M")
    m = mount(vol, mnt)
    sleeper = None
    try:
        sleeper = subprocess.Popen(["sleep", "60"], cwd=mnt)
        proc = run_cli("umount", mnt)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "busy" in lines[0].lower(), proc.stderr
        assert is_mounted(mnt) and pid_alive(m.pid)
        sleeper.kill()
        sleeper.wait()
        # Uncommitted data at umount time: umount returns after the process committed it.
        with open(os.path.join(mnt, "late"), "wb") as f:
            f.write(os.urandom(20 * MiB))
        proc = run_cli("umount", mnt)
        assert proc.returncode == 0, proc.stderr
        assert not pid_alive(m.pid)
        assert not is_mounted(mnt)
        assert not os.path.exists(os.path.join(vol, "mount.pid"))
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        cleanup(m)
    assert fsck(vol).returncode == 0


@needs_fuse
def test_sigterm_unmounts_and_commits(tmp_path):
    vol, mnt = tmp_path / "vol", tmp_path / "mnt"
    mnt.mkdir()
    mkfs(vol, "32M")
    m = mount(vol, mnt, "--commit-interval", "60", foreground=True)
    try:
        data = os.urandom(MiB)
        with open(os.path.join(mnt, "f"), "wb") as f:
            f.write(data)
        os.kill(m.pid, signal.SIGTERM)
        assert m.popen.wait(timeout=30) == 0
        assert not is_mounted(mnt)
    finally:
        cleanup(m)
    with mounted(vol, mnt), open(os.path.join(mnt, "f"), "rb") as f:
        assert f.read() == data


@needs_fuse
def test_external_fusermount_unmount(tmp_path):
    vol, mnt = tmp_path / "vol", tmp_path / "mnt"
    mnt.mkdir()
    mkfs(vol, "32M")
    m = mount(vol, mnt, foreground=True)
    try:
        with open(os.path.join(mnt, "f"), "wb") as f:
            f.write(b"kept")
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        assert m.popen.wait(timeout=30) == 0
    finally:
        cleanup(m)
    with mounted(vol, mnt), open(os.path.join(mnt, "f"), "rb") as f:
        assert f.read() == b"kept"
