"""Large transactions over a link that is cut every few hundred KiB (repl.txn_parts).

First the pure parts, with no I/O: how a record is split, where a source resumes, and what
the target keeps of the parts, connection after connection. Then the target's session
machine over a fake store, and last a real shipper and receiver in this process, over TCP
on 127.0.0.1 through the fault proxy, resetting every connection after 256 KiB.
"""

from __future__ import annotations

import logging
import os
import random
import zlib

import pytest
import trio
import trio.testing

from mirrorfs.repl.auth import AuthRole
from mirrorfs.repl.handshake import Peer
from mirrorfs.repl.target_session import TargetSession
from mirrorfs.repl.txn_parts import (
    TXN_CHUNK,
    WHOLE_RECORD_MAX,
    PartialTxn,
    chunk_for,
    resume_offset,
    split_record,
    take_part,
)
from mirrorfs.repl.wire import FrameDecoder, ProtocolError, Txn, TxnPart
from tests.test_target_session import FakeStore

KiB = 1 << 10
MiB = 1 << 20


def parts_of(seq: int, record: bytes, start: int = 0, chunk: int = TXN_CHUNK) -> list[TxnPart]:
    frames = list(split_record(seq, record, start=start, chunk=chunk))
    assert all(isinstance(f, TxnPart) for f in frames)
    return frames  # type: ignore[return-value]


# ---------------------------------------------------------------------------- splitting


def test_small_record_is_one_txn_large_one_parts():
    small = os.urandom(TXN_CHUNK)
    assert list(split_record(3, small)) == [Txn(3, small)]
    big = os.urandom(3 * TXN_CHUNK + 5)
    parts = parts_of(4, big)
    assert [p.offset for p in parts] == [0, TXN_CHUNK, 2 * TXN_CHUNK, 3 * TXN_CHUNK]
    assert b"".join(p.data for p in parts) == big
    assert {(p.seq, p.total, p.crc) for p in parts} == {(4, len(big), zlib.crc32(big))}
    # Resumed inside the record: the parts from there, cut at the same chunk size.
    rest = parts_of(4, big, start=TXN_CHUNK + 7)
    assert [p.offset for p in rest] == [TXN_CHUNK + 7, 2 * TXN_CHUNK + 7]
    assert b"".join(p.data for p in rest) == big[TXN_CHUNK + 7 :]
    # A small record resumed (it was sent in parts by a source with a smaller chunk).
    assert parts_of(5, small, start=10)[0].offset == 10


def test_every_part_fits_a_frame_with_room_to_spare():
    part = parts_of(1, os.urandom(2 * TXN_CHUNK))[0]
    frame = part.encode()
    # One part and the handshake (well under 4 KiB) fit in 256 KiB.
    assert len(frame) <= TXN_CHUNK + 64 and len(frame) + 4 * KiB < 256 * KiB


@pytest.mark.parametrize(
    "announced, expect",
    [
        ((7, 1000), 1000),  # the target holds 1000 bytes of this record
        ((6, 1000), 0),  # of another record
        ((7, 0), 0),
        ((7, 5000), 0),  # past its end: not this record after all
        ((7, 4999), 4999),
        ((0, 0), 0),
    ],
)
def test_resume_offset(announced, expect):
    assert resume_offset(7, bytes(5000), *announced) == expect


# ---------------------------------------------------------------------------- assembling


def test_parts_assemble_once_and_only_in_order():
    rec = os.urandom(5 * 1000 + 1)
    parts = parts_of(9, rec, chunk=1000)
    held, out = take_part(None, parts[0])
    assert out is None and held.offset == 1000
    with pytest.raises(ProtocolError, match="at byte 2000, but the target holds 1000"):
        take_part(held, parts[2])  # a gap
    assert held.offset == 1000  # kept: what it holds is still good
    for p in parts[1:-1]:
        held, out = take_part(held, p)
        assert out is None
    held, out = take_part(held, parts[-1])
    assert out == rec and held.complete


