"""``mirrorfs stop DIR``: end the daemon that serves a volume directory, cleanly, and wait.

The daemon is found by its pid file (``DIR/replica.pid`` of a replica daemon,
``DIR/mount.pid`` of a mount), checked to be a mirrorfs process of DIR (a stale pid file
may name somebody else's process now), and sent SIGTERM, which is its clean stop: a replica
daemon unmounts its read-only mount and closes the volume, a mount unmounts, makes its
final commit and gives the targets a bounded time to receive it (as ``mirrorfs umount``).
The command returns once the process has exited and the volume's lock is free.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from mirrorfs.daemon import CliError
from mirrorfs.node.handover import wait_lock_free
from mirrorfs.store.files import MOUNT_PID_FILE, REPLICA_PID_FILE

#: The pid files of the daemons that may serve a volume directory, and what they are.
DAEMONS = ((REPLICA_PID_FILE, "replica daemon"), (MOUNT_PID_FILE, "mount"))


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def serves(pid: int, volume_dir: str) -> bool:
    """Whether ``pid`` is a live (not zombie) mirrorfs process with ``volume_dir`` among its
    arguments."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    if stat[stat.rindex(b")") + 2 :][:1] in (b"Z", b"X"):
        return False
    return any(b"mirrorfs" in a for a in args) and os.fsencode(volume_dir) in args


def find_daemon(volume_dir: str) -> tuple[int, str] | None:
    """(pid, what) of the daemon serving ``volume_dir``, or None."""
    for name, what in DAEMONS:
        pid = _read_pid(os.path.join(volume_dir, name))
        if pid is not None and pid != os.getpid() and serves(pid, volume_dir):
            return pid, what
    return None


def cmd_stop(args: Any) -> int:
    """``mirrorfs stop DIR [--timeout S]``: 0 once the daemon has exited."""
    volume_dir = os.path.abspath(args.dir)
    if not os.path.isdir(volume_dir):
        raise CliError(f"{volume_dir}: no such volume directory")
    found = find_daemon(volume_dir)
    if found is None:
        raise CliError(f"no mirrorfs daemon is running for {volume_dir}")
    pid, what = found
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass  # it ended on its own meanwhile
    deadline = time.monotonic() + args.timeout
    while serves(pid, volume_dir):
        if time.monotonic() > deadline:
            raise CliError(
                f"the {what} of {volume_dir} (pid {pid}) is still running after "
                f"{args.timeout:g} s (final commit?)"
            )
        time.sleep(0.05)
    if not wait_lock_free(volume_dir, max(deadline - time.monotonic(), 1.0)):
        raise CliError(f"the {what} (pid {pid}) exited, but {volume_dir} is still in use")
    print(f"stopped the {what} of {volume_dir} (pid {pid})")
    return 0
