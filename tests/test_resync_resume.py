"""A resync larger than one connection goes on where the last connection was cut (issue 9).

First the pure parts, without I/O: when the source resumes a resync (``resync_resume``,
``TargetPositions.plan(resume_seq=)``) and what a resumed ``ResyncRound`` sends. Then a real
shipper and receiver in this process, over TCP on 127.0.0.1 through the fault proxy
resetting every connection after 256 KiB: a target that fell behind the log cap is resynced
by one resync whose stage only grows, connection after connection.
"""

from __future__ import annotations

import logging
import os
import random

import pytest
import trio

import mirrorfs.repl.shipper as shipper_mod
from mirrorfs.repl.source_rounds import (
    SEND_CHUNK,
    ResyncProgress,
    ResyncRound,
    resync_resume,
)
from mirrorfs.repl.source_session import LogView, PlanKind, TargetPositions
from mirrorfs.repl.wire import SyncBegin, SyncKind, VerifyReply

KiB = 1 << 10
MiB = 1 << 20
BS = 4096


def compared(differing: list[tuple[int, int]], *, start: int = 50, base: int = 10):
    """A progress whose comparison is over with ``differing`` ranges."""
    p = ResyncProgress(base, start, 8192)
    p.differing = list(differing)
    p.blocks_differing = sum(n for _, n in differing)
    p.phase = "sending"
    return p


# ---------------------------------------------------------------------------- pure


def test_resume_only_the_same_resync_after_its_comparison():
    p = compared([(100, 64)])
    assert resync_resume(p, (50, 120, 50), 10, None, 8192) == (120, 50)
    assert resync_resume(p, (50, 8192, 53), 10, None, 8192) == (8192, 53)  # only T left
    assert resync_resume(None, (50, 120, 50), 10, None, 8192) is None  # source restarted
    assert resync_resume(p, (0, 0, 0), 10, None, 8192) is None  # the target holds none
    assert resync_resume(p, (49, 120, 50), 10, None, 8192) is None  # another S
    assert resync_resume(p, (50, 120, 50), 11, None, 8192) is None  # the target moved
    assert resync_resume(p, (50, 120, 50), 10, 7, 8192) is None  # now a rewind
    assert resync_resume(p, (50, 9000, 50), 10, None, 8192) is None  # outside the volume
    assert resync_resume(p, (50, 120, 49), 10, None, 8192) is None  # txn before S
    fresh = ResyncProgress(10, 50, 8192)  # cut during its comparison: nothing to go on with
    assert resync_resume(fresh, (50, 0, 50), 10, None, 8192) is None
    p.finish()
    assert resync_resume(p, (50, 120, 50), 10, None, 8192) is None


def test_plan_resumes_only_while_s_plus_1_stayed_pinned():
    view = LogView(last_seq=80, first_seq=60, log_last_seq=80)
    pos = TargetPositions()
    pos.pin_sync(50)  # the resync from S = 50 began on an earlier connection
    plan = pos.plan(view, 10, 10, None, allow_resync=True, resume_seq=50)
    assert (plan.kind, plan.start_seq, plan.next_seq, plan.resumed) == (
        PlanKind.RESYNC,
        50,
        51,
        True,
    )
    assert pos.retain_seq(stopped=False) == 51
    # Retention gave the pin up while the target was away: a new resync at our last seq.
    pos.pin_dropped = "log cap"
    plan = pos.plan(view, 10, 10, None, allow_resync=True, resume_seq=50)
    assert (plan.start_seq, plan.resumed) == (80, False)
    assert pos.retain_seq(stopped=False) == 81
    # No resume asked: as before.
    plan = TargetPositions().plan(view, 10, 10, None, allow_resync=True)
    assert (plan.kind, plan.start_seq, plan.resumed) == (PlanKind.RESYNC, 80, False)


def test_resumed_round_sends_what_differs_from_the_target_block_without_comparing():
    per = SEND_CHUNK // BS
    assert 128 * KiB == SEND_CHUNK
    p = ResyncProgress(10, 50, 8192)
    m = ResyncRound(p, BS, 8192, "t")
    assert m.begin() == SyncBegin(SyncKind.RESYNC, BS, 8192, 50, 0)
    # The comparison: every range differs down to the granularity, in some rounds.
    while (req := m.next_request()) is not None:
        mine = [b"\x01" * 32 if f < 256 else b"\x00" * 32 for f, _ in req.ranges]
        m.on_reply(mine, VerifyReply(10, [b"\x00" * 32] * len(req.ranges)))
    differing = m.differing
    assert differing == [(0, 256)] and p.differing == differing
    fresh = list(m.chunks())
    assert fresh == [(b, per) for b in range(0, 256, per)]
    assert m.first_to_stream == 51

    # Cut: the target staged the blocks below 100 and seqs 51..53.
    r = ResyncRound(p, BS, 8192, "t", resume=(100, 53))
    assert r.begin() == SyncBegin(SyncKind.RESYNC, BS, 8192, 50, 100)
    assert r.next_request() is None  # compared already
    chunks = list(r.chunks())
    assert chunks[0] == (100, per) and sum(n for _, n in chunks) == 156 == r.remaining
    assert all(n <= per for _, n in chunks) and chunks[-1][0] + chunks[-1][1] == 256
    assert r.first_to_stream == 54  # after what is staged
    assert (p.resumes, p.resumed_at) == (1, [100])
    # Cut after SYNC_END: only SYNC_END (and the TXN after what is staged) is left.
    last = ResyncRound(p, BS, 8192, "t", resume=(8192, 60))
    assert list(last.chunks()) == [] and last.first_to_stream == 61
    assert last.end(70, None).consistent_at_seq == 70


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(shipper_mod, "BACKOFF_MAX", 0.3)


