"""The initial (full) sync of an empty target (mirrorfs/INTERNALS.md, "Replication session" step 2).

Source side (``run_initial_sync``, called by the shipper's sending task, drives
``InitialSyncRound`` of mirrorfs.repl.source_rounds, which decides what is sent):

SYNC_BEGIN(FULL, geometry, S), the non-zero blocks of the block file in chunks of at most
128 KiB (holes skipped with SEEK_DATA/SEEK_HOLE, zero chunks skipped, lz4 when it helps),
SYNC_END(T). The caller (the shipper) pinned the log from S+1 before the first await and
streams S+1.. afterwards; the target replays them over the fuzzy copy (physical redo is
idempotent) and is consistent once it has applied T.

Resumed (a connection cut during the copy): the target, still running, announces in its
HELLO_REPLY that it holds the copy from S below block B (``ReplicaStore.copy_resume``); the
shipper kept S+1 pinned, so the next connection sends SYNC_BEGIN(FULL, S, first_block=B) and
the chunks from B on. That is the same fuzzy copy, only read over a longer time: the blocks
below B reflect states from S to the first connection's T, the rest later ones, and the
replay of S+1..T (the last connection's T) makes every block what it is at T. A target that
restarted holds no such promise (it is kept in memory only) and gets a new copy.

Block file reads happen between awaits; each chunk reflects a state at or before T, where T
also counts a transaction that the mount's persist worker may be writing in place while a
chunk is read (``in_flight_seq``): its replay covers whatever half of it was read.

Target side (``start_replica`` on SYNC_BEGIN, ``finish_copy`` on SYNC_END, called by the
receiver between two awaits): a fresh replica directory, blocks written by
``Volume.write_sync_blocks``; the replica is consistent once it has applied T.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator

import trio

from mirrorfs.repl.source_rounds import SYNC_CHUNK, InitialSyncRound, SyncProgress
from mirrorfs.repl.source_session import SourceVolume
from mirrorfs.repl.stream import FramedStream, Peer
from mirrorfs.repl.wire import ProtocolError, SyncBegin, SyncEnd
from mirrorfs.store.volume import BLOCK_SIZES, MIN_BLOCKS, Volume

log = logging.getLogger(__name__)

__all__ = [
    "SYNC_CHUNK",
    "SyncProgress",
    "check_resume",
    "data_runs",
    "finish_copy",
    "run_initial_sync",
    "start_replica",
]


async def run_initial_sync(
    volume: SourceVolume,
    fs: FramedStream,
    progress: SyncProgress,
    label: str,
    *,
    first_block: int = 0,
) -> int:
    """Copy the block file's non-zero blocks (from ``first_block``: the target holds the
    copy below it); return the first seq to stream (S+1).

    The decisions (which blocks, in which chunks, the SYNC_BEGIN/SYNC_END seqs) are
    ``InitialSyncRound``'s; this sends what it says and reads what it asks for.
    """
    vol = volume
    bs, count = vol.block_size, vol.block_count
    m = InitialSyncRound(progress, bs, count, first_block=first_block)
    if first_block:
        log.info(
            "target %s: resuming the initial sync from seq %d at block %d of %d",
            label,
            progress.start_seq,
            first_block,
            count,
        )
    else:
        log.info(
            "target %s: initial sync of %d blocks from seq %d", label, count, progress.start_seq
        )
    await fs.send(m.begin())
    vol.flush_in_place()  # SEEK_DATA sees the raw file: commits <= S must be in it
    for block, n in m.chunks(data_runs(vol.device.fd, bs, count)):
        msg = m.on_chunk(block, vol.device.read(block, n))  # committed state, between awaits
        if msg is None:
            await trio.lowlevel.checkpoint()  # let FUSE requests and commits in
            continue
        await fs.send(msg)
    end = m.end(vol.last_seq, vol.writer.in_flight_seq)
    await fs.send(end)
    log.info(
        "target %s: initial sync copied %d blocks (%d bytes on the wire), consistent at "
        "seq %d once applied",
        label,
        progress.blocks_sent,
        progress.bytes_sent,
        end.consistent_at_seq,
    )
    return m.first_to_stream


def start_replica(
    volume_dir: str, old: Volume | None, msg: SyncBegin, peer: Peer, node_id: str
) -> Volume:
    """SYNC_BEGIN(FULL) on the target: a new, empty replica (``old``, a copy that never
    completed, is closed and replaced). ProtocolError on an impossible geometry."""
    if old is not None:
        old.close()  # first: the caller holds None from here on, whatever happens
    if msg.block_size not in BLOCK_SIZES or msg.block_count < MIN_BLOCKS:
        raise ProtocolError(f"bad geometry {msg.block_count} x {msg.block_size}")
    vol = Volume.create_replica(
        volume_dir,
        volume_uuid=peer.volume_uuid,
        block_size=msg.block_size,
        block_count=msg.block_count,
        start_seq=msg.start_seq,
        epochs=[list(e) for e in peer.epochs],
    )
    vol.state.node_id = node_id  # saved with the state at SYNC_END
    log.info(
        "initial sync from %r: %d blocks of %d, from seq %d",
        peer.node_id,
        msg.block_count,
        msg.block_size,
        msg.start_seq,
    )
    return vol


def check_resume(msg: SyncBegin, same_copy: bool, held: tuple[int, int]) -> None:
    """SYNC_BEGIN(FULL, S, first_block=B) on the target: ProtocolError unless it goes on with
    the copy held (``same_copy``: of the same volume, from the same S, same geometry; ``held``
    = (S, B) as announced)."""
    if same_copy and held == (msg.start_seq, msg.first_block):
        log.info(
            "resuming the initial-sync copy from seq %d at block %d of %d",
            msg.start_seq,
            msg.first_block,
            msg.block_count,
        )
        return
    have = f"the copy from seq {held[0]} below block {held[1]}" if held[1] else "none"
    raise ProtocolError(
        f"cannot resume the initial sync from seq {msg.start_seq} at block {msg.first_block}: "
        f"this target holds {have}"
    )


def finish_copy(vol: Volume, msg: SyncEnd, volume_uuid: bytes) -> None:
    """SYNC_END on the target: the copy is complete; consistent once T is applied."""
    if msg.consistent_at_seq < vol.last_seq:
        raise ProtocolError(f"consistent at seq {msg.consistent_at_seq}, before the copy began")
    vol.applier.finish_sync_copy(msg.consistent_at_seq)
    vol.applier.reload_geometry()
    sb = vol.sb
    if sb.uuid != volume_uuid or sb.block_count != vol.device.block_count:
        raise ProtocolError("the copied superblock does not match the announced volume")


def data_runs(fd: int, block_size: int, block_count: int) -> Iterator[tuple[int, int]]:
    """``(first, end)`` block runs that may hold data (holes skipped via SEEK_DATA/HOLE)."""
    size = block_size * block_count
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # only a hole from pos to the end
            if exc.errno == errno.EINVAL:
                yield pos // block_size, block_count  # no SEEK_DATA support: all data
                return
            raise
        first = data // block_size
        end = min(block_count, -(-hole // block_size))
        if end > first:
            yield first, end
        pos = end * block_size
