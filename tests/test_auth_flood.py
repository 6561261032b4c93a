"""An unauthenticated client must not jam a replica (issue 9, "authenticate before anything
is held").

Pure parts first (the caps of repl.admission, the target's gate in the handshake machine),
then the deadline on trio's autojump_clock, then real TCP on 127.0.0.0/8: a slow-loris
client and a flood of 200 unauthenticated connections against a Receiver behind a real
listener while a real source (a Shipper with the secret) connects. The attackers connect
from 127.0.0.2 .. 127.0.0.5 (the loris from 127.0.0.1, the source's own address), since
the per-address cap is what keeps a flood from one address off another's way.
"""

from __future__ import annotations

import logging
import os
import time

import pytest
import trio
import trio.testing

from mirrorfs.fs.filesystem import ROOT_INO, Filesystem
from mirrorfs.repl.admission import HELLO_GRACE, HandshakeLimiter, host_of
from mirrorfs.repl.auth import AuthRole, compute_proof
from mirrorfs.repl.handshake import HandshakeRefused, Peer, SourceHandshake, TargetHandshake
from mirrorfs.repl.receiver import Receiver, ReceiverState, _SlotGate
from mirrorfs.repl.stream import (
    HANDSHAKE_BUFFER,
    RECEIVE_SIZE,
    FramedStream,
    HandshakeTimeout,
    handshake_source,
    handshake_target,
)
from mirrorfs.repl.wire import (
    PROTOCOL_VERSION,
    Accept,
    Auth,
    Hello,
    HelloReply,
    MsgType,
    ProtocolError,
    Refuse,
    RefuseReason,
    decode_frames,
    encode_frame,
)
from mirrorfs.store.files import BLOCK_FILE
from mirrorfs.store.volume import Volume

SECRET = b"s" * 32
UUID = bytes(range(16))
MiB = 1 << 20

# ------------------------------------------------------------------- the caps, pure


def test_per_host_cap_displaces_the_hosts_stale_handshakes_and_release_reopens():
    lim = HandshakeLimiter(per_host=2, total=10)
    a, b = lim.admit("10.0.0.1", 0.0), lim.admit("10.0.0.1", 0.5)
    assert not a.evicted and not b.evicted
    # Young handshakes (within HELLO_GRACE) are never displaced by the per-address cap.
    assert not lim.admit("10.0.0.1", 0.6).evicted and lim.pending_from("10.0.0.1") == 3
    later = lim.admit("10.0.0.1", 5.0)  # now the others are stale: the oldest goes
    assert later.evicted == (a.ticket,) and not a.ticket.pending
    assert "at most 2 per address" in later.reason and "10.0.0.1" in later.reason
    assert "\n" not in later.reason
    assert not lim.admit("10.0.0.2", 5.0).evicted  # another address is not touched
    assert lim.pending == 4 and lim.pending_from("10.0.0.1") == 3
    lim.release(a.ticket)  # released by the eviction already: nothing happens
    lim.release(b.ticket)
    assert lim.pending == 3


def test_handshakes_are_displaced_stale_first_and_those_past_hello_last():
    assert HELLO_GRACE == 1.0  # (the times below)
    lim = HandshakeLimiter(per_host=3, total=10)
    h = "127.0.0.1"
    staller = lim.admit(h, 0.0).ticket
    lim.hello(staller, 0.1)  # a whole HELLO, then nothing: rank 1 from 1.1 on
    half = [lim.admit(h, 0.2).ticket, lim.admit(h, 0.3).ticket]  # half HELLOs: rank 0 later
    assert lim.admit(h, 5.0).evicted == (half[0],)  # stale without HELLO first, oldest first
    assert lim.admit(h, 5.1).evicted == (half[1],)
    assert lim.admit(h, 5.2).evicted == (staller,)  # then stale past HELLO (younger stay)
    assert not lim.admit(h, 5.3).evicted  # all young now: the address may have more
    assert lim.pending_from(h) == 4
    for t in list(lim._all):
        lim.release(t)
    assert lim.pending == 0 and lim._by_host == {} and lim._all == {}


