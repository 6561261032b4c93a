"""The target session's store: a replica Volume behind ``TargetStore`` (the one place where
the target's replication code calls into the Volume).

``ReplicaStore`` belongs to one target volume directory and lives across sessions: it holds
the volume (None while the directory is empty, replaced by an initial sync), the hooks of
the layers above, and what the status reports of the last initial sync and resync.

Streaming TXNs go through three stages (driven by mirrorfs.repl.receiver):

``receive_apply``  (trio thread, what the session machine calls) takes TXN seq into the
                   group being collected (``self.group``, mirrorfs.repl.replica_log); only
                   its sequence number is checked here.
``GroupLog.log``   (a worker thread, under the receiver's ``CapacityLimiter(1)``, which
                   also serializes checkpoints, so one thread at a time owns the SAM log)
                   validates each record once, appends it, then ONE fsync for the group.
                   Only then ``GroupLog.logged`` moves the received position that ACKs
                   report (``positions``): nothing is acknowledged as received before its
                   fsync returned.
``apply_step``     (trio thread, synchronous) applies whole transactions in place, several
                   per step up to a byte budget, and calls ``on_applied`` for each in that
                   same step, with no await in between: a FUSE request on the read-only
                   mount (served by the same loop) sees the replica before or after each
                   whole transaction, never in between, and never new blocks through old
                   caches.

Applying overlaps logging: the in-place writes of group N (trio thread) run while the
worker thread appends and fsyncs group N+1. That is safe because they touch different
things: the thread touches the SAM log (and reads the volume's geometry and epoch, which do
not change while streaming), the apply step touches the block file, the allocator and
``last_seq``. The periodic checkpoint, which fsyncs the block file and retires log
segments, runs in a worker thread under the same limiter (never beside a log append) and
only while nothing is being applied (``last_seq`` stands still during its fsync). The
checkpoint that ends an initial sync runs inside ``apply``: the receiver applies while no
group is being logged as long as the replica is not consistent (``overlap_ok``).

Why the in-place pwrite stays on the trio thread: a reader of the read-only mount reads the
block file directly (``VolumeCore.read``); a pwrite running in a thread while the loop serves
a read would let that read see some blocks of a transaction and not others. Moving it to a
thread needs a layer that reads consult first (the transaction's images, installed in the
same step as ``on_applied`` and dropped after the thread's pwrite returned: then a read sees
the new images whether or not the pwrite reached a block, and old ones never after the
step), i.e. the read path of store/core.py. Each step is bounded instead (``APPLY_STEP_BYTES``,
but always whole transactions), and the loop serves FUSE requests between steps.

A session that ends (a drop, a cut) may leave transactions logged but not applied; ``settle``
applies them from the log at the end of the session, in one step, so the replica is always at
``received_seq`` between sessions, as before. ``commit_resync`` applies the group and calls
``on_resynced`` in one step, so a reader sees A, then T, never a mix.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mirrorfs.repl.fork import judge
from mirrorfs.repl.handshake import Peer
from mirrorfs.repl.initial_sync import check_resume, finish_copy, start_replica
from mirrorfs.repl.replica_log import CheckpointClock, GroupLog
from mirrorfs.repl.resync import TargetResync
from mirrorfs.repl.switchover import switchover_refusal
from mirrorfs.repl.target_session import ResyncStage
from mirrorfs.repl.txn_parts import PartialTxn, take_part
from mirrorfs.repl.verify import range_digests
from mirrorfs.repl.wire import (
    ProtocolError,
    Switchover,
    SwitchoverDone,
    SyncBegin,
    SyncBlocks,
    SyncEnd,
    TxnPart,
)
from mirrorfs.store.nodestate import Role
from mirrorfs.store.txn import Transaction
from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)

OnApplied = Callable[[Transaction], None]
OnVolume = Callable[[Volume], None]
OnSwitchover = Callable[[Switchover], SwitchoverDone]

APPLY_STEP_BYTES = 8 << 20  # in-place bytes per step of the loop (whole transactions)


class ReplicaStore:
    """A ``TargetStore`` over the replica Volume of ``volume_dir`` (module docstring)."""

    def __init__(
        self,
        volume_dir: str,
        volume: Volume | None,
        *,
        node_id: str,
        on_applied: OnApplied | None = None,
        on_consistent: OnVolume | None = None,
        on_created: OnVolume | None = None,
        on_resynced: OnVolume | None = None,
        on_switchover: OnSwitchover | None = None,
    ) -> None:
        self.volume_dir = volume_dir
        self.volume = volume
        self._node_id = node_id
        self.on_applied = on_applied
        self.on_consistent = on_consistent
        self.on_created = on_created
        self.on_resynced = on_resynced
        self.on_switchover = on_switchover
        self.resync: TargetResync | None = None  # the resync being staged
        self.last_resync: dict[str, Any] | None = None  # what the last resync did
        self.sync_blocks_copied = 0
        self.sync_blocks_total = 0
        self.sync_started = 0.0  # time.monotonic() of the last SYNC_BEGIN of a copy
        self.txns_applied = 0  # since the daemon started (metrics)
        self.bytes_applied = 0
        self.resyncs = 0
        self._consistent_reported = volume is not None and volume.consistent
        self.group = GroupLog()  # TXNs taken, logged with one fsync (repl/replica_log.py)
        self.checkpoints = CheckpointClock()
        self.apply_step_bytes = APPLY_STEP_BYTES
        # The parts of a record sent in TXN_PART frames that arrived, kept across sessions
        # (in memory only: mirrorfs.repl.txn_parts says why that is safe).
        self.partial: PartialTxn | None = None
        # The initial-sync copy being made: (source volume uuid, S, block size, block count)
        # and the block it goes on at; in memory only, so a target that restarts (whose copy
        # may have lost unsynced writes) gets a new copy instead of resuming one.
        self.copy_key: tuple[bytes, int, int, int] | None = None
        self.copy_next = 0

    # ------------------------------------------------------------------ what it holds

    @property
    def node_id(self) -> str:
        return self.volume.state.node_id if self.volume is not None else self._node_id

    @property
    def present(self) -> bool:
        return self.volume is not None

    @property
    def empty(self) -> bool:
        """No volume, or an initial-sync copy that is not complete: ask for an initial sync.

        A complete copy (SYNC_END recorded it, fsynced, with T = ``consistent_at``) whose
        replay of S+1..T a cut interrupted is a replica that is not consistent yet: it
        announces its positions and the source streams on from there, instead of copying
        everything again (on a link cut every few hundred KiB, it might never get further).
        """
        vol = self.volume
        return vol is None or bool(vol.state.sync_state and not vol.state.consistent_at)

    @property
    def is_source(self) -> bool:
        return self._vol().state.role != Role.TARGET.value

    @property
    def applied_seq(self) -> int:
        return self._vol().last_seq

    @property
    def block_count(self) -> int:
        return self._vol().block_count

    @property
    def failed(self) -> str:
        vol = self.volume
        return vol.failed if vol is not None and vol.failed else ""

    def _vol(self) -> Volume:
        assert self.volume is not None
        return self.volume

    def handshake_args(self) -> dict[str, Any]:
        """What ``handshake_target`` announces of this replica."""
        vol, empty = self.volume, self.empty
        return {
            "volume_uuid": None if empty or vol is None else vol.uuid,
            "node_id": self.node_id,
            "epochs": [] if empty or vol is None else [tuple(e) for e in vol.state.epochs],
            "received_seq": 0 if empty or vol is None else vol.received_seq,
            "applied_seq": 0 if empty or vol is None else vol.last_seq,
            **dict(zip(("partial_seq", "partial_offset"), self.resume_point(), strict=True)),
            **dict(zip(("copy_seq", "copy_block"), self.copy_resume(), strict=True)),
            "resync": self.resync.resume_point() if self.resync is not None else (0, 0, 0),
        }

    def copy_resume(self) -> tuple[int, int]:
        """(S, B): the unfinished initial-sync copy from S held below block B, to announce;
        (0, 0) if none."""
        vol = self.volume
        if self.copy_key is None or vol is None or not self.empty or not self.copy_next:
            return 0, 0
        return self.copy_key[1], self.copy_next

    def resume_point(self) -> tuple[int, int]:
        """(seq, offset) of the record held in part, to announce; (0, 0) if none. A record
        that the log holds by now is forgotten here."""
        p, vol = self.partial, self.volume
        if p is None:
            return 0, 0
        if vol is None or self.empty or p.seq <= vol.received_seq:
            self.partial = None
            return 0, 0
        return p.seq, p.resume_at

    def take_part(self, part: TxnPart) -> bytes | None:
        """Keep TXN_PART ``part``; the whole record once it is complete (ProtocolError if the
        part does not continue what is held)."""
        self.resume_point()  # (forgets a record the log holds by now)
        self.partial, record = take_part(self.partial, part)
        if record is not None and self.partial is not None:
            log.info(
                "seq %d complete from %d part(s) (%d bytes)",
                part.seq,
                self.partial.parts,
                len(record),
            )
        return record

    def positions(self) -> tuple[int, int]:
        """(received, applied): received is what is durable in the log, never more."""
        vol = self._vol()
        return self.group.received(vol), vol.last_seq

    def status(self) -> dict[str, Any]:
        """The volume's part of the receiver's status."""
        vol = self.volume
        out: dict[str, Any] = {
            "volume_uuid": vol.uuid.hex() if vol is not None and not vol.state.sync_state else "",
            "volume_failed": self.failed,
            "resync": self.resync.as_dict() if self.resync is not None else self.last_resync,
            "archives": list(vol.state.archives) if vol is not None else [],
            "log_kept_from": vol.state.keep_log_from if vol is not None else 0,
        }
        out["txns_applied"], out["bytes_applied"] = self.txns_applied, self.bytes_applied
        out["resyncs"] = self.resyncs
        if self.sync_started:
            out["sync_seconds"] = round(time.monotonic() - self.sync_started, 3)
        if vol is not None and not vol.state.sync_state:
            out["wire_seq"] = self.group.taken(vol)
            out["wire_bytes_pending"] = self.group.pending_bytes
            out["log_bytes"] = vol.samlog.size_bytes
            out["log_first_seq"] = vol.samlog.first_seq
            out["epoch"] = vol.state.epoch
            out["epochs"] = vol.state.epochs
            out["checkpointed_seq"] = vol.state.checkpointed_seq
        p = self.partial
        out["partial"] = {"seq": p.seq, "bytes": p.offset, "total": p.total} if p else None
        return out

    def judge_fork(self, peer: Peer) -> int | None:
        """Compare epoch histories (failback): adopt the source's, or return the fork seq
        after which this replica diverged (it then waits for a rewind resync)."""
        vol = self._vol()
        verdict = judge(peer.epochs, vol.state.epochs, vol.received_seq)
        if verdict.diverged:
            log.warning(
                "source %r: this replica %s; it takes a resync (its own seqs after the fork "
                "are archived first), not transactions",
                peer.node_id,
                verdict.describe(vol.received_seq),
            )
            return verdict.fork_seq
        if verdict.adopt:
            vol.applier.adopt_epochs([list(e) for e in peer.epochs])
        return None

    def digests(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Digests of the block file (run in a worker thread while nothing is applied)."""
        return range_digests(self._vol(), ranges)

    # ------------------------------------------------------------------ streaming

    def receive_apply(self, seq: int, record: bytes) -> None:
        """Take TXN ``seq`` into the group being collected (module docstring): logged by
        ``GroupLog.log``, then applied by ``apply_step``. Raises LogError out of sequence."""
        if self.resync is not None:  # a stage kept for a resume that did not come
            _drop_kept_resync(self, f"the source streams from seq {seq}")
        self.group.take(self._vol(), seq, record)

    @property
    def overlap_ok(self) -> bool:
        """Whether applying may run beside a group being logged (not before the replica is
        consistent: the apply that makes it so checkpoints, which retires log segments)."""
        vol = self.volume
        return vol is not None and vol.consistent

    def apply_step(self, pending: deque[Transaction]) -> int:
        """Apply whole transactions from ``pending`` (durable, in order) in place, up to
        ``apply_step_bytes`` (at least one), and tell the layers above: one step, no await.
        Returns how many."""
        vol, max_bytes = self._vol(), self.apply_step_bytes
        n = size = 0
        while pending and (n == 0 or size < max_bytes):
            txn = pending[0]
            if txn.seq <= vol.last_seq:  # applied already (by ``settle``)
                pending.popleft()
                continue
            vol.applier.apply(txn, checkpoint=False)
            pending.popleft()
            nbytes = sum(len(data) for _, data in txn.runs)
            size += nbytes
            self.txns_applied += 1
            self.bytes_applied += nbytes
            self.checkpoints.applied(nbytes)
            n += 1
            self._notify(txn)
        self._check_consistent(vol)
        return n

    def _notify(self, txn: Transaction) -> None:
        if self.on_applied is not None:
            try:
                self.on_applied(txn)
            except Exception:
                log.exception("on_applied failed for seq %d", txn.seq)

    def settle(self) -> int:
        """The session ended: forget the group not logged, apply what is logged but not
        applied (from the log), in one step. Returns how many were applied."""
        vol = self.volume
        if vol is None or vol.failed or self.resync is not None:
            return 0
        self.group.reset()
        if vol.received_seq <= vol.last_seq or self.empty:
            return 0  # (a complete copy replaying S+1..T applies them: it streams on)
        vol.applier.sync_log()  # (a cancelled group may not have had its fsync)
        first, n = vol.last_seq + 1, 0
        for txn in vol.samlog.scan(first):
            vol.applier.apply(txn, checkpoint=False)
            self._notify(txn)
            n += 1
        self._check_consistent(vol)
        log.info(
            "%s: applied seq %d..%d, logged before the session ended",
            self.volume_dir,
            first,
            vol.last_seq,
        )
        return n

    def _check_consistent(self, vol: Volume) -> None:
        if self._consistent_reported or not vol.consistent:
            return
        self._consistent_reported = True
        vol.applier.reload_geometry()
        log.info("%s: replica is consistent at seq %d", self.volume_dir, vol.last_seq)
        if self.on_consistent is not None:
            self.on_consistent(vol)

    # ------------------------------------------------------------------ initial sync

    def start_copy(self, msg: SyncBegin, peer: Peer) -> None:
        key = (peer.volume_uuid, msg.start_seq, msg.block_size, msg.block_count)
        if msg.first_block:
            held, same = self.copy_resume(), key == self.copy_key
            self.copy_key = None  # the next handshake offers no resume, unless this one works
            check_resume(msg, same, held)  # ProtocolError if it cannot go on
            self.copy_key = key
            self.group.reset()
            self.partial = None
            return
        old, self.volume = self.volume, None
        self.group.reset()
        self.partial = None
        self.copy_key, self.copy_next = None, 0
        self.volume = start_replica(self.volume_dir, old, msg, peer, self.node_id)
        self.copy_key = key
        self._consistent_reported = False
        self.sync_blocks_copied, self.sync_blocks_total = 0, msg.block_count
        self.sync_started = time.monotonic()
        if self.on_created is not None:
            self.on_created(self.volume)

    def copy_blocks(self, msg: SyncBlocks) -> None:
        vol = self._vol()
        if msg.first_block < self.copy_next:
            raise ProtocolError(
                f"SYNC_BLOCKS at block {msg.first_block}, but the copy is at block {self.copy_next}"
            )
        vol.applier.write_sync_blocks(msg.first_block, msg.blocks(vol.block_size))
        self.sync_blocks_copied += msg.nblocks
        self.copy_next = msg.first_block + msg.nblocks

    def finish_copy(self, msg: SyncEnd, volume_uuid: bytes) -> None:
        vol = self._vol()
        self.copy_key, self.copy_next = None, 0
        finish_copy(vol, msg, volume_uuid)
        log.info(
            "initial-sync copy done: %d blocks; consistent once seq %d is applied",
            self.sync_blocks_copied,
            msg.consistent_at_seq,
        )
        self._check_consistent(vol)

    # ------------------------------------------------------------------ resync

    def begin_resync(self, msg: SyncBegin, fork_seq: int | None, peer: Peer) -> TargetResync:
        """A stage kept from an earlier session goes on if ``msg`` resumes it as announced;
        any other SYNC_BEGIN(RESYNC) replaces it."""
        kept = self.resync
        if kept is not None:
            if kept.matches(msg, fork_seq):
                kept.resume(msg)
                return kept
            _drop_kept_resync(self, f"replaced by a resync from seq {msg.start_seq}")
        epochs = [list(e) for e in peer.epochs]
        self.group.reset()  # (every TXN before it is logged and applied: nothing is lost)
        self.resyncs += 1
        self.resync = TargetResync(self._vol(), msg, fork_seq=fork_seq, source_epochs=epochs)
        return self.resync

    def commit_resync(self, stage: ResyncStage) -> None:
        """Apply the staged group and tell the layers above, in one step (no await)."""
        assert isinstance(stage, TargetResync)
        vol = self._vol()
        self.resync = None  # (a failure below is not an abandoned stage: the record is set)
        result = stage.commit()
        self.last_resync = {**stage.as_dict(), "blocks_applied": result.blocks}
        try:
            if self.on_resynced is not None:
                self.on_resynced(vol)
            elif self.on_applied is not None:
                hints = result.hints
                self.on_applied(Transaction(result.end_seq, vol.state.epoch, 0, [], hints))
        except Exception:
            log.exception("resync hooks failed after seq %d", result.end_seq)
        self._check_consistent(vol)

    def suspend_resync(self, stage: ResyncStage, why: str) -> None:
        """The session ended first: keep the stage (in memory, its file on disk) for the
        next session's source to resume; a restart discards it (Volume.open)."""
        assert isinstance(stage, TargetResync) and stage is self.resync
        stage.suspend(why)

    # ------------------------------------------------------------------ switchover

    def switchover_refusal(self, seq: int, *, busy: bool) -> str | None:
        return switchover_refusal(self.volume, seq, busy=busy)

    def promote(self, msg: Switchover) -> SwitchoverDone | None:
        _drop_kept_resync(self, "switchover")
        return self.on_switchover(msg) if self.on_switchover is not None else None


def _drop_kept_resync(store: ReplicaStore, why: str) -> None:
    """A kept stage that will not be resumed: discarded (the replica stays at A)."""
    stage, store.resync = store.resync, None
    if stage is not None:
        stage.abort(why)
