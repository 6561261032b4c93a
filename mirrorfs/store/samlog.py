"""The SAM log: a directory of segment files holding TXN records.

The byte format (records, SEAL, segment header) is specified in ``record``. Segments are
named by the sequence number of their first record and hold consecutive sequence numbers.
Only the last segment is unsealed and appended to; when it grows past ``segment_bytes`` it
gets a SEAL record (its commit marker), is fsynced, and the next segment is created.

A new segment is written under ``NAME.tmp``, fsynced and renamed, so a segment file always
has a whole header. An empty segment remembers the log's position: its ``first_seq`` is
``last_seq + 1``. That is how the log stays empty after a full ``retire`` yet keeps
``last_seq``: retire seals the current segment, starts an empty one and deletes the rest.

``reset(next_seq)`` starts a fresh log at any sequence number (a replica that is re-seeded):
the new segment carries a higher ``generation``, and segments of a lower generation are
leftovers of an interrupted reset that ``open`` deletes.

Recovery (``open``, done by ``store/logrecovery.py``): sealed segments are checked cheaply,
the last unsealed one record by record; a torn tail is truncated away, corruption raises
``CorruptRecord`` unless ``repair=True`` cuts the log there. ``log.recovery_report`` says
what was done. Corruption inside a sealed segment is found when it is read (``scan``,
``verify``).

Write-ahead: ``append`` returns once the record is written (page cache); ``sync`` makes it
durable. ``sync`` is an ``fdatasync``; one that must also make a larger file size durable
waits for a journal commit of the host filesystem as well, which is most of what a small
fsync costs. So before a small record would grow the current segment, ``append`` writes
zeros ahead of it (room for ``PREZERO_RECORDS`` more like it): the records that follow
overwrite bytes the file already has, and their ``fdatasync`` writes just them. The zero
tail is no record: recovery drops an all-zero tail silently, ``close`` and the roll to a
new segment cut it off first.

Not thread-safe for writers: callers serialize every call that changes the log (``sync``
may run in a worker thread as long as no other such call runs meanwhile). A scan
(``scan``/``scan_encoded``, the shipper's, in a worker thread for large records) may run
beside them: it works on a snapshot of the segment list and reads only complete records;
a segment retired before it opened it is a LogError ("retired while being read").
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from mirrorfs.store import record, syncmark
from mirrorfs.store.errors import LogError
from mirrorfs.store.files import fsync_dir
from mirrorfs.store.logrecovery import LogRecovery
from mirrorfs.store.record import HEADER, SEG_HEADER, RecordType, SegmentHeader
from mirrorfs.store.segments import (
    _NAME_RE,
    DEFAULT_SEGMENT_BYTES,
    RecoveryReport,
    _pread,
    _pwrite_all,
    _Segment,
    _write_segment,
    write_seal,
)
from mirrorfs.store.syncmark import SyncMarkWriter
from mirrorfs.store.txn import Transaction

log = logging.getLogger(__name__)

#: Zeros written ahead of the end of the current segment when a small record reaches it:
#: room for about ``PREZERO_RECORDS`` more like it, within [PREZERO_MIN, PREZERO_BYTES].
#: Small, so that the fsync that pays for them (one in that many) is not much slower than
#: one that grows the file by its own record alone: that one is a fsync's p99.
PREZERO_RECORDS = 8
PREZERO_MIN = 64 << 10
PREZERO_BYTES = 1 << 20
#: Records at least this large just grow the file (a journal commit is little beside them).
PREZERO_BELOW = 256 << 10
_ZEROS = bytes(PREZERO_BYTES)


class SamLog:
    """An open SAM log. Make one with ``SamLog.create``, then use ``SamLog.open``."""

    def __init__(self, directory: Path, volume_uuid: bytes, block_size: int) -> None:
        self.directory = directory
        self.volume_uuid = volume_uuid
        self.block_size = block_size
        self.segment_bytes = DEFAULT_SEGMENT_BYTES
        self.compress = True
        self.recovery_report = RecoveryReport()
        self._segments: list[_Segment] = []
        self._generation = 1
        self._fd = -1  # the unsealed last segment, open for writing
        self._epoch = 0  # epoch of the last record, for the SEAL header
        self._failed = False
        self._closed = False
        # Appends counted / durable; counters, not a flag, so a sync that overlaps an append
        # can never mark that append durable.
        self._appended = self._synced = 0
        #: The current segment file's size: past ``seg.size`` it holds zeros written ahead.
        self._file_end = 0
        self._mark = SyncMarkWriter(self.directory)  # the highest seq once durable

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(cls, directory: str | os.PathLike, *, volume_uuid: bytes, block_size: int) -> None:
        """Make an empty log in ``directory`` (created if missing; must hold no segments)."""
        directory = Path(directory)
        record.check_block_size(block_size)
        if len(volume_uuid) != 16:
            raise ValueError("volume uuid must be 16 bytes")
        directory.mkdir(parents=True, exist_ok=True)
        if any(_NAME_RE.match(n) for n in os.listdir(directory)):
            raise LogError(f"{directory} already holds a SAM log")
        syncmark.remove(directory)  # a stale one would name seqs this log never had
        _write_segment(directory, SegmentHeader(block_size, volume_uuid, 1, 1))

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        *,
        volume_uuid: bytes,
        block_size: int,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        repair: bool = False,
        compress: bool = True,
        look_only: bool = False,
    ) -> SamLog:
        """Open the log, validate it and recover from a crash (see the module docstring).

        ``look_only``: validate without changing any file (a torn tail is only not read);
        such a log can be scanned, not appended to."""
        self = cls(Path(directory), volume_uuid, block_size)
        self.segment_bytes, self.compress = segment_bytes, compress
        recovery = LogRecovery(self.directory, volume_uuid, block_size, self.recovery_report)
        self._segments = recovery.run(repair, look_only=look_only)
        self._generation, self._epoch = recovery.generation, recovery.epoch
        if not self._segments[-1].sealed and not look_only:
            self._fd = os.open(self.directory / self._segments[-1].name, os.O_RDWR)
            self._file_end = self._segments[-1].size
        report = self.recovery_report
        report.segments, report.last_seq = len(self._segments), self.last_seq
        if report.changed:  # (Volume.open warns of it, with what it replayed)
            log.info("SAM log %s: %s", self.directory, report.describe())
        return self

    # ------------------------------------------------------------------ properties

    @property
    def last_seq(self) -> int:
        """Sequence number of the last record appended (remembered after a full retire)."""
        return self._segments[-1].last_seq

    @property
    def first_seq(self) -> int:
        """Sequence number of the oldest record held, 0 when the log holds none."""
        first = self._segments[0].first_seq
        return first if first <= self.last_seq else 0

    def end_position(self) -> tuple[str, int]:
        """(segment name, offset) where the log ends: the next record would go there."""
        seg = self._segments[-1]
        return seg.name, seg.size

    @property
    def size_bytes(self) -> int:
        """Bytes of all segment files."""
        return sum(s.size for s in self._segments)

    # ------------------------------------------------------------------ writing

    def append(self, txn: Transaction) -> int:
        """Append ``txn`` (written, not yet durable: call ``sync``); return its record size.

        ``txn.seq`` must be ``last_seq + 1``, except in a log that never held a record.
        """
        self._check_seq(txn.seq)
        parts = record.encode_txn_parts(txn, block_size=self.block_size, compress=self.compress)
        return self._append(txn.seq, txn.epoch, parts)

    def append_encoded(self, seq: int, record_bytes: bytes) -> int:
        """Append a record encoded elsewhere (by a receiver) after validating it completely."""
        self._check_seq(seq)
        txn = record.decode_txn(record_bytes, block_size=self.block_size)
        if txn.seq != seq:
            raise LogError(f"record carries seq {txn.seq}, expected {seq}", seq=txn.seq)
        return self._append(seq, txn.epoch, bytes(record_bytes))

    def append_validated(self, txn: Transaction, record_bytes: bytes | memoryview) -> int:
        """Append ``record_bytes``, which the caller decoded into ``txn`` with
        ``record.decode_txn`` (so it is complete and sound): no second decode, no copy."""
        self._check_seq(txn.seq)
        data = record_bytes if isinstance(record_bytes, bytes) else [record_bytes]
        return self._append(txn.seq, txn.epoch, data)

    def _check_open(self) -> None:
        if self._closed or self._failed:
            state = "closed" if self._closed else "failed after an I/O error"
            raise LogError(f"SAM log {self.directory} is {state}")

    def _check_seq(self, seq: int) -> None:
        self._check_open()
        last = self.last_seq
        # A log that never held a record (last_seq 0) starts at whatever seq comes first.
        if seq < 1 or (last and seq != last + 1):
            raise LogError(f"out-of-sequence append: seq {seq} after {last}", seq=seq)

    def _append(self, seq: int, epoch: int, data: bytes | list) -> int:
        size = len(data) if isinstance(data, bytes) else sum(len(b) for b in data)
        seg = self._segments[-1]
        if self.last_seq == 0 and seg.first_seq != seq:
            self.reset(seq)
        elif seg.sealed or (seg.last_seq >= seg.first_seq and seg.size + size > self.segment_bytes):
            self._roll()
        seg = self._segments[-1]
        if size < PREZERO_BELOW and seg.size + size > self._file_end:
            ahead = min(PREZERO_BYTES, max(PREZERO_MIN, PREZERO_RECORDS * size))
            self._prezero(seg.size + size, ahead)
        try:
            _pwrite_all(self._fd, data, seg.size)
        except OSError:
            try:  # leave no partial record behind, so later appends stay valid
                os.ftruncate(self._fd, seg.size)
                self._file_end = seg.size
            except OSError:
                self._failed = True
                log.exception("SAM log %s: cannot undo a failed append", self.directory)
            raise
        seg.size += size
        self._file_end = max(self._file_end, seg.size)
        seg.last_seq, self._epoch = seq, epoch
        self._appended += 1
        return size

    def _prezero(self, need: int, ahead: int) -> None:
        """Make the current segment file at least ``need`` bytes (and ``ahead`` more) by
        writing zeros past its end; best effort (a full disk only makes appends slower)."""
        start = self._file_end
        end = min(max(need, start) + ahead, max(self.segment_bytes, need))
        try:
            while start < end:
                start += os.pwrite(self._fd, memoryview(_ZEROS)[: end - start], start)
        except OSError as exc:
            log.debug("SAM log %s: no zeros written ahead: %s", self.directory, exc)
        self._file_end = max(self._file_end, start)

    def _cut_zeros(self) -> None:
        """Drop the zeros written ahead of the current segment's last record."""
        seg = self._segments[-1]
        if self._fd >= 0 and self._file_end > seg.size:
            os.ftruncate(self._fd, seg.size)
        self._file_end = seg.size

    def _roll(self) -> None:
        """Seal the current segment (unless it is sealed already) and start the next one."""
        seg = self._segments[-1]
        if not seg.sealed:
            try:
                self._cut_zeros()  # the SEAL record ends the file
                write_seal(self._fd, seg, self.volume_uuid, self._epoch)
            except OSError:
                os.ftruncate(self._fd, seg.size)
                raise
            os.close(self._fd)
            self._fd = -1
            self._synced = self._appended  # the seal's fsync covered them
            self._mark_synced(seg.last_seq)
        nxt = SegmentHeader(self.block_size, self.volume_uuid, seg.last_seq + 1, self._generation)
        self._segments.append(_write_segment(self.directory, nxt))
        self._fd = os.open(self.directory / self._segments[-1].name, os.O_RDWR)
        self._file_end = self._segments[-1].size

    def sync(self) -> None:
        """Make every appended record durable."""
        # The seq to mark is read before the fdatasync, as the count is: only records whose
        # write returned before it began are named durable (store/syncmark.py).
        appended, fd, seq = self._appended, self._fd, self.last_seq
        if fd >= 0 and appended != self._synced and not self._failed:
            try:
                os.fdatasync(fd)
            except OSError:
                # Linux may drop the pages that failed and report the error once: a later
                # fdatasync would succeed without them. Nothing here is marked durable again.
                self._failed = True
                raise
            self._synced = appended
            self._mark_synced(seq)

    def _mark_synced(self, seq: int) -> None:
        """Record that ``seq`` is durable (store/syncmark.py): best effort, never fatal."""
        try:
            self._mark.write(self._generation, seq)
        except OSError as exc:
            self._mark.forget()
            log.warning("SAM log %s: cannot write the sync mark: %s", self.directory, exc)

    def retire(self, upto_seq: int) -> int:
        """Delete the segments whose records are all <= ``upto_seq``; return how many.

        The current segment is never deleted; when everything is retired it is sealed and
        replaced by an empty one first, so the log becomes empty but keeps ``last_seq``.
        """
        self._check_open()
        cur = self._segments[-1]
        if upto_seq >= cur.last_seq >= cur.first_seq:
            self._roll()
        removed = 0
        while len(self._segments) > 1 and self._segments[0].last_seq <= upto_seq:
            os.unlink(self.directory / self._segments.pop(0).name)  # oldest first
            removed += 1
        if removed:
            fsync_dir(self.directory)
        return removed

    def reset(self, next_seq: int) -> None:
        """Discard every record and start an empty log whose next record is ``next_seq``."""
        self._check_open()
        if next_seq < 1:
            raise ValueError(f"next_seq must be >= 1, not {next_seq}")
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._synced = self._appended  # what was not durable is discarded anyway
        self._generation += 1
        header = SegmentHeader(self.block_size, self.volume_uuid, next_seq, self._generation)
        new = _write_segment(self.directory, header)
        for seg in self._segments:
            if seg.name != new.name:
                os.unlink(self.directory / seg.name)
        fsync_dir(self.directory)
        self._segments = [new]
        self._fd = os.open(self.directory / new.name, os.O_RDWR)
        self._file_end = new.size

    def close(self) -> None:
        """Sync and close (idempotent)."""
        if self._fd >= 0:
            try:
                self.sync()
                self._cut_zeros()  # (if this is lost in a crash, recovery cuts them)
            finally:
                os.close(self._fd)
                self._fd = -1
        self._mark.close()
        self._closed = True

    def __enter__(self) -> SamLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    def scan(self, from_seq: int) -> Iterator[Transaction]:
        """Transactions from ``from_seq`` on, read lazily, each one validated.

        Raises LogError at once if ``from_seq`` was retired or lies beyond ``last_seq + 1``.
        Records appended while iterating are included.
        """
        self._check_range(from_seq)
        return (txn for _, txn in self._iter(from_seq, decode=True))

    def scan_encoded(self, from_seq: int) -> Iterator[tuple[int, bytes]]:
        """``(seq, record bytes)`` from ``from_seq`` on, crc-checked, for shipping verbatim."""
        self._check_range(from_seq)
        return self._iter(from_seq, decode=False)

    def verify(self) -> int:
        """Read and validate every record held (sealed segments too); return how many."""
        return sum(1 for _ in self.scan(self._segments[0].first_seq))

    def _check_range(self, from_seq: int) -> None:
        self._check_open()
        low, high = self._segments[0].first_seq, self.last_seq
        if not low <= from_seq <= high + 1:
            held = f"{low}..{high}" if low <= high else f"nothing (next seq {high + 1})"
            msg = f"seq {from_seq} is not available in {self.directory}: the log holds {held}"
            raise LogError(msg, seq=from_seq)

    def _iter(self, want: int, decode: bool) -> Iterator[tuple[int, object]]:
        while want <= self.last_seq:
            # A snapshot of the list: a reader in a worker thread (the shipper's) may run
            # while the trio thread retires segments from its front.
            segments = list(self._segments)
            i = bisect.bisect_right([s.first_seq for s in segments], want) - 1
            seg = segments[max(i, 0)]
            try:
                if i < 0:
                    raise FileNotFoundError
                fd = os.open(self.directory / seg.name, os.O_RDONLY)
            except FileNotFoundError:
                raise LogError(f"seq {want} was retired while being read", seq=want)
            try:
                off = SEG_HEADER.size
                while want <= seg.last_seq:  # live: follows appends to the current segment
                    kw = dict(segment=seg.name, file_offset=off, expect_seq=want)
                    hdr = record.parse_header(_pread(fd, HEADER.size, off), **kw)
                    if hdr.type == RecordType.TXN and hdr.seq < want:
                        off += hdr.size  # skip without reading the payload
                        continue
                    if hdr.type != RecordType.TXN or hdr.seq != want:
                        why = f"expected TXN seq {want}"
                        raise record.corrupt(why, seg.name, off, hdr.seq)
                    buf = _pread(fd, hdr.size, off)
                    if decode:
                        rec, _ = record.decode(buf, block_size=self.block_size, **kw)
                        yield want, rec.txn
                    else:
                        record.verify(buf, **kw)
                        yield want, buf
                    off, want = off + hdr.size, want + 1
            finally:
                os.close(fd)
