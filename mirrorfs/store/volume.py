"""The volume: a directory holding the block file, the SAM log and node-local state.

Directory layout (names in ``store/files.py``)::

    DIR/blocks      the block file (fixed size, sparse when created); nothing node-specific
    DIR/log/        the SAM log segments (mirrorfs.store.samlog)
    DIR/node.json   node-local state (mirrorfs.store.nodestate)
    DIR/lock        flock'ed by the process that has the volume open

The block file's layout (superblock, client superblock, bitmap) is ``store/geometry.py``.

An open ``Volume`` is assembled from parts, one module each:

- ``store/core.py``       ``VolumeCore``: files, condition, the write choke point
                          (``read``/``write``/``hint``, ``write_in_place``);
- ``store/writepath.py``  ``vol.writer``: the source's seal/persist/finish, commit
                          listeners, the write gate; group commit is ``store/committer.py``;
- ``store/applypath.py``  ``vol.applier``: the target's receive/apply, initial sync,
                          staged resync, epochs;
- ``store/checkpoint.py`` ``vol.checkpointer``: when to checkpoint, log retention.

This module is the lifecycle: create, open (lock, log recovery, replay), close.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass

from mirrorfs.store.allocator import ExtentAllocator
from mirrorfs.store.applypath import ApplyPath, ResyncResult, prepare_replica
from mirrorfs.store.checkpoint import Checkpointer
from mirrorfs.store.core import VolumeCondition, VolumeCore, VolumeFlag
from mirrorfs.store.device import BlockFile
from mirrorfs.store.errors import VolumeError, VolumeLocked
from mirrorfs.store.files import BLOCK_FILE, LOCK_FILE, LOG_DIR, NODE_FILE
from mirrorfs.store.geometry import (
    BITMAP_START,
    BLOCK_SIZES,
    CLIENT_SUPER,
    MIN_BLOCKS,
    VolumeSuper,
)
from mirrorfs.store.holes import accept_loss, checkpoint_hole
from mirrorfs.store.nodestate import NodeState
from mirrorfs.store.samlog import SamLog
from mirrorfs.store.snapshot_writer import VolumeCheckpoints
from mirrorfs.store.snapshots import (
    CheckpointError,
    CheckpointInfo,
    CheckpointView,
    SaveLayout,
    chain_map,
    save_area_blocks_for,
)
from mirrorfs.store.staging import remove_stages
from mirrorfs.store.txn import Hint
from mirrorfs.store.writepath import WritePath

log = logging.getLogger(__name__)

__all__ = [
    "BITMAP_START",
    "BLOCK_SIZES",
    "CLIENT_SUPER",
    "MIN_BLOCKS",
    "ReplayReport",
    "ResyncResult",
    "Volume",
    "VolumeCondition",
    "VolumeFlag",
    "VolumeSuper",
]


@dataclass(slots=True)
class ReplayReport:
    """What ``Volume.open`` did to bring the block file to the log: the transactions it
    replayed in place, and what the SAM log's own recovery said (``log_note``)."""

    replayed: int = 0
    first_seq: int = 0
    last_seq: int = 0
    log_note: str = ""
    in_memory: bool = False  # a read-only open: replayed for reads, the block file untouched

    def describe(self) -> str:
        """One line for humans; "clean" when nothing was done."""
        parts = []
        if self.replayed:
            where = " in memory (read-only)" if self.in_memory else ""
            parts.append(
                f"replayed {self.replayed} transaction(s) seq {self.first_seq}..{self.last_seq}"
                f"{where}"
            )
        if self.log_note:
            parts.append(self.log_note)
        return "; ".join(parts) if parts else "clean"


