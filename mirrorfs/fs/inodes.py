"""The inode table: allocation bitmap, fixed-size records, generations and the orphan list.

Inode ``n`` is the 256-byte record at byte ``n * 256`` of the table (``FsSuper``); whether it
is in use is bit ``n`` of the inode bitmap (an ``ExtentAllocator``). Inode 0 is reserved and
always marked used, so the first allocation on a fresh filesystem returns 1 (the root).

Cost model: ``put`` rewrites the one table block that holds the inode; ``allocate`` and
``release`` add one inode-bitmap block. Generations are reserved in batches of
``GENERATION_BATCH`` in ``FsSuper.next_generation``, so the superblock is written once per
batch, not on every allocation; after a crash the unused rest of a batch is skipped, so a
generation is never handed out twice.

The orphan list (inodes unlinked while still open, freed at the next mount after a crash) is
singly linked through ``Inode.orphan_next`` from ``FsSuper.orphan_head``.

Concurrency: every method is synchronous (no awaits), so each call is atomic under trio.
"""

from __future__ import annotations

import errno
import logging
import weakref
from collections import OrderedDict

from mirrorfs.fs.layout import FLAG_ORPHAN, INODE_SIZE, FsSuper, Inode, fs_error
from mirrorfs.store.allocator import ExtentAllocator, bitmap_blocks_for
from mirrorfs.store.blockstore import BlockStore
from mirrorfs.store.errors import NoSpace
from mirrorfs.store.txn import Hint, HintKind
from mirrorfs.store.volume import CLIENT_SUPER

log = logging.getLogger(__name__)

GENERATION_BATCH = 1024
CACHE_SIZE = 1024  # inodes kept alive by the table itself; holders keep theirs alive anyway


