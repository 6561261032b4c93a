"""Segment files of the SAM log: names, headers, low-level I/O and the recovery report.

The log format itself (records, SEAL, segment header) is specified in ``store/record.py``;
``store/samlog.py`` is the log built from these pieces.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from mirrorfs.store import record
from mirrorfs.store.errors import LogError
from mirrorfs.store.files import atomic_write
from mirrorfs.store.record import SEG_HEADER, RecordType, SegmentHeader

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^(\d{20})\.seg$")
DEFAULT_SEGMENT_BYTES = 64 << 20


def segment_name(first_seq: int) -> str:
    """File name of the segment whose first record has sequence number ``first_seq``."""
    return f"{first_seq:020d}.seg"


def segment_first_seq(name: str) -> int | None:
    """The first sequence number in a segment file's name; None if ``name`` is no segment."""
    m = _NAME_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(slots=True)
class RecoveryReport:
    """What ``SamLog.open`` found and did; ``segment``/``offset`` say where the log was cut."""

    segments: int = 0
    last_seq: int = 0  # last good seq after recovery
    torn_bytes: int = 0  # bytes of a torn tail dropped
    segment: str = ""
    offset: int = -1
    repaired: bool = False  # repair=True cut the log at a corruption
    discarded_records: int = 0  # valid records lost to the repair
    removed_segments: list[str] = field(default_factory=list)  # by the repair
    superseded_segments: list[str] = field(default_factory=list)  # by an interrupted reset
    resealed_segments: list[str] = field(default_factory=list)
    reason: str = ""
    look_only: bool = False  # found, not done: the files were left as they are
    # The sequence numbers a repair gave up (a hole accepted, records cut): 0 when none.
    lost_first: int = 0
    lost_last: int = 0

    def lose(self, first: int, last: int) -> None:
        """A repair gave up seq ``first..last`` (merged with what it gave up already)."""
        if last < first:
            return
        self.lost_first = min(self.lost_first or first, first)
        self.lost_last = max(self.lost_last, last)

    @property
    def changed(self) -> bool:
        """True if recovery modified the log."""
        return bool(self.torn_bytes or self.repaired or self.superseded_segments) or bool(
            self.resealed_segments
        )

    def describe(self) -> str:
        """One line for humans; exactly ``"clean"`` when recovery changed nothing."""
        if not self.changed:
            return "clean"
        parts = []
        if self.torn_bytes:
            verb = "found (and left)" if self.look_only else "dropped"
            parts.append(
                f"{verb} a torn tail of {self.torn_bytes} bytes at offset {self.offset} "
                f"of segment {self.segment}"
            )
        if self.repaired:
            what = [f"gave up seq {self.lost_first}..{self.lost_last}"] if self.lost_first else []
            if self.discarded_records or self.removed_segments or not self.lost_first:
                what.append(
                    f"discarded {self.discarded_records} record(s) from offset {self.offset} "
                    f"of segment {self.segment} and removed {len(self.removed_segments)} later "
                    "segment(s)"
                )
            parts.append(f"repaired: {', '.join(what)} ({self.reason})")
        if self.resealed_segments:
            parts.append(f"resealed {', '.join(self.resealed_segments)}")
        if self.superseded_segments:
            verb = "skipped" if self.look_only else "removed"
            parts.append(f"{verb} {len(self.superseded_segments)} segment(s) left by a reset")
        return "; ".join(parts) + f"; last good seq {self.last_seq}"


@dataclass(slots=True)
class _Segment:
    first_seq: int
    last_seq: int  # first_seq - 1 while empty
    size: int
    sealed: bool = False

    @property
    def name(self) -> str:
        return segment_name(self.first_seq)


@dataclass(slots=True)
class _Scan:
    end: int  # offset of the first bad byte, or the file size
    last_seq: int
    sealed: bool = False
    error: LogError | None = None
    torn_candidate: bool = False  # the error is an invalid record, not a valid misplaced one


def _pread(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes at ``offset`` (fewer only at end of file)."""
    buf = os.pread(fd, n, offset)
    parts = [buf]
    got = len(buf)
    while buf and got < n:
        buf = os.pread(fd, n - got, offset + got)
        parts.append(buf)
        got += len(buf)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _pwrite_all(fd: int, data: bytes | list, offset: int) -> None:
    """Write ``data`` (one buffer or a list of buffers, without joining them) at ``offset``."""
    # (every buffer here is bytes-like of format "B", so len() counts bytes; a view is
    # made only of a buffer that a short write cut)
    bufs = [b for b in (data if isinstance(data, list) else [data]) if len(b)]
    i = 0
    while i < len(bufs):
        n = os.pwritev(fd, bufs[i : i + 512], offset)  # IOV_MAX is 1024 on Linux
        offset += n
        while n and i < len(bufs):
            size = len(bufs[i])
            if n >= size:
                n -= size
                i += 1
            else:
                bufs[i] = memoryview(bufs[i])[n:]
                n = 0


def _write_segment(directory: Path, header: SegmentHeader) -> _Segment:
    """Create a segment file atomically (tmp + fsync + rename + fsync dir)."""
    atomic_write(directory / segment_name(header.first_seq), header.pack(), mode=0o644)
    return _Segment(header.first_seq, header.first_seq - 1, SEG_HEADER.size)


def _count_valid(path: Path, start: int) -> tuple[int, int, int]:
    """(valid records, of which TXN, highest TXN seq or 0) from ``start`` to the end of a
    file, found by magic."""
    with open(path, "rb") as f:
        f.seek(start)
        buf = f.read()
    count = txns = pos = top = 0
    while (pos := buf.find(record.MAGIC, pos)) >= 0:
        try:
            hdr, pos = record.verify(buf, pos)
        except LogError:
            pos += 1
            continue
        count += 1
        if hdr.type == RecordType.TXN:
            txns += 1
            top = max(top, hdr.seq)
    return count, txns, top


def _truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_seal(fd: int, seg: _Segment, volume_uuid: bytes, epoch: int) -> None:
    """Append the SEAL record that closes segment ``seg`` (open as ``fd``) and fsync it."""
    seal = record.Seal(seg.first_seq, seg.last_seq, seg.size, volume_uuid)
    data = record.encode_seal(seal, epoch=epoch, timestamp_ns=time.time_ns())
    _pwrite_all(fd, data, seg.size)
    os.fsync(fd)
    seg.size += len(data)
    seg.sealed = True
