"""Keeping the kernel's page cache right after O_DIRECT writes on a read-write mount.

Files are opened with ``keep_cache`` (every change passes through this kernel, so cached
pages stay valid across opens), with one exception: a write through an O_DIRECT handle goes
around the page cache, so pages that a buffered handle cached earlier hold the old bytes.
The kernel drops them around a direct write itself (Linux 6.18 does, for synchronous,
libaio and io_uring writes alike: the stale read does not reproduce there), but the
adapter does not rely on it:

- after a direct write to an inode that a buffered handle opened since its pages were
  last dropped, the mount's ``KernelInvalidator`` task drops the inode's pages, from a
  worker thread, never from the handler: a WRITE on an O_DIRECT handle may also be the
  kernel writing back dirty pages (writeback cache, shared mmap) through any writable
  handle, and an invalidation awaited by that handler waits for the very pages it writes;
- the next open of such an inode goes without ``keep_cache``, so the kernel drops the
  pages at that open even before the task has run.

Not seen: O_DIRECT set later with fcntl(F_SETFL) (the kernel tells the filesystem the flags
at open only); such a handle counts as buffered.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class DirectWriteCache:
    """Which inodes' kernel pages may be stale after a direct write.

    ``opened``/``released`` count buffered handles per inode and say whether an open keeps
    the cache; ``direct_write`` says whether the inode's pages must be dropped. All
    synchronous, called from the trio thread.
    """

    def __init__(self) -> None:
        self._buffered: dict[int, int] = {}  # open buffered handles per inode
        self._maybe_cached: set[int] = set()  # a buffered handle opened since the last drop
        self._stale: set[int] = set()  # direct-written: the next open drops the cache

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

    def direct_write(self, ino: int) -> bool:
        """A direct write to ``ino`` was made; True if the kernel's pages of it may be stale
        (the caller queues their invalidation)."""
        if ino not in self._maybe_cached:
            return False
        self._stale.add(ino)
        if not self._buffered.get(ino):
            # Nothing can cache the inode's pages until a buffered handle opens again, and
            # that open goes without keep_cache (stale).
            self._maybe_cached.discard(ino)
        return True
