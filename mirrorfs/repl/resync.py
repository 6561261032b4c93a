"""Resync of an out-of-sync target: only what differs, applied on the target as one group.

A target whose next transaction is no longer in the source's log (it fell further behind
than the log cap) still holds a consistent copy at its applied seq A. A resync brings it to
the source's state without a persistent dirty bitmap, by comparing checksums (DRBD's
checksum-based resync)::

    source                                            target (applies nothing meanwhile)
    S = last_seq; the log is pinned from S+1
    SYNC_BEGIN(RESYNC, geometry, S)            ->     opens a stage (store/staging.py)
    VERIFY_REQ(A, ranges) ...                  ->     digests of its block file at A
                                               <-     VERIFY_REPLY(A, digests)
      compared with the digests of the source's current committed blocks, differing ranges
      split and compared again (verify.find_differences) down to GRANULARITY blocks
    SYNC_BLOCKS(current content of those ranges) ->   staged
    SYNC_END(T)  T >= every seq sealed while reading ->  staged (T)
    TXN S+1 .. T, then on as usual             ->     staged; ACK(received = staged seq,
                                                      applied = A); once the stage holds T:
                                                      Volume.commit_resync, in one step
                                               <-     ACK(T, T): the source unpins S+1

Why the result is the source's state at T: a block that differs is sent as it was at some
seq in S..T and every write of S+1..T is replayed over it (full-block images, idempotent);
a block judged equal held at A what the source held at some seq c in S..T, so it is right
at T unless S+1..T wrote it, and then the replay does. Digests and block reads of the source
may run while a transaction is being written in place by the mount's persist worker; T
counts that transaction in (``in_flight_seq``), so its replay covers whatever was read.

Failback uses the same exchange as a *rewind*: the target's epoch history forked from the
source's at F and it holds seqs past F (mirrorfs.repl.fork). Its block file is still a
consistent state (its own seq X), so comparing it with the source's blocks finds exactly the
blocks that either side changed since the fork. Before staging anything it archives its log
records after F (mirrorfs.store.archive); it acknowledges F, not X, until the group is applied,
and the group adopts the source's epoch history in the same node.json record.

``run_resync`` is the source's side (called by the shipper's sending task; it awaits between
chunks, so FUSE and commits go on). ``TargetResync`` is the target's side: the receiver calls
it between two awaits for each frame of the resync; it never awaits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio

from mirrorfs.repl.source_session import SourceVolume
from mirrorfs.repl.stream import FramedStream
from mirrorfs.repl.verify import (
    batches,
    find_differences,
    merge_ranges,
    range_digests,
    whole_volume,
)
from mirrorfs.repl.wire import (
    ProtocolError,
    SyncBegin,
    SyncBlocks,
    SyncEnd,
    SyncFlags,
    SyncKind,
    Txn,
    VerifyReply,
    VerifyReq,
)
from mirrorfs.store.archive import archive_diverged
from mirrorfs.store.volume import ResyncResult, Volume

log = logging.getLogger(__name__)

GRANULARITY = 64  # blocks: the unit a difference is narrowed down to (and sent as)
FANOUT = 16  # parts a differing range is split into per round
ROUND_BYTES = 64 << 20  # bytes digested per VERIFY_REQ
MAX_REQ_RANGES = 4096  # ranges per VERIFY_REQ
SEND_CHUNK = 1 << 20  # bytes of block data per SYNC_BLOCKS


class ResyncError(ProtocolError):
    """The target did not answer as a resync needs (the shipper reconnects and retries)."""


@dataclass(slots=True)
class ResyncProgress:
    """A resync as the source sees it (``status()["resync"]``)."""

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
            "seconds": round(self.seconds or time.monotonic() - self.started, 3),
        }


class ReplyQueue:
    """VERIFY_REPLY frames routed from the shipper's reader to ``run_resync`` (in order)."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[VerifyReply](float("inf"))

    def put(self, reply: VerifyReply) -> None:
        """From the reader task (synchronous)."""
        self._send.send_nowait(reply)

    async def get(self) -> VerifyReply:
        return await self._receive.receive()


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


