"""The block file as of the last commit: in-place writes deferred, coalesced, flushed later.

A committed transaction is durable in the SAM log before anything else happens (that is
what fsync waits for); writing its blocks in place can wait. ``InPlaceBlocks`` wraps the
block file (``store/device.py``) and holds what has not reached it yet:

``defer(seq, runs)``  (volume thread, at ``WritePath.finish``) merges the transaction's
                      runs into the *pending* map, by reference: a block written by several
                      transactions is kept (and later written) once, newest content only.
``flush_step()``      (the flusher: a worker thread of the committer, or inline) takes the
                      whole pending map as the *flushing* map, writes it with one
                      ``os.pwritev`` per stretch of adjacent pieces, then drops it; with
                      ``sync`` it fsyncs the block file and advances ``synced_seq``.
``read(block, n)``    (any thread) the block file patched with flushing, then pending: the
                      newest committed content, what ``range_digests``, the initial sync and
                      the resync read through ``vol.device``.
``write(block, data)``  a direct write (apply, replay, sync copies): flushes first, so that
                      a deferred older image can never land over it.

Reads never see a half-flushed state. ``_lock`` guards the two maps; a reader holds it for
its whole read (pread, then both patches), the flusher only to swap maps and to drop the
flushing one after its writes returned. So a reader either still holds the flushing map
(which it patches over whatever part of the write its pread saw) or finds it gone, in
which case every byte of it was in the page cache before the reader's pread began.
``_flush_lock`` serializes flushes and direct writes (a thread and the volume thread).

Seqs: ``pending_seq`` the newest transaction deferred, ``flushed_seq`` the newest whose
blocks are all in place (page cache), ``synced_seq`` the newest whose blocks are in place
and fsync'd. The checkpoint may record only ``synced_seq`` (``store/checkpoint.py``).

Memory is bounded by the committer: writers wait while ``backlog_bytes`` exceeds its
bound; without a flusher (tests, tools, the target) ``WritePath.finish`` flushes inline
past the bound.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from mirrorfs.store.device import BlockFile
from mirrorfs.store.overlay import BlockOverlay, Data, frozen

log = logging.getLogger(__name__)

IOV_MAX = 512  # buffers per pwritev (Linux allows 1024)


def _nothing() -> None:
    return None


class InPlaceBlocks:
    """The block file plus the committed writes not yet in it (see the module doc)."""

    def __init__(self, blocks: BlockFile, *, seq: int = 0) -> None:
        self.file = blocks
        self.path = blocks.path
        self.block_size = blocks.block_size
        self.block_count = blocks.block_count
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending = BlockOverlay(blocks.block_size)
        self._flushing: BlockOverlay | None = None
        self._flushing_seq = seq
        self.pending_seq = self.flushed_seq = self.synced_seq = seq
        #: Set by the committer while its flusher runs: then nothing flushes inline in
        #: the volume thread, and ``wake`` (volume thread only) asks the flusher for work.
        self.driven = False
        self.wake: Callable[[], None] = _nothing
        #: A checkpoint is due: the next flush step also fsyncs.
        self.sync_wanted = False
        self.flushed_bytes = 0  # written in place, ever (tests and stats)

    # -- the raw file (tests corrupt it, crash simulations close it)
    @property
    def fd(self) -> int:
        return self.file.fd

    def close(self) -> None:
        """Close the block file; whatever is still deferred is dropped (the log has it)."""
        with self._lock:
            self._pending = BlockOverlay(self.block_size)
            self._flushing = None
        self.file.close()

    # -- sizes and state
    @property
    def backlog_bytes(self) -> int:
        """Bytes committed but not yet written in place (pending + flushing)."""
        flushing = self._flushing
        return self._pending.nbytes + (flushing.nbytes if flushing is not None else 0)

    @property
    def has_backlog(self) -> bool:
        return bool(self._pending) or self._flushing is not None

    # -- the volume thread
    def defer(self, seq: int, runs: list[tuple[int, Data]]) -> None:
        """Merge committed transaction ``seq`` into the pending map (no I/O, no copy)."""
        with self._lock:
            put = self._pending.put_frozen
            for start, data in runs:
                put(start, frozen(data))
            self.pending_seq = seq

    # -- reads (any thread)
    def read(self, block: int, count: int) -> bytes:
        """The newest committed content of ``count`` blocks from ``block``."""
        with self._lock:
            data = self.file.read(block, count)
            if self._flushing is not None:
                data = self._flushing.patch(block, count, data)
            return self._pending.patch(block, count, data)

    # -- writing in place
    def write(self, block: int, data: Data) -> None:
        """Write ``data`` in place now, after every deferred write (direct writers)."""
        with self._flush_lock:
            while self._flush_one():
                pass
            self.file.write(block, data)

    def flush_step(self, sync: bool = False) -> bool:
        """Write the pending map in place (one batch); fsync too with ``sync`` or when a
        checkpoint asked for it. Returns whether anything was written. Any thread."""
        with self._flush_lock:
            wrote = self._flush_one()
            if sync or self.sync_wanted:
                self._sync_locked()
            return wrote

    def flush(self) -> None:
        """Write everything deferred in place (no fsync)."""
        with self._flush_lock:
            while self._flush_one():
                pass

    def sync(self) -> None:
        """Write everything deferred in place and fsync the block file."""
        with self._flush_lock:
            while self._flush_one():
                pass
            self._sync_locked()

    def _sync_locked(self) -> None:
        upto = self.flushed_seq  # what is in place now is what the fsync covers
        self.sync_wanted = False
        self.file.sync()
        self.synced_seq = max(self.synced_seq, upto)

    def _flush_one(self) -> bool:
        """(``_flush_lock`` held) Swap pending for flushing, write it, drop it."""
        with self._lock:
            if self._flushing is None:
                if not self._pending:
                    return False
                self._flushing, self._flushing_seq = self._pending, self.pending_seq
                self._pending = BlockOverlay(self.block_size)
            batch, seq = self._flushing, self._flushing_seq
        # An OSError leaves the batch as the flushing map: reads still see it, and a
        # retry (or the replay after a reopen) writes it again.
        self._write_batch(batch)
        with self._lock:
            self._flushing = None
            self.flushed_seq = max(self.flushed_seq, seq)
        self.flushed_bytes += batch.nbytes
        return True

    def _write_batch(self, batch: BlockOverlay) -> None:
        """One ``pwritev`` per stretch of adjacent pieces (at most IOV_MAX buffers)."""
        bs = self.block_size
        fd = self.file.fd
        group: list[memoryview] = []
        gstart = gend = -1
        for start, view in batch.pieces():
            if group and start == gend and len(group) < IOV_MAX:
                group.append(view)
                gend += len(view) // bs
                continue
            if group:
                _pwritev_all(fd, group, gstart * bs)
            group, gstart, gend = [view], start, start + len(view) // bs
        if group:
            _pwritev_all(fd, group, gstart * bs)


def _pwritev_all(fd: int, bufs: list[memoryview], offset: int) -> None:
    """Write every byte of ``bufs`` at ``offset`` (pwritev may write less than asked)."""
    while bufs:
        n = os.pwritev(fd, bufs, offset)
        offset += n
        while n and bufs:
            if n >= len(bufs[0]):
                n -= len(bufs[0])
                bufs.pop(0)
            else:
                bufs[0] = bufs[0][n:]
                n = 0
