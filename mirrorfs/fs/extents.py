"""The extent tree of an inode: logical block runs mapped to physical block runs.

An extent is ``(lblk, pblk, length, flags)``: file blocks ``lblk .. lblk+length-1`` live in
volume blocks ``pblk .. pblk+length-1``. ``UNWRITTEN`` extents (fallocate) are allocated
but read as zeros until written. Logical blocks not covered by any extent are holes.

The tree is a B+tree in the style of ext4. Its root lives in the inode's 160-byte extent
area; deeper nodes are whole blocks charged to the inode (``Inode.blocks``).

Root (extent area)::

    0  H magic 0xE5A0 (an all-zero area is an empty tree too)
    2  H depth (0: the entries are extents; d > 0: index entries to nodes of depth d-1)
    4  H count
    6  H reserved
    8  entries: up to 6 extents or 9 index entries

Node block::

    0  I magic 0x4E545845 ("EXTN")   4  H depth   6  H count   8  Q owner ino
    16 entries, zero padding to the block size

Extent entry ``<QQII`` (lblk, pblk, length, flags); index entry ``<QQ`` (first lblk of the
child, child block). An index entry's key is the first lblk of its child, so a lookup of
``x`` descends into the last child whose key is <= x.

Edits (``replace``) read and rewrite only the nodes on the paths to the changed range; a
node that overflows splits into equal parts, an emptied node is freed, and the tree gets
deeper when the root overflows and shallower when everything fits in the root again.
Adjacent extents in one node merge. Callers check space with ``nodes_needed`` first, so an
edit never runs out of blocks half way.
"""

from __future__ import annotations

import errno
import logging
import struct
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from itertools import chain
from typing import NamedTuple

from mirrorfs.fs.layout import EXTENT_AREA_SIZE, FLAG_INLINE_DATA, Inode, fs_error
from mirrorfs.store.blockstore import BlockStore
from mirrorfs.store.errors import NoSpace

log = logging.getLogger(__name__)

UNWRITTEN = 1
MAX_EXTENT_LEN = 0xFFFFFFFF
END_OF_FILE = 1 << 62  # a logical block past every possible file
NODE_CACHE_SIZE = 256  # parsed nodes kept (a 4 KiB leaf parses into ~25 KB of tuples)

ROOT_MAGIC = 0xE5A0
NODE_MAGIC = 0x4E545845

_ROOT_HEAD = struct.Struct("<HHHH")
_NODE_HEAD = struct.Struct("<IHHQ")
_LEAF = struct.Struct("<QQII")
_INDEX = struct.Struct("<QQ")
assert _ROOT_HEAD.size == 8 and _NODE_HEAD.size == 16
assert _LEAF.size == 24 and _INDEX.size == 16

_PACKERS: dict[tuple[int, int], struct.Struct] = {}


def _packer(depth: int, count: int) -> struct.Struct:
    """A struct for ``count`` leaf (depth 0) or index entries, compiled once."""
    st = _PACKERS.get((depth, count))
    if st is None:
        st = struct.Struct("<" + ("QQII" if depth == 0 else "QQ") * count)
        _PACKERS[(depth, count)] = st
    return st


ROOT_LEAF_CAP = (EXTENT_AREA_SIZE - _ROOT_HEAD.size) // _LEAF.size  # 6
ROOT_INDEX_CAP = (EXTENT_AREA_SIZE - _ROOT_HEAD.size) // _INDEX.size  # 9


class Extent(NamedTuple):
    """A run of file blocks mapped to volume blocks (a tuple: cheap in the 100k)."""

    lblk: int
    pblk: int
    length: int
    flags: int = 0

    @property
    def end(self) -> int:
        """First logical block after the extent."""
        return self.lblk + self.length


