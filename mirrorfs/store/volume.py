"""The volume: a directory holding the block file, the SAM log and node-local state.

Directory layout::

    DIR/blocks      the block file (fixed size, sparse when created); nothing node-specific
    DIR/log/        the SAM log segments (mirrorfs.store.samlog)
    DIR/node.json   node-local state (mirrorfs.store.nodestate)
    DIR/lock        flock'ed by the process that has the volume open

Block file layout (block size B)::

    0               volume superblock (``VolumeSuper``)
    1               client superblock, reserved for the filesystem layer (``CLIENT_SUPER``)
    2 .. 2+nb-1     block allocation bitmap, one bit per block (``ExtentAllocator``)
    the rest        handed out by ``Volume.allocator``

Write path, the one choke point: ``Volume.write`` records full-block images into the open
transaction (a ``BlockOverlay`` that ``Volume.read`` consults). ``Volume.commit`` seals it:
the transaction is appended to the SAM log and the log is fsynced (write-ahead), and only
then are its blocks written in place by ``_write_in_place``, the only code that writes the
block file (log replay uses it too). A checkpoint fsyncs the block file, records the
checkpointed sequence number in node.json and retires log segments nobody needs any more.

Concurrency: a Volume is used from one trio thread. ``write``/``hint``/``commit`` never
await, so a filesystem operation (which never awaits either) always lands whole in one
transaction.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import time
import uuid as uuidlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mirrorfs.store import record
from mirrorfs.store.allocator import ExtentAllocator
from mirrorfs.store.device import BlockFile
from mirrorfs.store.errors import LogError, VolumeError, VolumeFailed, VolumeLocked
from mirrorfs.store.files import BLOCK_FILE, LOCK_FILE, LOG_DIR, NODE_FILE
from mirrorfs.store.nodestate import NodeState, Role
from mirrorfs.store.overlay import BlockOverlay
from mirrorfs.store.samlog import SamLog
from mirrorfs.store.staging import Stage, StagedBlocks, StagedTxn, remove_stages
from mirrorfs.store.txn import Hint, Transaction

log = logging.getLogger(__name__)

CLIENT_SUPER = 1
BITMAP_START = 2
MIN_BLOCKS = 64
BLOCK_SIZES = (512, 1024, 2048, 4096, 8192, 16384, 65536)


@dataclass(slots=True)
class VolumeSuper:
    """Block 0. ``save_area_*`` is room for block-level checkpoints (copy-on-first-write)."""

    MAGIC = b"MIRRORFS"
    VERSION = 1
    # magic, version, flags, uuid, block size, block count, bitmap start, bitmap blocks,
    # client super, save area start, save area blocks, crc32
    STRUCT = struct.Struct("<8sHH16sIQQQQQQI")

    uuid: bytes
    block_size: int
    block_count: int
    bitmap_blocks: int
    save_area_start: int = 0
    save_area_blocks: int = 0

    def pack(self) -> bytes:
        fields = (
            self.MAGIC,
            self.VERSION,
            0,
            self.uuid,
            self.block_size,
            self.block_count,
            BITMAP_START,
            self.bitmap_blocks,
            CLIENT_SUPER,
            self.save_area_start,
            self.save_area_blocks,
        )
        head = self.STRUCT.pack(*fields, 0)[:-4]
        raw = head + struct.pack("<I", zlib.crc32(head))
        return raw + bytes(self.block_size - len(raw))

    @classmethod
    def unpack(cls, buf: bytes, where: str) -> VolumeSuper:
        if len(buf) < cls.STRUCT.size:
            raise VolumeError(f"{where}: superblock is truncated")
        f = cls.STRUCT.unpack_from(buf)
        if f[0] != cls.MAGIC:
            raise VolumeError(f"{where}: not a mirrorfs volume (bad superblock magic)")
        if zlib.crc32(buf[: cls.STRUCT.size - 4]) != f[-1]:
            raise VolumeError(f"{where}: damaged superblock (checksum mismatch)")
        if f[1] != cls.VERSION:
            raise VolumeError(f"{where}: unsupported volume version {f[1]}")
        if f[6] != BITMAP_START or f[8] != CLIENT_SUPER:
            raise VolumeError(f"{where}: damaged superblock (bad layout)")
        return cls(f[3], f[4], f[5], f[7], f[9], f[10])


def bitmap_blocks_for(block_count: int, block_size: int) -> int:
    bits = block_size * 8
    return (block_count + bits - 1) // bits


@dataclass(slots=True)
class RecoveryReport:
    replayed: int = 0
    first_seq: int = 0
    last_seq: int = 0
    log_note: str = ""

    def describe(self) -> str:
        parts = []
        if self.replayed:
            parts.append(
                f"replayed {self.replayed} transaction(s) seq {self.first_seq}..{self.last_seq}"
            )
        if self.log_note:
            parts.append(self.log_note)
        return "; ".join(parts) if parts else "clean"


@dataclass(slots=True)
class ResyncResult:
    """What ``commit_resync`` applied: blocks written, transactions S+1..T and their hints."""

    start_seq: int
    end_seq: int
    blocks: int = 0
    txns: int = 0
    hints: list[Hint] = field(default_factory=list)


class Volume:
    """An open volume. Create with ``Volume.create``, open with ``Volume.open``."""

    def __init__(self) -> None:  # use Volume.open
        self.path = ""
        self.read_only = False
        self.failed: str | None = None
        # Set when this source met a newer epoch (split brain fenced): no new changes.
        self.fenced: str = ""
        # Set while a planned switchover holds the volume at the seq the new source starts
        # from: nothing is sealed any more (changes that are not the writers', such as atime
        # or a release, stay open and are dropped at close), so this copy cannot diverge.
        self.frozen: str = ""
        # The write gate of the read-write mount serving this volume (mirrorfs.fuse.gate),
        # set by the FUSE layer; how a switchover holds the writers.
        self.write_gate: Any = None
        self.state: NodeState
        self.sb: VolumeSuper
        self.device: BlockFile
        self.samlog: SamLog
        self.allocator: ExtentAllocator
        self.recovery = RecoveryReport()
        self.checkpoint_bytes = 256 << 20
        self.checkpoint_seconds = 30.0
        self._lock_fd = -1
        self._overlay: BlockOverlay
        self._hints: list[Hint] = []
        # Sealed transactions whose log append / in-place write is still running (oldest
        # first); reads see them until ``finish`` drops them.
        self._sealed: list[tuple[Transaction, BlockOverlay]] = []
        self._sealed_seq = 0
        self._persisted_seq = 0
        self._last_seq = 0
        self._last_checkpoint = time.monotonic()
        self._log_bytes_since_checkpoint = 0
        # Called with each committed Transaction (the shipper hooks in here).
        self.on_commit: list[Callable[[Transaction], None]] = []
        # Lowest sequence number some consumer (a target) still needs from the log.
        self.retain_from: Callable[[], int | None] = lambda: None
        # Whether a connected target has not yet received the last commit (set by the
        # source node; the unmount waits on it, bounded).
        self.replication_pending: Callable[[], bool] = lambda: False

    # -- geometry
    @property
    def block_size(self) -> int:
        return self.sb.block_size

    @property
    def block_count(self) -> int:
        return self.sb.block_count

    @property
    def uuid(self) -> bytes:
        return self.sb.uuid

    @property
    def last_seq(self) -> int:
        """Sequence number of the last committed transaction."""
        return self._last_seq

    @property
    def open_bytes(self) -> int:
        """Bytes of block data in the open (not yet sealed) transaction."""
        return self._overlay.nbytes

    @property
    def in_flight_seq(self) -> int | None:
        """The newest sealed transaction not finished yet, if any."""
        return self._sealed[-1][0].seq if self._sealed else None

    @property
    def pending_bytes(self) -> int:
        """Bytes in the open transaction plus those sealed but not yet persisted."""
        return self._overlay.nbytes + sum(o.nbytes for _, o in self._sealed)

    # -- creation
    @classmethod
    def create(
        cls, path: str, size_bytes: int, *, block_size: int = 4096, force: bool = False
    ) -> None:
        """Make a new volume directory at ``path`` (refuses an existing volume unless force).

        Every block of a new volume reads as zeros (a fresh sparse file); formatting relies
        on that instead of writing zero blocks.
        """
        if block_size not in BLOCK_SIZES:
            raise VolumeError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}")
        block_count = size_bytes // block_size
        if block_count < MIN_BLOCKS:
            raise VolumeError(f"volume size must be at least {MIN_BLOCKS * block_size} bytes")
        path = os.path.abspath(path)
        if os.path.exists(path) and not os.path.isdir(path):
            raise VolumeError(f"{path}: exists and is not a directory")
        existing = os.path.isdir(path) and os.listdir(path)
        if existing:
            if not force:
                what = "a volume" if os.path.exists(os.path.join(path, BLOCK_FILE)) else "files"
                raise VolumeError(f"{path}: already holds {what} (use --force to overwrite)")
            cls._wipe(path)
        os.makedirs(path, exist_ok=True)
        lock_fd = cls._lock(path)
        try:
            vuuid = uuidlib.uuid4().bytes
            BlockFile.create(os.path.join(path, BLOCK_FILE), block_count * block_size)
            SamLog.create(os.path.join(path, LOG_DIR), volume_uuid=vuuid, block_size=block_size)
            state = NodeState(volume_uuid=vuuid.hex(), block_size=block_size)
            state.save(path)
            sb = VolumeSuper(
                vuuid, block_size, block_count, bitmap_blocks_for(block_count, block_size)
            )
            vol = cls._open_locked(path, lock_fd, read_only=False, fresh=sb)
            vol.write(0, sb.pack())
            ExtentAllocator.format(
                vol, BITMAP_START, block_count, used=[(0, BITMAP_START + sb.bitmap_blocks)]
            )
            vol.commit()
            vol._load_allocator()
            vol.close()
            lock_fd = -1  # closed by vol.close()
        finally:
            if lock_fd >= 0:
                os.close(lock_fd)

    @staticmethod
    def _wipe(path: str, only: tuple[str, ...] | None = None) -> None:
        import shutil

        for name in os.listdir(path):
            if only is not None and name not in only:
                continue
            p = os.path.join(path, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)

    # -- opening
    @staticmethod
    def _lock(path: str) -> int:
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VolumeLocked(f"{path}: volume is in use by another process (mounted?)")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    @classmethod
    def open(cls, path: str, *, read_only: bool = False, repair_log: bool = False) -> Volume:
        """Lock and open the volume at ``path``, replaying committed log transactions."""
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise VolumeError(f"{path}: no such volume directory")
        if not os.path.exists(os.path.join(path, "node.json")):
            raise VolumeError(f"{path}: not a mirrorfs volume")
        lock_fd = cls._lock(path)
        try:
            return cls._open_locked(path, lock_fd, read_only=read_only, repair_log=repair_log)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open_locked(
        cls,
        path: str,
        lock_fd: int,
        *,
        read_only: bool,
        fresh: VolumeSuper | None = None,
        repair_log: bool = False,
    ) -> Volume:
        vol = cls()
        vol.path = path
        vol.read_only = read_only
        vol.state = NodeState.load(path)
        vuuid = bytes.fromhex(vol.state.volume_uuid)
        bs = vol.state.block_size
        vol.samlog = SamLog.open(
            os.path.join(path, LOG_DIR), volume_uuid=vuuid, block_size=bs, repair=repair_log
        )
        report = getattr(vol.samlog, "recovery_report", None)
        if report is not None and getattr(report, "describe", None):
            note = report.describe()
            if note and note != "clean":
                vol.recovery.log_note = note
        vol._overlay = BlockOverlay(bs)
        block_file = os.path.join(path, BLOCK_FILE)
        size = os.path.getsize(block_file) if os.path.exists(block_file) else -1
        if size <= 0 or size % bs:
            raise VolumeError(f"{block_file}: missing or has a bad size")
        vol.device = BlockFile(block_file, bs, size // bs)
        vol._lock_fd = lock_fd
        vol._last_seq = max(vol.state.checkpointed_seq, vol.samlog.last_seq)
        if fresh is not None:
            vol.sb = fresh
            return vol
        if vol.state.resync:
            vol._redo_resync()  # a resync group was being applied: finish it first
        else:
            remove_stages(path)  # a resync that never reached its group: discarded
            vol._replay()
        vol.sb = VolumeSuper.unpack(vol.device.read(0, 1), block_file)
        if vol.sb.uuid != vuuid or vol.sb.block_size != bs:
            raise VolumeError(f"{path}: block file belongs to another volume than node.json")
        if vol.sb.block_count != vol.device.block_count:
            raise VolumeError(f"{block_file}: size does not match the superblock")
        vol._load_allocator()
        if vol.recovery.replayed or vol.recovery.log_note:
            log.warning("%s: recovery: %s", path, vol.recovery.describe())
        return vol

    def _load_allocator(self) -> None:
        self.allocator = ExtentAllocator(self, BITMAP_START, self.sb.block_count)

    def _replay(self) -> None:
        """Write in place every logged transaction past the checkpoint (idempotent)."""
        start = self.state.checkpointed_seq + 1
        if self.samlog.last_seq < start:
            return
        rep = self.recovery
        for txn in self.samlog.scan(start):
            self._write_in_place(txn.runs)
            if not rep.replayed:
                rep.first_seq = txn.seq
            rep.replayed += 1
            rep.last_seq = txn.seq
        if rep.replayed:
            self.device.sync()
            self.state.checkpointed_seq = rep.last_seq
            self.state.save(self.path)

    # -- the choke point
    def read(self, block: int, count: int = 1) -> bytes:
        """Current content of ``count`` blocks from ``block``, open transaction included."""
        if self._overlay:
            hit = self._overlay.covers(block, count)
            if hit is not None:
                return hit
        if not self._sealed:
            return self._overlay.patch(block, count, self.device.read(block, count))
        data = self.device.read(block, count)
        for _, layer in self._sealed:  # oldest first, so newer layers win
            data = layer.patch(block, count, data)
        return self._overlay.patch(block, count, data)

    def write(self, block: int, data: bytes | bytearray | memoryview) -> None:
        """Record full blocks at ``block`` in the open transaction. THE write choke point."""
        if self.failed:
            raise VolumeFailed(f"volume is read-only after an I/O failure: {self.failed}")
        n = len(data)
        if n == 0 or n % self.block_size:
            raise ValueError(f"write of {n} bytes is not a whole number of blocks")
        if block < 0 or block + n // self.block_size > self.block_count:
            raise ValueError(f"write of blocks {block}+{n // self.block_size} outside the volume")
        self._overlay.put(block, data)

    def hint(self, hint: Hint) -> None:
        """Attach a file-system hint to the open transaction."""
        self._hints.append(hint)

    def commit(self, *, sync: bool = True) -> int | None:
        """Seal the open transaction: log it, fsync the log, then write it in place.

        Returns its sequence number, or None if there was nothing to commit. The log is
        always fsynced before the in-place write (write-ahead), whatever ``sync`` says; the
        parameter is kept for callers that want to state their intent. This is ``seal``,
        ``persist`` and ``finish`` in a row; the mount runs ``persist`` in a worker thread.
        """
        self.drain()
        txn = self.seal()
        if txn is None:
            self._maybe_checkpoint()
            return None
        self.persist(txn)
        self.finish(txn)
        return txn.seq

    def drain(self) -> None:
        """Persist and finish, here and now, every sealed transaction still pending.

        For shutdown and the synchronous ``commit``: the mount's worker has stopped by then.
        """
        while self._sealed:
            txn = self._sealed[0][0]
            if txn.seq > self._persisted_seq:
                self.persist(txn)
            self.finish(txn)

    def seal(self) -> Transaction | None:
        """Close the open transaction and give it its sequence number (no I/O).

        Its blocks stay visible to ``read`` until ``finish``; new writes go to a fresh open
        transaction. Returns None when there is nothing to commit, or when the volume is
        ``frozen``.
        """
        if not self._overlay and not self._hints:
            return None
        if self.frozen:
            return None
        if self.failed:
            raise VolumeFailed(f"volume is read-only after an I/O failure: {self.failed}")
        self._sealed_seq = max(self._sealed_seq, self._last_seq) + 1
        txn = Transaction(
            seq=self._sealed_seq,
            epoch=self.state.epoch,
            timestamp_ns=time.time_ns(),
            runs=self._overlay.runs(),
            hints=self._hints,
        )
        self._sealed.append((txn, self._overlay))
        self._overlay = BlockOverlay(self.block_size)
        self._hints = []
        return txn

    def persist(self, txn: Transaction) -> int:
        """Append a sealed transaction to the log, fsync it, write it in place.

        Safe to run in a worker thread while the trio thread keeps reading and writing the
        volume, as long as persists run one at a time and in seal order (the caller holds a
        lock) and nothing else touches the log meanwhile. Returns the record size.
        """
        if self.failed:
            raise VolumeFailed(f"volume is read-only after an I/O failure: {self.failed}")
        try:
            nbytes = self.samlog.append(txn)
            self.samlog.sync()
        except OSError as exc:
            self._fail(f"cannot append to the SAM log: {exc.strerror or exc}")
        try:
            self._write_in_place(txn.runs)
        except OSError as exc:
            # The transaction is durable in the log; recovery will write it in place.
            self._fail(f"cannot write the block file: {exc.strerror or exc}")
        self._log_bytes_since_checkpoint += nbytes
        self._persisted_seq = txn.seq
        return nbytes

    def finish(self, txn: Transaction) -> None:
        """Back in the volume's thread after ``persist``: publish the commit."""
        done, _ = self._sealed.pop(0)
        assert done is txn, "transactions finished out of order"
        self._last_seq = txn.seq
        for callback in self.on_commit:
            callback(txn)
        self._maybe_checkpoint()

    def _fail(self, why: str) -> None:
        # Reads keep seeing the open transaction (the fs caches agree with it); every later
        # change is refused. Remounting recovers to the last committed transaction.
        self.failed = why
        log.error("%s: %s; the volume is now read-only", self.path, why)
        raise VolumeFailed(why)

    def _write_in_place(self, runs: list[tuple[int, bytes]]) -> None:
        """The only code that writes the block file."""
        for start, data in runs:
            self.device.write(start, data)

    # -- the target side: receive shipped records, apply them in order
    @property
    def received_seq(self) -> int:
        """Last sequence number durable in this node's log (>= ``last_seq`` = applied)."""
        return max(self.samlog.last_seq, self._last_seq)

    @property
    def consistent(self) -> bool:
        """False while an initial sync is filling the block file."""
        st = self.state
        return not st.sync_state and self._last_seq >= st.consistent_at

    def receive(self, seq: int, record_bytes: bytes) -> Transaction:
        """Validate a record shipped by the source, append it to the log and fsync it.

        The transaction is not applied yet (``apply``); it is durable here, so it can be
        acknowledged as received. Raises LogError when it does not follow what this node has.
        """
        if self.failed:
            raise VolumeFailed(f"volume is read-only after an I/O failure: {self.failed}")
        txn = self.check_record(seq, record_bytes, expect=self.received_seq + 1)
        try:
            self.samlog.append_encoded(seq, record_bytes)
            self.samlog.sync()
        except OSError as exc:
            self._fail(f"cannot append to the SAM log: {exc.strerror or exc}")
        self._log_bytes_since_checkpoint += len(record_bytes)
        return txn

    def check_record(self, seq: int, record_bytes: bytes, *, expect: int) -> Transaction:
        """Decode a shipped record and check that it is seq ``expect`` and fits this volume."""
        txn = record.decode_txn(record_bytes, block_size=self.block_size)
        if txn.seq != seq or seq != expect:
            raise LogError(f"out of sequence: got seq {txn.seq}, expected {expect}", seq=txn.seq)
        if txn.epoch < self.state.epoch:
            raise LogError(
                f"seq {seq} belongs to epoch {txn.epoch}, older than this node's epoch "
                f"{self.state.epoch}",
                seq=seq,
            )
        for start, data in txn.runs:
            if start + len(data) // self.block_size > self.block_count:
                raise LogError(f"seq {seq} writes past the end of the volume", seq=seq)
        return txn

    def apply(self, txn: Transaction) -> None:
        """Write a received transaction in place (the next one in order)."""
        if txn.seq != self._last_seq + 1:
            raise LogError(f"apply out of order: seq {txn.seq} after {self._last_seq}")
        if self._overlay or self._hints or self._sealed:
            raise VolumeError("cannot apply shipped transactions over local changes")
        try:
            self._write_in_place(txn.runs)
        except OSError as exc:
            self._fail(f"cannot write the block file: {exc.strerror or exc}")
        self._last_seq = txn.seq
        st = self.state
        if st.sync_state and txn.seq >= st.consistent_at and st.consistent_at:
            # The initial sync is complete once the transactions that overlapped the copy
            # are applied: make the block file durable and say so.
            st.sync_state = ""
            self.checkpoint()
            log.info("%s: replica is consistent at seq %d", self.path, txn.seq)
        else:
            self._maybe_checkpoint()

    def write_sync_blocks(self, start: int, data: bytes) -> None:
        """Store block content copied by an initial sync (only while ``sync_state`` is set).

        These blocks are not transactions: the replica is marked inconsistent until the
        transactions that follow the copy are applied, and a crash restarts the sync.
        """
        if not self.state.sync_state:
            raise VolumeError("initial-sync blocks outside of an initial sync")
        n = len(data) // self.block_size
        if n == 0 or len(data) % self.block_size or start + n > self.block_count or start < 0:
            raise VolumeError(f"bad initial-sync run {start}+{len(data)} bytes")
        self._write_in_place([(start, data)])

    def finish_sync_copy(self, consistent_at: int) -> None:
        """The copy is complete; the replica is consistent once ``consistent_at`` is applied."""
        self.state.consistent_at = consistent_at
        if self._last_seq >= consistent_at:
            self.state.sync_state = ""
        self.device.sync()
        self.state.save(self.path)

    @classmethod
    def create_replica(
        cls,
        path: str,
        *,
        volume_uuid: bytes,
        block_size: int,
        block_count: int,
        start_seq: int,
        epochs: list[list[int]],
    ) -> Volume:
        """Make an empty replica directory for an initial sync and open it.

        The block file starts all zeros; the source sends every block that is not. The log
        starts at ``start_seq + 1``, the first transaction that follows the copy.
        """
        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
        lock_fd = cls._lock(path)
        # Only the volume's own files: the daemon's socket, log and pid file stay.
        cls._wipe(path, only=(BLOCK_FILE, LOG_DIR, NODE_FILE, NODE_FILE + ".tmp"))
        try:
            BlockFile.create(os.path.join(path, BLOCK_FILE), block_count * block_size)
            logdir = os.path.join(path, LOG_DIR)
            SamLog.create(logdir, volume_uuid=volume_uuid, block_size=block_size)
            with SamLog.open(logdir, volume_uuid=volume_uuid, block_size=block_size) as slog:
                slog.reset(start_seq + 1)
            state = NodeState(
                volume_uuid=volume_uuid.hex(),
                block_size=block_size,
                role=Role.TARGET.value,
                epochs=[list(e) for e in epochs],
                checkpointed_seq=start_seq,
                sync_state="full",
                consistent_at=0,
            )
            state.save(path)
            vol = cls._open_locked(
                path,
                lock_fd,
                read_only=False,
                fresh=VolumeSuper(
                    volume_uuid, block_size, block_count, bitmap_blocks_for(block_count, block_size)
                ),
            )
            vol._last_seq = start_seq
            return vol
        except BaseException:
            os.close(lock_fd)
            raise

    # -- the target side: resync (staged, then applied as one group; see store/staging.py)
    def begin_resync(self, start_seq: int, *, rewind: bool = False) -> Stage:
        """A new stage for a resync from ``start_seq`` (S) over this consistent replica (A).

        ``rewind``: this replica diverged from the source (failback): it may hold seqs past S
        that the source never had; the group replaces them (archive them first).
        """
        if not self.consistent or self.failed:
            raise VolumeError("a resync needs a consistent replica")
        if self._overlay or self._hints or self._sealed:
            raise VolumeError("cannot resync a volume with local changes")
        if start_seq < self.received_seq and not rewind:
            raise VolumeError(f"resync from seq {start_seq}, but seq {self.received_seq} is here")
        return Stage.create(
            self.path,
            volume_uuid=self.uuid,
            block_size=self.block_size,
            start_seq=start_seq,
            base_seq=self._last_seq,
        )

    def stage_blocks(self, stage: Stage, first: int, nblocks: int, data: bytes, *, lz4: bool):
        """Stage block images of a resync (nothing reaches the block file yet)."""
        if first < 0 or nblocks < 1 or first + nblocks > self.block_count:
            raise VolumeError(f"resync run {first}+{nblocks} outside the volume")
        stage.append_blocks(first, nblocks, data, lz4=lz4)

    def stage_txn(self, stage: Stage, seq: int, record_bytes: bytes) -> Transaction:
        """Validate and stage transaction ``seq`` of a resync (not logged, not applied yet)."""
        txn = self.check_record(seq, record_bytes, expect=stage.last_seq + 1)
        stage.append_txn(seq, record_bytes)
        return txn

    def commit_resync(
        self, stage: Stage, end_seq: int, *, epochs: list[list[int]] | None = None
    ) -> ResyncResult:
        """Apply a complete stage (blocks, then S+1..T) as one group; synchronous.

        The block file is made durable at A and node.json records the group first: from
        then on a crash is finished by ``Volume.open`` (``_redo_resync``, idempotent); before
        it, the stage is discarded at the next open and the replica stays at A. ``epochs``
        (a failback's rewind): the source's epoch history, adopted in that same record.
        """
        if stage.last_seq != end_seq:
            raise VolumeError(f"resync stage holds seq {stage.last_seq}, not {end_seq}")
        stage.sync()
        stage.close()
        self.device.sync()  # the old log is about to go: A must not depend on it
        st = self.state
        st.checkpointed_seq = self._last_seq
        st.resync = {"start_seq": stage.start_seq, "consistent_at": end_seq, "stage": stage.name}
        if epochs is not None:
            # The diverged seqs are archived (or said lost) by now; the log is about to go.
            st.epochs = [list(e) for e in epochs]
            st.keep_log_from = 0
        st.save(self.path)
        try:
            return self._redo_resync()
        except (OSError, LogError, VolumeError) as exc:
            # Half applied in memory: take nothing more; reopening finishes the group.
            self._fail(f"resync group interrupted: {exc} (reopen the volume to finish it)")
            raise AssertionError("unreachable")

    def _redo_resync(self) -> ResyncResult:
        """Write the recorded stage's blocks, restart the log at S+1 with S+1..T, apply them."""
        st = self.state
        info = st.resync or {}
        start, end = int(info["start_seq"]), int(info["consistent_at"])
        vuuid = bytes.fromhex(st.volume_uuid)  # (the superblock may not be read yet)
        stage = Stage.open(self.path, info["stage"], volume_uuid=vuuid, block_size=st.block_size)
        out = ResyncResult(start, end)
        try:
            for item in stage.records():  # blocks first (a stage may interleave them)
                if isinstance(item, StagedBlocks):
                    self._write_in_place([(item.first_block, item.data)])
                    out.blocks += len(item.data) // st.block_size
            self.samlog.reset(start + 1)
            for item in stage.records():
                if isinstance(item, StagedTxn):
                    self.samlog.append_encoded(item.seq, item.record)
                    txn = record.decode_txn(item.record, block_size=st.block_size)
                    self._write_in_place(txn.runs)
                    out.txns += 1
                    out.hints.extend(txn.hints)
            if stage.last_seq != end:
                raise VolumeError(f"{stage.path}: holds seq {stage.last_seq}, not {end}")
            self.samlog.sync()
            self.device.sync()
        finally:
            stage.close()
        self._last_seq = end
        st.checkpointed_seq = end
        st.resync = None
        st.save(self.path)
        stage.discard()
        remove_stages(self.path)
        self._last_checkpoint = time.monotonic()
        self._log_bytes_since_checkpoint = 0
        if hasattr(self, "allocator"):  # (not yet when Volume.open redoes the group)
            self.allocator.reload()
        log.info(
            "%s: resync group applied: %d block(s) and seq %d..%d; consistent at seq %d",
            self.path,
            out.blocks,
            start + 1,
            end,
            end,
        )
        return out

    def adopt_epochs(self, epochs: list[list[int]]) -> None:
        """Take a source's epoch history (this replica is behind the fork: nothing diverged)."""
        st = self.state
        new = [list(map(int, e)) for e in epochs]
        if new == st.epochs and not st.keep_log_from:
            return
        log.info("%s: epoch history %s -> %s", self.path, st.epochs, new)
        st.epochs = new
        st.keep_log_from = 0
        st.save(self.path)

    def reload_geometry(self) -> None:
        """Re-read the superblock and the allocator after blocks arrived from elsewhere."""
        self.sb = VolumeSuper.unpack(self.device.read(0, 1), self.device.path)
        self._load_allocator()

    # -- checkpoints
    def _maybe_checkpoint(self) -> None:
        # Not while a persist may be running in a worker thread: it owns the log then.
        if self.failed or self.read_only or self._sealed:
            return
        if self.state.checkpointed_seq == self._last_seq:
            return
        if (
            self._log_bytes_since_checkpoint >= self.checkpoint_bytes
            or time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds
        ):
            self.checkpoint()

    def checkpoint(self) -> None:
        """Make the block file durable up to the last commit and retire log segments.

        Must not run while a ``persist`` is in flight in another thread (it owns the log).
        """
        if self.failed or self._sealed:
            return
        if self.state.checkpointed_seq != self._last_seq:
            self.device.sync()
            self.state.checkpointed_seq = self._last_seq
            self.state.save(self.path)
        self._last_checkpoint = time.monotonic()
        self._log_bytes_since_checkpoint = 0
        keep = self.retain_from()
        upto = self.state.checkpointed_seq
        if keep is not None:
            upto = min(upto, keep - 1)
        if self.state.keep_log_from:  # a demoted source: its diverged seqs may be needed
            upto = min(upto, self.state.keep_log_from - 1)
        if upto > 0:
            self.samlog.retire(upto)

    def close(self) -> None:
        """Commit what is open, checkpoint, release the lock."""
        if self._lock_fd < 0:
            return
        try:
            if not self.failed:
                self.commit()  # drains sealed transactions first
                self.checkpoint()
        finally:
            self.samlog.close()
            self.device.close()
            os.close(self._lock_fd)
            self._lock_fd = -1