def format_layout(volume: BlockStore, inode_count: int) -> FsSuper:
    """Allocate and write an empty inode bitmap and table, then the client superblock.

    ``inode_count`` is rounded up to fill the last table block. Bitmap and table are one
    contiguous run from ``volume.allocator``. Returns the new ``FsSuper``; the caller
    creates the root directory (the first ``InodeTable.allocate`` returns ino 1).
    """
    bs = volume.block_size
    per_block = bs // INODE_SIZE
    inode_count = max(inode_count + 1, 2)  # +1: ino 0 is reserved
    inode_count = -(-inode_count // per_block) * per_block
    nbitmap = bitmap_blocks_for(inode_count, bs)
    ntable = inode_count // per_block
    try:
        runs = volume.allocator.allocate(nbitmap + ntable, goal=CLIENT_SUPER + 1)
    except NoSpace:
        raise fs_error(errno.ENOSPC, f"no room for {inode_count} inodes") from None
    if len(runs) != 1:
        for start, count in runs:
            volume.allocator.free(start, count)
        raise fs_error(errno.ENOSPC, "no contiguous room for the inode table")
    start = runs[0][0]
    ExtentAllocator.format(volume, start, inode_count, used=[(0, 1)])
    table_start = start + nbitmap
    # The table is not written: Volume.create makes a new, all-zero block file, so every slot
    # already reads as free, and mkfs of a large volume (16 GiB of table for 1 TiB) stays a
    # small transaction instead of gigabytes of zeros in the log.
    sb = FsSuper(
        inode_count=inode_count,
        inode_bitmap_start=start,
        inode_bitmap_blocks=nbitmap,
        inode_table_start=table_start,
        inode_table_blocks=ntable,
    )
    volume.write(CLIENT_SUPER, sb.pack(bs))
    log.info(
        "inode table: %d inodes, bitmap at %d (%d blocks), table at %d (%d blocks)",
        inode_count,
        start,
        nbitmap,
        table_start,
        ntable,
    )
    return sb


def read_super(volume: BlockStore) -> FsSuper:
    """Read and parse the client superblock (FsError(EUCLEAN) if it is not mirrorfs)."""
    return FsSuper.unpack(volume.read(CLIENT_SUPER))


class InodeTable:
    """Inodes of one filesystem: get/put records, allocate/release numbers, orphans.

    One ``Inode`` object per inode number while anybody holds it (weak map) plus a bounded
    LRU of strong references. ``put`` writes through immediately.
    """

    def __init__(self, volume: BlockStore, sb: FsSuper) -> None:
        self.volume = volume
        self.sb = sb
        self.block_size = volume.block_size
        self.per_block = self.block_size // INODE_SIZE
        self.bitmap = ExtentAllocator(volume, sb.inode_bitmap_start, sb.inode_count)
        self._live: weakref.WeakValueDictionary[int, Inode] = weakref.WeakValueDictionary()
        self._recent: OrderedDict[int, Inode] = OrderedDict()
        # Generations below _gen_limit are reserved in the superblock already.
        self._gen_next = sb.next_generation
        self._gen_limit = sb.next_generation

    # ------------------------------------------------------------------------------ queries

    @property
    def free_count(self) -> int:
        """Free inode numbers."""
        return self.bitmap.free_count

    @property
    def total(self) -> int:
        """Usable inode numbers (ino 0 is reserved and not counted)."""
        return self.bitmap.total - 1

    def is_used(self, ino: int) -> bool:
        """True when ``ino`` is a valid, allocated inode number."""
        return 0 < ino < self.sb.inode_count and self.bitmap.is_used(ino)

    def _where(self, ino: int) -> tuple[int, int]:
        """(table block, byte offset in it) of inode ``ino``."""
        return self.sb.inode_table_start + ino // self.per_block, (
            ino % self.per_block
        ) * INODE_SIZE

    def _remember(self, inode: Inode) -> None:
        self._live[inode.ino] = inode
        self._recent[inode.ino] = inode
        self._recent.move_to_end(inode.ino)
        while len(self._recent) > CACHE_SIZE:
            self._recent.popitem(last=False)

    def _forget(self, ino: int) -> None:
        self._live.pop(ino, None)
        self._recent.pop(ino, None)

    def _read(self, ino: int) -> Inode:
        block, off = self._where(ino)
        return Inode.unpack(ino, self.volume.read(block), off)

    # ------------------------------------------------------------------------------- access

    def get(self, ino: int) -> Inode:
        """The inode ``ino``; FsError(ENOENT) if it is free or out of range."""
        inode = self._live.get(ino)
        if inode is not None:
            self._remember(inode)
            return inode
        if not self.is_used(ino):
            raise fs_error(errno.ENOENT, f"inode {ino} is not in use")
        inode = self._read(ino)
        self._remember(inode)
        return inode

    def put(self, inode: Inode) -> None:
        """Write ``inode`` to its table block (read-modify-write of that one block)."""
        block, off = self._where(inode.ino)
        buf = bytearray(self.volume.read(block))
        buf[off : off + INODE_SIZE] = inode.pack()
        self.volume.write(block, buf)
        self.volume.hint(Hint(HintKind.INODE_UPDATED, inode.ino))
        self._remember(inode)

    def allocate(
        self,
        mode: int,
        uid: int,
        gid: int,
        now_ns: int,
        *,
        goal: int | None = None,
        write: bool = True,
    ) -> Inode:
        """A new inode (lowest free number, or near ``goal``), nlink 0, fresh generation.

        Written to its table block before returning, unless ``write`` is false: then the
        caller ``put``s it (or ``release``s it) within the same filesystem operation.
        FsError(ENOSPC) when none is free.
        """
        try:
            ino = self.bitmap.allocate_one(goal if goal is not None else 0)
        except NoSpace:
            raise fs_error(errno.ENOSPC, "no free inodes") from None
        self._forget(ino)
        inode = Inode(
            ino=ino,
            mode=mode,
            uid=uid,
            gid=gid,
            atime_ns=now_ns,
            mtime_ns=now_ns,
            ctime_ns=now_ns,
            generation=self._next_generation(),
        )
        if write:
            self.put(inode)
        else:
            self._remember(inode)
        return inode

    def release(self, inode: Inode) -> None:
        """Zero the slot of ``inode`` and free its number (its data must be freed already).

        Takes it off the orphan list first if it is on it.
        """
        if inode.flags & FLAG_ORPHAN:
            self._unlist_orphan(inode)  # its own slot is zeroed below, not written first
        if inode.blocks:
            log.warning("inode %d released with %d blocks still charged", inode.ino, inode.blocks)
        block, off = self._where(inode.ino)
        buf = bytearray(self.volume.read(block))
        buf[off : off + INODE_SIZE] = bytes(INODE_SIZE)
        self.volume.write(block, buf)
        self.bitmap.free(inode.ino, 1)
        self.volume.hint(Hint(HintKind.INODE_DELETED, inode.ino))
        self._forget(inode.ino)

    def clear_slot(self, ino: int) -> None:
        """Zero the table slot of ``ino``, which the bitmap says is free (fsck)."""
        if self.is_used(ino):
            raise ValueError(f"inode {ino} is in use")
        block, off = self._where(ino)
        buf = bytearray(self.volume.read(block))
        buf[off : off + INODE_SIZE] = bytes(INODE_SIZE)
        self.volume.write(block, buf)
        self.volume.hint(Hint(HintKind.INODE_DELETED, ino))
        self._forget(ino)

    def _next_generation(self) -> int:
        if self._gen_next >= self._gen_limit:
            self._gen_limit = self._gen_next + GENERATION_BATCH
            self.sb.next_generation = self._gen_limit
            self.write_super()
        gen = self._gen_next
        self._gen_next += 1
        return gen

    def write_super(self) -> None:
        """Write ``self.sb`` to the client superblock."""
        self.volume.write(CLIENT_SUPER, self.sb.pack(self.block_size))

    # ------------------------------------------------------------------------------ orphans

    def add_orphan(self, inode: Inode) -> None:
        """Put ``inode`` at the head of the orphan list (writes it and the superblock)."""
        if inode.flags & FLAG_ORPHAN:
            self.put(inode)
            return
        inode.orphan_next = self.sb.orphan_head
        inode.flags |= FLAG_ORPHAN
        self.put(inode)
        self.sb.orphan_head = inode.ino
        self.write_super()

    def remove_orphan(self, inode: Inode) -> None:
        """Unlink ``inode`` from the orphan list; a no-op if it is not on it."""
        if not inode.flags & FLAG_ORPHAN:
            return
        self._unlist_orphan(inode)
        self.put(inode)

    def _unlist_orphan(self, inode: Inode) -> None:
        """Take ``inode`` (flagged orphan) off the list, in memory for itself."""
        if self.sb.orphan_head == inode.ino:
            self.sb.orphan_head = inode.orphan_next
            self.write_super()
        else:
            prev = self._find_orphan_predecessor(inode.ino)
            if prev is not None:
                prev.orphan_next = inode.orphan_next
                self.put(prev)
            else:
                log.warning("inode %d flagged orphan but not on the orphan list", inode.ino)
        inode.orphan_next = 0
        inode.flags &= ~FLAG_ORPHAN

    def _find_orphan_predecessor(self, ino: int) -> Inode | None:
        seen: set[int] = set()
        cur = self.sb.orphan_head
        while cur and cur not in seen:
            seen.add(cur)
            try:
                node = self.get(cur)
            except OSError:
                return None
            if node.orphan_next == ino:
                return node
            cur = node.orphan_next
        return None

    def orphans(self) -> list[int]:
        """Inode numbers on the orphan list, head first (stops at a loop or a bad link)."""
        out: list[int] = []
        seen: set[int] = set()
        cur = self.sb.orphan_head
        while cur:
            if cur in seen or not self.is_used(cur):
                log.error("orphan list broken at inode %d", cur)
                break
            seen.add(cur)
            out.append(cur)
            cur = self.get(cur).orphan_next
        return out

    # ------------------------------------------------------------------ replica (refreshing)

    def refresh(self, ino: int) -> None:
        """Reread inode ``ino`` (changed underneath us, e.g. by a replicated transaction).

        The live object, if any, is updated in place so that holders see the new content;
        the inode-bitmap block covering ``ino`` is reread too.
        """
        if not 0 < ino < self.sb.inode_count:
            return
        upb = self.block_size * 8
        self.bitmap.refresh_blocks(self.sb.inode_bitmap_start + ino // upb, 1)
        inode = self._live.get(ino)
        if inode is None:
            return
        if self.bitmap.is_used(ino):
            inode.copy_from(self._read(ino))
        else:
            self._forget(ino)

    def refresh_all(self) -> None:
        """Reread the superblock, the inode bitmap and every inode held in memory."""
        sb = read_super(self.volume)
        for name in FsSuper.__slots__:
            setattr(self.sb, name, getattr(sb, name))
        self._gen_next = self._gen_limit = self.sb.next_generation
        self.bitmap.reload()
        for ino in list(self._live.keys()):
            self.refresh(ino)
