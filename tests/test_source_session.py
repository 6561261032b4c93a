"""The source's session state (repl.source_session): window, ACKs, routing, keepalive, plan.

Pure objects: no trio, no sockets, no clock (``now`` is a number the test picks).
"""

from __future__ import annotations

import pytest

from mirrorfs.repl.source_session import (
    Keepalive,
    LogView,
    PlanKind,
    Route,
    SourceSession,
    TargetPositions,
)
from mirrorfs.repl.wire import (
    Ack,
    ErrorState,
    PeerState,
    Ping,
    Pong,
    ProtocolError,
    Refuse,
    RefuseReason,
    SwitchoverDone,
    SwitchoverResult,
    SyncEnd,
    VerifyReply,
)


def test_window_bounds_unacknowledged_bytes_and_acks_open_it():
    s = SourceSession("t:1", window_bytes=100, last_sent=4)
    assert s.may_send(500)  # one record always goes, however big
    s.txn_sent(5, 60)
    assert s.may_send(40) and not s.may_send(41)
    s.txn_sent(6, 40)
    assert not s.may_send(1)
    got = s.handle(Ack(5, 5, 0))
    assert got.route is Route.ACK and got.acked == 60 and s.unacked == 40
    assert s.may_send(60) and not s.may_send(61)
    assert s.handle(Ack(6, 5, 0)).acked == 40 and s.unacked == 0


@pytest.mark.parametrize("ack", [Ack(7, 5, 0), Ack(5, 6, 0)])
def test_ack_past_what_was_sent_is_a_protocol_error(ack):
    s = SourceSession("t:1", 100, last_sent=6)
    with pytest.raises(ProtocolError, match="but the last seq sent is 6"):
        s.handle(ack)


def test_routing_of_incoming_frames():
    s = SourceSession("t:1", 100)
    assert s.handle(Ping(42)).route is Route.PONG
    assert s.pongs() == [Pong(42)] and s.pongs() == []
    assert s.handle(Pong(1)).route is Route.NONE
    assert s.handle(VerifyReply(3, [])).route is Route.VERIFY
    err = s.handle(ErrorState(PeerState.DISK_FULL, "no space left on device"))
    assert err.route is Route.NONE
    assert s.peer_error == "target reports disk_full: no space left on device"
    s.handle(ErrorState(PeerState.OK))
    assert s.peer_error == ""
    done = SwitchoverDone(SwitchoverResult.PROMOTED, 2, 7)
    assert s.handle(done, (SwitchoverDone,)).route is Route.HOOK
    with pytest.raises(ProtocolError, match="unexpected SWITCHOVER_DONE from target t:1"):
        s.handle(done)
    with pytest.raises(ProtocolError, match="unexpected SYNC_END"):
        s.handle(SyncEnd(3))
    fenced = s.handle(Refuse(RefuseReason.FENCED, "fenced: newer epoch"))
    assert (
        fenced.route is Route.FENCED and fenced.text == "refused by the target: fenced: newer epoch"
    )
    busy = s.handle(Refuse(RefuseReason.BUSY))
    assert busy.route is Route.REFUSED and busy.text == "refused by the target: busy"


def test_keepalive_pings_only_when_a_direction_is_idle():
    ka = Keepalive(5.0)
    ka.arm(100.0, sent=10, received=20)
    assert not ka.due(104.9) and ka.due(105.0)
    assert ka.idle(10, 25) and ka.idle(15, 20) and not ka.idle(15, 25)


def view(last=20, first=11, log_last=20, epochs=((1, 1),)) -> LogView:
    return LogView(last, first, log_last, [list(e) for e in epochs])


def test_plan_streams_from_received_plus_one_and_pins_it():
    p = TargetPositions()
    assert p.retain_seq(stopped=False) is None  # an unknown target pins nothing
    plan = p.plan(view(), 15, 14, [(1, 1)], allow_resync=True)
    assert plan.kind is PlanKind.STREAM and plan.next_seq == 16
    assert (p.received_seq, p.applied_seq) == (15, 14)
    assert p.retain_seq(stopped=False) == 16 and p.retain_seq(stopped=True) is None
    assert p.plan(view(), 20, 20, [(1, 1)], allow_resync=True).next_seq == 21  # caught up


