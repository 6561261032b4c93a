"""The sync mark of a SAM log: the highest sequence number that was once durable in it.

A crash can only tear what was never made durable: the record being appended when the
process died, or records written after the last fdatasync. Storage that loses data that
*was* fsync'd (a truncated or rolled-back segment file, a disk that lies about flushes)
leaves a log that looks just like a torn tail, and recovery would silently replay a prefix
over a block file that is already ahead of it. The mark tells the two apart.

``LOG_DIR/.synced`` (``SYNC_MARK_FILE``) is one fixed struct, rewritten in place::

    magic "MFSSYNC1" | generation u64 | seq u64 | crc32 of the above u32     (28 bytes)

``SamLog.sync`` writes it after every fdatasync that made new records durable: one pwrite
of 28 bytes at offset 0 (one sector: in practice never torn; a torn one fails its CRC and is
ignored), without an fsync of its own. So:

- no false alarm: the mark names seq N only after the fdatasync covering N returned, so a
  log that holds less than N has lost durable records;
- best effort: after a power loss the mark may be older than the log (an unseen hole at
  worst, what recovery did before the mark existed), never newer;
- ``generation`` is the log's (``SamLog.reset`` starts a new one, at any seq): a mark of an
  older generation says nothing about the current log and is ignored.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from mirrorfs.store.files import SYNC_MARK_FILE

MAGIC = b"MFSSYNC1"
_HEAD = struct.Struct("<8sQQ")
SIZE = _HEAD.size + 4


@dataclass(frozen=True, slots=True)
class SyncMark:
    generation: int
    seq: int


def pack(mark: SyncMark) -> bytes:
    head = _HEAD.pack(MAGIC, mark.generation, mark.seq)
    return head + struct.pack("<I", zlib.crc32(head))


def read(directory: Path) -> SyncMark | None:
    """The mark of the log in ``directory``; None if there is none or it is not sound."""
    try:
        with open(directory / SYNC_MARK_FILE, "rb") as f:
            buf = f.read(SIZE)
    except FileNotFoundError:
        return None
    if len(buf) != SIZE or struct.unpack_from("<I", buf, _HEAD.size)[0] != zlib.crc32(
        buf[: _HEAD.size]
    ):
        return None
    magic, generation, seq = _HEAD.unpack_from(buf)
    return SyncMark(generation, seq) if magic == MAGIC else None


def remove(directory: Path) -> None:
    """Forget the mark (a repair that accepted a loss); the next sync writes a new one."""
    try:
        os.unlink(directory / SYNC_MARK_FILE)
    except FileNotFoundError:
        pass


class SyncMarkWriter:
    """Keeps the mark file open and rewrites it (``SamLog.sync``; not thread-safe)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / SYNC_MARK_FILE
        self._fd = -1
        self._written: SyncMark | None = None

    def write(self, generation: int, seq: int) -> None:
        mark = SyncMark(generation, seq)
        if mark == self._written:
            return
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(self._fd, pack(mark), 0)
        self._written = mark

    def forget(self) -> None:
        """The file was removed or replaced behind us: reopen it at the next write."""
        self.close()
        self._written = None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