async def run_resync(
    volume: SourceVolume,
    fs: FramedStream,
    progress: ResyncProgress,
    replies: ReplyQueue,
    label: str,
    *,
    granularity: int = GRANULARITY,
    fanout: int = FANOUT,
) -> int:
    """Resync the target behind ``fs`` (source side); return the first seq to stream (S+1).

    The caller pinned the log from S+1 before the first await and routes VERIFY_REPLY frames
    to ``replies``. Raises ResyncError when the target answers for another seq than A.
    """
    vol = volume
    bs, count = vol.block_size, vol.block_count
    base, start = progress.base_seq, progress.start_seq
    wire0 = fs.bytes_sent
    log.info("target %s: resync from seq %d (it has seq %d)", label, start, base)
    await fs.send(SyncBegin(SyncKind.RESYNC, bs, count, start))
    max_blocks = max(1, ROUND_BYTES // bs)

    async def compare(todo: list[tuple[int, int]]) -> list[bool]:
        out: list[bool] = []
        for batch in batches(todo, max_blocks, MAX_REQ_RANGES):
            # Ask first, so that both sides hash at the same time.
            await fs.send(VerifyReq(base, batch))
            mine = await trio.to_thread.run_sync(range_digests, vol.device, batch)
            out += compare_reply(progress, batch, mine, await replies.get(), label)
        progress.rounds += 1
        return out

    top = whole_volume(count, min(granularity * fanout * fanout, max_blocks))
    found, _ = await find_differences(compare, top, granularity=granularity, fanout=fanout)
    differing = merge_ranges(found)
    progress.blocks_differing = sum(n for _, n in differing)
    progress.phase = "sending"
    per_chunk = max(1, SEND_CHUNK // bs)
    for first, n in differing:
        block, end = first, first + n
        while block < end:
            k = min(per_chunk, end - block)
            raw = vol.device.read(block, k)  # committed content, some seq in S..T
            msg = SyncBlocks.pack(block, raw, bs)
            block += k
            await fs.send(msg)
            progress.blocks_sent += k
            progress.bytes_sent += len(msg.data)
    # Every block read or digested so far reflects a state at or before this seq, including
    # a transaction that the persist worker may have been writing in place meanwhile.
    end_seq = max(vol.last_seq, vol.writer.in_flight_seq or 0)
    await fs.send(SyncEnd(end_seq))
    progress.end_seq = end_seq
    progress.phase = "replaying"
    progress.wire_bytes = fs.bytes_sent - wire0
    log.info(
        "target %s: resync compared %d block(s) in %d round(s), %d differ; sent %d block(s) "
        "(%d bytes of block data, %d bytes on the wire); consistent at seq %d once applied",
        label,
        progress.blocks_compared,
        progress.rounds,
        progress.blocks_differing,
        progress.blocks_sent,
        progress.bytes_sent,
        progress.wire_bytes,
        end_seq,
    )
    return start + 1


class TargetResync:
    """The target's end of one resync: stage what comes, apply it as one group at T.

    Created on SYNC_BEGIN(RESYNC) over a consistent replica at A. Its methods run between two
    awaits of the receiver's processor; none awaits, and ``commit`` applies the whole group
    in one synchronous step, so a reader on the replica sees A, then T, nothing in between.
    """

    def __init__(
        self,
        volume: Volume,
        msg: SyncBegin,
        *,
        fork_seq: int | None = None,
        source_epochs: list[list[int]] | None = None,
    ) -> None:
        """``fork_seq`` (failback): this replica diverged after that seq from a source with
        history ``source_epochs``; its seqs after the fork are archived now, before anything
        is staged, and the group adopts ``source_epochs`` when it is applied."""
        if msg.kind is not SyncKind.RESYNC:
            raise ProtocolError(f"{msg.kind.name} is not a resync")
        if (msg.block_size, msg.block_count) != (volume.block_size, volume.block_count):
            raise ProtocolError(
                f"resync geometry {msg.block_count} x {msg.block_size} does not match this "
                f"replica's {volume.block_count} x {volume.block_size}"
            )
        self.volume = volume
        self.start_seq = msg.start_seq
        self.base_seq = volume.last_seq
        self.fork_seq = fork_seq
        self.source_epochs = source_epochs
        self.archive: dict | None = None
        if fork_seq is not None:
            self.archive = archive_divergence(volume, fork_seq)
        self.stage = volume.applier.begin_resync(msg.start_seq, rewind=fork_seq is not None)
        self.end_seq: int | None = None
        self.blocks_staged = 0
        self.bytes_staged = 0
        self.txns_staged = 0
        self.started = time.monotonic()
        log.info(
            "resync from seq %d over this replica at seq %d: staging in %s",
            self.start_seq,
            self.base_seq,
            self.stage.name,
        )

    @property
    def complete(self) -> bool:
        """The stage holds everything up to T: the group can be applied."""
        return self.end_seq is not None and self.stage.last_seq == self.end_seq

    def on_blocks(self, msg: SyncBlocks) -> None:
        if self.end_seq is not None:
            raise ProtocolError("SYNC_BLOCKS after SYNC_END")
        vol = self.volume
        msg.blocks(vol.block_size)  # a bad frame is refused now, not when the group applies
        lz4 = bool(msg.flags & SyncFlags.LZ4)
        vol.applier.stage_blocks(self.stage, msg.first_block, msg.nblocks, msg.data, lz4=lz4)
        self.blocks_staged += msg.nblocks
        self.bytes_staged += len(msg.data)

    def on_end(self, msg: SyncEnd) -> bool:
        """SYNC_END(T); True when the group is complete (T == S, or T already staged)."""
        if self.end_seq is not None:
            raise ProtocolError("a second SYNC_END in one resync")
        if msg.consistent_at_seq < self.start_seq:
            raise ProtocolError(f"SYNC_END at seq {msg.consistent_at_seq}, before the resync")
        if self.stage.last_seq > msg.consistent_at_seq:
            raise ProtocolError(
                f"SYNC_END at {msg.consistent_at_seq}, seq {self.stage.last_seq} is staged"
            )
        self.end_seq = msg.consistent_at_seq
        return self.complete

    def on_txn(self, msg: Txn) -> bool:
        """Stage TXN S+1..T; True when the group is complete."""
        self.volume.applier.stage_txn(self.stage, msg.seq, msg.record)
        self.txns_staged += 1
        return self.complete

    def positions(self) -> tuple[int, int]:
        """(received, applied) for an ACK: staged seqs count as received once durable."""
        self.stage.sync()
        vol = self.volume
        if self.fork_seq is not None:
            # What this node holds past the fork is not the source's: it shares seqs up to F.
            received = self.stage.last_seq if self.txns_staged else self.fork_seq
            return received, self.fork_seq
        received = self.stage.last_seq if self.txns_staged else vol.received_seq
        return received, vol.last_seq

    def commit(self) -> ResyncResult:
        """Apply the group (synchronous; see ``Volume.commit_resync``)."""
        assert self.end_seq is not None
        epochs = self.source_epochs if self.fork_seq is not None else None
        result = self.volume.applier.commit_resync(self.stage, self.end_seq, epochs=epochs)
        log.info(
            "resync applied in %.1f s: %d block(s) (%d bytes staged) and %d transaction(s); "
            "replica consistent at seq %d",
            time.monotonic() - self.started,
            result.blocks,
            self.bytes_staged,
            result.txns,
            result.end_seq,
        )
        return result

    def abort(self, why: str) -> None:
        """The session ended first: discard the stage; the replica stays at A."""
        self.stage.discard()
        log.warning(
            "resync from seq %d abandoned (%s): stage discarded, replica still at seq %d",
            self.start_seq,
            why,
            self.volume.last_seq,
        )

    def as_dict(self) -> dict:
        return {
            "base_seq": self.base_seq,
            "start_seq": self.start_seq,
            "end_seq": self.end_seq,
            "staged_seq": self.stage.last_seq,
            "blocks_staged": self.blocks_staged,
            "bytes_staged": self.bytes_staged,
            "txns_staged": self.txns_staged,
            "fork_seq": self.fork_seq,
            "archive": self.archive["path"] if self.archive else None,
        }


def archive_divergence(volume: Volume, fork_seq: int) -> dict:
    """Archive this replica's seqs after ``fork_seq`` and name the file in node.json.

    Runs before the rewind stages anything, so the records are safe before the group can
    reset the log. A repeated resync (the first one was interrupted) rewrites the same file
    and keeps one entry for it.
    """
    st = volume.state
    info = archive_diverged(
        volume.path,
        volume.samlog,
        volume_uuid=st.volume_uuid,
        node_id=st.node_id,
        epoch=st.epoch,
        fork_seq=fork_seq,
        last_seq=volume.received_seq,
    ).as_dict()
    st.archives = [a for a in st.archives if a.get("path") != info["path"]] + [info]
    st.save(volume.path)
    return info
