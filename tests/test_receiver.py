"""The target side of replication (repl.receiver) against a minimal in-test source.

The source here is a real Volume driven by hand over FramedStream + handshake_source, so the
receiver is tested on its own, frame by frame, over trio.testing.memory_stream_pair (the
timing tests on trio's autojump_clock: no real sleeps) or real TCP on 127.0.0.1.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import zlib

import pytest
import trio
import trio.testing

from mirrorfs.fs.filesystem import ROOT_INO, Filesystem
from mirrorfs.repl.receiver import Receiver, ReceiverState
from mirrorfs.repl.stream import ConnectionClosed, FramedStream, HandshakeRefused, handshake_source
from mirrorfs.repl.wire import (
    Ack,
    ErrorState,
    Message,
    PeerState,
    Ping,
    Pong,
    RefuseReason,
    SyncBegin,
    SyncBlocks,
    SyncEnd,
    SyncKind,
    Txn,
    VerifyReply,
    VerifyReq,
)
from mirrorfs.store.files import BLOCK_FILE
from mirrorfs.store.txn import HintKind, Transaction
from mirrorfs.store.volume import Volume

MiB = 1 << 20
VOLUME_BYTES = 8 * MiB
CHUNK = 64  # blocks per SYNC_BLOCKS frame


# ------------------------------------------------------------------------ the test source


class Source:
    """A real source volume with a filesystem, and a hand-driven session to one target."""

    def __init__(self, path: str, *, node_id: str = "src") -> None:
        Volume.create(path, VOLUME_BYTES)
        self.vol = Volume.open(path)
        self.vol.checkpointer.retain_with(lambda: 1)  # keep every log record for shipping
        Filesystem.format(self.vol, inode_count=256)
        self.fs = Filesystem(self.vol)
        self.node_id = node_id
        self.path = path
        self.counter = 0

    def close(self) -> None:
        self.fs.close()
        self.vol.close()

    def change(self, n: int = 1, size: int = 5000) -> None:
        """Commit ``n`` transactions, each making a file with some data."""
        for _ in range(n):
            self.counter += 1
            name = f"f{self.counter}".encode()
            a = self.fs.create(ROOT_INO, name, 0o100644, 0, 0)
            self.fs.write(a.ino, 0, os.urandom(size))
            self.fs.release(a.ino)
            self.fs.forget(a.ino, 1)
            self.vol.commit()

    async def connect(self, stream: trio.abc.Stream, *, secret: bytes | None = None):
        fs = FramedStream(stream)
        peer = await handshake_source(
            fs,
            secret=secret,
            volume_uuid=self.vol.uuid,
            node_id=self.node_id,
            epochs=[tuple(e) for e in self.vol.state.epochs],
            last_seq=self.vol.last_seq,
            allow_initial_sync=True,
        )
        return fs, peer

    async def initial_sync(self, fs: FramedStream, *, during=None) -> int:
        """SYNC_BEGIN .. SYNC_END; ``during()`` runs after the first chunk (concurrent writes)."""
        vol = self.vol
        start = vol.last_seq
        await fs.send(SyncBegin(SyncKind.FULL, vol.block_size, vol.block_count, start))
        zero = bytes(vol.block_size * CHUNK)
        for first in range(0, vol.block_count, CHUNK):
            n = min(CHUNK, vol.block_count - first)
            raw = vol.device.read(first, n)
            if raw != zero[: len(raw)]:
                await fs.send(SyncBlocks.pack(first, raw, vol.block_size))
            if during is not None and first == 0:
                during()
        await fs.send(SyncEnd(vol.last_seq))
        return start

    async def ship(self, fs: FramedStream, from_seq: int) -> int:
        last = from_seq - 1
        for seq, rec in self.vol.samlog.scan_encoded(from_seq):
            await fs.send(Txn(seq, rec))
            last = seq
        return last

    async def ack(self, fs: FramedStream, applied: int, timeout: float = 10.0) -> Ack:
        """Wait for an ACK with at least ``applied``, answering pings on the way."""
        with trio.fail_after(timeout):
            while True:
                msg = await fs.receive()
                if isinstance(msg, Ping):
                    await fs.send(Pong(msg.timestamp_ns))
                elif isinstance(msg, Ack) and msg.applied_seq >= applied:
                    return msg


def block_file(path: str) -> bytes:
    with open(os.path.join(path, BLOCK_FILE), "rb") as f:
        return f.read()


def source_blocks(source: Source) -> bytes:
    """The source's block file once its deferred in-place writes are in it."""
    source.vol.flush_in_place()
    return block_file(source.path)


