"""The replication wire format (repl.wire) and FramedStream (repl.stream), without sockets."""

from __future__ import annotations

import os
import struct
import zlib

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirrorfs.repl import wire
from mirrorfs.repl.stream import ConnectionClosed, FramedStream
from mirrorfs.repl.wire import (
    HEADER,
    MAX_FRAME,
    FrameDecoder,
    MsgType,
    ProtocolError,
    decode_frames,
    encode_frame,
)

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
b16 = st.binary(min_size=16, max_size=16)
b32 = st.binary(min_size=32, max_size=32)
node_ids = st.text(max_size=40)
texts = st.text(max_size=200)
epochs = st.lists(st.tuples(u64, u64), max_size=5)

MESSAGES = st.one_of(
    st.builds(
        wire.Hello,
        volume_uuid=b16,
        node_id=node_ids,
        epochs=epochs,
        last_seq=u64,
        nonce=b32,
        flags=st.sampled_from(list(wire.HelloFlags)),
        protocol_version=st.integers(0, 65535),
    ),
    st.builds(
        wire.HelloReply,
        volume_uuid=b16,
        node_id=node_ids,
        epochs=epochs,
        received_seq=u64,
        applied_seq=u64,
        nonce=b32,
        proof=b32,
        protocol_version=st.integers(0, 65535),
    ),
    st.builds(wire.Auth, proof=b32),
    st.just(wire.Accept()),
    st.builds(wire.Refuse, reason=st.sampled_from(wire.RefuseReason), text=texts),
    st.builds(wire.Txn, seq=u64, record=st.binary(min_size=1, max_size=300)),
    st.builds(wire.Ack, u64, u64, u64),
    st.builds(wire.SyncBegin, st.sampled_from(wire.SyncKind), u32, u64, u64),
    st.builds(
        wire.SyncBlocks,
        first_block=u64,
        nblocks=st.integers(1, 2**32 - 1),
        data=st.binary(min_size=1, max_size=300),
        flags=st.sampled_from(list(wire.SyncFlags)),
    ),
    st.builds(wire.SyncEnd, u64),
    st.builds(wire.VerifyReq, u64, st.lists(st.tuples(u64, u32), max_size=5)),
    st.builds(wire.VerifyReply, u64, st.lists(b32, max_size=5)),
    st.builds(wire.Ping, u64),
    st.builds(wire.Pong, u64),
    st.builds(wire.ErrorState, state=st.sampled_from(wire.PeerState), text=texts),
    st.builds(wire.Switchover, seq=u64, mirror_to=texts),
    st.builds(
        wire.SwitchoverDone,
        result=st.sampled_from(wire.SwitchoverResult),
        epoch=u64,
        start_seq=u64,
        text=texts,
    ),
)


def examples() -> list[wire.Message]:
    """One message of every type."""
    uuid, nonce = bytes(range(16)), bytes(range(32))
    return [
        wire.Hello(
            uuid, "src-1", [(1, 1), (2, 50)], 99, nonce, wire.HelloFlags.INITIAL_SYNC_ALLOWED
        ),
        wire.HelloReply(bytes(16), "tgt-é", [], 0, 0, nonce, bytes(32)),
        wire.HelloReply(bytes(16), "t", [], 0, 0, nonce, bytes(32), copy_seq=5, copy_block=64),
        wire.HelloReply(
            uuid, "tgt", [(1, 1)], 7, 6, nonce, bytes(32), partial_seq=8, partial_offset=131072
        ),
        wire.HelloReply(
            uuid,
            "tgt",
            [(1, 1)],
            6,
            6,
            nonce,
            bytes(32),
            resync_seq=90,
            resync_block=64,
            resync_txn=91,
        ),
        wire.Auth(bytes(range(32, 64))),
        wire.Accept(),
        wire.Refuse(wire.RefuseReason.FENCED, "fenced: epoch 2 < 3"),
        wire.Txn(5, b"a SAM record" * 100),
        wire.Ack(10, 9, 1_700_000_000_000_000_000),
        wire.TxnPart(11, 300_000, 0xDEADBEEF, 131072, b"part" * 100),
        wire.SyncBegin(wire.SyncKind.RESYNC, 4096, 1 << 20, 77),
        wire.SyncBegin(wire.SyncKind.RESYNC, 4096, 1 << 20, 77, first_block=1 << 20),
        wire.SyncBegin(wire.SyncKind.FULL, 4096, 1 << 20, 77, first_block=4096),
        wire.SyncBlocks.pack(12, bytes(4096) * 3, 4096),
        wire.SyncBlocks.pack(12, bytes(range(256)) * 16, 4096, compress=False),
        wire.SyncEnd(78),
        wire.VerifyReq(78, [(0, 10), (100, 1)]),
        wire.VerifyReply(78, [bytes(32), b"\xff" * 32]),
        wire.Ping(123),
        wire.Pong(123),
        wire.ErrorState(wire.PeerState.DISK_FULL, "no space left on /vol"),
        wire.Switchover(1234, "10.0.0.1:7000"),
        wire.SwitchoverDone(wire.SwitchoverResult.PROMOTED, 2, 1235),
        wire.SwitchoverDone(wire.SwitchoverResult.REFUSED, text="applied 1230, not 1234"),
    ]


