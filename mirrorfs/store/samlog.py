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

Recovery (``open``): sealed segments are checked cheaply (header + SEAL trailer); the last
unsealed one is scanned record by record. An invalid record with nothing valid after it is a
torn tail and is truncated away. An invalid record followed by valid data, a sequence gap or
a bad trailer on a non-last segment is corruption: ``CorruptRecord`` unless ``repair=True``,
which cuts the log there. ``log.recovery_report`` says what was done. Corruption inside a
sealed segment is found when it is read (``scan``, ``verify``).

Write-ahead: ``append`` returns once the record is written (page cache); ``sync`` makes it
durable. Not thread-safe: callers serialize every call (``sync`` may run in a worker thread
as long as no other method of the same log runs meanwhile).
"""

from __future__ import annotations

import bisect
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from mirrorfs.store import record
from mirrorfs.store.errors import CorruptRecord, LogError, TornRecord
from mirrorfs.store.files import fsync_dir
from mirrorfs.store.record import HEADER, SEAL_RECORD_SIZE, SEG_HEADER, RecordType, SegmentHeader
from mirrorfs.store.segments import (
    _NAME_RE,
    DEFAULT_SEGMENT_BYTES,
    RecoveryReport,
    _count_valid,
    _pread,
    _pwrite_all,
    _Scan,
    _Segment,
    _truncate,
    _write_segment,
)
from mirrorfs.store.txn import Transaction

log = logging.getLogger(__name__)


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
    ) -> SamLog:
        """Open the log, validate it and recover from a crash (see the module docstring)."""
        self = cls(Path(directory), volume_uuid, block_size)
        self.segment_bytes, self.compress = segment_bytes, compress
        self._recover(repair)
        if not self._segments[-1].sealed:
            self._fd = os.open(self.directory / self._segments[-1].name, os.O_RDWR)
        report = self.recovery_report
        report.segments, report.last_seq = len(self._segments), self.last_seq
        if report.changed:
            log.warning("SAM log %s: %s", self.directory, report.describe())
        return self

    def _read_header(self, name: str) -> SegmentHeader:
        with open(self.directory / name, "rb") as f:
            hdr = SegmentHeader.unpack(f.read(SEG_HEADER.size), name)
        where = f"log segment {name} in {self.directory}"
        if hdr.volume_uuid != self.volume_uuid:
            theirs, ours = uuid.UUID(bytes=hdr.volume_uuid), uuid.UUID(bytes=self.volume_uuid)
            raise LogError(f"{where} belongs to volume {theirs}, not {ours}", segment=name)
        if hdr.block_size != self.block_size:
            msg = f"{where} has block size {hdr.block_size}, the volume {self.block_size}"
            raise LogError(msg, segment=name)
        if hdr.first_seq != int(name[:20]):
            raise record.corrupt("first seq does not match the file name", name, 0, hdr.first_seq)
        return hdr

    def _recover(self, repair: bool) -> None:
        if not self.directory.is_dir():
            raise LogError(f"no SAM log at {self.directory}")
        leftovers = list(self.directory.glob("*.seg.tmp"))
        for leftover in leftovers:
            leftover.unlink()  # an interrupted segment creation, never used
        names = sorted(n for n in os.listdir(self.directory) if _NAME_RE.match(n))
        if not names:
            raise LogError(f"no log segments in {self.directory}")
        entries: list[tuple[str, SegmentHeader | CorruptRecord]] = []
        for name in names:
            try:
                entries.append((name, self._read_header(name)))
            except CorruptRecord as exc:
                entries.append((name, exc))
        gens = [h.generation for _, h in entries if isinstance(h, SegmentHeader)]
        self._generation = max(gens, default=1)
        for name, hdr in list(entries):
            if isinstance(hdr, SegmentHeader) and hdr.generation < self._generation:
                os.unlink(self.directory / name)
                self.recovery_report.superseded_segments.append(name)
                entries.remove((name, hdr))
        kept: list[_Segment] = []
        for i, (name, hdr) in enumerate(entries):
            if isinstance(hdr, SegmentHeader) and kept and hdr.first_seq != kept[-1].last_seq + 1:
                why = f"sequence gap: the previous segment ends at seq {kept[-1].last_seq}"
                hdr = record.corrupt(why, name, 0, hdr.first_seq)
            if isinstance(hdr, CorruptRecord):
                if not repair:
                    raise hdr
                self._cut(entries, i, hdr, name, 0)
                break
            if not self._check_segment(entries, i, hdr, kept, repair):
                break
        if not kept:  # repair removed everything: restart where the first segment began
            first = int(entries[0][0][:20])
            header = SegmentHeader(self.block_size, self.volume_uuid, first, self._generation)
            kept.append(_write_segment(self.directory, header))
        self._segments = kept
        r = self.recovery_report
        if leftovers or r.superseded_segments or r.removed_segments:
            fsync_dir(self.directory)  # settles the unlinks above

    def _check_segment(
        self, entries: list, i: int, hdr: SegmentHeader, kept: list[_Segment], repair: bool
    ) -> bool:
        """Validate segment ``i`` and append it to ``kept``; False if the log was cut here."""
        name, is_last = entries[i][0], i == len(entries) - 1
        path = self.directory / name
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            seg = _Segment(hdr.first_seq, hdr.first_seq - 1, size)
            trailer = self._read_trailer(fd, name, seg)
            if trailer is not None:
                seg.last_seq, seg.sealed, self._epoch = trailer.seq, True, trailer.epoch
                kept.append(seg)
                return True
            scan = self._scan_file(fd, name, seg.first_seq, size)
        finally:
            os.close(fd)
        seg.last_seq, seg.size, seg.sealed = scan.last_seq, scan.end, scan.sealed
        if scan.error is None and (scan.sealed or is_last):
            kept.append(seg)
            return True
        after, after_txns = _count_valid(path, scan.end + 1) if scan.error else (0, 0)
        if scan.error and scan.torn_candidate and is_last and after == 0:
            _truncate(path, scan.end)
            r = self.recovery_report
            r.torn_bytes, r.segment, r.offset = size - scan.end, name, scan.end
            kept.append(seg)
            return True
        err = scan.error or record.corrupt(
            "segment is not sealed but later segments exist", name, size, scan.last_seq
        )
        if not repair:
            note = f"; {after} valid record(s) follow, so it is not a torn tail" if after else ""
            msg = f"{err}{note} (open with repair to cut the log there)"
            raise CorruptRecord(msg, segment=err.segment, offset=err.offset, seq=err.seq)
        nxt = entries[i + 1][1] if not is_last else None
        _truncate(path, seg.size)
        kept.append(seg)
        if after == 0 and isinstance(nxt, SegmentHeader) and nxt.first_seq == seg.last_seq + 1:
            # Only the trailer is damaged and the next segment continues: seal it again.
            fd = os.open(path, os.O_RDWR)
            try:
                self._write_seal(fd, seg)
            finally:
                os.close(fd)
            self.recovery_report.resealed_segments.append(name)
            return True
        # A valid but misplaced record at the cut is lost too; an invalid one never counted.
        misplaced = scan.error is not None and not scan.torn_candidate
        self.recovery_report.discarded_records += after_txns + misplaced
        self._cut(entries, i + 1, err, name, seg.size)
        return False

    def _cut(self, entries: list, i: int, err: LogError, at: str, offset: int) -> None:
        """Repair: remove segments ``i..`` and record the cut in the report."""
        r = self.recovery_report
        r.repaired, r.reason, r.segment, r.offset = True, str(err), at, offset
        for name, _ in reversed(entries[i:]):  # newest first: a crash leaves a prefix
            r.discarded_records += _count_valid(self.directory / name, SEG_HEADER.size)[1]
            os.unlink(self.directory / name)
            r.removed_segments.insert(0, name)
        log.error("SAM log %s: repair cut the log: %s", self.directory, err)

    def _read_trailer(self, fd: int, name: str, seg: _Segment) -> record.Record | None:
        """The SEAL record that ends the file, if it is there and matches the segment."""
        off = seg.size - SEAL_RECORD_SIZE
        if off < SEG_HEADER.size:
            return None
        try:
            rec, _ = record.decode(_pread(fd, SEAL_RECORD_SIZE, off), segment=name)
        except LogError:
            return None
        return rec if self._seal_matches(rec, seg.first_seq, off) else None

    def _seal_matches(self, rec: record.Record, first_seq: int, offset: int) -> bool:
        s = rec.seal
        return (
            s is not None
            and (s.first_seq, s.offset) == (first_seq, offset)
            and (s.volume_uuid == self.volume_uuid)
        )

    def _scan_file(self, fd: int, name: str, first_seq: int, size: int) -> _Scan:
        """Validate every record of a segment; stop at the first problem."""
        off, want = SEG_HEADER.size, first_seq
        while off < size:
            kw = dict(segment=name, file_offset=off, expect_seq=want)
            try:
                hdr = record.parse_header(_pread(fd, HEADER.size, off), **kw)
                buf = _pread(fd, hdr.size, off)
                rec, _ = record.decode(buf, block_size=self.block_size, **kw)
            except (TornRecord, CorruptRecord) as exc:
                return _Scan(off, want - 1, error=exc, torn_candidate=True)
            if rec.type == RecordType.TXN and rec.seq == want:
                off, want, self._epoch = off + rec.size, want + 1, rec.epoch
                continue
            if rec.type == RecordType.SEAL:
                at_end = off + rec.size == size and rec.seq == want - 1
                if at_end and self._seal_matches(rec, first_seq, off):
                    return _Scan(size, want - 1, sealed=True)
                why = "seal record does not match its segment"
            else:
                why = f"sequence gap: expected seq {want}"
            return _Scan(off, want - 1, error=record.corrupt(why, name, off, rec.seq))
        return _Scan(size, want - 1)

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

    def append_validated(self, txn: Transaction, record_bytes: bytes) -> int:
        """Append ``record_bytes``, which the caller decoded into ``txn`` with
        ``record.decode_txn`` (so it is complete and sound): no second decode."""
        self._check_seq(txn.seq)
        return self._append(txn.seq, txn.epoch, bytes(record_bytes))

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
        try:
            _pwrite_all(self._fd, data, seg.size)
        except OSError:
            try:  # leave no partial record behind, so later appends stay valid
                os.ftruncate(self._fd, seg.size)
            except OSError:
                self._failed = True
                log.exception("SAM log %s: cannot undo a failed append", self.directory)
            raise
        seg.size += size
        seg.last_seq, self._epoch = seq, epoch
        self._appended += 1
        return size

    def _write_seal(self, fd: int, seg: _Segment) -> None:
        seal = record.Seal(seg.first_seq, seg.last_seq, seg.size, self.volume_uuid)
        data = record.encode_seal(seal, epoch=self._epoch, timestamp_ns=time.time_ns())
        _pwrite_all(fd, data, seg.size)
        os.fsync(fd)
        seg.size += len(data)
        seg.sealed = True

    def _roll(self) -> None:
        """Seal the current segment (unless it is sealed already) and start the next one."""
        seg = self._segments[-1]
        if not seg.sealed:
            try:
                self._write_seal(self._fd, seg)
            except OSError:
                os.ftruncate(self._fd, seg.size)
                raise
            os.close(self._fd)
            self._fd = -1
            self._synced = self._appended  # the seal's fsync covered them
        nxt = SegmentHeader(self.block_size, self.volume_uuid, seg.last_seq + 1, self._generation)
        self._segments.append(_write_segment(self.directory, nxt))
        self._fd = os.open(self.directory / self._segments[-1].name, os.O_RDWR)

    def sync(self) -> None:
        """Make every appended record durable."""
        appended, fd = self._appended, self._fd
        if fd >= 0 and appended != self._synced:
            os.fdatasync(fd)
            self._synced = appended

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

    def close(self) -> None:
        """Sync and close (idempotent)."""
        if self._fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = -1
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
            i = bisect.bisect_right([s.first_seq for s in self._segments], want) - 1
            seg = self._segments[max(i, 0)]
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
