"""What the benchmarks in bench/ share: workloads, mounts and the mirrorfs processes.

- workloads: ``seq_write`` (random data in 1 MiB writes, then fsync), ``check_content``,
  the ``cp -a`` tree (``stdlib_tree``, ``scan_tree``, ``copy_tree``);
- mounts and processes: ``is_mounted``, ``pid_alive``, ``lazy_unmount``, ``read_hwm_kib``;
- mirrorfs driven through its command line only: ``MirrorfsCli`` (one command, output
  appended to a log file), ``MirrorfsMount`` (mkfs, mount, umount of a volume) and
  ``ReplicaDaemon`` (``mirrorfs replica``, stopped with SIGTERM);
- the report: ``describe_environment``, ``human_size``, ``work_directory``.

Every process is signalled only by its pid, and only after its command line was checked to
name our volume, so a recycled pid is never hit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)

MB = 1_000_000
MiB = 1 << 20
CHUNK = MiB
POOL_BYTES = 64 * MiB  # random data cycled through by the writer; lz4 finds nothing in it
QUICK_TREE = ("asyncio", "email", "json", "xml")  # a part of the stdlib, for --quick

MOUNT_TIMEOUT = 120.0
UMOUNT_TIMEOUT = 600.0
STOP_TIMEOUT = 60.0  # SIGTERM to a daemon, then this long before SIGKILL


class BenchError(Exception):
    """A benchmark step failed; the message is one line for the report."""


# ---- workloads ------------------------------------------------------------------------------


@dataclass(slots=True)
class Tree:
    """The source tree of the cp -a workload."""

    root: str
    entries: list[str]  # top-level names that cp -a copies
    count: int  # files, directories and symlinks, the top-level entries included
    size: int  # bytes in regular files


def parse_size(text: str) -> int:
    """'1G', '64M', '512K' or a byte count -> bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def human_size(n: int) -> str:
    """Bytes -> '1 GiB', '64 MiB', ... for labels."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def seq_write(path: str, size: int, pool: bytes) -> float:
    """Write *size* bytes to a new file in 1 MiB writes, fsync, close; return seconds."""
    view = memoryview(pool)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        while offset < size:
            n = min(CHUNK, size - offset)
            at = offset % len(pool)
            chunk = view[at : at + n]
            done = 0
            while done < n:
                done += os.write(fd, chunk[done:])
            offset += n
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def check_content(path: str, size: int, pool: bytes) -> None:
    """Compare the first, a middle and the last chunk with what was written (untimed)."""
    chunks = max(1, (size + CHUNK - 1) // CHUNK)
    with open(path, "rb") as f:
        for index in sorted({0, chunks // 2, chunks - 1}):
            offset = index * CHUNK
            n = min(CHUNK, size - offset)
            at = offset % len(pool)
            f.seek(offset)
            if f.read(n) != pool[at : at + n]:
                raise BenchError(f"{path}: wrong data in the 1 MiB chunk at offset {offset}")


def stdlib_tree(quick: bool, tree_arg: str | None) -> tuple[str, list[str], str]:
    """The cp -a source: (root, top-level entries, label)."""
    if tree_arg:
        root = os.path.abspath(tree_arg)
        return os.path.dirname(root), [os.path.basename(root)], os.path.basename(root)
    root = os.path.dirname(os.__file__)
    if quick:
        entries = [e for e in QUICK_TREE if os.path.exists(os.path.join(root, e))]
        return root, entries, "stdlib subset"
    entries = sorted(e for e in os.listdir(root) if e != "site-packages")
    return root, entries, "stdlib"


def scan_tree(root: str, entries: list[str]) -> Tree:
    """Count what cp -a will copy, and read every file once so that no target reads cold."""
    count = size = 0
    buf = bytearray(CHUNK)

    def visit(path: str) -> None:
        nonlocal count, size
        st = os.lstat(path)
        count += 1
        if os.path.isdir(path) and not os.path.islink(path):
            for name in os.listdir(path):
                visit(os.path.join(path, name))
        elif os.path.isfile(path) and not os.path.islink(path):
            size += st.st_size
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass

    for name in entries:
        visit(os.path.join(root, name))
    return Tree(root, entries, count, size)


def count_entries(directory: str) -> int:
    """Files, directories and symlinks below *directory* (itself not counted)."""
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(directory))


def copy_tree(tree: Tree, dest: str) -> float:
    """``cp -a`` the tree's entries into *dest*; return seconds; check the entry count."""
    os.mkdir(dest)
    argv = ["cp", "-a", *(os.path.join(tree.root, e) for e in tree.entries), dest + "/"]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(f"cp -a failed ({proc.returncode}): {first_line(proc.stderr)}")
    copied = count_entries(dest)
    if copied != tree.count:
        raise BenchError(f"cp -a: {copied} entries in the copy, {tree.count} in the source")
    return elapsed


