"""The places bench_volume.py runs its workloads on: a plain local directory, the pyfuse3
passthrough (passthrough.py) over a local directory, and a mirrorfs volume. Each sets up,
(re)mounts and tears down; mounts and processes are ours, stopped in ``teardown``."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

from common import (
    BENCH_DIR,
    MOUNT_TIMEOUT,
    BenchError,
    MirrorfsCli,
    MirrorfsMount,
    is_mounted,
    lazy_unmount,
    read_hwm_kib,
    volume_size_for,
)

log = logging.getLogger(__name__)

PASSTHROUGH = os.path.join(BENCH_DIR, "passthrough.py")


# ---- caches ---------------------------------------------------------------------------------


def can_drop_caches() -> bool:
    """True when this process may write /proc/sys/vm/drop_caches."""
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches(files: list[str]) -> None:
    """sync, then drop the page, dentry and inode caches; without root, fadvise *files*."""
    os.sync()
    if can_drop_caches():
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return
    for path in files:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---- targets --------------------------------------------------------------------------------


class Target:
    """A place to run the workloads: set up, (re)mount, and tear down."""

    name = "?"

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.peak_rss_kib: int | None = None
        self.log_path: str | None = None

    @property
    def root(self) -> str:
        """Directory where the workloads run."""
        raise NotImplementedError

    def setup(self) -> None:
        """Create the target's directories and mount it."""

    def remount(self, files: list[str]) -> None:
        """Make the next read cold: unmount, drop caches, mount again."""
        drop_caches(files)

    def teardown(self) -> None:
        """Unmount and stop every process that this target started."""

    def backing_files(self, relpath: str) -> list[str]:
        """Local files that hold *relpath*'s data (for fadvise without root)."""
        return [os.path.join(self.root, relpath)]

    @property
    def pid(self) -> int | None:
        """The FUSE server process, if the target has one."""
        return None

    def quiesce(self) -> None:
        """Before a timed workload: the previous one's data on disk (and on the target)."""
        os.sync()

    def _note_rss(self, pid: int | None) -> None:
        hwm = read_hwm_kib(pid) if pid else None
        if hwm is not None:
            self.peak_rss_kib = max(self.peak_rss_kib or 0, hwm)


class PlainTarget(Target):
    """(a) A plain directory on the local filesystem."""

    name = "plain"

    @property
    def root(self) -> str:
        return os.path.join(self.workdir, "plain")

    def setup(self) -> None:
        os.mkdir(self.root)


class PassthroughTarget(Target):
    """(b) bench/passthrough.py over a local directory, run as our child process."""

    name = "passthrough"
    prefix = "pt"  # of its directories and log in the work directory

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir)
        self.source = os.path.join(workdir, f"{self.prefix}-src")
        self.mountpoint = os.path.join(workdir, f"{self.prefix}-mnt")
        self.log_path = os.path.join(workdir, f"{self.name}.log")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The server process, while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def argv(self) -> list[str]:
        """The command that serves ``source`` at ``mountpoint`` in the foreground."""
        return [sys.executable, PASSTHROUGH, self.source, self.mountpoint]

    @property
    def root(self) -> str:
        return self.mountpoint

    def setup(self) -> None:
        os.mkdir(self.source)
        os.mkdir(self.mountpoint)
        self._mount()

    def _mount(self) -> None:
        assert self.log_path is not None
        with open(self.log_path, "ab") as logf:
            # Own session: a Ctrl-C on the terminal reaches the benchmark, which unmounts.
            self._proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(self.mountpoint):
            if self._proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self._proc.returncode} before mounting")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not mount in time")
            time.sleep(0.05)

    def _unmount(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            lazy_unmount(self.mountpoint)
            return
        try:
            if proc.poll() is None:
                self._note_rss(proc.pid)
                subprocess.run(["fusermount3", "-u", self.mountpoint], capture_output=True)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) still running: SIGTERM", self.name, proc.pid)
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        finally:
            lazy_unmount(self.mountpoint)

    def remount(self, files: list[str]) -> None:
        self._unmount()
        drop_caches(files)
        self._mount()

    def teardown(self) -> None:
        self._unmount()

    def backing_files(self, relpath: str) -> list[str]:
        return [os.path.join(self.source, relpath)]


class MirrorfsTarget(Target):
    """(c) A mirrorfs volume, driven through its CLI (mkfs, mount, umount)."""

    name = "mirrorfs"

    def __init__(self, workdir: str, volume_size: int, mkfs_args: list[str]) -> None:
        super().__init__(workdir)
        self.log_path = os.path.join(workdir, "mirrorfs.log")
        self.mfs = MirrorfsMount(
            MirrorfsCli(self.log_path),
            os.path.join(workdir, "mfs-vol"),
            os.path.join(workdir, "mfs-mnt"),
        )
        self.volume_size = volume_size
        self.mkfs_args = mkfs_args
        self.mount_args: list[str] = []  # for every mount of the volume

    @property
    def root(self) -> str:
        return self.mfs.mountpoint

    @property
    def pid(self) -> int | None:
        """The mount process, while it runs."""
        return self.mfs.our_pid()

    def setup(self) -> None:
        self.mfs.mkfs(volume_size_for(self.volume_size), *self.mkfs_args)
        self._mount()

    def _mount(self) -> None:
        self.mfs.mount(*self.mount_args)

    def quiesce(self) -> None:
        # sync(2) does not reach FUSE: an fsync of a directory commits the whole volume.
        if self.pid is not None:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.sync()

    def _unmount(self) -> None:
        self._note_rss(self.mfs.our_pid())
        self.mfs.unmount()

    def remount(self, files: list[str]) -> None:
        self._unmount()
        drop_caches(files)
        self._mount()

    def teardown(self) -> None:
        self._unmount()

    def backing_files(self, relpath: str) -> list[str]:
        return [os.path.join(self.mfs.volume, "blocks")]
