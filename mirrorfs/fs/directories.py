"""Directories: ext2-style variable-length records in the directory inode's data blocks.

On-disk format. A directory's data (read and written through ``FileData``) is a sequence of
blocks; every block is covered exactly by records, and no record crosses a block boundary::

    0  I  ino        inode number of the entry, 0 = free record
    4  H  rec_len    bytes from this record to the next one (multiple of 4)
    6  B  name_len   1..255
    7  B  dtype      file type (mode >> 12: DT_REG 8, DT_DIR 4, DT_LNK 10, ...)
    8  .. name       name_len bytes, then padding up to rec_len

A record may be longer than its name needs: the slack is free space for later insertions.
Deleting an entry merges its record into the previous one of the same block, or marks it
free (ino 0) when it is the first of its block. Entries therefore never move, and the byte
position of an entry in the directory data is a stable readdir cookie. "." and ".." are not
stored: the parent of a directory lives in its inode (see ``filesystem``).

Cost model: adding or removing an entry reads and writes one directory block (plus, when the
directory grows, the new block and the allocator's bitmap). Finding a name or a block with
room uses an in-memory ``DirIndex`` built on first use of a directory (its data read in large
runs) and kept in a bounded LRU; memory is about 130 bytes per cached entry.
"""

from __future__ import annotations

import errno
import logging
import struct
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from mirrorfs.fs.extents import UNWRITTEN
from mirrorfs.fs.layout import Inode, fs_error
from mirrorfs.store.blockstore import BlockStore

log = logging.getLogger(__name__)

REC = struct.Struct("<IHBB")
REC_HEAD = REC.size
MAX_NAME = 255
MAX_INO = 0xFFFFFFFF
# Build an index reading this many bytes of directory data at a time.
BUILD_CHUNK = 1 << 20
# Default budget of the index LRU, in cached entries (about 130 bytes each).
DEFAULT_CACHE_ENTRIES = 500_000

# Packing of an index value: position << 40 | ino << 8 | dtype (one int per entry, to keep a
# 100,000-entry directory around 10 MB instead of tuples at three times that).
_POS_SHIFT = 40
_INO_SHIFT = 8


class DirCorrupt(ValueError):
    """A directory block whose records do not parse; the message says where."""


def rec_size(name_len: int) -> int:
    """Bytes a record with a ``name_len``-byte name needs (header + name, 4-byte aligned)."""
    return (REC_HEAD + name_len + 3) & ~3


@dataclass(slots=True)
class DirRecord:
    """One record of a directory block, as parsed."""

    offset: int  # within the block
    ino: int  # 0 = free
    rec_len: int
    name: bytes
    dtype: int

    @property
    def used(self) -> int:
        return rec_size(len(self.name)) if self.ino else 0


def empty_block(block_size: int) -> bytes:
    """A directory block holding one free record that spans it."""
    return REC.pack(0, block_size, 0, 0) + bytes(block_size - REC_HEAD)


def parse_block(buf: bytes | bytearray | memoryview, where: str = "") -> list[DirRecord]:
    """Every record of one directory block; DirCorrupt if the chain is broken."""
    size = len(buf)
    out: list[DirRecord] = []
    off = 0
    unpack = REC.unpack_from
    while off < size:
        if off + REC_HEAD > size:
            raise DirCorrupt(f"{where}: record header at {off} crosses the block end")
        ino, rec_len, name_len, dtype = unpack(buf, off)
        if rec_len < REC_HEAD or rec_len & 3 or off + rec_len > size:
            raise DirCorrupt(f"{where}: bad record length {rec_len} at offset {off}")
        if ino:
            if name_len == 0 or rec_size(name_len) > rec_len:
                raise DirCorrupt(f"{where}: bad name length {name_len} at offset {off}")
            name = bytes(buf[off + REC_HEAD : off + REC_HEAD + name_len])
            if b"/" in name or b"\0" in name or name in (b".", b".."):
                raise DirCorrupt(f"{where}: invalid name {name!r} at offset {off}")
        else:
            name = b""
        out.append(DirRecord(off, ino, rec_len, name, dtype))
        off += rec_len
    return out


def block_room(records: list[DirRecord]) -> tuple[int, int]:
    """(largest record that fits, offset of the only record with slack or -1) of a block."""
    best = 0
    at = -1
    slack = 0
    for r in records:
        free = r.rec_len - r.used
        if free > 0:
            slack += 1
            at = r.offset
            best = max(best, free)
    return best, at if slack <= 1 else -1


