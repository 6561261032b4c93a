"""Kernel cache invalidation for a mount whose volume changes underneath it (the replica).

The kernel keeps dentries, attributes and page cache of a FUSE mount for their timeouts or,
for data, until told. When transactions are applied below a read-only mount, the node tells
a ``KernelInvalidator`` what their hints name (after it dropped the Filesystem's own caches
in the same step), and the invalidator's task drops the kernel's caches of that.

The calls themselves (``invalidate_entry``, ``invalidate_inode``) run in a worker thread,
never in the trio thread and never inside a request handler: they wait for the requests that
concern the same inode, which only our loop can answer, so calling them there deadlocks.
The task runs in the FUSE session's nursery (mirrorfs.fuse.mount.FuseSession), which ends it
and waits for its thread before ``pyfuse3.close`` destroys the session under that thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterable

import pyfuse3
import trio

from mirrorfs.store.txn import Hint, HintKind

log = logging.getLogger(__name__)


class KernelInvalidator:
    """Inodes and directory entries whose kernel caches must go, and the task that drops them.

    ``add_hints``/``add_inodes`` are cheap and synchronous (call them right after the apply,
    between two awaits); ``run`` does the work, batching whatever accumulated meanwhile.
    """

    def __init__(self) -> None:
        self._inodes: set[int] = set()
        self._entries: dict[tuple[int, bytes], None] = {}  # an ordered set
        self._nudge_send, self._nudge_receive = trio.open_memory_channel[None](1)

    def add_hints(self, hints: Iterable[Hint]) -> None:
        """Queue what a transaction's hints name: a changed entry and its directory, or an
        updated or deleted inode."""
        for h in hints:
            if h.kind in (HintKind.ENTRY_ADDED, HintKind.ENTRY_REMOVED):
                self._entries[(h.parent, h.name)] = None
                self._inodes.add(h.parent)
            else:
                self._inodes.add(h.ino)
        self._nudge()

    def add_inodes(self, inodes: Iterable[int]) -> None:
        """Queue inodes whose every cache must go (after a resync: any block may differ)."""
        self._inodes.update(inodes)
        self._nudge()

    def _nudge(self) -> None:
        if self._inodes or self._entries:
            with contextlib.suppress(trio.WouldBlock):  # a nudge is pending: it sees these too
                self._nudge_send.send_nowait(None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drop the queued kernel caches, batch after batch, until cancelled.

        Cancellation waits for a batch in progress (the thread is not abandoned): once this
        task has ended, no thread talks to the FUSE session any more.
        """
        task_status.started()
        async for _ in self._nudge_receive:
            entries, self._entries = self._entries, {}
            inodes, self._inodes = self._inodes, set()
            await trio.to_thread.run_sync(invalidate, list(entries), sorted(inodes))


def invalidate(entries: list[tuple[int, bytes]], inodes: list[int]) -> None:
    """Kernel cache invalidations (a worker thread: they block until related requests end).

    ``invalidate_entry`` rather than ``invalidate_entry_async``: we are in a thread of our
    own already, and pyfuse3's async queue is served by a thread that outlives neither
    ``pyfuse3.main()`` nor, safely, ``pyfuse3.close()``.
    """
    for parent, name in entries:
        try:
            pyfuse3.invalidate_entry(parent, name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel never looked it up
                log.warning("invalidate_entry(%d, %r): %s", parent, name, exc.strerror or exc)
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(ino)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel holds nothing of it
                log.warning("invalidate_inode(%d): %s", ino, exc.strerror or exc)
