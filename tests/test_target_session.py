"""The target's session machine (repl.target_session): frames in, frames and store calls out.

No trio, no sockets, no clock: ``now`` is a number the test picks, and the store is a fake
that records what the machine asked of it (and fails on any name it does not define).
"""

from __future__ import annotations

import errno

import pytest

from mirrorfs.repl.auth import AuthRole
from mirrorfs.repl.handshake import Peer
from mirrorfs.repl.target_session import TargetPhase, TargetSession
from mirrorfs.repl.wire import (
    Ack,
    ErrorState,
    Hello,
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
    SyncKind,
    Txn,
    VerifyReply,
    VerifyReq,
)
from mirrorfs.store.errors import LogError, VolumeFailed

PEER = Peer(AuthRole.SOURCE, "src", bytes(range(16)), ((1, 1),), 1, last_seq=10)


class FakeStage:
    """A ResyncStage that counts what was staged."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.staged = 0
        self.end: int | None = None

    def on_blocks(self, msg: SyncBlocks) -> None:
        self.store.calls.append(("stage_blocks", msg.first_block))

    def on_end(self, msg: SyncEnd) -> bool:
        self.store.calls.append(("end_resync", msg.consistent_at_seq))
        self.end = msg.consistent_at_seq
        return self.end == self.staged

    def on_txn(self, msg: Txn) -> bool:
        self.store.calls.append(("stage_txn", msg.seq))
        self.staged = msg.seq
        return msg.seq == self.end

    def positions(self) -> tuple[int, int]:
        return (self.staged or self.store.received), self.store.applied


class FakeStore:
    """A TargetStore that keeps positions in two numbers and logs every call."""

    def __init__(self, *, present: bool = True, received: int = 5, applied: int = 5) -> None:
        self.present = present
        self.is_source = False
        self.received, self.applied = received, applied
        self.block_count = 1024
        self.calls: list[tuple] = []
        self.fail: BaseException | None = None  # raised by the next receive_apply
        self.stage: FakeStage | None = None
        self.refusal: str | None = None
        self.can_promote = True

    @property
    def applied_seq(self) -> int:
        return self.applied

    def positions(self) -> tuple[int, int]:
        return self.received, self.applied

    def receive_apply(self, seq: int, record: bytes) -> None:
        self.calls.append(("apply", seq))
        if self.fail is not None:
            raise self.fail
        self.received = self.applied = seq

    def start_copy(self, msg: SyncBegin, peer: Peer) -> None:
        self.calls.append(("start_copy", msg.start_seq, peer.node_id))
        self.present = True
        self.received = self.applied = msg.start_seq

    def copy_blocks(self, msg: SyncBlocks) -> None:
        self.calls.append(("copy", msg.first_block, msg.nblocks))

    def finish_copy(self, msg: SyncEnd, volume_uuid: bytes) -> None:
        self.calls.append(("finish_copy", msg.consistent_at_seq))

    def begin_resync(self, msg: SyncBegin, fork_seq: int | None, peer: Peer) -> FakeStage:
        self.calls.append(("begin_resync", msg.start_seq, fork_seq))
        self.stage = FakeStage(self)
        return self.stage

    def commit_resync(self, stage: FakeStage) -> None:
        assert stage is self.stage
        self.calls.append(("commit_resync",))
        self.received = self.applied = stage.staged

    def suspend_resync(self, stage: FakeStage, why: str) -> None:
        assert stage is self.stage
        self.calls.append(("suspend_resync", why))

    def switchover_refusal(self, seq: int, *, busy: bool) -> str | None:
        if busy:
            return "the target is not plainly streaming (initial sync or resync running)"
        return self.refusal

    def promote(self, msg: Switchover) -> SwitchoverDone | None:
        if not self.can_promote:
            return None
        self.calls.append(("promote", msg.seq))
        return SwitchoverDone(SwitchoverResult.PROMOTED, 2, msg.seq + 1)


def txn(seq: int) -> Txn:
    return Txn(seq, b"record")


def blocks(first: int) -> SyncBlocks:
    return SyncBlocks(first, 1, b"\1" * 4096)


def test_streaming_applies_in_order_and_acks_coalesced():
    store = FakeStore()
    s = TargetSession(store, PEER, empty=False, now=0.0, ack_delay=0.05)
    assert s.phase is TargetPhase.STREAMING
    assert s.handle(txn(6)).send == [] and store.calls == [("apply", 6)]
    ack = s.ack(0.01, 123)
    assert ack == Ack(6, 6, 123)
    assert s.ack(0.02, 124) is None  # nothing new: no ACK
    s.handle(txn(7))
    assert not s.ack_due(0.03)  # 20 ms after the last one: hold it back (coalescing)
    assert s.ack_due(0.07)
    assert s.ack(0.07, 125) == Ack(7, 7, 125)


def test_initial_sync_then_txns():
    store = FakeStore(present=False, received=0, applied=0)
    s = TargetSession(store, PEER, empty=True)
    assert s.phase is TargetPhase.INITIAL_SYNC
    out = s.handle(txn(1))
    assert out.drop.reason == "TXN 1 before the initial sync completed" and not out.drop.error
    assert s.handle(SyncBlocks(0, 1, b"x")).drop.reason == "SYNC_BLOCKS outside of an initial sync"
    assert s.handle(SyncBegin(SyncKind.FULL, 4096, 1024, 9)).drop is None
    assert s.ack(1.0, 1) is None  # nothing acknowledged during the copy
    s.handle(blocks(0))
    s.handle(SyncEnd(12))
    assert s.phase is TargetPhase.STREAMING
    assert s.ack(1.0, 1) == Ack(9, 9, 1)  # ACK(S, S) once the copy is done
    assert store.calls == [
        ("start_copy", 9, "src"),
        ("copy", 0, 1),
        ("finish_copy", 12),
    ]
    again = s.handle(SyncBegin(SyncKind.FULL, 4096, 1024, 9))
    assert again.drop.reason == "SYNC_BEGIN, but this target did not ask for an initial sync"


def test_not_empty_target_refuses_an_initial_sync():
    s = TargetSession(FakeStore(), PEER, empty=False)
    out = s.handle(SyncBegin(SyncKind.FULL, 4096, 1024, 9))
    assert out.drop.reason == "SYNC_BEGIN, but this target did not ask for an initial sync"


def test_ping_pong_refuse_and_unexpected():
    s = TargetSession(FakeStore(), PEER, empty=False, now=0.0, keepalive=5.0)
    assert s.handle(Ping(77)).send == [Pong(77)]
    assert s.handle(Pong(1)).send == []
    assert not s.ping_due(4.9) and s.ping_due(5.0)
    s.sent(5.0)
    assert not s.ping_due(9.0)
    assert not s.looks_dead(10.0) and s.looks_dead(10.1)
    hello = Hello(bytes(16), "x", [], 0, bytes(32))
    assert s.handle(hello).drop.reason == "unexpected HELLO from the source"
    out = s.handle(Refuse(RefuseReason.OTHER, "going away"))
    assert out.drop.reason == "refused by the source: going away"


@pytest.mark.log_expected(r"cannot go on")
def test_store_errors_become_drops():
    store = FakeStore()
    s = TargetSession(store, PEER, empty=False)
    store.fail = LogError("TXN seq 9 out of sequence (expected 6)")
    out = s.handle(txn(9))
    assert out.drop.reason == "TXN: TXN seq 9 out of sequence (expected 6)"
    assert not out.drop.error and out.drop.report is None

    store.fail = OSError(errno.ENOSPC, "No space left on device")
    out = s.handle(txn(6))
    assert out.drop.error and out.drop.reason == "TXN: No space left on device"
    assert out.drop.report == ErrorState(PeerState.DISK_FULL, str(store.fail))

    store.fail = VolumeFailed("I/O error writing the block file")
    out = s.handle(txn(6))
    assert out.drop.error and out.drop.report.state is PeerState.IO_ERROR


def test_promoted_node_takes_no_txn():
    store = FakeStore()
    store.is_source = True
    out = TargetSession(store, PEER, empty=False).handle(txn(6))
    assert out.drop.reason == "TXN 6, but this node was promoted: it is a source now"
    assert store.calls == []


def test_verify_answered_once_applied_reaches_the_seq():
    store = FakeStore()
    s = TargetSession(store, PEER, empty=False)
    s.handle(VerifyReq(7, [(0, 16)]))
    assert s.next_verify() is None  # applied is 5: wait
    s.handle(txn(6))
    assert s.next_verify() is None
    s.handle(txn(7))
    assert s.next_verify() == VerifyReq(7, [(0, 16)])  # digest it now, before seq 8
    s.handle(VerifyReq(6, [(0, 16)]))
    assert s.next_verify() == VerifyReply(7, [])  # the past: "try again"
    out = s.handle(VerifyReq(7, [(1000, 100)]))
    assert out.drop.reason == "VERIFY_REQ range 1000+100 outside the volume"


def test_resync_stages_then_applies_the_group_once():
    store = FakeStore(received=5, applied=5)
    s = TargetSession(store, PEER, empty=False)
    s.handle(SyncBegin(SyncKind.RESYNC, 4096, 1024, 20))
    assert s.phase is TargetPhase.RESYNCING
    s.handle(blocks(3))
    assert s.handle(SyncEnd(22)).drop is None
    s.handle(txn(21))
    assert s.ack(1.0, 1) == Ack(21, 5, 1)  # staged counts as received; applied stays A
    s.handle(txn(22))
    assert s.phase is TargetPhase.STREAMING
    assert store.calls[-1] == ("commit_resync",) and store.calls.count(("commit_resync",)) == 1
    assert s.ack(1.1, 2) == Ack(22, 22, 2)
    s.close("bye")
    assert ("suspend_resync", "bye") not in store.calls


def test_abandoned_resync_is_aborted_on_close():
    store = FakeStore()
    s = TargetSession(store, PEER, empty=False)
    s.handle(SyncBegin(SyncKind.RESYNC, 4096, 1024, 20))
    again = s.handle(SyncBegin(SyncKind.RESYNC, 4096, 1024, 20))
    assert again.drop.reason == "SYNC_BEGIN(RESYNC), but this target is not a consistent replica"
    s.close("")
    assert store.calls[-1] == ("suspend_resync", "session ended")


def test_diverged_replica_acks_the_fork_and_takes_only_a_rewind():
    store = FakeStore(received=9, applied=9)
    s = TargetSession(store, PEER, empty=False, fork_seq=6)
    assert s.ack(0.0, 1) == Ack(6, 6, 1)
    out = s.handle(txn(7))
    assert out.drop.reason == (
        "TXN 7, but this replica diverged after seq 6: it needs a resync first"
    )
    s.handle(SyncBegin(SyncKind.RESYNC, 4096, 1024, 20))
    assert store.calls[-1] == ("begin_resync", 20, 6)
    store.stage.staged = 20
    assert s.handle(SyncEnd(20)).drop is None  # T == S, nothing to replay: applied at once
    assert store.calls[-1] == ("commit_resync",)
    assert s.fork_seq is None and s.ack(0.1, 2) == Ack(20, 20, 2)


@pytest.mark.parametrize("busy", ["copy", "resync", "fork"])
def test_switchover_refused_while_not_plainly_streaming(busy):
    store = FakeStore()
    s = TargetSession(store, PEER, empty=busy == "copy", fork_seq=3 if busy == "fork" else None)
    if busy == "resync":
        s.handle(SyncBegin(SyncKind.RESYNC, 4096, 1024, 20))
    (done,) = s.handle(Switchover(5, "127.0.0.1:7000")).send
    assert done.result is SwitchoverResult.REFUSED
    assert "not plainly streaming" in done.text
    assert ("promote", 5) not in store.calls


def test_switchover_promotes_or_says_why_not():
    store = FakeStore()
    s = TargetSession(store, PEER, empty=False)
    (done,) = s.handle(Switchover(5, "127.0.0.1:7000")).send
    assert done == SwitchoverDone(SwitchoverResult.PROMOTED, 2, 6)
    store.can_promote = False
    (done,) = s.handle(Switchover(5, "x:1")).send
    assert done.text == "this target cannot be promoted by a switchover"
    store.refusal = "the target has received seq 5 and applied 4, not 5"
    (done,) = s.handle(Switchover(5, "x:1")).send
    assert done.result is SwitchoverResult.REFUSED and done.text == store.refusal