async def expect_closed(fs: FramedStream, timeout: float = 5.0) -> list[Message]:
    """Read until the receiver drops the connection; return what it sent before."""
    got = []
    with trio.fail_after(timeout):
        try:
            while True:
                got.append(await fs.receive())
        except ConnectionClosed:
            return got


@pytest.fixture
def source(tmp_path):
    src = Source(str(tmp_path / "src"))
    src.change(3)
    yield src
    src.close()


class Target:
    """A Receiver on a replica directory, with what its callbacks saw."""

    def __init__(self, path: str, volume: Volume | None = None, **kw) -> None:
        self.path = path
        self.applied: list[Transaction] = []
        self.consistent_at: list[int] = []
        self.created = 0
        self.receiver = Receiver(
            path,
            volume,
            secret=None,
            on_applied=self.applied.append,
            on_consistent=lambda v: self.consistent_at.append(v.last_seq),
            on_created=self._created,
            **kw,
        )

    def _created(self, vol: Volume) -> None:
        self.created += 1

    @property
    def vol(self) -> Volume:
        assert self.receiver.volume is not None
        return self.receiver.volume

    def close(self) -> None:
        if self.receiver.volume is not None:
            self.receiver.volume.close()


@pytest.fixture
def target(tmp_path):
    t = Target(str(tmp_path / "dst"))
    yield t
    t.close()


async def session(nursery: trio.Nursery, target: Target, source: Source):
    """Connect ``source`` to ``target`` over a memory stream pair."""
    left, right = trio.testing.memory_stream_pair()
    nursery.start_soon(target.receiver.serve, right, "mem")
    return await source.connect(left)


async def synced(nursery, target: Target, source: Source):
    """A session in which the initial sync is done and acknowledged."""
    fs, peer = await session(nursery, target, source)
    assert peer.empty
    start = await source.initial_sync(fs)
    await source.ack(fs, start)
    return fs


# ---------------------------------------------------------------------------------- tests


async def test_initial_sync_then_streaming(source, target):
    async with trio.open_nursery() as nursery:
        fs, peer = await session(nursery, target, source)
        assert peer.empty and peer.received_seq == 0
        start = await source.initial_sync(fs)
        ack = await source.ack(fs, start)
        assert (ack.received_seq, ack.applied_seq) == (start, start)
        assert target.vol.consistent and target.consistent_at == [start]
        assert target.created == 1
        assert block_file(target.path) == source_blocks(source)

        source.change(4)
        last = await source.ship(fs, start + 1)
        ack = await source.ack(fs, last)
        assert (ack.received_seq, ack.applied_seq) == (last, last) == (source.vol.last_seq,) * 2
        assert block_file(target.path) == source_blocks(source)
        assert [t.seq for t in target.applied] == list(range(start + 1, last + 1))
        kinds = {h.kind for t in target.applied for h in t.hints}
        assert HintKind.ENTRY_ADDED in kinds and HintKind.INODE_UPDATED in kinds

        st = target.receiver.status()
        assert st["state"] == "streaming" and st["source_node_id"] == "src"
        assert st["applied_seq"] == last and st["consistent"] and st["last_ack_time"] > 0
        assert st["bytes_received"] > 0 and st["volume_uuid"] == source.vol.uuid.hex()
        assert st["sync_blocks_copied"] > 0 and st["sync_blocks_total"] == source.vol.block_count
        await fs.aclose()
    assert target.receiver.state is ReceiverState.DISCONNECTED

    # The replica reopens as what it is, at the same seq, and the read-only fs sees the files.
    target.vol.close()
    vol = Volume.open(target.path)
    try:
        assert vol.last_seq == last and vol.consistent and vol.uuid == source.vol.uuid
        names = {n for n, _, _ in Filesystem(vol, read_only=True).readdir(ROOT_INO, 0)}
        assert {b"f1", b"f7"} <= names
    finally:
        vol.close()
        target.receiver.volume = None


async def test_sync_with_concurrent_commits_is_consistent_only_at_T(source, target):
    async with trio.open_nursery() as nursery:
        fs, _ = await session(nursery, target, source)
        start = await source.initial_sync(fs, during=lambda: source.change(2))
        end = source.vol.last_seq
        assert end == start + 2
        await source.ack(fs, start)
        # The copy mixes states S..T: not consistent, and nothing to mount, until T applies.
        assert not target.vol.consistent and target.consistent_at == []
        await source.ship(fs, start + 1)
        await source.ack(fs, end)
        assert target.vol.consistent and target.consistent_at == [end]
        assert block_file(target.path) == source_blocks(source)
        await fs.aclose()