def test_total_cap_counts_every_address_and_keeps_a_fresh_hello_longest():
    lim = HandshakeLimiter(per_host=5, total=3)
    source = lim.admit("h0", 0.0).ticket
    lim.hello(source, 0.05)  # a real source: its HELLO at once, its proof on the way
    b, c = lim.admit("h1", 0.1).ticket, lim.admit("h2", 0.2).ticket
    adm = lim.admit("h9", 0.5)  # all young: the oldest without a HELLO goes, not the source
    assert adm.evicted == (b,) and "at most 3" in adm.reason
    d = adm.ticket
    assert lim.admit("h8", 5.0).evicted == (c,)  # stale without HELLO, oldest (c before d)
    assert lim.pending == 3 and source.pending and d.pending
    lim.release(source)
    assert not lim.admit("h7", 6.0).evicted and lim.pending == 3


def test_caps_must_be_positive():
    with pytest.raises(ValueError):
        HandshakeLimiter(per_host=0)
    with pytest.raises(ValueError):
        HandshakeLimiter(total=0)


def test_evictions_are_logged_once_per_period_with_the_count():
    lim = HandshakeLimiter(per_host=1, total=10, log_every=100.0)
    assert not lim.admit("a", 0.0).evicted
    first = lim.admit("a", 2.0)  # each admission finds the previous one stale
    assert first.evicted and first.log and first.suppressed == 0
    quiet = [lim.admit("a", 4.0 + 2 * i) for i in range(40)]
    assert all(q.evicted and not q.log for q in quiet)
    later = lim.admit("a", 102.5)
    assert later.log and later.suppressed == 40
    assert not lim.admit("a", 105.0).log
    assert lim.evictions == 43 and lim.pending == 1


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("127.0.0.1:7400", "127.0.0.1"),
        ("[::1]:7400", "::1"),
        ("[fe80::1%eth0]:1", "fe80::1%eth0"),
        ("mem", "mem"),
        ("", ""),
        ("::1", "::1"),
    ],
)
def test_host_of(address, host):
    assert host_of(address) == host


# --------------------------------------------------- the target's gate, pure machines


class Gate:
    """A TargetGate that records its calls and answers as told."""

    def __init__(self, *, at_hello: Refuse | None = None, at_admit: Refuse | None = None):
        self.at_hello, self.at_admit = at_hello, at_admit
        self.hellos: list[Hello] = []
        self.admits: list[tuple[Peer, bool]] = []

    def hello(self, hello: Hello) -> Refuse | None:
        self.hellos.append(hello)
        return self.at_hello

    def admit(self, peer: Peer, acceptable: bool) -> Refuse | None:
        self.admits.append((peer, acceptable))
        return self.at_admit


def machines(gate: Gate, *, src_secret=SECRET, src_uuid=UUID, src_epochs=((1, 1),)):
    src = SourceHandshake(
        secret=src_secret, volume_uuid=src_uuid, node_id="src", epochs=src_epochs, last_seq=9
    )
    tgt = TargetHandshake(
        secret=SECRET,
        volume_uuid=UUID,
        node_id="tgt",
        epochs=[(1, 1), (2, 5)],
        received_seq=7,
        applied_seq=5,
        gate=gate,
    )
    return src, tgt


def wire_copy(msg):
    (out,) = decode_frames(msg.encode())
    return out


def test_gate_admits_only_after_the_proof_and_before_accept():
    gate = Gate()
    src, tgt = machines(gate, src_epochs=((1, 1), (2, 5)))
    step = tgt.receive(wire_copy(src.hello()))
    assert len(gate.hellos) == 1 and gate.admits == []  # nothing decided on a HELLO alone
    (reply,) = step.send
    (auth,) = src.receive(wire_copy(reply)).send
    step = tgt.receive(wire_copy(auth))
    assert [ok for _, ok in gate.admits] == [True] and gate.admits[0][0].node_id == "src"
    assert step.send == [Accept()] and step.peer is not None


def test_gate_is_not_asked_for_a_wrong_proof():
    gate = Gate()
    _, tgt = machines(gate)
    tgt.receive(Hello(UUID, "mallory", [(2, 5)], 0, os.urandom(32)))
    step = tgt.receive(Auth(os.urandom(32)))
    assert gate.admits == [] and step.refuse is not None
    assert step.refuse.reason is RefuseReason.AUTH and step.peer is None