def test_every_type_has_an_example():
    assert {m.TYPE for m in examples()} == set(MsgType)


@pytest.mark.parametrize("msg", examples(), ids=lambda m: m.TYPE.name)
def test_round_trip(msg):
    frame = msg.encode()
    assert decode_frames(frame) == [msg]
    magic, version, msg_type, flags, length, _, _ = HEADER.unpack_from(frame)
    assert (magic, version, msg_type, flags) == (b"MFSW", 1, msg.TYPE, 0)
    assert length == len(frame) - HEADER.size


def test_stream_of_all_types_fed_byte_by_byte():
    msgs = examples()
    data = b"".join(m.encode() for m in msgs)
    dec = FrameDecoder()
    out = []
    for i in range(len(data)):
        dec.feed(data[i : i + 1])
        while (m := dec.next_message()) is not None:
            out.append(m)
    assert out == msgs
    assert dec.buffered == 0 and dec.frames == len(msgs) and dec.offset == len(data)


def test_sync_blocks_compression():
    zeros = wire.SyncBlocks.pack(0, bytes(4096 * 4), 4096)
    assert zeros.flags == wire.SyncFlags.LZ4 and len(zeros.data) < 4096
    assert zeros.blocks(4096) == bytes(4096 * 4)
    # Incompressible data is sent as is.
    rnd = os.urandom(4096)
    plain = wire.SyncBlocks.pack(0, rnd, 4096)
    assert plain.flags == wire.SyncFlags.NONE and plain.blocks(4096) == rnd
    with pytest.raises(ProtocolError, match="bytes for"):
        plain.blocks(512)
    bad = wire.SyncBlocks(0, 4, b"\xff" * 20, wire.SyncFlags.LZ4)
    with pytest.raises(ProtocolError):
        bad.blocks(4096)


def test_text_is_one_line_and_bounded():
    r = wire.Refuse(wire.RefuseReason.OTHER, "two\nlines\r\n  and\ttabs")
    assert r.text == "two lines and tabs"
    long = wire.ErrorState(wire.PeerState.IO_ERROR, "é" * 2000)
    assert len(long.text.encode()) <= wire.MAX_TEXT
    assert decode_frames(long.encode()) == [long]


def test_encode_rejects_unrepresentable():
    with pytest.raises(ValueError, match="nonce"):
        wire.Hello(bytes(16), "x", [], 0, b"short").encode()
    with pytest.raises(ValueError):
        wire.Ack(-1, 0, 0).encode()
    with pytest.raises(ValueError):
        wire.Txn(1, b"").encode()
    with pytest.raises(ValueError):
        wire.Hello(bytes(16), "x" * 300, [], 0, bytes(32)).encode()
    with pytest.raises(ValueError, match="MAX_FRAME"):
        encode_frame(MsgType.TXN, bytes(MAX_FRAME + 1))
    uuid, nonce = bytes(range(16)), bytes(range(32))
    with pytest.raises(ValueError, match="without its start seq"):
        wire.HelloReply(uuid, "t", [], 1, 1, nonce, bytes(32), resync_block=3).encode()
    with pytest.raises(ValueError, match="not of a consistent target"):  # an empty one
        empty = wire.HelloReply(bytes(16), "t", [], 0, 0, nonce, bytes(32), resync_seq=3)
        empty.resync_txn = 3
        empty.encode()