async def test_flipped_byte_in_frame_drops_and_reconnect_resumes(source, target, caplog):
    caplog.set_level(logging.INFO, "mirrorfs.repl.receiver")
    async with trio.open_nursery() as nursery:
        fs = await synced(nursery, target, source)
        before = target.vol.last_seq
        source.change(1)
        seq = before + 1
        rec = next(source.vol.samlog.scan_encoded(seq))[1]
        frame = bytearray(Txn(seq, rec).encode())
        frame[len(frame) // 2] ^= 0x40  # inside the record: the frame CRC catches it
        await fs.stream.send_all(bytes(frame))
        await expect_closed(fs)
    assert target.vol.received_seq == before and target.vol.last_seq == before
    assert target.applied == []
    assert "CRC mismatch" in caplog.text and target.receiver.state is ReceiverState.DISCONNECTED

    async with trio.open_nursery() as nursery:
        fs, peer = await session(nursery, target, source)
        assert not peer.empty and peer.received_seq == before == peer.applied_seq
        last = await source.ship(fs, peer.received_seq + 1)
        await source.ack(fs, last)
        assert block_file(target.path) == source_blocks(source)
        await fs.aclose()


async def test_corrupt_record_in_valid_frame_is_refused(source, target, caplog):
    caplog.set_level(logging.INFO, "mirrorfs.repl.receiver")
    async with trio.open_nursery() as nursery:
        fs = await synced(nursery, target, source)
        before = target.vol.last_seq
        source.change(1)
        rec = bytearray(next(source.vol.samlog.scan_encoded(before + 1))[1])
        rec[len(rec) - 10] ^= 1  # the record's own checksum must catch this
        await fs.send(Txn(before + 1, bytes(rec)))
        await expect_closed(fs)
    assert target.vol.received_seq == before == target.vol.last_seq
    assert target.vol.samlog.last_seq == before
    assert "dropped source" in caplog.text and "TXN" in caplog.text


async def test_out_of_sequence_txn_is_refused(source, target, caplog):
    caplog.set_level(logging.INFO, "mirrorfs.repl.receiver")
    async with trio.open_nursery() as nursery:
        fs = await synced(nursery, target, source)
        before = target.vol.last_seq
        source.change(2)
        await fs.send(Txn(before + 2, next(source.vol.samlog.scan_encoded(before + 2))[1]))
        await expect_closed(fs)
    assert target.vol.received_seq == before and target.applied == []
    assert "out of sequence" in caplog.text


async def test_second_source_is_refused_while_one_is_active(tmp_path, source, target):
    async with trio.open_nursery() as nursery:
        fs = await synced(nursery, target, source)
        other = Source(str(tmp_path / "other"), node_id="intruder")
        try:
            with pytest.raises(HandshakeRefused) as ei:
                await session(nursery, target, other)
        finally:
            other.close()
        assert ei.value.by_peer and ei.value.reason is RefuseReason.BUSY
        assert "already follows" in str(ei.value)
        # The first source goes on undisturbed.
        source.change(1)
        last = await source.ship(fs, target.vol.received_seq + 1)
        await source.ack(fs, last)
        await fs.aclose()


async def test_same_source_reconnecting_replaces_its_dead_session(source, target, autojump_clock):
    target.receiver.keepalive = 0.05
    async with trio.open_nursery() as nursery:
        old = await synced(nursery, target, source)  # then goes silent, as if cut off
        await trio.sleep(0.2)  # virtual time (autojump_clock): longer than two keepalives
        with pytest.raises(HandshakeRefused) as ei:
            await session(nursery, target, source)
        assert ei.value.reason is RefuseReason.BUSY
        await expect_closed(old)  # the silent session was dropped...
        fs, peer = await session(nursery, target, source)  # ...so the retry gets through
        assert peer.received_seq == target.vol.last_seq
        await fs.aclose()


async def test_wrong_volume_is_refused(tmp_path, source, target):
    async with trio.open_nursery() as nursery:
        fs = await synced(nursery, target, source)
        await fs.aclose()
    other = Source(str(tmp_path / "other"))
    try:
        async with trio.open_nursery() as nursery:
            with pytest.raises(HandshakeRefused) as ei:
                await session(nursery, target, other)
    finally:
        other.close()
    assert ei.value.reason is RefuseReason.WRONG_VOLUME
    assert target.vol.uuid == source.vol.uuid


async def test_txn_before_initial_sync_is_refused(source, target):
    async with trio.open_nursery() as nursery:
        fs, peer = await session(nursery, target, source)
        assert peer.empty
        first = source.vol.samlog.first_seq
        await fs.send(Txn(first, next(source.vol.samlog.scan_encoded(first))[1]))
        await expect_closed(fs)
    assert target.receiver.volume is None


async def test_interrupted_copy_restarts_from_scratch(source, target):
    async with trio.open_nursery() as nursery:
        fs, _ = await session(nursery, target, source)
        vol = source.vol
        await fs.send(SyncBegin(SyncKind.FULL, vol.block_size, vol.block_count, vol.last_seq))
        await fs.send(SyncBlocks.pack(0, vol.device.read(0, 4), vol.block_size))
        await fs.aclose()
    assert target.vol.state.sync_state == "full" and not target.vol.consistent
    async with trio.open_nursery() as nursery:
        fs = await synced(nursery, target, source)  # asserts the target says "empty" again
        assert block_file(target.path) == source_blocks(source)
        await fs.aclose()
    assert target.created == 2


async def test_ping_verify_and_keepalive(source, target):
    target.receiver.keepalive = 0.2
    async with trio.open_nursery() as nursery:
        fs = await synced(nursery, target, source)
        await fs.send(Ping(1234))
        seq = target.vol.last_seq
        ranges = [(0, 16), (16, source.vol.block_count - 16)]
        await fs.send(VerifyReq(seq, ranges))
        got: dict[type, Message] = {}
        with trio.fail_after(5):
            while len(got) < 3:
                msg = await fs.receive()
                got.setdefault(type(msg), msg)
        assert got[Pong].timestamp_ns == 1234
        assert isinstance(got[Ping], Ping)  # the receiver's own keepalive
        want = [hashlib.sha256(source.vol.device.read(f, n)).digest() for f, n in ranges]
        assert got[VerifyReply].seq == seq and got[VerifyReply].digests == want
        await fs.aclose()


async def test_silent_source_is_dropped(source, target, autojump_clock):
    target.receiver.silence_timeout = 0.3
    target.receiver.keepalive = 100
    async with trio.open_nursery() as nursery:
        fs = await synced(nursery, target, source)
        await expect_closed(fs)
    assert target.receiver.state is ReceiverState.DISCONNECTED


@pytest.mark.log_expected(r"No space left on device")
async def test_disk_full_sends_error_state(source, target):
    async with trio.open_nursery() as nursery:
        fs = await synced(nursery, target, source)
        before = target.vol.last_seq

        def enospc(txn, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        target.vol.samlog.append_validated = enospc
        source.change(1)
        await source.ship(fs, before + 1)
        got = await expect_closed(fs)
    errors = [m for m in got if isinstance(m, ErrorState)]
    assert errors and errors[0].state is PeerState.DISK_FULL
    assert not any(isinstance(m, Ack) and m.applied_seq > before for m in got)
    st = target.receiver.status()
    assert st["state"] == "error" and "No space" in st["last_error"]
    assert target.vol.last_seq == before


async def test_over_tcp(source, target):
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(trio.serve_listeners, target.receiver.serve, listeners)
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        fs, peer = await source.connect(stream)
        start = await source.initial_sync(fs)
        await source.ack(fs, start)
        source.change(2)
        await source.ack(fs, await source.ship(fs, start + 1))
        assert block_file(target.path) == source_blocks(source)
        await fs.aclose()
        nursery.cancel_scope.cancel()


def test_frame_crc_is_what_catches_the_flip():
    # Guard for the flipped-byte test: a flip inside the payload must break the frame CRC.
    frame = bytearray(Txn(1, b"x" * 100).encode())
    frame[60] ^= 0x40
    assert zlib.crc32(bytes(frame[20:])) != zlib.crc32(Txn(1, b"x" * 100).encode()[20:])


# ---------------------------------------------------------------- with the real Shipper


async def wait_applied(target: Target, seq: int, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        # (A replica being created sits at the copy's start seq, but is not consistent.)
        while not (target.receiver.volume and target.vol.consistent and target.vol.last_seq >= seq):
            await trio.sleep(0.01)


async def test_end_to_end_with_shipper(source, target):
    shipper_mod = pytest.importorskip("mirrorfs.repl.shipper")
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await nursery.start(trio.serve_listeners, target.receiver.serve, listeners)
        shipper = shipper_mod.Shipper(source.vol, ("127.0.0.1", port), secret=None, node_id="src")
        shipper_mod.install_retention(source.vol, [shipper])
        await nursery.start(shipper.run)
        await wait_applied(target, source.vol.last_seq)
        assert block_file(target.path) == source_blocks(source)
        for _ in range(5):  # streaming, with commits racing the shipper
            source.change(2, size=20000)
            await trio.sleep(0.01)
        await wait_applied(target, source.vol.last_seq)
        assert target.vol.last_seq == source.vol.last_seq and target.vol.consistent
        assert block_file(target.path) == source_blocks(source)
        st = shipper.status()
        with trio.fail_after(5):
            while shipper.status()["applied_seq"] != source.vol.last_seq:
                await trio.sleep(0.01)
        assert st["target_node_id"] == target.receiver.node_id
        nursery.cancel_scope.cancel()
