"""The target session's store: a replica Volume behind ``TargetStore`` (the one place where
the target's replication code calls into the Volume).

``ReplicaStore`` belongs to one target volume directory and lives across sessions: it holds
the volume (None while the directory is empty, replaced by an initial sync), the hooks of
the layers above, and what the status reports of the last initial sync and resync. Every
method is synchronous: ``receive_apply`` receives, applies, refreshes the allocator and calls
``on_applied`` in one step; ``commit_resync`` applies the group and calls ``on_resynced`` in
one step, so a reader on the read-only mount sees whole transactions (or A, then T) only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mirrorfs.repl.fork import judge
from mirrorfs.repl.handshake import Peer
from mirrorfs.repl.initial_sync import finish_copy, start_replica
from mirrorfs.repl.resync import TargetResync
from mirrorfs.repl.switchover import switchover_refusal
from mirrorfs.repl.target_session import ResyncStage
from mirrorfs.repl.verify import range_digests
from mirrorfs.repl.wire import Switchover, SwitchoverDone, SyncBegin, SyncBlocks, SyncEnd
from mirrorfs.store.nodestate import Role
from mirrorfs.store.txn import Transaction
from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)

OnApplied = Callable[[Transaction], None]
OnVolume = Callable[[Volume], None]
OnSwitchover = Callable[[Switchover], SwitchoverDone]


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
        self._consistent_reported = volume is not None and volume.consistent

    # ------------------------------------------------------------------ what it holds

    @property
    def node_id(self) -> str:
        return self.volume.state.node_id if self.volume is not None else self._node_id

    @property
    def present(self) -> bool:
        return self.volume is not None

    @property
    def empty(self) -> bool:
        """No volume, or an initial sync that never completed: ask for an initial sync."""
        return self.volume is None or bool(self.volume.state.sync_state)

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
        }

    def positions(self) -> tuple[int, int]:
        vol = self._vol()
        return vol.received_seq, vol.last_seq

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
        # No await from here to the end: the transaction is received, applied, and the
        # caches above are told, as one step of the trio loop.
        vol = self._vol()
        txn = vol.applier.receive(seq, record)
        vol.applier.apply(txn)  # keeps the allocator in step with applied bitmap blocks
        if self.on_applied is not None:
            try:
                self.on_applied(txn)
            except Exception:
                log.exception("on_applied failed for seq %d", txn.seq)
        self._check_consistent(vol)

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
        old, self.volume = self.volume, None
        self.volume = start_replica(self.volume_dir, old, msg, peer, self.node_id)
        self._consistent_reported = False
        self.sync_blocks_copied, self.sync_blocks_total = 0, msg.block_count
        if self.on_created is not None:
            self.on_created(self.volume)

    def copy_blocks(self, msg: SyncBlocks) -> None:
        vol = self._vol()
        vol.applier.write_sync_blocks(msg.first_block, msg.blocks(vol.block_size))
        self.sync_blocks_copied += msg.nblocks

    def finish_copy(self, msg: SyncEnd, volume_uuid: bytes) -> None:
        vol = self._vol()
        finish_copy(vol, msg, volume_uuid)
        log.info(
            "initial-sync copy done: %d blocks; consistent once seq %d is applied",
            self.sync_blocks_copied,
            msg.consistent_at_seq,
        )
        self._check_consistent(vol)

    # ------------------------------------------------------------------ resync

    def begin_resync(self, msg: SyncBegin, fork_seq: int | None, peer: Peer) -> TargetResync:
        epochs = [list(e) for e in peer.epochs]
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

    def abort_resync(self, stage: ResyncStage, why: str) -> None:
        assert isinstance(stage, TargetResync)
        self.resync = None
        stage.abort(why)

    # ------------------------------------------------------------------ switchover

    def switchover_refusal(self, seq: int, *, busy: bool) -> str | None:
        return switchover_refusal(self.volume, seq, busy=busy)

    def promote(self, msg: Switchover) -> SwitchoverDone | None:
        return self.on_switchover(msg) if self.on_switchover is not None else None
