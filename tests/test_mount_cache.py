"""The kernel's caches on a read-write mount: readahead, O_DIRECT and the page cache, and
the writeback cache (``-o writeback_cache``) against the plain write-through mount.

Each behaviour test runs on both kinds of mount (module fixtures ``plain`` and
``writeback``); fsck must be clean after each.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import shutil
import subprocess
import time
from types import SimpleNamespace

import pytest

from mirrorfs.fuse.bdi import READAHEAD_KB, bdi_path
from tests.util import (
    cleanup,
    fsck,
    kill_mount,
    mkfs,
    mount,
    mounted,
    mounts_fuse,
    needs_fuse,
    umount,
    wait_for,
)

MiB = 1 << 20
WRITEBACK = ("-o", "writeback_cache")

pytestmark = needs_fuse


def _shared_mount(tmp_path_factory, name: str, args: tuple[str, ...]):
    vol = tmp_path_factory.mktemp(name) / "vol"
    mnt = tmp_path_factory.mktemp(name + "-mnt")
    mkfs(vol, "128M")
    m = mount(vol, mnt, *args)
    try:
        yield SimpleNamespace(vol=str(vol), mnt=str(mnt), args=args, proc=m)
        umount(m)
    finally:
        cleanup(m)
    proc = fsck(vol)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
@mounts_fuse
def plain(tmp_path_factory):
    yield from _shared_mount(tmp_path_factory, "plain", ())


@pytest.fixture(scope="module")
@mounts_fuse
def writeback(tmp_path_factory):
    yield from _shared_mount(tmp_path_factory, "writeback", WRITEBACK)


@pytest.fixture(params=["plain", "writeback"])
def rw(request):
    """Each test below once on each kind of mount."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def d(rw, request):
    path = os.path.join(rw.mnt, request.node.name.replace("[", "_").replace("]", ""))
    os.mkdir(path)
    return path


def _aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))  # page-aligned, as O_DIRECT wants
    buf.write(data)
    return buf


def _remount(rw) -> None:
    """Unmount the shared mount and mount it again (the kernel forgets all it cached)."""
    umount(rw.proc)
    rw.proc = mount(rw.vol, rw.mnt, *rw.args)


# -- request sizes


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a bdi's readahead needs root")
def test_readahead_is_raised_to_one_request_of_max_pages(rw):
    with open(bdi_path(os.stat(rw.mnt).st_dev, "read_ahead_kb")) as f:
        assert int(f.read()) >= READAHEAD_KB


# -- O_DIRECT and the page cache


