"""Authentication (repl.auth) and the handshake (repl.stream) over memory streams."""

from __future__ import annotations

import os
import re

import pytest
import trio
import trio.testing

from mirrorfs.repl import wire
from mirrorfs.repl.auth import (
    NO_PROOF,
    AuthRole,
    ListenPolicyError,
    SecretError,
    check_listen_policy,
    compute_proof,
    is_loopback,
    load_secret,
    verify_proof,
)
from mirrorfs.repl.stream import (
    FramedStream,
    HandshakeRefused,
    HandshakeTimeout,
    Peer,
    handshake_source,
    handshake_target,
)
from mirrorfs.repl.wire import RefuseReason

SECRET = b"correct horse battery staple"
UUID = bytes.fromhex("00112233445566778899aabbccddeeff")
N1, N2 = bytes(range(32)), bytes(range(32, 64))


# ---------------------------------------------------------------------------- proofs


def proof(secret=SECRET, role=AuthRole.SOURCE, **kw):
    args = dict(own_nonce=N1, peer_nonce=N2, volume_uuid=UUID, own_node_id="a", peer_node_id="b")
    args.update(kw)
    return compute_proof(secret, role, **args)


def test_proof_binds_everything():
    p = proof()
    assert len(p) == 32 and p == proof()
    variants = [
        proof(secret=b"other secret"),
        proof(role=AuthRole.TARGET),
        proof(own_nonce=N2, peer_nonce=N1),
        proof(volume_uuid=bytes(16)),
        proof(own_node_id="b", peer_node_id="a"),
        proof(own_node_id="ab", peer_node_id=""),  # length prefixes: no ambiguity
    ]
    assert len({p, *variants}) == len(variants) + 1


def test_proof_cannot_be_reflected():
    # The target's proof over the source's nonce is never a valid source proof.
    target_proof = proof(role=AuthRole.TARGET, own_nonce=N2, peer_nonce=N1)
    assert not verify_proof(
        SECRET,
        target_proof,
        AuthRole.SOURCE,
        own_nonce=N1,
        peer_nonce=N2,
        volume_uuid=UUID,
        own_node_id="a",
        peer_node_id="b",
    )


def test_no_secret():
    assert proof(secret=None) == NO_PROOF
    kw = dict(own_nonce=N1, peer_nonce=N2, volume_uuid=UUID, own_node_id="a", peer_node_id="b")
    assert verify_proof(None, NO_PROOF, AuthRole.SOURCE, **kw)
    assert not verify_proof(SECRET, NO_PROOF, AuthRole.SOURCE, **kw)
    assert not verify_proof(None, proof(), AuthRole.SOURCE, **kw)


# ---------------------------------------------------------------------------- secret file


def write(path, data: bytes, mode: int):
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def test_load_secret(tmp_path):
    assert load_secret(write(tmp_path / "s", b"s3cret-s3cret-s3cret\n", 0o600)) == (
        b"s3cret-s3cret-s3cret"
    )
    assert load_secret(write(tmp_path / "r", b"\x00\xffbinary", 0o400)) == b"\x00\xffbinary"


@pytest.mark.parametrize(
    ("data", "mode", "expected"),
    [
        (b"", 0o600, "is empty"),
        (b" \n\n", 0o600, "is empty"),
        (b"secret", 0o640, "group or others (mode 0640)"),
        (b"secret", 0o604, "group or others"),
        (b"x" * 5000, 0o600, "larger than"),
    ],
)
def test_load_secret_refuses(tmp_path, data, mode, expected):
    path = write(tmp_path / "s", data, mode)
    with pytest.raises(SecretError, match=re.escape(expected)) as info:
        load_secret(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_load_secret_missing(tmp_path):
    with pytest.raises(SecretError, match="cannot open secret file"):
        load_secret(tmp_path / "nope")


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST.", "::ffff:127.0.0.1"],
)
def test_loopback(host):
    assert is_loopback(host)
    check_listen_policy(host, None, False)


@pytest.mark.parametrize("host", ["", "0.0.0.0", "::", "10.0.0.1", "example.com", "128.0.0.1"])
def test_listen_policy(host):
    assert not is_loopback(host)
    with pytest.raises(ListenPolicyError, match="without a shared secret"):
        check_listen_policy(host, None, False)
    check_listen_policy(host, SECRET, False)
    check_listen_policy(host, None, True)