# ---- mounts and processes -------------------------------------------------------------------


def is_mounted(path: str) -> bool:
    """True if *path* is a mount point, also when its FUSE server is gone (ENOTCONN)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == real:
                return True
    return False


def read_hwm_kib(pid: int) -> int | None:
    """VmHWM (peak resident set) of *pid* in KiB, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pid_alive(pid: int) -> bool:
    """True if *pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cmdline_names(pid: int, *paths: str) -> bool:
    """True if the command line of *pid* names one of *paths* (a pid we may signal)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return any(os.fsencode(p) in cmdline for p in paths)


def lazy_unmount(mountpoint: str) -> None:
    """Last resort: detach the mount even if its server is stuck or dead."""
    if is_mounted(mountpoint):
        log.warning("lazy unmount of %s", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)


def log_tail(path: str, lines: int = 8) -> str:
    """The last lines of a log file, indented, for error reports."""
    try:
        with open(path, errors="replace") as f:
            tail = f.readlines()[-lines:]
    except OSError:
        return ""
    return "".join("      | " + line for line in tail).rstrip()


def first_line(text: str) -> str:
    """The last non-empty line of a command's output (where the error usually is)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def read_pid_file(path: str, timeout: float = 10.0) -> int:
    """The pid in *path*, waiting up to *timeout* for the daemon to write it."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError, IndexError), open(path) as f:
            return int(f.read().split()[0])
        if time.monotonic() > deadline:
            raise BenchError(f"{path} holds no pid")
        time.sleep(0.05)


def stop_pid(pid: int, *paths: str, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM *pid* if it still names one of *paths*; wait; SIGKILL after *timeout*."""
    if not (pid_alive(pid) and cmdline_names(pid, *paths)):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid) and cmdline_names(pid, *paths):
        log.warning("pid %d ignored SIGTERM for %.0f s: SIGKILL", pid, timeout)
        os.kill(pid, signal.SIGKILL)


# ---- mirrorfs through its command line ------------------------------------------------------


def run_mirrorfs(args: tuple[str, ...], out, timeout: float) -> subprocess.CompletedProcess:
    """``python -m mirrorfs ARGS`` from the repo, stdout and stderr to the open file *out*
    (a file, not a pipe: a daemon the command starts would hold a pipe open); BenchError if
    it does not finish in *timeout* seconds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_DIR, env.get("PYTHONPATH")]))
    try:
        return subprocess.run(
            [sys.executable, "-m", "mirrorfs", *args],
            cwd=REPO_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"mirrorfs {args[0]} did not finish in {timeout:.0f} s") from None


class MirrorfsCli:
    """Runs ``python -m mirrorfs ...`` from the repo, output appended to *log_path*."""

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path

    def run(self, *args: str, timeout: float) -> None:
        """Run one command; BenchError (its last output line) if it fails or hangs."""
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n$ mirrorfs {' '.join(args)}\n".encode())
            logf.flush()
            proc = run_mirrorfs(args, logf, timeout)
        if proc.returncode != 0:
            with open(self.log_path, errors="replace") as f:
                last = first_line(f.read())
            raise BenchError(f"mirrorfs {args[0]} exited with {proc.returncode}: {last}")


def volume_size_for(nbytes: int) -> str:
    """The ``mkfs --size`` argument for a volume holding *nbytes*: whole GiB, at least 4G."""
    return f"{max(4, -(-nbytes // (1 << 30)))}G"