async def test_resync_through_resets_every_256k_resumes_its_stage(tmp_path, nursery, caplog):
    """A target that fell behind the log cap comes back over a link reset every 256 KiB:
    one resync (never started over) whose stage only grows between connections, ending
    block-identical; each block staged once."""
    from mirrorfs.repl.lag import install_retention
    from mirrorfs.repl.receiver import Receiver
    from mirrorfs.repl.shipper import Shipper, ShipperState
    from mirrorfs.store.staging import stage_files
    from mirrorfs.store.volume import Volume
    from tests.netproxy import Direction, FaultProxy, Mode
    from tests.test_shipper import same_blocks, serve_receiver

    caplog.set_level(logging.INFO, logger="mirrorfs")
    rng = random.Random(2024)
    path = str(tmp_path / "src")
    Volume.create(path, 32 * MiB)
    src = Volume.open(path)
    src.samlog.segment_bytes = 32 * KiB

    def write_run() -> None:
        src.write(rng.randrange(64, src.block_count - 8), rng.randbytes(8 * BS))
        src.commit()

    for _ in range(10):
        write_run()
    rdir = str(tmp_path / "replica")
    os.makedirs(rdir)
    receiver = Receiver(rdir, None, secret=None, node_id="tgt")
    port = await serve_receiver(nursery, receiver)
    proxy = FaultProxy(target=("127.0.0.1", port))
    pport = await nursery.start(proxy.run)
    shipper = Shipper(
        src, ("127.0.0.1", pport), secret=None, node_id="src", max_log_bytes=256 * KiB
    )
    install_retention(src, [shipper])
    await nursery.start(shipper.run)

    def done():
        v = receiver.volume
        return v is not None and v.consistent and v.last_seq == src.last_seq

    with trio.fail_after(30):
        while not done() or shipper.applied_seq != src.last_seq:
            await trio.sleep(0.01)
    base = receiver.volume.last_seq

    # The target away; the source writes past the log cap, then 3 MiB more.
    proxy.mode = Mode.REFUSE
    proxy.cut_all()
    with trio.fail_after(30):
        while shipper.state is not ShipperState.OUT_OF_SYNC:
            write_run()
            src.checkpoint()
            await trio.sleep(0)
    assert not 0 < src.samlog.first_seq <= base + 1  # only a resync can help
    src.write(2000, rng.randbytes(3 * MiB))
    src.commit()
    src.checkpoint()

    proxy.clear_faults()
    proxy.reset_every(256 * KiB, Direction.UP)
    start, conns = trio.current_time(), shipper.connections
    seen: list[tuple[int, int, int]] = []  # (S, blocks staged, seq staged) as status moves
    with trio.fail_after(90):
        while not done():
            r = receiver.status()["resync"]
            if r is not None:
                key = (r["start_seq"], r["blocks_staged"], r["staged_seq"])
                if not seen or seen[-1] != key:
                    seen.append(key)
            if len(seen) == 3 and src.last_seq < base + 400:
                write_run()  # commits during the resync: staged and replayed over it
            await trio.sleep(0.005)
        while shipper.applied_seq != src.last_seq or not shipper.resync.done:
            await trio.sleep(0.01)  # the ACK of T applied
    assert same_blocks(src, receiver.volume)
    assert stage_files(rdir) == []
    print(
        f"\nresync through resets every 256 KiB: {trio.current_time() - start:.1f} s, "
        f"{shipper.connections - conns} connections, {shipper.resync.blocks_differing} "
        f"blocks differing, {shipper.resync.resumes} resumes"
    )

    progress = shipper.resync
    assert progress is not None and progress.done
    assert shipper.resyncs == 1  # never started over
    assert {s for s, _, _ in seen} == {progress.start_seq}
    assert [b for _, b, _ in seen] == sorted(b for _, b, _ in seen)  # the stage only grew
    assert [t for _, _, t in seen] == sorted(t for _, _, t in seen)
    assert progress.blocks_differing >= 3 * MiB // BS
    assert progress.resumes >= 3 * MiB // (256 * KiB) - 2, progress.resumes
    assert progress.resumed_at == sorted(progress.resumed_at)
    last = receiver.status()["resync"]
    assert last["blocks_staged"] == progress.blocks_differing  # each block staged once
    assert last["resumes"] == progress.resumes
    assert shipper.connections >= progress.resumes + 1
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("resuming the resync from seq" in m for m in msgs) >= 2 * progress.resumes
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the log"
    assert not [m for m in msgs if "abandoned" in m]