# ---------------------------------------------------------------------------- handshake


def source_args(**kw):
    args = dict(
        secret=SECRET,
        volume_uuid=UUID,
        node_id="src",
        epochs=[(1, 1), (2, 100)],
        last_seq=150,
        allow_initial_sync=False,
    )
    args.update(kw)
    return args


def target_args(**kw):
    args = dict(
        secret=SECRET,
        volume_uuid=UUID,
        node_id="tgt",
        epochs=[(1, 1), (2, 100)],
        received_seq=120,
        applied_seq=110,
    )
    args.update(kw)
    return args


async def handshake(src: dict, tgt: dict) -> tuple[object, object, FramedStream, FramedStream]:
    """Run both sides; each result is a Peer or the exception that side raised."""
    a, b = trio.testing.memory_stream_pair()
    fa, fb = FramedStream(a), FramedStream(b)
    results: dict[str, object] = {}

    async def side(name, fn, fs, kw):
        try:
            results[name] = await fn(fs, **kw)
        except Exception as exc:
            results[name] = exc

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, "source", handshake_source, fa, src)
            nursery.start_soon(side, "target", handshake_target, fb, tgt)
    return results["source"], results["target"], fa, fb


def assert_refused(result, reason: RefuseReason, by_peer: bool, text: str):
    assert isinstance(result, HandshakeRefused), result
    assert result.reason == reason and result.by_peer == by_peer
    assert text in str(result) and "\n" not in str(result)


async def assert_nothing_more(fs: FramedStream):
    """After the handshake, nothing else was sent."""
    with trio.move_on_after(0.05) as scope:
        msg = await fs.receive()
        pytest.fail(f"unexpected {msg}")
    assert scope.cancelled_caught


async def test_success():
    src, tgt, fa, fb = await handshake(source_args(), target_args())
    assert src == Peer(
        role=AuthRole.TARGET,
        node_id="tgt",
        volume_uuid=UUID,
        epochs=((1, 1), (2, 100)),
        protocol_version=wire.PROTOCOL_VERSION,
        received_seq=120,
        applied_seq=110,
    )
    assert isinstance(tgt, Peer)
    assert (tgt.node_id, tgt.last_seq, tgt.epoch, tgt.empty) == ("src", 150, 2, False)
    assert not tgt.initial_sync_allowed
    # The connection is usable afterwards, in both directions.
    await fa.send(wire.Txn(121, b"record"))
    assert await fb.receive() == wire.Txn(121, b"record")
    await fb.send(wire.Ack(121, 110, 0))
    assert await fa.receive() == wire.Ack(121, 110, 0)


async def test_success_without_secrets():
    src, tgt, _, _ = await handshake(source_args(secret=None), target_args(secret=None))
    assert isinstance(src, Peer) and isinstance(tgt, Peer)


@pytest.mark.parametrize(
    ("src_secret", "tgt_secret"),
    [(b"one secret", b"another secret"), (None, SECRET), (SECRET, None)],
)
async def test_wrong_secret_both_refuse(src_secret, tgt_secret):
    src, tgt, fa, fb = await handshake(
        source_args(secret=src_secret), target_args(secret=tgt_secret)
    )
    # The source checks the target's proof first and refuses; the target hears it.
    assert_refused(src, RefuseReason.AUTH, False, "failed authentication")
    assert_refused(tgt, RefuseReason.AUTH, True, "refused by source 'src'")
    await assert_nothing_more(fb)


async def test_target_refuses_a_bad_source_proof():
    # A source that does not check the target (here: a forged one) is refused by the target.
    a, b = trio.testing.memory_stream_pair()
    fa, fb = FramedStream(a), FramedStream(b)
    results = {}

    async def target():
        try:
            await handshake_target(fb, **target_args())
        except HandshakeRefused as exc:
            results["target"] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(target)
        await fa.send(wire.Hello(UUID, "mallory", [(9, 1)], 0, N1))
        assert isinstance(await fa.receive(), wire.HelloReply)
        await fa.send(wire.Auth(os.urandom(32)))
        refuse = await fa.receive()
    assert isinstance(refuse, wire.Refuse) and refuse.reason == RefuseReason.AUTH
    assert_refused(results["target"], RefuseReason.AUTH, False, "source 'mallory' failed")


