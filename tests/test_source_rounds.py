"""The source's rounds, sans-IO: resync, initial sync, verify, switchover request.

The machines (repl.source_rounds, repl.verify.VerifyRound, repl.switchover.SwitchoverRequest)
take what came in and give what goes out: no trio, no socket, no clock. The last tests drive
``request_switchover`` with a fake shipper on trio's autojump clock: no sockets, no sleeps.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import trio
import trio.testing

from mirrorfs.repl.initial_sync import run_initial_sync
from mirrorfs.repl.resync import ReplyQueue, run_resync
from mirrorfs.repl.source_rounds import (
    SEND_CHUNK,
    InitialSyncRound,
    ResyncError,
    ResyncProgress,
    ResyncRound,
    SyncProgress,
)
from mirrorfs.repl.stream import ConnectionClosed, FramedStream
from mirrorfs.repl.switchover import (
    SwitchoverFailed,
    SwitchoverRequest,
    SwitchoverUnknown,
    request_switchover,
)
from mirrorfs.repl.verify import VerifyRound
from mirrorfs.repl.wire import (
    ProtocolError,
    Switchover,
    SwitchoverDone,
    SwitchoverResult,
    SyncBegin,
    SyncBlocks,
    SyncEnd,
    SyncKind,
    VerifyReply,
    VerifyReq,
)

BS = 4096


class Blocks:
    """A block file as a dict (absent: zeros); digests like range_digests, over contents."""

    def __init__(self, count: int, content: dict[int, bytes] | None = None) -> None:
        self.count = self.block_count = count
        self.block_size = BS
        self.content = dict(content or {})

    def read(self, block: int, n: int) -> bytes:
        return b"".join(self.content.get(b, bytes(BS)) for b in range(block, block + n))

    def digests(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        return [hashlib.sha256(self.read(f, n)).digest() for f, n in ranges]


def run_resync_round(src: Blocks, tgt: Blocks, base: int = 5, **kw) -> tuple[list, ResyncRound]:
    """Drive a ResyncRound as run_resync does; every frame it gives out, in order."""
    progress = ResyncProgress(base_seq=base, start_seq=9, blocks_total=src.count)
    m = ResyncRound(progress, BS, src.count, "t:1", **kw)
    out: list = [m.begin()]
    while (req := m.next_request()) is not None:
        out.append(req)
        m.on_reply(src.digests(req.ranges), VerifyReply(base, tgt.digests(req.ranges)))
    for block, n in m.chunks():
        out.append(m.on_chunk(block, src.read(block, n)))
    out.append(m.end(12, 13))
    return out, m


def test_resync_sends_begin_bisection_requests_the_differing_blocks_and_end():
    src = Blocks(1000, {10: b"a" * BS, 11: b"b" * BS, 700: b"c" * BS})
    tgt = Blocks(1000, {10: b"x" * BS})
    out, m = run_resync_round(src, tgt, granularity=4, fanout=4)
    assert out[0] == SyncBegin(SyncKind.RESYNC, BS, 1000, 9)
    reqs = [f for f in out if isinstance(f, VerifyReq)]
    assert reqs and all(r.seq == 5 for r in reqs)
    # The first round covers the whole volume, in ranges of granularity * fanout**2 blocks.
    assert reqs[0].ranges == [(b, min(64, 1000 - b)) for b in range(0, 1000, 64)]
    assert len(reqs[0].ranges) == 16  # 2 differ, then 2 x 4 parts, then 2 x 4 again
    assert m.differing == [(8, 4), (700, 4)]
    blocks = [f for f in out if isinstance(f, SyncBlocks)]
    assert [(b.first_block, b.nblocks) for b in blocks] == [(8, 4), (700, 4)]
    assert blocks[0].blocks(BS) == src.read(8, 4)
    assert out[-1] == SyncEnd(13)  # the in-flight transaction counts
    p = m.progress
    assert (p.phase, p.end_seq, p.blocks_differing, p.blocks_sent) == ("replaying", 13, 8, 8)
    assert p.rounds == 3 and p.ranges_compared == 16 + 8 + 8
    assert m.first_to_stream == 10
    # Only frames of the exchange, in its order: no request after the blocks.
    kinds = [type(f) for f in out]
    assert kinds.index(SyncBlocks) > max(i for i, k in enumerate(kinds) if k is VerifyReq)


def test_resync_of_identical_copies_sends_no_blocks():
    src = Blocks(300, {5: b"z" * BS})
    out, m = run_resync_round(src, Blocks(300, {5: b"z" * BS}))
    assert [type(f) for f in out] == [SyncBegin, VerifyReq, SyncEnd]
    assert out[-1] == SyncEnd(13) and m.progress.rounds == 1


def test_resync_sends_a_long_difference_in_chunks():
    src = Blocks(2000, {b: bytes([b % 251 + 1]) * BS for b in range(100, 700)})
    out, m = run_resync_round(src, Blocks(2000))
    per = SEND_CHUNK // BS
    assert m.differing == [(64, 640)]  # multiples of the granularity (64)
    blocks = [(f.first_block, f.nblocks) for f in out if isinstance(f, SyncBlocks)]
    assert per == 32  # 128 KiB, as the initial sync's and TXN_PART's chunks
    assert blocks == [(b, per) for b in range(64, 704, per)]


def test_resync_end_seq_is_the_last_seq_without_a_transaction_in_flight():
    progress = ResyncProgress(base_seq=1, start_seq=3, blocks_total=64)
    m = ResyncRound(progress, BS, 64, "t:1")
    m.begin()
    req = m.next_request()
    m.on_reply([b"a"], VerifyReply(1, [b"a"]))
    assert req == VerifyReq(1, [(0, 64)]) and m.next_request() is None
    assert list(m.chunks()) == []
    assert m.end(7, None) == SyncEnd(7) and progress.end_seq == 7


def test_resync_reply_for_another_seq_or_without_a_request_is_refused():
    progress = ResyncProgress(base_seq=5, start_seq=9, blocks_total=64)
    m = ResyncRound(progress, BS, 64, "t:1")
    m.begin()
    with pytest.raises(ProtocolError, match="without a request"):
        m.on_reply([], VerifyReply(5, []))
    m.next_request()
    with pytest.raises(ResyncError) as err:
        m.on_reply([b"a"], VerifyReply(6, [b"a"]))
    assert str(err.value) == (
        "target t:1 answered VERIFY_REQ(seq 5) with seq 6 and 1 digest(s) for 1: "
        "it moved during a resync"
    )


def test_initial_sync_skips_zero_chunks_and_sends_the_rest():
    progress = SyncProgress(start_seq=4, blocks_total=2000)
    m = InitialSyncRound(progress, BS, 2000)
    src = Blocks(2000, {3: b"q" * BS, 1005: b"r" * BS})
    assert m.begin() == SyncBegin(SyncKind.FULL, BS, 2000, 4)
    per = m.per_chunk
    sent, seen = [], []
    for block, n in m.chunks([(0, per + 10), (1000, 1010)]):
        seen.append((block, n))
        msg = m.on_chunk(block, src.read(block, n))
        assert progress.blocks_done == block + n
        if msg is not None:
            sent.append((msg.first_block, msg.nblocks, msg.blocks(BS)))
    assert seen == [(0, per), (per, 10), (1000, 10)]
    assert sent == [(0, per, src.read(0, per)), (1000, 10, src.read(1000, 10))]
    assert progress.blocks_sent == per + 10
    assert m.end(8, 9) == SyncEnd(9) and progress.blocks_done == 2000
    assert m.end(8, None) == SyncEnd(8) and m.first_to_stream == 5


# -- verify_target's round


def test_verify_round_bisects_and_merges_what_differs():
    src = Blocks(1000, {10: b"a" * BS, 11: b"b" * BS})
    tgt = Blocks(1000)
    m = VerifyRound("t:1", BS, 1000, granularity=4, fanout=4)
    asked = []
    seq = 20
    while (batch := m.next_batch()) is not None:
        asked.append(batch)
        m.on_answer(seq, src.digests(batch), tgt.digests(batch))
        seq += 1
    r = m.result
    assert m.done and r.differing == [(8, 4)] and r.rounds == 3
    assert r.seq == 20 and r.blocks == 1000 and not r.identical
    assert asked[0] == [(b, min(64, 1000 - b)) for b in range(0, 1000, 64)]


def test_verify_round_cuts_requests_to_round_bytes_and_retries_a_failed_batch():
    m = VerifyRound("t:1", BS, 100, [(0, 100)], granularity=4, attempts=3, round_bytes=40 * BS)
    first = m.next_batch()
    assert first == [(0, 40)]
    assert m.on_failure() and m.next_batch() == first  # the same batch again
    assert m.on_failure() and not m.on_failure()  # the third failure: give up
    m = VerifyRound("t:1", BS, 100, [(0, 100)], round_bytes=40 * BS, attempts=2)
    assert m.next_batch() == [(0, 40)] and m.on_failure()
    m.on_answer(3, [b"x"], [b"x"])  # an answer resets the count for the next batch
    assert m.next_batch() == [(40, 40)] and m.on_failure() and not m.on_failure()


# -- the switchover request


def done(result=SwitchoverResult.PROMOTED, epoch=2, start=8, text=""):
    return SwitchoverDone(result, epoch, start, text)


def test_switchover_request_outcomes():
    m = SwitchoverRequest("t:1", 7, "127.0.0.1:9")
    assert m.request() == Switchover(7, "127.0.0.1:9") and not m.settled
    m.on_reply(done())
    m.on_reply(done(SwitchoverResult.REFUSED, text="late"))  # the first answer counts
    assert m.settled and m.outcome() == done()

    m = SwitchoverRequest("t:1", 7, "x")
    m.on_reply(done(SwitchoverResult.REFUSED, text="busy"))
    with pytest.raises(SwitchoverFailed, match=r"^target t:1 refused: busy$"):
        m.outcome()
    m = SwitchoverRequest("t:1", 7, "x")
    m.on_reply(done(start=9))
    with pytest.raises(SwitchoverUnknown, match=r"promoted from seq 9, not 8$"):
        m.outcome()
    m = SwitchoverRequest("t:1", 7, "x")
    m.on_closed()
    assert m.settled
    with pytest.raises(SwitchoverUnknown, match="did not answer the switchover request at seq 7"):
        m.outcome()
    err = m.send_failed(ConnectionClosed("gone"))
    assert isinstance(err, SwitchoverFailed)
    assert str(err) == "cannot send the switchover request: gone"


class FakeShipper:
    """What request_switchover uses of a Shipper; ``answer`` is called when a frame is sent."""

    label = "t:1"
    session_id = 1

    def __init__(self, answer=None, fail: bool = False) -> None:
        self.on_message: dict = {}
        self.on_session_end: list = []
        self.sent: list = []
        self.answer = answer
        self.fail = fail

    async def send_message(self, msg) -> None:
        if self.fail:
            raise ConnectionClosed("target t:1 is error, not streaming")
        self.sent.append(msg)
        if self.answer is not None:
            self.answer(self)

    def end_session(self) -> None:
        for notify in list(self.on_session_end):
            notify()


async def test_request_switchover_returns_the_answer(autojump_clock, nursery):
    async def later(sh):
        await trio.sleep(2)
        sh.on_message[SwitchoverDone](done())

    sh = FakeShipper(answer=lambda sh: nursery.start_soon(later, sh))
    t0 = trio.current_time()
    assert await request_switchover(sh, 7, "m:1", timeout=30) == done()
    assert trio.current_time() - t0 == pytest.approx(2)
    assert sh.sent == [Switchover(7, "m:1")] and not sh.on_message and not sh.on_session_end


async def test_request_switchover_ends_when_the_connection_does(autojump_clock, nursery):
    async def later(sh):
        await trio.sleep(1)
        sh.end_session()

    sh = FakeShipper(answer=lambda sh: nursery.start_soon(later, sh))
    t0 = trio.current_time()
    with pytest.raises(SwitchoverUnknown, match="did not answer"):
        await request_switchover(sh, 7, "m:1", timeout=30)
    assert trio.current_time() - t0 == pytest.approx(1)  # woken at once, not polled
    assert not sh.on_message and not sh.on_session_end


async def test_request_switchover_times_out_or_fails_to_send(autojump_clock):
    sh = FakeShipper()
    t0 = trio.current_time()
    with pytest.raises(SwitchoverUnknown, match="at seq 7$"):
        await request_switchover(sh, 7, "m:1", timeout=30)
    assert trio.current_time() - t0 == pytest.approx(30)
    with pytest.raises(SwitchoverFailed, match="^cannot send the switchover request: target"):
        await request_switchover(FakeShipper(fail=True), 7, "m:1")


# -- the thin drivers over a memory stream: they send exactly what the rounds say


class FakeWriter:
    in_flight_seq: int | None = 13


class FakeVolume:
    """What run_resync / run_initial_sync read of a source volume."""

    def __init__(self, device, last_seq: int = 12) -> None:
        self.device = device
        self.block_size = BS
        self.block_count = device.block_count
        self.last_seq = last_seq
        self.writer = FakeWriter()
        self.flushed = 0

    def flush_in_place(self) -> None:
        self.flushed += 1


class FileBlocks(Blocks):
    """Blocks in a sparse file (SEEK_DATA sees its holes)."""

    def __init__(self, path, count: int, content: dict[int, bytes]) -> None:
        super().__init__(count, content)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, count * BS)
        for b, data in content.items():
            os.pwrite(self.fd, data, b * BS)


async def collect(fs: FramedStream, until: type) -> list:
    out = []
    while not out or not isinstance(out[-1], until):
        out.append(await fs.receive())
    return out


async def test_run_resync_sends_what_the_round_says(autojump_clock, nursery):
    src = Blocks(1000, {10: b"a" * BS, 11: b"b" * BS, 700: b"c" * BS})
    tgt = Blocks(1000, {10: b"x" * BS})
    expected, _ = run_resync_round(src, tgt)
    a, b = trio.testing.memory_stream_pair()
    fa, fb = FramedStream(a), FramedStream(b)
    replies = ReplyQueue()
    got: list = []

    async def target() -> None:
        while True:
            msg = await fb.receive()
            got.append(msg)
            if isinstance(msg, VerifyReq):
                replies.put(VerifyReply(5, tgt.digests(msg.ranges)))
            elif isinstance(msg, SyncEnd):
                return

    nursery.start_soon(target)
    progress = ResyncProgress(base_seq=5, start_seq=9, blocks_total=1000)
    assert await run_resync(FakeVolume(src), fa, progress, replies, "t:1") == 10
    await wait_all_received(got, SyncEnd)
    assert got == expected
    assert progress.wire_bytes == fa.bytes_sent and progress.phase == "replaying"


async def wait_all_received(got: list, last: type) -> None:
    while not got or not isinstance(got[-1], last):
        await trio.sleep(0.01)


async def test_run_initial_sync_sends_the_data_runs(tmp_path, autojump_clock, nursery):
    content = {3: b"q" * BS, 700: b"r" * BS, 701: bytes(BS)}
    dev = FileBlocks(tmp_path / "blocks", 2048, content)
    try:
        vol = FakeVolume(dev, last_seq=12)
        vol.writer.in_flight_seq = None  # (an instance attribute: this volume's only)
        a, b = trio.testing.memory_stream_pair()
        fa, fb = FramedStream(a), FramedStream(b)
        got: list = []

        async def target() -> None:
            got.extend(await collect(fb, SyncEnd))

        nursery.start_soon(target)
        progress = SyncProgress(start_seq=4, blocks_total=2048)
        assert await run_initial_sync(vol, fa, progress, "t:1") == 5
        await wait_all_received(got, SyncEnd)
    finally:
        os.close(dev.fd)
    assert vol.flushed == 1
    assert got[0] == SyncBegin(SyncKind.FULL, BS, 2048, 4) and got[-1] == SyncEnd(12)
    blocks = {}
    for m in got[1:-1]:
        assert isinstance(m, SyncBlocks)
        data = m.blocks(BS)
        for i in range(m.nblocks):
            blocks[m.first_block + i] = data[i * BS : (i + 1) * BS]
    assert {k: v for k, v in blocks.items() if v != bytes(BS)} == {
        3: b"q" * BS,
        700: b"r" * BS,
    }
    assert progress.blocks_done == 2048 and progress.blocks_sent == sum(
        m.nblocks for m in got[1:-1]
    )