def test_resume_across_connections_makes_progress_every_time():
    """A link that carries ``budget`` bytes of parts per connection: each connection moves
    the announced offset forward by whole parts, and the record arrives intact."""
    rec = os.urandom(2 * MiB + 12345)
    budget = 256 * KiB - 300  # what is left of a 256 KiB connection after the handshake
    held: PartialTxn | None = None
    offsets, record, connections = [], None, 0
    while record is None:
        connections += 1
        seq, offset = (held.seq, held.resume_at) if held is not None else (0, 0)
        offsets.append(offset)
        carried = 0
        for frame in split_record(3, rec, start=resume_offset(3, rec, seq, offset)):
            carried += len(frame.encode())
            if carried > budget:
                break  # cut inside this frame: the target never sees it
            held, record = take_part(held, frame)
        assert connections < 100
    assert record == rec
    # Every connection moved it by one whole part (the last one carried the short tail too).
    assert [b - a for a, b in zip(offsets, offsets[1:], strict=False)] == [TXN_CHUNK] * (
        connections - 1
    )
    assert connections == len(rec) // TXN_CHUNK


def test_a_flipped_byte_loses_one_part_at_most():
    rec = os.urandom(3 * TXN_CHUNK)
    parts = parts_of(2, rec)
    held, _ = take_part(None, parts[0])
    frame = bytearray(parts[1].encode())
    frame[len(frame) // 2] ^= 0x40
    dec = FrameDecoder()
    dec.feed(bytes(frame))
    with pytest.raises(ProtocolError, match="CRC mismatch"):
        dec.next_message()  # never becomes a part: the connection is dropped
    assert held.resume_at == TXN_CHUNK  # the next connection resumes after part 0
    for p in parts_of(2, rec, start=held.resume_at):
        held, out = take_part(held, p)
    assert out == rec


def test_parts_that_do_not_add_up_to_the_crc_are_discarded():
    rec = bytearray(os.urandom(2 * 1000))
    good = parts_of(4, bytes(rec), chunk=1000)
    rec[1500] ^= 1  # a source that changed the record between connections (a bug)
    bad = parts_of(4, bytes(rec), chunk=1000)[1]
    bad = TxnPart(4, good[1].total, good[1].crc, 1000, bad.data)
    held, _ = take_part(None, good[0])
    with pytest.raises(ProtocolError, match="do not match their crc32"):
        take_part(held, bad)
    assert held.resume_at == 0 and not held.complete  # announced from the start again


def test_another_record_replaces_what_is_held_only_from_its_start():
    a, b = os.urandom(3000), os.urandom(3000)
    held, _ = take_part(None, parts_of(5, a, chunk=1000)[0])
    with pytest.raises(ProtocolError, match="holds 1000 bytes of seq 5"):
        take_part(held, parts_of(6, b, chunk=1000)[1])
    with pytest.raises(ProtocolError, match="holds none of it"):
        take_part(None, parts_of(6, b, chunk=1000)[1])
    held, out = take_part(held, parts_of(6, b, chunk=1000)[0])
    assert held.seq == 6 and held.offset == 1000 and out is None


def test_complete_but_not_logged_is_resumed_at_its_last_part():
    """A record completed just before the cut, whose group was never logged: the target
    announces its last part, and that part completes it again."""
    rec = os.urandom(2500)
    held = None
    for p in parts_of(8, rec, chunk=1000):
        held, out = take_part(held, p)
    assert out == rec and held.resume_at == 2000
    (again,) = parts_of(8, rec, start=held.resume_at, chunk=1000)
    held, out = take_part(held, again)
    assert out == rec and held.complete


def test_part_message_checks():
    with pytest.raises(ValueError, match="runs past"):
        TxnPart(1, 10, 0, 5, b"123456").encode()
    with pytest.raises(ValueError, match="empty part"):
        TxnPart(1, 10, 0, 5, b"").encode()


# ---------------------------------------------------------------------------- session


class PartStore(FakeStore):
    """The fake store with the real part keeping of ReplicaStore (held across sessions)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.partial: PartialTxn | None = None

    def take_part(self, part: TxnPart) -> bytes | None:
        self.calls.append(("part", part.seq, part.offset))
        self.partial, record = take_part(self.partial, part)
        return record


PEER = Peer(AuthRole.SOURCE, "src", bytes(range(16)), ((1, 1),), 2, last_seq=10)


def test_session_applies_a_record_once_its_parts_are_in():
    store = PartStore(received=5, applied=5)
    rec = os.urandom(2500)
    parts = parts_of(6, rec, chunk=1000)
    first = TargetSession(store, PEER, empty=False)
    assert first.handle(parts[0]).drop is None
    first.close("cut")  # the connection is cut: the part stays with the store
    second = TargetSession(store, PEER, empty=False)
    assert store.partial.resume_at == 1000
    for p in parts_of(6, rec, start=1000, chunk=1000):
        out = second.handle(p)
        assert out.drop is None and not out.send
    assert store.calls == [("part", 6, 0), ("part", 6, 1000), ("part", 6, 2000), ("apply", 6)]
    assert second.ack(0.0, 0).received_seq == 6


def test_session_drops_a_part_that_does_not_continue():
    store = PartStore()
    ses = TargetSession(store, PEER, empty=False)
    out = ses.handle(parts_of(6, os.urandom(3000), chunk=1000)[1])
    assert out.drop is not None and "TXN_PART: TXN_PART of seq 6 at byte 1000" in out.drop.reason
    assert not out.drop.error  # the connection's fault, not the node's


def test_session_refuses_parts_where_a_txn_is_refused():
    store = PartStore(present=False)
    ses = TargetSession(store, PEER, empty=True)
    out = ses.handle(parts_of(1, os.urandom(3000), chunk=1000)[0])
    assert out.drop is not None and "before the initial sync completed" in out.drop.reason
    store = PartStore()
    ses = TargetSession(store, PEER, empty=False, fork_seq=3)
    out = ses.handle(parts_of(6, os.urandom(3000), chunk=1000)[0])
    assert "diverged after seq 3" in out.drop.reason and store.partial is None


# ---------------------------------------------------------------------------- end to end


async def _source_and_receiver(tmp_path, nursery, rng):
    """A 32 MiB source with one commit, and a receiver served on 127.0.0.1: (src, receiver,
    port)."""
    from mirrorfs.repl.receiver import Receiver
    from tests.test_shipper import commit_random, make_source, serve_receiver

    src = make_source(tmp_path, size=32 * MiB)
    commit_random(src, rng)
    rdir = str(tmp_path / "replica")
    os.makedirs(rdir)
    receiver = Receiver(rdir, None, secret=None, node_id="tgt")
    return src, receiver, await serve_receiver(nursery, receiver)


def _caught_up(receiver, src) -> bool:
    v = receiver.volume
    return v is not None and v.consistent and v.last_seq == src.last_seq


async def _wait(cond, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


async def test_large_transactions_through_resets_every_256k(tmp_path, nursery, caplog):
    """A real shipper and receiver over TCP, every connection reset after 256 KiB and one
    byte flipped once: two 3 MiB transactions and small ones arrive block-identical, and
    what the receiver holds of a record grows between reconnects."""
    from mirrorfs.repl.shipper import Shipper
    from tests.netproxy import Direction, FaultProxy
    from tests.test_shipper import commit_random, same_blocks

    caplog.set_level(logging.INFO, logger="mirrorfs")
    rng = random.Random(99)
    src, receiver, port = await _source_and_receiver(tmp_path, nursery, rng)
    proxy = FaultProxy(target=("127.0.0.1", port))
    pport = await nursery.start(proxy.run)
    shipper = Shipper(src, ("127.0.0.1", pport), secret=None, node_id="src")
    await nursery.start(shipper.run)

    def done():
        return _caught_up(receiver, src)

    await _wait(done)
    proxy.reset_every(256 * KiB, Direction.UP)
    proxy.cut_all()  # the connection up now is past 256 KiB already
    # One byte flipped once, inside the first part that the next connection carries.
    proxy.flip_at(20 * KiB, Direction.UP)
    for i in range(2):
        src.write(1000 + i * 1000, rng.randbytes(3 * MiB))
        src.commit()
        commit_random(src, rng)
    seen: list[tuple[int, int]] = []  # (seq, bytes held) as the receiver's status moves
    with trio.fail_after(120):
        while not done():
            p = receiver.status()["partial"]
            if p is not None and (not seen or seen[-1] != (p["seq"], p["bytes"])):
                seen.append((p["seq"], p["bytes"]))
            await trio.sleep(0.005)
    assert same_blocks(src, receiver.volume)
    # Progress between reconnects: per record, what the receiver held only grew.
    for seq in {s for s, _ in seen}:
        held = [b for s, b in seen if s == seq]
        assert held == sorted(held) and len(held) >= 5, (seq, held)
    assert shipper.connections >= 2 * 3 * MiB // (256 * KiB)
    assert all(c.up <= 256 * KiB for c in proxy.connections[-10:])
    resumed = [r for r in caplog.records if "resuming seq" in r.getMessage()]
    assert len(resumed) >= 10
    # The flipped byte was caught by a frame CRC and ended one connection, nothing more.
    assert any("CRC mismatch" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the log"


class _Tap(trio.abc.Stream):
    """A stream that decodes the frames written through it (what the source sent)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.decoder = FrameDecoder()
        self.sent: list[object] = []

    async def send_all(self, data) -> None:
        self.decoder.feed(bytes(data))
        while (msg := self.decoder.next_message()) is not None:
            self.sent.append(msg)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None):
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_healthy_link_sends_large_records_whole(tmp_path, nursery):
    """Pieces cost a copy and a crc32 on both ends: on a connection that has carried a
    record, the next large records go as one TXN frame each, none in TXN_PARTs."""
    from mirrorfs.repl.shipper import Shipper
    from tests.test_shipper import commit_random, same_blocks

    assert chunk_for(first_of_connection=True) == TXN_CHUNK
    assert chunk_for(first_of_connection=False) == WHOLE_RECORD_MAX > 3 * MiB
    rng = random.Random(7)
    src, receiver, port = await _source_and_receiver(tmp_path, nursery, rng)
    taps: list[_Tap] = []

    async def connect() -> trio.abc.Stream:
        taps.append(_Tap(await trio.open_tcp_stream("127.0.0.1", port)))
        return taps[-1]

    shipper = Shipper(src, ("127.0.0.1", port), secret=None, node_id="src", connect=connect)
    await nursery.start(shipper.run)

    def done():
        return _caught_up(receiver, src)

    await _wait(done)
    commit_random(src, rng)  # the connection's first record (small)
    big = []
    for i in range(2):
        src.write(1000 + i * 1000, rng.randbytes(3 * MiB))
        big.append(src.commit())
    await _wait(done)
    assert same_blocks(src, receiver.volume)
    assert len(taps) == 1
    whole = {m.seq for m in taps[0].sent if isinstance(m, Txn)}
    parts = {m.seq for m in taps[0].sent if isinstance(m, TxnPart)}
    assert set(big) <= whole and not parts & set(big), (big, whole, parts)


