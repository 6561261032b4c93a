"""The mirrorfs nodes of the replication benchmarks (bench_repl.py, bench_failover.py).

Positions and byte counters from the nodes' control sockets (the same request as
``mirrorfs status --json``, without starting a Python process at every poll), waiting for a
target, the daemons that a mirrorfs command started (adopted: ours to stop), and the small
file writes of the failover phases.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import Any

from common import (
    BenchError,
    MiB,
    MirrorfsCli,
    MirrorfsMount,
    ReplicaDaemon,
    cmdline_names,
    is_mounted,
    lazy_unmount,
    pid_alive,
    read_pid_file,
    run_mirrorfs,
)

log = logging.getLogger(__name__)

STATUS_POLL = 0.02  # how often positions are read while waiting for a target
READY_TIMEOUT = 120.0  # a target streaming and caught up after mount


# ---- control sockets ------------------------------------------------------------------------


def node_status(volume_dir: str) -> dict[str, Any]:
    """The node's status, as ``mirrorfs status DIR --json`` prints it for a running node."""
    from mirrorfs.node.control import ControlError, control_request, socket_path

    try:
        reply = control_request(socket_path(volume_dir), {"cmd": "status"}, timeout=10.0)
    except ControlError as exc:
        raise BenchError(f"status of {volume_dir}: {exc}") from None
    if not reply.get("ok"):
        raise BenchError(f"status of {volume_dir}: {reply.get('error', 'refused')}")
    return reply["status"]


def target_position(source_dir: str) -> tuple[int, dict[str, Any]]:
    """(committed_seq, the one target's entry) from the source's status."""
    st = node_status(source_dir)
    targets = st.get("targets") or []
    if len(targets) != 1:
        raise BenchError(f"{source_dir}: {len(targets)} targets in its status, expected 1")
    return int(st["committed_seq"]), targets[0]


def wait_caught_up(source_dir: str, timeout: float, what: str) -> float:
    """Wait until the target has applied everything committed when this was called.

    Returns the monotonic time at which its applied_seq was seen there (within STATUS_POLL).
    """
    committed, _ = target_position(source_dir)
    deadline = time.monotonic() + timeout
    while True:
        _, target = target_position(source_dir)
        now = time.monotonic()
        if (target.get("applied_seq") or 0) >= committed:
            return now
        if now > deadline:
            raise BenchError(
                f"{what}: target at applied_seq {target.get('applied_seq')} "
                f"({target.get('state')}), source at {committed}, after {timeout:.0f} s"
            )
        time.sleep(STATUS_POLL)


def wait_streaming(source_dir: str, mountpoint: str | None = None) -> None:
    """Wait until the target streams, has applied everything, and (if given) is mounted."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        committed, target = target_position(source_dir)
        ready = target.get("state") == "streaming" and target.get("applied_seq") == committed
        if ready and (mountpoint is None or is_mounted(mountpoint)):
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"target not ready after {READY_TIMEOUT:.0f} s: {target.get('state')} "
                f"{target.get('reason') or ''}, applied {target.get('applied_seq')}/{committed}"
                + ("" if mountpoint is None or is_mounted(mountpoint) else ", not mounted")
            )
        time.sleep(0.05)


def commit_volume(directory: str) -> None:
    """Commit everything written so far: fsync of a directory on the source mount.

    sync(2) does not reach a FUSE filesystem; mirrorfs commits the whole volume on fsyncdir.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- processes and files ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_output(cli: MirrorfsCli, *args: str, timeout: float) -> tuple[str, float]:
    """Run one mirrorfs command; (its output, seconds). Output also goes to the log."""
    out_path = cli.log_path + ".last"
    with open(out_path, "wb") as outf:
        t0 = time.monotonic()
        proc = run_mirrorfs(args, outf, timeout)
        seconds = time.monotonic() - t0
    with open(out_path, errors="replace") as f:
        text = f.read()
    with open(cli.log_path, "a") as logf:
        logf.write(f"\n$ mirrorfs {' '.join(args)}\n{text}")
    if proc.returncode != 0:
        last = text.strip().splitlines()[-1] if text.strip() else ""
        raise BenchError(f"mirrorfs {args[0]} exited with {proc.returncode}: {last}")
    return text, seconds


def listen_port(volume: str) -> int:
    return int(node_status(volume)["listen"].rsplit(":", 1)[1])


def kill_source(m: MirrorfsMount) -> None:
    """SIGKILL our mount process (a crash) and detach its dead mount."""
    pid = m.our_pid()
    if pid is None:
        raise BenchError(f"the source mount of {m.volume} is not running")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    m.pid = None
    lazy_unmount(m.mountpoint)


def adopt_mount(cli: MirrorfsCli, volume: str, mountpoint: str) -> MirrorfsMount:
    """A mount that a mirrorfs command started (promote, switchover): ours to stop."""
    m = MirrorfsMount(cli, volume, mountpoint)
    m.pid = read_pid_file(os.path.join(volume, "mount.pid"), timeout=60)
    if not cmdline_names(m.pid, volume, mountpoint):
        m.pid = None
        raise BenchError(f"{volume}/mount.pid does not name a mount of {volume}")
    return m


def adopt_replica(cli: MirrorfsCli, volume: str, mountpoint: str | None) -> ReplicaDaemon:
    rep = ReplicaDaemon(cli, volume, mountpoint)
    rep.pid = read_pid_file(os.path.join(volume, "replica.pid"), timeout=60)
    if not cmdline_names(rep.pid, volume):
        rep.pid = None
        raise BenchError(f"{volume}/replica.pid does not name a replica of {volume}")
    return rep


def fsync_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_big(path: str, nbytes: int) -> None:
    """*nbytes* of random data in 1 MiB writes, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            chunk = os.urandom(min(MiB, left))
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            left -= len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)


def wait_applied(source_dir: str, timeout: float, what: str) -> None:
    """Until the one target streams and has applied the source's committed_seq."""
    deadline = time.monotonic() + timeout
    while True:
        committed, entry = target_position(source_dir)
        if entry.get("state") == "streaming" and (entry.get("applied_seq") or 0) >= committed:
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"{what}: target {entry.get('state')} {entry.get('reason') or ''} applied "
                f"{entry.get('applied_seq')}/{committed} after {timeout:.0f} s"
            )
        time.sleep(STATUS_POLL)


def stop_all(mounts: list[MirrorfsMount], daemons: list[ReplicaDaemon]) -> None:
    """Unmount our sources, then stop our replica daemons; never raises."""
    for m in mounts:
        try:
            m.unmount()
        except (BenchError, OSError) as exc:
            log.warning("unmount %s: %s", m.mountpoint, exc)
    for rep in daemons:
        try:
            rep.stop()
        except (BenchError, OSError) as exc:
            log.warning("stop replica %s: %s", rep.volume, exc)
