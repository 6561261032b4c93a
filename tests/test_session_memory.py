"""A whole replication session, Shipper to Receiver, over memory streams on a virtual clock.

No sockets (the shipper's ``connect`` factory hands out ``trio.testing.memory_stream_pair``
ends) and no sleeps on the real clock (``autojump_clock``: trio jumps the clock whenever
every task is blocked), so keepalive, silence and backoff timings of many seconds run in
milliseconds and the same way every time.
"""

from __future__ import annotations

import logging
import os
import random

import pytest
import trio
import trio.testing

from mirrorfs.repl.receiver import Receiver, ReceiverState
from mirrorfs.repl.shipper import Shipper, ShipperState
from mirrorfs.repl.stream import FramedStream, handshake_target
from mirrorfs.store.volume import Volume
from tests.repl_util import MemoryListener

MiB = 1 << 20
BS = 4096


@pytest.fixture
def rng():
    return random.Random(77)


class Pair:
    """A source volume, a Receiver on an empty directory, a Shipper between them."""

    def __init__(self, tmp_path, **shipper_args) -> None:
        path = str(tmp_path / "src")
        Volume.create(path, 8 * MiB)
        self.src = Volume.open(path)
        self.rdir = str(tmp_path / "replica")
        os.makedirs(self.rdir)
        self.receiver = Receiver(self.rdir, None, secret=None, node_id="tgt")
        self.listener = MemoryListener(self._serve)
        self.shipper = Shipper(
            self.src,
            ("mem", 0),
            secret=None,
            node_id="src",
            connect=self.listener.connect,
            **shipper_args,
        )

    async def _serve(self, stream: trio.abc.Stream) -> None:
        await self.receiver.serve(stream, "mem")

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.listener.serve)
        await nursery.start(self.shipper.run)

    def commit(self, rng: random.Random, n: int = 1) -> None:
        for _ in range(n):
            self.src.write(rng.randrange(64, self.src.block_count), rng.randbytes(BS))
            self.src.commit()

    def caught_up(self) -> bool:
        v = self.receiver.volume
        return v is not None and v.consistent and v.last_seq == self.src.last_seq

    def close(self) -> None:
        self.src.close()
        if self.receiver.volume is not None:
            self.receiver.volume.close()


async def settle(p: Pair | None = None) -> None:
    """Until every task waits (for a frame, a timer or an event) and the receiver's worker
    threads are done (a task waiting for one counts as blocked)."""
    await trio.testing.wait_all_tasks_blocked()
    while p is not None and p.receiver.busy:
        await trio.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked()


async def test_initial_sync_streaming_and_acks(tmp_path, rng, nursery, autojump_clock):
    p = Pair(tmp_path)
    p.commit(rng, 10)
    await p.start(nursery)
    await settle(p)
    assert p.caught_up() and p.shipper.state is ShipperState.STREAMING
    assert p.receiver.state is ReceiverState.STREAMING
    p.commit(rng, 25)
    await settle(p)
    assert p.caught_up()
    st = p.shipper.status()
    assert st["received_seq"] == st["applied_seq"] == p.src.last_seq
    assert st["unacked_bytes"] == 0 and st["connections"] == 1
    assert p.src.device.read(0, p.src.block_count) == p.receiver.volume.device.read(
        0, p.src.block_count
    )
    p.close()


async def test_an_idle_session_lives_on_keepalives(tmp_path, rng, nursery, autojump_clock):
    p = Pair(tmp_path, keepalive=5.0, silence=30.0)
    await p.start(nursery)
    await settle(p)
    start = trio.current_time()
    await trio.sleep(600)  # ten virtual minutes of silence from the writers
    assert trio.current_time() - start >= 600
    assert p.shipper.connections == 1 and p.shipper.state is ShipperState.STREAMING
    assert p.receiver.status()["sessions"] == 1
    p.commit(rng)
    await settle(p)
    assert p.caught_up()
    p.close()