class MirrorfsMount:
    """A mirrorfs volume, made and mounted through the CLI; knows its mount process."""

    def __init__(self, cli: MirrorfsCli, volume: str, mountpoint: str) -> None:
        self.cli = cli
        self.volume = volume
        self.mountpoint = mountpoint
        self.pid: int | None = None

    def mkfs(self, size: str, *extra: str) -> None:
        """``mirrorfs mkfs VOLUME --size SIZE [extra]``; creates the mountpoint too."""
        os.makedirs(self.mountpoint, exist_ok=True)
        self.cli.run("mkfs", self.volume, "--size", size, *extra, timeout=600)

    def mount(self, *extra: str) -> None:
        """``mirrorfs mount VOLUME MOUNTPOINT [extra]``; returns once mounted."""
        self.cli.run("mount", self.volume, self.mountpoint, *extra, timeout=MOUNT_TIMEOUT)
        self.pid = read_pid_file(os.path.join(self.volume, "mount.pid"))
        if not is_mounted(self.mountpoint):
            raise BenchError("mirrorfs mount returned but the mountpoint is not mounted")

    def our_pid(self) -> int | None:
        """The mount process we started, if it is still the same process."""
        if self.pid is None or not pid_alive(self.pid):
            return None
        # Never signal a recycled pid: the process must name our volume or mountpoint.
        return self.pid if cmdline_names(self.pid, self.volume, self.mountpoint) else None

    def unmount(self) -> None:
        """``mirrorfs umount``; then SIGTERM/SIGKILL and a lazy unmount if still needed."""
        try:
            if is_mounted(self.mountpoint):
                self.cli.run("umount", self.mountpoint, timeout=UMOUNT_TIMEOUT)
        finally:
            pid = self.our_pid()
            if pid is not None:
                log.warning("mirrorfs mount process %d still running after umount", pid)
                stop_pid(pid, self.volume, self.mountpoint, timeout=30)
            self.pid = None
            lazy_unmount(self.mountpoint)


class ReplicaDaemon:
    """``mirrorfs replica DIR --listen 127.0.0.1:0 [--mount MNT]``; stopped with SIGTERM."""

    def __init__(self, cli: MirrorfsCli, volume: str, mountpoint: str | None = None) -> None:
        self.cli = cli
        self.volume = volume
        self.mountpoint = mountpoint
        self.pid: int | None = None
        self.port = 0
        self.extra_args: list[str] = []  # e.g. --tls-cert/--tls-key/--tls-ca

    def start(self) -> None:
        """Start the daemon (it detaches); learn its pid and the port it listens on."""
        extra = ["--mount", self.mountpoint] if self.mountpoint else []
        extra += self.extra_args
        if self.mountpoint:
            os.makedirs(self.mountpoint, exist_ok=True)
        self.cli.run(
            "replica", self.volume, "--listen", "127.0.0.1:0", *extra, timeout=MOUNT_TIMEOUT
        )
        self.pid = read_pid_file(os.path.join(self.volume, "replica.pid"))

    def stop(self) -> None:
        """SIGTERM our daemon and wait for it (it unmounts itself); lazy unmount if needed."""
        try:
            if self.pid is not None:
                stop_pid(self.pid, self.volume)
        finally:
            self.pid = None
            if self.mountpoint:
                lazy_unmount(self.mountpoint)


# ---- the report -----------------------------------------------------------------------------


def format_rows(lines: list, right: range, *, rule: bool = True) -> str:
    """Text table: columns in ``right`` right-justified, the others left; a rule under the
    header row when ``rule``."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    out = []
    for i, row in enumerate(lines):
        cells = [
            c.rjust(w) if j in right else c.ljust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if rule and i == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def describe_environment(workdir: str) -> list[str]:
    """Lines about the machine and the work directory."""
    fstype = "?"
    real = os.path.realpath(workdir)
    best = ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split()[4].encode().decode("unicode_escape")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, fstype = point, f"{right.split()[0]} on {right.split()[1]}"
    try:
        import pyfuse3

        pyfuse3_version = pyfuse3.__version__
    except ImportError:
        pyfuse3_version = "not importable"
    return [
        f"host: Linux {platform.release()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, pyfuse3 {pyfuse3_version}",
        f"workdir: {workdir} ({fstype})",
    ]


@contextlib.contextmanager
def work_directory(parent: str | None, keep: bool) -> Iterator[str]:
    """A fresh directory for this run, removed afterwards unless *keep*."""
    path = tempfile.mkdtemp(prefix="mirrorfs-bench-", dir=parent)
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