def test_gate_refusal_replaces_accept():
    gate = Gate(at_admit=Refuse(RefuseReason.BUSY, "this target already follows x"))
    src, tgt = machines(gate, src_epochs=((1, 1), (2, 5)))
    (reply,) = tgt.receive(wire_copy(src.hello())).send
    (auth,) = src.receive(wire_copy(reply)).send
    step = tgt.receive(wire_copy(auth))
    assert step.send == [] and step.peer is None
    assert step.refuse == Refuse(RefuseReason.BUSY, "this target already follows x")
    assert isinstance(step.error, HandshakeRefused) and not step.error.by_peer
    # ... and the source hears BUSY where it waited for ACCEPT.
    heard = src.receive(wire_copy(step.refuse))
    assert heard.error.reason is RefuseReason.BUSY and heard.error.by_peer


def test_gate_refusing_at_hello_answers_nothing_else():
    gate = Gate(at_hello=Refuse(RefuseReason.BUSY, "busy"))
    src, tgt = machines(gate)
    step = tgt.receive(wire_copy(src.hello()))
    assert step.send == [] and step.refuse.reason is RefuseReason.BUSY and gate.admits == []


def test_gate_sees_unacceptable_sources_and_stale_ones_are_fenced_without_it():
    gate = Gate()
    src, tgt = machines(gate, src_uuid=bytes(16 * [7]))  # wrong volume, right secret
    (reply,) = tgt.receive(wire_copy(src.hello())).send
    # (a real source refuses the wrong volume itself; a forged one sends AUTH anyway)
    proof = compute_proof(
        SECRET,
        AuthRole.SOURCE,
        own_nonce=src.nonce,
        peer_nonce=reply.nonce,
        volume_uuid=src.volume_uuid,
        own_node_id="src",
        peer_node_id="tgt",
    )
    step = tgt.receive(Auth(proof))
    assert [ok for _, ok in gate.admits] == [False]
    assert step.refuse.reason is RefuseReason.WRONG_VOLUME

    gate = Gate(at_admit=Refuse(RefuseReason.BUSY, "busy"))
    src, tgt = machines(gate)  # epoch 1 against the target's 2: stale
    (reply,) = tgt.receive(wire_copy(src.hello())).send
    proof = compute_proof(
        SECRET,
        AuthRole.SOURCE,
        own_nonce=src.nonce,
        peer_nonce=reply.nonce,
        volume_uuid=UUID,
        own_node_id="src",
        peer_node_id="tgt",
    )
    step = tgt.receive(Auth(proof))
    assert gate.admits == [] and step.refuse.reason is RefuseReason.FENCED


# ------------------------------------------------------------ the deadline (virtual time)

ANNOUNCED = dict(volume_uuid=UUID, node_id="tgt", epochs=[(1, 1)], received_seq=0, applied_seq=0)


def hello_bytes(node_id: str = "mallory") -> bytes:
    return Hello(os.urandom(16), node_id, [(1, 1)], 0, os.urandom(32)).encode()


async def trickle(stream: trio.abc.Stream, data: bytes, every: float = 1.0) -> int:
    """Send ``data`` a byte at a time; how many bytes went before the peer hung up."""
    sent = 0
    try:
        for i in range(len(data)):
            await stream.send_all(data[i : i + 1])
            sent += 1
            await trio.sleep(every)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return sent


async def test_a_byte_per_second_does_not_stretch_the_deadline(autojump_clock):
    a, b = trio.testing.memory_stream_pair()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle, a, hello_bytes() * 2)
        with pytest.raises(HandshakeTimeout):
            await handshake_target(FramedStream(b), secret=SECRET, timeout=10.0, **ANNOUNCED)
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert 10.0 <= elapsed < 10.5  # the deadline, though every read brought a byte


async def test_handshake_buffers_a_bounded_amount(autojump_clock):
    biggest = Hello(UUID, "big", [(i + 1, i + 1) for i in range(4096)], 0, os.urandom(32))
    assert len(biggest.encode()) < HANDSHAKE_BUFFER  # a legitimate HELLO always fits
    # A frame that announces 8 MiB (below MAX_FRAME): refused once the buffer is full,
    # not after 8 MiB were held for a peer that has proved nothing.
    frame = encode_frame(MsgType.HELLO, os.urandom(8 * MiB))
    a, b = trio.testing.memory_stream_pair()
    fs = FramedStream(b)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, frame)
        with pytest.raises(ProtocolError, match="without a complete frame"):
            await handshake_target(fs, secret=SECRET, **ANNOUNCED)
        # (and the peer was told: REFUSE PROTOCOL)
        refuse = await FramedStream(a).receive()
        assert isinstance(refuse, Refuse) and refuse.reason is RefuseReason.PROTOCOL
        nursery.cancel_scope.cancel()
    assert fs.bytes_received < HANDSHAKE_BUFFER + 2 * RECEIVE_SIZE
    assert fs.receive_limit is None  # the session after a handshake is not limited