def test_direct_write_then_buffered_read_sees_new_data(d):
    p = os.path.join(d, "f")
    with open(p, "wb") as f:
        f.write(b"a" * (256 * 1024))
    # The reader keeps the pages cached across the direct write.
    with open(p, "rb", buffering=0) as reader:
        assert reader.read() == b"a" * (256 * 1024)
        fd = os.open(p, os.O_RDWR | os.O_DIRECT)
        try:
            assert os.pwritev(fd, [_aligned(b"b" * 65536)], 65536) == 65536
        finally:
            os.close(fd)
        reader.seek(0)
        data = reader.read()
    assert data == b"a" * 65536 + b"b" * 65536 + b"a" * (128 * 1024)
    with open(p, "rb") as f:  # a new open (keep_cache) sees it too
        assert f.read() == data


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
@pytest.mark.parametrize("engine", ["libaio", "io_uring"])
def test_async_direct_writes_then_buffered_read_sees_new_data(d, engine):
    p = os.path.join(d, "aio")
    size = 4 * MiB
    with open(p, "wb") as f:
        f.write(b"a" * size)
    with open(p, "rb", buffering=0) as reader:
        assert reader.read() == b"a" * size  # cached
        proc = subprocess.run(
            ["fio", "--name=aio", f"--filename={p}", "--rw=randwrite", "--bs=4k",
             f"--size={size}", "--io_size=1M", f"--ioengine={engine}", "--direct=1",
             "--iodepth=16", "--buffer_pattern=0x62", "--randseed=8"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        try:
            truth = _aligned(bytes(size))
            assert os.preadv(fd, [truth], 0) == size
        finally:
            os.close(fd)
        assert truth[:].count(b"b") > 0
        reader.seek(0)
        assert reader.read() == truth[:]
    with open(p, "rb") as f:
        assert f.read() == truth[:]


# -- size, times and offsets through the cache


def test_size_and_mtime_after_writes_survive_close_and_remount(rw, d):
    p = os.path.join(d, "f")
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 5000)
        time.sleep(0.01)
        before = time.time_ns()
        os.pwrite(fd, b"y" * 100, 10000)
        st = os.fstat(fd)
        assert st.st_size == 10100
        assert st.st_mtime_ns >= before - 10**7 and st.st_ctime_ns >= before - 10**7
    finally:
        os.close(fd)
    after_close = os.stat(p)
    assert after_close.st_size == 10100
    assert after_close.st_mtime_ns == st.st_mtime_ns
    _remount(rw)
    again = os.stat(p)
    assert (again.st_size, again.st_mtime_ns, again.st_ctime_ns) == (
        after_close.st_size,
        after_close.st_mtime_ns,
        after_close.st_ctime_ns,
    )
    with open(p, "rb") as f:
        assert f.read() == b"x" * 5000 + bytes(5000) + b"y" * 100


def test_o_append_from_two_handles(d):
    p = os.path.join(d, "log")
    with open(p, "wb") as f:
        f.write(b"0" * 10)
    a = os.open(p, os.O_WRONLY | os.O_APPEND)
    b = os.open(p, os.O_RDWR | os.O_APPEND)
    try:
        for i in range(20):
            os.write(a, b"a" * (i + 1))
            os.pwrite(b, b"B" * 3, 0)  # Linux: O_APPEND wins over the offset
        os.write(b, b"end")
    finally:
        os.close(a)
        os.close(b)
    expected = b"0" * 10 + b"".join(b"a" * (i + 1) + b"BBB" for i in range(20)) + b"end"
    assert os.path.getsize(p) == len(expected)
    with open(p, "rb") as f:
        assert f.read() == expected


def test_write_past_eof_then_read_and_fsync(rw, d):
    p = os.path.join(d, "sparse")
    with open(p, "wb") as f:
        f.write(b"head")
        f.seek(7 * MiB + 123)
        f.write(b"tail")
        f.flush()
        os.fsync(f.fileno())
        assert os.fstat(f.fileno()).st_size == 7 * MiB + 127
    _remount(rw)
    with open(p, "rb") as f:
        data = f.read()
    assert data == b"head" + bytes(7 * MiB + 119) + b"tail"


def test_truncate_while_dirty_pages_exist(rw, d):
    p = os.path.join(d, "t")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, os.urandom(3 * MiB))  # with writeback: dirty in the page cache
        os.ftruncate(fd, MiB + 5)
        os.pwrite(fd, b"z", 2 * MiB)  # past the new EOF: the gap reads as zeros
        assert os.fstat(fd).st_size == 2 * MiB + 1
        head = os.pread(fd, MiB + 5, 0)
    finally:
        os.close(fd)
    _remount(rw)
    with open(p, "rb") as f:
        data = f.read()
    assert len(data) == 2 * MiB + 1
    assert data[: MiB + 5] == head
    assert data[MiB + 5 :] == bytes(MiB - 5) + b"z"


# -- durability


