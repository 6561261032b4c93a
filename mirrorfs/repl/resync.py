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

A resync larger than one connection resumes (INTERNALS.md "Flaky links"): the target keeps
its stage across sessions and announces (S, next block, staged seq) in HELLO_REPLY; the
source, which kept the differing ranges and S+1 pinned, sends SYNC_BEGIN(RESYNC, S,
first_block) and only the rest, then a new SYNC_END(T') and the TXN after what is staged.

Failback uses the same exchange as a *rewind*: the target's epoch history forked from the
source's at F and it holds seqs past F (mirrorfs.repl.fork). Its block file is still a
consistent state (its own seq X), so comparing it with the source's blocks finds exactly the
blocks that either side changed since the fork. Before staging anything it archives its log
records after F (mirrorfs.store.archive); it acknowledges F, not X, until the group is applied,
and the group adopts the source's epoch history in the same node.json record.

``run_resync`` is the source's side (called by the shipper's sending task; it awaits between
chunks, so FUSE and commits go on): a thin driver of ``ResyncRound``
(mirrorfs.repl.source_rounds), which decides every frame; the driver sends them, digests its
ranges in a thread and reads the differing blocks between two awaits. ``TargetResync`` is
the target's side: the receiver calls it between two awaits for each frame of the resync; it
never awaits.
"""

from __future__ import annotations

import logging
import time

import trio

from mirrorfs.repl.source_rounds import (
    FANOUT,
    GRANULARITY,
    MAX_REQ_RANGES,
    ROUND_BYTES,
    SEND_CHUNK,
    ResyncError,
    ResyncProgress,
    ResyncRound,
    compare_reply,
)
from mirrorfs.repl.source_session import SourceVolume
from mirrorfs.repl.stream import FramedStream
from mirrorfs.repl.verify import range_digests
from mirrorfs.repl.wire import (
    ProtocolError,
    SyncBegin,
    SyncBlocks,
    SyncEnd,
    SyncFlags,
    SyncKind,
    Txn,
    VerifyReply,
)
from mirrorfs.store.archive import archive_diverged
from mirrorfs.store.volume import ResyncResult, Volume

log = logging.getLogger(__name__)

__all__ = [
    "FANOUT",
    "GRANULARITY",
    "MAX_REQ_RANGES",
    "ROUND_BYTES",
    "SEND_CHUNK",
    "ReplyQueue",
    "ResyncError",
    "ResyncProgress",
    "TargetResync",
    "compare_reply",
    "run_resync",
]


class ReplyQueue:
    """VERIFY_REPLY frames routed from the shipper's reader to ``run_resync`` (in order)."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[VerifyReply](float("inf"))

    def put(self, reply: VerifyReply) -> None:
        """From the reader task (synchronous)."""
        self._send.send_nowait(reply)

    async def get(self) -> VerifyReply:
        return await self._receive.receive()