@pytest.mark.parametrize("secret", [SECRET, None], ids=["secret", "loopback-no-secret"])
async def test_receiver_holds_nothing_for_a_slow_client(tmp_path, autojump_clock, caplog, secret):
    caplog.set_level(logging.INFO, "mirrorfs")
    rcv = Receiver(str(tmp_path / "dst"), None, secret=secret, node_id="dst")
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle, a, hello_bytes())
        nursery.start_soon(rcv.serve, b, "10.9.9.9:1")
        await trio.sleep(5.0)
        assert rcv.limiter.pending_from("10.9.9.9") == 1
        assert not rcv._busy and rcv.state is ReceiverState.WAITING
        await trio.sleep(6.0)  # past the handshake's deadline
        assert rcv.limiter.pending == 0 and not rcv._busy
        nursery.cancel_scope.cancel()
    assert "handshake with 10.9.9.9:1 failed" in caplog.text and "timed out" in caplog.text


def source_peer(node_id: str = "src") -> Peer:
    return Peer(
        role=AuthRole.SOURCE,
        node_id=node_id,
        volume_uuid=UUID,
        epochs=((1, 1),),
        protocol_version=PROTOCOL_VERSION,
        initial_sync_allowed=True,
    )


def test_slot_gate_takes_the_slot_only_when_admitting(tmp_path):
    rcv = Receiver(str(tmp_path / "dst"), None, secret=SECRET, node_id="dst")
    hello = Hello(UUID, "other", [(1, 1)], 0, os.urandom(32))
    first = _SlotGate(rcv, "127.0.0.1:1", rcv.store.handshake_args())
    second = _SlotGate(rcv, "127.0.0.2:1", rcv.store.handshake_args())
    assert first.hello(hello) is None and not rcv._busy  # a HELLO takes nothing
    assert first.admit(source_peer(), False) is None and not rcv._busy  # refused by the checks
    assert first.admit(source_peer(), True) is None and rcv._busy and first.held
    # While it holds the slot, another source is told BUSY at HELLO and, had it got
    # further, once authenticated; neither takes anything.
    assert second.hello(hello).reason is RefuseReason.BUSY
    assert second.admit(source_peer("other"), True).reason is RefuseReason.BUSY
    assert not second.held


def test_slot_gate_refuses_when_the_replica_moved_on_during_the_handshake(tmp_path):
    rcv = Receiver(str(tmp_path / "dst"), None, secret=SECRET, node_id="dst")
    stale = {**rcv.store.handshake_args(), "received_seq": 99}  # not what it is now
    gate = _SlotGate(rcv, "127.0.0.1:1", stale)
    refuse = gate.admit(source_peer(), True)
    assert refuse.reason is RefuseReason.BUSY and "moved on" in refuse.text
    assert not rcv._busy and not gate.held


# ------------------------------------------------------------------------ real TCP


class SourceVolume:
    """A source volume with a filesystem, for a real Shipper."""

    def __init__(self, path: str) -> None:
        Volume.create(path, 8 * MiB)
        self.vol = Volume.open(path)
        Filesystem.format(self.vol, inode_count=256)
        self.fs = Filesystem(self.vol)
        self.path = path
        self.counter = 0

    def change(self, n: int = 1, size: int = 5000) -> None:
        for _ in range(n):
            self.counter += 1
            a = self.fs.create(ROOT_INO, f"f{self.counter}".encode(), 0o100644, 0, 0)
            self.fs.write(a.ino, 0, os.urandom(size))
            self.fs.release(a.ino)
            self.fs.forget(a.ino, 1)
            self.vol.commit()

    def close(self) -> None:
        self.fs.close()
        self.vol.close()


def block_file(path: str) -> bytes:
    with open(os.path.join(path, BLOCK_FILE), "rb") as f:
        return f.read()


