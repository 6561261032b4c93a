"""The resync stage: what a resync brings, kept aside until it is applied as one group.

While a target is resynced, nothing reaches its block file or its SAM log: the current
content of the differing block ranges and the transactions S+1..T that follow the copy are
appended to a stage file in the volume directory instead. Once the stage holds everything up
to T, ``Volume.commit_resync`` applies it in one step (see volume.py); until then the replica
stays consistent at its applied seq A, and a crash simply discards the stage. A stage
outlives a cut connection (the resync resumes into it, ``trim`` first); it never outlives
the process, unless its group was recorded in node.json (then the open redoes it).

File ``DIR/resync-%020d.stage`` (named by S, the resync's start seq), all integers
little-endian::

    header (64 bytes)
        magic b"MFSSTAGE", version u16 (1), reserved u16 (0), block_size u32,
        volume_uuid 16 bytes, start_seq u64 (S), base_seq u64 (A, the replica's seq),
        reserved 12 bytes (0), hcrc u32 = crc32 of bytes 0..60
    records, back to back, each one either
        BLOCKS  magic b"MFSB", version u8 (1), flags u8 (bit 0: lz4.block, no size prefix),
                reserved u16 (0), first_block u64, nblocks u32, length u32 (stored bytes),
                crc u32 = crc32 of the 24 bytes before it, continued over the payload;
                then ``length`` bytes: ``nblocks * block_size`` bytes once decompressed
        TXN     a SAM log record (mirrorfs.store.record), verbatim as shipped; its seqs are
                S+1, S+2, ... in order

The file is append-only and fsynced (``sync``) before anything it holds is acknowledged.
Reading it back (``records``) checks every checksum; an error names the file and offset.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import lz4.block

from mirrorfs.store import record
from mirrorfs.store.errors import LogError, VolumeError
from mirrorfs.store.files import fsync_dir

log = logging.getLogger(__name__)

STAGE_MAGIC = b"MFSSTAGE"
STAGE_VERSION = 1
STAGE_HEADER = struct.Struct("<8sHHI16sQQ12sI")
assert STAGE_HEADER.size == 64
BLOCKS_MAGIC = b"MFSB"
BLOCKS_VERSION = 1
BLOCKS_HEAD = struct.Struct("<4sBBHQIII")
assert BLOCKS_HEAD.size == 28
FLAG_LZ4 = 1
MAX_RUN_BYTES = 256 << 20  # a stored or inflated BLOCKS payload is never bigger

_NAME_RE = re.compile(r"^resync-(\d{20})\.stage$")


def stage_name(start_seq: int) -> str:
    """File name of the stage of a resync that starts at ``start_seq``."""
    return f"resync-{start_seq:020d}.stage"


def stage_files(directory: str) -> list[str]:
    """Names of the stage files in ``directory``."""
    return sorted(n for n in os.listdir(directory) if _NAME_RE.match(n))


def remove_stages(directory: str, *, keep: str = "") -> list[str]:
    """Delete every stage file but ``keep``; return the names removed."""
    gone = [n for n in stage_files(directory) if n != keep]
    for name in gone:
        os.unlink(os.path.join(directory, name))
    if gone:
        fsync_dir(directory)
    return gone


@dataclass(slots=True)
class StagedBlocks:
    """A run of block images (decompressed)."""

    first_block: int
    data: bytes


@dataclass(slots=True)
class StagedTxn:
    """A transaction record, verbatim."""

    seq: int
    record: bytes


class Stage:
    """An open stage file (``create`` to write one, ``open`` to read one back)."""

    def __init__(self, directory: str, name: str, fd: int) -> None:
        self.directory = directory
        self.name = name
        self.block_size = 0
        self.volume_uuid = b""
        self.start_seq = 0
        self.base_seq = 0
        self.last_seq = 0  # the last TXN seq staged (start_seq while none)
        self.blocks = 0  # blocks staged
        self.size = 0  # bytes of the file
        self._fd = fd
        self._dirty = False

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.name)

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(
        cls,
        directory: str,
        *,
        volume_uuid: bytes,
        block_size: int,
        start_seq: int,
        base_seq: int,
    ) -> Stage:
        """A new, empty stage (any older stage file in ``directory`` is removed)."""
        name = stage_name(start_seq)
        remove_stages(directory)
        fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self = cls(directory, name, fd)
        self.block_size, self.volume_uuid = block_size, volume_uuid
        self.start_seq = self.last_seq = start_seq
        self.base_seq = base_seq
        fields = (STAGE_MAGIC, STAGE_VERSION, 0, block_size, volume_uuid, start_seq, base_seq)
        head = STAGE_HEADER.pack(*fields, bytes(12), 0)[:-4]
        try:
            os.write(fd, head + struct.pack("<I", zlib.crc32(head)))
            os.fsync(fd)
            fsync_dir(directory)  # the file itself must survive a crash
        except BaseException:
            self.discard()
            raise
        self.size = STAGE_HEADER.size
        return self

    @classmethod
    def open(cls, directory: str, name: str, *, volume_uuid: bytes, block_size: int) -> Stage:
        """Open an existing stage for reading (VolumeError if it is missing or foreign)."""
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise VolumeError(f"{path}: cannot open the resync stage: {exc.strerror or exc}")
        self = cls(directory, name, fd)
        try:
            buf = os.pread(fd, STAGE_HEADER.size, 0)
            if len(buf) != STAGE_HEADER.size:
                raise VolumeError(f"{path}: resync stage header is truncated")
            f = STAGE_HEADER.unpack(buf)
            if f[0] != STAGE_MAGIC or zlib.crc32(buf[:60]) != f[-1]:
                raise VolumeError(f"{path}: not a resync stage (bad magic or header checksum)")
            if f[1] != STAGE_VERSION:
                raise VolumeError(f"{path}: unsupported resync stage version {f[1]}")
            if f[3] != block_size or f[4] != volume_uuid:
                raise VolumeError(f"{path}: resync stage of another volume")
        except BaseException:
            os.close(fd)
            raise
        self.block_size, self.volume_uuid = block_size, volume_uuid
        self.start_seq, self.base_seq = f[5], f[6]
        self.last_seq = self.start_seq
        self.size = os.fstat(fd).st_size
        return self

    # ------------------------------------------------------------------ writing

    def _append(self, data: bytes) -> None:
        n = len(data)
        view = memoryview(data)
        done = 0
        while done < n:
            done += os.pwrite(self._fd, view[done:], self.size + done)
        self.size += n
        self._dirty = True

    def append_blocks(self, first_block: int, nblocks: int, data: bytes, *, lz4: bool) -> None:
        """Stage ``nblocks`` block images (``data`` as stored: lz4-compressed when ``lz4``)."""
        if nblocks < 1 or len(data) > MAX_RUN_BYTES or nblocks * self.block_size > MAX_RUN_BYTES:
            raise ValueError(f"bad staged run {first_block}+{nblocks} ({len(data)} bytes)")
        head = BLOCKS_HEAD.pack(
            BLOCKS_MAGIC,
            BLOCKS_VERSION,
            FLAG_LZ4 if lz4 else 0,
            0,
            first_block,
            nblocks,
            len(data),
            0,
        )[:-4]
        crc = zlib.crc32(data, zlib.crc32(head))
        self._append(head + struct.pack("<I", crc) + bytes(data))
        self.blocks += nblocks

    def append_txn(self, seq: int, record_bytes: bytes) -> None:
        """Stage transaction ``seq`` (must be ``last_seq + 1``; validated by the caller)."""
        if seq != self.last_seq + 1:
            raise LogError(f"stage {self.name}: seq {seq} after {self.last_seq}", seq=seq)
        self._append(bytes(record_bytes))
        self.last_seq = seq

    def trim(self) -> None:
        """Cut the file back to what was appended whole (a write that failed half-way
        leaves nothing behind for the records appended next)."""
        if os.fstat(self._fd).st_size != self.size:
            os.ftruncate(self._fd, self.size)
            self._dirty = True

    def sync(self) -> None:
        """Make everything appended durable."""
        if self._dirty:
            os.fdatasync(self._fd)
            self._dirty = False

    # ------------------------------------------------------------------ reading

    def records(self) -> Iterator[StagedBlocks | StagedTxn]:
        """Every staged record in order, checked (VolumeError naming file and offset)."""
        fd, bs = self._fd, self.block_size
        pos, end = STAGE_HEADER.size, os.fstat(fd).st_size
        expect = self.start_seq + 1
        while pos < end:
            magic = os.pread(fd, 4, pos)
            if magic == BLOCKS_MAGIC:
                head = os.pread(fd, BLOCKS_HEAD.size, pos)
                if len(head) != BLOCKS_HEAD.size:
                    raise self._bad(pos, "truncated BLOCKS header")
                _, ver, flags, res, first, n, length, crc = BLOCKS_HEAD.unpack(head)
                if ver != BLOCKS_VERSION or res or flags & ~FLAG_LZ4 or length > MAX_RUN_BYTES:
                    raise self._bad(pos, "bad BLOCKS header")
                if n < 1 or n * bs > MAX_RUN_BYTES:
                    raise self._bad(pos, f"bad BLOCKS run of {n} blocks")
                payload = os.pread(fd, length, pos + BLOCKS_HEAD.size)
                if len(payload) != length or zlib.crc32(payload, zlib.crc32(head[:24])) != crc:
                    raise self._bad(pos, "BLOCKS checksum mismatch or truncated payload")
                if flags & FLAG_LZ4:
                    try:
                        payload = lz4.block.decompress(payload, uncompressed_size=n * bs)
                    except lz4.block.LZ4BlockError as exc:
                        raise self._bad(pos, f"bad lz4 data ({exc})")
                if len(payload) != n * bs:
                    raise self._bad(pos, f"{len(payload)} bytes for {n} blocks")
                yield StagedBlocks(first, payload)
                pos += BLOCKS_HEAD.size + length
            elif magic == record.MAGIC:
                head = os.pread(fd, record.HEADER.size, pos)
                try:
                    hdr = record.parse_header(head, segment=self.name, file_offset=pos)
                except LogError as exc:
                    raise self._bad(pos, str(exc))
                rec = head + os.pread(fd, hdr.length, pos + len(head))
                try:
                    txn = record.decode_txn(rec, block_size=bs)
                except LogError as exc:
                    raise self._bad(pos, str(exc))
                if txn.seq != expect:
                    raise self._bad(pos, f"TXN seq {txn.seq}, expected {expect}")
                expect += 1
                self.last_seq = txn.seq
                yield StagedTxn(txn.seq, rec)
                pos += len(rec)
            else:
                raise self._bad(pos, "unknown record")

    def _bad(self, offset: int, why: str) -> VolumeError:
        return VolumeError(f"{self.path}: damaged resync stage at offset {offset}: {why}")

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """Close and delete the stage file."""
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        fsync_dir(self.directory)
