"""Real mounts: a tree copied in and back, crash safety of fsync, the mount's lifecycle
(ENOSPC, a busy umount, SIGTERM, an external fusermount3 -u).

Each mount runs in a child process (tests/util.py). The POSIX corner cases on one shared
mount are in tests/test_mount_posix.py; the adapter without a mount in tests/test_adapter.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

# tests/test_switchover.py imports these three from here (they live in tests/fakes.py now).
from tests.fakes import CTX, fuse_errno, make_ops  # noqa: F401
from tests.util import (
    cleanup,
    expect_errno,
    fsck,
    is_mounted,
    kill_mount,
    mkfs,
    mount,
    mounted,
    needs_fuse,
    pid_alive,
    run_cli,
    wait_for,
)

MiB = 1 << 20

pytestmark = needs_fuse


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