class Attackers:
    """Unauthenticated clients from given loopback addresses; what they saw and did."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = trio.Event()
        self.connections = 0
        self.dropped_silently = 0  # closed before anything was answered
        self.got: list[type] = []  # every message any attacker received
        self.loris_durations: list[float] = []

    async def _connect(self, local: str) -> trio.SocketStream:
        stream = await trio.open_tcp_stream("127.0.0.1", self.port, local_address=local)
        self.connections += 1
        return stream

    async def _read_all(self, fs: FramedStream) -> None:
        try:
            while True:
                self.got.append(type(await fs.receive()))
        except (ProtocolError, trio.BrokenResourceError, Exception):
            return

    async def flood_one(self, local: str, rounds: int, mode: str) -> None:
        """Connect and hold the connection with half a HELLO (``mode`` "half"), or send a
        valid-looking HELLO and then a forged AUTH ("forge") or nothing more ("stall");
        read until dropped; again, ``rounds`` times."""
        for _ in range(rounds):
            if self.stop.is_set():
                return
            try:
                stream = await self._connect(local)
            except OSError:
                await trio.sleep(0.05)
                continue
            fs = FramedStream(stream)
            try:
                hello = hello_bytes(f"flood-{local}")
                if mode == "half":
                    await stream.send_all(hello[:30])
                    if not await stream.receive_some(100):
                        self.dropped_silently += 1
                    continue
                await stream.send_all(hello)
                msg = await fs.receive()
                self.got.append(type(msg))
                if isinstance(msg, HelloReply):
                    if mode == "forge":
                        await fs.send(Auth(os.urandom(32)))
                    await self._read_all(fs)
            except Exception:
                self.dropped_silently += 1
            finally:
                with trio.CancelScope(shield=True):
                    await fs.aclose()
            await trio.sleep(0.1)

    async def _watch_stop(self, scope: trio.CancelScope, stopped: trio.Event) -> None:
        await self.stop.wait()
        stopped.set()
        scope.cancel()

    async def loris(self, local: str) -> None:
        """A valid-looking HELLO, one byte per second; reconnect when dropped."""
        while not self.stop.is_set():
            try:
                stream = await self._connect(local)
            except OSError:
                await trio.sleep(0.1)
                continue
            began = time.monotonic()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle, stream, hello_bytes("loris"))
                with trio.CancelScope() as scope:
                    stopped = trio.Event()
                    nursery.start_soon(self._watch_stop, scope, stopped)
                    try:
                        while await stream.receive_some(100):
                            pass  # (the target says nothing to an incomplete HELLO)
                    except trio.BrokenResourceError:
                        pass
                if not stopped.is_set():  # the target hung up on us
                    self.loris_durations.append(time.monotonic() - began)
                nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await stream.aclose()


def assert_clean_log(caplog) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


async def test_slow_loris_and_flood_do_not_keep_the_source_out(tmp_path, caplog):
    caplog.set_level(logging.INFO, "mirrorfs")
    shipper_mod = pytest.importorskip("mirrorfs.repl.shipper")
    timeout = 2.0  # the handshake deadline here (10 s in the daemon): loris reconnects
    applied: list[int] = []
    rcv = Receiver(
        str(tmp_path / "dst"),
        None,
        secret=SECRET,
        node_id="dst",
        handshake_timeout=timeout,
        on_applied=lambda txn: applied.append(txn.seq),
    )
    src = SourceVolume(str(tmp_path / "src"))
    src.change(3)
    try:
        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
                port = listeners[0].socket.getsockname()[1]
                await nursery.start(trio.serve_listeners, rcv.serve, listeners)
                attack = Attackers(port)
                async with trio.open_nursery() as attackers:
                    for _ in range(2):
                        attackers.start_soon(attack.loris, "127.0.0.1")
                    for i in range(200):  # 50 from each of four addresses, half of them idle
                        local = f"127.0.0.{2 + i % 4}"
                        mode = "half" if i % 8 < 4 else "forge"
                        attackers.start_soon(attack.flood_one, local, 8, mode)
                    with trio.fail_after(10):
                        while attack.connections < 200:
                            await trio.sleep(0.01)
                    assert rcv.volume is None  # nothing of theirs was taken

                    shipper = shipper_mod.Shipper(
                        src.vol, ("127.0.0.1", port), secret=SECRET, node_id="src"
                    )
                    shipper_mod.install_retention(src.vol, [shipper])
                    began = time.monotonic()
                    nursery.start_soon(shipper.run)
                    with trio.fail_after(5):
                        while rcv.state is not ReceiverState.STREAMING:
                            await trio.sleep(0.01)
                    took = time.monotonic() - began
                    assert took < 5.0

                    src.change(3, size=20000)  # streaming, while the attack goes on
                    with trio.fail_after(10):
                        while not (
                            rcv.volume is not None
                            and rcv.volume.consistent
                            and rcv.volume.last_seq == src.vol.last_seq
                        ):
                            await trio.sleep(0.01)
                    # Let the loris be dropped and come back at least once meanwhile.
                    with trio.fail_after(3 * timeout + 5):
                        while len(attack.loris_durations) < 2:
                            await trio.sleep(0.05)
                    attack.stop.set()
                nursery.cancel_scope.cancel()
        src.vol.flush_in_place()  # the source's deferred in-place writes into its file
        assert block_file(rcv.volume_dir) == block_file(src.path)
        st = rcv.status()
        # One session ever, the source's: no attacker got past the handshake.
        assert st["sessions"] == 1 and st["source_node_id"] == "src"
        assert Accept not in attack.got and attack.connections >= 200
        assert applied and applied == sorted(applied) and applied[-1] == src.vol.last_seq
        # A byte a second did not stretch the deadline.
        assert max(attack.loris_durations) < timeout + 1.5, attack.loris_durations
        text = caplog.text
        assert "dropped an unauthenticated connection for one from 127.0.0." in text
        assert "per address" in text
        assert "failed authentication" in text
        assert rcv.limiter.pending == 0
        assert_clean_log(caplog)
    finally:
        src.close()
        if rcv.volume is not None:
            rcv.volume.close()


async def closed_by_peer(stream: trio.SocketStream, within: float) -> bool:
    """Whether the peer closes ``stream`` (having said nothing) within ``within`` s."""
    try:
        with trio.move_on_after(within):
            return await stream.receive_some(100) == b""
    except trio.BrokenResourceError:
        return True  # (closed with our bytes unread: a reset is a close too)
    return False


async def test_total_cap_displaces_the_oldest_with_one_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, "mirrorfs")
    rcv = Receiver(
        str(tmp_path / "dst"),
        None,
        secret=SECRET,
        node_id="dst",
        limiter=HandshakeLimiter(per_host=8, total=3),
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            await nursery.start(trio.serve_listeners, rcv.serve, listeners)
            idle = []
            for i in range(23):  # 3 fill the total cap; each later one displaces the oldest
                idle.append(
                    await trio.open_tcp_stream("127.0.0.1", port, local_address=f"127.0.0.{2 + i}")
                )
                with trio.fail_after(5):
                    while rcv.limiter.pending < min(i + 1, 3) or rcv.limiter.evictions < i - 2:
                        await trio.sleep(0.01)
            for stream in idle[:20]:
                assert await closed_by_peer(stream, 2.0)  # dropped at once, not at a deadline
            assert rcv.limiter.pending == 3 and rcv.limiter.evictions == 20
            # With the cap full of strangers, a real source still gets in.
            peer = await handshake_source(
                FramedStream(await trio.open_tcp_stream("127.0.0.1", port)),
                secret=SECRET,
                volume_uuid=UUID,
                node_id="src",
                epochs=[(1, 1)],
                last_seq=0,
                allow_initial_sync=True,
            )
            assert peer.empty
            for stream in idle:
                await stream.aclose()
            with trio.fail_after(5):
                while rcv.limiter.pending:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    lines = [r for r in caplog.records if "dropped an unauthenticated" in r.getMessage()]
    assert len(lines) == 1  # one line for the burst, not twenty
    assert "at most 3" in lines[0].getMessage() and lines[0].levelno == logging.WARNING
    assert_clean_log(caplog)


async def test_replica_daemon_lets_the_source_in_past_idle_strangers(tmp_path, caplog):
    """The daemon's own listener (ReplicaNode), with a secret: 40 silent connections from
    one address and a loris from the source's own do not keep the source out."""
    from mirrorfs.node.replica import ReplicaConfig, run_replica
    from mirrorfs.repl import shipper as shipper_mod

    caplog.set_level(logging.INFO, "mirrorfs")
    rdir = str(tmp_path / "replica")
    src = SourceVolume(str(tmp_path / "src"))
    src.change(2)
    idle: list[trio.SocketStream] = []
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                cfg = ReplicaConfig(rdir, host="127.0.0.1", port=0, secret=SECRET)
                node = await nursery.start(run_replica, cfg)
                for _ in range(40):
                    idle.append(
                        await trio.open_tcp_stream(
                            "127.0.0.1", node.port, local_address="127.0.0.7"
                        )
                    )
                loris = await trio.open_tcp_stream("127.0.0.1", node.port)
                idle.append(loris)  # (closed at the end, with the others)
                nursery.start_soon(trickle, loris, hello_bytes("loris"))
                with trio.fail_after(5):
                    while node.receiver.limiter.pending < 41:  # young: all counted
                        await trio.sleep(0.01)
                shipper = shipper_mod.Shipper(
                    src.vol, ("127.0.0.1", node.port), secret=SECRET, node_id="src"
                )
                shipper_mod.install_retention(src.vol, [shipper])
                nursery.start_soon(shipper.run)
                with trio.fail_after(5):
                    while True:
                        st = node.status()  # what the control socket's status answers
                        if st["state"] == "streaming":
                            break
                        await trio.sleep(0.05)
                assert st["source_node_id"] == "src" and st["sessions"] == 1
                # ... while the strangers still hold their handshakes (past the cap of 8).
                assert node.receiver.limiter.pending_from("127.0.0.7") > 8
                nursery.cancel_scope.cancel()
    finally:
        for stream in idle:
            await stream.aclose()
        src.close()
    assert_clean_log(caplog)