# ---------------------------------------------------------------------------- errors


def frame(msg_type: int, payload: bytes, *, version=1, flags=0, length=None, magic=b"MFSW"):
    """A frame with valid CRCs around whatever header fields a test wants."""
    length = len(payload) if length is None else length
    prefix = struct.pack("<4sBBHI", magic, version, msg_type, flags, length)
    head = prefix + struct.pack("<I", zlib.crc32(prefix))
    crc = zlib.crc32(payload, zlib.crc32(head + bytes(4)))
    return head + struct.pack("<I", crc) + payload


def first_error(data: bytes) -> str:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        dec.feed(data)
        while dec.next_message() is not None:
            pass
    message = str(info.value)
    assert "\n" not in message
    # The decoder stays failed.
    with pytest.raises(ProtocolError):
        dec.next_message()
    with pytest.raises(ProtocolError):
        dec.feed(b"")
    return message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (frame(MsgType.PING, bytes(8), magic=b"HTTP"), "bad magic"),
        (frame(MsgType.PING, bytes(8), version=2), "unsupported frame version 2"),
        (frame(200, bytes(8)), "unknown message type 200"),
        (frame(MsgType.PING, bytes(8), flags=1), "unknown frame flags"),
        (frame(MsgType.PING, bytes(7)), "malformed PING payload: truncated"),
        (frame(MsgType.PING, bytes(9)), "malformed PING payload: 1 trailing bytes"),
        (frame(MsgType.REFUSE, b"\x63\x00\x00\x00"), "unknown reason 99"),
        (frame(MsgType.ERROR_STATE, b"\x00\x00\x02\x00\xff\xfe"), "not UTF-8"),
        (frame(MsgType.SYNC_BEGIN, struct.pack("<BBHIQQQ", 1, 1, 0, 4096, 1, 1, 0)), "reserved"),
        (
            frame(MsgType.SYNC_BEGIN, struct.pack("<BBHIQQQ", 9, 0, 0, 4096, 1, 1, 0)),
            "unknown kind",
        ),
        (frame(MsgType.SYNC_BEGIN, struct.pack("<BBHIQQQ", 2, 0, 0, 4096, 9, 1, 10)), "outside"),
        (frame(MsgType.SYNC_BEGIN, struct.pack("<BBHIQQQ", 1, 0, 0, 4096, 9, 1, 10)), "outside"),
        (frame(MsgType.HELLO, struct.pack("<HHI16s32sQ", 1, 4, 0, b"", b"", 0)), "flags bits"),
        (frame(MsgType.SYNC_BLOCKS, struct.pack("<QII", 0, 0, 0) + b"x"), "no blocks"),
        (frame(MsgType.TXN, struct.pack("<Q", 1)), "empty data"),
        (frame(MsgType.VERIFY_REQ, struct.pack("<QI", 1, 1000)), "count 1000 does not fit"),
        (frame(MsgType.VERIFY_REPLY, struct.pack("<QI", 1, 2**32 - 1)), "does not fit"),
    ],
)
def test_errors_name_the_problem(data, expected):
    assert expected in first_error(data)


def test_crc_mismatch():
    data = bytearray(wire.Ping(1).encode())
    data[-1] ^= 1
    assert "CRC mismatch (PING, 8 bytes)" in first_error(bytes(data))
    data = bytearray(wire.Ping(1).encode())
    data[9] ^= 1  # the length field
    assert "header CRC mismatch" in first_error(bytes(data))


def test_error_names_stream_offset():
    good = wire.Ping(1).encode()
    bad = bytearray(wire.Pong(2).encode())
    bad[-1] ^= 0x80
    msg = first_error(good + bytes(bad))
    assert f"stream offset {len(good)}" in msg


