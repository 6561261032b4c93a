"""The block file's fixed layout: the volume superblock (block 0) and where things are.

Block file layout (block size B)::

    0               volume superblock (``VolumeSuper``)
    1               client superblock, reserved for the filesystem layer (``CLIENT_SUPER``)
    2 .. 2+nb-1     block allocation bitmap, one bit per block (``ExtentAllocator``)
    2+nb .. +sa-1   the checkpoint save area (``save_area_*``, may be empty; marked used;
                    ``store/snapshots.py``)
    the rest        handed out by ``Volume.allocator``
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from mirrorfs.store.allocator import bitmap_blocks_for
from mirrorfs.store.errors import VolumeError

CLIENT_SUPER = 1
BITMAP_START = 2
MIN_BLOCKS = 64
BLOCK_SIZES = (512, 1024, 2048, 4096, 8192, 16384, 65536)


@dataclass(slots=True)
class VolumeSuper:
    """Block 0. ``save_area_*`` is room for block-level checkpoints (copy-on-first-write)."""

    MAGIC = b"MIRRORFS"
    VERSION = 1
    # magic, version, flags, uuid, block size, block count, bitmap start, bitmap blocks,
    # client super, save area start, save area blocks, crc32
    STRUCT = struct.Struct("<8sHH16sIQQQQQQI")

    uuid: bytes
    block_size: int
    block_count: int
    bitmap_blocks: int
    save_area_start: int = 0
    save_area_blocks: int = 0

    @classmethod
    def new(cls, uuid: bytes, block_size: int, block_count: int) -> VolumeSuper:
        """The superblock of a fresh volume of this geometry."""
        return cls(uuid, block_size, block_count, bitmap_blocks_for(block_count, block_size))

    def pack(self) -> bytes:
        """The whole block 0: the fields, a CRC32 over them, zeros up to the block size."""
        fields = (
            self.MAGIC,
            self.VERSION,
            0,
            self.uuid,
            self.block_size,
            self.block_count,
            BITMAP_START,
            self.bitmap_blocks,
            CLIENT_SUPER,
            self.save_area_start,
            self.save_area_blocks,
        )
        head = self.STRUCT.pack(*fields, 0)[:-4]
        raw = head + struct.pack("<I", zlib.crc32(head))
        return raw + bytes(self.block_size - len(raw))

    @classmethod
    def unpack(cls, buf: bytes, where: str) -> VolumeSuper:
        """Parse block 0; VolumeError (naming ``where``) when it is not a sound superblock."""
        if len(buf) < cls.STRUCT.size:
            raise VolumeError(f"{where}: superblock is truncated")
        f = cls.STRUCT.unpack_from(buf)
        if f[0] != cls.MAGIC:
            raise VolumeError(f"{where}: not a mirrorfs volume (bad superblock magic)")
        if zlib.crc32(buf[: cls.STRUCT.size - 4]) != f[-1]:
            raise VolumeError(f"{where}: damaged superblock (checksum mismatch)")
        if f[1] != cls.VERSION:
            raise VolumeError(f"{where}: unsupported volume version {f[1]}")
        if f[6] != BITMAP_START or f[8] != CLIENT_SUPER:
            raise VolumeError(f"{where}: damaged superblock (bad layout)")
        return cls(f[3], f[4], f[5], f[7], f[9], f[10])

    def is_save_area_run(self, start: int, nblocks: int) -> bool:
        """Whether blocks ``start .. start+nblocks-1`` overlap the checkpoint save area."""
        end = self.save_area_start + self.save_area_blocks
        return (
            bool(self.save_area_blocks) and start < end and start + nblocks > self.save_area_start
        )

    def is_bitmap_run(self, start: int, nblocks: int) -> bool:
        """Whether blocks ``start .. start+nblocks-1`` overlap the allocation bitmap."""
        return start < BITMAP_START + self.bitmap_blocks and start + nblocks > BITMAP_START
