"""Extended attributes: an inode's xattrs in one block, or a chain of blocks.

``Inode.xattr_block`` names the first block (allocated on the first set, freed when the
last name is removed; every block is charged to ``Inode.blocks``). What fits in one block
is kept in the one-block format::

    0  I magic 0x52544158 ("XATR")   4  H count   6  H reserved   8  Q owner ino
    16 entries: H name length, I value length, name bytes, value bytes; zero padding

More (many small attributes: test suites set 1,000 on one file) goes to a chain of up to
``MAX_BLOCKS`` blocks, each::

    0  I magic 0x32544158 ("XAT2")   4  H count   6  H reserved   8  Q owner ino
    16 Q next block (0: the last)    24 entries as above; an entry never spans two blocks

Names keep insertion order (a replaced value keeps its place). Like FileData, the methods
mutate the ``Inode`` (xattr_block, blocks) and the CALLER writes it with ``InodeTable.put``.

Errors: ENODATA for a missing name; ERANGE for a name over 255 bytes, EINVAL for an empty
one; E2BIG for an attribute that could never fit in a block; ENOSPC when the chain would
outgrow ``MAX_BLOCKS`` or no block can be allocated (nothing changed then);
EEXIST/ENODATA for XATTR_CREATE/XATTR_REPLACE.
"""

from __future__ import annotations

import errno
import logging
import os
import struct

from mirrorfs.fs.layout import Inode, fs_error
from mirrorfs.store.blockstore import BlockStore
from mirrorfs.store.errors import NoSpace

log = logging.getLogger(__name__)

XATTR_MAGIC = 0x52544158
CHAIN_MAGIC = 0x32544158
#: The longest chain: 64 KiB of attributes with 4 KiB blocks (Linux's XATTR_LIST_MAX).
MAX_BLOCKS = 16
MAX_NAME = 255
XATTR_CREATE = getattr(os, "XATTR_CREATE", 1)
XATTR_REPLACE = getattr(os, "XATTR_REPLACE", 2)

_HEAD = struct.Struct("<IHHQ")
_CHAIN_HEAD = struct.Struct("<IHHQQ")
_ENTRY = struct.Struct("<HI")
assert _HEAD.size == 16 and _CHAIN_HEAD.size == 24 and _ENTRY.size == 6

Items = list[tuple[bytes, bytes]]


def _damaged(inode: Inode, block: int, why: str) -> OSError:
    return fs_error(errno.EUCLEAN, f"inode {inode.ino}: xattr block {block} is damaged ({why})")


def _parse_entries(inode: Inode, block: int, buf: bytes, pos: int, count: int, out: Items) -> None:
    for _ in range(count):
        if pos + _ENTRY.size > len(buf):
            raise _damaged(inode, block, "overrun")
        nlen, vlen = _ENTRY.unpack_from(buf, pos)
        pos += _ENTRY.size
        if pos + nlen + vlen > len(buf):
            raise _damaged(inode, block, "overrun")
        out.append((bytes(buf[pos : pos + nlen]), bytes(buf[pos + nlen : pos + nlen + vlen])))
        pos += nlen + vlen


def read_chain(volume: BlockStore, inode: Inode) -> tuple[list[int], Items]:
    """The xattr blocks of ``inode`` (first to last) and its attributes, in order."""
    blocks: list[int] = []
    items: Items = []
    block = inode.xattr_block
    while block:
        if len(blocks) >= MAX_BLOCKS or block in blocks:
            raise _damaged(inode, block, "chain too long or looping")
        buf = volume.read(block)
        magic, count, _, owner = _HEAD.unpack_from(buf)
        if owner != inode.ino or magic not in (XATTR_MAGIC, CHAIN_MAGIC):
            raise _damaged(inode, block, f"magic {magic:#x}, owner {owner}")
        blocks.append(block)
        if magic == XATTR_MAGIC:
            if len(blocks) > 1:
                raise _damaged(inode, block, "one-block format inside a chain")
            _parse_entries(inode, block, buf, _HEAD.size, count, items)
            break
        _parse_entries(inode, block, buf, _CHAIN_HEAD.size, count, items)
        block = _CHAIN_HEAD.unpack_from(buf)[4]
    return blocks, items