@pytest.mark.parametrize("args", [(), WRITEBACK], ids=["plain", "writeback"])
def test_fsync_is_durable_through_the_cache(tmp_path, args):
    """What fsync returned for survives a SIGKILL of the mount (with the writeback cache
    the kernel writes the dirty pages back before it sends FSYNC)."""
    vol, mnt = tmp_path / "vol", tmp_path / "mnt"
    mnt.mkdir()
    mkfs(vol, "64M")
    data = os.urandom(3 * MiB + 123)
    m = mount(vol, mnt, *args)
    try:
        p = os.path.join(mnt, "f")
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for off in range(0, len(data), 4096):  # small writes: cached with writeback
                os.pwrite(fd, data[off : off + 4096], off)
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        kill_mount(m)  # SIGKILL: nothing after the fsync is committed
    finally:
        cleanup(m)
    with mounted(vol, mnt, *args):
        again = os.stat(os.path.join(mnt, "f"))
        assert (again.st_size, again.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
        with open(os.path.join(mnt, "f"), "rb") as f:
            assert f.read() == data
    proc = fsck(vol)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- a full volume


@pytest.mark.parametrize("args", [(), WRITEBACK], ids=["plain", "writeback"])
def test_enospc_on_a_full_volume(tmp_path, args):
    vol, mnt = tmp_path / "vol", tmp_path / "mnt"
    mnt.mkdir()
    mkfs(vol, "4M")
    with mounted(vol, mnt, *args):
        p = os.path.join(mnt, "fill")
        chunk = os.urandom(64 * 1024)
        err = None
        fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for _ in range(200):
                os.write(fd, chunk)
            os.fsync(fd)
        except OSError as exc:
            err = exc
        finally:
            try:
                os.close(fd)
            except OSError as exc:  # with writeback, close may be the one that reports it
                err = err or exc
        assert err is not None and err.errno == errno.ENOSPC, err
        # The mount stays writable where there is room.
        os.unlink(p)
        # The blocks come back once the kernel forgets the inode (release, forget).
        wait_for(lambda: os.statvfs(mnt).f_bavail > 100, 10, "space to come back")
        with open(os.path.join(mnt, "after"), "wb") as f:
            f.write(chunk)
            os.fsync(f.fileno())
    with mounted(vol, mnt, *args), open(os.path.join(mnt, "after"), "rb") as f:
        assert f.read() == chunk
    proc = fsck(vol)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_close_reports_enospc_of_cached_writes(tmp_path):
    """close(2) of a writeback-cache file writes its dirty pages back and reports their
    ENOSPC (FLUSH is still answered in this mode): nothing is lost silently when the
    application never calls fsync."""
    vol, mnt = tmp_path / "vol", tmp_path / "mnt"
    mnt.mkdir()
    mkfs(vol, "4M")
    with mounted(vol, mnt, *WRITEBACK):
        chunk = os.urandom(64 * 1024)
        closes = []
        for name in ("first", "second"):
            p = os.path.join(mnt, name)
            write_err = close_err = None
            fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for _ in range(200):
                    os.write(fd, chunk)
            except OSError as exc:
                write_err = exc
            finally:
                try:
                    os.close(fd)
                except OSError as exc:
                    close_err = exc
            got = write_err or close_err
            assert got is not None and got.errno == errno.ENOSPC, (name, got)
            if write_err is None:  # the writes went to the page cache: close must say it
                assert close_err is not None and close_err.errno == errno.ENOSPC, name
            closes.append(close_err)
            os.unlink(p)
            wait_for(lambda: os.statvfs(mnt).f_bavail > 100, 10, "space to come back")
        assert any(c is not None for c in closes), "no close(2) reported the ENOSPC"
    proc = fsck(vol)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- a randomized model


def _model_run(rw, seed: int, seconds: float, remounts: int) -> None:
    """Random writes (buffered and O_DIRECT), truncates, reads, fsyncs and remounts against
    a bytearray model; the reads go through the buffered handle, so they see the page cache."""
    rnd = random.Random(seed)
    p = os.path.join(rw.mnt, f"model-{seed}")
    model = bytearray()
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    dfd = os.open(p, os.O_RDWR | os.O_DIRECT)
    deadline = time.monotonic() + seconds
    remount_every = max(seconds / (remounts + 1), 0.5)
    next_remount = time.monotonic() + remount_every
    log: list[str] = []
    try:
        while time.monotonic() < deadline:
            op = rnd.choices(["write", "direct", "truncate", "read", "fsync"], [40, 10, 10, 30, 5])
            op = op[0]
            if op == "direct":
                off = 4096 * rnd.randrange(0, len(model) // 4096 + 64)
                data = rnd.randbytes(4096 * rnd.choice([1, 3, 16]))
                assert os.pwritev(dfd, [_aligned(data)], off) == len(data)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off : off + len(data)] = data
                log.append(f"direct {off} {len(data)}")
            elif op == "write":
                off = rnd.randrange(0, max(len(model), 1) + rnd.choice([1, 4096, 3 * MiB]))
                data = rnd.randbytes(rnd.choice([1, 17, 4096, 5000, 65536, 300_000]))
                assert os.pwrite(fd, data, off) == len(data)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off : off + len(data)] = data
                log.append(f"write {off} {len(data)}")
            elif op == "truncate":
                size = rnd.randrange(0, len(model) + 2 * MiB)
                os.ftruncate(fd, size)
                if size < len(model):
                    del model[size:]
                else:
                    model.extend(bytes(size - len(model)))
                log.append(f"truncate {size}")
            elif op == "read":
                off = rnd.randrange(0, len(model) + 10)
                n = rnd.choice([1, 4096, 100_000, MiB])
                got = os.pread(fd, n, off)
                assert got == bytes(model[off : off + n]), (seed, log[-20:], "read", off, n)
            else:
                os.fsync(fd)
                log.append("fsync")
            assert os.fstat(fd).st_size == len(model), (seed, log[-20:])
            if time.monotonic() >= next_remount:
                os.close(fd)
                os.close(dfd)
                fd = dfd = -1
                _remount(rw)
                log.append("remount")
                fd = os.open(p, os.O_RDWR)
                dfd = os.open(p, os.O_RDWR | os.O_DIRECT)
                next_remount = time.monotonic() + remount_every
    finally:
        for f in (fd, dfd):
            if f >= 0:
                os.close(f)
    _remount(rw)
    with open(p, "rb") as f:
        assert f.read() == bytes(model), (seed, log[-20:])
    os.unlink(p)


def test_random_operations_match_a_model_file(rw):
    seed = int(os.environ.get("MIRRORFS_MODEL_SEED", "0")) or random.randrange(1, 1 << 30)
    print(f"model seed {seed} (MIRRORFS_MODEL_SEED={seed} repeats it)")
    _model_run(rw, seed, seconds=12.0, remounts=3)