def test_plan_resync_when_the_log_no_longer_holds_the_next_seq():
    p = TargetPositions()
    plan = p.plan(view(), 5, 5, [(1, 1)], allow_resync=True)
    assert plan.kind is PlanKind.RESYNC and plan.start_seq == 20 and plan.next_seq == 21
    assert plan.reason == "the target needs seq 6 but the log holds 11..20 (resync needed)"
    assert p.retain_seq(stopped=False) == 21  # S+1 pinned
    # the resync pin stays until T is applied, whatever else the ACKs say
    assert not p.on_ack(Ack(21, 5, 0), resyncing=True, resync_end=None)
    assert not p.on_ack(Ack(23, 5, 0), resyncing=True, resync_end=23)
    assert p.retain_seq(stopped=False) == 21
    assert p.on_ack(Ack(23, 23, 0), resyncing=True, resync_end=23)
    assert p.retain_seq(stopped=False) == 24
    off = TargetPositions().plan(view(first=0), 5, 5, [(1, 1)], allow_resync=False)
    assert off.kind is PlanKind.OUT_OF_SYNC and "the log holds nothing" in off.reason


def test_plan_out_of_sync_when_the_target_is_ahead():
    plan = TargetPositions().plan(view(), 25, 25, [(1, 1)], allow_resync=True)
    assert plan.kind is PlanKind.OUT_OF_SYNC
    assert "received seq 25 (applied 25) but this source is at seq 20" in plan.reason


def test_plan_rewind_after_a_fork():
    p = TargetPositions()
    # we were promoted at 13; the target (old source) went on to 18 in epoch 1
    plan = p.plan(view(epochs=[(1, 1), (2, 13)]), 18, 18, [(1, 1)], allow_resync=True)
    assert plan.kind is PlanKind.REWIND and plan.verdict.fork_seq == 12
    assert (p.received_seq, p.applied_seq) == (12, 12) and plan.next_seq == 21
    off = TargetPositions().plan(
        view(epochs=[(1, 1), (2, 13)]), 18, 18, [(1, 1)], allow_resync=False
    )
    assert off.kind is PlanKind.OUT_OF_SYNC and off.reason.endswith("(resync disabled)")


def test_initial_sync_pin_goes_once_the_copy_is_acknowledged():
    p = TargetPositions()
    assert p.pin_sync(30) == 31 and p.retain_seq(stopped=False) == 31
    p.on_ack(Ack(30, 30, 0), resyncing=False, resync_end=None)
    assert p.sync_pin is None and p.retain_seq(stopped=False) == 31
    p.pin_dropped = "beyond the log cap"
    assert p.retain_seq(stopped=False) is None


def test_resync_reply_is_compared_or_refused():
    from mirrorfs.repl.resync import ResyncError, ResyncProgress, compare_reply

    progress = ResyncProgress(base_seq=7, start_seq=20, blocks_total=1024)
    batch = [(0, 64), (64, 64)]
    a, b = b"a" * 32, b"b" * 32
    assert compare_reply(progress, batch, [a, a], VerifyReply(7, [a, b]), "t:1") == [False, True]
    assert progress.ranges_compared == 2 and progress.blocks_compared == 128
    with pytest.raises(ResyncError, match="with seq 8 and 2 digest"):
        compare_reply(progress, batch, [a, a], VerifyReply(8, [a, b]), "t:1")
    with pytest.raises(ResyncError, match="1 digest.s. for 2: it moved"):
        compare_reply(progress, batch, [a, a], VerifyReply(7, [a]), "t:1")


def test_copy_to_resume_only_the_copy_this_source_pins_for():
    p = TargetPositions()
    assert p.copy_to_resume(None, (30, 64), 1000) == 0  # no copy begun here
    p.pin_sync(30)
    assert p.copy_to_resume(30, (30, 64), 1000) == 64
    assert p.copy_to_resume(30, (0, 0), 1000) == 0  # the target holds none (it restarted)
    assert p.copy_to_resume(30, (29, 64), 1000) == 0  # another copy
    assert p.copy_to_resume(30, (30, 1000), 1000) == 1000  # all copied: SYNC_END is left
    assert p.copy_to_resume(30, (30, 1001), 1000) == 0  # outside the volume
    p.pin_dropped = "beyond the log cap"  # S+1 may be gone: the copy cannot be made whole
    assert p.copy_to_resume(30, (30, 64), 1000) == 0
