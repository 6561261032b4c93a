"""Extended attributes: all of an inode's xattrs in one block.

The block (``Inode.xattr_block``, allocated on the first set, freed when the last name is
removed, charged to ``Inode.blocks``)::

    0  I magic 0x52544158 ("XATR")   4  H count   6  H reserved   8  Q owner ino
    16 entries: H name length, I value length, name bytes, value bytes; zero padding

Names keep insertion order (a replaced value keeps its place). Like FileData, the methods
mutate the ``Inode`` (xattr_block, blocks) and the CALLER writes it with ``InodeTable.put``.

Errors: ENODATA for a missing name; ERANGE for a name over 255 bytes, EINVAL for an empty
one; E2BIG for an attribute that could never fit in a block; ENOSPC when the block is full
or no block can be allocated; EEXIST/ENODATA for XATTR_CREATE/XATTR_REPLACE.
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
MAX_NAME = 255
XATTR_CREATE = getattr(os, "XATTR_CREATE", 1)
XATTR_REPLACE = getattr(os, "XATTR_REPLACE", 2)

_HEAD = struct.Struct("<IHHQ")
_ENTRY = struct.Struct("<HI")
assert _HEAD.size == 16 and _ENTRY.size == 6


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

    def _load(self, inode: Inode) -> list[tuple[bytes, bytes]]:
        if not inode.xattr_block:
            return []
        buf = self.volume.read(inode.xattr_block)
        magic, count, _, owner = _HEAD.unpack_from(buf)
        if magic != XATTR_MAGIC or owner != inode.ino:
            raise fs_error(
                errno.EUCLEAN,
                f"inode {inode.ino}: xattr block {inode.xattr_block} is damaged "
                f"(magic {magic:#x}, owner {owner})",
            )
        out: list[tuple[bytes, bytes]] = []
        pos = _HEAD.size
        for _ in range(count):
            if pos + _ENTRY.size > len(buf):
                raise fs_error(errno.EUCLEAN, f"inode {inode.ino}: xattr block overrun")
            nlen, vlen = _ENTRY.unpack_from(buf, pos)
            pos += _ENTRY.size
            if pos + nlen + vlen > len(buf):
                raise fs_error(errno.EUCLEAN, f"inode {inode.ino}: xattr block overrun")
            out.append((bytes(buf[pos : pos + nlen]), bytes(buf[pos + nlen : pos + nlen + vlen])))
            pos += nlen + vlen
        return out

    @staticmethod
    def _entry_size(name: bytes, value: bytes) -> int:
        return _ENTRY.size + len(name) + len(value)

    def _store(self, inode: Inode, items: list[tuple[bytes, bytes]]) -> None:
        parts = [_HEAD.pack(XATTR_MAGIC, len(items), 0, inode.ino)]
        for name, value in items:
            parts += (_ENTRY.pack(len(name), len(value)), name, value)
        body = b"".join(parts)
        self.volume.write(inode.xattr_block, body + bytes(self.block_size - len(body)))

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
        items = self._load(inode)
        idx = next((i for i, (n, _) in enumerate(items) if n == name), None)
        if idx is not None and flags & XATTR_CREATE:
            raise fs_error(errno.EEXIST, f"inode {inode.ino}: xattr {name!r} exists")
        if idx is None and flags & XATTR_REPLACE:
            raise fs_error(errno.ENODATA, f"inode {inode.ino}: no xattr {name!r}")
        if idx is None:
            items.append((name, value))
        else:
            items[idx] = (name, value)
        if sum(self._entry_size(n, v) for n, v in items) > self.capacity:
            raise fs_error(errno.ENOSPC, f"inode {inode.ino}: xattr block full")
        if not inode.xattr_block:
            try:
                inode.xattr_block = self.volume.allocator.allocate_one()
            except NoSpace:
                raise fs_error(errno.ENOSPC, "no room for an xattr block") from None
            inode.blocks += 1
        self._store(inode, items)

    def remove(self, inode: Inode, name: bytes) -> None:
        """Remove ``name`` (FsError(ENODATA) if absent); frees the block when it empties."""
        items = self._load(inode)
        kept = [(n, v) for n, v in items if n != name]
        if len(kept) == len(items):
            raise fs_error(errno.ENODATA, f"inode {inode.ino}: no xattr {name!r}")
        if kept:
            self._store(inode, kept)
        else:
            self.free(inode)

    def free(self, inode: Inode) -> None:
        """Drop every attribute and free the block (on inode deletion)."""
        if inode.xattr_block:
            self.volume.allocator.free(inode.xattr_block, 1)
            inode.xattr_block = 0
            inode.blocks -= 1
