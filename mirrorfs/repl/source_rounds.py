"""The source's resync and initial sync rounds, sans-IO (INTERNALS.md "Replication session").

Each round is a pure state machine: it says which frame goes out next and takes what came in
(or what the driver read from the block file) as data. No trio, no socket, no clock read;
the block file is read by the driver, between two awaits, and handed over as bytes. The
drivers are ``run_resync`` (repl/resync.py) and ``run_initial_sync`` (repl/initial_sync.py)::

    resync  = ResyncRound(progress, block_size, block_count, label)
    send(resync.begin())                              SYNC_BEGIN(RESYNC, geometry, S)
    while (req := resync.next_request()) is not None:  VERIFY_REQ(A, batch), bisection rounds
        send(req); resync.on_reply(digests(req.ranges), <VERIFY_REPLY>)
    for block, n in resync.chunks():                   the differing ranges, <= 128 KiB each
        send(resync.on_chunk(block, read(block, n)))   SYNC_BLOCKS
    send(resync.end(last_seq, in_flight_seq))          SYNC_END(T)

The initial sync is the same without the comparison: its chunks are the block runs that may
hold data (``data_runs``), and a chunk of zeros is skipped (``on_chunk`` returns None).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from mirrorfs.repl.verify import Bisection, Range, batches, merge_ranges, whole_volume
from mirrorfs.repl.wire import (
    ProtocolError,
    SyncBegin,
    SyncBlocks,
    SyncEnd,
    SyncKind,
    VerifyReply,
    VerifyReq,
)

log = logging.getLogger(__name__)

GRANULARITY = 64  # blocks: the unit a difference is narrowed down to (and sent as)
FANOUT = 16  # parts a differing range is split into per round
ROUND_BYTES = 64 << 20  # bytes digested per VERIFY_REQ
MAX_REQ_RANGES = 4096  # ranges per VERIFY_REQ
# Bytes of block data per SYNC_BLOCKS (initial sync and resync): as TXN_CHUNK
# (repl.txn_parts), so that a link cut every 256 KiB still carries a whole chunk per
# connection, and a copy or a resync resumed at the target's next block
# (``InitialSyncRound(first_block=)``, ``ResyncRound(resume=)``) moves forward.
SYNC_CHUNK = 128 << 10
SEND_CHUNK = SYNC_CHUNK  # (resync)


class ResyncError(ProtocolError):
    """The target did not answer as a resync needs (the shipper reconnects and retries)."""


@dataclass(slots=True)
class ResyncProgress:
    """A resync as the source sees it (``status()["resync"]``).

    ``started``/``finish``/``as_dict`` read the clock for the status report; the rounds never
    call them (the connection does, on the target's ACK of T)."""

    base_seq: int  # A: where the target was
    start_seq: int  # S: the log is pinned from S+1
    blocks_total: int
    fork_seq: int | None = None  # a rewind (failback): the target diverged after this seq
    end_seq: int | None = None  # T, once SYNC_END is sent
    phase: str = "comparing"  # comparing, sending, replaying (S+1..T), done
    rounds: int = 0
    ranges_compared: int = 0
    blocks_compared: int = 0
    blocks_differing: int = 0
    blocks_sent: int = 0
    bytes_sent: int = 0  # SYNC_BLOCKS data on the wire (after lz4)
    wire_bytes: int = 0  # everything sent from SYNC_BEGIN to SYNC_END, frames included
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0  # SYNC_BEGIN to the target's ACK of T applied
    # The merged differing ranges once the comparison is over (None before): what a resumed
    # resync sends from the target's next block, without comparing again.
    differing: list[tuple[int, int]] | None = None
    resumes: int = 0  # connections that went on with this resync where the last one stopped
    resumed_at: list[int] = field(default_factory=list)  # the block of each resume

    @property
    def done(self) -> bool:
        return self.phase == "done"

    def finish(self) -> None:
        self.phase = "done"
        self.seconds = time.monotonic() - self.started

    def as_dict(self) -> dict:
        return {
            "base_seq": self.base_seq,
            "start_seq": self.start_seq,
            "fork_seq": self.fork_seq,
            "end_seq": self.end_seq,
            "phase": self.phase,
            "rounds": self.rounds,
            "ranges_compared": self.ranges_compared,
            "blocks_compared": self.blocks_compared,
            "blocks_total": self.blocks_total,
            "blocks_differing": self.blocks_differing,
            "blocks_sent": self.blocks_sent,
            "bytes_sent": self.bytes_sent,
            "wire_bytes": self.wire_bytes,
            "resumes": self.resumes,
            "seconds": round(self.seconds or time.monotonic() - self.started, 3),
        }


@dataclass(slots=True)
class SyncProgress:
    """Initial sync progress: blocks scanned (sent or skipped) out of the volume's."""

    start_seq: int
    blocks_total: int
    blocks_done: int = 0
    blocks_sent: int = 0
    bytes_sent: int = 0
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict:
        pct = 100.0 * self.blocks_done / self.blocks_total if self.blocks_total else 100.0
        return {
            "seconds": round(time.monotonic() - self.started, 3),
            "start_seq": self.start_seq,
            "blocks_total": self.blocks_total,
            "blocks_done": self.blocks_done,
            "blocks_sent": self.blocks_sent,
            "bytes_sent": self.bytes_sent,
            "percent": round(pct, 1),
        }


def compare_reply(
    progress: ResyncProgress,
    batch: list[tuple[int, int]],
    mine: list[bytes],
    reply: VerifyReply,
    label: str,
) -> list[bool]:
    """Which ranges of ``batch`` differ, from our digests and the target's VERIFY_REPLY
    (pure). ResyncError when the reply is not for A or not for the whole batch: the target
    moved, which a resync forbids."""
    base = progress.base_seq
    if reply.seq != base or len(reply.digests) != len(batch):
        raise ResyncError(
            f"target {label} answered VERIFY_REQ(seq {base}) with seq {reply.seq} and "
            f"{len(reply.digests)} digest(s) for {len(batch)}: it moved during a resync"
        )
    progress.ranges_compared += len(batch)
    progress.blocks_compared += sum(n for _, n in batch)
    return [a != b for a, b in zip(mine, reply.digests, strict=True)]


def resync_resume(
    progress: ResyncProgress | None,
    announced: tuple[int, int, int],
    applied: int,
    fork_seq: int | None,
    block_count: int,
) -> tuple[int, int] | None:
    """``(first_block, staged_txn)`` to resume ``progress`` at, or None for a new resync.

    ``announced``: the (S, block, txn) of the stage that the target says it holds
    (HELLO_REPLY). Only the resync that this source began from that S, whose comparison is
    over, over the same target state (``applied`` = A, the same fork), goes on; the caller
    also needs S+1 pinned all along (``TargetPositions.plan(resume_seq=)``). Why it is still
    right: the target applied nothing since (its blocks are those compared), and every block
    sent, before or after the cut, was read at some seq in S..T' with T' >= T.
    """
    seq, block, txn = announced
    if progress is None or progress.done or progress.differing is None or not seq:
        return None
    if (seq, applied, fork_seq) != (progress.start_seq, progress.base_seq, progress.fork_seq):
        return None
    if not 0 <= block <= block_count or txn < seq:
        return None
    return block, txn


def end_seq_of(last_seq: int, in_flight_seq: int | None) -> int:
    """T of SYNC_END: every block read or digested so far reflects a state at or before it,
    including a transaction that the persist worker may be writing in place meanwhile."""
    return max(last_seq, in_flight_seq or 0)


class ResyncRound:
    """The source's side of one resync (repl/resync.py has the exchange), without I/O.

    ``begin`` gives SYNC_BEGIN; then ``next_request`` the VERIFY_REQ frames of the bisection,
    one at a time, each answered by ``on_reply`` (the source's digests of its ranges, and the
    target's VERIFY_REPLY) before the next; then ``chunks`` the block ranges to read, each
    turned into SYNC_BLOCKS by ``on_chunk``; then ``end`` gives SYNC_END(T).
    """

    def __init__(
        self,
        progress: ResyncProgress,
        block_size: int,
        block_count: int,
        label: str,
        *,
        granularity: int = GRANULARITY,
        fanout: int = FANOUT,
        resume: tuple[int, int] | None = None,
    ) -> None:
        self.progress = progress
        self.block_size = block_size
        self.block_count = block_count
        self.label = label
        self.max_blocks = max(1, ROUND_BYTES // block_size)
        top = whole_volume(block_count, min(granularity * fanout * fanout, self.max_blocks))
        self._bisection = Bisection(top, granularity=granularity, fanout=fanout)
        self._batches: deque[list[Range]] = deque()  # of this round, still to be asked
        self._asked: list[Range] | None = None  # the batch whose reply is awaited
        self._differ: list[bool] = []  # this round's answers so far
        self._round_open = False
        self._differing: list[Range] = []
        self._begun = False
        # Resumed: the comparison of an earlier connection stands (progress.differing); send
        # what differs from ``first_block``; the target staged S+1..``staged_txn``.
        self._resume = resume
        if resume is not None:
            assert progress.differing is not None, "a resync resumes after its comparison"
            self._differing = [
                (max(f, resume[0]), f + n - max(f, resume[0]))
                for f, n in progress.differing
                if f + n > resume[0]
            ]
            progress.phase = "sending"
            progress.end_seq = None
            progress.resumes += 1
            progress.resumed_at.append(resume[0])

    @property
    def first_to_stream(self) -> int:
        """S+1, or after what the target staged already (resumed): where the transaction
        stream goes on after SYNC_END."""
        staged = self._resume[1] if self._resume is not None else self.progress.start_seq
        return staged + 1

    @property
    def remaining(self) -> int:
        """Blocks still to send (of the differing ranges, once known)."""
        return sum(n for _, n in self._differing)

    def begin(self) -> SyncBegin:
        """SYNC_BEGIN(RESYNC, geometry, S): the target opens a stage (or, resumed, goes on
        with the one it announced, from ``first_block``)."""
        assert not self._begun, "a resync begins once"
        self._begun = True
        first = self._resume[0] if self._resume is not None else 0
        return SyncBegin(
            SyncKind.RESYNC, self.block_size, self.block_count, self.progress.start_seq, first
        )

    def next_request(self) -> VerifyReq | None:
        """The next VERIFY_REQ(A, batch); None once the comparison is over."""
        assert self._begun and self._asked is None, "one VERIFY_REQ at a time"
        if self._resume is not None:
            return None  # compared by an earlier connection
        if not self._round_open:
            if self._bisection.done:
                self._finish_comparing()
                return None
            self._batches.extend(batches(self._bisection.todo, self.max_blocks, MAX_REQ_RANGES))
            self._differ = []
            self._round_open = True
        self._asked = self._batches.popleft()
        return VerifyReq(self.progress.base_seq, self._asked)

    def on_reply(self, mine: list[bytes], reply: VerifyReply) -> None:
        """Our digests of the batch asked last and the target's VERIFY_REPLY to it.

        ResyncError when the target answered for another seq than A (``compare_reply``)."""
        batch = self._asked
        if batch is None:
            raise ProtocolError(f"VERIFY_REPLY for seq {reply.seq} without a request")
        self._asked = None
        self._differ += compare_reply(self.progress, batch, mine, reply, self.label)
        if not self._batches:  # the round is complete: the next one
            self.progress.rounds += 1
            self._bisection.feed(self._differ)
            self._round_open = False

    def _finish_comparing(self) -> None:
        if self.progress.phase != "comparing":
            return
        self._differing = merge_ranges(self._bisection.found)
        self.progress.differing = list(self._differing)
        self.progress.blocks_differing = sum(n for _, n in self._differing)
        self.progress.phase = "sending"

    @property
    def differing(self) -> list[Range]:
        """The differing ranges, merged (once the comparison is over)."""
        return list(self._differing)

    def chunks(self) -> Iterator[tuple[int, int]]:
        """``(first_block, nblocks)`` to read and send, in order, at most SEND_CHUNK each."""
        assert self.progress.phase == "sending", "chunks come after the comparison"
        per_chunk = max(1, SEND_CHUNK // self.block_size)
        for first, n in self._differing:
            block, end = first, first + n
            while block < end:
                k = min(per_chunk, end - block)
                yield block, k
                block += k

    def on_chunk(self, block: int, raw: bytes) -> SyncBlocks:
        """SYNC_BLOCKS for the committed content ``raw`` of the blocks from ``block``."""
        msg = SyncBlocks.pack(block, raw, self.block_size)
        self.progress.blocks_sent += len(raw) // self.block_size
        self.progress.bytes_sent += len(msg.data)
        return msg

    def end(self, last_seq: int, in_flight_seq: int | None) -> SyncEnd:
        """SYNC_END(T) with T from the volume's positions now (``end_seq_of``)."""
        end_seq = end_seq_of(last_seq, in_flight_seq)
        self.progress.end_seq = end_seq
        self.progress.phase = "replaying"
        return SyncEnd(end_seq)


class InitialSyncRound:
    """The source's side of an initial sync (repl/initial_sync.py), without I/O.

    ``begin`` gives SYNC_BEGIN(FULL); ``chunks(runs)`` the block ranges to read from the runs
    that may hold data; ``on_chunk`` the SYNC_BLOCKS for one (None: all zeros, skipped);
    ``end`` the SYNC_END(T).

    ``first_block`` > 0 resumes the copy from ``progress.start_seq`` that the target holds
    below that block (it announced it; the log was pinned from S+1 all along): nothing
    below it is sent again.
    """

    def __init__(
        self, progress: SyncProgress, block_size: int, block_count: int, *, first_block: int = 0
    ) -> None:
        self.progress = progress
        self.block_size = block_size
        self.block_count = block_count
        self.first_block = first_block
        self.per_chunk = max(1, SYNC_CHUNK // block_size)
        self._zeros = bytes(self.per_chunk * block_size)

    @property
    def first_to_stream(self) -> int:
        """S+1: where the transaction stream goes on after SYNC_END."""
        return self.progress.start_seq + 1

    def begin(self) -> SyncBegin:
        """SYNC_BEGIN(FULL, geometry, S): the target creates an empty replica."""
        return SyncBegin(
            SyncKind.FULL,
            self.block_size,
            self.block_count,
            self.progress.start_seq,
            self.first_block,
        )

    def chunks(self, runs: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        """``(first_block, nblocks)`` to read, in order, from ``(first, end)`` runs (taken
        one at a time: each is looked up after the previous one was sent)."""
        for first, end in runs:
            if end <= self.first_block:
                continue  # the target holds it from an earlier connection
            first = max(first, self.first_block)
            self.progress.blocks_done = first
            block = first
            while block < end:
                n = min(self.per_chunk, end - block)
                yield block, n
                block += n

    def on_chunk(self, block: int, raw: bytes) -> SyncBlocks | None:
        """SYNC_BLOCKS for ``raw`` read from ``block``; None when it is all zeros (a fresh
        replica is zeros already)."""
        n = len(raw) // self.block_size
        self.progress.blocks_done = block + n
        if raw == self._zeros[: len(raw)]:
            return None
        msg = SyncBlocks.pack(block, raw, self.block_size)
        self.progress.blocks_sent += n
        self.progress.bytes_sent += len(msg.data)
        return msg

    def end(self, last_seq: int, in_flight_seq: int | None) -> SyncEnd:
        """SYNC_END(T): every block read is of a state at or before T."""
        self.progress.blocks_done = self.block_count
        return SyncEnd(end_seq_of(last_seq, in_flight_seq))
