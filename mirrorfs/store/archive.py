"""Archives of transactions a node is about to give up: diverged ones, and those after a hole.

When an old source rejoins as a target (``mirrorfs demote``, then a resync from the new
source), the transactions it committed after the fork point F were never part of the new
source's history. Before its log is reset, the target copies them, verbatim, into a file of
its volume directory; nothing it committed is silently destroyed::

    DIR/archive/diverged-epoch<E>-seq<F+1>-<X>.samlog

E is the epoch those transactions belong to (the node's current epoch), F+1..X the seqs.

A replica whose own log has a hole (store/logrecovery.py) cuts it there and gets the lost
seqs again from its source; the valid records that lay after the hole would go with the
cut. ``archive_hole`` copies them first, in the same format::

    DIR/archive/hole-epoch<E>-seq<F>-<X>.samlog

F..X the seqs at stake in the hole (``LogHole.first..last``); the records held are the
valid TXN records found after it (by magic and crc, in file order: after damage they need
not be consecutive), ``fork_seq`` is F-1, the last seq the cut keeps.

File layout (integers little-endian)::

    header      magic b"MFSARCHV", version u16 (1), reserved u16 (0), meta_length u32,
                meta_crc u32 = crc32 of the meta bytes
    meta        ``meta_length`` bytes of JSON: kind ("diverged" or "hole"), volume_uuid,
                node_id, epoch, fork_seq, first_seq, last_seq (the lowest and highest seq
                held, 0/0 for none), wanted_last_seq (X), records, created (unix time),
                note (e.g. which seqs had been retired)
    records     SAM log TXN records (mirrorfs.store.record), verbatim, back to back;
                diverged: seqs first_seq..last_seq in order

The file is written to a temporary name, fsynced and renamed, so an archive that exists is
complete. ``read_archive`` checks every record.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from mirrorfs.store import record
from mirrorfs.store.errors import LogError, LogHole, VolumeError
from mirrorfs.store.files import ARCHIVE_DIR, LOG_DIR, atomic_write
from mirrorfs.store.record import SEG_HEADER, RecordType, SegmentHeader
from mirrorfs.store.samlog import SamLog
from mirrorfs.store.segments import segment_first_seq, valid_records

log = logging.getLogger(__name__)

MAGIC = b"MFSARCHV"
VERSION = 1
HEADER = struct.Struct("<8sHHII")
assert HEADER.size == 20


@dataclass(slots=True)
class ArchiveInfo:
    """What an archive holds (its meta, plus where it is)."""

    path: str
    volume_uuid: str
    node_id: str
    epoch: int
    fork_seq: int
    first_seq: int
    last_seq: int
    wanted_last_seq: int
    records: int
    bytes: int
    created: float
    note: str = ""
    kind: str = "diverged"

    def as_dict(self) -> dict:
        return asdict(self)


def archive_name(epoch: int, fork_seq: int, last_seq: int) -> str:
    return f"diverged-epoch{epoch}-seq{fork_seq + 1}-{last_seq}.samlog"


def archive_diverged(
    directory: str,
    samlog: SamLog,
    *,
    volume_uuid: str,
    node_id: str,
    epoch: int,
    fork_seq: int,
    last_seq: int,
) -> ArchiveInfo:
    """Copy the log's records after ``fork_seq`` (up to ``last_seq``) into an archive file.

    Records that the log no longer holds (retired before the fork was known) cannot be
    copied: the meta's note says which. An archive of the same name is replaced (an earlier
    resync that was interrupted wrote the same records).
    """
    first_wanted = fork_seq + 1
    held_from = samlog.first_seq
    start = max(first_wanted, held_from) if held_from else last_seq + 1
    notes: list[str] = []
    if start > first_wanted:
        gone_to = min(start - 1, last_seq)
        notes.append(
            f"seq {first_wanted}..{gone_to} had already been retired from the log (checkpointed "
            "into the block file) and could not be archived; their effect on the blocks was "
            "overwritten by the resync"
        )
    chunks: list[bytes] = []
    first = last = 0
    if start <= min(last_seq, samlog.last_seq):
        for seq, rec in samlog.scan_encoded(start):
            if seq > last_seq:
                break
            chunks.append(bytes(rec))
            first = first or seq
            last = seq
    if last and last < last_seq:
        notes.append(f"seq {last + 1}..{last_seq} were not in the log")
    arch_dir = os.path.join(directory, ARCHIVE_DIR)
    os.makedirs(arch_dir, exist_ok=True)
    name = archive_name(epoch, fork_seq, last_seq)
    path = os.path.join(arch_dir, name)
    info = ArchiveInfo(
        path=path,
        volume_uuid=volume_uuid,
        node_id=node_id,
        epoch=epoch,
        fork_seq=fork_seq,
        first_seq=first,
        last_seq=last,
        wanted_last_seq=last_seq,
        records=len(chunks),
        bytes=sum(len(c) for c in chunks),
        created=time.time(),
        note="; ".join(notes),
    )
    _write(info, chunks)
    log.warning(
        "archived %d diverged transaction(s) (seq %s, %d bytes) of epoch %d after the fork at "
        "seq %d in %s%s",
        info.records,
        f"{first}..{last}" if info.records else "none",
        info.bytes,
        epoch,
        fork_seq,
        path,
        f" ({info.note})" if info.note else "",
    )
    return info


def archive_hole(
    directory: str,
    hole: LogHole,
    *,
    volume_uuid: str,
    node_id: str,
    epoch: int,
    block_size: int,
) -> ArchiveInfo | None:
    """Copy the valid TXN records that a cut of the log at ``hole`` removes (after
    ``hole.offset`` of its segment, and every later segment) into an archive file; None
    when there are none (a log that ends before its sync mark: nothing is left after it).

    Reads the segment files directly (the log cannot be opened before the cut). Segments of
    another volume or of an older generation (an interrupted reset) are not the log's and
    are skipped. An archive of the same name is replaced (an earlier cut was interrupted).
    """
    if not hole.segment:
        return None
    logdir = Path(directory, LOG_DIR)
    chunks: list[bytes] = []
    seqs: list[int] = []
    headers: dict[str, SegmentHeader | None] = {}
    for name in sorted(n for n in os.listdir(logdir) if segment_first_seq(n) is not None):
        try:
            with open(logdir / name, "rb") as f:
                headers[name] = SegmentHeader.unpack(f.read(SEG_HEADER.size), name)
        except LogError:
            headers[name] = None  # (a damaged header: its records still check one by one)
    generation = max((h.generation for h in headers.values() if h), default=0)
    want_uuid = bytes.fromhex(volume_uuid)
    for name, hdr in headers.items():
        if name < hole.segment:
            continue
        if hdr is not None and (hdr.volume_uuid != want_uuid or hdr.generation < generation):
            continue
        start = max(hole.offset, SEG_HEADER.size) if name == hole.segment else SEG_HEADER.size
        for rhdr, rec in valid_records(logdir / name, start):
            if rhdr.type != RecordType.TXN:
                continue
            try:
                record.decode_txn(rec, block_size=block_size)
            except LogError:
                continue
            chunks.append(rec)
            seqs.append(rhdr.seq)
    if not chunks:
        return None
    first, last = hole.first, hole.last or max(seqs)
    arch_dir = os.path.join(directory, ARCHIVE_DIR)
    os.makedirs(arch_dir, exist_ok=True)
    info = ArchiveInfo(
        path=os.path.join(arch_dir, f"hole-epoch{epoch}-seq{first}-{last}.samlog"),
        volume_uuid=volume_uuid,
        node_id=node_id,
        epoch=epoch,
        fork_seq=first - 1,
        first_seq=min(seqs),
        last_seq=max(seqs),
        wanted_last_seq=last,
        records=len(chunks),
        bytes=sum(len(c) for c in chunks),
        created=time.time(),
        note=f"valid records after a hole in the log, cut with it: {hole.detail}",
        kind="hole",
    )
    _write(info, chunks)
    return info


def _write(info: ArchiveInfo, chunks: list[bytes]) -> None:
    """Write the archive file (tmp, fsync, rename: it exists only complete)."""
    meta = {k: v for k, v in info.as_dict().items() if k != "path"}
    meta_bytes = json.dumps(meta, sort_keys=True).encode()
    head = HEADER.pack(MAGIC, VERSION, 0, len(meta_bytes), zlib.crc32(meta_bytes))
    atomic_write(info.path, [head + meta_bytes, *chunks])


def read_archive(path: str, *, block_size: int) -> tuple[dict, list[tuple[int, bytes]]]:
    """(meta, [(seq, record bytes)]) of an archive; VolumeError naming file and offset."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < HEADER.size:
        raise VolumeError(f"{path}: archive header is truncated")
    magic, version, _, mlen, mcrc = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise VolumeError(f"{path}: not a mirrorfs archive (magic or version)")
    meta_bytes = data[HEADER.size : HEADER.size + mlen]
    if len(meta_bytes) != mlen or zlib.crc32(meta_bytes) != mcrc:
        raise VolumeError(f"{path}: damaged archive meta")
    meta = json.loads(meta_bytes)
    records: list[tuple[int, bytes]] = []
    pos = HEADER.size + mlen
    while pos < len(data):
        try:
            hdr = record.parse_header(data, pos, segment=os.path.basename(path))
            end = pos + record.HEADER.size + hdr.length
            rec = data[pos:end]
            txn = record.decode_txn(rec, block_size=block_size)
        except LogError as exc:
            raise VolumeError(f"{path}: damaged archive record at offset {pos}: {exc}") from None
        records.append((txn.seq, rec))
        pos = end
    return meta, records
