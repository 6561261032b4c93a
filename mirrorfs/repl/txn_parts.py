"""Transactions larger than one chunk travel in parts, and resume where a cut left them.

A link that carries some bytes per connection must carry all of them eventually: a record
shipped as one TXN frame of 20 MB never arrives over a link that is cut every 256 KiB, and
the target, which keeps nothing of a torn frame, would be sent the same frame for ever. So
the source sends the first record of each connection, when it is larger than
``TXN_CHUNK``, as TXN_PART frames of at most ``TXN_CHUNK`` bytes each (``split_record``;
later records of a connection go whole while they fit ``WHOLE_RECORD_MAX``: ``chunk_for``);
every part carries the record's seq, length and crc32, and the frame's own CRC covers the
part. The target keeps the parts that arrived
whole, in order (``PartialTxn``, held by the replica store across connections), and tells
the source in its next HELLO_REPLY where to resume (``partial_seq``, ``partial_offset``):
the source sends the rest of that record from there (``resume_offset``). A connection that
carries at least one chunk (plus the handshake) therefore always moves the record forward.

Safety: a partial record is never applied or logged; only the complete record, whose crc32
matches the one every part announced, is handed on as a TXN (and the SAM record's own
checksum is checked when it is logged). The partial lives in memory only: a target that
restarts has none and announces (0, 0), so a crash can leave nothing half-written behind;
the source then sends the record from its start. A complete record is kept until the log
holds it (``done_upto``): if the connection ends before the group with it was logged, the
target announces the offset of its last part, which the source sends again and which
completes the record again.

Pure: no trio, no I/O, no clock.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator

from mirrorfs.repl.wire import Message, ProtocolError, Txn, TxnPart

log = logging.getLogger(__name__)

# Half of the smallest per-connection budget we want to survive (a link cut every 256 KiB
# carries one whole part per connection, plus the handshake and the ACKs), and large enough
# that the 36 bytes of header per part are noise.
TXN_CHUNK = 128 << 10

#: The largest record sent as one TXN frame once a connection has carried a record whole
#: (``chunk_for``); half the frame limit, so a frame's header always fits.
WHOLE_RECORD_MAX = 32 << 20


def chunk_for(first_of_connection: bool) -> int:
    """The piece size for the next record of a connection.

    Pieces cost a copy and a crc32 of every record on both ends, which a healthy link does
    not need. So only the FIRST record of each connection goes in pieces (and any record
    resumed mid-way); once a connection has carried one record, the next ones go whole, up
    to ``WHOLE_RECORD_MAX``. Convergence holds on a link cut every N bytes: the record a
    cut interrupted is the first of the next connection, which carries at least one of its
    pieces, and the target keeps them (so each connection moves that record forward).
    """
    return TXN_CHUNK if first_of_connection else WHOLE_RECORD_MAX


def split_record(
    seq: int, record: bytes, *, start: int = 0, chunk: int = TXN_CHUNK
) -> Iterator[Message]:
    """The frames that carry ``record`` from byte ``start``: one TXN when it fits a chunk
    (and nothing of it is at the target yet), else TXN_PARTs of at most ``chunk`` bytes."""
    if start == 0 and len(record) <= chunk:
        yield Txn(seq, record)
        return
    crc = zlib.crc32(record)
    view = memoryview(record)
    for offset in range(start, len(record), chunk):
        yield TxnPart(seq, len(record), crc, offset, bytes(view[offset : offset + chunk]))


def resume_offset(seq: int, record: bytes, partial_seq: int, partial_offset: int) -> int:
    """Where to start sending ``record`` (of ``seq``) to a target that announced it holds
    ``partial_offset`` bytes of ``partial_seq``: there, if it is this record and inside it."""
    if partial_seq == seq and 0 < partial_offset < len(record):
        return partial_offset
    return 0


class PartialTxn:
    """The parts of one record received so far, in order (module docstring)."""

    __slots__ = ("seq", "total", "crc", "_data", "last_offset", "complete", "parts")

    def __init__(self, seq: int, total: int, crc: int) -> None:
        self.seq = seq
        self.total = total
        self.crc = crc
        self._data = bytearray()
        self.last_offset = 0  # where the last part taken began
        self.complete = False
        self.parts = 0

    def __repr__(self) -> str:
        return f"PartialTxn(seq={self.seq}, {self.offset}/{self.total} bytes)"

    @property
    def offset(self) -> int:
        """Bytes held."""
        return len(self._data)

    @property
    def resume_at(self) -> int:
        """The offset to announce: what is held, or, once complete (and the record not yet
        logged), the start of the last part, so that the source sends it again."""
        return self.last_offset if self.complete else self.offset

    def matches(self, part: TxnPart) -> bool:
        return (part.seq, part.total, part.crc) == (self.seq, self.total, self.crc)

    def add(self, part: TxnPart) -> bytes | None:
        """Take ``part`` (it must match, at ``offset`` or, once complete, ``last_offset``);
        the whole record once it is complete and its crc32 checks."""
        if self.complete and part.offset == self.last_offset:
            del self._data[part.offset :]  # the last part again: the record is completed again
            self.complete = False
        if part.offset != self.offset:
            raise ProtocolError(
                f"TXN_PART of seq {part.seq} at byte {part.offset}, but the target holds "
                f"{self.offset} bytes of it"
            )
        self.last_offset = part.offset
        self._data += part.data
        self.parts += 1
        if self.offset < self.total:
            return None
        record = bytes(self._data)
        if zlib.crc32(record) != self.crc:
            self._data.clear()  # of no use: the source sends it again from the start
            self.last_offset = 0
            raise ProtocolError(
                f"seq {self.seq}: the {self.total} bytes assembled from parts do not match "
                f"their crc32 {self.crc:#010x}"
            )
        self.complete = True
        return record


def take_part(held: PartialTxn | None, part: TxnPart) -> tuple[PartialTxn | None, bytes | None]:
    """What the target holds after ``part`` arrived, and the complete record if this part
    completed it. ProtocolError (the connection is dropped; what is held is kept only when
    it is still good) when the part does not continue what is held."""
    if held is not None and held.matches(part):
        return held, held.add(part)
    if part.offset != 0:
        # The source resumes another record than the one held (or one we do not hold): it
        # must send it from the start. What is held is of no use to it either.
        raise ProtocolError(
            f"TXN_PART of seq {part.seq} at byte {part.offset}, but the target holds "
            + (f"{held.offset} bytes of seq {held.seq}" if held is not None else "none of it")
        )
    if held is not None:
        log.info(
            "discarding %d bytes of seq %d: the source sends seq %d",
            held.offset,
            held.seq,
            part.seq,
        )
    fresh = PartialTxn(part.seq, part.total, part.crc)
    return fresh, fresh.add(part)
