"""The target's TXN pipeline (repl.txn_pipeline over repl.replica_store): group fsync off
the loop, ACK(received) only after the fsync, batch apply that readers see whole.

The source is the hand-driven one of test_receiver (a real Volume over a memory stream);
the replica's SAM log is wrapped to record the order of appends, fsyncs and ACKs.
"""

from __future__ import annotations

import errno
import threading
import time
from collections import deque

import pytest
import trio
import trio.testing

from mirrorfs.repl.receiver import ReceiverState
from mirrorfs.repl.wire import Ack, Ping, Pong
from mirrorfs.store.volume import Volume
from tests.test_receiver import Source, Target, synced

BS = 4096


@pytest.fixture
def source(tmp_path):
    src = Source(str(tmp_path / "src"))
    src.change(3)
    yield src
    src.close()


@pytest.fixture
def target(tmp_path):
    t = Target(str(tmp_path / "dst"))
    yield t
    t.close()


class Recorder:
    """Wraps a replica volume's SAM log: what was appended, what each fsync covered."""

    def __init__(self, vol: Volume, *, sync_delay: float = 0.0) -> None:
        self.vol = vol
        self.events: list[tuple[str, int]] = []
        self.synced = 0  # highest seq covered by an fsync
        self.fail_sync: OSError | None = None
        self._lock = threading.Lock()
        log = vol.samlog
        append, sync = log.append_validated, log.sync

        def append_validated(txn, record_bytes):
            with self._lock:
                self.events.append(("append", txn.seq))
            return append(txn, record_bytes)

        def wrapped_sync():
            upto = log.last_seq
            time.sleep(sync_delay)  # an ACK sent before the fsync would overtake it
            if self.fail_sync is not None:
                raise self.fail_sync
            sync()
            with self._lock:
                self.events.append(("sync", upto))
                self.synced = max(self.synced, upto)

        log.append_validated = append_validated
        log.sync = wrapped_sync

    def syncs(self) -> list[int]:
        return [seq for what, seq in self.events if what == "sync"]

    def ack(self, ack: Ack) -> None:
        with self._lock:
            self.events.append(("ack", ack.received_seq))
            assert ack.received_seq <= self.synced, f"ACK {ack} before its fsync: {self.events}"


async def acks_until(fs, rec: Recorder, applied: int, timeout: float = 10.0) -> list[Ack]:
    got = []
    with trio.fail_after(timeout):
        while True:
            msg = await fs.receive()
            if isinstance(msg, Ping):
                await fs.send(Pong(msg.timestamp_ns))
            elif isinstance(msg, Ack):
                rec.ack(msg)
                got.append(msg)
                if msg.applied_seq >= applied:
                    return got


async def test_store_logs_a_group_with_one_fsync_and_reports_it_only_after(source, target):
    async with trio.open_nursery() as nursery:
        fs = await synced(nursery, target, source)
        await fs.aclose()
        with trio.fail_after(10):
            while target.receiver.state is ReceiverState.STREAMING:
                await trio.sleep(0.01)
    # The store on its own now: a consistent replica at seq `start`.
    vol, store = target.vol, target.receiver.store
    start = vol.last_seq
    source.change(6)
    rec = Recorder(vol)
    records = list(source.vol.samlog.scan_encoded(start + 1))
    for seq, record in records:
        store.receive_apply(seq, record)
    assert store.positions() == (start, start) and rec.events == []
    group = store.group.take_group(vol)
    seen_during_sync = []
    recorded_sync = vol.samlog.sync

    def sync_and_look():
        seen_during_sync.append(store.positions())
        recorded_sync()

    vol.samlog.sync = sync_and_look
    done = store.group.log(vol, group)  # (here in this thread; the receiver: a worker)
    assert done.error is None and [t.seq for t in done.txns] == [s for s, _ in records]
    # One fsync for the group; an ACK asked during it still says the old position.
    assert rec.syncs() == [records[-1][0]] and seen_during_sync == [(start, start)]
    assert rec.events[:-1] == [("append", s) for s, _ in records]
    store.group.logged(vol, done)
    last = records[-1][0]
    assert store.positions() == (last, start)  # received: the group; applied: not yet
    pending = deque(done.txns)
    store.apply_step_bytes = 1  # one transaction per step
    assert store.apply_step(pending) == 1 and vol.last_seq == start + 1
    while pending:
        store.apply_step(pending)
    assert store.positions() == (last, last)
    assert [t.seq for t in target.applied][-6:] == [s for s, _ in records]


