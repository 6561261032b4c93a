"""Block-range checksums and bisection (mirrorfs.repl.verify), locally and over a shipper."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
import trio

from mirrorfs.repl.verify import (
    VerifyChannel,
    VerifyError,
    diff_volumes,
    find_differences,
    merge_ranges,
    range_digests,
    split_range,
    verify_target,
    whole_volume,
)
from mirrorfs.repl.wire import ProtocolError, VerifyReply, VerifyReq
from tests.test_shipper import (
    BS,
    MiniTarget,
    caught_up,
    commit_random,
    fill,
    make_source,
    ship,
    wait_until,
)


@pytest.fixture
def rng():
    return random.Random(99)


def test_range_digests_are_sha256_of_the_committed_blocks(tmp_path, rng):
    vol = make_source(tmp_path)
    try:
        data = rng.randbytes(BS * 300)
        vol.write(100, data)
        vol.commit()
        vol.write(100, bytes(BS))  # open transaction: not part of the committed state
        want = [
            hashlib.sha256(data[: BS * 10]).digest(),
            hashlib.sha256(data + bytes(BS * 100)).digest(),
            hashlib.sha256(bytes(BS)).digest(),
        ]
        got = range_digests(vol, [(100, 10), (100, 400), (2000, 1)])
        assert got == want
        assert range_digests(vol.device, [(100, 10)]) == want[:1]
        with pytest.raises(ValueError):
            range_digests(vol, [(2040, 9)])
    finally:
        vol.close()


def test_split_and_merge_ranges():
    assert split_range((0, 2048), 16, 256) == [(b, 256) for b in range(0, 2048, 256)]
    assert split_range((1000, 100), 16, 256) == [(1000, 100)]
    parts = split_range((0, 100_000), 16, 256)
    assert len(parts) <= 16 and sum(c for _, c in parts) == 100_000
    assert all(c % 256 == 0 for _, c in parts[:-1])
    assert whole_volume(1000, 300) == [(0, 300), (300, 300), (600, 300), (900, 100)]
    assert merge_ranges([(512, 256), (0, 256), (256, 256), (1024, 1)]) == [(0, 768), (1024, 1)]


async def test_bisection_narrows_to_granularity():
    bad = {5, 70_000, 70_001, 123_456}

    async def compare(ranges):
        return [any(f <= b < f + c for b in bad) for f, c in ranges]

    found, rounds = await find_differences(compare, whole_volume(200_000, 65536), granularity=256)
    assert merge_ranges(found) == [(0, 256), (69888, 256), (123392, 256)]
    assert rounds <= 4


def test_diff_volumes_finds_an_injected_difference(tmp_path, rng):
    a = make_source(tmp_path, "a")
    try:
        fill(a, rng)
        a.checkpoint()
        b_path = str(tmp_path / "b")
        os.makedirs(b_path)
        with open(os.path.join(a.path, "blocks"), "rb") as f:
            content = bytearray(f.read())
        assert diff_volumes(a, _FakeDevice(bytes(content))) == []
        content[1234 * BS + 17] ^= 0xFF
        content[1800 * BS] ^= 0x01
        assert diff_volumes(a, _FakeDevice(bytes(content))) == [(1024, 256), (1792, 256)]
    finally:
        a.close()


class _FakeDevice:
    """A block file in memory (what range_digests needs of a device)."""

    block_size = BS

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.block_count = len(content) // BS

    def read(self, block: int, count: int) -> bytes:
        return self.content[block * BS : (block + count) * BS]


async def test_verify_target_over_the_connection(tmp_path, rng, nursery):
    src = make_source(tmp_path)
    fill(src, rng)
    target = MiniTarget(str(tmp_path / "replica"))
    await nursery.start(target.serve)
    shipper = ship(src, target)
    with pytest.raises(VerifyError):
        await shipper.verify_round([(0, 1)], timeout=1)
    await nursery.start(shipper.run)
    await wait_until(caught_up(src, target))

    # identical, even while commits keep coming: each round compares one seq on both sides
    stop = trio.Event()

    async def writer():
        while not stop.is_set():
            commit_random(src, rng)
            await trio.sleep(0.002)

    nursery.start_soon(writer)
    result = await verify_target(shipper)
    assert result.identical, result.describe()
    assert result.seq > 0 and result.blocks == src.block_count
    stop.set()
    await wait_until(caught_up(src, target))

    # a difference behind the replica's back is found and narrowed down
    os.pwrite(target.volume.device.fd, b"\x5a" * BS, 77 * BS)
    os.pwrite(target.volume.device.fd, b"\x5a" * BS, 1999 * BS)
    result = await verify_target(shipper, granularity=64)
    assert result.differing == [(64, 64), (1984, 64)], result.describe()
    assert "differ" in result.describe()

    # small requests (each one seq): same answer, more round trips
    result = await verify_target(shipper, granularity=64, round_bytes=256 * BS)
    assert result.differing == [(64, 64), (1984, 64)], result.describe()
    assert result.blocks == src.block_count


def test_verify_channel_pairs_replies_with_requests_in_order():
    """The channel's bookkeeping, without a connection (its ``request`` only waits on it)."""

    class Vol:
        block_size, block_count, last_seq = BS, 8, 42

        def read(self, block, count):
            return bytes(count * BS)

    ch = VerifyChannel("t:1")
    woken: list[str] = []
    first = ch.queue([(0, 4)], notify=lambda: woken.append("first"))
    second = ch.queue([(4, 4), (0, 1)], notify=lambda: woken.append("second"))
    bad = ch.queue([(6, 4)], notify=lambda: woken.append("bad"))
    assert ch.wanted
    assert ch.next_request(Vol()) == VerifyReq(42, [(0, 4)])
    assert ch.next_request(Vol()) == VerifyReq(42, [(4, 4), (0, 1)])
    assert ch.next_request(Vol()) is None and bad.done and "outside the volume" in bad.error
    ch.on_reply(VerifyReply(42, [b"x" * 32]))
    assert (
        first.done
        and first.target == [b"x" * 32]
        and first.source == range_digests(Vol(), [(0, 4)])
    )
    ch.on_reply(VerifyReply(43, []))  # the target was elsewhere: that job fails, others go on
    assert second.error == (
        "target t:1 answered VERIFY_REQ(seq 42, 2 ranges) with seq 43, 0 digests"
    )
    assert woken == ["bad", "first", "second"]
    with pytest.raises(ProtocolError, match="VERIFY_REPLY for seq 1 without a request"):
        ch.on_reply(VerifyReply(1, []))
    late = ch.queue([(0, 1)], notify=lambda: None)
    ch.fail_all("connection lost")
    assert late.done and late.error == "connection lost" and not ch.wanted
