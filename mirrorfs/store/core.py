"""What every part of an open volume shares: its files, its condition, the choke point.

``VolumeCore`` is the open volume without its lifecycle (``store/volume.py``: create, open,
replay, close) and without the two paths built on it: the source's write path
(``store/writepath.py``) and the target's apply path (``store/applypath.py``). It holds

- the block file (``device``), the SAM log (``samlog``), node.json (``state``), the
  superblock (``sb``) and the allocator;
- the layers that reads see, newest last: the block file, the committed transactions not
  yet written in place (``device``, an ``InPlaceBlocks``: ``store/inplace.py``), the sealed
  transactions still being logged (oldest first), the open transaction (``BlockOverlay``
  + hints);
- ``last_seq``, the last transaction committed (source) or applied (target);
- its ``condition``: failed, fenced, frozen (``VolumeFlag``), each with a reason.

The choke point: every block write of the volume, data or metadata, passes through
``write``; ``device`` is the only code that writes the block file: ``defer_in_place`` (the
source's commits, written later by the flusher) and ``write_in_place`` (direct: applies,
replay, sync copies; it first flushes what is deferred).

Concurrency: used from one trio thread; ``write``/``hint``/``read`` never await, so a
filesystem operation lands whole in one transaction.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field

from mirrorfs.store.allocator import ExtentAllocator
from mirrorfs.store.device import BlockFile
from mirrorfs.store.errors import VolumeFailed
from mirrorfs.store.geometry import BITMAP_START, VolumeSuper
from mirrorfs.store.inplace import InPlaceBlocks
from mirrorfs.store.nodestate import NodeState
from mirrorfs.store.overlay import BlockOverlay
from mirrorfs.store.samlog import SamLog
from mirrorfs.store.snapshot_writer import VolumeCheckpoints
from mirrorfs.store.txn import Hint, Transaction

log = logging.getLogger(__name__)


class VolumeFlag(enum.Enum):
    """Why a volume does not take (some) changes; several can hold at once."""

    #: An I/O failure: every later change is refused until the volume is reopened.
    FAILED = "failed"
    #: This source met a newer epoch (split brain fenced): writers get EROFS.
    FENCED = "fenced"
    #: A planned switchover holds the volume at the seq the new source starts from:
    #: nothing is sealed any more (changes that are not the writers', such as atime or a
    #: release, stay open and are dropped at close), so this copy cannot diverge.
    FROZEN = "frozen"


@dataclass(slots=True)
class VolumeCondition:
    """The flags that hold on a volume, each with the reason it was set."""

    reasons: dict[VolumeFlag, str] = field(default_factory=dict)

    def set(self, flag: VolumeFlag, reason: str) -> None:
        """Raise ``flag`` with ``reason`` (a later reason replaces an earlier one)."""
        self.reasons[flag] = reason or flag.value

    def clear(self, flag: VolumeFlag) -> None:
        """Drop ``flag`` (a failed volume stays failed: only a reopen clears that)."""
        if flag is not VolumeFlag.FAILED:
            self.reasons.pop(flag, None)

    def fail(self, reason: str) -> None:
        """Mark the volume failed, without raising (see ``VolumeCore.fail``)."""
        self.set(VolumeFlag.FAILED, reason)

    def fence(self, reason: str) -> None:
        """Refuse writers from now on: a newer epoch exists elsewhere."""
        self.set(VolumeFlag.FENCED, reason)

    def freeze(self, reason: str) -> None:
        """Seal nothing from now on (a switchover holds the volume)."""
        self.set(VolumeFlag.FROZEN, reason)

    def thaw(self) -> None:
        """Seal again (the switchover did not happen)."""
        self.clear(VolumeFlag.FROZEN)

    def reason(self) -> str:
        """Why writes are refused ("" when they are not): fenced, else failed, else frozen."""
        for flag in (VolumeFlag.FENCED, VolumeFlag.FAILED, VolumeFlag.FROZEN):
            if flag in self.reasons:
                return self.reasons[flag]
        return ""

    @property
    def failed(self) -> str | None:
        """The reason of the failure, None while the volume has not failed."""
        return self.reasons.get(VolumeFlag.FAILED)

    @property
    def fenced(self) -> str:
        """The reason of the fencing, "" when not fenced."""
        return self.reasons.get(VolumeFlag.FENCED, "")

    @property
    def frozen(self) -> str:
        """The reason of the freeze, "" when not frozen."""
        return self.reasons.get(VolumeFlag.FROZEN, "")


class VolumeCore:
    """An open volume's shared state and its one write choke point (see the module doc)."""

    def __init__(
        self,
        path: str,
        *,
        read_only: bool,
        state: NodeState,
        samlog: SamLog,
        device: BlockFile,
        lock_fd: int,
    ) -> None:
        self.path = path
        self.read_only = read_only
        self.state = state
        self.samlog = samlog
        # The block file as of the last commit: what is not in place yet is merged in.
        self.device = InPlaceBlocks(device, seq=max(state.checkpointed_seq, samlog.last_seq))
        self.condition = VolumeCondition()
        self.sb: VolumeSuper
        self.allocator: ExtentAllocator  # set by load_allocator once the superblock is read
        #: The volume's checkpoints (store/snapshot_writer.py), set with the allocator.
        self.snapshots: VolumeCheckpoints | None = None
        self._lock_fd = lock_fd
        # Store-internal state shared with the two paths. The open transaction is filled by
        # ``write``/``hint`` and handed over only by ``WritePath.seal``.
        self._overlay = BlockOverlay(state.block_size)
        self._hints: list[Hint] = []
        # Sealed transactions whose log append / in-place write is still running (oldest
        # first); reads see them until ``WritePath.finish`` drops them.
        self._sealed: list[tuple[Transaction, BlockOverlay]] = []
        # Advanced only by WritePath.finish (source) and ApplyPath.apply / redo_resync
        # (target), and set by Volume.create_replica.
        self._last_seq = max(state.checkpointed_seq, samlog.last_seq)

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
        """Sequence number of the last committed (source) or applied (target) transaction."""
        return self._last_seq

    @property
    def failed(self) -> str | None:
        """Why the volume failed (it then refuses every change), None while it has not."""
        return self.condition.failed

    @property
    def received_seq(self) -> int:
        """Last sequence number durable in this node's log (>= ``last_seq`` = applied)."""
        return max(self.samlog.last_seq, self._last_seq)

    @property
    def consistent(self) -> bool:
        """False while an initial sync is filling the block file."""
        st = self.state
        return not st.sync_state and self._last_seq >= st.consistent_at

    @property
    def has_local_changes(self) -> bool:
        """Whether an open or sealed transaction holds anything."""
        return bool(self._overlay or self._hints or self._sealed)

    @property
    def unflushed_bytes(self) -> int:
        """Bytes committed but not yet written in place (the flusher's backlog)."""
        return self.device.backlog_bytes

    def load_allocator(self) -> None:
        """(Re)build the allocator from the bitmap blocks of the current superblock."""
        alloc = self.allocator = ExtentAllocator(self, BITMAP_START, self.sb.block_count)
        snaps = self.snapshots = VolumeCheckpoints(
            self,
            lambda b, d: self._overlay.put(b, d),
            lambda: alloc.free_count,
            alloc.set_held,
        )
        # A target's checkpoints change under it (applied runs mark them stale): the
        # allocator asks for the held blocks afresh before it hands anything out.
        alloc.before_use = snaps.refresh

    def shared_runs(self, block: int, count: int) -> list[tuple[int, int]]:
        """Runs of [block, block+count) that a checkpoint reads in place: overwriting one
        costs a saved copy, so the filesystem writes a file's new data elsewhere."""
        snaps = self.snapshots
        if snaps is None or not (snaps.stale or snaps.held is not None):
            return []
        snaps.refresh()
        return snaps.held_runs(block, count)

    def save_room(self, blocks: int) -> bool:
        """Whether the save area can take ``blocks`` more saved copies (always, without
        checkpoints): the filesystem refuses a change up front when it cannot."""
        snaps = self.snapshots
        if snaps is None or not (snaps.stale or snaps.table.checkpoints):
            return True
        snaps.refresh()
        return not snaps.table.checkpoints or snaps.free_slot_count >= blocks

    @property
    def spare_blocks(self) -> int:
        """Free blocks of the checkpoint save area (statfs counts them free, not available)."""
        snaps = self.snapshots
        if snaps is None:
            return 0
        snaps.refresh()  # a target: the save area may have changed under it
        return snaps.free_slot_count

    def refresh_allocator(self, runs: list[tuple[int, bytes]]) -> None:
        """Keep the allocator in step with bitmap blocks written underneath it (not
        through it): by a received transaction or a resync group."""
        alloc = getattr(self, "allocator", None)
        if alloc is None:  # an initial sync still copying: loaded by reload_geometry
            return
        bs = self.block_size
        sb = self.sb
        for start, data in runs:
            n = len(data) // bs
            if sb.is_bitmap_run(start, n):
                alloc.refresh_blocks(start, n)  # (it rereads only the bitmap blocks)
            if self.snapshots is not None and sb.is_save_area_run(start, n):
                self.snapshots.stale = True  # reread at its next use

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

    def read_committed(self, block: int, count: int = 1) -> bytes:
        """Content of ``count`` blocks from ``block`` as committed: the open transaction
        left out (the pre-image that a checkpoint's saved copy takes at seal)."""
        data = self.device.read(block, count)
        for _, layer in self._sealed:
            data = layer.patch(block, count, data)
        return data

    def write(self, block: int, data: bytes | bytearray | memoryview) -> None:
        """Record full blocks at ``block`` in the open transaction. THE write choke point."""
        if self.condition.failed:
            raise VolumeFailed(f"volume is read-only after an I/O failure: {self.failed}")
        n = len(data)
        if n == 0 or n % self.block_size:
            raise ValueError(f"write of {n} bytes is not a whole number of blocks")
        if block < 0 or block + n // self.block_size > self.block_count:
            raise ValueError(f"write of blocks {block}+{n // self.block_size} outside the volume")
        snaps = self.snapshots
        if snaps is not None and (snaps.stale or snaps.table.checkpoints):
            snaps.before_write(block, n // self.block_size)  # copy-on-first-write
        self._overlay.put(block, data)

    def hint(self, hint: Hint) -> None:
        """Attach a file-system hint to the open transaction."""
        self._hints.append(hint)

    def write_in_place(self, runs: list[tuple[int, bytes]]) -> None:
        """Write ``runs`` in place now, after whatever is deferred (applies, replay, syncs)."""
        for start, data in runs:
            self.device.write(start, data)

    def defer_in_place(self, seq: int, runs: list[tuple[int, bytes]]) -> None:
        """Hand committed transaction ``seq`` to the flusher (no I/O; reads see it)."""
        if self.device.has_backlog and self._creates_checkpoint(runs):
            # A checkpoint mount in another process may open the new checkpoint as soon as
            # its record is in place: every earlier transaction must be there before it.
            self.device.flush()
        self.device.defer(seq, runs)

    def _creates_checkpoint(self, runs: list[tuple[int, bytes]]) -> bool:
        """Whether ``runs`` write a frozen client superblock (only a checkpoint's creation
        does; store/snapshots.py)."""
        snaps = self.snapshots
        lay = snaps.layout if snaps is not None else None
        if lay is None:
            return False
        bs = self.block_size
        return any(s < lay.table and s + len(d) // bs > lay.frozen_start for s, d in runs)

    def flush_in_place(self) -> None:
        """Write every deferred block in place now (no fsync): for readers of the raw
        block file (SEEK_DATA/SEEK_HOLE of the initial sync)."""
        self.device.flush()

    def check_usable(self) -> None:
        """VolumeFailed if the volume failed."""
        if self.condition.failed:
            raise VolumeFailed(f"volume is read-only after an I/O failure: {self.failed}")

    def fail(self, why: str) -> None:
        """Mark the volume failed and raise VolumeFailed(why).

        Reads keep seeing the open transaction (the fs caches agree with it); every later
        change is refused. Reopening recovers to the last committed transaction.
        """
        self.condition.fail(why)
        log.error("%s: %s; the volume is now read-only", self.path, why)
        raise VolumeFailed(why)
