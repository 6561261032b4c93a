"""Helpers for tests that run the ``mirrorfs`` command and mount for real.

A mount always runs in a child process (``sys.executable -m mirrorfs mount``): pyfuse3
allows one mount per process, and a crash test must be able to SIGKILL it. Tests kill only
processes they started, by pid, and clean up every mount in a ``finally``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from mirrorfs.store.files import DAEMON_LOG_FILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOUNT_TIMEOUT = 30.0
#: The log file of a daemon serving a volume directory (what checklogs reads).
DAEMON_LOG = DAEMON_LOG_FILE


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def fuse_unavailable_reason() -> str | None:
    """Why real FUSE mounts cannot run here, or None when they can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc.strerror}"
    os.close(fd)
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 cannot be imported: {exc}"
    return None


#: The one mark for a test that mounts FUSE or starts a daemon that mounts. It is the
#: ``mount`` marker itself: tests/conftest.py turns every ``mount`` test into a skip, with
#: the reason, where FUSE is unusable, and ``pytest -m "not mount"`` leaves them all out.
needs_fuse = pytest.mark.mount


def mounts_fuse(fixture_fn):
    """Declare a fixture that mounts: every test using it gets the ``mount`` mark.

    Put it under ``@pytest.fixture``; tests/conftest.py reads the flag at collection.
    """
    fixture_fn.mounts_fuse = True
    return fixture_fn


#: The test running now (set by tests/conftest.py around each test's setup, call and
#: teardown), so that the mount helpers can check that it carries the ``mount`` mark.
current_test: pytest.Item | None = None


def require_mount_mark(what: str) -> None:
    """Fail a test that mounts without the ``mount`` mark (``-m "not mount"`` would run it)."""
    item = current_test
    if item is not None and item.get_closest_marker("mount") is None:
        raise AssertionError(
            f"{item.nodeid} {what} but has no mount mark: add @needs_fuse (or "
            "pytestmark = needs_fuse), or mount through a fixture flagged @mounts_fuse"
        )


def _mounts(args: tuple[str, ...]) -> bool:
    """Whether a ``mirrorfs ARGS`` command line mounts FUSE (or starts a daemon that does)."""
    return bool(args) and (args[0] == "mount" or "--mount" in args)


def run_cli(*args: str, timeout: float = 120.0, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m mirrorfs ARGS`` and capture its output (text)."""
    if _mounts(tuple(map(str, args))):
        require_mount_mark(f"runs mirrorfs {args[0]}")
    proc = subprocess.run(
        [sys.executable, "-m", "mirrorfs", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"mirrorfs {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def mkfs(volume: str | os.PathLike, size: str = "64M", *extra: str) -> None:
    run_cli("mkfs", os.fspath(volume), "--size", size, *extra, check=True)


def fsck(volume: str | os.PathLike) -> subprocess.CompletedProcess:
    return run_cli("fsck", os.fspath(volume))


# -- mounts


def _unescape(field: str) -> str:
    import re

    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_entry(mountpoint: str | os.PathLike) -> tuple[str, str] | None:
    """(source, fstype) of the topmost mount at ``mountpoint`` in /proc/mounts, or None."""
    target = os.path.abspath(mountpoint)
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and _unescape(fields[1]) == target:
                found = (_unescape(fields[0]), fields[2])
    return found


def is_mounted(mountpoint: str | os.PathLike) -> bool:
    entry = mount_entry(mountpoint)
    return entry is not None and entry[1] == "fuse.mirrorfs"


def pid_alive(pid: int) -> bool:
    """True while any thread of ``pid`` runs (a zombie counts as exited: nobody may reap it
    here). After a SIGKILL the main thread can be a zombie while a worker thread still
    finishes an fsync, and holds the process's files (a volume's lock) until it has."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except FileNotFoundError:
            continue
        if stat[stat.rindex(b")") + 2 :][:1] not in (b"Z", b"X"):
            return True
    return False


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Mount:
    """A running mount: its process id, volume and mountpoint."""

    pid: int
    volume: str
    mountpoint: str
    popen: subprocess.Popen | None = None  # set for --foreground children
    stderr: str = ""  # what ``mirrorfs mount`` printed (its start-up warnings)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid)


