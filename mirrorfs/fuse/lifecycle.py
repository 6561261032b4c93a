"""The process side of a mount's lifecycle: pid file and signals.

Shared by the read-write mount process (mirrorfs.fuse.mount) and the replica daemon
(mirrorfs.node.replica), which serves its read-only mount only some of the time. Nothing here
imports pyfuse3, so that a replica daemon without a mount does not load it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterable

import trio

from mirrorfs.store.files import atomic_write

log = logging.getLogger(__name__)

#: What ends a mount process: ``kill`` (systemd's stop) and Ctrl-C. SIGHUP reopens the log
#: file instead (``HANGUP_SIGNALS``: logrotate's convention).
MOUNT_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANGUP_SIGNALS = (signal.SIGHUP,)


class PidFile:
    """A file holding this process's pid while it serves a volume directory.

    Written atomically (a reader never sees it half written) but not fsynced: after a crash
    the process is gone anyway. As a context manager: written on entry, removed on exit.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self) -> None:
        """(Re)write the file; also after an initial sync wiped the directory."""
        atomic_write(self.path, b"%d\n" % os.getpid(), durable=False)

    def remove(self) -> None:
        """Remove the file if it is there."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> PidFile:
        self.write()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


async def watch_signals(
    on_signal: Callable[[signal.Signals], None],
    signums: Iterable[int] = MOUNT_SIGNALS,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_signal`` for each of ``signums`` received, until cancelled.

    ``started`` once the handlers are installed: a signal from then on is seen.
    """
    with trio.open_signal_receiver(*signums) as signals:
        task_status.started()
        async for signum in signals:
            on_signal(signal.Signals(signum))
