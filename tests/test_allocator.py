"""Tests of the extent allocator against in-memory and on-file block stores."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from mirrorfs.store.allocator import ExtentAllocator, bitmap_blocks_for, scan_free_runs
from mirrorfs.store.errors import AllocatorError, NoSpace

log = logging.getLogger(__name__)

# A small block size puts bitmap-block boundaries every 128 units, so that small volumes still
# exercise runs that cross blocks.
BS = 16
UPB = BS * 8


class MemBlocks:
    """A real block store in a bytearray: the allocator's whole contract is this interface."""

    def __init__(self, nblocks: int, block_size: int = BS) -> None:
        self.block_size = block_size
        self.buf = bytearray(nblocks * block_size)
        self.writes: list[tuple[int, int]] = []  # (block, count) per write call
        self.fail_writes = False

    def read(self, block: int, count: int = 1) -> bytes:
        bs = self.block_size
        assert block >= 0 and (block + count) * bs <= len(self.buf)
        return bytes(self.buf[block * bs : (block + count) * bs])

    def write(self, block: int, data: bytes | bytearray | memoryview) -> None:
        bs = self.block_size
        assert len(data) % bs == 0 and len(data) > 0, "full blocks only"
        assert (block * bs + len(data)) <= len(self.buf)
        if self.fail_writes:
            raise OSError("injected write failure")
        self.writes.append((block, len(data) // bs))
        self.buf[block * bs : block * bs + len(data)] = data

    def written_blocks(self) -> list[int]:
        return [b for start, n in self.writes for b in range(start, start + n)]


class FileBlocks:
    """A block store on a real file through os.pread / os.pwrite."""

    def __init__(self, path: Path, nblocks: int, block_size: int = 4096) -> None:
        self.block_size = block_size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, nblocks * block_size)

    def read(self, block: int, count: int = 1) -> bytes:
        n = count * self.block_size
        data = os.pread(self.fd, n, block * self.block_size)
        assert len(data) == n
        return data

    def write(self, block: int, data: bytes | bytearray | memoryview) -> None:
        assert len(data) % self.block_size == 0
        assert os.pwrite(self.fd, data, block * self.block_size) == len(data)

    def close(self) -> None:
        os.close(self.fd)


def make(
    nbits: int, used: list[tuple[int, int]] | None = None, bitmap_start: int = 1
) -> tuple[MemBlocks, ExtentAllocator]:
    io = MemBlocks(bitmap_start + bitmap_blocks_for(nbits, BS) + 1)
    ExtentAllocator.format(io, bitmap_start, nbits, used or [])
    io.writes.clear()
    return io, ExtentAllocator(io, bitmap_start, nbits)


def naive_free_runs(buf: bytes, nbits: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for u in range(nbits):
        if not buf[u >> 3] >> (u & 7) & 1:
            if runs and runs[-1][0] + runs[-1][1] == u:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((u, 1))
    return runs


def snapshot(io: MemBlocks, alloc: ExtentAllocator) -> tuple:
    """Everything an operation could change, io writes included."""
    return (bytes(io.buf), list(alloc.free_extents()), alloc.free_count, len(io.writes))


# ------------------------------------------------------------------------------ format / load


def test_format_sets_padding_and_bit_order() -> None:
    io, alloc = make(200, used=[(0, 3), (9, 1)])
    assert bitmap_blocks_for(200, BS) == 2
    bm = io.buf[BS : 3 * BS]
    assert bm[0] == 0b0000_0111
    assert bm[1] == 0b0000_0010  # unit 9 = bit 1 of byte 1 (LSB first)
    # Units 200..255 are padding, written as used.
    assert bm[25] == 0xFF and all(b == 0xFF for b in bm[26:32])
    assert alloc.total == 200 and alloc.free_count == 196
    assert list(alloc.free_extents()) == [(3, 6), (10, 190)]
    assert list(alloc.used_runs()) == [(0, 3), (9, 1)]
    assert alloc.is_used(9) and not alloc.is_used(10)
    alloc.check(against_io=True)


def test_load_ignores_unset_padding_on_disk() -> None:
    io, _ = make(100)
    io.buf[BS + 13 : BS + 16] = bytes(3)  # padding cleared by someone: must stay unusable
    alloc = ExtentAllocator(io, 1, 100)
    assert alloc.free_count == 100
    assert alloc.allocate(100) == [(0, 100)]
    with pytest.raises(NoSpace):
        alloc.allocate_one()


def test_zero_units() -> None:
    io, alloc = make(0)
    assert alloc.free_count == 0 and alloc.total == 0 and list(alloc.used_runs()) == []
    with pytest.raises(NoSpace):
        alloc.allocate_one()
    alloc.check()


@given(data=st.binary(max_size=40), bounds=st.tuples(st.integers(0, 40), st.integers(0, 40)))
def test_scan_free_runs_matches_naive(data: bytes, bounds: tuple[int, int]) -> None:
    pos, endpos = min(bounds), max(bounds)
    pos, endpos = min(pos, len(data)), min(endpos, len(data))
    got = scan_free_runs(data, pos, endpos)
    masked = b"\xff" * pos + data[pos:endpos] + b"\xff" * (len(data) - endpos)
    assert got == naive_free_runs(masked, len(data) * 8)


# ------------------------------------------------------------------------------ cost model


def test_allocate_one_writes_one_bitmap_block() -> None:
    io, alloc = make(1000, used=[(0, 10)])
    unit = alloc.allocate_one()
    assert unit == 10
    assert io.writes == [(1 + 10 // UPB, 1)]
    io.writes.clear()
    alloc.free(unit, 1)
    assert io.writes == [(1, 1)]
    io.writes.clear()
    alloc.mark_used(600, 1)
    assert io.writes == [(1 + 600 // UPB, 1)]


def test_run_across_blocks_is_one_write_and_only_changed_blocks() -> None:
    io, alloc = make(1000)
    alloc.mark_used(100, 200)  # units 100..299: bitmap blocks 0, 1, 2
    assert io.writes == [(1, 3)]
    io.writes.clear()
    # Two runs in blocks 0 and 5: two writes, nothing in between.
    alloc.mark_used(5, 1)
    alloc.mark_used(700, 1)
    io.writes.clear()
    alloc.free(5, 1)
    alloc.free(700, 1)
    assert io.writes == [(1, 1), (1 + 700 // UPB, 1)]


def test_multi_run_allocation_writes_each_changed_block_once() -> None:
    # Free extents of 10 units in bitmap blocks 0, 3 and 6.
    used = [(0, 10), (20, 400), (430, 370), (810, 190)]
    io, alloc = make(1000, used=used)
    runs = alloc.allocate(25)
    assert sum(n for _, n in runs) == 25 and len(runs) == 3
    assert sorted(io.written_blocks()) == [1, 4, 7]
    assert len(io.writes) == 3


# ------------------------------------------------------------------------------ policy


def test_goal_locality() -> None:
    io, alloc = make(1000, used=[(0, 100), (150, 50), (205, 100)])
    assert alloc.allocate(10, goal=120) == [(120, 10)]  # inside a free extent: exactly there
    assert alloc.allocate(4, goal=130) == [(130, 4)]
    # The goal's extent (134..149) is too short for 20: the next extent after it that fits.
    assert alloc.allocate(20, goal=140) == [(305, 20)]
    # Goal in a used region: the first extent after it.
    assert alloc.allocate(3, goal=160) == [(200, 3)]
    alloc.check()


def test_goal_at_free_extent_end_and_out_of_range() -> None:
    io, alloc = make(300, used=[(0, 50)])
    assert alloc.allocate_one(goal=299) == 299
    assert alloc.allocate_one(goal=10_000) == 50  # ignored goal: best fit
    assert alloc.allocate_one(goal=-5) == 51


def test_best_fit_without_goal() -> None:
    # Free extents: 5 at 10, 3 at 30, 8 at 50, then a big one from 100.
    used = [(0, 10), (15, 15), (33, 17), (58, 42)]
    io, alloc = make(1000, used=used)
    assert alloc.allocate(3) == [(30, 3)]
    assert alloc.allocate(4) == [(10, 4)]
    assert alloc.allocate(6) == [(50, 6)]
    assert alloc.allocate(500) == [(100, 500)]
    alloc.check()


def test_gather_largest_first_then_best_fit() -> None:
    # Free extents: 4 at 10, 6 at 20, 9 at 40, 2 at 60.
    used = [(0, 10), (14, 6), (26, 14), (49, 11), (62, 38)]
    io, alloc = make(100, used=used)
    assert alloc.free_count == 21
    # 9 + 6 = 15, remainder 3 from the smallest extent that holds 3 (the 4 at 10).
    assert alloc.allocate(18) == [(10, 3), (20, 6), (40, 9)]
    assert list(alloc.free_extents()) == [(13, 1), (60, 2)]
    alloc.check(against_io=True)


def test_free_merges_neighbours() -> None:
    io, alloc = make(100, used=[(0, 100)])
    alloc.free(10, 5)
    alloc.free(20, 5)
    alloc.free(15, 5)
    assert list(alloc.free_extents()) == [(10, 15)]
    alloc.free(0, 10)
    alloc.free(25, 75)
    assert list(alloc.free_extents()) == [(0, 100)]
    alloc.check()


# ------------------------------------------------------------------------------ errors


def test_nospace_changes_nothing() -> None:
    io, alloc = make(300, used=[(0, 100), (150, 100)])
    before = snapshot(io, alloc)
    with pytest.raises(NoSpace):
        alloc.allocate(101)
    assert snapshot(io, alloc) == before
    assert sum(n for _, n in alloc.allocate(100)) == 100
    with pytest.raises(NoSpace):
        alloc.allocate_one()


def test_double_free_and_out_of_range_change_nothing() -> None:
    io, alloc = make(300, used=[(0, 100)])
    before = snapshot(io, alloc)
    for start, count in [(90, 20), (100, 1), (299, 1), (0, 301), (-1, 2), (300, 1), (5, -1)]:
        with pytest.raises(AllocatorError):
            alloc.free(start, count)
        assert snapshot(io, alloc) == before
    for start, count in [(99, 2), (0, 1), (250, 51), (-3, 1)]:
        with pytest.raises(AllocatorError):
            alloc.mark_used(start, count)
        assert snapshot(io, alloc) == before
    with pytest.raises(AllocatorError):
        alloc.is_used(300)
    alloc.check()


def test_failed_write_restores_memory() -> None:
    io, alloc = make(300, used=[(0, 100)])
    before = snapshot(io, alloc)
    io.fail_writes = True
    with pytest.raises(OSError):
        alloc.allocate(5)
    with pytest.raises(OSError):
        alloc.free(0, 10)
    assert snapshot(io, alloc) == before
    alloc.check(against_io=True)


def test_check_detects_disagreement() -> None:
    io, alloc = make(300)
    alloc._bits[3] |= 1  # corrupt the in-memory bitmap behind the extents' back
    with pytest.raises(AllocatorError, match="bitmap"):
        alloc.check()
    io2, alloc2 = make(300)
    io2.buf[BS + 2] = 0xFF  # the disk copy differs from memory
    alloc2.check()
    with pytest.raises(AllocatorError, match="on-disk"):
        alloc2.check(against_io=True)


# ------------------------------------------------------------------------------ refresh


def test_refresh_blocks_follows_changes_made_elsewhere() -> None:
    io, writer = make(1000, used=[(0, 10)])
    reader = ExtentAllocator(io, 1, 1000)
    writer.allocate(300, goal=100)  # blocks 0..3
    writer.free(0, 10)
    writer.mark_used(990, 10)  # last block
    for block, count in io.writes:
        reader.refresh_blocks(block, count)
    assert list(reader.free_extents()) == list(writer.free_extents())
    assert reader.free_count == writer.free_count
    reader.check(against_io=True)
    reader.refresh_blocks(0, 1000)  # blocks outside the bitmap are ignored
    assert list(reader.free_extents()) == list(writer.free_extents())


# ------------------------------------------------------------------------------ real file


def test_on_real_file(tmp_path: Path) -> None:
    nbits = 3 * 4096 * 8 + 1000  # four 4 KiB bitmap blocks, the last one partly padding
    path = tmp_path / "blocks"
    io = FileBlocks(path, 10)
    try:
        ExtentAllocator.format(io, 2, nbits, [(0, 2), (2, 4)])
        alloc = ExtentAllocator(io, 2, nbits)
        assert alloc.free_count == nbits - 6
        runs = alloc.allocate(50_000, goal=1000)
        assert runs == [(1000, 50_000)]
        alloc.free(2000, 100)
        unit = alloc.allocate_one(goal=nbits - 1)
        assert unit == nbits - 1
        alloc.check(against_io=True)
        expect = list(alloc.free_extents())
    finally:
        io.close()
    io = FileBlocks(path, 10)
    try:
        again = ExtentAllocator(io, 2, nbits)
        assert list(again.free_extents()) == expect
        assert list(again.used_runs()) == [(0, 6), (1000, 1000), (2100, 48_900), (nbits - 1, 1)]
        again.check(against_io=True)
    finally:
        io.close()


# ------------------------------------------------------------------------------ performance


def test_large_bitmap_load_is_fast() -> None:
    nbits = 1 << 24  # 2 MiB of bitmap in 4 KiB blocks
    io = MemBlocks(bitmap_blocks_for(nbits, 4096), block_size=4096)
    ExtentAllocator.format(io, 0, nbits, [(0, 1000)])
    # Some fragmentation: 2,000 scattered mixed bytes and a long used stretch.
    for i in range(2000):
        io.buf[1000 + i * 500] = 0x5A
    io.buf[1 << 20 : 1 << 21] = b"\xff" * (1 << 20)
    t0 = time.perf_counter()
    alloc = ExtentAllocator(io, 0, nbits)
    elapsed = time.perf_counter() - t0
    log.info("loaded %d units in %.3f s", nbits, elapsed)
    assert elapsed < 5.0
    assert alloc.free_count == nbits - 1000 - 2000 * 4 - (1 << 23)
    t0 = time.perf_counter()
    for _ in range(2000):
        alloc.allocate_one(goal=5_000_000)
    assert time.perf_counter() - t0 < 5.0


# ------------------------------------------------------------------------------ stateful model


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/free/mark_used against a set of used units.

    After every step: the model and the allocator agree unit by unit, nothing was handed out
    twice, only the changed bitmap blocks were written (once each), a fresh allocator loaded
    from the bitmap sees identical extents, and a second allocator kept current with
    ``refresh_blocks`` on the written blocks does too.
    """

    @initialize(
        nbits=st.integers(1, 700),
        used=st.lists(st.tuples(st.integers(0, 699), st.integers(1, 60)), max_size=6),
    )
    def setup(self, nbits: int, used: list[tuple[int, int]]) -> None:
        used = [(s, min(n, nbits - s)) for s, n in used if s < nbits]
        self.io, self.alloc = make(nbits, used)
        self.nbits = nbits
        self.model: set[int] = {u for s, n in used for u in range(s, s + n)}
        self.allocated: list[tuple[int, int]] = []  # runs we own and may free
        self.follower = ExtentAllocator(self.io, 1, nbits)

    def _step(self, fn) -> object:  # type: ignore[no-untyped-def]
        bm = slice(BS, BS * (1 + self.alloc.bitmap_blocks))
        before = bytes(self.io.buf[bm])
        self.io.writes.clear()
        try:
            return fn()
        finally:
            after = bytes(self.io.buf[bm])
            changed = {
                1 + i
                for i in range(self.alloc.bitmap_blocks)
                if before[i * BS : (i + 1) * BS] != after[i * BS : (i + 1) * BS]
            }
            written = self.io.written_blocks()
            assert len(written) == len(set(written)), "a bitmap block written twice"
            assert set(written) == changed
            for block, count in self.io.writes:
                self.follower.refresh_blocks(block, count)

    @rule(count=st.integers(1, 80), goal=st.none() | st.integers(-5, 720))
    def allocate(self, count: int, goal: int | None) -> None:
        free = self.nbits - len(self.model)
        if count > free:
            with pytest.raises(NoSpace):
                self._step(lambda: self.alloc.allocate(count, goal))
            return
        runs = self._step(lambda: self.alloc.allocate(count, goal))
        assert sum(n for _, n in runs) == count
        units = [u for s, n in runs for u in range(s, s + n)]
        assert len(set(units)) == count, "runs overlap"
        assert not self.model & set(units), "handed out a used unit"
        assert runs == sorted(runs)
        # A goal with room from it on must be honoured exactly.
        room = goal is not None and goal >= 0 and goal + count <= self.nbits
        if room and not self.model & set(range(goal, goal + count)):
            assert runs == [(goal, count)], "goal with room was not honoured"
        self.model |= set(units)
        self.allocated.extend(runs)

    @precondition(lambda self: self.allocated)
    @rule(data=st.data())
    def free_part(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.allocated) - 1))
        s, n = self.allocated.pop(i)
        a = data.draw(st.integers(0, n - 1))
        b = data.draw(st.integers(a + 1, n))
        self._step(lambda: self.alloc.free(s + a, b - a))
        self.model -= set(range(s + a, s + b))
        if a:
            self.allocated.append((s, a))
        if b < n:
            self.allocated.append((s + b, n - b))

    @rule(start=st.integers(0, 700), count=st.integers(1, 40))
    def mark_used(self, start: int, count: int) -> None:
        units = set(range(start, start + count))
        if start + count > self.nbits or units & self.model:
            before = snapshot(self.io, self.alloc)[:3]
            with pytest.raises(AllocatorError):
                self._step(lambda: self.alloc.mark_used(start, count))
            assert snapshot(self.io, self.alloc)[:3] == before and not self.io.writes
            return
        self._step(lambda: self.alloc.mark_used(start, count))
        self.model |= units
        self.allocated.append((start, count))

    @rule(start=st.integers(0, 700), count=st.integers(1, 40))
    def free_maybe_double(self, start: int, count: int) -> None:
        units = set(range(start, start + count))
        if start + count <= self.nbits and units <= self.model:
            return  # a legal free of someone else's units: not this rule's business
        before = snapshot(self.io, self.alloc)[:3]
        with pytest.raises(AllocatorError):
            self._step(lambda: self.alloc.free(start, count))
        assert snapshot(self.io, self.alloc)[:3] == before and not self.io.writes

    @invariant()
    def agrees_with_model(self) -> None:
        alloc = self.alloc
        assert alloc.free_count == self.nbits - len(self.model)
        used = {u for s, n in alloc.used_runs() for u in range(s, s + n)}
        assert used == self.model
        assert all(alloc.is_used(u) == (u in self.model) for u in range(self.nbits))
        alloc.check(against_io=True)
        reloaded = ExtentAllocator(self.io, 1, self.nbits)
        assert list(reloaded.free_extents()) == list(alloc.free_extents())
        assert list(self.follower.free_extents()) == list(alloc.free_extents())
        self.follower.check()


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(
    max_examples=80,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_write_failing_part_way_leaves_the_written_blocks_as_memory() -> None:
    """A change touching two bitmap blocks apart, whose second write fails (a full save
    area, a failed volume): memory goes back, and so does the block already written, so
    the transaction's bitmap and the allocator still agree (a free that half landed would
    otherwise let a later mount hand out blocks a file still holds)."""
    io, alloc = make(4 * UPB, used=[(0, 4 * UPB)])
    alloc.free(10, 5)  # block 0 of the bitmap
    alloc.free(3 * UPB + 7, 5)  # block 3: the free space is now two runs, blocks apart
    before = snapshot(io, alloc)[:3]  # what is stored and what is free (not the count of writes)
    real_write = io.write
    calls = []

    def second_write_fails(block, data):
        calls.append(block)
        if len(calls) == 2:
            raise OSError("injected failure of the second bitmap write")
        real_write(block, data)

    io.write = second_write_fails
    with pytest.raises(OSError):
        alloc.allocate(10)  # both runs: two writes, the second one fails
    assert len(calls) >= 2
    io.write = real_write
    assert snapshot(io, alloc)[:3] == before
    alloc.check(against_io=True)
