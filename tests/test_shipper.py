"""The shipper (source side of replication) against real volumes, over memory streams.

Most tests drive it against ``MiniTarget``, a small target built from FramedStream and
handshake_target over a real replica Volume, with knobs a real receiver does not have (hold
or delay ACKs, drop the connection after N transactions, count unacknowledged bytes). The
shipper reaches it through its ``connect`` factory (``MemoryListener``: no sockets), and the
tests wait for events (a condition polled with a deadline, ``wait_all_tasks_blocked``), not
for fixed sleeps. The last tests run it end to end against
``mirrorfs.repl.receiver.Receiver``, over memory streams and, through a fault proxy, TCP.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import trio
import trio.testing

from mirrorfs.repl.lag import install_retention, pinned_bytes
from mirrorfs.repl.shipper import Shipper, ShipperState
from mirrorfs.repl.stream import FramedStream, handshake_target
from mirrorfs.repl.wire import (
    Ack,
    ErrorState,
    PeerState,
    Ping,
    Pong,
    ReplError,
    SyncBegin,
    SyncBlocks,
    SyncEnd,
    Txn,
    VerifyReply,
    VerifyReq,
)
from mirrorfs.store.volume import Volume
from tests.repl_util import MemoryListener

MiB = 1 << 20
BS = 4096


class MiniTarget:
    """A test target: real replica Volume, handshake_target, knobs for misbehaving."""

    def __init__(self, path: str, *, node_id: str = "mini", epochs=None) -> None:
        self.path = path
        self.node_id = node_id
        self.volume: Volume | None = None
        self.epochs = epochs  # override what the handshake announces
        self.seqs: list[int] = []  # every TXN seq received, over every connection
        self.unacked = 0  # TXN record bytes received and not yet covered by an ACK
        self.max_unacked = 0
        self.recv_delay = 0.0  # seconds spent per TXN (a slow target)
        self.acks_held = False
        self.drop_after: int | None = None  # close the connection after this many TXNs
        self.disk_full = False  # answer the next TXN with ERROR_STATE and hang up
        self.mute = False  # ignore PINGs
        self.pings = 0  # PINGs answered
        self.connections = 0
        self._release = trio.Event()
        self._listener = MemoryListener(self._handle)

    # -- lifecycle
    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen (for ``connect``) until ``stop()``."""
        await self._listener.serve(task_status=task_status)

    def stop(self) -> None:
        """Go away: close the listener and every connection."""
        self._listener.stop()

    async def connect(self) -> trio.abc.Stream:
        """The shipper's stream factory: a memory stream to this target."""
        return await self._listener.connect()

    def hold_acks(self) -> None:
        self.acks_held = True
        self._release = trio.Event()

    def release_acks(self) -> None:
        self.acks_held = False
        self._release.set()

    # -- one connection
    async def _handle(self, stream) -> None:
        fs = FramedStream(stream)
        self.connections += 1
        try:
            await self._session(fs)
        except* (ReplError, OSError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await fs.aclose()

    async def _session(self, fs: FramedStream) -> None:
        vol = self.volume
        empty = vol is None or bool(vol.state.sync_state)
        epochs = self.epochs
        if epochs is None:
            epochs = [] if empty else [tuple(e) for e in vol.state.epochs]
        peer = await handshake_target(
            fs,
            secret=None,
            volume_uuid=None if empty else vol.uuid,
            node_id=self.node_id,
            epochs=epochs,
            received_seq=0 if empty else vol.received_seq,
            applied_seq=0 if empty else vol.last_seq,
        )
        wake = trio.Event()
        pending_verify: list[VerifyReq] = []
        acked = [(-1, -1)]
        ready = [not empty]

        async def acker() -> None:
            nonlocal wake
            while True:
                await wake.wait()
                wake = trio.Event()
                if self.acks_held:
                    await self._release.wait()
                v = self.volume
                pos = (v.received_seq, v.last_seq)
                if ready[0] and pos != acked[0]:
                    self.unacked = 0
                    acked[0] = pos
                    await fs.send(Ack(pos[0], pos[1], time.time_ns()))

        async def answer_verify() -> None:
            v = self.volume
            while pending_verify and pending_verify[0].seq <= v.last_seq:
                req = pending_verify.pop(0)
                from mirrorfs.repl.verify import range_digests

                digests = range_digests(v, req.ranges) if req.seq == v.last_seq else []
                await fs.send(VerifyReply(req.seq, digests))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(acker)
            while True:
                msg = await fs.receive()
                if isinstance(msg, SyncBegin):
                    if self.volume is not None:
                        self.volume.close()
                    self.volume = Volume.create_replica(
                        self.path,
                        volume_uuid=peer.volume_uuid,
                        block_size=msg.block_size,
                        block_count=msg.block_count,
                        start_seq=msg.start_seq,
                        epochs=[list(e) for e in peer.epochs],
                    )
                elif isinstance(msg, SyncBlocks):
                    self.volume.applier.write_sync_blocks(msg.first_block, msg.blocks(BS))
                elif isinstance(msg, SyncEnd):
                    self.volume.applier.finish_sync_copy(msg.consistent_at_seq)
                    ready[0] = True
                    wake.set()
                elif isinstance(msg, Txn):
                    if self.disk_full:
                        await fs.send(ErrorState(PeerState.DISK_FULL, "no space left on device"))
                        nursery.cancel_scope.cancel()
                        return
                    if self.drop_after is not None:
                        if self.drop_after == 0:
                            self.drop_after = None
                            nursery.cancel_scope.cancel()
                            return
                        self.drop_after -= 1
                    self.seqs.append(msg.seq)
                    self.unacked += len(msg.record)
                    self.max_unacked = max(self.max_unacked, self.unacked)
                    if self.recv_delay:
                        await trio.sleep(self.recv_delay)
                    self.volume.applier.apply(self.volume.applier.receive(msg.seq, msg.record))
                    await answer_verify()
                    wake.set()
                elif isinstance(msg, VerifyReq):
                    pending_verify.append(msg)
                    await answer_verify()
                elif isinstance(msg, Ping) and not self.mute:
                    await fs.send(Pong(msg.timestamp_ns))
                    self.pings += 1


# ---------------------------------------------------------------------------- helpers


def make_source(tmp_path, name: str = "src", size: int = 8 * MiB) -> Volume:
    path = str(tmp_path / name)
    Volume.create(path, size)
    return Volume.open(path)


def commit_random(vol: Volume, rng: random.Random, *, blocks: int = 2, lo: int = 64) -> int:
    """One transaction writing ``blocks`` incompressible blocks at random places."""
    for _ in range(blocks):
        vol.write(rng.randrange(lo, vol.block_count), rng.randbytes(BS))
    seq = vol.commit()
    assert seq is not None
    return seq


def fill(vol: Volume, rng: random.Random) -> None:
    """Some content: scattered random blocks, a few runs, one all-zero block written."""
    for _ in range(20):
        commit_random(vol, rng, blocks=3)
    vol.write(300, rng.randbytes(BS * 40))
    vol.write(1500, bytes(BS))
    vol.commit()


def holds(vol: Volume, seq: int) -> bool:
    """Whether the volume's log still holds ``seq``."""
    return 0 < vol.samlog.first_seq <= seq <= vol.samlog.last_seq


def same_blocks(a: Volume, b: Volume) -> bool:
    return a.device.read(0, a.block_count) == b.device.read(0, b.block_count)


async def wait_until(cond, timeout: float = 10.0, what: str = "condition") -> None:
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


def ship(src: Volume, target: MiniTarget, **kw) -> Shipper:
    """A shipper to ``target`` over memory streams."""
    return Shipper(src, ("mini", 0), secret=None, node_id="src", connect=target.connect, **kw)


def caught_up(src: Volume, tgt: MiniTarget):
    def check() -> bool:
        v = tgt.volume
        return v is not None and v.consistent and v.last_seq == src.last_seq

    return check


@pytest.fixture
def rng():
    return random.Random(1234)


# ---------------------------------------------------------------------------- tests


async def test_initial_sync_then_streaming(tmp_path, rng, nursery):
    src = make_source(tmp_path)
    fill(src, rng)
    target = MiniTarget(str(tmp_path / "replica"))
    await nursery.start(target.serve)
    shipper = ship(src, target)
    await nursery.start(shipper.run)
    start = src.last_seq

    await wait_until(caught_up(src, target), what="initial sync")
    assert shipper.state is ShipperState.STREAMING
    assert target.volume.consistent
    assert same_blocks(src, target.volume)
    progress = shipper.status()["initial_sync"]
    assert progress["start_seq"] == start and progress["percent"] == 100.0
    # holes and zero chunks were not sent: far less than the 2048 blocks of the volume
    assert 0 < progress["blocks_sent"] < 2048

    for _ in range(30):
        commit_random(src, rng)
    await wait_until(caught_up(src, target), what="streaming")
    assert target.seqs == list(range(start + 1, src.last_seq + 1))
    assert same_blocks(src, target.volume)
    await wait_until(lambda: shipper.status()["lag_txns"] == 0, what="ACK")
    st = shipper.status()
    assert st["target_node_id"] == "mini"
    assert st["received_seq"] == st["applied_seq"] == src.last_seq
    assert st["bytes_sent"] > 0


async def test_commits_during_initial_sync(tmp_path, rng, nursery):
    """Blocks change while they are copied: the replica still ends block-identical."""
    src = make_source(tmp_path, size=32 * MiB)
    # 8 MiB of data: a copy of several chunks, long enough to commit while it runs
    src.write(64, rng.randbytes(BS * 2048))
    src.commit()
    target = MiniTarget(str(tmp_path / "replica"))
    await nursery.start(target.serve)
    shipper = ship(src, target)
    await nursery.start(shipper.run)
    with trio.fail_after(30):  # every step, not every 10 ms: the copy may be quick
        while shipper.state is not ShipperState.INITIAL_SYNC:
            await trio.sleep(0)
    # Commits while the copy runs (bounded: each one is an fsync, and a slow disk must not
    # turn this into more catching up than the deadline allows).
    for _ in range(300):
        if shipper.state is not ShipperState.INITIAL_SYNC:
            break
        commit_random(src, rng, blocks=4)
        await trio.sleep(0)
    await wait_until(caught_up(src, target), timeout=60.0, what="catch up")
    assert target.volume.consistent
    # the copy overlapped commits: the replica was consistent only after replaying them
    assert target.volume.state.consistent_at > shipper.sync.start_seq
    assert same_blocks(src, target.volume)


async def test_reconnect_resumes_without_gap_or_duplicate(tmp_path, rng, nursery):
    src = make_source(tmp_path)
    fill(src, rng)
    target = MiniTarget(str(tmp_path / "replica"))
    await nursery.start(target.serve)
    shipper = ship(src, target)
    await nursery.start(shipper.run)
    await wait_until(caught_up(src, target))
    first = src.last_seq + 1

    target.drop_after = 7
    for _ in range(40):
        commit_random(src, rng)
    await wait_until(caught_up(src, target), what="resume")
    assert shipper.connections == 2
    assert target.seqs == list(range(first, src.last_seq + 1))
    assert same_blocks(src, target.volume)


async def test_window_bounds_unacknowledged_bytes(tmp_path, rng, nursery):
    src = make_source(tmp_path)
    target = MiniTarget(str(tmp_path / "replica"))
    await nursery.start(target.serve)
    window = 64 << 10
    shipper = ship(src, target, window_bytes=window)
    await nursery.start(shipper.run)
    await wait_until(caught_up(src, target))

    target.hold_acks()
    for _ in range(40):  # ~16 KiB records, 640 KiB in all
        commit_random(src, rng, blocks=4)
    await trio.testing.wait_all_tasks_blocked()  # the sender waits for the window to open
    assert 0 < target.max_unacked <= window
    assert len(target.seqs) < 40
    target.release_acks()
    await wait_until(caught_up(src, target), what="drain after release")
    assert target.max_unacked <= window
    assert same_blocks(src, target.volume)


async def test_fan_out_slow_target_never_slows_commits(tmp_path, rng, nursery):
    src = make_source(tmp_path)
    fast, slow = (
        MiniTarget(str(tmp_path / "fast"), node_id="fast"),
        MiniTarget(str(tmp_path / "slow"), node_id="slow"),
    )
    shippers = []
    for t in (fast, slow):
        await nursery.start(t.serve)
        s = ship(src, t, window_bytes=32 << 10)
        shippers.append(s)
        await nursery.start(s.run)
    install_retention(src, shippers)
    await wait_until(lambda: caught_up(src, fast)() and caught_up(src, slow)())

    slow.recv_delay = 0.05
    times = []
    for _ in range(60):
        t0 = time.perf_counter()
        commit_random(src, rng, blocks=4)
        times.append(time.perf_counter() - t0)
        await trio.sleep(0.002)
    # the slow target is far behind (its window is full), yet commits stayed fast
    assert max(times) < 0.25
    await wait_until(caught_up(src, fast), what="fast target")
    assert slow.volume.last_seq < src.last_seq
    lagging = shippers[1].status()
    assert lagging["lag_txns"] > 0 and lagging["lag_bytes"] > 0
    slow.recv_delay = 0
    await wait_until(caught_up(src, slow), what="slow target")
    assert same_blocks(src, fast.volume) and same_blocks(src, slow.volume)


async def test_lag_figures(tmp_path, rng, nursery):
    src = make_source(tmp_path)
    target = MiniTarget(str(tmp_path / "replica"))
    await nursery.start(target.serve)
    shipper = ship(src, target)
    st = shipper.status()
    assert st["state"] == "connecting" and st["lag_txns"] is None
    await nursery.start(shipper.run)
    await wait_until(caught_up(src, target))
    await wait_until(lambda: shipper.status()["lag_txns"] == 0)

    target.hold_acks()
    for _ in range(5):
        commit_random(src, rng)
    await wait_until(lambda: shipper.status()["lag_seconds"] >= 0.15, what="0.15 s of lag")
    st = shipper.status()
    assert st["lag_txns"] == 5
    assert st["lag_bytes"] >= 5 * 2 * BS
    assert st["lag_seconds"] >= 0.15
    target.release_acks()
    await wait_until(lambda: shipper.status()["lag_txns"] == 0)
    st = shipper.status()
    assert st["lag_bytes"] == 0 and st["lag_seconds"] == 0
    assert st["throughput_bps"] > 0


async def test_retention_pins_then_gives_up_beyond_max_log(tmp_path, rng, nursery):
    src = make_source(tmp_path)
    src.samlog.segment_bytes = 32 << 10
    target = MiniTarget(str(tmp_path / "replica"))
    await nursery.start(target.serve)
    cap = 256 << 10
    # MiniTarget cannot be resynced: this is the behaviour without resync
    shipper = ship(src, target, max_log_bytes=cap, allow_resync=False)
    install_retention(src, [shipper])
    await nursery.start(shipper.run)
    await wait_until(caught_up(src, target))
    await wait_until(lambda: shipper.received_seq == src.last_seq)
    need = src.last_seq + 1
    target.stop()  # the target goes away; the shipper knows where it was

    for _ in range(200):
        commit_random(src, rng, blocks=4)
        src.checkpoint()
        if shipper.state is ShipperState.OUT_OF_SYNC:
            break
        # still pinned: what the absent target needs is kept
        assert holds(src, need)
    else:
        raise AssertionError("the target never stopped pinning")
    assert "log cap" in shipper.reason
    assert not holds(src, need)  # the checkpoint that gave up retired it
    assert not shipper.status()["pinning"]

    # The target comes back: still out-of-sync (its seq is gone), and no longer pins.
    await nursery.start(target.serve)
    shipper.retry()
    await wait_until(lambda: shipper.connections >= 2, what="probe")
    await trio.testing.wait_all_tasks_blocked()  # the probe is over: the shipper idles
    assert shipper.state is ShipperState.OUT_OF_SYNC
    assert "needs seq" in shipper.reason
    commit_random(src, rng)
    src.checkpoint()
    assert not holds(src, need)


async def test_unknown_target_does_not_pin_known_one_does(tmp_path, rng, nursery):
    src = make_source(tmp_path)
    src.samlog.segment_bytes = 16 << 10
    # nobody listens on this port: the shipper never learns a position
    nowhere = Shipper(src, ("127.0.0.1", 1), secret=None, node_id="src")
    install_retention(src, [nowhere])
    await nursery.start(nowhere.run)
    for _ in range(10):
        commit_random(src, rng, blocks=4)
    src.checkpoint()
    assert src.samlog.first_seq == 0  # everything retired
    await wait_until(lambda: nowhere.state is ShipperState.ERROR, what="connect failure")
    assert "connect" in nowhere.reason

    target = MiniTarget(str(tmp_path / "replica"))
    await nursery.start(target.serve)
    known = ship(src, target)
    install_retention(src, [nowhere, known])
    await nursery.start(known.run)
    await wait_until(caught_up(src, target))
    await wait_until(lambda: known.received_seq == src.last_seq)
    need = src.last_seq + 1
    target.stop()
    for _ in range(30):
        commit_random(src, rng, blocks=4)
        src.checkpoint()
    assert holds(src, need)  # no cap: kept for the known target


def test_pinned_bytes_counts_segments_from_seq_except_current():
    segs = [(1, 100), (11, 200), (21, 300), (31, 50)]
    assert pinned_bytes(segs, 5) == 600
    assert pinned_bytes(segs, 11) == 500
    assert pinned_bytes(segs, 25) == 300
    assert pinned_bytes(segs, 31) == 0
    assert pinned_bytes(segs[:1], 1) == 0


@pytest.mark.log_expected(r"fenced")
async def test_fenced_target_stops_shipping(tmp_path, rng, nursery):
    src = make_source(tmp_path)
    fill(src, rng)
    target = MiniTarget(str(tmp_path / "replica"))
    await nursery.start(target.serve)
    shipper = ship(src, target)
    await nursery.start(shipper.run)
    await wait_until(caught_up(src, target))
    target.epochs = [(1, 1), (2, src.last_seq + 1)]  # the target was promoted meanwhile
    target.drop_after = 0
    commit_random(src, rng)
    await wait_until(lambda: shipper.state is ShipperState.FENCED, what="fenced")
    assert "epoch" in shipper.reason
    conns = shipper.connections
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # it waits for a retry() only
    assert shipper.connections == conns  # no more attempts


async def test_wrong_secret_is_an_error_with_reason(tmp_path, rng, nursery):
    src = make_source(tmp_path)
    target = MiniTarget(str(tmp_path / "replica"))
    await nursery.start(target.serve)
    shipper = Shipper(src, ("mini", 0), secret=b"s" * 32, node_id="src", connect=target.connect)
    await nursery.start(shipper.run)
    await wait_until(lambda: shipper.state is ShipperState.ERROR, what="error")
    assert "authentication" in shipper.reason
    assert target.volume is None


async def test_target_error_state_is_reported_and_target_still_pinned(tmp_path, rng, nursery):
    src = make_source(tmp_path)
    target = MiniTarget(str(tmp_path / "replica"))
    await nursery.start(target.serve)
    shipper = ship(src, target)
    install_retention(src, [shipper])
    await nursery.start(shipper.run)
    await wait_until(caught_up(src, target))
    await wait_until(lambda: shipper.received_seq == src.last_seq)
    need = src.last_seq + 1
    target.disk_full = True
    commit_random(src, rng)
    await wait_until(lambda: shipper.state is ShipperState.ERROR, what="error state")
    assert "disk_full" in shipper.reason and "no space" in shipper.reason
    assert shipper.retain_seq() == need  # the commit path goes on; the log keeps it
    target.disk_full = False
    await wait_until(caught_up(src, target), what="recovery")


async def test_keepalive_and_silent_target(tmp_path, rng, nursery, caplog):
    src = make_source(tmp_path)
    target = MiniTarget(str(tmp_path / "replica"))
    await nursery.start(target.serve)
    shipper = ship(src, target, keepalive=0.1, silence=0.5)
    await nursery.start(shipper.run)
    await wait_until(caught_up(src, target))
    pings = target.pings
    # idle for longer than the silence limit, but PINGs are answered
    await wait_until(lambda: target.pings >= pings + 8, what="eight keepalive PINGs")
    assert shipper.connections == 1 and shipper.state is ShipperState.STREAMING
    target.mute = True
    await wait_until(lambda: shipper.connections >= 2, what="drop of a silent target")
    assert "target silent for 0.5 s" in caplog.text


# ---------------------------------------------------------------------------- end to end


@pytest.fixture
def receiver_cls():
    return pytest.importorskip("mirrorfs.repl.receiver").Receiver


async def serve_receiver(nursery, receiver) -> int:
    """``receiver`` behind a TCP listener on 127.0.0.1; its port."""

    async def handler(stream):
        await receiver.serve(stream, "127.0.0.1")

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    return listeners[0].socket.getsockname()[1]


async def receiver_listener(nursery, receiver) -> MemoryListener:
    """``receiver`` behind a MemoryListener (no sockets)."""

    async def handler(stream):
        await receiver.serve(stream, "mem")

    listener = MemoryListener(handler)
    await nursery.start(listener.serve)
    return listener


async def ship_to_receiver(tmp_path, nursery, receiver_cls, src: Volume):
    """A Receiver on a new replica directory and a Shipper of ``src`` to it, running; waits
    for the initial sync. Returns (receiver, shipper, done) where ``done()`` says whether
    the replica has applied everything ``src`` committed."""
    rdir = str(tmp_path / "replica")
    os.makedirs(rdir)
    receiver = receiver_cls(rdir, None, secret=None, node_id="tgt")
    listener = await receiver_listener(nursery, receiver)
    shipper = Shipper(src, ("mem", 0), secret=None, node_id="src", connect=listener.connect)
    await nursery.start(shipper.run)

    def done() -> bool:
        v = receiver.volume
        return v is not None and v.last_seq == src.last_seq and v.consistent

    await wait_until(done, what="initial sync via receiver")
    return receiver, shipper, done


async def test_end_to_end_with_receiver(tmp_path, rng, nursery, receiver_cls):
    from mirrorfs.repl.verify import verify_target

    src = make_source(tmp_path)
    fill(src, rng)
    receiver, shipper, done = await ship_to_receiver(tmp_path, nursery, receiver_cls, src)
    for _ in range(25):
        commit_random(src, rng)
        await trio.sleep(0)
    await wait_until(done, what="streaming via receiver")
    assert same_blocks(src, receiver.volume)
    await wait_until(lambda: shipper.status()["lag_txns"] == 0)
    assert shipper.status()["target_node_id"] == "tgt"

    result = await verify_target(shipper)
    assert result.identical, result.describe()

    # inject a difference in the replica's block file, behind its back
    os.pwrite(receiver.volume.device.fd, b"\xff" * BS, 1000 * BS)
    result = await verify_target(shipper)
    assert result.differing == [(768, 256)], result.describe()


async def test_end_to_end_through_a_faulty_network(tmp_path, rng, nursery, receiver_cls):
    """Connections cut mid-frame and a flipped byte: the receiver drops the connection,
    the shipper reconnects and resumes; the replica ends block-identical."""
    from tests.netproxy import Direction, FaultProxy

    src = make_source(tmp_path)
    fill(src, rng)
    rdir = str(tmp_path / "replica")
    os.makedirs(rdir)
    receiver = receiver_cls(rdir, None, secret=None, node_id="tgt")
    port = await serve_receiver(nursery, receiver)
    proxy = FaultProxy(target=("127.0.0.1", port))
    pport = await nursery.start(proxy.run)
    shipper = Shipper(src, ("127.0.0.1", pport), secret=None, node_id="src")
    await nursery.start(shipper.run)

    def done():
        v = receiver.volume
        return v is not None and v.consistent and v.last_seq == src.last_seq

    await wait_until(done, what="initial sync")
    for i in range(3):
        proxy.cut_after(20_000 + 7_000 * i, Direction.UP)
        for _ in range(15):
            commit_random(src, rng)
            await trio.sleep(0.001)
        await wait_until(done, what=f"resume after cut {i}")
    proxy.flip_after(30_000, Direction.UP)
    for _ in range(15):
        commit_random(src, rng)
        await trio.sleep(0.001)
    await wait_until(done, what="resume after a flipped byte")
    assert shipper.connections >= 5
    assert same_blocks(src, receiver.volume)


async def test_large_records_are_read_off_the_trio_thread(
    tmp_path, rng, nursery, receiver_cls, monkeypatch
):
    """A commit of megabytes is read from the log (pread + crc32) in a worker thread, so the
    loop that serves FUSE goes on; small ones are read inline. All arrive, block for block."""
    import threading

    from mirrorfs.repl import connection

    where: dict[str, set[int]] = {"loop": set(), "worker": set()}
    real = connection.Connection._read_record

    def spy(self, seq):
        thread = "loop" if threading.current_thread() is threading.main_thread() else "worker"
        where[thread].add(seq)
        return real(self, seq)

    monkeypatch.setattr(connection.Connection, "_read_record", spy)
    src = make_source(tmp_path, size=32 * MiB)
    receiver, _, done = await ship_to_receiver(tmp_path, nursery, receiver_cls, src)
    small = commit_random(src, rng)
    src.write(1024, rng.randbytes(connection.READ_IN_THREAD + BS))
    large = src.commit()
    await wait_until(done, what="streaming via receiver")
    assert large in where["worker"] and small in where["loop"], where
    assert same_blocks(src, receiver.volume)