# ---------------------------------------------------------------------------- initial sync


def test_initial_sync_round_resumed_skips_what_the_target_holds():
    from mirrorfs.repl.source_rounds import SYNC_CHUNK, InitialSyncRound, SyncProgress

    bs = 4096
    per = SYNC_CHUNK // bs
    runs = [(0, 10), (40, 40 + 3 * per), (1000, 1001)]
    fresh = list(InitialSyncRound(SyncProgress(7, 2048), bs, 2048).chunks(runs))
    resumed_at = 40 + per  # the target holds the first two runs' chunks below it
    m = InitialSyncRound(SyncProgress(7, 2048), bs, 2048, first_block=resumed_at)
    assert m.begin().first_block == resumed_at and m.begin().start_seq == 7
    assert list(m.chunks(runs)) == [c for c in fresh if c[0] >= resumed_at]
    assert list(m.chunks(runs))[0] == (resumed_at, per)


async def test_initial_sync_through_resets_every_256k(tmp_path, nursery, caplog):
    """An empty replica filled over a link reset every 256 KiB, with commits going on:
    every connection goes on with the copy where the last one was cut, and the replica
    ends block-identical."""
    from mirrorfs.repl.receiver import Receiver
    from mirrorfs.repl.shipper import Shipper
    from tests.netproxy import Direction, FaultProxy
    from tests.test_shipper import commit_random, make_source, same_blocks, serve_receiver

    caplog.set_level(logging.INFO, logger="mirrorfs")
    rng = random.Random(7)
    src = make_source(tmp_path, size=32 * MiB)
    src.write(500, rng.randbytes(4 * MiB))  # 1024 blocks of incompressible data
    src.commit()
    for _ in range(5):
        commit_random(src, rng)
    rdir = str(tmp_path / "replica")
    os.makedirs(rdir)
    receiver = Receiver(rdir, None, secret=None, node_id="tgt")
    port = await serve_receiver(nursery, receiver)
    proxy = FaultProxy(target=("127.0.0.1", port))
    pport = await nursery.start(proxy.run)
    proxy.reset_every(256 * KiB, Direction.UP)
    shipper = Shipper(src, ("127.0.0.1", pport), secret=None, node_id="src")
    await nursery.start(shipper.run)

    def done():
        v = receiver.volume
        return v is not None and v.consistent and v.last_seq == src.last_seq

    copied: list[int] = []
    with trio.fail_after(120):
        while not done():
            n = receiver.status()["sync_blocks_copied"]
            if not copied or n != copied[-1]:
                copied.append(n)
            if len(copied) % 5 == 1 and src.last_seq < 30:
                commit_random(src, rng)  # commits during the copy: replayed over it
            await trio.sleep(0.005)
    assert same_blocks(src, receiver.volume)
    starts = [r for r in caplog.records if "initial sync of" in r.getMessage()]
    resumes = [r for r in caplog.records if "resuming the initial sync" in r.getMessage()]
    assert len(starts) == 1, [r.getMessage() for r in starts]  # never started over
    assert len(resumes) >= 4 * MiB // (256 * KiB) - 2
    assert shipper.sync is not None
    assert starts[0].getMessage().endswith(f"from seq {shipper.sync.start_seq}")
    assert copied == sorted(copied) and len(copied) >= 10  # the copy only moved forward