async def test_wrong_volume():
    src, tgt, _, fb = await handshake(source_args(), target_args(volume_uuid=os.urandom(16)))
    assert_refused(src, RefuseReason.WRONG_VOLUME, False, "wrong volume")
    assert_refused(tgt, RefuseReason.WRONG_VOLUME, True, "wrong volume")
    await assert_nothing_more(fb)
    # Allowing an initial sync does not let a source overwrite another volume.
    src, tgt, _, _ = await handshake(
        source_args(allow_initial_sync=True), target_args(volume_uuid=os.urandom(16))
    )
    assert_refused(src, RefuseReason.WRONG_VOLUME, False, "wrong volume")
    assert_refused(tgt, RefuseReason.WRONG_VOLUME, True, "wrong volume")


@pytest.mark.parametrize(("src_v", "tgt_v"), [(2, 1), (1, 2)])
async def test_incompatible_version(src_v, tgt_v):
    src, tgt, _, _ = await handshake(
        source_args(protocol_version=src_v), target_args(protocol_version=tgt_v)
    )
    # The target detects it in HELLO and refuses before proving anything.
    assert_refused(tgt, RefuseReason.VERSION, False, f"speaks protocol version {src_v}")
    assert_refused(src, RefuseReason.VERSION, True, "refused by target")


async def test_old_epoch_fenced():
    src, tgt, _, fb = await handshake(
        source_args(epochs=[(1, 1), (2, 100)]), target_args(epochs=[(1, 1), (2, 100), (3, 140)])
    )
    assert_refused(src, RefuseReason.FENCED, False, "fenced")
    assert "epoch 2" in str(src) and "epoch 3" in str(src)
    assert_refused(tgt, RefuseReason.FENCED, True, "fenced")
    await assert_nothing_more(fb)


async def test_newer_source_epoch_is_accepted():
    src, tgt, _, _ = await handshake(
        source_args(epochs=[(1, 1), (2, 100), (3, 140)]), target_args(epochs=[(1, 1), (2, 100)])
    )
    assert isinstance(src, Peer) and isinstance(tgt, Peer)
    assert (src.epoch, tgt.epoch) == (2, 3)


async def test_empty_target_initial_sync():
    src, tgt, _, _ = await handshake(
        source_args(allow_initial_sync=True),
        target_args(volume_uuid=None, epochs=[], received_seq=0, applied_seq=0),
    )
    assert isinstance(src, Peer) and src.empty and src.volume_uuid == wire.ZERO_UUID
    assert isinstance(tgt, Peer) and tgt.initial_sync_allowed and tgt.volume_uuid == UUID


async def test_empty_target_without_initial_sync():
    src, tgt, _, _ = await handshake(
        source_args(allow_initial_sync=False),
        target_args(volume_uuid=None, epochs=[], received_seq=0, applied_seq=0),
    )
    assert_refused(src, RefuseReason.NO_INITIAL_SYNC, False, "does not allow an initial sync")
    assert_refused(tgt, RefuseReason.NO_INITIAL_SYNC, True, "initial sync")


async def test_timeout(autojump_clock):
    a, b = trio.testing.memory_stream_pair()
    with pytest.raises(HandshakeTimeout, match="timed out after 3 s"):
        await handshake_source(FramedStream(a), **source_args(), timeout=3)
    with pytest.raises(HandshakeTimeout, match="with the source"):
        await handshake_target(FramedStream(b), **target_args(), timeout=3)


async def test_unexpected_message_is_refused():
    a, b = trio.testing.memory_stream_pair()
    fa, fb = FramedStream(a), FramedStream(b)
    await fa.send(wire.Txn(1, b"too early"))
    with pytest.raises(HandshakeRefused, match="expected HELLO from source, got TXN") as info:
        await handshake_target(fb, **target_args())
    assert info.value.reason == RefuseReason.PROTOCOL
    refuse = await fa.receive()
    assert isinstance(refuse, wire.Refuse) and refuse.reason == RefuseReason.PROTOCOL