async def test_a_flood_from_the_sources_own_address_does_not_keep_it_out(tmp_path, caplog):
    """On loopback an attacker shares 127.0.0.1 with the real source: 200 unauthenticated
    connections from that same address (idle half-HELLOs, forged proofs, a loris), each
    reconnecting as soon as it is dropped, under the daemon's 10 s handshake deadline (a
    quarter of them send a whole HELLO and then nothing, which is the most an attacker
    without the secret can do to look like a source). The
    source still streams within 5 s, and nothing of the attackers is applied."""
    caplog.set_level(logging.INFO, "mirrorfs")
    from mirrorfs.repl import shipper as shipper_mod

    applied: list[int] = []
    rcv = Receiver(
        str(tmp_path / "dst"),
        None,
        secret=SECRET,
        node_id="dst",
        handshake_timeout=10.0,
        on_applied=lambda txn: applied.append(txn.seq),
    )
    src = SourceVolume(str(tmp_path / "src"))
    src.change(3)
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
                port = listeners[0].socket.getsockname()[1]
                await nursery.start(trio.serve_listeners, rcv.serve, listeners)
                attack = Attackers(port)
                async with trio.open_nursery() as attackers:
                    attackers.start_soon(attack.loris, "127.0.0.1")
                    for i in range(200):  # half HELLOs; whole ones, then silence or a forgery
                        mode = ("half", "half", "stall", "forge")[i % 4]
                        attackers.start_soon(attack.flood_one, "127.0.0.1", 10**6, mode)
                    with trio.fail_after(20):
                        while attack.connections < 400:  # they have been dropped and came back
                            await trio.sleep(0.01)
                    assert rcv.volume is None
                    assert rcv.limiter.pending_from("127.0.0.1") > rcv.limiter.per_host

                    shipper = shipper_mod.Shipper(
                        src.vol, ("127.0.0.1", port), secret=SECRET, node_id="src"
                    )
                    shipper_mod.install_retention(src.vol, [shipper])
                    began = time.monotonic()
                    nursery.start_soon(shipper.run)
                    with trio.fail_after(5):
                        while rcv.state is not ReceiverState.STREAMING:
                            await trio.sleep(0.01)
                    took = time.monotonic() - began
                    src.change(2, size=20000)  # streaming on, while the flood goes on
                    with trio.fail_after(10):
                        while not (
                            rcv.volume is not None
                            and rcv.volume.consistent
                            and rcv.volume.last_seq == src.vol.last_seq
                        ):
                            await trio.sleep(0.01)
                    attack.stop.set()
                    attackers.cancel_scope.cancel()  # (the idle ones would wait for a deadline)
                nursery.cancel_scope.cancel()
        assert took < 5.0, took
        assert rcv.limiter.evictions > 0  # the flood did fill every slot
        st = rcv.status()
        assert st["sessions"] == 1 and st["source_node_id"] == "src"
        assert Accept not in attack.got
        assert applied == list(range(1, src.vol.last_seq + 1)) or (
            applied and applied == sorted(applied) and applied[-1] == src.vol.last_seq
        )
        assert rcv.limiter.pending == 0
        assert_clean_log(caplog)
    finally:
        src.close()
        if rcv.volume is not None:
            rcv.volume.close()