def test_a_complete_copy_cut_during_its_replay_streams_on(tmp_path):
    """SYNC_END came, then the session ended with S+1 logged and not applied: the replica
    applies it at the session's end and announces itself (uuid, positions), not as empty."""
    from mirrorfs.repl.replica_store import ReplicaStore
    from mirrorfs.repl.wire import SyncBegin, SyncBlocks, SyncEnd, SyncKind
    from tests.test_shipper import commit_random, make_source

    rng = random.Random(3)
    src = make_source(tmp_path)
    for _ in range(3):
        commit_random(src, rng)
    start = src.last_seq
    src.flush_in_place()
    raw = src.device.read(0, src.block_count)  # the copy, at S
    commit_random(src, rng)
    commit_random(src, rng)
    records = dict(src.samlog.scan_encoded(start + 1))
    epochs = tuple(tuple(e) for e in src.state.epochs)
    peer = Peer(AuthRole.SOURCE, "src", src.uuid, epochs, 2, last_seq=src.last_seq)
    rdir = str(tmp_path / "replica")
    os.makedirs(rdir)
    store = ReplicaStore(rdir, None, node_id="tgt")
    bs, count = src.block_size, src.block_count
    store.start_copy(SyncBegin(SyncKind.FULL, bs, count, start), peer)
    assert store.empty and store.copy_resume() == (0, 0)
    store.copy_blocks(SyncBlocks.pack(0, raw[: 64 * bs], bs))
    assert store.handshake_args()["copy_block"] == 64  # an empty target, resumable at 64
    store.copy_blocks(SyncBlocks.pack(64, raw[64 * bs :], bs))
    store.finish_copy(SyncEnd(src.last_seq), src.uuid)
    assert not store.empty and store.copy_resume() == (0, 0)
    vol = store.volume
    store.receive_apply(start + 1, records[start + 1])
    done = store.group.log(vol, store.group.take_group(vol))  # its fsync, then the cut
    store.group.logged(vol, done)
    assert (vol.received_seq, vol.last_seq) == (start + 1, start)
    assert store.settle() == 1 and vol.last_seq == start + 1
    args = store.handshake_args()
    assert (args["volume_uuid"], args["received_seq"], args["applied_seq"]) == (
        src.uuid,
        start + 1,
        start + 1,
    )
    vol.close()


