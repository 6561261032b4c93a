"""Replication wire protocol: frames and messages (sans-IO, no sockets, no trio).

Everything the source and the target say to each other is a sequence of frames on one TCP
stream. This module turns messages into bytes (``Message.encode``) and bytes into messages
(``FrameDecoder``); ``mirrorfs.repl.stream`` does the I/O around it. It is the one name to
import: the frame header and its decoder live in ``mirrorfs.repl.frames``, the payload codec
in ``mirrorfs.repl.payload``, the message classes and their enums in
``mirrorfs.repl.messages``; this module documents the whole format and re-exports them.

Frame layout (all integers little-endian)::

    offset size  field
    0      4     magic          b"MFSW"
    4      1     version        FRAME_VERSION (1): the layout of this header
    5      1     type           MsgType
    6      2     flags          reserved, must be 0 (a receiver rejects unknown bits)
    8      4     length         payload bytes that follow the header, <= MAX_FRAME (64 MiB)
    12     4     hcrc           crc32 of bytes 0..12
    16     4     crc            crc32 of the 20 header bytes with this field zeroed,
                                continued over the payload
    20     ...   payload        ``length`` bytes, laid out per message type (below)

``hcrc`` lets a receiver trust ``length`` and ``type`` before it buffers the payload: a
damaged header is reported at once instead of making the receiver wait for (or allocate) a
payload that never comes. ``length`` is checked against MAX_FRAME before any payload byte is
buffered, and the magic as soon as its bytes arrive (a stranger is turned away at once).

The frame version is distinct from the protocol version carried in HELLO: the header layout
is meant to stay fixed, so a peer speaking another protocol version can still read the
REFUSE that tells it so. HELLO's layout is fixed for the same reason: the target reads a
HELLO of any version and refuses another version than its own with REFUSE VERSION (the
source does the same with HELLO_REPLY), so nothing else is exchanged between versions.
Protocol versions: 1, the first; 2 adds TXN_PART, HELLO_REPLY's partial_seq,
partial_offset, copy_seq, copy_block, resync_seq, resync_block and resync_txn, and
SYNC_BEGIN's first_block (a version-1 peer is refused at HELLO, before it could misread
them).

Payloads. ``str`` = u16 byte length + UTF-8 (node ids <= 255 bytes, texts <= 1024 bytes);
``epochs`` = u32 count + count x (epoch u64, start_seq u64), oldest first, count <= 4096.
Every reserved field must be 0, unknown enum values and flag bits are rejected, and a
payload must be consumed exactly, so that a decoded message re-encodes to the very same bytes
(the fuzz tests check this). The one exception: REFUSE, ERROR_STATE and SWITCHOVER_DONE texts
are normalised to one line (whitespace runs become one space) when a message is built, sent
or received.
The SAM record in TXN is at most MAX_TXN_RECORD (MAX_FRAME - 8) bytes::

    HELLO        (1, source -> target) protocol_version u16, flags u16 (HelloFlags),
                 reserved u32, volume_uuid 16s, nonce 32s, last_seq u64, node_id str, epochs
    HELLO_REPLY  (2, target -> source) protocol_version u16, reserved u16, reserved u32,
                 volume_uuid 16s (all zero: the target is empty and wants an initial sync),
                 nonce 32s, proof 32s (over the source's nonce, see repl.auth),
                 received_seq u64, applied_seq u64, partial_seq u64, partial_offset u64
                 (the target holds the first partial_offset bytes of the record of
                 partial_seq from TXN_PART frames; 0, 0: nothing), copy_seq u64,
                 copy_block u64 (an empty target holding an unfinished initial-sync copy
                 from copy_seq: every block below copy_block; 0, 0: none; non-zero only
                 with an all-zero volume_uuid), resync_seq u64, resync_block u64,
                 resync_txn u64 (a consistent target holding the stage of an unfinished
                 resync from resync_seq: every differing block below resync_block, the
                 block count once SYNC_END came, and seqs resync_seq+1..resync_txn;
                 0, 0, 0: none), node_id str, epochs
    AUTH         (3, source -> target) proof 32s (over the target's nonce)
    ACCEPT       (4, target -> source) empty: the handshake succeeded
    REFUSE       (5, either side) reason u16 (RefuseReason), text str (one line)
    TXN          (16, source -> target) seq u64, then a SAM log record (store.record), verbatim
                 to the end of the payload (the record carries its own checksum)
    ACK          (17, target -> source) received_seq u64, applied_seq u64, target_time_ns u64
    TXN_PART     (18, source -> target) seq u64, total u32, crc u32, offset u32,
                 reserved u32, data (the rest, >= 1 byte): bytes offset..offset+len(data)
                 of the SAM record of ``seq``, ``total`` bytes long with crc32 ``crc``.
                 A record larger than TXN_CHUNK (128 KiB) is sent as consecutive parts of at
                 most TXN_CHUNK bytes instead of one TXN; the target keeps whole parts across
                 connections (in memory) and, once they add up to ``total`` bytes whose crc32
                 is ``crc``, takes the record as a TXN. It announces what it holds in its next
                 HELLO_REPLY, and the source resumes the record there (repl.txn_parts).
    SYNC_BEGIN   (32, source -> target) kind u8 (SyncKind), reserved u8, reserved u16,
                 block_size u32, block_count u64, start_seq u64, first_block u64
                 (<= block_count; FULL: > 0 goes on with the copy from start_seq that the
                 target announced it holds below that block; RESYNC: equal to the
                 resync_block announced for a stage from start_seq, goes on with that stage,
                 without VERIFY_REQ; the source pinned S+1 all along)
    SYNC_BLOCKS  (33, source -> target) first_block u64, nblocks u32 (>= 1),
                 flags u32 (SyncFlags: bit 0 = data is lz4.block without size prefix),
                 data (the rest; nblocks * block_size bytes once decompressed)
    SYNC_END     (34, source -> target) consistent_at_seq u64
    VERIFY_REQ   (48, source -> target) seq u64, u32 count, count x (first_block u64,
                 nblocks u32)
    VERIFY_REPLY (49, target -> source) seq u64, u32 count, count x digest 32s
    PING         (64, either side) timestamp_ns u64
    PONG         (65, either side) timestamp_ns u64 (the PING's, echoed)
    ERROR_STATE  (80, target -> source) state u16 (PeerState; OK clears), text str
    SWITCHOVER   (96, source -> target) seq u64, mirror_to str (HOST:PORT, <= 1024 bytes):
                 the source stopped at ``seq``; take over and mirror back to it there
    SWITCHOVER_DONE (97, target -> source) result u16 (SwitchoverResult), reserved u16,
                 reserved u32, epoch u64, start_seq u64, text str (one line; why refused)

Errors: anything wrong in the bytes raises ``ProtocolError`` with a one-line message naming
the stream offset of the frame and what is wrong. A decoder that raised stays failed (the
stream cannot be resynchronised); the connection must be dropped.
"""

