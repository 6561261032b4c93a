"""Checkpoints (snapshots): point-in-time, read-only views of the whole volume.

Not to be confused with ``store/checkpoint.py``, the *log* checkpoint (how far the block
file is up to date). Here a checkpoint is what ``mirrorfs checkpoint create`` makes: the
volume as it was at a transaction boundary, kept by block-level copy-on-first-write into
the save area that ``VolumeSuper`` reserves (``save_area_start``/``save_area_blocks``,
right after the block bitmap, marked used in it). Design, cost model and the concurrency
argument: mirrorfs/INTERNALS.md, "Checkpoints".

Save area layout (A = save_area_start, N = save_area_blocks, E = block_size // 16)::

    A .. A+S-1          S save slots: old contents of blocks overwritten after a checkpoint
    A+S .. A+S+M-1      the map: 16-byte entry i describes slot i (M = ceil(S / E))
                        <block u64, checkpoint id u32, crc32 u32>; all zeros = slot free
    A+S+M .. A+N-2      one frozen copy of the client superblock (block 1) per table index
    A+N-1               the table: magic, version, count, generation, next id, high-water
                        slot (no slot at or past it was ever used: readers and the open
                        read the map only below it), one record per checkpoint
                        <id, index, seq, time_ns, free blocks, name>, crc32

Every region a reader consults later lies at a higher block number than the one it
consults first (slot < map < table), and the whole area lies below every block the
allocator hands out; writers put a transaction's runs in place in ascending block order.
That order is the whole concurrency argument (INTERNALS.md).

Resolution: checkpoint ``i`` sees block ``b`` as the saved copy of the first entry for
``b`` among checkpoints with id >= i (oldest first), else the live block. A first write of
``b`` after the newest checkpoint saves it when some checkpoint still resolves ``b`` to the
live block and had ``b`` in use (its frozen bitmap).
"""

from __future__ import annotations

import logging
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mirrorfs.store.errors import VolumeError, VolumeFailed
from mirrorfs.store.geometry import BITMAP_START, CLIENT_SUPER, VolumeSuper

log = logging.getLogger(__name__)

MAGIC = b"MFSCKPT1"
VERSION = 1
MAX_NAME = 64
MAX_CHECKPOINTS = 16
ENTRY = struct.Struct("<QII")  # block, checkpoint id, crc32(slot, block, id)
HEAD = struct.Struct("<8sHHQIQ")  # magic, version, count, generation, next id, slots used
REC = struct.Struct("<IHQQQ64s")  # id, index, seq, time_ns, free blocks, name
#: A torn read of a block being rewritten by another process fails its CRC; read again.
TORN_RETRIES = 50


class CheckpointError(VolumeError):
    """A checkpoint operation cannot be done (one line)."""


class CheckpointGone(VolumeFailed):
    """The checkpoint a view reads was deleted (on the source, replicated here): its saved
    blocks may be reused, so the view answers nothing any more (EIO at the FUSE layer)."""


