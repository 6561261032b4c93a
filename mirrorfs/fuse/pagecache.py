"""Keeping the kernel's page cache right after O_DIRECT writes on a read-write mount.

Files are opened with ``keep_cache`` (every change passes through this kernel, so cached
pages stay valid across opens), with one exception: a write through an O_DIRECT handle goes
around the page cache, so pages that a buffered handle cached earlier hold the old bytes.
The kernel drops them before it sends a direct write, but not always after it (an
asynchronous direct write, io_submit or io_uring, completes without a second invalidation),
and a buffered read that cached the range meanwhile keeps stale data.

So the adapter drops the inode's pages itself after a direct write and before it answers
it, whenever a buffered handle was opened on the inode since its pages were last dropped.
That runs in a worker thread while the write handler awaits it, never in the trio thread:
the invalidation waits for page locks held by READ requests that only our loop answers
(DESIGN.md, "facts that bite"). The writer sees its write complete only after the pages
are gone, as a local filesystem's direct I/O completion does.

Not seen: O_DIRECT set later with fcntl(F_SETFL) (the kernel tells the filesystem the flags
at open only); such a handle counts as buffered.
"""

from __future__ import annotations

import errno
import logging

import pyfuse3

log = logging.getLogger(__name__)


class DirectWriteCache:
    """Which inodes' kernel pages may be stale after a direct write.

    ``opened``/``released`` count buffered handles per inode; ``needs_invalidation`` says
    whether a direct write must drop the inode's pages; ``invalidated`` records that it did.
    All synchronous, called from the trio thread.
    """

    def __init__(self) -> None:
        self._buffered: dict[int, int] = {}  # open buffered handles per inode
        self._maybe_cached: set[int] = set()  # a buffered handle opened since the last drop
        self._stale: set[int] = set()  # an invalidation failed: the next open drops the cache

    def opened(self, ino: int, *, direct: bool) -> bool:
        """A handle on ``ino`` was opened; returns ``keep_cache`` for it."""
        keep = ino not in self._stale
        self._stale.discard(ino)  # without keep_cache the kernel drops the pages at this open
        if not direct:
            self._buffered[ino] = self._buffered.get(ino, 0) + 1
            self._maybe_cached.add(ino)
        return keep

    def released(self, ino: int, *, direct: bool) -> None:
        """A handle on ``ino`` was released (its pages may stay cached: keep_cache)."""
        if direct:
            return
        left = self._buffered.get(ino, 0) - 1
        if left > 0:
            self._buffered[ino] = left
        else:
            self._buffered.pop(ino, None)

    def needs_invalidation(self, ino: int) -> bool:
        """Whether a direct write to ``ino`` may have left stale pages in the kernel."""
        return ino in self._maybe_cached

    def invalidated(self, ino: int, ok: bool) -> None:
        """The pages of ``ino`` were dropped (``ok``), or dropping them failed."""
        if not ok:
            self._stale.add(ino)
        elif not self._buffered.get(ino):
            # No buffered handle left: nothing can cache the inode's pages until one opens.
            self._maybe_cached.discard(ino)


def drop_pages(ino: int) -> bool:
    """Drop the kernel's cached pages and attributes of ``ino`` (a worker thread only).

    True when the kernel dropped them or held nothing of the inode.
    """
    try:
        pyfuse3.invalidate_inode(ino)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # the kernel holds nothing of it
            return True
        log.warning("invalidate_inode(%d) after a direct write: %s", ino, exc.strerror or exc)
        return False
    return True