def test_length_checked_before_payload_is_buffered():
    dec = FrameDecoder()
    head = frame(MsgType.TXN, b"", length=MAX_FRAME + 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.feed(head)  # the header alone: no payload was ever needed
    small = FrameDecoder(max_frame=100)
    with pytest.raises(ProtocolError, match="length 101 exceeds 100"):
        small.feed(frame(MsgType.TXN, b"", length=101))


def test_torn_frame_waits_for_more():
    data = wire.Txn(1, b"x" * 1000).encode()
    dec = FrameDecoder()
    dec.feed(data[:-1])
    assert dec.next_message() is None and dec.buffered == len(data) - 1
    dec.feed(data[-1:])
    assert dec.next_message() == wire.Txn(1, b"x" * 1000)
    with pytest.raises(ProtocolError, match="torn frame"):
        decode_frames(data[:-3])


# ---------------------------------------------------------------------------- properties


def drain(dec: FrameDecoder) -> list[wire.Message]:
    out = []
    while (m := dec.next_message()) is not None:
        out.append(m)
    return out


@settings(max_examples=300, deadline=None)
@given(MESSAGES)
def test_property_round_trip(msg):
    data = msg.encode()
    (back,) = decode_frames(data)
    assert back == msg
    assert back.encode() == data


@settings(max_examples=200, deadline=None)
@given(st.lists(MESSAGES, min_size=1, max_size=6), st.data())
def test_property_any_chunking_decodes_the_same(msgs, data):
    stream = b"".join(m.encode() for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    dec = FrameDecoder()
    out = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        dec.feed(stream[prev:cut])
        prev = cut
        out += drain(dec)
    assert out == msgs and dec.buffered == 0


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_property_arbitrary_bytes(data):
    dec = FrameDecoder()
    try:
        dec.feed(data)
        drain(dec)
    except ProtocolError:
        pass


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([int(t) for t in MsgType]), st.binary(max_size=300))
def test_property_garbage_payload_with_valid_crc(msg_type, payload):
    # Valid CRCs get past the frame checks, so this exercises every payload parser.
    data = frame(msg_type, payload)
    try:
        msgs = decode_frames(data)
    except ProtocolError:
        return
    (msg,) = msgs
    # A payload that decodes is canonical (texts are normalised to one line).
    assert decode_frames(msg.encode()) == [msg]
    if not isinstance(msg, wire.Refuse | wire.ErrorState):
        assert msg.encode() == data


@settings(max_examples=300, deadline=None)
@given(MESSAGES, st.data())
def test_property_any_flipped_byte_is_detected(msg, data):
    raw = bytearray(msg.encode())
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(bytes(raw))
        drain(dec)


@settings(max_examples=300, deadline=None)
@given(MESSAGES, st.data())
def test_property_truncated_frame_is_incomplete_not_an_error(msg, data):
    raw = msg.encode()
    n = data.draw(st.integers(0, len(raw) - 1))
    dec = FrameDecoder()
    dec.feed(raw[:n])
    assert dec.next_message() is None
    dec.feed(raw[n:])
    assert dec.next_message() == msg


# ---------------------------------------------------------------------------- FramedStream


async def test_framed_stream_round_trip_and_eof():
    a, b = trio.testing.memory_stream_pair()
    left, right = FramedStream(a), FramedStream(b)
    msgs = examples()
    async with trio.open_nursery() as nursery:

        async def sender():
            for m in msgs:
                await left.send(m)
            await left.aclose()

        nursery.start_soon(sender)
        got = [await right.receive() for _ in msgs]
        with pytest.raises(ConnectionClosed, match="closed by peer"):
            await right.receive()
    assert got == msgs
    assert left.bytes_sent == right.bytes_received == sum(len(m.encode()) for m in msgs)


async def test_framed_stream_eof_inside_frame_and_bad_frame():
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(wire.Ping(1).encode()[:10])
    await a.aclose()
    with pytest.raises(ConnectionClosed, match="inside a frame"):
        await FramedStream(b).receive()

    a, b = trio.testing.memory_stream_pair()
    await a.send_all(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError, match="bad magic"):
        await FramedStream(b).receive()


def test_a_large_txn_record_is_decoded_as_a_view_of_the_frame_and_a_small_one_as_bytes():
    """The REST field of a large TXN is a view of the payload (immutable bytes), not one
    more copy of megabytes; small fields stay bytes. Both decode to what was sent."""
    from mirrorfs.repl.payload import REST_VIEW_MIN

    big = os.urandom(REST_VIEW_MIN + 100)
    small = os.urandom(100)
    got = wire.decode_frames(wire.Txn(1, big).encode() + wire.Txn(2, small).encode())
    assert isinstance(got[0].record, memoryview) and isinstance(got[0].record.obj, bytes)
    assert type(got[1].record) is bytes
    assert (bytes(got[0].record), got[1].record) == (big, small)