async def test_frames_queued_together_are_one_fsync_and_one_ack(source, target):
    async with trio.open_nursery() as nursery:
        fs = await synced(nursery, target, source)
        rec = Recorder(target.vol, sync_delay=0.05)
        first = source.vol.last_seq + 1
        source.change(12)
        last = await source.ship(fs, first)  # all at once: the reader queues them
        acks = await acks_until(fs, rec, last)
        syncs = rec.syncs()
        assert syncs[-1] == last and len(syncs) < 12 / 2, rec.events
        # Every ACK says a position that an fsync covered, and it says each one once.
        received = [a.received_seq for a in acks]
        assert set(received) <= set(syncs) | {first - 1}, (received, syncs)
        assert acks[-1] == Ack(last, last, acks[-1].target_time_ns)
        assert target.vol.last_seq == last and [t.seq for t in target.applied][-1] == last
        assert target.vol.device.read(0, source.vol.block_count) == source.vol.device.read(
            0, source.vol.block_count
        )
        await fs.aclose()


async def test_readers_on_the_loop_see_whole_transactions(source, target):
    """A task on the receiver's loop checks, between every two awaits, that two blocks
    that every transaction writes together agree, and that on_applied was called for
    the last applied transaction (caches dropped in the same step)."""
    vol = source.vol
    a, b = vol.block_count - 1, vol.block_count - 200
    seen = {"checks": 0}
    done = trio.Event()

    async def reader():
        while not done.is_set():
            rv = target.receiver.volume
            if rv is not None and rv.consistent:
                x, y = rv.read(a), rv.read(b)
                assert x == y, f"half a transaction: {x[:8]!r} vs {y[:8]!r}"
                if target.applied:
                    assert target.applied[-1].seq == rv.last_seq  # hooks in the same step
                seen["checks"] += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        fs = await synced(nursery, target, source)
        target.receiver.store.apply_step_bytes = 1  # a step per transaction: many yields
        nursery.start_soon(reader)
        first = vol.last_seq + 1
        for i in range(40):
            data = bytes([i + 1]) * BS
            vol.write(a, data)
            vol.write(b, data)
            vol.commit()
        rec = Recorder(target.vol)
        last = await source.ship(fs, first)
        await acks_until(fs, rec, last)
        done.set()
        assert seen["checks"] > 40
        assert target.vol.read(a) == bytes([40]) * BS
        await fs.aclose()


@pytest.mark.log_expected(r"injected fsync failure")
async def test_a_failed_group_fsync_acks_nothing_of_it_and_loses_nothing_acked(
    source, target, tmp_path
):
    """The crash between a group's append and its fsync (an fsync that fails): no ACK says
    any seq of that group received, and every seq that was acked is in the log after a
    reopen."""
    async with trio.open_nursery() as nursery:
        fs = await synced(nursery, target, source)
        rec = Recorder(target.vol)
        first = source.vol.last_seq + 1
        source.change(3)
        acked = (await acks_until(fs, rec, await source.ship(fs, first)))[-1].received_seq
        rec.fail_sync = OSError(errno.EIO, "injected fsync failure")
        nxt = source.vol.last_seq + 1
        source.change(4)
        await source.ship(fs, nxt)
        got = []
        with trio.fail_after(10):
            try:
                while True:
                    got.append(await fs.receive())
            except Exception:
                pass
        for msg in got:
            if isinstance(msg, Ack):
                assert msg.received_seq < nxt, got
    rec.fail_sync = None  # (close syncs)
    path = target.vol.path
    target.vol.close()
    target.receiver.volume = None
    again = Volume.open(path)
    try:
        assert again.received_seq >= acked and again.last_seq >= acked
    finally:
        again.close()


async def test_every_logged_txn_is_applied_when_the_session_ends(source, target):
    """A session cut right after a group was logged: ``settle`` applies it from the log."""
    async with trio.open_nursery() as nursery:
        fs = await synced(nursery, target, source)
        first = source.vol.last_seq + 1
        source.change(5)
        glog = target.receiver.store.group
        logged = trio.Event()
        real = glog.logged

        def logged_then_cut(vol, done):
            real(vol, done)
            logged.set()

        glog.logged = logged_then_cut
        await source.ship(fs, first)
        await logged.wait()
        await fs.aclose()
        with trio.fail_after(10):
            while target.receiver.state is ReceiverState.STREAMING:
                await trio.sleep(0.01)
    # Whatever was logged (the first group at least) is applied, nothing is left between.
    assert target.vol.last_seq == target.vol.received_seq >= first
    assert [t.seq for t in target.applied][-1] == target.vol.last_seq
