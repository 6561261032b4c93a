"""The open volume's side of checkpoints: copy-on-first-write, create, delete, list.

``vol.snapshots`` (a ``VolumeCheckpoints``) keeps the save area's table and map in memory
and is called by the write choke point (``VolumeCore.write``) before every block write
while a checkpoint exists. Everything it writes (saved copies, map blocks, the table)
goes into the open transaction through ``put`` (the overlay, bypassing the hook), so a
checkpoint and its saved copies are replicated like any other blocks. On-disk format and
reader: ``store/snapshots.py``; design: INTERNALS.md, "Checkpoints".

Concurrency: used from the volume's (trio) thread only, never awaits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from mirrorfs.store.allocator import scan_free_runs
from mirrorfs.store.errors import NoSpace
from mirrorfs.store.geometry import BITMAP_START, CLIENT_SUPER, VolumeSuper
from mirrorfs.store.snapshots import (
    MAX_NAME,
    CheckpointError,
    CheckpointInfo,
    SaveLayout,
    SlotSet,
    Table,
    entry_bytes,
    held_only,
    load_state,
)

log = logging.getLogger(__name__)


class _Core(Protocol):
    sb: VolumeSuper

    @property
    def last_seq(self) -> int: ...

    def read(self, block: int, count: int = 1) -> bytes: ...

    def read_committed(self, block: int, count: int = 1) -> bytes: ...

    @property
    def has_local_changes(self) -> bool: ...


class VolumeCheckpoints:
    """The checkpoints of an open volume (see the module doc)."""

    def __init__(
        self,
        core: _Core,
        put: Callable[[int, bytes], None],
        free_blocks: Callable[[], int],
        set_held: Callable[[bytearray | None], None] = lambda held: None,
    ):
        self.core = core
        self._put = put
        self._free_blocks = free_blocks
        self._set_held = set_held
        #: Blocks some checkpoint still reads in place (a bitmap, 1 = held): ``needs_save``
        #: for every block at once. None without checkpoints. Shared with the allocator,
        #: which never hands out a held block (see "Checkpoints" in INTERNALS.md).
        self.held: bytearray | None = None
        self.layout = SaveLayout.of(core.sb)
        self.table = Table()
        self.entries: dict[int, tuple[int, int]] = {}  # slot -> (block, id)
        self.maps: dict[int, dict[int, int]] = {}  # id -> block -> slot
        self.free_slots = SlotSet(0)
        self._bitmaps: dict[int, bytes] = {}  # id -> block bitmap as of that checkpoint
        self._map_bufs: dict[int, bytearray] = {}  # map block index -> its packed entries
        self._dirty: set[int] = set()  # map blocks changed since they were last put
        # Saves decided but not yet copied: [first block, first slot, count]. The copy is
        # taken at seal from the committed blocks (the open transaction left out), which
        # still hold the pre-image: one read and one put per run, not one per write.
        self._to_copy: list[list[int]] = []
        self._pending = False
        self.stale = True
        self.load()

    # -- state
    def load(self) -> None:
        """(Re)read table and map from the volume (after open, or blocks applied under it)."""
        self.stale = False
        lay = self.layout
        if lay is None:
            return
        known = {(c.id, c.seq, c.time_ns) for c in self.table.checkpoints or []}
        self.table, self.entries = load_state(self.core.read, lay)
        ids = [c.id for c in self.table.checkpoints or []]
        # A cached bitmap stays only for the same checkpoint: after a resync an id may
        # name another one (the new source's).
        same = {c.id for c in self.table.checkpoints or [] if (c.id, c.seq, c.time_ns) in known}
        self.maps = {cid: {} for cid in ids}
        for slot, (block, cid) in self.entries.items():
            self.maps.setdefault(cid, {})[block] = slot
        self.free_slots = SlotSet(lay.slots, self.entries)
        self._bitmaps = {k: v for k, v in self._bitmaps.items() if k in same}
        self._map_bufs = {}
        self._dirty, self._pending = set(), False
        self._to_copy = []
        self._compute_held()

    def _compute_held(self) -> None:
        """``held`` from the checkpoints' bitmaps and maps, and hand it to the allocator.

        Newest first: checkpoint j reads block b in place when b was used at j and no map
        entry for b belongs to j or a newer checkpoint (such an entry serves j)."""
        cks = self.table.checkpoints or []
        if not cks or self.layout is None:
            self.held = None
            self._set_held(None)
            return
        n = self.core.sb.bitmap_blocks * self.core.sb.block_size
        served = bytearray(n)
        held = 0
        for ck in reversed(cks):
            for b in self.maps.get(ck.id, ()):
                served[b >> 3] |= 1 << (b & 7)
            bm = self._bitmap(ck.id)
            held |= int.from_bytes(bm[:n], "little") & ~int.from_bytes(served, "little")
        self.held = bytearray(held.to_bytes(n, "little"))
        self._set_held(self.held)

    def held_runs(self, block: int, count: int) -> list[tuple[int, int]]:
        """The runs of [block, block+count) that some checkpoint reads in place: a write
        there would have to save them first (a file's data goes elsewhere instead)."""
        held = self.held
        if held is None:
            return []
        end = block + count
        a, b = block >> 3, (end + 7) >> 3
        if not held[a:b].strip(b"\0"):
            return []
        out: list[tuple[int, int]] = []
        pos = block
        for s, n in scan_free_runs(held, a, b):
            s, e = max(s, block), min(s + n, end)
            if s >= e:
                continue
            if s > pos:
                out.append((pos, s - pos))
            pos = e
        if pos < end:
            out.append((pos, end - pos))
        return out

    def refresh(self) -> None:
        if self.stale:
            self.load()

    @property
    def checkpoints(self) -> list[CheckpointInfo]:
        self.refresh()
        return list(self.table.checkpoints or [])

    @property
    def active(self) -> bool:
        return bool(self.table.checkpoints)

    @property
    def free_slot_count(self) -> int:
        return len(self.free_slots) if self.layout is not None else 0

    def listing(self) -> list[CheckpointInfo]:
        """The checkpoints, oldest first, each with what only it holds (``held``: the save
        slots it owns and the data blocks only it reads in place)."""
        cks = self.checkpoints
        ids = [c.id for c in cks]
        data = {}
        if ids:
            self.flush_pending()
            live = self.core.read(BITMAP_START, self.core.sb.bitmap_blocks)
            bitmaps = {cid: self._bitmap(cid) for cid in ids}
            data = held_only(ids, bitmaps, self.maps, live)
        for c in cks:
            c.held = len(self.maps.get(c.id, {})) + data.get(c.id, 0)
        return cks

    def find(self, name: str) -> CheckpointInfo:
        for c in self.checkpoints:
            if c.name == name:
                return c
        raise CheckpointError(f"no checkpoint named {name!r}")

    # -- frozen bitmaps
    def _resolve(self, cid: int, block: int) -> bytes:
        """Block ``block`` as checkpoint ``cid`` sees it (in-process, merged reads)."""
        if self._to_copy:
            self.flush_pending()
        best = None
        for ck in self.table.checkpoints or []:
            if ck.id >= cid:
                slot = self.maps[ck.id].get(block)
                if slot is not None:
                    best = slot
                    break
        if best is None:
            return self.core.read(block, 1)
        assert self.layout is not None
        return self.core.read(self.layout.start + best, 1)

    def _bitmap(self, cid: int) -> bytes:
        bm = self._bitmaps.get(cid)
        if bm is None:
            n = self.core.sb.bitmap_blocks
            bm = b"".join(self._resolve(cid, BITMAP_START + i) for i in range(n))
            self._bitmaps[cid] = bm
        return bm

    def _used_at(self, cid: int, block: int) -> bool:
        return bool(self._bitmap(cid)[block >> 3] >> (block & 7) & 1)

    def needs_save(self, block: int, below: int | None = None) -> bool:
        """Whether some checkpoint (of the first ``below``, oldest first) still resolves
        ``block`` to the live block and had it in use: its old content must be saved."""
        cks = self.table.checkpoints or []
        for ck in reversed(cks if below is None else cks[:below]):
            if block in self.maps[ck.id]:
                return False
            if self._used_at(ck.id, block):
                return True
        return False

    # -- the hook of the choke point
    def before_write(self, block: int, count: int) -> None:
        """Save what checkpoints still need of blocks [block, block+count) before they are
        overwritten in the open transaction. NoSpace (nothing changed) when the save area
        cannot take them."""
        self.refresh()
        cks = self.table.checkpoints
        lay = self.layout
        if not cks or lay is None:
            return
        newest = self.maps[cks[-1].id]
        lo, hi = max(block, BITMAP_START), block + count
        held = self.held
        if held is None or lo >= hi or not held[lo >> 3 : (hi + 7) >> 3].strip(b"\0"):
            return
        need = [
            b
            for b in range(lo, hi)
            if held[b >> 3] >> (b & 7) & 1 and not (lay.start <= b < lay.end)
        ]
        if not need:
            return
        if len(need) > len(self.free_slots):
            raise NoSpace(
                f"checkpoint save area is full ({len(self.free_slots)} blocks left, "
                f"{len(need)} needed): delete a checkpoint"
            )
        cid = cks[-1].id
        dirty = self._dirty
        free = self.free_slots
        entries = self.entries
        set_entry = self._set_entry
        runs = self._to_copy  # [first block, first slot, count]: one read, one put
        last = runs[-1] if runs else None
        top = 0
        for b in need:
            if last is not None and last[0] + last[2] == b and last[1] + last[2] in free:
                slot = last[1] + last[2]
                last[2] += 1
            else:
                slot = free.first()
                last = [b, slot, 1]
                runs.append(last)
            free.take(slot)
            top = max(top, slot + 1)
            entries[slot] = (b, cid)
            newest[b] = slot
            held[b >> 3] &= ~(1 << (b & 7)) & 0xFF  # the saved copy serves every checkpoint
            dirty.add(set_entry(slot, b, cid))
        self.table.high = max(self.table.high, top)
        # The saved copies, the map and the table go into this transaction when it is
        # sealed (flush_pending): once per transaction, not once per write.
        self._pending = True

    def flush_pending(self) -> None:
        """Put the saved copies, the map blocks and the table that saves since the last
        call changed into the open transaction (``WritePath.seal`` calls it; so do
        in-process views)."""
        if self._pending:
            self._copy_saved()
            dirty, self._dirty, self._pending = self._dirty, set(), False
            self._write_map(dirty)

    def _copy_saved(self) -> None:
        """The pre-images of the saves decided since the last seal, into their slots.

        A saved block is one written for the first time since the newest checkpoint, and
        a checkpoint is made with nothing open, sealed or unflushed: no committed or sealed
        transaction wrote it since, so its committed content is the checkpoint's. Runs of
        adjacent slots go out as one put, whatever blocks they copy."""
        runs, self._to_copy = self._to_copy, []
        lay = self.layout
        if not runs or lay is None:
            return
        read = self.core.read_committed
        bs = lay.block_size
        i = 0
        while i < len(runs):
            first_slot = runs[i][1]
            parts = []
            nslots = 0
            while i < len(runs) and runs[i][1] == first_slot + nslots:
                b, _, n = runs[i]
                parts.append(read(b, n))
                nslots += n
                i += 1
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            assert len(data) == nslots * bs
            self._put(lay.start + first_slot, data)

    def _set_entry(self, slot: int, block: int, cid: int) -> int:
        """Record slot ``slot`` in the packed map; returns its map block index."""
        lay = self.layout
        assert lay is not None
        epb = lay.per_map_block
        i = slot // epb
        buf = self._map_bufs.get(i)
        if buf is None:
            buf = self._map_bufs[i] = bytearray(self.core.read(lay.map_start + i, 1))
        off = (slot % epb) * 16
        buf[off : off + 16] = entry_bytes(slot, block, cid)
        return i

    def _write_map(self, dirty: set[int]) -> None:
        """Map blocks ``dirty`` (indexes), then the table with a new generation."""
        lay = self.layout
        assert lay is not None
        for i in sorted(dirty):
            self._put(lay.map_start + i, bytes(self._map_bufs[i]))
        self.table.generation += 1
        self._put(lay.table, self.table.pack(lay.block_size))

    # -- create and delete (the caller commits)
    def create(self, name: str) -> CheckpointInfo:
        """Add checkpoint ``name`` = the volume as it reads now, in the open transaction."""
        self.refresh()
        lay = self.layout
        if lay is None:
            raise CheckpointError(
                "this volume has no save area for checkpoints (made with --checkpoint-space 0 "
                "or before checkpoints existed)"
            )
        if self.core.has_local_changes:
            # The saved copies are taken from the committed blocks (``_copy_saved``): a
            # checkpoint of uncommitted changes would save the wrong content.
            raise CheckpointError("a checkpoint is made with nothing uncommitted: commit first")
        raw = name.encode()
        if not name or len(raw) > MAX_NAME or "/" in name or not name.isprintable():
            raise CheckpointError(f"bad checkpoint name {name!r} (1..{MAX_NAME} bytes, no '/')")
        cks = self.table.checkpoints or []
        if any(c.name == name for c in cks):
            raise CheckpointError(f"a checkpoint named {name!r} exists already")
        if len(cks) >= lay.max_checkpoints:
            raise CheckpointError(f"at most {lay.max_checkpoints} checkpoints: delete one first")
        index = min(set(range(lay.max_checkpoints)) - {c.index for c in cks})
        cid = self.table.next_id
        info = CheckpointInfo(
            cid, index, self.core.last_seq, time.time_ns(), self._free_blocks(), name
        )
        # The frozen copies: the client superblock (below the save area, so the reader
        # never takes it live) and the bitmap (kept in memory for needs_save).
        self._put(lay.frozen_start + index, self.core.read(CLIENT_SUPER, 1))
        self._bitmaps[cid] = self.core.read(BITMAP_START, self.core.sb.bitmap_blocks)
        self.table.next_id += 1
        cks.append(info)
        self.table.checkpoints = cks
        self.maps[cid] = {}
        if self.held is None:
            self.held = bytearray(self._bitmaps[cid])
        else:  # what the new checkpoint uses, plus what older ones still read in place
            n = len(self.held)
            both = int.from_bytes(self.held, "little") | int.from_bytes(
                self._bitmaps[cid][:n], "little"
            )
            self.held[:] = both.to_bytes(n, "little")
        self._set_held(self.held)
        self.flush_pending()
        self._write_map(set())
        log.info("checkpoint %r created at seq %d", name, info.seq)
        return info

    def delete(self, name: str) -> int:
        """Remove checkpoint ``name``; returns the blocks freed (save slots, and data blocks
        only it read in place). A saved copy that an older checkpoint still needs passes to
        the next older one instead."""
        info = self.find(name)
        lay = self.layout
        assert lay is not None
        cks = self.table.checkpoints or []
        pos = next(i for i, c in enumerate(cks) if c.id == info.id)
        older = cks[pos - 1].id if pos > 0 else None
        dirty: set[int] = set()
        freed = 0
        for block, slot in self.maps.pop(info.id).items():
            if older is not None and self.needs_save(block, below=pos):
                self.entries[slot] = (block, older)
                self.maps[older][block] = slot
                dirty.add(self._set_entry(slot, block, older))
            else:
                del self.entries[slot]
                dirty.add(self._set_entry(slot, 0, 0))
                self.free_slots.give(slot)
                freed += 1
        del cks[pos]
        self._bitmaps.pop(info.id, None)
        before = self._free_blocks()
        self._compute_held()  # what only the deleted checkpoint held is free again
        data = self._free_blocks() - before
        self._dirty |= dirty
        self._pending = True
        self.flush_pending()
        log.info(
            "checkpoint %r deleted: %d save block(s) and %d data block(s) freed",
            name,
            freed,
            data,
        )
        return freed + data