@dataclass(slots=True, frozen=True)
class SaveLayout:
    """Where the parts of the save area are (pure arithmetic on the superblock)."""

    start: int
    blocks: int
    block_size: int
    slots: int
    map_start: int
    map_blocks: int
    frozen_start: int
    max_checkpoints: int
    table: int

    @property
    def per_map_block(self) -> int:
        return self.block_size // ENTRY.size

    @property
    def end(self) -> int:
        return self.start + self.blocks

    @classmethod
    def of(cls, sb: VolumeSuper) -> SaveLayout | None:
        """The layout of ``sb``'s save area, None when the volume has none."""
        return cls.compute(sb.save_area_start, sb.save_area_blocks, sb.block_size)

    @classmethod
    def compute(cls, start: int, blocks: int, block_size: int) -> SaveLayout | None:
        maxc = min(MAX_CHECKPOINTS, (block_size - HEAD.size - 4) // REC.size)
        rest = blocks - 1 - maxc
        if start <= 0 or maxc < 1 or rest < 2:
            return None
        epb = block_size // ENTRY.size
        map_blocks = -(-rest // (epb + 1))
        slots = rest - map_blocks
        return cls(
            start,
            blocks,
            block_size,
            slots,
            start + slots,
            map_blocks,
            start + slots + map_blocks,
            maxc,
            start + blocks - 1,
        )


def save_area_blocks_for(block_count: int, fraction: float) -> int:
    """Blocks to reserve for a save area of ``fraction`` of the volume (0: none)."""
    if fraction <= 0:
        return 0
    return max(MAX_CHECKPOINTS + 8, int(block_count * fraction))


@dataclass(slots=True)
class CheckpointInfo:
    """One checkpoint's table record (``held``, filled in: save slots only it owns plus data
    blocks only it reads in place)."""

    id: int
    index: int
    seq: int
    time_ns: int
    free_blocks: int
    name: str
    held: int = 0

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "seq": self.seq,
            "time": self.time_ns / 1e9,
            "held_blocks": self.held,
        }


@dataclass(slots=True)
class Table:
    generation: int = 0
    next_id: int = 1
    checkpoints: list[CheckpointInfo] | None = None
    high: int = 0  # slots [0, high) may be in use; none at or past it ever was

    def __post_init__(self) -> None:
        if self.checkpoints is None:
            self.checkpoints = []

    def pack(self, block_size: int) -> bytes:
        cks = self.checkpoints or []
        out = bytearray(
            HEAD.pack(MAGIC, VERSION, len(cks), self.generation, self.next_id, self.high)
        )
        for c in cks:
            out += REC.pack(c.id, c.index, c.seq, c.time_ns, c.free_blocks, c.name.encode())
        out += struct.pack("<I", zlib.crc32(out))
        return bytes(out) + bytes(block_size - len(out))

    @classmethod
    def unpack(cls, buf: bytes) -> Table:
        """The table in ``buf``; an all-zero block is an empty table; ValueError if torn."""
        if not any(buf[: HEAD.size]):
            return cls()
        magic, version, count, gen, next_id, high = HEAD.unpack_from(buf)
        if magic != MAGIC or version != VERSION:
            raise ValueError("bad checkpoint table magic or version")
        end = HEAD.size + count * REC.size
        if end + 4 > len(buf) or struct.unpack_from("<I", buf, end)[0] != zlib.crc32(buf[:end]):
            raise ValueError("checkpoint table checksum mismatch")
        cks = []
        for i in range(count):
            cid, index, seq, t, free, name = REC.unpack_from(buf, HEAD.size + i * REC.size)
            cks.append(CheckpointInfo(cid, index, seq, t, free, name.rstrip(b"\0").decode()))
        return cls(gen, next_id, cks, high)


class SlotSet:
    """The free save slots: one byte per slot (0 = free) and a cursor, so that finding the
    lowest free slot at or after it is a C-speed ``find``; memory is one byte a slot."""

    def __init__(self, slots: int, used: Iterable[int] = ()) -> None:
        self._used = bytearray(slots)
        for s in used:
            self._used[s] = 1
        self.count = slots - self._used.count(1)
        self._cursor = 0

    def __len__(self) -> int:
        return self.count

    def __contains__(self, slot: int) -> bool:
        return 0 <= slot < len(self._used) and not self._used[slot]

    def first(self) -> int:
        """The lowest free slot at or past the cursor (then from 0); IndexError when none."""
        i = self._used.find(0, self._cursor)
        if i < 0:
            i = self._used.find(0)
        if i < 0:
            raise IndexError("no free save slot")
        return i

    def take(self, slot: int) -> None:
        assert not self._used[slot]
        self._used[slot] = 1
        self.count -= 1
        self._cursor = slot + 1

    def give(self, slot: int) -> None:
        assert self._used[slot]
        self._used[slot] = 0
        self.count += 1
        self._cursor = min(self._cursor, slot)


def entry_bytes(slot: int, block: int, cid: int) -> bytes:
    if cid == 0:
        return bytes(ENTRY.size)
    crc = zlib.crc32(struct.pack("<QQI", slot, block, cid))
    return ENTRY.pack(block, cid, crc)


def parse_map(buf: bytes, first_slot: int, slots: int) -> dict[int, tuple[int, int]]:
    """slot -> (block, id) of the used entries; ValueError on a torn entry."""
    out: dict[int, tuple[int, int]] = {}
    n = min(len(buf) // ENTRY.size, slots - first_slot)
    for i in range(n):
        block, cid, crc = ENTRY.unpack_from(buf, i * ENTRY.size)
        if cid == 0 and block == 0 and crc == 0:
            continue
        slot = first_slot + i
        if zlib.crc32(struct.pack("<QQI", slot, block, cid)) != crc:
            raise ValueError(f"checkpoint map entry of slot {slot}: checksum mismatch")
        out[slot] = (block, cid)
    return out


def read_consistent(read: Callable[[], bytes], parse: Callable[[bytes], object]) -> object:
    """``parse(read())``, read again while a concurrent rewrite makes it fail (torn)."""
    for attempt in range(TORN_RETRIES):
        try:
            return parse(read())
        except ValueError:
            if attempt == TORN_RETRIES - 1:
                raise
            time.sleep(0.001)
    raise AssertionError("unreachable")


def load_state(
    read: Callable[[int, int], bytes], layout: SaveLayout
) -> tuple[Table, dict[int, tuple[int, int]]]:
    """(table, slot -> (block, id)) read through ``read``: the table first, then the map."""
    table = read_consistent(lambda: read(layout.table, 1), Table.unpack)
    assert isinstance(table, Table)
    return table, read_entries(read, layout, table.high)


def read_entries(
    read: Callable[[int, int], bytes], layout: SaveLayout, high: int
) -> dict[int, tuple[int, int]]:
    """slot -> (block, id) of the used map entries below slot ``high``."""
    nblocks = min(layout.map_blocks, -(-high // layout.per_map_block))
    if nblocks <= 0:
        return {}
    entries = read_consistent(
        lambda: read(layout.map_start, nblocks), lambda b: parse_map(b, 0, min(high, layout.slots))
    )
    assert isinstance(entries, dict)
    return entries


def chain_map(entries: dict[int, tuple[int, int]], cid: int) -> dict[int, int]:
    """block -> slot as checkpoint ``cid`` resolves it: the oldest entry with id >= cid."""
    best: dict[int, tuple[int, int]] = {}
    for slot, (block, owner) in entries.items():
        if owner >= cid and (block not in best or owner < best[block][0]):
            best[block] = (owner, slot)
    return {b: s for b, (_, s) in best.items()}


class CheckpointView:
    """A checkpoint as a read-only block store (``fs/`` runs on it unchanged).

    ``read`` is the block source (the block file in another process, or the open volume's
    own ``read``); every read takes the live blocks FIRST, then the table, then (when the
    table's generation changed) the map, then the saved copies: see INTERNALS.md.
    """

    read_only = True

    def __init__(self, read: Callable[[int, int], bytes], sb: VolumeSuper, name: str) -> None:
        from mirrorfs.store.allocator import ExtentAllocator

        layout = SaveLayout.of(sb)
        if layout is None:
            raise CheckpointError("this volume has no save area: it holds no checkpoints")
        self._read = read
        self.sb = sb
        self.layout = layout
        self.name = name
        table, _ = load_state(read, layout)
        found = [c for c in table.checkpoints or [] if c.name == name]
        if not found:
            raise CheckpointError(f"no checkpoint named {name!r}")
        self.info = found[0]
        self._frozen_super = read(layout.frozen_start + self.info.index, 1)
        self._generation = -1
        self._map: dict[int, int] = {}
        self._refresh()
        self.allocator = ExtentAllocator(self, BITMAP_START, sb.block_count)

    @property
    def block_size(self) -> int:
        return self.sb.block_size

    @property
    def block_count(self) -> int:
        return self.sb.block_count

    def _refresh(self) -> None:
        table = read_consistent(lambda: self._read(self.layout.table, 1), Table.unpack)
        assert isinstance(table, Table)
        if table.generation == self._generation:
            return
        if not any(c.id == self.info.id for c in table.checkpoints or []):
            raise CheckpointGone(f"checkpoint {self.name!r} was deleted")
        self._map = chain_map(read_entries(self._read, self.layout, table.high), self.info.id)
        self._generation = table.generation

    def read(self, block: int, count: int = 1) -> bytes:
        """The checkpoint's content of ``count`` blocks from ``block``.

        The live blocks are read FIRST, then the table and the map (INTERNALS.md). Blocks
        the map already named before are skipped in the live read: an entry of this
        checkpoint's chain is never dropped while another one for the same content is
        missing, and its saved copy never changes while the checkpoint exists.
        """
        end = block + count
        cached = self._map
        live_needed = not cached or any(b not in cached for b in range(block, end))
        data = self._read(block, count) if live_needed else None
        self._refresh()
        bs = self.block_size
        runs = self._saved_runs(block, end)
        if data is None and sum(r[2] for r in runs) != count:  # (cannot happen: see above)
            self._map = {}
            return self.read(block, count)
        if data is None and len(runs) == 1 and block > CLIENT_SUPER:
            saved = self._read(self.layout.start + runs[0][1], count)  # all saved, one run
            self._refresh()  # deleted meanwhile: its slots may hold other blocks by now
            return saved
        if data is None:  # the map cannot shrink: still all saved, in several runs
            out = bytearray(count * bs)
        elif runs or block <= CLIENT_SUPER < end:
            out = bytearray(data)
        else:
            return data
        for b, slot, n in runs:
            off = (b - block) * bs
            out[off : off + n * bs] = self._read(self.layout.start + slot, n)
        if runs:
            self._refresh()  # deleted meanwhile: its slots may hold other blocks by now
        if block <= CLIENT_SUPER < end:
            off = (CLIENT_SUPER - block) * bs
            out[off : off + bs] = self._frozen_super
        return bytes(out)

    def _saved_runs(self, block: int, end: int) -> list[list[int]]:
        """[first block, first slot, count] of the saved copies among [block, end): saved
        copies of adjacent blocks usually sit in adjacent slots, one read a run."""
        get = self._map.get
        runs: list[list[int]] = []
        for b in range(block, end):
            slot = get(b)
            if slot is None:
                continue
            last = runs[-1] if runs else None
            if last is not None and last[0] + last[2] == b and last[1] + last[2] == slot:
                last[2] += 1
            else:
                runs.append([b, slot, 1])
        return runs

    def write(self, block: int, data: bytes | bytearray | memoryview) -> None:
        raise CheckpointError("a checkpoint is read-only")

    def shared_runs(self, block: int, count: int) -> list[tuple[int, int]]:
        return []  # never written

    def save_room(self, blocks: int) -> bool:
        return True

    def hint(self, hint: object) -> None:
        return None

    def commit(self, *, sync: bool = True) -> int | None:
        return None


def held_only(
    ids: list[int],
    bitmaps: dict[int, bytes],
    saved: dict[int, Iterable[int]],
    live: bytes,
) -> dict[int, int]:
    """id -> blocks of the data area that only that checkpoint still reads in place (it
    used them, no saved copy serves it, the live volume and the other checkpoints do not
    read them): what deleting it gives back besides its save slots.

    ``ids`` oldest first; ``bitmaps`` each checkpoint's block bitmap; ``saved`` the blocks
    of each checkpoint's map; ``live`` the volume's block bitmap now."""
    n = len(live)
    served = bytearray(n)
    in_place: dict[int, int] = {}
    for cid in reversed(ids):
        for b in saved.get(cid, ()):
            if b < n * 8:
                served[b >> 3] |= 1 << (b & 7)
        bm = int.from_bytes(bitmaps[cid][:n], "little")
        in_place[cid] = bm & ~int.from_bytes(served, "little")
    free = ~int.from_bytes(live, "little")
    out: dict[int, int] = {}
    for cid in ids:
        others = 0
        for other, mask in in_place.items():
            if other != cid:
                others |= mask
        out[cid] = (in_place[cid] & free & ~others).bit_count()
    return out


def read_listing(read: Callable[[int, int], bytes], sb: VolumeSuper) -> list[CheckpointInfo]:
    """The checkpoints as the blocks read through ``read`` hold them, each with ``held``
    (save slots it owns plus data blocks only it reads). Safe against a process changing
    the volume meanwhile (the data-block count may be off by the transaction in flight)."""
    layout = SaveLayout.of(sb)
    if layout is None:
        return []
    table, entries = load_state(read, layout)
    counts: dict[int, int] = {}
    saved: dict[int, list[int]] = {}
    for block, cid in entries.values():
        counts[cid] = counts.get(cid, 0) + 1
        saved.setdefault(cid, []).append(block)
    out = list(table.checkpoints or [])
    ids = [c.id for c in out]
    bitmaps = {}
    for cid in ids:
        chain = chain_map(entries, cid)
        bitmaps[cid] = b"".join(
            read(layout.start + chain[b], 1) if b in chain else read(b, 1)
            for b in range(BITMAP_START, BITMAP_START + sb.bitmap_blocks)
        )
    data = held_only(ids, bitmaps, saved, read(BITMAP_START, sb.bitmap_blocks)) if ids else {}
    for c in out:
        c.held = counts.get(c.id, 0) + data.get(c.id, 0)
    return out
