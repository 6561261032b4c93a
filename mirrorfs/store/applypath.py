"""The target's apply path: receive, apply, initial sync, staged resync, epochs.

A target takes transactions shipped by its source, in order:

``receive``  validate the record ONCE (``check_record``: it decodes, is the next seq, not
             of an older epoch, inside the volume), append those very bytes to the SAM log
             (``SamLog.append_validated``: no second decode) and fsync; it can be acked as
             received.
``apply``    write it in place (the next one in order), keep the allocator in step with
             the bitmap blocks it wrote, maybe checkpoint; it can be acked as applied.
             When a flusher runs on this volume (``store/flusher.py``, started by the
             daemon), the in-place write is deferred like the source's: reads (and the
             read-only mount) see it at once, whole; the flusher writes it later.

Every caller (the receiver, ``promote``'s apply of what is logged) gets the allocator kept
right here, so nothing above needs to know the bitmap layout.

An empty target gets an initial sync: ``prepare_replica`` (through
``Volume.create_replica``) makes the directory, ``write_sync_blocks`` stores the copied
blocks, ``finish_sync_copy`` records where the replica becomes consistent, and
``reload_geometry`` reads the superblock and the allocator the copy brought.

A target that fell behind the source's log gets a staged resync (``store/staging.py``):
``begin_resync`` / ``stage_blocks`` / ``stage_txn`` collect it, ``commit_resync`` applies the
group in one synchronous step; ``redo_resync`` finishes a group interrupted by a crash (at
``Volume.open``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from mirrorfs.store import record
from mirrorfs.store.checkpoint import Checkpointer
from mirrorfs.store.core import VolumeCore
from mirrorfs.store.device import BlockFile
from mirrorfs.store.errors import LogError, VolumeError
from mirrorfs.store.files import BLOCK_FILE, LOG_DIR
from mirrorfs.store.geometry import VolumeSuper
from mirrorfs.store.nodestate import NodeState, Role
from mirrorfs.store.samlog import SamLog
from mirrorfs.store.staging import Stage, StagedBlocks, StagedTxn, remove_stages
from mirrorfs.store.txn import Hint, Transaction

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ResyncResult:
    """What ``commit_resync`` applied: blocks written, transactions S+1..T and their hints."""

    start_seq: int
    end_seq: int
    blocks: int = 0
    txns: int = 0
    hints: list[Hint] = field(default_factory=list)


def prepare_replica(
    path: str,
    *,
    volume_uuid: bytes,
    block_size: int,
    block_count: int,
    start_seq: int,
    epochs: list[list[int]],
) -> None:
    """Make the files of an empty replica for an initial sync (the caller holds the lock).

    The block file starts all zeros; the source sends every block that is not. The log
    starts at ``start_seq + 1``, the first transaction that follows the copy.
    """
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


class ApplyPath:
    """Receive and apply shipped transactions; initial sync and resync (module doc)."""

    def __init__(self, volume: VolumeCore, checkpointer: Checkpointer) -> None:
        self.volume = volume
        self.checkpointer = checkpointer

    # -- streaming: receive, apply
    def check_record(self, seq: int, record_bytes: bytes, *, expect: int) -> Transaction:
        """Decode a shipped record and check that it is seq ``expect`` and fits this volume."""
        vol = self.volume
        txn = record.decode_txn(record_bytes, block_size=vol.block_size)
        if txn.seq != seq or seq != expect:
            raise LogError(f"out of sequence: got seq {txn.seq}, expected {expect}", seq=txn.seq)
        if txn.epoch < vol.state.epoch:
            raise LogError(
                f"seq {seq} belongs to epoch {txn.epoch}, older than this node's epoch "
                f"{vol.state.epoch}",
                seq=seq,
            )
        for start, data in txn.runs:
            if start + len(data) // vol.block_size > vol.block_count:
                raise LogError(f"seq {seq} writes past the end of the volume", seq=seq)
        return txn

    def receive(self, seq: int, record_bytes: bytes, *, sync: bool = True) -> Transaction:
        """Validate a record shipped by the source, append it to the log and fsync it.

        The transaction is not applied yet (``apply``); it is durable here, so it can be
        acknowledged as received. Raises LogError when it does not follow what this node has.
        ``sync=False`` (a group of records, mirrorfs.repl.replica_store): appended only; it is
        durable, and may be acknowledged, once ``sync_log`` returned.
        """
        vol = self.volume
        vol.check_usable()
        txn = self.check_record(seq, record_bytes, expect=vol.received_seq + 1)
        try:
            vol.samlog.append_validated(txn, record_bytes)
            if sync:
                vol.samlog.sync()
        except OSError as exc:
            vol.fail(f"cannot append to the SAM log: {exc.strerror or exc}")
        self.checkpointer.note_logged(len(record_bytes))
        return txn

    def sync_log(self) -> None:
        """Make every record appended by ``receive(..., sync=False)`` durable (one fsync)."""
        vol = self.volume
        try:
            vol.samlog.sync()
        except OSError as exc:
            vol.fail(f"cannot fsync the SAM log: {exc.strerror or exc}")

    def apply(self, txn: Transaction, *, checkpoint: bool = True) -> None:
        """Write a received transaction in place (the next one in order), allocator too.

        ``checkpoint=False``: no periodic checkpoint here (the caller runs them where the
        log is not being appended to by another thread); the one that marks the end of an
        initial sync still runs.
        """
        vol = self.volume
        if txn.seq != vol.last_seq + 1:
            raise LogError(f"apply out of order: seq {txn.seq} after {vol.last_seq}")
        if vol.has_local_changes:
            raise VolumeError("cannot apply shipped transactions over local changes")
        if vol.device.driven:
            # A flusher runs (store/flusher.py): defer, in one synchronous step, so that a
            # reader of the read-only mount sees the whole transaction or none of it.
            vol.defer_in_place(txn.seq, txn.runs)
        else:
            try:
                vol.write_in_place(txn.runs)
            except OSError as exc:
                vol.fail(f"cannot write the block file: {exc.strerror or exc}")
        vol._last_seq = txn.seq
        vol.refresh_allocator(txn.runs)
        st = vol.state
        if st.sync_state and txn.seq >= st.consistent_at and st.consistent_at:
            # The initial sync is complete once the transactions that overlapped the copy
            # are applied: make the block file durable and say so.
            st.sync_state = ""
            self.checkpointer.checkpoint()
            log.info("%s: replica is consistent at seq %d", vol.path, txn.seq)
        elif checkpoint:
            self.checkpointer.maybe_checkpoint()

    # -- initial sync
    def write_sync_blocks(self, start: int, data: bytes) -> None:
        """Store block content copied by an initial sync (only while ``sync_state`` is set).

        These blocks are not transactions: the replica is marked inconsistent until the
        transactions that follow the copy are applied, and a crash restarts the sync.
        """
        vol = self.volume
        if not vol.state.sync_state:
            raise VolumeError("initial-sync blocks outside of an initial sync")
        n = len(data) // vol.block_size
        if n == 0 or len(data) % vol.block_size or start + n > vol.block_count or start < 0:
            raise VolumeError(f"bad initial-sync run {start}+{len(data)} bytes")
        vol.write_in_place([(start, data)])

    def finish_sync_copy(self, consistent_at: int) -> None:
        """The copy is complete; the replica is consistent once ``consistent_at`` is applied."""
        vol = self.volume
        vol.state.consistent_at = consistent_at
        if vol.last_seq >= consistent_at:
            vol.state.sync_state = ""
        vol.device.sync()
        vol.state.save(vol.path)

    def reload_geometry(self) -> None:
        """Re-read the superblock and the allocator after blocks arrived from elsewhere."""
        vol = self.volume
        vol.sb = VolumeSuper.unpack(vol.device.read(0, 1), vol.device.path)
        vol.load_allocator()

    def adopt_epochs(self, epochs: list[list[int]]) -> None:
        """Take a source's epoch history (this replica is behind the fork: nothing diverged)."""
        vol = self.volume
        st = vol.state
        new = [list(map(int, e)) for e in epochs]
        if new == st.epochs and not st.keep_log_from:
            return
        log.info("%s: epoch history %s -> %s", vol.path, st.epochs, new)
        st.epochs = new
        st.keep_log_from = 0
        st.save(vol.path)

    # -- resync (staged, then applied as one group; see store/staging.py)
    def begin_resync(self, start_seq: int, *, rewind: bool = False) -> Stage:
        """A new stage for a resync from ``start_seq`` (S) over this consistent replica (A).

        ``rewind``: this replica diverged from the source (failback): it may hold seqs past S
        that the source never had; the group replaces them (archive them first).
        """
        vol = self.volume
        if not vol.consistent or vol.failed:
            raise VolumeError("a resync needs a consistent replica")
        if vol.has_local_changes:
            raise VolumeError("cannot resync a volume with local changes")
        if start_seq < vol.received_seq and not rewind:
            raise VolumeError(f"resync from seq {start_seq}, but seq {vol.received_seq} is here")
        return Stage.create(
            vol.path,
            volume_uuid=vol.uuid,
            block_size=vol.block_size,
            start_seq=start_seq,
            base_seq=vol.last_seq,
        )

    def stage_blocks(self, stage: Stage, first: int, nblocks: int, data: bytes, *, lz4: bool):
        """Stage block images of a resync (nothing reaches the block file yet)."""
        if first < 0 or nblocks < 1 or first + nblocks > self.volume.block_count:
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
        then on a crash is finished by ``Volume.open`` (``redo_resync``, idempotent); before
        it, the stage is discarded at the next open and the replica stays at A. ``epochs``
        (a failback's rewind): the source's epoch history, adopted in that same record.
        """
        vol = self.volume
        if stage.last_seq != end_seq:
            raise VolumeError(f"resync stage holds seq {stage.last_seq}, not {end_seq}")
        stage.sync()
        stage.close()
        vol.device.sync()  # the old log is about to go: A must not depend on it
        st = vol.state
        st.checkpointed_seq = vol.last_seq
        st.resync = {"start_seq": stage.start_seq, "consistent_at": end_seq, "stage": stage.name}
        if epochs is not None:
            # The diverged seqs are archived (or said lost) by now; the log is about to go.
            st.epochs = [list(e) for e in epochs]
            st.keep_log_from = 0
        st.save(vol.path)
        try:
            return self.redo_resync()
        except (OSError, LogError, VolumeError) as exc:
            # Half applied in memory: take nothing more; reopening finishes the group.
            vol.fail(f"resync group interrupted: {exc} (reopen the volume to finish it)")
            raise AssertionError("unreachable") from None

    def redo_resync(self) -> ResyncResult:
        """Write the recorded stage's blocks, restart the log at S+1 with S+1..T, apply them.

        Idempotent; also run by ``Volume.open`` before the superblock is read.
        """
        vol = self.volume
        st = vol.state
        info = st.resync or {}
        start, end = int(info["start_seq"]), int(info["consistent_at"])
        vuuid = bytes.fromhex(st.volume_uuid)  # (the superblock may not be read yet)
        stage = Stage.open(vol.path, info["stage"], volume_uuid=vuuid, block_size=st.block_size)
        out = ResyncResult(start, end)
        try:
            for item in stage.records():  # blocks first (a stage may interleave them)
                if isinstance(item, StagedBlocks):
                    vol.write_in_place([(item.first_block, item.data)])
                    out.blocks += len(item.data) // st.block_size
            vol.samlog.reset(start + 1)
            for item in stage.records():
                if isinstance(item, StagedTxn):
                    vol.samlog.append_encoded(item.seq, item.record)
                    txn = record.decode_txn(item.record, block_size=st.block_size)
                    vol.write_in_place(txn.runs)
                    out.txns += 1
                    out.hints.extend(txn.hints)
            if stage.last_seq != end:
                raise VolumeError(f"{stage.path}: holds seq {stage.last_seq}, not {end}")
            vol.samlog.sync()
            vol.device.sync()
        finally:
            stage.close()
        vol._last_seq = end
        st.checkpointed_seq = end
        st.resync = None
        st.save(vol.path)
        stage.discard()
        remove_stages(vol.path)
        self.checkpointer.restart_clock()
        if hasattr(vol, "allocator"):  # (not yet when Volume.open redoes the group)
            vol.allocator.reload()
        if vol.snapshots is not None:
            vol.snapshots.stale = True  # the save area may have changed too
        log.info(
            "%s: resync group applied: %d block(s) and seq %d..%d; consistent at seq %d",
            vol.path,
            out.blocks,
            start + 1,
            end,
            end,
        )
        return out
