"""File contents on top of the extent tree: read, write, truncate, fallocate.

Every method mutates the ``Inode`` object it is given (size, blocks, extent area) and never
writes the inode itself: the CALLER writes it with ``InodeTable.put`` afterwards.

Data moves in runs: a write is cut along the extents it touches and each piece goes to the
volume as one ``volume.write`` of a memoryview slice; only a partial first or last block is
read-modify-written. A read issues one ``volume.read`` per written extent piece.

Checkpoints: a write over blocks a checkpoint still reads in place
(``volume.shared_runs``) either moves them (redirect-on-write: new blocks, extent remapped,
old blocks freed, which the allocator then keeps out of use) or leaves them to the store
to save (copy-on-first-write), by size and by room: see ``write`` and INTERNALS.md.

Invariants:
- Bytes of the last block past ``size`` are zero (``truncate`` zeroes them), so a later
  extension reads zeros without touching the block.
- No written block lies past ``size``; only unwritten (fallocate KEEP_SIZE) extents can.
- Space is checked before any change: a call that raises ENOSPC or EFBIG changed nothing.

Short symlink targets (up to 160 bytes) live in the inode's extent area
(``FLAG_INLINE_DATA``); use ``write_symlink``/``read_symlink`` for symlinks. ``read`` also
understands inline inodes; ``write``, ``truncate`` and ``fallocate`` move inline bytes out
to a data block first.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator

from mirrorfs.fs.api import MAX_FILE_SIZE
from mirrorfs.fs.extents import END_OF_FILE, UNWRITTEN, Extent, ExtentTree
from mirrorfs.fs.layout import EXTENT_AREA_SIZE, FLAG_INLINE_DATA, Inode, fs_error
from mirrorfs.fs.xattrs import read_chain
from mirrorfs.store.blockstore import BlockStore
from mirrorfs.store.errors import NoSpace

log = logging.getLogger(__name__)

# Redirect-on-write for a write that overwrites at least this many blocks a checkpoint
# holds: a smaller one is cheaper as saved copies than as split extents (random small
# writes would cut a file into one extent per block). Either way round when the chosen
# one has no room (INTERNALS.md, "Checkpoints").
REDIRECT_MIN = 16

# Save slots kept for the metadata blocks a change may save (inode table, bitmap,
# extent nodes): a change that would need more is refused up front.
SAVE_HEADROOM = 16

# A piece of the mapping of a block range: (lblk, pblk or None for a hole, length, flags).
_Piece = tuple[int, int | None, int, int]


class FileData:
    """Contents of regular files and symlinks on one volume."""

    def __init__(self, volume: BlockStore, inodes=None) -> None:
        self.volume = volume
        self.inodes = inodes
        self.block_size = volume.block_size
        self.tree = ExtentTree(volume)

    # ------------------------------------------------------------------------------ helpers

    def _pieces(self, inode: Inode, first: int, end: int) -> list[_Piece]:
        """The mapping of blocks [first, end): extents clipped to it, holes in between."""
        out: list[_Piece] = []
        pos = first
        for e in self.tree.lookup(inode, first, end):
            s, t = max(e.lblk, first), min(e.lblk + e.length, end)
            if s > pos:
                out.append((pos, None, s - pos, 0))
            out.append((s, e.pblk + s - e.lblk, t - s, e.flags))
            pos = t
        if pos < end:
            out.append((pos, None, end - pos, 0))
        return out

    def _goal(self, inode: Inode, lblk: int) -> int | None:
        """Where new blocks for ``lblk`` should go: right after the file's neighbouring data."""
        e = self.tree.extent_before(inode, lblk)
        if e is None:
            return None
        goal = e.pblk + (lblk - e.lblk) if lblk >= e.lblk else e.pblk + e.length
        return goal if goal < self.volume.block_count else None

    def _fill_holes(
        self,
        inode: Inode,
        pieces: list[_Piece],
        first: int,
        end: int,
        flags_new: int,
        *,
        convert: bool,
        meta_room: Callable[[], bool] | None = None,
    ) -> tuple[list[_Piece], int]:
        """Allocate every hole in ``pieces`` and map [first, end) anew; ENOSPC changes nothing.

        New extents get ``flags_new``; with ``convert`` unwritten extents become written.
        Returns the new pieces (pblk known everywhere, flags as before the call so the
        caller knows which blocks hold old data) and the number of data blocks allocated.
        ``meta_room()``, once the runs are allocated: False refuses (ENOSPC, the runs
        given back) before the mapping changes.
        """
        need = sum(n for _, p, n, _ in pieces if p is None)
        changes = need or (convert and any(f & UNWRITTEN for _, p, _, f in pieces if p))
        if not changes:
            return pieces, 0
        alloc = self.volume.allocator
        # Quick refusal before touching the allocator (one run per hole); the exact check
        # follows once the allocation says how many runs the holes really took.
        if need + self.tree.nodes_needed(inode, len(pieces)) > alloc.free_count:
            raise fs_error(errno.ENOSPC, f"inode {inode.ino}: {need} blocks wanted")
        runs: list[tuple[int, int]] = []
        if need:
            goal = self._goal(inode, first)
            try:
                runs = alloc.allocate(need, goal)
            except NoSpace:
                raise fs_error(errno.ENOSPC, f"inode {inode.ino}: {need} blocks wanted") from None
        # Now the real number of new extents is known: check room for the tree nodes.
        est = self.tree.nodes_needed(inode, len(pieces) + len(runs))
        if est > alloc.free_count:
            for s, n in runs:
                alloc.free(s, n)
            raise fs_error(errno.ENOSPC, f"inode {inode.ino}: no room for extent nodes")
        if meta_room is not None and not meta_room():
            for s, n in runs:
                alloc.free(s, n)
            raise fs_error(errno.ENOSPC, f"inode {inode.ino}: no room to save metadata")
        filled: list[_Piece] = []
        new: list[Extent] = []
        run_iter = iter(runs)
        rs, rn = 0, 0
        for lblk, pblk, n, flags in pieces:
            if pblk is not None:
                filled.append((lblk, pblk, n, flags))
                new.append(Extent(lblk, pblk, n, flags & ~UNWRITTEN if convert else flags))
                continue
            while n:
                if rn == 0:
                    rs, rn = next(run_iter)
                k = min(n, rn)
                filled.append((lblk, rs, k, UNWRITTEN))  # fresh blocks: content is garbage
                new.append(Extent(lblk, rs, k, flags_new))
                lblk, n, rs, rn = lblk + k, n - k, rs + k, rn - k
        self.tree.replace(inode, first, end, new, goal=runs[0][0] if runs else None)
        inode.blocks += need
        return filled, need

    def _uninline(self, inode: Inode) -> None:
        """Move inline bytes out of the extent area into an ordinary data block."""
        if not inode.flags & FLAG_INLINE_DATA:
            return
        data = inode.extent_area[: inode.size]
        if self.volume.allocator.free_count < 1 + self.tree.nodes_needed(inode, 1) and data:
            raise fs_error(errno.ENOSPC, f"inode {inode.ino}: no room to un-inline")
        inode.flags &= ~FLAG_INLINE_DATA
        inode.extent_area = bytes(EXTENT_AREA_SIZE)
        size = inode.size
        inode.size = 0
        if data:
            self.write(inode, 0, data)
        inode.size = size

    # -------------------------------------------------------------------------------- reads

    def read(self, inode: Inode, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (short at EOF); holes read as zeros."""
        if offset < 0 or size < 0:
            raise fs_error(errno.EINVAL, "negative offset or size")
        end = min(offset + size, inode.size)
        if end <= offset:
            return b""
        if inode.flags & FLAG_INLINE_DATA:
            return bytes(inode.extent_area[offset:end])
        bs = self.block_size
        first, last_end = offset // bs, (end - 1) // bs + 1
        found = self.tree.lookup(inode, first, last_end)
        if len(found) == 1:
            e = found[0]
            if not e.flags & UNWRITTEN and e.lblk <= first and e.lblk + e.length >= last_end:
                # One written extent under the whole range (a streaming reader's case):
                # the blocks as read are the answer, without a zeroed buffer and two copies.
                raw = self.volume.read(e.pblk + first - e.lblk, last_end - first)
                skip = offset - first * bs
                if skip == 0 and len(raw) == end - offset:
                    return raw
                return raw[skip : skip + end - offset]
        out = bytearray(end - offset)
        for e in found:
            if e.flags & UNWRITTEN:
                continue
            s, t = max(e.lblk, first), min(e.lblk + e.length, last_end)
            raw = memoryview(self.volume.read(e.pblk + s - e.lblk, t - s))
            lo, hi = max(s * bs, offset), min(t * bs, end)
            out[lo - offset : hi - offset] = raw[lo - s * bs : hi - s * bs]
        return bytes(out)

    # ------------------------------------------------------------------------------- writes

    def write(self, inode: Inode, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset``; returns the bytes written (short only at the max size).

        Allocates holes, converts unwritten extents, extends ``size``. FsError(EFBIG) when
        ``offset`` is at or past the maximum file size, FsError(ENOSPC) before any change.
        """
        if offset < 0:
            raise fs_error(errno.EINVAL, "negative offset")
        if not len(data):
            return 0
        limit = MAX_FILE_SIZE
        if offset >= limit:
            raise fs_error(errno.EFBIG, f"inode {inode.ino}: write at {offset} past max size")
        mv = memoryview(data).cast("B")
        if offset + len(mv) > limit:
            mv = mv[: limit - offset]
        self._uninline(inode)
        bs = self.block_size
        end = offset + len(mv)
        first, last = offset // bs, (end - 1) // bs
        pieces = self._pieces(inode, first, last + 1)
        moved: dict[int, int | None] = {}
        shared = self._shared(pieces)
        held = sum(k for runs in shared for _, k in runs)
        filled = None
        if held:
            # Blocks a checkpoint reads in place: a large write goes to new blocks, a small
            # one saves the old content (cheaper than cutting the file's extents), each
            # taking the other way when its own space is short.
            # (Saves of data leave twice the headroom: the rest is for metadata.)
            room = self.volume.save_room(held + 2 * SAVE_HEADROOM)
            if held >= REDIRECT_MIN or not room:
                moved, kept = self._redirect(pieces, shared)
                filled = self._moved_fill(inode, kept, shared, first, last + 1)
                if filled is None:
                    moved = {}
                    if not self.volume.save_room(held + 2 * SAVE_HEADROOM):
                        raise fs_error(errno.ENOSPC, f"inode {inode.ino}: no room to save")
        if filled is None:
            filled, _ = self._fill_holes(inode, pieces, first, last + 1, 0, convert=True)
        head_partial = offset % bs != 0
        tail_partial = end % bs != 0
        write = self.volume.write
        for lblk, pblk, n, flags in filled:
            i, j = lblk, lblk + n
            old = not flags & UNWRITTEN  # the block holds data worth keeping
            if i == first and head_partial:
                self._write_partial(mv, pblk, i, offset, end, old, moved.get(i))
                i += 1
            tail = j - 1 == last and tail_partial and j - 1 >= i
            if tail:
                j -= 1
            if j > i:
                write(pblk + (i - lblk), mv[i * bs - offset : j * bs - offset])
            if tail:
                self._write_partial(mv, pblk + (j - lblk), j, offset, end, old, moved.get(j))
        if moved:
            self._release_moved(inode, pieces, kept)
        if end > inode.size:
            inode.size = end
        return len(mv)

    def _moved_fill(
        self,
        inode: Inode,
        kept: list[_Piece],
        shared: list[list[tuple[int, int]]],
        first: int,
        end: int,
    ) -> list[_Piece] | None:
        """``_fill_holes`` for a redirected write, or None (nothing changed) when the data
        area or the save area is short: the metadata that moving rewrites (the bitmap
        blocks of the old and the new runs, extent nodes, the inode) may need saved copies
        once, and a write must not run out of them half-way."""
        upb = self.block_size * 8
        old_bitmap = {
            b for runs in shared for s, k in runs for b in range(s // upb, (s + k - 1) // upb + 1)
        }
        nodes = 2 * self.tree.nodes_needed(inode, len(kept)) + 4
        meta = SAVE_HEADROOM + len(old_bitmap) + nodes
        moving = sum(k for runs in shared for _, k in runs)
        room = self.volume.save_room
        if not room(meta + moving // upb + 2):  # + the new runs' bitmap blocks, if contiguous
            return None
        try:
            filled, _ = self._fill_holes(
                inode, kept, first, end, 0, convert=True, meta_room=lambda: room(meta)
            )
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return None
        return filled

    def _shared(self, pieces: list[_Piece]) -> list[list[tuple[int, int]]]:
        """For each piece, the runs of its blocks that a checkpoint reads in place."""
        shared = self.volume.shared_runs
        return [shared(pblk, n) if pblk is not None else [] for _, pblk, n, _ in pieces]

    def _redirect(
        self, pieces: list[_Piece], shared: list[list[tuple[int, int]]]
    ) -> tuple[dict[int, int | None], list[_Piece]]:
        """Redirect-on-write: the blocks of ``pieces`` that a checkpoint reads in place
        (``shared``, from ``_shared``) become holes: new blocks, so the checkpoint keeps
        the old ones untouched and no saved copy is needed. Returns {lblk: old pblk, None
        when it was unwritten} for the first and last block of each moved run, and the
        pieces with the holes."""
        moved: dict[int, int | None] = {}
        out: list[_Piece] = []
        for (lblk, pblk, n, flags), runs in zip(pieces, shared, strict=True):
            if not runs:
                out.append((lblk, pblk, n, flags))
                continue
            assert pblk is not None
            pos = pblk
            for s, k in [*runs, (pblk + n, 0)]:
                if s > pos:
                    out.append((lblk + pos - pblk, pos, s - pos, flags))
                if k:
                    out.append((lblk + s - pblk, None, k, 0))
                    for b in (s, s + k - 1):
                        moved[lblk + b - pblk] = None if flags & UNWRITTEN else b
                pos = s + k
        return moved, out

    def _release_moved(self, inode: Inode, before: list[_Piece], kept: list[_Piece]) -> None:
        """Free the old blocks of a redirected write (those of ``before`` that ``kept`` no
        longer maps): the allocator keeps them out of use while a checkpoint reads them."""
        free = self.volume.allocator.free
        mapped = sorted((p, n) for _, p, n, _ in kept if p is not None)
        for _, p, n, _ in before:
            if p is None:
                continue
            pos, end = p, p + n
            for q, m in mapped:
                if q + m <= pos or q >= end:
                    continue
                if q > pos:
                    free(pos, q - pos)
                    inode.blocks -= q - pos
                pos = max(pos, q + m)
            if pos < end:
                free(pos, end - pos)
                inode.blocks -= end - pos

    def _write_partial(
        self,
        mv: memoryview,
        pblk: int,
        lblk: int,
        offset: int,
        end: int,
        old: bool,
        src: int | None = None,
    ) -> None:
        """Read-modify-write of one block that the range [offset, end) covers partly
        (its old content read from ``src`` when the block moved)."""
        bs = self.block_size
        if src is not None:
            buf = bytearray(self.volume.read(src))
        elif old:
            buf = bytearray(self.volume.read(pblk))
        else:
            buf = bytearray(bs)
        base = lblk * bs
        lo, hi = max(offset, base), min(end, base + bs)
        buf[lo - base : hi - base] = mv[lo - offset : hi - offset]
        self.volume.write(pblk, buf)

    # ------------------------------------------------------------------------------- sizes

    def truncate(self, inode: Inode, size: int) -> None:
        """Set the size: shrinking frees whole blocks past EOF and zeroes the new tail."""
        if size < 0:
            raise fs_error(errno.EINVAL, "negative size")
        if size > MAX_FILE_SIZE:
            raise fs_error(errno.EFBIG, f"inode {inode.ino}: size {size} past max size")
        if inode.flags & FLAG_INLINE_DATA:
            if size <= inode.size:
                area = inode.extent_area[:size]
                inode.extent_area = area + bytes(EXTENT_AREA_SIZE - len(area))
                inode.size = size
                return
            self._uninline(inode)
        if size > inode.size:
            inode.size = size  # sparse: the old tail is zero already
            return
        bs = self.block_size
        keep = -(-size // bs)
        for e in self.tree.replace(inode, keep, END_OF_FILE, []):
            self.volume.allocator.free(e.pblk, e.length)
            inode.blocks -= e.length
        if size % bs and size < inode.size:
            last = size // bs
            for e in self.tree.lookup(inode, last, last + 1):
                if not e.flags & UNWRITTEN:
                    pblk = e.pblk + last - e.lblk
                    buf = bytearray(self.volume.read(pblk))
                    buf[size % bs :] = bytes(bs - size % bs)
                    self.volume.write(pblk, buf)
        inode.size = size

    def fallocate(self, inode: Inode, offset: int, length: int, keep_size: bool) -> None:
        """Allocate unwritten extents for the holes of [offset, offset+length) (mode 0).

        Extends ``size`` to the end of the range unless ``keep_size``. FsError(EINVAL) for a
        bad range, EFBIG past the maximum size, ENOSPC before any change.
        """
        if offset < 0 or length <= 0:
            raise fs_error(errno.EINVAL, "bad fallocate range")
        end = offset + length
        if end > MAX_FILE_SIZE:
            raise fs_error(errno.EFBIG, f"inode {inode.ino}: fallocate past max size")
        self._uninline(inode)
        bs = self.block_size
        first, stop = offset // bs, -(-end // bs)
        pieces = self._pieces(inode, first, stop)
        self._fill_holes(inode, pieces, first, stop, UNWRITTEN, convert=False)
        if not keep_size and end > inode.size:
            inode.size = end

    def free_all(self, inode: Inode) -> None:
        """Free every data and extent-tree block (not the xattr block); size becomes 0."""
        if inode.flags & FLAG_INLINE_DATA:
            inode.flags &= ~FLAG_INLINE_DATA
            inode.extent_area = bytes(EXTENT_AREA_SIZE)
            inode.size = 0
            return
        for e in self.tree.free_tree(inode):
            self.volume.allocator.free(e.pblk, e.length)
            inode.blocks -= e.length
        inode.size = 0

    def runs(self, inode: Inode) -> Iterator[tuple[int, int]]:
        """Every volume block the inode references: tree nodes, data extents, xattr blocks.

        Their total length equals ``inode.blocks`` on a healthy filesystem.
        """
        if inode.xattr_block:
            try:
                chain = read_chain(self.volume, inode)[0]
            except OSError:  # damaged: fsck reports the xattrs on their own
                chain = [inode.xattr_block]
            for block in chain:
                yield (block, 1)
        if inode.flags & FLAG_INLINE_DATA:
            return
        for block in self.tree.node_blocks(inode):
            yield (block, 1)
        for e in self.tree.extents(inode):
            yield (e.pblk, e.length)

    def extents(self, inode: Inode) -> list[Extent]:
        """The data extents of the inode, in logical order (for fsck, FIEMAP-like tools)."""
        if inode.flags & FLAG_INLINE_DATA:
            return []
        return list(self.tree.extents(inode))

    # ----------------------------------------------------------------------------- symlinks

    def write_symlink(self, inode: Inode, target: bytes) -> None:
        """Store a symlink target: inline in the inode when it fits, else in a data block."""
        if inode.size or inode.blocks - (1 if inode.xattr_block else 0):
            self.free_all(inode)
        if len(target) <= EXTENT_AREA_SIZE:
            inode.flags |= FLAG_INLINE_DATA
            inode.extent_area = bytes(target) + bytes(EXTENT_AREA_SIZE - len(target))
            inode.size = len(target)
            return
        self.write(inode, 0, target)

    def read_symlink(self, inode: Inode) -> bytes:
        """The symlink target stored by ``write_symlink``."""
        return self.read(inode, 0, inode.size)