from __future__ import annotations

from mirrorfs.repl.frames import (
    FRAME_VERSION,
    HEADER,
    MAGIC,
    MAX_FRAME,
    PROTOCOL_VERSION,
    FrameReader,
    ProtocolError,
    ReplError,
    encode_frame,
    frame_header,
)
from mirrorfs.repl.messages import (
    _MESSAGES,
    Accept,
    Ack,
    Auth,
    ErrorState,
    Hello,
    HelloFlags,
    HelloReply,
    Message,
    MsgType,
    PeerState,
    Ping,
    Pong,
    Refuse,
    RefuseReason,
    Switchover,
    SwitchoverDone,
    SwitchoverResult,
    SyncBegin,
    SyncBlocks,
    SyncEnd,
    SyncFlags,
    SyncKind,
    Txn,
    TxnPart,
    VerifyReply,
    VerifyReq,
    decode_payload,
    type_name,
)
from mirrorfs.repl.payload import (
    DIGEST_SIZE,
    MAX_EPOCHS,
    MAX_NODE_ID,
    MAX_RANGES,
    MAX_SYNC_RAW,
    MAX_TEXT,
    MAX_TXN_RECORD,
    NONCE_SIZE,
    PROOF_SIZE,
    UUID_SIZE,
    ZERO_UUID,
    one_line,
)


class FrameDecoder(FrameReader):
    """Incremental decoder of replication frames: ``feed(bytes)``, then ``next_message()``
    until None (``FrameReader`` with the messages of mirrorfs.repl.messages)."""

    def __init__(self, *, max_frame: int = MAX_FRAME):
        super().__init__(decode_payload, _MESSAGES, type_name, max_frame=max_frame)

    def next_message(self) -> Message | None:
        """The next complete message, or None when more bytes are needed."""
        return super().next_message()


def decode_frames(data: bytes) -> list[Message]:
    """Every message in ``data``, which must end on a frame boundary (for tests and tools)."""
    dec = FrameDecoder()
    dec.feed(data)
    out = []
    while (msg := dec.next_message()) is not None:
        out.append(msg)
    if dec.buffered:
        raise ProtocolError(f"torn frame at stream offset {dec.offset}: {dec.buffered} bytes")
    return out


__all__ = [
    "DIGEST_SIZE",
    "FRAME_VERSION",
    "HEADER",
    "MAGIC",
    "MAX_EPOCHS",
    "MAX_FRAME",
    "MAX_NODE_ID",
    "MAX_RANGES",
    "MAX_SYNC_RAW",
    "MAX_TEXT",
    "MAX_TXN_RECORD",
    "NONCE_SIZE",
    "PROOF_SIZE",
    "PROTOCOL_VERSION",
    "UUID_SIZE",
    "ZERO_UUID",
    "Accept",
    "Ack",
    "Auth",
    "ErrorState",
    "FrameDecoder",
    "Hello",
    "HelloFlags",
    "HelloReply",
    "Message",
    "MsgType",
    "PeerState",
    "Ping",
    "Pong",
    "ProtocolError",
    "Refuse",
    "RefuseReason",
    "ReplError",
    "Switchover",
    "SwitchoverDone",
    "SwitchoverResult",
    "SyncBegin",
    "SyncBlocks",
    "SyncEnd",
    "SyncFlags",
    "SyncKind",
    "Txn",
    "TxnPart",
    "VerifyReply",
    "VerifyReq",
    "decode_frames",
    "decode_payload",
    "encode_frame",
    "frame_header",
    "one_line",
]