def mount(
    volume: str | os.PathLike,
    mountpoint: str | os.PathLike,
    *args: str,
    foreground: bool = False,
    timeout: float = MOUNT_TIMEOUT,
) -> Mount:
    """Mount ``volume`` at ``mountpoint`` in a child process and wait until it is live.

    Default: the daemonizing path (``mirrorfs mount`` returns once the mount answers; the
    pid comes from the volume's mount.pid). ``foreground=True``: a ``--foreground`` child
    of this process, waited for in /proc/mounts.
    """
    require_mount_mark("mounts")
    volume, mountpoint = os.path.abspath(volume), os.path.abspath(mountpoint)
    if not foreground:
        proc = run_cli("mount", volume, mountpoint, *args, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"mount failed ({proc.returncode}): {proc.stderr.strip()}")
        with open(os.path.join(volume, "mount.pid")) as f:
            pid = int(f.read())
        assert is_mounted(mountpoint), f"{mountpoint} not in /proc/mounts after mount"
        return Mount(pid, volume, mountpoint, stderr=proc.stderr)

    # stderr to a file, not a pipe: nobody reads it while the mount runs, and a full pipe
    # would block the mount process.
    stderr_path = os.path.join(volume, "foreground.stderr")
    with open(stderr_path, "wb") as stderr:
        popen = subprocess.Popen(
            [sys.executable, "-m", "mirrorfs", "mount", volume, mountpoint, "--foreground", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=_env(),
            cwd=REPO,
        )
    m = Mount(popen.pid, volume, mountpoint, popen)
    try:
        deadline = time.monotonic() + timeout
        while not is_mounted(mountpoint):
            if popen.poll() is not None:
                with open(stderr_path, errors="replace") as f:
                    raise AssertionError(f"mount exited {popen.returncode}: {f.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{mountpoint} not mounted after {timeout} s")
            time.sleep(0.02)
        os.stat(mountpoint)  # served: INIT done
    except BaseException:
        kill_mount(m)
        raise
    return m


def umount(m: Mount | str | os.PathLike, timeout: float = 120.0) -> None:
    """``mirrorfs umount`` (waits for the mount process to finish its final commit)."""
    mountpoint = m.mountpoint if isinstance(m, Mount) else os.path.abspath(m)
    proc = run_cli("umount", mountpoint, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"umount failed ({proc.returncode}): {proc.stderr.strip()}")
    if isinstance(m, Mount):
        if m.popen is not None:
            m.popen.wait(timeout=timeout)
        assert not m.alive(), f"mount process {m.pid} still running after umount"


def lazy_unmount(mountpoint: str | os.PathLike) -> None:
    """``fusermount3 -u -z``: detach a (possibly dead) mount; no error if not mounted."""
    mountpoint = os.path.abspath(mountpoint)
    if mount_entry(mountpoint) is not None and is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)


def kill_mount(m: Mount) -> None:
    """SIGKILL the mount process (ours, by pid) and clear its dead mountpoint."""
    if m.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(m.pid, signal.SIGKILL)
    if m.popen is not None:
        m.popen.wait(timeout=30)
    else:
        wait_for(lambda: not pid_alive(m.pid), 30, f"pid {m.pid} to die")
    lazy_unmount(m.mountpoint)


def cleanup(m: Mount | None) -> None:
    """For ``finally``: unmount cleanly if possible, else kill; never raises."""
    if m is None:
        return
    try:
        if is_mounted(m.mountpoint) and m.alive():
            umount(m, timeout=60)
    except Exception:
        pass
    try:
        kill_mount(m)
    except Exception:
        pass


@contextlib.contextmanager
def mounted(
    volume: str | os.PathLike, mountpoint: str | os.PathLike, *args: str, foreground: bool = False
) -> Iterator[Mount]:
    """Mount for the duration of a ``with`` block; unmounted (or killed) on the way out."""
    m = mount(volume, mountpoint, *args, foreground=foreground)
    try:
        yield m
        if is_mounted(m.mountpoint) and m.alive():
            umount(m)
    finally:
        cleanup(m)


@contextlib.contextmanager
def public_dir() -> Iterator[str]:
    """An empty directory that every user can reach (pytest's tmp dirs are 0700)."""
    path = tempfile.mkdtemp(prefix="mirrorfs-test-")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        if not is_mounted(path):
            shutil.rmtree(path, ignore_errors=True)


def expect_errno(err: int, fn, *args, **kwargs) -> OSError:
    """Call ``fn`` and assert that it fails with ``err``."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        assert exc.errno == err, f"expected {errno.errorcode[err]}, got {exc!r}"
        return exc
    raise AssertionError(f"expected {errno.errorcode[err]}, {fn.__name__} succeeded")
