"""Extent allocator over an on-disk bitmap.

The bitmap is persistent state: ``bitmap_blocks`` blocks from ``bitmap_start`` of some block
store (the Volume for the block bitmap, the Volume again for the filesystem's inode bitmap).
Unit ``n`` is bit ``n % 8`` of byte ``n // 8`` (LSB first); 1 = used. Bits past ``nbits`` in the
last block are written as 1 by :meth:`ExtentAllocator.format` and treated as used whatever the
disk says, so they are never handed out.

In memory the allocator holds a copy of the bitmap (a bytearray, loaded with one read) and the
free space as maximal extents in two ``sortedcontainers`` indexes: by start (locality, merging)
and by (length, start) (best fit, largest first). Because extents are always maximal, the
allocator's choices depend only on the set of free units, never on history: an allocator
reloaded from the bitmap decides exactly as the one that wrote it.

Cost model: every change writes exactly the bitmap blocks whose bits it changed, through
``io.write`` (so that it lands in the open transaction); contiguous changed blocks go out as
one multi-block write. Allocating one unit writes one bitmap block.

Concurrency: every method is synchronous and never yields, so under trio each call is atomic
with respect to other tasks.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from sortedcontainers import SortedDict, SortedList

from mirrorfs.store.errors import AllocatorError, NoSpace

log = logging.getLogger(__name__)

# How many free extents after the goal's extent a goal-directed allocation looks at before it
# falls back to best fit: bounded so that a fragmented region never turns allocate into a scan.
GOAL_SCAN_EXTENTS = 32

# One match = one byte that is not all-used (mixed or all-free), then the all-free bytes after
# it. The pattern starts with a character class, so the regex engine skips 0xff bytes in C:
# loading costs Python work per free fragment, not per bit or per byte.
_FREE_RUN = re.compile(rb"[^\xff]\x00*")


def _zero_runs_of_byte(value: int) -> tuple[tuple[int, int], ...]:
    """Runs of 0 bits of one byte as (bit offset, length), LSB first."""
    runs: list[tuple[int, int]] = []
    bit = 0
    while bit < 8:
        if value >> bit & 1:
            bit += 1
            continue
        start = bit
        while bit < 8 and not value >> bit & 1:
            bit += 1
        runs.append((start, bit - start))
    return tuple(runs)


_BYTE_FREE_RUNS = tuple(_zero_runs_of_byte(v) for v in range(256))


def scan_free_runs(
    buf: bytes | bytearray | memoryview, pos: int = 0, endpos: int | None = None
) -> list[tuple[int, int]]:
    """Maximal runs of 0 bits in ``buf[pos:endpos]`` as (unit, length), in unit order.

    Units are numbered from the start of ``buf`` (byte ``i`` holds units ``8*i .. 8*i+7``).
    """
    if endpos is None:
        endpos = len(buf)
    runs: list[tuple[int, int]] = []
    append = runs.append
    cur_start = cur_end = -1
    for m in _FREE_RUN.finditer(buf, pos, endpos):
        a, b = m.span()
        unit = a << 3
        for off, length in _BYTE_FREE_RUNS[buf[a]]:
            s = unit + off
            if s == cur_end:
                cur_end += length
            else:
                if cur_end > cur_start:
                    append((cur_start, cur_end - cur_start))
                cur_start, cur_end = s, s + length
        if b - a > 1:
            s = unit + 8
            if s == cur_end:
                cur_end += (b - a - 1) << 3
            else:
                if cur_end > cur_start:
                    append((cur_start, cur_end - cur_start))
                cur_start, cur_end = s, s + ((b - a - 1) << 3)
    if cur_end > cur_start:
        append((cur_start, cur_end - cur_start))
    return runs


def _fill_bits(bits: bytearray, start: int, end: int, used: bool) -> None:
    """Set (used) or clear units [start, end) of ``bits``, whole bytes by slice assignment."""
    if start >= end:
        return
    first, last = start >> 3, end >> 3
    if first == last:
        mask = ((1 << (end - start)) - 1) << (start & 7)
        bits[first] = bits[first] | mask if used else bits[first] & ~mask
        return
    if start & 7:
        mask = (0xFF << (start & 7)) & 0xFF
        bits[first] = bits[first] | mask if used else bits[first] & ~mask
        first += 1
    if last > first:
        bits[first:last] = b"\xff" * (last - first) if used else bytes(last - first)
    if end & 7:
        mask = (1 << (end & 7)) - 1
        bits[last] = bits[last] | mask if used else bits[last] & ~mask


class BlockIO(Protocol):
    """What the allocator needs of a block store (the Volume is one)."""

    block_size: int

    def read(self, block: int, count: int = 1) -> bytes: ...

    def write(self, block: int, data: bytes | bytearray | memoryview) -> None: ...


def bitmap_blocks_for(nbits: int, block_size: int) -> int:
    """Number of bitmap blocks that ``nbits`` units need with ``block_size``-byte blocks."""
    per_block = block_size * 8
    return (nbits + per_block - 1) // per_block


class ExtentAllocator:
    """Allocates units (blocks, inodes) from a persistent bitmap, keeping free extents in memory.

    ``io`` holds the bitmap in ``bitmap_blocks_for(nbits, io.block_size)`` blocks from
    ``bitmap_start``; construction loads it with one read. Unit numbers are relative to the
    bitmap (the Volume's block bitmap starts at unit 0 = block 0, so they are block numbers).
    """

    def __init__(self, io: BlockIO, bitmap_start: int, nbits: int) -> None:
        if nbits < 0 or bitmap_start < 0:
            raise AllocatorError(f"bad bitmap geometry: start {bitmap_start}, {nbits} bits")
        self.io = io
        self.bitmap_start = bitmap_start
        self.nbits = nbits
        self.block_size = io.block_size
        self.bitmap_blocks = bitmap_blocks_for(nbits, self.block_size)
        self._units_per_block = self.block_size * 8
        self._bits = bytearray()
        # Units that a checkpoint still reads in place (store/snapshot_writer.py): free or
        # not in the bitmap, never handed out. None = none held (no checkpoint).
        self._held: bytes | bytearray | None = None
        #: Called before every change and free-count query: lets the holder of ``_held``
        #: bring it up to date first (a target's checkpoints change under it).
        self.before_use: Callable[[], None] | None = None
        self._free: SortedDict = SortedDict()  # start -> length, maximal extents
        self._by_len: SortedList = SortedList()  # (length, start)
        self._free_count = 0
        self.reload()

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def format(
        cls, io: BlockIO, bitmap_start: int, nbits: int, used: Iterable[tuple[int, int]]
    ) -> None:
        """Write a fresh bitmap (all its blocks, in one write) with the runs ``used`` set."""
        nblocks = bitmap_blocks_for(nbits, io.block_size)
        bits = bytearray(nblocks * io.block_size)
        for start, count in used:
            if count < 0 or start < 0 or start + count > nbits:
                raise AllocatorError(f"used run ({start}, {count}) outside 0..{nbits}")
            _fill_bits(bits, start, start + count, True)
        _fill_bits(bits, nbits, len(bits) * 8, True)
        if nblocks:
            io.write(bitmap_start, bytes(bits))

    def reload(self) -> None:
        """Reread the whole bitmap and rebuild the free extents (e.g. after a rollback)."""
        t0 = time.perf_counter()
        size = self.bitmap_blocks * self.block_size
        data = self.io.read(self.bitmap_start, self.bitmap_blocks) if self.bitmap_blocks else b""
        if len(data) != size:
            raise AllocatorError(
                f"bitmap at block {self.bitmap_start}: read {len(data)} bytes, expected {size}"
            )
        self._bits = bytearray(data)
        # Padding past nbits counts as used whatever the disk says: it can never be handed out.
        _fill_bits(self._bits, self.nbits, size * 8, True)
        runs = self._rebuild()
        log.debug(
            "bitmap at block %d: %d units, %d free in %d extents, loaded in %.3f s",
            self.bitmap_start,
            self.nbits,
            self._free_count,
            len(runs),
            time.perf_counter() - t0,
        )

    def _avail(self) -> bytes | bytearray:
        """The bitmap with held units set: what allocation may not hand out."""
        if self._held is None:
            return self._bits
        n = len(self._bits)
        both = int.from_bytes(self._bits, "little") | int.from_bytes(self._held, "little")
        return both.to_bytes(n, "little")

    def _rebuild(self) -> list[tuple[int, int]]:
        """Free extents anew from the bitmap and the held units."""
        runs = scan_free_runs(self._avail())
        self._free = SortedDict(runs)
        self._by_len = SortedList((length, start) for start, length in runs)
        self._free_count = sum(length for _, length in runs)
        return runs

    def set_held(self, held: bytes | bytearray | None) -> None:
        """Units a checkpoint still reads in place (a bitmap like this one's, 1 = held):
        never handed out, whether this bitmap says free or used; freeing one clears its
        bit and keeps it out of the free extents. None: nothing is held. Rebuilds the
        free extents (a checkpoint's deletion gives back what only it held). The mask is
        kept, not copied: its owner may clear the bit of a USED unit in it afterwards
        (that changes no free extent); any other change must be followed by set_held."""
        if held is not None and len(held) != len(self._bits):
            raise AllocatorError(
                f"bitmap at block {self.bitmap_start}: held mask of {len(held)} bytes, "
                f"bitmap of {len(self._bits)}"
            )
        if held is None and self._held is None:
            return
        self._held = held  # not a copy: its owner may clear bits of used units in it
        self._rebuild()

    @property
    def held_count(self) -> int:
        """Units held by checkpoints that this bitmap says are free."""
        if self._held is None:
            return 0
        free = ~int.from_bytes(self._bits, "little") & int.from_bytes(self._held, "little")
        return free.bit_count()

    def _unheld(self, start: int, count: int) -> list[tuple[int, int]]:
        """The parts of [start, start+count) that no checkpoint holds."""
        held = self._held
        if held is None:
            return [(start, count)]
        end = start + count
        out = []
        for s, n in scan_free_runs(held, start >> 3, (end + 7) >> 3):
            a, b = max(s, start), min(s + n, end)
            if a < b:
                out.append((a, b - a))
        return out

    def _bits_all(self, start: int, count: int, used: bool) -> bool:
        """Whether the bitmap has every unit of [start, start+count) used (or free)."""
        end = start + count
        free = [
            (max(s, start), min(s + n, end))
            for s, n in scan_free_runs(self._bits, start >> 3, (end + 7) >> 3)
            if s < end and s + n > start
        ]
        if used:
            return not free
        return len(free) == 1 and free[0] == (start, end)

    def refresh_blocks(self, block: int, count: int = 1) -> None:
        """Reread the bitmap blocks among absolute blocks [block, block+count) and update.

        For a node whose bitmap is changed underneath it (a replica applying transactions):
        the cost follows the number of blocks reread, not the size of the bitmap.
        """
        first = max(block - self.bitmap_start, 0)
        last = min(block + count - self.bitmap_start, self.bitmap_blocks)
        if first >= last:
            return
        bs = self.block_size
        data = self.io.read(self.bitmap_start + first, last - first)
        if len(data) != (last - first) * bs:
            raise AllocatorError(
                f"bitmap blocks {self.bitmap_start + first}+{last - first}: short read"
            )
        self._bits[first * bs : last * bs] = data
        _fill_bits(self._bits, self.nbits, len(self._bits) * 8, True)
        lo, hi = first * self._units_per_block, last * self._units_per_block
        # Drop every extent that overlaps or touches [lo, hi), keep its parts outside, and merge
        # them with the rescanned runs so that the extents stay maximal.
        pieces: list[tuple[int, int]] = []
        tail: list[tuple[int, int]] = []
        idx = max(self._free.bisect_right(lo) - 1, 0)
        doomed: list[tuple[int, int]] = []
        for s in self._free.islice(idx):
            if s > hi:
                break
            if s + self._free[s] >= lo:
                doomed.append((s, self._free[s]))
        for s, length in doomed:
            self._remove(s)
            if s < lo:
                pieces.append((s, min(lo, s + length) - s))
            if s + length > hi:
                tail.append((max(hi, s), s + length - max(hi, s)))
        avail = self._bits
        if self._held is not None:
            a, b = first * bs, last * bs
            both = int.from_bytes(self._bits[a:b], "little") | int.from_bytes(
                self._held[a:b], "little"
            )
            avail = bytearray(a) + both.to_bytes(b - a, "little")
        pieces.extend(scan_free_runs(avail, first * bs, last * bs))
        pieces.extend(tail)
        merged: list[tuple[int, int]] = []
        for s, length in pieces:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((s, length))
        for s, length in merged:
            self._add(s, length)

    # ------------------------------------------------------------------------------- queries

    @property
    def free_count(self) -> int:
        """Number of units that can be handed out (free and held by no checkpoint)."""
        if self.before_use is not None:
            self.before_use()
        return self._free_count

    @property
    def total(self) -> int:
        """Number of units the bitmap covers (``nbits``)."""
        return self.nbits

    def is_used(self, unit: int) -> bool:
        """True when ``unit`` is allocated (AllocatorError when out of range)."""
        if not 0 <= unit < self.nbits:
            raise AllocatorError(f"unit {unit} out of range 0..{self.nbits}")
        return bool(self._bits[unit >> 3] >> (unit & 7) & 1)

    def free_extents(self) -> Iterator[tuple[int, int]]:
        """Maximal free runs (start, length) in unit order."""
        return iter(list(self._free.items()))

    def used_runs(self) -> Iterator[tuple[int, int]]:
        """Maximal runs (start, length) the bitmap marks used, in unit order (held units
        that it marks free are not among them)."""
        pos = 0
        free = list(self._free.items()) if self._held is None else scan_free_runs(self._bits)
        for start, length in free:
            if start > pos:
                yield (pos, start - pos)
            pos = start + length
        if pos < self.nbits:
            yield (pos, self.nbits - pos)

    def largest_free(self) -> int:
        """Length of the largest free extent (0 when full)."""
        return self._by_len[-1][0] if self._by_len else 0

    # ------------------------------------------------------------------------------- changes

    def allocate(self, count: int, goal: int | None = None) -> list[tuple[int, int]]:
        """Allocate ``count`` units; return runs (start, length) in unit order, summing to count.

        Policy: the free extent holding ``goal`` when it has room from ``goal`` on, else the
        first of the next few extents after it that fits; else the smallest extent that fits
        (best fit, lowest start on ties); else the largest extents, the last piece best fit.
        Raises NoSpace, changing nothing, when fewer than ``count`` units are free.
        """
        if count < 0:
            raise AllocatorError(f"cannot allocate {count} units")
        if count == 0:
            return []
        if self.before_use is not None:
            self.before_use()
        if count > self._free_count:
            raise NoSpace(
                f"bitmap at block {self.bitmap_start}: {count} units wanted, "
                f"{self._free_count} free of {self.nbits}"
            )
        runs = self._choose(count, goal)
        self._change(runs, used=True)
        return runs

    def allocate_one(self, goal: int | None = None) -> int:
        """Allocate one unit (near ``goal`` when given) and return it; NoSpace when full."""
        return self.allocate(1, goal)[0][0]

    def free(self, start: int, count: int) -> None:
        """Free units [start, start+count); merges with neighbouring free extents.

        AllocatorError, changing nothing, if the range is out of bounds or any unit in it is
        already free (double free).
        """
        self._check_range(start, count)
        if count == 0:
            return
        if self.before_use is not None:
            self.before_use()
        idx = self._free.bisect_left(start + count) - 1
        if idx >= 0:
            s, length = self._free.peekitem(idx)
            if s + length > start:
                unit = max(s, start)
                raise AllocatorError(
                    f"bitmap at block {self.bitmap_start}: free of ({start}, {count}) "
                    f"but unit {unit} is already free"
                )
        if self._held is not None and not self._bits_all(start, count, used=True):
            unit = next(u for u in range(start, start + count) if not self.is_used(u))
            raise AllocatorError(
                f"bitmap at block {self.bitmap_start}: free of ({start}, {count}) "
                f"but unit {unit} is already free"
            )
        self._change([(start, count)], used=False)

    def mark_used(self, start: int, count: int) -> None:
        """Mark units [start, start+count) used (they were chosen elsewhere, e.g. by mkfs).

        AllocatorError, changing nothing, if out of bounds or any unit is already used.
        """
        self._check_range(start, count)
        if count == 0:
            return
        if self.before_use is not None:
            self.before_use()
        if not self._bits_all(start, count, used=False):
            unit = next(u for u in range(start, start + count) if self.is_used(u))
            raise AllocatorError(
                f"bitmap at block {self.bitmap_start}: mark_used of ({start}, {count}) "
                f"but unit {unit} is already used"
            )
        self._change([(start, count)], used=True)

    # ------------------------------------------------------------------------------- checking

    def check(self, *, against_io: bool = False) -> None:
        """Verify that the free extents, the length index and the bitmap agree.

        With ``against_io`` also reread the bitmap through ``io`` and compare. Raises
        AllocatorError naming the first disagreement; returns None when all is well.
        """
        where = f"bitmap at block {self.bitmap_start}"
        items = list(self._free.items())
        total = 0
        prev_end = -1
        for s, length in items:
            if length <= 0 or s < 0 or s + length > self.nbits:
                raise AllocatorError(f"{where}: bad free extent ({s}, {length})")
            if s <= prev_end:
                raise AllocatorError(f"{where}: free extent ({s}, {length}) overlaps or touches")
            prev_end = s + length
            total += length
        if total != self._free_count:
            raise AllocatorError(f"{where}: free_count {self._free_count}, extents sum {total}")
        if list(self._by_len) != sorted((length, s) for s, length in items):
            raise AllocatorError(f"{where}: length index disagrees with the extents")
        scanned = scan_free_runs(self._avail())
        if scanned != items:
            raise AllocatorError(f"{where}: {self._first_difference(scanned, items)}")
        if against_io:
            disk = bytearray(self.io.read(self.bitmap_start, self.bitmap_blocks))
            _fill_bits(disk, self.nbits, len(disk) * 8, True)
            if disk != self._bits:
                diff = next(i for i in range(len(disk)) if disk[i] != self._bits[i])
                raise AllocatorError(
                    f"{where}: on-disk bitmap differs from memory at byte {diff} "
                    f"(units {diff * 8}..{diff * 8 + 7})"
                )

    @staticmethod
    def _first_difference(bitmap: list[tuple[int, int]], extents: list[tuple[int, int]]) -> str:
        for a, b in zip(bitmap, extents, strict=False):
            if a != b:
                return f"bitmap says free run {a}, extents say {b}"
        if len(bitmap) > len(extents):
            return f"bitmap has free run {bitmap[len(extents)]} missing from extents"
        return f"extent {extents[len(bitmap)]} is not free in the bitmap"

    # ------------------------------------------------------------------------------- internals

    def _check_range(self, start: int, count: int) -> None:
        if count < 0 or start < 0 or start + count > self.nbits:
            raise AllocatorError(
                f"bitmap at block {self.bitmap_start}: run ({start}, {count}) "
                f"out of range 0..{self.nbits}"
            )

    def _add(self, start: int, length: int) -> None:
        self._free[start] = length
        self._by_len.add((length, start))
        self._free_count += length

    def _remove(self, start: int) -> int:
        length = self._free.pop(start)
        self._by_len.remove((length, start))
        self._free_count -= length
        return length

    def _take(self, start: int, count: int) -> None:
        """Remove [start, start+count) from the free extent that holds it."""
        s, length = self._free.peekitem(self._free.bisect_right(start) - 1)
        self._remove(s)
        if start > s:
            self._add(s, start - s)
        end, ext_end = start + count, s + length
        if ext_end > end:
            self._add(end, ext_end - end)

    def _give(self, start: int, count: int) -> None:
        """Add free range [start, start+count), merging with the extents it touches."""
        end = start + count
        idx = self._free.bisect_left(start)
        if idx > 0:
            s, length = self._free.peekitem(idx - 1)
            if s + length == start:
                self._remove(s)
                start = s
        if end in self._free:
            end += self._remove(end)
        self._add(start, end - start)

    def _choose(self, count: int, goal: int | None) -> list[tuple[int, int]]:
        """Pick runs for ``count`` units without changing anything (count <= free_count)."""
        if goal is not None and 0 <= goal < self.nbits:
            idx = self._free.bisect_right(goal) - 1
            if idx >= 0:
                s, length = self._free.peekitem(idx)
                if goal + count <= s + length:
                    return [(goal, count)]
            for s in self._free.islice(idx + 1, idx + 1 + GOAL_SCAN_EXTENTS):
                if self._free[s] >= count:
                    return [(s, count)]
        best = self._by_len.bisect_left((count, -1))
        if best < len(self._by_len):
            return [(self._by_len[best][1], count)]
        # No extent is big enough: the largest ones whole, then the remainder best fit, which
        # can never pick one already taken (those are all at the top of the length index).
        runs: list[tuple[int, int]] = []
        remaining = count
        pos = len(self._by_len) - 1
        while remaining > self._by_len[pos][0]:
            length, s = self._by_len[pos]
            runs.append((s, length))
            remaining -= length
            pos -= 1
        length, s = self._by_len[self._by_len.bisect_left((remaining, -1))]
        runs.append((s, remaining))
        runs.sort()
        return runs

    def _change(self, runs: list[tuple[int, int]], *, used: bool) -> None:
        """Apply runs to the extents and the bitmap, then write the changed bitmap blocks.

        If a write fails (the volume could not record it), memory is put back as it was, and
        the blocks already written are written again from it: the allocator keeps agreeing
        with what the transaction holds of the bitmap."""
        self._apply(runs, used)
        written: list[tuple[int, int]] = []
        try:
            self._write_dirty(runs, written)
        except BaseException:
            self._apply(runs, not used)
            self._write_dirty(written, [], blocks=True)
            raise

    def _apply(self, runs: list[tuple[int, int]], used: bool) -> None:
        for start, count in runs:
            # Held units are in no free extent: nothing to take, nothing to give back.
            for s, n in self._unheld(start, count):
                if used:
                    self._take(s, n)
                else:
                    self._give(s, n)
            _fill_bits(self._bits, start, start + count, used)

    def _write_dirty(self, runs: list, written: list, *, blocks: bool = False) -> None:
        # The bitmap blocks that (start, count) unit runs touch (with blocks: the given
        # [first, last) block ranges), adjacent ones in one write; each range into written.
        upb, bs = self._units_per_block, self.block_size
        dirty: set[int] = set()
        for a, b in runs:
            dirty.update(range(a, b) if blocks else range(a // upb, (a + b - 1) // upb + 1))
        todo = sorted(dirty)
        i = 0
        while i < len(todo):
            j = i
            while j + 1 < len(todo) and todo[j + 1] == todo[j] + 1:
                j += 1
            first, last = todo[i], todo[j] + 1
            self.io.write(self.bitmap_start + first, bytes(self._bits[first * bs : last * bs]))
            written.append((first, last))
            i = j + 1
