"""The volume: a directory holding the block file, the SAM log and node-local state.

INTERFACE STUB: the implementation lands shortly; the signatures below are the contract.

Layout of the block file (block numbers, block size B):
  0                superblock of the volume (magic, version, uuid, geometry, bitmap location,
                   room for checkpoints); owned by this module
  1                the client superblock: reserved for the filesystem layer (``CLIENT_SUPER``)
  2 .. 2+nb-1      block allocation bitmap (1 bit per block, 1 = in use)
  rest             allocated through ``Volume.allocator``

Write path (the one choke point): ``Volume.write`` records full-block images into the open
transaction (an in-memory overlay that ``Volume.read`` consults). ``Volume.commit`` seals the
open transaction: it is appended to the SAM log and fsynced (write-ahead), and only then are
its blocks written in place. Nothing else writes the block file.
"""

from __future__ import annotations

from mirrorfs.store.txn import Hint

CLIENT_SUPER = 1


class Volume:
    block_size: int
    block_count: int
    uuid: bytes  # 16 bytes
    read_only: bool

    def read(self, block: int, count: int = 1) -> bytes:
        """Current content of ``count`` blocks from ``block``, open transaction included."""
        raise NotImplementedError

    def write(self, block: int, data: bytes | bytearray | memoryview) -> None:
        """Write full blocks (len(data) a multiple of block_size) into the open transaction."""
        raise NotImplementedError

    def hint(self, hint: Hint) -> None:
        """Attach a file-system hint to the open transaction."""
        raise NotImplementedError

    def commit(self, *, sync: bool = True) -> int | None:
        """Seal the open transaction; return its sequence number (None when it was empty)."""
        raise NotImplementedError