async def run_resync(
    volume: SourceVolume,
    fs: FramedStream,
    progress: ResyncProgress,
    replies: ReplyQueue,
    label: str,
    *,
    granularity: int = GRANULARITY,
    fanout: int = FANOUT,
    resume: tuple[int, int] | None = None,
) -> int:
    """Resync the target behind ``fs`` (source side); return the first seq to stream (S+1,
    or after what the target staged).

    The caller pinned the log from S+1 before the first await and routes VERIFY_REPLY frames
    to ``replies``. Raises ResyncError when the target answers for another seq than A.
    ``resume``: (first_block, staged_txn) of the stage the target kept of this resync
    (``source_rounds.resync_resume``): no comparison, only what differs from that block.
    """
    vol = volume
    m = ResyncRound(
        progress,
        vol.block_size,
        vol.block_count,
        label,
        granularity=granularity,
        fanout=fanout,
        resume=resume,
    )
    wire0 = fs.bytes_sent - progress.wire_bytes  # (a resumed resync counts on)
    if resume is None:
        log.info(
            "target %s: resync from seq %d (it has seq %d)",
            label,
            progress.start_seq,
            progress.base_seq,
        )
    else:
        log.info(
            "target %s: resuming the resync from seq %d at block %d (%d block(s) left of "
            "%d differing; seq %d staged)",
            label,
            progress.start_seq,
            resume[0],
            m.remaining,
            progress.blocks_differing,
            resume[1],
        )
    await fs.send(m.begin())
    while (req := m.next_request()) is not None:
        # Ask first, so that both sides hash at the same time.
        await fs.send(req)
        mine = await trio.to_thread.run_sync(range_digests, vol.device, req.ranges)
        m.on_reply(mine, await replies.get())
    for block, n in m.chunks():
        # Committed content, of some seq in S..T; read between two awaits.
        await fs.send(m.on_chunk(block, vol.device.read(block, n)))
        progress.wire_bytes = fs.bytes_sent - wire0
    end = m.end(vol.last_seq, vol.writer.in_flight_seq)
    await fs.send(end)
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
        end.consistent_at_seq,
    )
    return m.first_to_stream


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
        self.next_block = 0  # every differing block below it is staged (they come in order)
        self.resumes = 0  # connections that went on with this stage
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

    def resume_point(self) -> tuple[int, int, int]:
        """(S, block, txn) for HELLO_REPLY: the differing blocks below ``block`` and S+1..txn
        are staged; ``block`` is the block count once SYNC_END came (only T is left)."""
        block = self.volume.block_count if self.end_seq is not None else self.next_block
        return self.start_seq, block, self.stage.last_seq

    def matches(self, msg: SyncBegin, fork_seq: int | None) -> bool:
        """``msg`` (SYNC_BEGIN(RESYNC)) goes on with this stage, as announced."""
        return (
            msg.start_seq == self.start_seq
            and msg.first_block == self.resume_point()[1]
            and fork_seq == self.fork_seq
            and self.volume.last_seq == self.base_seq
        )

    def resume(self, msg: SyncBegin) -> None:
        """Go on with this stage in a new session: the rest of the blocks from
        ``msg.first_block``, a new SYNC_END(T') with T' >= what is staged, then TXN."""
        self.stage.trim()
        self.end_seq = None
        self.next_block = msg.first_block
        self.resumes += 1
        log.info(
            "resuming the resync from seq %d at block %d: %d block(s) and seq %d staged",
            self.start_seq,
            msg.first_block,
            self.blocks_staged,
            self.stage.last_seq,
        )

    def on_blocks(self, msg: SyncBlocks) -> None:
        if self.end_seq is not None:
            raise ProtocolError("SYNC_BLOCKS after SYNC_END")
        if msg.first_block < self.next_block:
            raise ProtocolError(
                f"SYNC_BLOCKS at block {msg.first_block}, below block {self.next_block}"
            )
        vol = self.volume
        msg.blocks(vol.block_size)  # a bad frame is refused now, not when the group applies
        lz4 = bool(msg.flags & SyncFlags.LZ4)
        vol.applier.stage_blocks(self.stage, msg.first_block, msg.nblocks, msg.data, lz4=lz4)
        self.next_block = msg.first_block + msg.nblocks
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

    def suspend(self, why: str) -> None:
        """The session ended first: the stage stays, for the next session to resume."""
        log.info(
            "resync from seq %d interrupted (%s): stage kept (%d block(s) below block %d, "
            "seq %d); replica still at seq %d",
            self.start_seq,
            why,
            self.blocks_staged,
            self.resume_point()[1],
            self.stage.last_seq,
            self.volume.last_seq,
        )

    def abort(self, why: str) -> None:
        """Not to be resumed (replaced by another resync, or the replica moved on): discard
        the stage; the replica stays at A."""
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
            "next_block": self.resume_point()[1],
            "resumes": self.resumes,
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
