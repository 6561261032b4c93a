"""On-disk structures of the filesystem: the client superblock and the inode record.

All numbers are little-endian. Block numbers are absolute block numbers of the volume.

FsSuper (block ``CLIENT_SUPER`` = 1, padded with zeros to the block size)::

    0   8s  magic  b"MIRFSSB1"
    8   I   version (1)
    12  I   inode_size (256)
    16  Q   inode_count          (units of the inode bitmap; ino 0 is reserved, never used)
    24  Q   inode_bitmap_start   (absolute block)
    32  Q   inode_bitmap_blocks
    40  Q   inode_table_start    (absolute block; inode n lives at byte n*256 of the table)
    48  Q   inode_table_blocks
    56  Q   root_ino             (1)
    64  Q   orphan_head          (first inode of the orphan list, 0 = empty)
    72  Q   next_generation      (generations below it may have been handed out)
    80  I   crc32 of bytes 0..79

Inode (256 bytes, ``INODE``)::

    0   I   mode          4   I   nlink        8   I   uid         12  I   gid
    16  Q   rdev          24  Q   size
    32  q   atime_ns      40  q   mtime_ns     48  q   ctime_ns
    56  Q   generation    64  Q   blocks (fs blocks charged: data + extent tree + xattr)
    72  Q   xattr_block   80  Q   orphan_next  88  I   flags       92  I   ino (sanity)
    96  160s extent area (extents.py: inline extent tree root, or inline symlink target)

A free slot is all zeros; whether an inode is in use is decided by the inode bitmap.
"""

from __future__ import annotations

import errno
import logging
import struct
import zlib
from dataclasses import dataclass, field, fields

from mirrorfs.fs.api import FsError

log = logging.getLogger(__name__)

FS_MAGIC = b"MIRFSSB1"
FS_VERSION = 1
INODE_SIZE = 256
EXTENT_AREA_SIZE = 160
ROOT_INO = 1

# Inode flags.
FLAG_INLINE_DATA = 1  # the extent area holds the file's bytes (short symlink targets)
FLAG_ORPHAN = 2  # the inode is on the orphan list

_SUPER = struct.Struct("<8sIIQQQQQQQQ")
_SUPER_CRC = struct.Struct("<I")
assert _SUPER.size == 80

_INODE_HEAD = struct.Struct("<IIIIQQqqqQQQQII")
assert _INODE_HEAD.size == 96
assert _INODE_HEAD.size + EXTENT_AREA_SIZE == INODE_SIZE


def fs_error(err: int, message: str = "") -> OSError:
    """Make a ``FsError``."""
    return FsError(err, message)


@dataclass(slots=True)
class FsSuper:
    """The filesystem's superblock, kept in the volume's client superblock."""

    inode_count: int
    inode_bitmap_start: int
    inode_bitmap_blocks: int
    inode_table_start: int
    inode_table_blocks: int
    root_ino: int = ROOT_INO
    orphan_head: int = 0
    next_generation: int = 1
    inode_size: int = INODE_SIZE

    def pack(self, block_size: int) -> bytes:
        """The superblock as one full block of ``block_size`` bytes."""
        head = _SUPER.pack(
            FS_MAGIC,
            FS_VERSION,
            self.inode_size,
            self.inode_count,
            self.inode_bitmap_start,
            self.inode_bitmap_blocks,
            self.inode_table_start,
            self.inode_table_blocks,
            self.root_ino,
            self.orphan_head,
            self.next_generation,
        )
        out = head + _SUPER_CRC.pack(zlib.crc32(head))
        return out + bytes(block_size - len(out))

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> FsSuper:
        """Parse a client superblock; FsError(EUCLEAN) if it is not a valid mirrorfs one."""
        if len(buf) < _SUPER.size + _SUPER_CRC.size:
            raise fs_error(errno.EUCLEAN, "filesystem superblock: short buffer")
        head = bytes(buf[: _SUPER.size])
        fields = _SUPER.unpack(head)
        if fields[0] != FS_MAGIC:
            raise fs_error(
                errno.EUCLEAN,
                f"filesystem superblock: bad magic {fields[0]!r} (not formatted as mirrorfs?)",
            )
        if fields[1] != FS_VERSION:
            raise fs_error(errno.EUCLEAN, f"filesystem superblock: unknown version {fields[1]}")
        (crc,) = _SUPER_CRC.unpack_from(buf, _SUPER.size)
        if crc != zlib.crc32(head):
            raise fs_error(errno.EUCLEAN, "filesystem superblock: checksum mismatch")
        if fields[2] != INODE_SIZE:
            raise fs_error(errno.EUCLEAN, f"filesystem superblock: inode size {fields[2]}")
        return cls(
            inode_count=fields[3],
            inode_bitmap_start=fields[4],
            inode_bitmap_blocks=fields[5],
            inode_table_start=fields[6],
            inode_table_blocks=fields[7],
            root_ino=fields[8],
            orphan_head=fields[9],
            next_generation=fields[10],
            inode_size=fields[2],
        )


def _empty_area() -> bytes:
    return bytes(EXTENT_AREA_SIZE)


@dataclass(slots=True, weakref_slot=True, eq=False)
class Inode:
    """One inode. ``extent_area`` is opaque to everything but extents.py and filedata.py.

    Identity matters (``eq=False``): the inode table hands out one object per inode number
    while anybody holds it, so that two holders never see diverging copies.
    """

    ino: int
    mode: int = 0
    nlink: int = 0
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    generation: int = 0
    blocks: int = 0
    xattr_block: int = 0
    orphan_next: int = 0
    flags: int = 0
    extent_area: bytes = field(default_factory=_empty_area)

    def pack(self) -> bytes:
        """The 256-byte on-disk record."""
        area = self.extent_area
        if len(area) != EXTENT_AREA_SIZE:
            raise ValueError(f"inode {self.ino}: extent area of {len(area)} bytes")
        return (
            _INODE_HEAD.pack(
                self.mode,
                self.nlink,
                self.uid,
                self.gid,
                self.rdev,
                self.size,
                self.atime_ns,
                self.mtime_ns,
                self.ctime_ns,
                self.generation,
                self.blocks,
                self.xattr_block,
                self.orphan_next,
                self.flags,
                self.ino & 0xFFFFFFFF,
            )
            + area
        )

    @classmethod
    def unpack(cls, ino: int, buf: bytes | bytearray | memoryview, offset: int = 0) -> Inode:
        """Parse the record of inode ``ino`` at ``buf[offset:]``."""
        f = _INODE_HEAD.unpack_from(buf, offset)
        start = offset + _INODE_HEAD.size
        return cls(
            ino=ino,
            mode=f[0],
            nlink=f[1],
            uid=f[2],
            gid=f[3],
            rdev=f[4],
            size=f[5],
            atime_ns=f[6],
            mtime_ns=f[7],
            ctime_ns=f[8],
            generation=f[9],
            blocks=f[10],
            xattr_block=f[11],
            orphan_next=f[12],
            flags=f[13],
            extent_area=bytes(buf[start : start + EXTENT_AREA_SIZE]),
        )

    def copy_from(self, other: Inode) -> None:
        """Overwrite every field with ``other``'s (keeps this object's identity)."""
        for f in fields(Inode):
            setattr(self, f.name, getattr(other, f.name))