async def test_a_cut_connection_is_resumed_after_backoff(tmp_path, rng, nursery, autojump_clock):
    p = Pair(tmp_path)
    await p.start(nursery)
    await settle(p)
    first = p.src.last_seq
    # the target goes away: the connection breaks, reconnects are refused
    p.listener.stop()
    p.commit(rng, 3)
    while "cannot connect" not in p.shipper.reason:
        await trio.sleep(0.01)
    assert p.shipper.state is ShipperState.ERROR and p.shipper.connections == 1
    # it comes back: the next attempt (within the 5 s backoff cap) resumes from its position
    await nursery.start(p.listener.serve)
    await trio.sleep(5.0)
    await settle(p)
    assert p.caught_up() and p.shipper.connections == 2
    assert p.receiver.volume.last_seq == first + 3
    p.close()


async def test_a_silent_target_is_dropped_after_the_silence_limit(
    tmp_path, rng, nursery, autojump_clock
):
    p = Pair(tmp_path, keepalive=5.0, silence=30.0)
    vol = p.src

    async def mute(stream: trio.abc.Stream) -> None:
        """A target that completes the handshake, then never says a thing."""
        fs = FramedStream(stream)
        await handshake_target(
            fs,
            secret=None,
            volume_uuid=vol.uuid,
            node_id="mute",
            epochs=[tuple(e) for e in vol.state.epochs],
            received_seq=vol.last_seq,
            applied_seq=vol.last_seq,
        )
        await trio.sleep_forever()

    p.listener.handler = mute
    await p.start(nursery)
    start = trio.current_time()
    while p.shipper.reason != "target silent for 30 s":
        await trio.sleep(0.01)
    assert 30 <= trio.current_time() - start < 31
    assert p.shipper.connections == 1  # (it reconnects after the backoff)
    p.close()


async def test_a_connection_cut_under_the_receiver_is_one_line_not_a_bug(
    tmp_path, rng, nursery, autojump_clock, caplog
):
    """The source's end of the connection goes away in the middle of a stream: the
    receiver logs one line with the reason, never "receiver bug" with a traceback (the
    reader and the processor share a channel, and the one that did not fail sees it end)."""
    caplog.set_level(logging.INFO, logger="mirrorfs")
    p = Pair(tmp_path)
    clients: list[trio.abc.Stream] = []
    connect = p.listener.connect

    async def recording_connect() -> trio.abc.Stream:
        stream = await connect()
        clients.append(stream)
        return stream

    p.shipper._connect = recording_connect
    await p.start(nursery)
    await settle(p)
    for _ in range(3):
        p.commit(rng, 5)
        await clients[-1].aclose()  # the link is cut under both ends
        await settle(p)
        await trio.sleep(6.0)  # past the shipper's backoff: it reconnects
        await settle(p)
    assert p.caught_up() and p.shipper.connections >= 4
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]
    dropped = [r for r in caplog.records if r.getMessage().startswith("dropped source")]
    assert dropped, "the receiver said nothing of the cut"
    p.close()


@pytest.mark.parametrize("ending", [trio.EndOfChannel, trio.BrokenResourceError])
async def test_a_session_task_that_sees_its_channel_end_is_not_a_bug(tmp_path, caplog, ending):
    """The reader and the processor of a receiver session share a memory channel: when one
    ends with the real reason, the other sees EndOfChannel / BrokenResourceError. That is
    recorded as routine (the first reason wins), never logged as "receiver bug"."""
    from mirrorfs.repl.receiver import _Session

    receiver = Receiver(str(tmp_path), None, secret=None, node_id="tgt")
    ses = _Session(fs=None, machine=None, address="mem")  # type: ignore[arg-type]

    async def ends() -> None:
        raise ending()

    ses.drop("closed: connection reset by peer")  # what the failing task recorded first
    await receiver._guard(ses, lambda s: ends())
    assert ses.reason == "closed: connection reset by peer" and not ses.error
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
