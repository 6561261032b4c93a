"""What the filesystem layer needs of the store: the ``BlockStore`` protocol.

``fs/`` is written against this, not against ``Volume``, so that it can be tested over any
block store and so that nothing in ``fs/`` reaches into the volume's write path, apply
path or lifecycle. ``mirrorfs.store.volume.Volume`` is one.
"""

from __future__ import annotations

from typing import Protocol

from mirrorfs.store.allocator import ExtentAllocator
from mirrorfs.store.geometry import VolumeSuper
from mirrorfs.store.txn import Hint


class BlockStore(Protocol):
    """Blocks to read and write (the one choke point), hints, commit, the allocator."""

    @property
    def block_size(self) -> int:
        """Bytes per block."""

    @property
    def block_count(self) -> int:
        """Blocks in the store."""

    #: Whether the store refuses changes (opened read-only).
    read_only: bool
    #: The volume superblock (fsck reads where the bitmap and the save area are).
    sb: VolumeSuper
    #: Allocation of blocks (absolute block numbers); changes go through ``write``.
    allocator: ExtentAllocator

    def read(self, block: int, count: int = 1) -> bytes:
        """Current content of ``count`` blocks from ``block``, uncommitted changes included."""

    def write(self, block: int, data: bytes | bytearray | memoryview) -> None:
        """Record full blocks at ``block`` in the open transaction."""

    def shared_runs(self, block: int, count: int) -> list[tuple[int, int]]:
        """Runs of [block, block+count) that a checkpoint still reads in place ([] when
        none): a file's new data for them goes to fresh blocks (redirect-on-write)."""

    def save_room(self, blocks: int) -> bool:
        """Whether checkpoints' save area can take ``blocks`` more saved copies (always
        when there is no checkpoint)."""

    def hint(self, hint: Hint) -> None:
        """Attach a file-system hint (what the blocks mean) to the open transaction."""

    def commit(self, *, sync: bool = True) -> int | None:
        """Make the open transaction durable; its seq, or None if it held nothing."""