async def test_a_whole_transaction_is_framed_off_the_trio_thread(monkeypatch):
    """A large TXN is not copied into a frame: its header (a crc32 of megabytes) is made in
    a worker thread, so the loop that serves FUSE goes on, and the record goes out as it
    lies; small messages are framed inline. Both arrive intact."""
    import threading

    from mirrorfs.repl import stream as stream_module
    from mirrorfs.repl.stream import ENCODE_IN_THREAD, FramedStream

    where: list[tuple[str, str]] = []
    real_header = stream_module.frame_header

    def spy_header(*args):
        where.append(("header", threading.current_thread().name))
        return real_header(*args)

    monkeypatch.setattr(stream_module, "frame_header", spy_header)

    class SpyTxn(Txn):
        __slots__ = ()

        def encode(self) -> bytes:
            where.append(("encode", threading.current_thread().name))
            return Txn.encode(self)

    left, right = trio.testing.memory_stream_pair()
    sender, receiver = FramedStream(left), FramedStream(right)
    big = SpyTxn(5, os.urandom(ENCODE_IN_THREAD))
    small = SpyTxn(6, os.urandom(4096))
    got = []
    async with trio.open_nursery() as n:

        async def read_two() -> None:
            got.append(await receiver.receive())
            got.append(await receiver.receive())

        n.start_soon(read_two)
        await sender.send(big)
        await sender.send(small)
    main = threading.current_thread().name
    assert [w for w, _ in where] == ["header", "encode"], where
    assert where[0][1] != main and where[1][1] == main, where
    assert sender.bytes_sent == receiver.bytes_received
    assert [(m.seq, m.record) for m in got] == [(5, big.record), (6, small.record)]
