"""Deferred in-place writes: reads, crashes, the bound, the checkpoint, raw readers."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
import trio

from mirrorfs.repl.initial_sync import data_runs
from mirrorfs.repl.verify import range_digests
from mirrorfs.store.committer import Committer
from mirrorfs.store.files import BLOCK_FILE
from mirrorfs.store.nodestate import NodeState
from mirrorfs.store.volume import Volume

MiB = 1 << 20
BS = 4096


@pytest.fixture
def vol_path(tmp_path):
    path = str(tmp_path / "vol")
    Volume.create(path, 16 * MiB)
    return path


def raw(path: str, block: int, count: int = 1) -> bytes:
    with open(os.path.join(path, BLOCK_FILE), "rb") as f:
        f.seek(block * BS)
        return f.read(count * BS)


def crash(vol: Volume) -> None:
    """Stop as a killed process would: files closed, nothing flushed or checkpointed."""
    os.close(vol._lock_fd)
    vol._lock_fd = -1
    vol.samlog.close()
    vol.device.close()


def fill(i: int, n: int = 1) -> bytes:
    return bytes([i % 251 + 1]) * (BS * n)


def test_reads_see_committed_data_before_it_is_in_place(vol_path):
    vol = Volume.open(vol_path)
    try:
        vol.checkpointer.every_seconds = 1e9
        blocks = vol.allocator.allocate(8)
        start = blocks[0][0]
        vol.write(start, fill(1, 8))
        vol.commit()
        vol.write(start + 2, fill(2, 2))  # overwrites part of the first transaction
        vol.commit()
        want = fill(1, 2) + fill(2, 2) + fill(1, 4)
        assert raw(vol_path, start, 8) == bytes(8 * BS)  # nothing in place yet
        assert vol.read(start, 8) == want
        assert vol.device.read(start, 8) == want  # what verify / resync / sync read
        assert range_digests(vol, [(start, 8)]) == [hashlib.sha256(want).digest()]
        # A block written by both transactions is written once, with the newest data.
        before = vol.device.flushed_bytes
        vol.flush_in_place()
        assert vol.device.flushed_bytes - before == 9 * BS  # 8 data + 1 bitmap, not 11
        assert raw(vol_path, start, 8) == want
    finally:
        vol.close()


def test_crash_after_the_log_fsync_loses_nothing(vol_path):
    vol = Volume.open(vol_path)
    vol.checkpointer.every_seconds = 1e9
    start = vol.allocator.allocate(32)[0][0]
    for i in range(32):
        vol.write(start + i, fill(i))
        vol.commit()
    seqs = vol.last_seq
    assert vol.state.checkpointed_seq < seqs
    assert raw(vol_path, start) == bytes(BS)
    crash(vol)
    vol2 = Volume.open(vol_path)
    try:
        assert vol2.last_seq == seqs and vol2.recovery.replayed >= 32
        for i in range(32):
            assert vol2.read(start + i) == fill(i)
            assert raw(vol_path, start + i) == fill(i)
    finally:
        vol2.close()


def test_close_flushes_everything(vol_path):
    vol = Volume.open(vol_path)
    start = vol.allocator.allocate(4)[0][0]
    vol.write(start, fill(7, 4))
    vol.commit()
    vol.close()
    assert raw(vol_path, start, 4) == fill(7, 4)
    assert NodeState.load(vol_path).checkpointed_seq == 2


def test_without_a_flusher_the_backlog_stays_under_the_bound(vol_path):
    vol = Volume.open(vol_path)
    try:
        vol.checkpointer.every_seconds = 1e9
        vol.writer.max_unflushed_bytes = 64 * 1024
        start = vol.allocator.allocate(256)[0][0]
        for i in range(256):
            vol.write(start + i, fill(i))
            vol.commit()
            assert vol.unflushed_bytes <= 64 * 1024 + 3 * BS  # (+ metadata of one txn)
        assert raw(vol_path, start) == fill(0)
    finally:
        vol.close()


def test_checkpoint_never_passes_data_that_is_not_in_place(vol_path):
    vol = Volume.open(vol_path)
    try:
        vol.checkpointer.every_seconds = 0  # due after every commit
        start = vol.allocator.allocate(64)[0][0]
        written: dict[int, int] = {}
        vol.device.driven = True  # as under a committer: nothing flushes inline
        for i in range(64):
            vol.write(start + i, fill(i))
            seq = vol.commit()
            written[seq] = i
            if i % 5 == 4:
                vol.device.flush_step()  # what the flusher thread does
            cp = vol.state.checkpointed_seq
            assert cp <= vol.device.synced_seq
            for s, j in written.items():
                if s <= cp:
                    assert raw(vol_path, start + j) == fill(j)
        assert vol.state.checkpointed_seq > 1  # it did advance
        vol.device.driven = False
    finally:
        vol.close()


def test_initial_sync_readers_see_the_newest_state(vol_path):
    vol = Volume.open(vol_path)
    try:
        vol.checkpointer.every_seconds = 1e9
        start = vol.allocator.allocate(16)[0][0]
        vol.write(start, fill(3, 16))
        vol.commit()
        runs = list(data_runs(vol.device.fd, BS, vol.block_count))
        assert not any(f <= start < e for f, e in runs)  # a hole in the raw file
        vol.flush_in_place()  # what run_initial_sync does first
        runs = list(data_runs(vol.device.fd, BS, vol.block_count))
        assert any(f <= start < e for f, e in runs)
        assert vol.device.read(start, 16) == fill(3, 16)
    finally:
        vol.close()


def test_reads_from_another_thread_while_the_flusher_writes(vol_path):
    """A reader in a thread never sees a half-flushed state (old and new blocks mixed)."""
    vol = Volume.open(vol_path)
    try:
        vol.checkpointer.every_seconds = 1e9
        start = vol.allocator.allocate(256)[0][0]
        stop = threading.Event()
        bad: list[int] = []

        def reader() -> None:
            while not stop.is_set():
                data = vol.device.read(start, 256)
                if len(set(data)) != 1:  # every generation writes the whole range
                    bad.append(len(set(data)))

        vol.write(start, fill(0, 256))
        vol.commit()
        vol.flush_in_place()
        t = threading.Thread(target=reader)
        t.start()
        try:
            for gen in range(1, 30):
                vol.write(start, fill(gen, 256))
                vol.commit()
                flusher = threading.Thread(target=vol.device.flush_step)
                flusher.start()
                flusher.join()
        finally:
            stop.set()
            t.join()
        assert not bad
    finally:
        vol.close()


def test_committer_writers_wait_at_the_bound(vol_path):
    vol = Volume.open(vol_path)
    vol.checkpointer.every_seconds = 1e9
    start = vol.allocator.allocate(512)[0][0]
    release = threading.Event()
    real_step = vol.device.flush_step

    def slow_step(sync: bool = False) -> bool:
        release.wait(10)
        return real_step(sync)

    vol.device.flush_step = slow_step  # type: ignore[method-assign]
    committer = Committer(vol, max_unflushed_bytes=256 * 1024, flush_bytes=64 * 1024)
    peak = 0

    async def main() -> None:
        nonlocal peak
        async with trio.open_nursery() as nursery:
            await nursery.start(committer.run)
            for i in range(0, 512, 16):
                vol.write(start + i, fill(i, 16))
                await committer.commit()
                with trio.move_on_after(0.05) as scope:
                    await committer.throttle()
                if scope.cancelled_caught:
                    assert vol.unflushed_bytes > 256 * 1024  # waiting: over the bound
                    release.set()
                    await committer.throttle()
                peak = max(peak, vol.unflushed_bytes)
                assert vol.unflushed_bytes <= 256 * 1024 + 16 * BS + 8 * BS
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        assert release.is_set()  # the bound was reached and a writer waited
        assert not vol.device.driven
    finally:
        vol.close()
    assert raw(vol_path, start + 496, 16) == fill(496, 16)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_commits_flushes_and_crashes_match_a_model(tmp_path, seed):
    """Writes, commits, flusher batches, checkpoints and crashes against a dict model."""
    import random

    rnd = random.Random(seed)
    path = str(tmp_path / "vol")
    Volume.create(path, 4 * MiB)
    vol = Volume.open(path)
    area = vol.allocator.allocate(64)[0][0]
    vol.commit()
    durable: dict[int, bytes] = {}  # what the committed transactions wrote
    open_: dict[int, bytes] = {}
    for step in range(400):
        op = rnd.random()
        if op < 0.5:
            first = rnd.randrange(64)
            n = rnd.randrange(1, min(8, 64 - first) + 1)
            data = bytes([rnd.randrange(1, 256)]) * (BS * n)
            if rnd.random() < 0.5:
                vol.write(area + first, memoryview(data))
            else:
                vol.write(area + first, bytearray(data))
            for i in range(n):
                open_[first + i] = data[:BS]
        elif op < 0.7:
            vol.commit()
            durable.update(open_)
            open_.clear()
        elif op < 0.8:
            vol.device.flush_step(sync=rnd.random() < 0.3)
        elif op < 0.85:
            vol.checkpointer.checkpoint()
        elif op < 0.9:
            vol.device.driven = True
            vol.checkpointer.every_seconds = 0
            vol.checkpointer.maybe_checkpoint()
            vol.checkpointer.every_seconds = 30.0
            vol.device.driven = False
        elif op < 0.95:
            crash(vol)
            open_.clear()
            vol = Volume.open(path)
        i = rnd.randrange(64)
        want = open_.get(i, durable.get(i, bytes(BS)))
        assert vol.read(area + i) == want, f"step {step}, block {i}"
        assert vol.device.read(area + i, 1) == durable.get(i, bytes(BS))
        assert vol.state.checkpointed_seq <= max(vol.device.synced_seq, vol.recovery.last_seq)
    vol.close()  # commits what is open
    durable.update(open_)
    got = raw(path, area, 64)
    assert got == b"".join(durable.get(i, bytes(BS)) for i in range(64))


def test_a_target_with_a_flusher_defers_its_applies(tmp_path):
    import shutil

    from mirrorfs.store.flusher import Flusher

    src_path, dst_path = str(tmp_path / "src"), str(tmp_path / "dst")
    Volume.create(src_path, 8 * MiB)
    shutil.copytree(src_path, dst_path)  # same volume at seq 1
    src = Volume.open(src_path)
    start = src.allocator.allocate(64)[0][0]
    for i in range(16):
        src.write(start + 4 * i, fill(i, 4))
        src.commit()
    dst = Volume.open(dst_path)
    flusher = Flusher(dst, flush_bytes=1 << 30, flush_interval=1e9)  # never on its own

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(flusher.run)
            for seq, rec in src.samlog.scan_encoded(2):
                dst.applier.apply(dst.applier.receive(seq, bytes(rec)))
            assert dst.unflushed_bytes > 0  # deferred, not written in place
            assert raw(dst_path, start, 4) == bytes(4 * BS)
            assert dst.read(start, 64) == src.read(start, 64)
            assert dst.device.read(start, 64) == src.device.read(start, 64)
            flusher.want()
            await flusher.wait_below(0)
            assert raw(dst_path, start, 4) == fill(0, 4)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        assert dst.last_seq == src.last_seq
    finally:
        src.close()
        dst.close()
    assert raw(src_path, 0, 2048) == raw(dst_path, 0, 2048)
