"""The pure handshake machines (repl.handshake): messages in, steps out, no I/O at all."""

from __future__ import annotations

import pytest

from mirrorfs.repl.handshake import HandshakeRefused, SourceHandshake, Step, TargetHandshake
from mirrorfs.repl.wire import (
    ZERO_UUID,
    Accept,
    Auth,
    HelloReply,
    Ping,
    ProtocolError,
    Refuse,
    RefuseReason,
    decode_frames,
)

UUID = bytes(range(16))
SECRET = b"k" * 32


def source(**kw) -> SourceHandshake:
    args = dict(
        secret=SECRET, volume_uuid=UUID, node_id="src", epochs=[(1, 1)], last_seq=9, nonce=b"s" * 32
    )
    args.update(kw)
    return SourceHandshake(**args)


def target(**kw) -> TargetHandshake:
    args = dict(
        secret=SECRET,
        volume_uuid=UUID,
        node_id="tgt",
        epochs=[(1, 1)],
        received_seq=7,
        applied_seq=5,
        nonce=b"t" * 32,
    )
    args.update(kw)
    return TargetHandshake(**args)


def wire_copy(msg):
    """The message as the peer decodes it (the exact bytes go over the wire)."""
    (out,) = decode_frames(msg.encode())
    return out


def run(src: SourceHandshake, tgt: TargetHandshake) -> tuple[list[Step], list[Step]]:
    """Play both machines against each other until one side has an error or both a peer."""
    s_steps: list[Step] = []
    t_steps: list[Step] = []
    to_target = [src.hello()]
    while to_target:
        t = tgt.receive(wire_copy(to_target.pop(0)))
        t_steps.append(t)
        to_source = t.send + ([t.refuse] if t.refuse else [])
        if t.error is not None and not to_source:
            break
        for m in to_source:
            s = src.receive(wire_copy(m))
            s_steps.append(s)
            to_target += s.send + ([s.refuse] if s.refuse else [])
            if s.error is not None or s.peer is not None:
                break
    return s_steps, t_steps


def test_success_gives_both_peers_and_the_exact_frames():
    src, tgt = source(), target()
    s_steps, t_steps = run(src, tgt)
    assert [type(m) for m in t_steps[0].send] == [HelloReply]
    assert [type(m) for m in s_steps[0].send] == [Auth]
    assert [type(m) for m in t_steps[1].send] == [Accept]
    tpeer, speer = t_steps[1].peer, s_steps[1].peer
    assert tpeer.node_id == "src" and tpeer.last_seq == 9 and tpeer.epochs == ((1, 1),)
    assert speer.node_id == "tgt" and (speer.received_seq, speer.applied_seq) == (7, 5)
    assert not speer.empty and src.done and tgt.done
    # the same nonces give the same bytes: a pure machine is deterministic
    again = source().hello().encode()
    assert again == src.hello().encode()


def test_empty_target_asks_for_initial_sync():
    src, tgt = source(allow_initial_sync=True), target(volume_uuid=None, epochs=[])
    s_steps, t_steps = run(src, tgt)
    assert s_steps[-1].peer.empty and s_steps[-1].peer.volume_uuid == ZERO_UUID
    assert t_steps[-1].peer.initial_sync_allowed


@pytest.mark.parametrize(
    "skw, tkw, side, reason, text",
    [
        ({"secret": b"x" * 32}, {}, "source", RefuseReason.AUTH, "target 'tgt' failed auth"),
        ({}, {"secret": None}, "source", RefuseReason.AUTH, "failed authentication"),
        ({"protocol_version": 1}, {}, "target", RefuseReason.VERSION, "protocol version 1"),
        ({}, {"volume_uuid": bytes(15) + b"\1"}, "source", RefuseReason.WRONG_VOLUME, "wrong"),
        ({}, {"volume_uuid": None}, "source", RefuseReason.NO_INITIAL_SYNC, "empty"),
        ({}, {"epochs": [(1, 1), (2, 4)]}, "source", RefuseReason.FENCED, "fenced"),
    ],
)
def test_refusals(skw, tkw, side, reason, text):
    s_steps, t_steps = run(source(**skw), target(**tkw))
    refusing = (s_steps if side == "source" else t_steps)[-1]
    assert refusing.refuse is not None and refusing.refuse.reason is reason
    assert isinstance(refusing.error, HandshakeRefused) and not refusing.error.by_peer
    assert text in str(refusing.error)
    assert refusing.peer is None


def test_target_rechecks_what_a_hostile_source_skipped():
    src, tgt = source(), target(epochs=[(1, 1), (2, 4)])
    reply = tgt.receive(wire_copy(src.hello())).send[0]
    assert isinstance(reply, HelloReply)
    # the source ignores the newer epoch and sends its (valid) proof anyway
    src._reply = None
    step = src.receive(wire_copy(HelloReply(**{**_fields(reply), "epochs": [(1, 1)]})))
    assert isinstance(step.send[0], Auth)
    t = tgt.receive(wire_copy(step.send[0]))
    assert t.refuse.reason is RefuseReason.FENCED and not t.send


def _fields(msg) -> dict:
    return {k: getattr(msg, k) for k in msg.__dataclass_fields__}


def test_refuse_from_peer_and_unexpected_messages():
    src = source()
    step = src.receive(Refuse(RefuseReason.BUSY, "this target already follows x"))
    assert step.refuse is None and step.error.by_peer
    assert str(step.error) == "refused by target: this target already follows x"
    with pytest.raises(RuntimeError):
        src.receive(Accept())

    tgt = target()
    step = tgt.receive(Ping(1))
    assert step.refuse.reason is RefuseReason.PROTOCOL
    assert str(step.error) == "expected HELLO from source, got PING"

    bad = target().bad_frame(ProtocolError("bad frame at stream offset 0: bad magic b'GET '"))
    assert (
        bad.refuse.text == "bad frame from source: bad frame at stream offset 0: bad magic b'GET '"
    )
    assert isinstance(bad.error, ProtocolError)


def test_source_needs_a_uuid():
    with pytest.raises(ValueError):
        source(volume_uuid=ZERO_UUID)


def test_resume_points_reach_the_source():
    """What the target holds of a record sent in parts, and of an unfinished initial-sync
    copy (only when it is empty), is in the source's Peer after the handshake."""
    s_steps, _ = run(source(), target(partial_seq=8, partial_offset=131072))
    peer = s_steps[-1].peer
    assert (peer.partial_seq, peer.partial_offset, peer.copy_block) == (8, 131072, 0)
    src = source(allow_initial_sync=True)
    s_steps, _ = run(src, target(volume_uuid=None, epochs=[], copy_seq=4, copy_block=96))
    peer = s_steps[-1].peer
    assert peer.empty and (peer.copy_seq, peer.copy_block) == (4, 96)
    # A target with a volume has no copy to resume, whatever its caller says.
    s_steps, _ = run(source(), target(copy_seq=4, copy_block=96))
    assert s_steps[-1].peer.copy_block == 0


def test_an_old_peer_is_refused_with_the_versions_named():
    """A protocol-1 source (no TXN_PART, a shorter HELLO_REPLY) is told so at its HELLO,
    before anything it could misread is sent."""
    tgt = target()
    step = tgt.receive(wire_copy(source(protocol_version=1).hello()))
    assert step.send == [] and step.refuse is not None
    assert step.refuse.reason is RefuseReason.VERSION
    assert "speaks protocol version 1, the target speaks 2" in step.refuse.text
    # ... in a REFUSE whose frame and payload are laid out as in protocol 1.
    assert decode_frames(step.refuse.encode()) == [step.refuse]