def scan_room(buf: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``block_room`` of a block that is known to parse, reading record headers only."""
    size = len(buf)
    unpack = REC.unpack_from
    off = 0
    best = 0
    at = -1
    slack = 0
    while off < size:
        ino, rec_len, name_len, _ = unpack(buf, off)
        if rec_len < REC_HEAD:  # damaged: claim no room rather than loop
            return 0, -1
        free = rec_len - ((REC_HEAD + name_len + 3) & ~3 if ino else 0)
        if free > 0:
            slack += 1
            at = off
            if free > best:
                best = free
        off += rec_len
    return best, at if slack <= 1 else -1


class DirIndex:
    """In-memory index of one directory: name -> packed (position, ino, dtype), room per block.

    Valid for the directory inode's generation and data size at build time; anything that
    changes the directory through ``DirectoryStore`` keeps it up to date.
    """

    __slots__ = ("ino", "generation", "size", "names", "room", "hint", "pblk")

    def __init__(self, ino: int, generation: int, size: int) -> None:
        self.ino = ino
        self.generation = generation
        self.size = size
        self.names: dict[bytes, int] = {}
        # Per block: the largest record that fits, and the offset of the one record with
        # slack when only one has any (the usual case: a block filled front to back), else
        # -1. With a hint, an insertion goes straight there instead of walking the block.
        self.room = array("I")
        self.hint = array("i")
        # Volume block of each directory block (0 = ask FileData): an update of one block
        # is then one volume read and one write, without walking the extent tree.
        self.pblk = array("Q")

    def __len__(self) -> int:
        return len(self.names)


def _pack(pos: int, ino: int, dtype: int) -> int:
    return pos << _POS_SHIFT | ino << _INO_SHIFT | dtype


def _unpack(value: int) -> tuple[int, int, int]:
    return value >> _POS_SHIFT, (value >> _INO_SHIFT) & MAX_INO, value & 0xFF


class DirectoryStore:
    """Directory entries on top of ``FileData``; the caller writes the directory inode.

    Methods that change a directory may change the directory inode (its size and extents when
    it grows); the caller then ``put``s it, normally together with its mtime/ctime.
    Methods raise FsError(EIO) for a directory whose blocks do not parse.
    """

    def __init__(
        self, volume: BlockStore, filedata, *, cache_entries: int = DEFAULT_CACHE_ENTRIES
    ) -> None:
        self.volume = volume
        self.data = filedata
        self.block_size: int = volume.block_size
        self.cache_entries = cache_entries
        self._cache: OrderedDict[int, DirIndex] = OrderedDict()
        self._cached_entries = 0

    # ------------------------------------------------------------------------- cache control

    def forget(self, ino: int) -> None:
        """Drop the cached index of directory ``ino`` (freed, or changed underneath us)."""
        idx = self._cache.pop(ino, None)
        if idx is not None:
            self._cached_entries -= len(idx)

    def clear(self) -> None:
        """Drop every cached index."""
        self._cache.clear()
        self._cached_entries = 0

    @property
    def cached_entries(self) -> int:
        return self._cached_entries

    def _index(self, dinode: Inode) -> DirIndex:
        idx = self._cache.get(dinode.ino)
        if idx is not None:
            if idx.generation == dinode.generation and idx.size == dinode.size:
                self._cache.move_to_end(dinode.ino)
                return idx
            self.forget(dinode.ino)
        idx = self._build(dinode)
        self._cache[dinode.ino] = idx
        self._cached_entries += len(idx)
        self._trim(keep=dinode.ino)
        return idx

    def _trim(self, keep: int) -> None:
        while self._cached_entries > self.cache_entries and len(self._cache) > 1:
            ino = next(iter(self._cache))
            if ino == keep:
                self._cache.move_to_end(ino)
                continue
            self.forget(ino)

    def _build(self, dinode: Inode) -> DirIndex:
        bs = self.block_size
        idx = DirIndex(dinode.ino, dinode.generation, dinode.size)
        if dinode.size % bs:
            raise self._corrupt(dinode, f"size {dinode.size} is not a multiple of {bs}")
        names = idx.names
        room = idx.room
        chunk = max(BUILD_CHUNK // bs, 1) * bs
        for start in range(0, dinode.size, chunk):
            buf = self.data.read(dinode, start, min(chunk, dinode.size - start))
            view = memoryview(buf)
            for boff in range(0, len(buf), bs):
                block = (start + boff) // bs
                try:
                    records = parse_block(view[boff : boff + bs], f"block {block}")
                except DirCorrupt as exc:
                    raise self._corrupt(dinode, str(exc))
                base = block * bs
                for r in records:
                    if r.ino:
                        if r.name in names:
                            raise self._corrupt(dinode, f"name {r.name!r} appears twice")
                        names[r.name] = _pack(base + r.offset, r.ino, r.dtype)
                best, at = block_room(records)
                room.append(best)
                idx.hint.append(at)
        self._map(dinode, idx)
        return idx

    def _map(self, dinode: Inode, idx: DirIndex) -> None:
        nblocks = dinode.size // self.block_size
        pblk = array("Q", bytes(8 * nblocks))
        for e in self.data.extents(dinode):
            if e.flags & UNWRITTEN:
                continue
            for i in range(max(e.lblk, 0), min(e.lblk + e.length, nblocks)):
                pblk[i] = e.pblk + i - e.lblk
        idx.pblk = pblk

    def _read_block(self, dinode: Inode, idx: DirIndex, block: int) -> bytearray:
        p = idx.pblk[block] if block < len(idx.pblk) else 0
        if p:
            return bytearray(self.volume.read(p))
        return bytearray(self.data.read(dinode, block * self.block_size, self.block_size))

    def _write_block(self, dinode: Inode, idx: DirIndex, block: int, buf: bytearray) -> None:
        p = idx.pblk[block] if block < len(idx.pblk) else 0
        if p:
            self.volume.write(p, buf)
            return
        self.data.write(dinode, block * self.block_size, bytes(buf))

    @staticmethod
    def _corrupt(dinode: Inode, why: str) -> OSError:
        log.error("directory inode %d is damaged: %s", dinode.ino, why)
        return fs_error(errno.EIO, f"directory inode {dinode.ino} is damaged: {why}")

    # ------------------------------------------------------------------------------ queries

    def lookup(self, dinode: Inode, name: bytes) -> tuple[int, int] | None:
        """(ino, dtype) of ``name`` in the directory, or None."""
        value = self._index(dinode).names.get(name)
        if value is None:
            return None
        _, ino, dtype = _unpack(value)
        return ino, dtype

    def count(self, dinode: Inode) -> int:
        """Number of entries (cheap once the directory is indexed)."""
        if dinode.size == 0:
            return 0
        return len(self._index(dinode))

    def needs_block(self, dinode: Inode, name: bytes) -> bool:
        """True when adding ``name`` would have to grow the directory by one block."""
        return self._find_room(self._index(dinode), rec_size(len(name))) < 0

    def entries(self, dinode: Inode, start: int = 0) -> Iterator[tuple[int, bytes, int, int]]:
        """(position, name, ino, dtype) of every entry at a position >= ``start``, in order.

        Reads one block at a time, so a caller that stops early pays for what it read.
        """
        bs = self.block_size
        block = max(start, 0) // bs
        nblocks = dinode.size // bs
        while block < nblocks:
            buf = self.data.read(dinode, block * bs, bs)
            try:
                records = parse_block(buf, f"block {block}")
            except DirCorrupt as exc:
                raise self._corrupt(dinode, str(exc))
            base = block * bs
            for r in records:
                if r.ino and base + r.offset >= start:
                    yield base + r.offset, r.name, r.ino, r.dtype
            block += 1

    # ------------------------------------------------------------------------------ changes

    def add(self, dinode: Inode, name: bytes, ino: int, dtype: int) -> int:
        """Add an entry (the caller checked that ``name`` is absent); returns its position."""
        if not 0 < ino <= MAX_INO:
            raise ValueError(f"inode number {ino} out of range")
        idx = self._index(dinode)
        bs = self.block_size
        need = rec_size(len(name))
        block = self._find_room(idx, need)
        if block < 0:
            # Grow by one block. FileData raises ENOSPC before changing anything.
            block = dinode.size // bs
            buf = bytearray(empty_block(bs))
        else:
            buf = self._read_block(dinode, idx, block)
        hint = idx.hint[block] if block < len(idx.hint) else 0
        off, room, hint = self._insert(dinode, block, buf, name, ino, dtype, need, hint)
        self._write_block(dinode, idx, block, buf)
        # The index changes only once the write went through (growing may fail: ENOSPC).
        if block == len(idx.room):
            idx.room.append(room)
            idx.hint.append(hint)
            self._map(dinode, idx)
        else:
            idx.room[block] = room
            idx.hint[block] = hint
        pos = block * bs + off
        idx.names[name] = _pack(pos, ino, dtype)
        self._cached_entries += 1
        idx.size = dinode.size
        return pos

    def _insert(
        self,
        dinode: Inode,
        block: int,
        buf: bytearray,
        name: bytes,
        ino: int,
        dtype: int,
        need: int,
        hint: int,
    ) -> tuple[int, int, int]:
        """Put a record into ``buf``; return its offset and the block's new room and hint.

        This is the hot path of every create in a large directory: with a hint it touches
        one record header; otherwise it walks the headers (first fit) and rescans.
        """
        size = len(buf)
        unpack = REC.unpack_from
        off = hint if hint >= 0 else 0
        while off < size:
            r_ino, rec_len, name_len, r_dtype = unpack(buf, off)
            if rec_len < REC_HEAD or rec_len & 3 or off + rec_len > size:
                raise self._corrupt(dinode, f"block {block}: bad record length at {off}")
            used = rec_size(name_len) if r_ino else 0
            if rec_len - used >= need:
                if r_ino:
                    # Split: the existing record keeps what it uses, the new one the rest.
                    REC.pack_into(buf, off, r_ino, used, name_len, r_dtype)
                    at, new_len = off + used, rec_len - used
                else:
                    at, new_len = off, rec_len
                REC.pack_into(buf, at, ino, new_len, len(name), dtype)
                buf[at + REC_HEAD : at + REC_HEAD + len(name)] = name
                if hint >= 0:
                    # The hinted record was the only one with slack; now the new one is
                    # (or none is, after an exact fit).
                    left = new_len - need
                    return at, left, at if left else -1
                room, new_hint = scan_room(buf)
                return at, room, new_hint
            if hint >= 0:
                break  # stale hint: fall back to the walk
            off += rec_len
        if hint >= 0:
            return self._insert(dinode, block, buf, name, ino, dtype, need, -1)
        raise self._corrupt(dinode, f"block {block}: room map is wrong")

    def remove(self, dinode: Inode, name: bytes) -> tuple[int, int]:
        """Remove entry ``name``; returns its (ino, dtype). FsError(ENOENT) if absent."""
        idx = self._index(dinode)
        value = idx.names.get(name)
        if value is None:
            raise fs_error(errno.ENOENT)
        pos, ino, dtype = _unpack(value)
        bs = self.block_size
        block, off = divmod(pos, bs)
        buf = self._read_block(dinode, idx, block)
        unpack = REC.unpack_from
        cur = 0
        prev = -1
        while cur < off:
            rec_len = unpack(buf, cur)[1]
            if rec_len < REC_HEAD or rec_len & 3 or cur + rec_len > bs:
                raise self._corrupt(dinode, f"block {block}: bad record length at {cur}")
            prev, cur = cur, cur + rec_len
        if cur != off:
            raise self._corrupt(dinode, f"entry {name!r} not found at position {pos}")
        rec_len = unpack(buf, off)[1]
        if prev < 0:
            REC.pack_into(buf, off, 0, rec_len, 0, 0)
            freed, free = off, rec_len
        else:
            p_ino, p_len, p_name_len, p_dtype = unpack(buf, prev)
            REC.pack_into(buf, prev, p_ino, p_len + rec_len, p_name_len, p_dtype)
            freed, free = prev, p_len + rec_len - (rec_size(p_name_len) if p_ino else 0)
        self._write_block(dinode, idx, block, buf)
        del idx.names[name]
        self._cached_entries -= 1
        # The record that took the space is the block's only one with slack when no other
        # had any before: no slack at all (room 0), or the only one was that record or the
        # removed one. Otherwise walk the headers.
        room, hint = idx.room[block], idx.hint[block]
        if room == 0 or hint in (freed, off):
            idx.room[block], idx.hint[block] = free, freed
        else:
            idx.room[block], idx.hint[block] = scan_room(buf)
        return ino, dtype

    def retarget(self, dinode: Inode, name: bytes, ino: int, dtype: int) -> tuple[int, int]:
        """Point the existing entry ``name`` at another inode in place (rename over it).

        Returns the old (ino, dtype); FsError(ENOENT) if absent.
        """
        idx = self._index(dinode)
        value = idx.names.get(name)
        if value is None:
            raise fs_error(errno.ENOENT)
        pos, old_ino, old_dtype = _unpack(value)
        bs = self.block_size
        block, off = divmod(pos, bs)
        buf = self._read_block(dinode, idx, block)
        _, rec_len, name_len, _ = REC.unpack_from(buf, off)
        if name_len != len(name) or bytes(buf[off + REC_HEAD : off + REC_HEAD + name_len]) != name:
            raise self._corrupt(dinode, f"entry {name!r} not found at position {pos}")
        REC.pack_into(buf, off, ino, rec_len, name_len, dtype)
        self._write_block(dinode, idx, block, buf)
        idx.names[name] = _pack(pos, ino, dtype)
        return old_ino, old_dtype

    @staticmethod
    def _find_room(idx: DirIndex, need: int) -> int:
        room = idx.room
        # Most directories grow at their end: look at the last block first.
        if room and room[-1] >= need:
            return len(room) - 1
        for i, free in enumerate(room):
            if free >= need:
                return i
        return -1
