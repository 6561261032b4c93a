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
    load_state,
)

log = logging.getLogger(__name__)


class _Core(Protocol):
    sb: VolumeSuper

    @property
    def last_seq(self) -> int: ...

    def read(self, block: int, count: int = 1) -> bytes: ...


class VolumeCheckpoints:
    """The checkpoints of an open volume (see the module doc)."""

    def __init__(
        self, core: _Core, put: Callable[[int, bytes], None], free_blocks: Callable[[], int]
    ):
        self.core = core
        self._put = put
        self._free_blocks = free_blocks
        self.layout = SaveLayout.of(core.sb)
        self.table = Table()
        self.entries: dict[int, tuple[int, int]] = {}  # slot -> (block, id)
        self.maps: dict[int, dict[int, int]] = {}  # id -> block -> slot
        self.free_slots = SlotSet(0)
        self._bitmaps: dict[int, bytes] = {}  # id -> block bitmap as of that checkpoint
        self._map_bufs: dict[int, bytearray] = {}  # map block index -> its packed entries
        self._dirty: set[int] = set()  # map blocks changed since they were last put
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
        self.table, self.entries = load_state(self.core.read, lay)
        ids = [c.id for c in self.table.checkpoints or []]
        self.maps = {cid: {} for cid in ids}
        for slot, (block, cid) in self.entries.items():
            self.maps.setdefault(cid, {})[block] = slot
        self.free_slots = SlotSet(lay.slots, self.entries)
        self._bitmaps = {k: v for k, v in self._bitmaps.items() if k in self.maps}
        self._map_bufs = {}
        self._dirty, self._pending = set(), False

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
        """The checkpoints, oldest first, each with the slots it owns (``held``)."""
        out = []
        for c in self.checkpoints:
            c.held = len(self.maps.get(c.id, {}))
            out.append(c)
        return out

    def find(self, name: str) -> CheckpointInfo:
        for c in self.checkpoints:
            if c.name == name:
                return c
        raise CheckpointError(f"no checkpoint named {name!r}")

    # -- frozen bitmaps
    def _resolve(self, cid: int, block: int) -> bytes:
        """Block ``block`` as checkpoint ``cid`` sees it (in-process, merged reads)."""
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
        need = [
            b
            for b in range(lo, hi)
            if not (lay.start <= b < lay.end) and b not in newest and self.needs_save(b)
        ]
        if not need:
            return
        if len(need) > len(self.free_slots):
            raise NoSpace(
                f"checkpoint save area is full ({len(self.free_slots)} blocks left, "
                f"{len(need)} needed): delete a checkpoint"
            )
        cid = cks[-1].id
        dirty: set[int] = set()
        free = self.free_slots
        runs: list[list[int]] = []  # [first block, first slot, count]: one read, one put
        for b in need:
            last = runs[-1] if runs else None
            if last is not None and last[0] + last[2] == b and last[1] + last[2] in free:
                slot = last[1] + last[2]
                last[2] += 1
            else:
                slot = free.first()
                runs.append([b, slot, 1])
            free.take(slot)
            self.table.high = max(self.table.high, slot + 1)
            self.entries[slot] = (b, cid)
            newest[b] = slot
            dirty.add(self._set_entry(slot, b, cid))
        for b, slot, n in runs:
            self._put(lay.start + slot, self.core.read(b, n))
        # The map and the table go into this transaction when it is sealed (flush_pending):
        # once per transaction, not once per write.
        self._dirty |= dirty
        self._pending = True

    def flush_pending(self) -> None:
        """Put the map blocks and the table that saves since the last call changed into the
        open transaction (``WritePath.seal`` calls it; so do in-process views)."""
        if self._pending:
            dirty, self._dirty, self._pending = self._dirty, set(), False
            self._write_map(dirty)

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
        self.flush_pending()
        self._write_map(set())
        log.info("checkpoint %r created at seq %d", name, info.seq)
        return info

    def delete(self, name: str) -> int:
        """Remove checkpoint ``name``; returns the save slots freed. A saved copy that an
        older checkpoint still needs passes to the next older one instead."""
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
        self._dirty |= dirty
        self._pending = True
        self.flush_pending()
        log.info("checkpoint %r deleted: %d save block(s) freed", name, freed)
        return freed