class Volume(VolumeCore):
    """An open volume. Create with ``Volume.create``, open with ``Volume.open``.

    ``writer`` (source), ``applier`` (target) and ``checkpointer`` are its parts; see the
    module docstring.
    """

    def __init__(
        self,
        path: str,
        *,
        read_only: bool,
        state: NodeState,
        samlog: SamLog,
        device: BlockFile,
        lock_fd: int,
    ) -> None:  # use Volume.open
        super().__init__(
            path, read_only=read_only, state=state, samlog=samlog, device=device, lock_fd=lock_fd
        )
        self.recovery = ReplayReport()
        self.checkpointer = Checkpointer(self)
        self.writer = WritePath(self, self.checkpointer)
        self.applier = ApplyPath(self, self.checkpointer)

    @property
    def pending_bytes(self) -> int:
        """Bytes in the open transaction plus those sealed but not yet persisted."""
        return self.writer.pending_bytes

    # -- creation
    @classmethod
    def create(
        cls,
        path: str,
        size_bytes: int,
        *,
        block_size: int = 4096,
        force: bool = False,
        checkpoint_space: float = 0.0,
    ) -> None:
        """Make a new volume directory at ``path`` (refuses an existing volume unless force).

        Every block of a new volume reads as zeros (a fresh sparse file); formatting relies
        on that instead of writing zero blocks. ``checkpoint_space`` is the fraction of the
        volume reserved as the checkpoint save area (0: the volume takes no checkpoints).
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
            sb = VolumeSuper.new(vuuid, block_size, block_count)
            save = save_area_blocks_for(block_count, checkpoint_space)
            if save:
                sb.save_area_start, sb.save_area_blocks = BITMAP_START + sb.bitmap_blocks, save
                if SaveLayout.of(sb) is None or save > block_count // 2:
                    raise VolumeError("checkpoint space must be a small part of the volume")
            vol = cls._open_locked(path, lock_fd, read_only=False, fresh=sb)
            vol.write(0, sb.pack())
            reserved = BITMAP_START + sb.bitmap_blocks + sb.save_area_blocks
            ExtentAllocator.format(vol, BITMAP_START, block_count, used=[(0, reserved)])
            vol.commit()
            vol.load_allocator()
            vol.close()
            lock_fd = -1  # closed by vol.close()
        finally:
            if lock_fd >= 0:
                os.close(lock_fd)

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

        See ``applypath.prepare_replica``; the allocator is loaded by
        ``applier.reload_geometry`` once the copy is complete.
        """
        path = os.path.abspath(path)
        os.makedirs(path, exist_ok=True)
        lock_fd = cls._lock(path)
        # Only the volume's own files: the daemon's socket, log and pid file stay.
        cls._wipe(path, only=(BLOCK_FILE, LOG_DIR, NODE_FILE, NODE_FILE + ".tmp"))
        try:
            prepare_replica(
                path,
                volume_uuid=volume_uuid,
                block_size=block_size,
                block_count=block_count,
                start_seq=start_seq,
                epochs=epochs,
            )
            fresh = VolumeSuper.new(volume_uuid, block_size, block_count)
            vol = cls._open_locked(path, lock_fd, read_only=False, fresh=fresh)
            vol._last_seq = start_seq
            return vol
        except BaseException:
            os.close(lock_fd)
            raise

    @staticmethod
    def _wipe(path: str, only: tuple[str, ...] | None = None) -> None:
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
        if not os.path.exists(os.path.join(path, NODE_FILE)):
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
        state = NodeState.load(path)
        vuuid = bytes.fromhex(state.volume_uuid)
        bs = state.block_size
        # Read-only (a check that must not write): the log is validated without being
        # changed, and the replay below goes to memory, not to the block file.
        samlog = SamLog.open(
            os.path.join(path, LOG_DIR),
            volume_uuid=vuuid,
            block_size=bs,
            repair=repair_log and not read_only,
            look_only=read_only,
        )
        loss_note = ""
        if fresh is None:
            hole = checkpoint_hole(state, samlog)
            if hole is not None and not (repair_log and not read_only):
                samlog.close()
                raise hole
            if not read_only:
                loss_note = accept_loss(path, state, samlog)
        block_file = os.path.join(path, BLOCK_FILE)
        size = os.path.getsize(block_file) if os.path.exists(block_file) else -1
        if size <= 0 or size % bs:
            samlog.close()
            raise VolumeError(f"{block_file}: missing or has a bad size")
        device = BlockFile(block_file, bs, size // bs, read_only=read_only)
        vol = cls(
            path, read_only=read_only, state=state, samlog=samlog, device=device, lock_fd=lock_fd
        )
        note = samlog.recovery_report.describe()
        if note and note != "clean":
            vol.recovery.log_note = note + (f"; {loss_note}" if loss_note else "")
        if fresh is not None:
            vol.sb = fresh
            return vol
        if state.resync and read_only:
            vol.close()
            raise VolumeError(
                f"{path}: a resync group was being applied when the node stopped; it is "
                "finished at the next read-write open (mount, or fsck --repair)"
            )
        if state.resync:
            vol.applier.redo_resync()  # a resync group was being applied: finish it first
        else:
            if not read_only:
                remove_stages(path)  # a resync that never reached its group: discarded
            vol._replay()
        vol.sb = VolumeSuper.unpack(device.read(0, 1), block_file)
        if vol.sb.uuid != vuuid or vol.sb.block_size != bs:
            raise VolumeError(f"{path}: block file belongs to another volume than node.json")
        if vol.sb.block_count != device.block_count:
            raise VolumeError(f"{block_file}: size does not match the superblock")
        vol.load_allocator()
        if vol.recovery.replayed or vol.recovery.log_note:
            log.warning("%s: recovery: %s", path, vol.recovery.describe())
        return vol

    def _replay(self) -> None:
        """Write in place every logged transaction past the checkpoint (idempotent)."""
        start = self.state.checkpointed_seq + 1
        if self.samlog.last_seq < start:
            return
        rep = self.recovery
        rep.in_memory = self.read_only
        for txn in self.samlog.scan(start):
            if self.read_only:
                self.defer_in_place(txn.seq, txn.runs)  # seen by reads, never written
            else:
                self.write_in_place(txn.runs)
            if not rep.replayed:
                rep.first_seq = txn.seq
            rep.replayed += 1
            rep.last_seq = txn.seq
        if rep.replayed and not self.read_only:
            self.device.sync()
            self.state.checkpointed_seq = rep.last_seq
            self.state.save(self.path)

    # -- the volume's own commit and checkpoint (the write path does the work)
    def commit(self, *, sync: bool = True) -> int | None:
        """Seal the open transaction: log it, fsync the log, then write it in place.

        Returns its sequence number, or None if there was nothing to commit. The log is
        always fsynced before the in-place write (write-ahead), whatever ``sync`` says; the
        parameter is kept for callers that want to state their intent. This is
        ``writer.seal``, ``persist`` and ``finish`` in a row; the mount runs ``persist`` in
        a worker thread (``store/committer.py``).
        """
        return self.writer.commit()

    def checkpoint(self) -> None:
        """Make the block file durable up to the last commit and retire log segments."""
        self.checkpointer.checkpoint()

    # -- checkpoints (snapshots: store/snapshots.py), for a volume not being served
    def checkpoint_create(self, name: str) -> CheckpointInfo:
        """Commit, then make checkpoint ``name`` of that state as its own transaction.

        The block file is brought up to date before and after (see INTERNALS.md: a reader
        in another process must find every block of the checkpoint in place once it can
        see the checkpoint's table record)."""
        snaps = self._snapshots()
        self.commit()
        self.flush_in_place()
        info = snaps.create(name)
        self.commit()
        self.flush_in_place()
        return info

    def checkpoint_delete(self, name: str) -> int:
        """Delete checkpoint ``name`` as a transaction; the blocks freed (save slots and data)."""
        snaps = self._snapshots()
        snaps.find(name)
        self.commit()
        freed = snaps.delete(name)
        self.commit()
        self.flush_in_place()
        return freed

    def checkpoint_rollback(
        self,
        name: str,
        *,
        delete_later: bool = False,
        hints: Callable[[bytes, list[int]], list[Hint]] | None = None,
    ) -> int:
        """Return the volume to checkpoint ``name``, as ONE transaction: every block the
        checkpoint saved gets its saved content back, block 1 its frozen copy (so the block
        bitmap too: what was allocated since is free again). Later checkpoints are kept
        (their own saves are made as for any write) unless ``delete_later``. ``hints(fs
        superblock, blocks)`` names the inodes the rewritten blocks hold, for the targets'
        caches. Returns the number of blocks rewritten."""
        snaps = self._snapshots()
        info = snaps.find(name)
        self.commit()
        if delete_later:
            for later in reversed([c for c in snaps.checkpoints if c.id > info.id]):
                snaps.delete(later.name)
                self.commit()
        view = self.checkpoint_view(name)
        blocks = sorted(chain_map(snaps.entries, info.id))
        for block in blocks:
            self.write(block, view.read(block, 1))
        frozen = view.read(CLIENT_SUPER, 1)
        self.write(CLIENT_SUPER, frozen)
        for h in hints(frozen, blocks) if hints is not None else ():
            self.hint(h)
        self.commit()
        self.flush_in_place()
        self.load_allocator()  # the bitmap was rewritten underneath the allocator
        log.info("rolled back to checkpoint %r (seq %d): %d blocks", name, info.seq, len(blocks))
        return len(blocks) + 1

    def checkpoint_view(self, name: str) -> CheckpointView:
        """Checkpoint ``name`` as a read-only block store over this open volume."""
        snaps = self.snapshots

        def read(block: int, count: int) -> bytes:
            if snaps is not None:
                snaps.flush_pending()  # the map as it is now, open transaction included
            return self.read(block, count)

        return CheckpointView(read, self.sb, name)

    def _snapshots(self) -> VolumeCheckpoints:
        if self.read_only or self.state.role != "source":
            raise CheckpointError(f"{self.path}: checkpoints are made and deleted on the source")
        assert self.snapshots is not None
        return self.snapshots

    def close(self) -> None:
        """Commit what is open, checkpoint, release the lock."""
        if self._lock_fd < 0:
            return
        try:
            if not self.failed and not self.read_only:
                self.commit()  # drains sealed transactions first
                self.checkpoint()
        finally:
            self.samlog.close()
            self.device.close()
            os.close(self._lock_fd)
            self._lock_fd = -1
