"""Recovery of a SAM log at open: validate every segment, cut a torn tail, repair.

Sealed segments are checked cheaply (header + SEAL trailer); the last unsealed one is
scanned record by record. An invalid record with nothing valid after it, at the end of the
newest segment, is a torn tail (a crash cut the record being appended) and is truncated
away. Everything else that loses records is a *hole* (``LogHole``, one line naming segment,
offset and the seqs at stake), refused unless ``repair=True``, which cuts the log there:

- an invalid record followed by valid data, or a sequence gap inside a segment;
- a sequence gap between segments, or a sealed segment cut short (its SEAL is gone and the
  next segment starts past its end);
- a log that ends before its sync mark (``store/syncmark.py``), by as little as one
  record: records that were durable, so possibly acknowledged, are gone. That is how a
  segment truncated in the middle, by storage that lost acknowledged writes, is told from a
  crash. No slack: the mark is never ahead of what a crash leaves (the argument is in
  ``store/syncmark.py``), so a torn tail always lies past it.

Segments of a lower generation are leftovers of an interrupted ``reset`` and are deleted.
What was done goes into the ``RecoveryReport`` (``SamLog.recovery_report``); a repair says
which seqs it gave up (``lost_first..lost_last``) and removes the sync mark. A torn tail is
truncated only once the whole log passed, so a refused log is left as it was found.

``look_only`` (a check that must not write, ``fsck`` without ``--repair``) validates the
same way but changes no file: a torn tail is left in place and only not read, superseded
segments and leftovers are only skipped, and corruption raises as without ``repair``.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from mirrorfs.store import record, syncmark
from mirrorfs.store.errors import CorruptRecord, LogError, LogHole, TornRecord
from mirrorfs.store.files import fsync_dir
from mirrorfs.store.record import HEADER, SEAL_RECORD_SIZE, SEG_HEADER, RecordType, SegmentHeader
from mirrorfs.store.segments import (
    _NAME_RE,
    RecoveryReport,
    _count_valid,
    _pread,
    _Scan,
    _Segment,
    _truncate,
    _write_segment,
    write_seal,
)

log = logging.getLogger(__name__)


def _all_zero(path: Path, start: int) -> bool:
    """Whether the file holds only zero bytes from ``start`` on."""
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(1 << 20):
            if chunk.count(0) != len(chunk):
                return False
    return True


class LogRecovery:
    """One recovery pass over the segment files of a log directory (``run``)."""

    def __init__(
        self, directory: Path, volume_uuid: bytes, block_size: int, report: RecoveryReport
    ) -> None:
        self.directory = directory
        self.volume_uuid = volume_uuid
        self.block_size = block_size
        self.report = report
        self.generation = 1
        self.epoch = 0  # epoch of the last record seen, for later SEAL headers
        self.look_only = False
        self._torn_at: tuple[Path, int] | None = None  # truncated once the log passed

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

    def run(self, repair: bool, *, look_only: bool = False) -> list[_Segment]:
        """Validate the log, recover from a crash; the segments kept, oldest first."""
        if not self.directory.is_dir():
            raise LogError(f"no SAM log at {self.directory}")
        self.look_only = self.report.look_only = look_only
        repair = repair and not look_only
        leftovers = [] if look_only else list(self.directory.glob("*.seg.tmp"))
        for leftover in leftovers:
            leftover.unlink()  # an interrupted segment creation, never used
        names = sorted(n for n in os.listdir(self.directory) if _NAME_RE.match(n))
        if not names:
            raise LogError(f"no log segments in {self.directory}")
        mark = syncmark.read(self.directory)  # (read first: a repair removes it)
        entries: list[tuple[str, SegmentHeader | CorruptRecord]] = []
        for name in names:
            try:
                entries.append((name, self._read_header(name)))
            except CorruptRecord as exc:
                entries.append((name, exc))
        gens = [h.generation for _, h in entries if isinstance(h, SegmentHeader)]
        self.generation = max(gens, default=1)
        for name, hdr in list(entries):
            if isinstance(hdr, SegmentHeader) and hdr.generation < self.generation:
                if not look_only:
                    os.unlink(self.directory / name)
                self.report.superseded_segments.append(name)
                entries.remove((name, hdr))
        kept: list[_Segment] = []
        for i, (name, hdr) in enumerate(entries):
            if isinstance(hdr, SegmentHeader) and kept and hdr.first_seq != kept[-1].last_seq + 1:
                prev = kept[-1].last_seq
                stake = (
                    f"seq {prev + 1}..{hdr.first_seq - 1} are missing"
                    if hdr.first_seq > prev
                    else f"seq {hdr.first_seq}..{prev} are there twice"
                )
                hdr = LogHole.found(
                    self.directory,
                    f"segment {name} at offset 0 (seq {hdr.first_seq}): sequence gap: the "
                    f"previous segment ends at seq {prev}: {stake}",
                    segment=name,
                    offset=0,
                    first=prev + 1,
                    last=max(hdr.first_seq - 1, prev + 1),
                )
            if isinstance(hdr, CorruptRecord):
                if not repair:
                    raise hdr
                first = kept[-1].last_seq + 1 if kept else int(entries[0][0][:20])
                self.report.lose(first, getattr(hdr, "last", 0))
                self._cut(entries, i, hdr, name, 0, first)
                break
            if not self._check_segment(entries, i, hdr, kept, repair):
                break
        if kept:
            self._check_mark(kept[-1], mark, repair)
        if self._torn_at is not None and not look_only:
            _truncate(*self._torn_at)  # (fsyncs the last segment too)
        elif kept and not look_only:
            self._settle(kept[-1])
        if self.report.repaired:  # (never look_only) the loss is accepted: a new mark follows
            syncmark.remove(self.directory)
        if not kept:  # repair removed everything: restart where the first segment began
            first = int(entries[0][0][:20])
            header = SegmentHeader(self.block_size, self.volume_uuid, first, self.generation)
            kept.append(_write_segment(self.directory, header))
        r = self.report
        if leftovers or r.superseded_segments or r.removed_segments or r.repaired:
            fsync_dir(self.directory)  # settles the unlinks above (the mark's too)
        return kept

    def _settle(self, seg: _Segment) -> None:
        """fsync the last segment as recovery found it. After a killed process its tail (or
        its SEAL) may sit in the page cache only; the log builds on it from now on (it is
        replayed, shipped, and the next segment follows it), and a sync of a later segment
        would not cover it. Cheap when it is clean."""
        fd = os.open(self.directory / seg.name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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
                seg.last_seq, seg.sealed, self.epoch = trailer.seq, True, trailer.epoch
                kept.append(seg)
                return True
            scan = self._scan_file(fd, name, seg.first_seq, size)
        finally:
            os.close(fd)
        seg.last_seq, seg.size, seg.sealed = scan.last_seq, scan.end, scan.sealed
        if scan.error is None and (scan.sealed or is_last):
            kept.append(seg)
            return True
        after, after_txns, after_top = _count_valid(path, scan.end + 1) if scan.error else (0, 0, 0)
        if scan.error and scan.torn_candidate and is_last and after == 0:
            self._torn_at = (path, scan.end)
            if not _all_zero(path, scan.end):
                r = self.report
                r.torn_bytes, r.segment, r.offset = size - scan.end, name, scan.end
            # else: only the zeros that appends write ahead (store/samlog.py), no record
            kept.append(seg)
            return True
        err = scan.error or record.corrupt(
            "segment is not sealed but later segments exist", name, size, scan.last_seq
        )
        nxt = entries[i + 1][1] if not is_last else None
        top = max(after_top, err.seq, nxt.first_seq - 1 if isinstance(nxt, SegmentHeader) else 0)
        first = seg.last_seq + 1
        if not repair:
            note = f"; {after} valid record(s) follow, so it is not a torn tail" if after else ""
            if isinstance(nxt, SegmentHeader):
                note += f"; the next segment starts at seq {nxt.first_seq}"
            stake = f"seq {first}..{top}" if top > first else f"seq {first}"
            raise LogHole.found(
                self.directory,
                f"{err}{note}: {stake} unreadable or missing",
                segment=err.segment,
                offset=err.offset,
                first=first,
                last=top,
            )
        _truncate(path, seg.size)
        kept.append(seg)
        if after == 0 and isinstance(nxt, SegmentHeader) and nxt.first_seq == seg.last_seq + 1:
            # Only the trailer is damaged and the next segment continues: seal it again.
            fd = os.open(path, os.O_RDWR)
            try:
                write_seal(fd, seg, self.volume_uuid, self.epoch)
            finally:
                os.close(fd)
            self.report.resealed_segments.append(name)
            return True
        # A valid but misplaced record at the cut is lost too; an invalid one never counted.
        misplaced = scan.error is not None and not scan.torn_candidate
        self.report.discarded_records += after_txns + misplaced
        self.report.lose(first, top)
        self._cut(entries, i + 1, err, name, seg.size, first)
        return False

    def _cut(self, entries: list, i: int, err: LogError, at: str, offset: int, first: int) -> None:
        """Repair: remove segments ``i..`` and record the cut (seq ``first`` on are given
        up) in the report."""
        r = self.report
        r.repaired, r.segment, r.offset = True, at, offset
        r.reason = err.detail if isinstance(err, LogHole) else str(err)
        for name, _ in reversed(entries[i:]):  # newest first: a crash leaves a prefix
            _, txns, top = _count_valid(self.directory / name, SEG_HEADER.size)
            r.discarded_records += txns
            r.lose(first, top)
            os.unlink(self.directory / name)
            r.removed_segments.insert(0, name)
        log.error("SAM log %s: repair cut the log: %s", self.directory, r.reason)

    def _check_mark(self, seg: _Segment, mark: syncmark.SyncMark | None, repair: bool) -> None:
        """A log that ends before its sync mark lost durable records: a hole."""
        last = seg.last_seq
        if mark is None or mark.generation != self.generation or mark.seq <= last:
            return
        hole = LogHole.found(
            self.directory,
            f"seq {last + 1}..{mark.seq} were durable (acknowledged) but are missing: the log "
            f"ends at offset {seg.size} of segment {seg.name} after seq {last}; a crash does "
            "not lose durable records, the storage did",
            segment=seg.name,
            offset=seg.size,
            first=last + 1,
            last=mark.seq,
        )
        if not repair:
            raise hole
        r = self.report
        r.lose(last + 1, mark.seq)
        if r.repaired:  # cut already (and said so): the mark only widens what was given up
            return
        r.repaired, r.reason, r.segment, r.offset = True, hole.detail, seg.name, seg.size
        log.error("SAM log %s: repair accepted a hole: %s", self.directory, hole.detail)

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
                off, want, self.epoch = off + rec.size, want + 1, rec.epoch
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
