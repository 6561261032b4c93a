"""Transactions: ordered block writes plus the file-system hints that explain them.

A transaction is the unit of the SAM log, of shipping and of applying. The block runs are
full-block images (physical redo), so applying a transaction twice gives the same bytes as
applying it once; recovery relies on that.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class HintKind(enum.IntEnum):
    """What a transaction did to the file system, for caches on the receiving side."""

    INODE_UPDATED = 1
    INODE_DELETED = 2
    ENTRY_ADDED = 3
    ENTRY_REMOVED = 4


@dataclass(slots=True, frozen=True)
class Hint:
    """A file-system hint. ``parent``/``name`` are set for entry hints, 0/b"" otherwise."""

    kind: HintKind
    ino: int
    parent: int = 0
    name: bytes = b""


@dataclass(slots=True)
class Transaction:
    """One committed transaction.

    ``runs`` are ``(first_block, data)`` with ``len(data)`` a positive multiple of the block
    size, in the order they must be applied (a later run may overwrite an earlier one).
    ``data`` is bytes or a read-only view of bytes (a decoded record's runs share it).
    """

    seq: int
    epoch: int
    timestamp_ns: int
    runs: list[tuple[int, bytes | memoryview]] = field(default_factory=list)
    hints: list[Hint] = field(default_factory=list)

    def data_bytes(self) -> int:
        """Bytes of block data carried (before compression)."""
        return sum(len(d) for _, d in self.runs)

    def block_count(self, block_size: int) -> int:
        return self.data_bytes() // block_size
