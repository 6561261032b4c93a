"""Start the next process of a volume once the current one has let go of it.

A daemon that hands its volume over (a switchover: the old source becomes a replica daemon,
the promoted replica becomes a read-write mount) cannot start its successor itself: the
successor needs the volume's lock, which the daemon holds until its very last step. So just
before exiting it spawns this helper, detached in a session of its own::

    python -m mirrorfs --handover DIR [--timeout S] -- mirrorfs-argv...

which imports what the successor needs while it waits until nobody holds DIR's lock, then
becomes the successor: ``mirrorfs mirrorfs-argv --foreground`` (``mount`` or ``replica``) in
this same process, so that the hand-over costs one interpreter start, not two, and the
writers' pause is that much shorter. What it says goes to DIR/mirrorfs.log.

The entry is ``mirrorfs.__main__`` (``--handover`` first), which hands ``main`` the command
line's own entry to run the successor with: node/ is below the command line and does not
import it.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from mirrorfs.daemon import child_env
from mirrorfs.store.files import DAEMON_LOG_FILE, LOCK_FILE

log = logging.getLogger(__name__)

#: The first argument of ``python -m mirrorfs`` that makes it this helper.
HANDOVER_ARG = "--handover"
WAIT_TIMEOUT = 120.0
USAGE = f"usage: python -m mirrorfs {HANDOVER_ARG} DIR [--timeout S] -- ARGV..."


def lock_free(volume_dir: str) -> bool:
    """Whether no process holds the volume's lock right now."""
    fd = os.open(os.path.join(volume_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # (drops the probe's lock too)
    return True


def wait_lock_free(volume_dir: str, timeout: float = WAIT_TIMEOUT) -> bool:
    """Poll until the lock is free; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not lock_free(volume_dir):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def spawn(volume_dir: str, argv: list[str], *, timeout: float = WAIT_TIMEOUT) -> int:
    """Start the detached helper that becomes ``mirrorfs argv`` once DIR is free; its pid
    (which will be the successor's)."""
    cmd = [
        sys.executable,
        "-m",
        "mirrorfs",
        HANDOVER_ARG,
        volume_dir,
        "--timeout",
        repr(timeout),
        "--",
        *argv,
    ]
    with open(os.path.join(volume_dir, DAEMON_LOG_FILE), "ab") as logf:
        child = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
            cwd="/",
            env=child_env(),
        )
    log.info("handover helper %d will run: mirrorfs %s", child.pid, " ".join(argv))
    return child.pid


def main(argv: Sequence[str], run: Callable[[list[str]], int]) -> int:
    """The helper: ``argv`` is what follows ``--handover``; ``run`` is the command line's
    entry (mirrorfs.cli.main), which runs the successor in this process."""
    argv = list(argv)
    if "--" not in argv:
        print(USAGE, file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog=f"python -m mirrorfs {HANDOVER_ARG}")
    parser.add_argument("dir")
    parser.add_argument("--timeout", type=float, default=WAIT_TIMEOUT)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    prefix = f"mirrorfs handover {os.getpid()}:"
    if not wait_lock_free(args.dir, args.timeout):
        print(
            f"{prefix} {args.dir} still in use after {args.timeout:g} s; "
            f"not running: mirrorfs {' '.join(command)}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    print(f"{prefix} running: mirrorfs {' '.join(command)}", file=sys.stderr, flush=True)
    # --ready-fd: log to the log file only (our stderr is that file already); nobody reads
    # the pipe, whose read end stays open so that the "ok" does not fail.
    _unread, ready = os.pipe()
    return run([*command, "--foreground", "--ready-fd", str(ready)])