class XattrStore:
    """Extended attributes of the inodes of one volume.

    The second argument (a FileData or an allocator, per the contract) is accepted for
    compatibility and not needed: blocks come from ``volume.allocator``.
    """

    def __init__(self, volume: BlockStore, _unused: object = None) -> None:
        self.volume = volume
        self.block_size = volume.block_size
        self.capacity = self.block_size - _HEAD.size

    # ------------------------------------------------------------------------------ format

    def _load(self, inode: Inode) -> Items:
        return read_chain(self.volume, inode)[1]

    @staticmethod
    def _entry_size(name: bytes, value: bytes) -> int:
        return _ENTRY.size + len(name) + len(value)

    def _pack(self, items: Items) -> list[Items]:
        """``items`` split into the blocks that hold them: one block when they fit in the
        one-block format, else a chain; ENOSPC past ``MAX_BLOCKS``."""
        if sum(self._entry_size(n, v) for n, v in items) <= self.capacity:
            return [items]
        room = self.block_size - _CHAIN_HEAD.size
        groups: list[Items] = [[]]
        used = 0
        for name, value in items:
            size = self._entry_size(name, value)
            if used + size > room:
                groups.append([])
                used = 0
            groups[-1].append((name, value))
            used += size
        if len(groups) > MAX_BLOCKS:
            raise fs_error(errno.ENOSPC, f"xattrs would take more than {MAX_BLOCKS} blocks")
        return groups

    def _store(self, inode: Inode, items: Items, blocks: list[int]) -> None:
        """Write ``items`` over the inode's chain ``blocks``, growing or shrinking it; on
        ENOSPC (too many blocks, or none left) nothing has changed."""
        groups = self._pack(items)
        need = len(groups) - len(blocks)
        if need > 0:
            try:
                extra = [self.volume.allocator.allocate_one() for _ in range(need)]
            except NoSpace:
                raise fs_error(errno.ENOSPC, "no room for an xattr block") from None
            blocks = blocks + extra
            inode.blocks += need
        for block in blocks[len(groups) :]:
            self.volume.allocator.free(block, 1)
            inode.blocks -= 1
        blocks = blocks[: len(groups)]
        inode.xattr_block = blocks[0]
        for i, (block, group) in enumerate(zip(blocks, groups, strict=True)):
            if len(groups) == 1:
                parts = [_HEAD.pack(XATTR_MAGIC, len(group), 0, inode.ino)]
            else:
                nxt = blocks[i + 1] if i + 1 < len(blocks) else 0
                parts = [_CHAIN_HEAD.pack(CHAIN_MAGIC, len(group), 0, inode.ino, nxt)]
            for name, value in group:
                parts += (_ENTRY.pack(len(name), len(value)), name, value)
            body = b"".join(parts)
            self.volume.write(block, body + bytes(self.block_size - len(body)))

    def blocks(self, inode: Inode) -> list[int]:
        """Every xattr block of ``inode`` (for fsck and ``FileData.runs``)."""
        return read_chain(self.volume, inode)[0]

    @staticmethod
    def _check_name(name: bytes) -> None:
        if not name:
            raise fs_error(errno.EINVAL, "empty xattr name")
        if len(name) > MAX_NAME:
            raise fs_error(errno.ERANGE, f"xattr name of {len(name)} bytes (max {MAX_NAME})")

    # ----------------------------------------------------------------------------- access

    def get(self, inode: Inode, name: bytes) -> bytes:
        """The value of ``name``; FsError(ENODATA) if the inode has no such attribute."""
        for n, v in self._load(inode):
            if n == name:
                return v
        raise fs_error(errno.ENODATA, f"inode {inode.ino}: no xattr {name!r}")

    def list(self, inode: Inode) -> list[bytes]:
        """Names of the inode's attributes, in insertion order."""
        return [n for n, _ in self._load(inode)]

    def items(self, inode: Inode) -> list[tuple[bytes, bytes]]:
        """(name, value) pairs in insertion order (for fsck and copying)."""
        return self._load(inode)

    def set(self, inode: Inode, name: bytes, value: bytes, flags: int = 0) -> None:
        """Create or replace ``name``; ``flags`` may be XATTR_CREATE or XATTR_REPLACE.

        Allocates the xattr block on the first attribute. Changes nothing on error.
        """
        name, value = bytes(name), bytes(value)
        self._check_name(name)
        if self._entry_size(name, value) > self.capacity:
            raise fs_error(errno.E2BIG, f"xattr {name!r}: {len(value)} bytes can never fit")
        blocks, items = read_chain(self.volume, inode)
        idx = next((i for i, (n, _) in enumerate(items) if n == name), None)
        if idx is not None and flags & XATTR_CREATE:
            raise fs_error(errno.EEXIST, f"inode {inode.ino}: xattr {name!r} exists")
        if idx is None and flags & XATTR_REPLACE:
            raise fs_error(errno.ENODATA, f"inode {inode.ino}: no xattr {name!r}")
        if idx is None:
            items.append((name, value))
        else:
            items[idx] = (name, value)
        self._store(inode, items, blocks)

    def remove(self, inode: Inode, name: bytes) -> None:
        """Remove ``name`` (FsError(ENODATA) if absent); frees the block when it empties."""
        blocks, items = read_chain(self.volume, inode)
        kept = [(n, v) for n, v in items if n != name]
        if len(kept) == len(items):
            raise fs_error(errno.ENODATA, f"inode {inode.ino}: no xattr {name!r}")
        if kept:
            self._store(inode, kept, blocks)
        else:
            self.free(inode)

    def free(self, inode: Inode) -> None:
        """Drop every attribute and free the block (on inode deletion)."""
        if inode.xattr_block:
            for block in self.blocks(inode):
                self.volume.allocator.free(block, 1)
                inode.blocks -= 1
            inode.xattr_block = 0