def merge_extents(exts: list[Extent]) -> list[Extent]:
    """Merge neighbours that are contiguous logically and physically with equal flags."""
    out: list[Extent] = []
    for e in exts:
        if out:
            p = out[-1]
            if (
                p.lblk + p.length == e.lblk
                and p.pblk + p.length == e.pblk
                and p.flags == e.flags
                and p.length + e.length <= MAX_EXTENT_LEN
            ):
                out[-1] = Extent(p.lblk, p.pblk, p.length + e.length, p.flags)
                continue
        out.append(e)
    return out


def _key(entry) -> int:
    return entry[0]


class _Edit:
    """State of one ``replace``: the inode, what was cut out, where to put new nodes."""

    __slots__ = ("inode", "removed", "goal")

    def __init__(self, inode: Inode, goal: int | None) -> None:
        self.inode = inode
        self.removed: list[Extent] = []
        self.goal = goal


class ExtentTree:
    """Reads and edits the extent trees of inodes on one volume."""

    def __init__(self, volume: BlockStore) -> None:
        self.volume = volume
        self.block_size = volume.block_size
        self.leaf_cap = (self.block_size - _NODE_HEAD.size) // _LEAF.size
        self.index_cap = (self.block_size - _NODE_HEAD.size) // _INDEX.size
        # block -> (raw bytes, depth, owner, parsed entries), insertion order = age
        self._cache: dict[int, tuple[bytes, int, int, list]] = {}

    # ---------------------------------------------------------------------- node encoding

    def _root(self, inode: Inode) -> tuple[int, list]:
        if inode.flags & FLAG_INLINE_DATA:
            raise ValueError(f"inode {inode.ino} holds inline data, not an extent tree")
        area = inode.extent_area
        magic, depth, count, _ = _ROOT_HEAD.unpack_from(area)
        if magic == 0 and depth == 0 and count == 0:
            return 0, []
        cap = ROOT_LEAF_CAP if depth == 0 else ROOT_INDEX_CAP
        if magic != ROOT_MAGIC or count > cap:
            raise fs_error(errno.EUCLEAN, f"inode {inode.ino}: bad extent root")
        return depth, self._unpack_entries(depth, area, _ROOT_HEAD.size, count)

    @staticmethod
    def _unpack_entries(depth: int, buf, offset: int, count: int) -> list:
        st = _LEAF if depth == 0 else _INDEX
        view = memoryview(buf)[offset : offset + count * st.size]
        if depth == 0:
            return [Extent._make(t) for t in st.iter_unpack(view)]
        return list(st.iter_unpack(view))

    @staticmethod
    def _pack_entries(depth: int, entries: list) -> bytes:
        # One struct call for the whole node, not one per entry (a fragmented file's leaf
        # holds ~170 extents and is rewritten by every write that changes it).
        if not entries:
            return b""
        return _packer(depth, len(entries)).pack(*chain.from_iterable(entries))

    def _root_cap(self, depth: int) -> int:
        return ROOT_LEAF_CAP if depth == 0 else ROOT_INDEX_CAP

    def _node_cap(self, depth: int) -> int:
        return self.leaf_cap if depth == 0 else self.index_cap

    def _set_area(self, inode: Inode, depth: int, entries: list) -> None:
        body = _ROOT_HEAD.pack(ROOT_MAGIC, depth, len(entries), 0) + self._pack_entries(
            depth, entries
        )
        inode.extent_area = body + bytes(EXTENT_AREA_SIZE - len(body))

    def _read_node(self, inode: Inode, block: int, depth: int) -> list:
        buf = self.volume.read(block)
        hit = self._cache.get(block)
        if hit is not None and hit[0] == buf and hit[1] == depth and hit[2] == inode.ino:
            return hit[3]
        magic, ndepth, count, owner = _NODE_HEAD.unpack_from(buf)
        if (
            magic != NODE_MAGIC
            or ndepth != depth
            or count > self._node_cap(depth)
            or owner != inode.ino
        ):
            raise fs_error(
                errno.EUCLEAN,
                f"inode {inode.ino}: extent node at block {block} is damaged "
                f"(magic {magic:#x}, depth {ndepth} want {depth}, count {count}, owner {owner})",
            )
        entries = self._unpack_entries(depth, buf, _NODE_HEAD.size, count)
        self._remember(block, buf, depth, inode.ino, entries)
        return entries

    def _remember(self, block: int, raw: bytes, depth: int, ino: int, entries: list) -> None:
        # Parsed nodes are cached by block but only trusted while the block's bytes are the
        # same (compared on every read), so changes made underneath us (a replica applying
        # transactions) can never be missed. Cached lists are never mutated.
        cache = self._cache
        cache.pop(block, None)
        cache[block] = (raw, depth, ino, entries)
        if len(cache) > NODE_CACHE_SIZE:
            del cache[next(iter(cache))]

    def _write_node(self, inode: Inode, block: int, depth: int, entries: list) -> None:
        body = _NODE_HEAD.pack(NODE_MAGIC, depth, len(entries), inode.ino) + self._pack_entries(
            depth, entries
        )
        raw = body + bytes(self.block_size - len(body))
        self.volume.write(block, raw)
        self._remember(block, raw, depth, inode.ino, entries)

    def _alloc_node(self, ctx: _Edit, near: int | None) -> int:
        try:
            block = self.volume.allocator.allocate_one(near if near is not None else ctx.goal)
        except NoSpace:
            # Callers reserve with nodes_needed() first; reaching this is a bug.
            raise fs_error(errno.ENOSPC, "no room for an extent tree node") from None
        ctx.inode.blocks += 1
        return block

    def _free_node(self, inode: Inode, block: int) -> None:
        self._cache.pop(block, None)
        self.volume.allocator.free(block, 1)
        inode.blocks -= 1

    # ----------------------------------------------------------------------------- queries

    def depth(self, inode: Inode) -> int:
        """Depth of the tree (0: all extents in the inode)."""
        return self._root(inode)[0]

    def lookup(self, inode: Inode, start: int, end: int) -> list[Extent]:
        """Extents overlapping logical blocks [start, end), in order, not clipped."""
        depth, entries = self._root(inode)
        out: list[Extent] = []
        self._collect(inode, depth, entries, start, end, out)
        return out

    def _collect(
        self, inode: Inode, depth: int, entries: list, start: int, end: int, out: list
    ) -> None:
        if depth == 0:
            i = max(bisect_right(entries, start, key=_key) - 1, 0)
            for e in entries[i:]:
                if e.lblk >= end:
                    break
                if e.lblk + e.length > start:
                    out.append(e)
            return
        keys = [k for k, _ in entries]
        i_lo = max(bisect_right(keys, start) - 1, 0)
        i_hi = bisect_left(keys, end) - 1
        for i in range(i_lo, i_hi + 1):
            child = self._read_node(inode, entries[i][1], depth - 1)
            self._collect(inode, depth - 1, child, start, end, out)

    def extent_before(self, inode: Inode, lblk: int) -> Extent | None:
        """The last extent starting at or before ``lblk`` (for allocation goals), if any."""
        depth, entries = self._root(inode)
        while True:
            if not entries:
                return None
            i = max(bisect_right(entries, lblk, key=_key) - 1, 0)
            if depth == 0:
                return entries[i]
            entries = self._read_node(inode, entries[i][1], depth - 1)
            depth -= 1

    def extents(self, inode: Inode) -> Iterator[Extent]:
        """Every extent of the inode, in logical order."""
        depth, entries = self._root(inode)
        yield from self._walk(inode, depth, entries, None)

    def node_blocks(self, inode: Inode) -> Iterator[int]:
        """Every block of the tree itself (not the data), in no particular order."""
        depth, entries = self._root(inode)
        out: list[int] = []
        for _ in self._walk(inode, depth, entries, out):
            pass
        yield from out

    def _walk(self, inode: Inode, depth: int, entries: list, nodes: list | None) -> Iterator:
        if depth == 0:
            yield from entries
            return
        for _, block in entries:
            if nodes is not None:
                nodes.append(block)
            yield from self._walk(inode, depth - 1, self._read_node(inode, block, depth - 1), nodes)

    def check(self, inode: Inode) -> list[str]:
        """Structural problems of the tree (for fsck and tests); empty when it is sound.

        Checks node headers, non-empty nodes, index keys equal to their child's first
        logical block, extents sorted and non-overlapping with positive lengths.
        """
        problems: list[str] = []
        try:
            depth, entries = self._root(inode)
        except OSError as exc:
            return [str(exc)]
        if depth > 0 and not entries:
            problems.append(f"inode {inode.ino}: empty index root at depth {depth}")
        last_end = -1

        def visit(depth: int, entries: list, where: str) -> None:
            nonlocal last_end
            if depth == 0:
                for e in entries:
                    if e.length <= 0 or e.lblk < last_end:
                        problems.append(f"inode {inode.ino}: {where}: bad or overlapping {e}")
                    last_end = max(last_end, e.lblk + e.length)
                return
            for key, block in entries:
                try:
                    child = self._read_node(inode, block, depth - 1)
                except OSError as exc:
                    problems.append(str(exc))
                    continue
                if not child:
                    problems.append(f"inode {inode.ino}: empty extent node at block {block}")
                elif child[0][0] != key:
                    problems.append(
                        f"inode {inode.ino}: index key {key} but node {block} starts at "
                        f"{child[0][0]}"
                    )
                visit(depth - 1, child, f"node {block}")

        visit(depth, entries, "root")
        return problems

    def nodes_needed(self, inode: Inode, n_new: int) -> int:
        """Upper bound of node blocks that a ``replace`` inserting ``n_new`` extents allocates."""
        depth, _ = self._root(inode)
        added = n_new + 1  # the new extents plus one from splitting an extent in two
        need = 0
        for level in range(depth):
            k = -(-added // self._node_cap(level))
            need += k
            added = k
        # The root may overflow (and keep overflowing) into new levels.
        entries = self._root_cap(depth) + added
        level = depth
        while entries > self._root_cap(level):
            k = -(-entries // self._node_cap(level))
            need += k
            entries = k
            level += 1
        return need

    # ------------------------------------------------------------------------------- edits

    def replace(
        self, inode: Inode, start: int, end: int, new: list[Extent], *, goal: int | None = None
    ) -> list[Extent]:
        """Make ``new`` the whole mapping of logical blocks [start, end).

        ``new`` must lie inside [start, end), sorted and non-overlapping. Returns what was
        mapped there before, clipped to the range; the caller frees (or reuses) those data
        blocks. Node blocks are allocated (near ``goal``) and freed here and charged to
        ``inode.blocks``; ``inode.extent_area`` is updated, the caller writes the inode.
        """
        if start >= end:
            return []
        for e in new:
            if e.lblk < start or e.lblk + e.length > end or e.length <= 0:
                raise ValueError(f"extent {e} outside [{start}, {end})")
        depth, entries = self._root(inode)
        ctx = _Edit(inode, goal)
        new_entries = self._edit(ctx, depth, entries, start, end, new)
        if new_entries != entries:
            self._store_root(ctx, depth, new_entries)
        return ctx.removed

    def _edit(
        self, ctx: _Edit, depth: int, entries: list, start: int, end: int, new: list[Extent]
    ) -> list:
        """The entries of this level after the edit (any number: the caller stores them)."""
        if depth == 0:
            return self._edit_leaf(entries, start, end, new, ctx.removed)
        keys = [k for k, _ in entries]
        i_lo = max(bisect_right(keys, start) - 1, 0)
        i_hi = max(bisect_left(keys, end) - 1, i_lo)
        out = entries[:i_lo]
        for i in range(i_lo, i_hi + 1):
            block = entries[i][1]
            if i_lo < i < i_hi:
                # Children strictly between the two ends lie wholly inside [start, end).
                self._drop_subtree(ctx, depth - 1, block)
                continue
            child = self._read_node(ctx.inode, block, depth - 1)
            child_new = self._edit(ctx, depth - 1, child, start, end, new if i == i_lo else [])
            out.extend(self._store_nodes(ctx, depth - 1, child_new, block, child))
        out.extend(entries[i_hi + 1 :])
        return out

    @staticmethod
    def _edit_leaf(
        entries: list[Extent], start: int, end: int, new: list[Extent], removed: list[Extent]
    ) -> list[Extent]:
        # Only entries[i:j] can meet [start, end); the rest is kept as it is.
        i = max(bisect_right(entries, start, key=_key) - 1, 0)
        j = bisect_left(entries, end, key=_key)
        left: list[Extent] = []
        right: list[Extent] = []
        cut = len(removed)
        for e in entries[i:j]:
            e_end = e.lblk + e.length
            if e_end <= start:
                left.append(e)
            elif e.lblk >= end:
                right.append(e)
            else:
                if e.lblk < start:
                    left.append(Extent(e.lblk, e.pblk, start - e.lblk, e.flags))
                s, t = max(e.lblk, start), min(e_end, end)
                removed.append(Extent(s, e.pblk + s - e.lblk, t - s, e.flags))
                if e_end > end:
                    right.append(Extent(end, e.pblk + end - e.lblk, e_end - end, e.flags))
        if not new and len(removed) == cut:
            return entries
        left = entries[:i] + left
        right.extend(entries[j:])
        # Neighbours that were not touched were merged already: merge around the seams only.
        seam = merge_extents(left[-1:] + list(new) + right[:1])
        return left[:-1] + seam + right[1:]

    def _drop_subtree(self, ctx: _Edit, depth: int, block: int) -> None:
        entries = self._read_node(ctx.inode, block, depth)
        if depth == 0:
            ctx.removed.extend(entries)
        else:
            for _, child in entries:
                self._drop_subtree(ctx, depth - 1, child)
        self._free_node(ctx.inode, block)

    def _store_nodes(
        self, ctx: _Edit, depth: int, entries: list, old_block: int | None, old: list | None
    ) -> list[tuple[int, int]]:
        """Write ``entries`` as one or more nodes (reusing ``old_block`` first); index entries."""
        if not entries:
            if old_block is not None:
                self._free_node(ctx.inode, old_block)
            return []
        cap = self._node_cap(depth)
        n = -(-len(entries) // cap)
        size, extra = divmod(len(entries), n)
        out: list[tuple[int, int]] = []
        pos = 0
        for i in range(n):
            chunk = entries[pos : pos + size + (1 if i < extra else 0)]
            pos += len(chunk)
            if i == 0 and old_block is not None:
                block = old_block
                if n == 1 and chunk == old:
                    out.append((chunk[0][0], block))
                    continue
            else:
                block = self._alloc_node(ctx, old_block)
            self._write_node(ctx.inode, block, depth, chunk)
            out.append((chunk[0][0], block))
        return out

    def _store_root(self, ctx: _Edit, depth: int, entries: list) -> None:
        while len(entries) > self._root_cap(depth):
            entries = self._store_nodes(ctx, depth, entries, None, None)
            depth += 1
        # Shallower again when all grandchildren fit in the root.
        while depth > 0:
            if not entries:
                depth = 0
                break
            if len(entries) > self._root_cap(depth - 1):
                break
            children = [self._read_node(ctx.inode, b, depth - 1) for _, b in entries]
            if sum(len(c) for c in children) > self._root_cap(depth - 1):
                break
            for _, b in entries:
                self._free_node(ctx.inode, b)
            entries = [e for c in children for e in c]
            depth -= 1
        self._set_area(ctx.inode, depth, entries)

    def free_tree(self, inode: Inode) -> list[Extent]:
        """Free every node block, empty the root; return all extents (the caller frees data)."""
        depth, entries = self._root(inode)
        ctx = _Edit(inode, None)
        if depth == 0:
            ctx.removed.extend(entries)
        else:
            for _, block in entries:
                self._drop_subtree(ctx, depth - 1, block)
        self._set_area(inode, 0, [])
        return ctx.removed
