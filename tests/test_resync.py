"""Resync of an out-of-sync target (repl.resync, store.staging, Volume.commit_resync).

Real volumes in tmp_path, a real Shipper and a real Receiver over memory streams (the
shipper's ``connect`` factory, no sockets). A target is forced out-of-sync with a small log
cap and small segments: it goes away, the source writes enough to retire the segments it
needs, it comes back and is resynced.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import trio

import mirrorfs.repl.resync as resync_mod
import mirrorfs.repl.shipper as shipper_mod
from mirrorfs.fs.filesystem import ROOT_INO, Filesystem
from mirrorfs.node import events
from mirrorfs.node.status_model import status_document
from mirrorfs.node.status_view import status_text
from mirrorfs.repl.lag import install_retention
from mirrorfs.repl.receiver import Receiver
from mirrorfs.repl.shipper import Shipper, ShipperState
from mirrorfs.store.errors import LogError, VolumeError
from mirrorfs.store.files import BLOCK_FILE
from mirrorfs.store.samlog import SamLog
from mirrorfs.store.staging import Stage, StagedBlocks, StagedTxn, stage_files
from mirrorfs.store.volume import Volume
from tests.repl_util import MemoryListener
from tests.status_schema import LINK, assert_no_repr, check

MiB = 1 << 20
BS = 4096
CAP = 256 << 10  # the source's log cap for the target
SEGMENT = 32 << 10


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(shipper_mod, "BACKOFF_MAX", 0.3)


@pytest.fixture
def rng():
    return random.Random(4321)


class TargetServer:
    """A Receiver behind a listener (memory streams) that can go away and come back."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.listener = MemoryListener(self._handle)

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.listener.serve(task_status=task_status)

    async def _handle(self, stream) -> None:
        await self.receiver.serve(stream, "mem")

    def stop(self) -> None:
        """Close the listener and the session (a stage in progress is discarded)."""
        self.listener.stop()


def make_source(tmp_path, size: int = 64 * MiB) -> Volume:
    path = str(tmp_path / "src")
    Volume.create(path, size)
    vol = Volume.open(path)
    vol.samlog.segment_bytes = SEGMENT
    return vol


def write_run(vol: Volume, rng: random.Random, changed: set[int] | None = None) -> None:
    """One transaction: a run of 8 incompressible blocks somewhere (an extent's worth)."""
    first = rng.randrange(64, vol.block_count - 8)
    vol.write(first, rng.randbytes(8 * BS))
    vol.commit()
    if changed is not None:
        changed.update(range(first, first + 8))


def same_blocks(a: Volume, b: Volume) -> bool:
    return a.device.read(0, a.block_count) == b.device.read(0, b.block_count)


async def wait_until(cond, timeout: float = 15.0, what: str = "condition") -> None:
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


def crash(vol: Volume) -> None:
    """Stop using a volume the way a killed process does: no commit, no checkpoint."""
    vol.samlog.close()
    vol.device.close()
    os.close(vol._lock_fd)
    vol._lock_fd = -1


class Setup:
    """A source, a target (Receiver behind TargetServer) and a shipper with a log cap."""

    def __init__(self, tmp_path, nursery, rng, **receiver_args) -> None:
        self.tmp_path, self.nursery, self.rng = tmp_path, nursery, rng
        self.src = make_source(tmp_path)
        self.rdir = str(tmp_path / "replica")
        os.makedirs(self.rdir)
        self.receiver = Receiver(self.rdir, None, secret=None, node_id="tgt", **receiver_args)
        self.server = TargetServer(self.receiver)
        self.shipper: Shipper

    async def start(self) -> None:
        await self.nursery.start(self.server.serve)
        self.shipper = Shipper(
            self.src,
            ("mem", 0),
            secret=None,
            node_id="src",
            max_log_bytes=CAP,
            connect=self.server.listener.connect,
        )
        install_retention(self.src, [self.shipper])
        await self.nursery.start(self.shipper.run)
        await wait_until(self.caught_up, what="initial sync")

    def caught_up(self) -> bool:
        v = self.receiver.volume
        return v is not None and v.consistent and v.last_seq == self.src.last_seq

    async def force_out_of_sync(self, write) -> None:
        """Target away; the source writes (``write()``) until the target stops pinning."""
        await wait_until(lambda: self.shipper.applied_seq == self.src.last_seq, what="ack")
        self.server.stop()
        for _ in range(400):
            write()
            self.src.checkpoint()
            await trio.sleep(0)
            if self.shipper.state is ShipperState.OUT_OF_SYNC:
                break
        else:
            raise AssertionError("the target never stopped pinning")
        assert "log cap" in self.shipper.reason
        need = self.receiver.volume.last_seq + 1
        assert not 0 < self.src.samlog.first_seq <= need  # retired: only a resync can help

    async def come_back(self, receiver: Receiver | None = None) -> None:
        if receiver is not None:
            self.receiver = self.server.receiver = receiver
        await self.nursery.start(self.server.serve)


# ---------------------------------------------------------------------------- tests


async def test_resync_sends_only_what_differs_and_ends_identical(tmp_path, nursery, rng):
    t = Setup(tmp_path, nursery, rng)
    for _ in range(20):
        write_run(t.src, rng)
    await t.start()
    base = t.receiver.volume.last_seq
    changed: set[int] = set()
    await t.force_out_of_sync(lambda: write_run(t.src, rng, changed))
    assert not t.shipper.status()["pinning"]
    # What the operator sees of it: out-of-sync, not connected, no lag figures of a stage.
    oos = _source_doc(t.shipper)
    (link,) = oos["targets"]
    check(link, LINK)
    assert (link["state"], link["connected"], link["resyncs"]) == ("out-of-sync", False, 0)
    assert link["lag"]["sent_not_received"]["txns"] is None and link["lag_txns"] > 0
    text = status_text(oos)
    assert_no_repr(text)
    assert "out-of-sync (not connected" in text and "resync needed" in text

    await t.come_back()
    await wait_until(lambda: t.shipper.resync is not None and t.shipper.resync.done, what="resync")
    await wait_until(t.caught_up, what="caught up")
    assert t.shipper.state is ShipperState.STREAMING
    assert same_blocks(t.src, t.receiver.volume)
    back = _source_doc(t.shipper)
    (link,) = back["targets"]
    assert (link["state"], link["connected"], link["resyncs"], link["sync"]) == (
        "streaming",
        True,
        1,
        None,
    )
    assert "connected" in [e["event"] for e in events.diff(oos, back)]
    rdoc = status_document({**t.receiver.status(), "role": "target"}, t.rdir)
    check(rdoc["source"], LINK)
    assert rdoc["source"]["resyncs"] == 1 and rdoc["source"]["applied_seq"] == t.src.last_seq

    r = t.shipper.status()["resync"]
    assert r["base_seq"] == base and r["end_seq"] == r["start_seq"] == t.src.last_seq
    volume_bytes = t.src.block_count * BS
    changed_bytes = len(changed) * BS
    print(
        f"\nresync: {len(changed)} blocks changed ({changed_bytes} bytes); "
        f"{r['blocks_differing']} blocks found differing in {r['rounds']} rounds; "
        f"sent {r['blocks_sent']} blocks, {r['bytes_sent']} bytes of block data, "
        f"{r['wire_bytes']} bytes on the wire; volume {volume_bytes} bytes"
    )
    assert r["blocks_sent"] >= len(changed)
    assert r["bytes_sent"] >= 0.98 * changed_bytes  # incompressible: nothing to gain
    assert r["wire_bytes"] < volume_bytes / 8  # only the differing ranges travel
    assert r["blocks_sent"] <= len(changed) * 16  # 64-block granularity, 8-block runs

    # The target applied the group: its log restarts at S+1, no stage left, node.json clean.
    tv = t.receiver.volume
    assert stage_files(t.rdir) == []
    with open(os.path.join(t.rdir, "node.json")) as f:
        assert json.load(f)["resync"] is None
    assert t.receiver.status()["resync"]["blocks_staged"] == r["blocks_sent"]

    # Streaming goes on after the resync, and the pin follows the target again.
    for _ in range(5):
        write_run(t.src, rng)
    await wait_until(t.caught_up, what="streaming after the resync")
    assert same_blocks(t.src, tv)
    assert t.shipper.status()["pinning"]


def _source_doc(shipper: Shipper) -> dict:
    """The status document of a source with this one target (as the mount would serve)."""
    vol = shipper.volume
    raw = {"role": "source", "committed_seq": vol.last_seq, "epoch": vol.state.epoch,
           "targets": [shipper.status()]}  # fmt: skip
    return status_document(raw, vol.path)


# -- a reader on the replica during a resync


NAMES = [f"file{i:02d}".encode() for i in range(12)]
REC = 16  # bytes per (name, version) record
FILE_RECORDS = 1000  # ~16 KB per file, not a multiple of the block size


def content(name: bytes, version: int) -> bytes:
    rec = name + b":" + b"%08d\n" % version
    assert len(rec) == REC
    return rec * FILE_RECORDS


class Writer:
    """Rewrites the self-checking files on the source, one transaction per new version."""

    def __init__(self, vol: Volume, rng: random.Random) -> None:
        Filesystem.format(vol, inode_count=128)
        self.vol, self.rng = vol, rng
        self.fs = Filesystem(vol)
        self.version = dict.fromkeys(NAMES, 0)
        self.ino = {}
        for name in NAMES:
            a = self.fs.create(ROOT_INO, name, 0o100644, 0, 0)
            self.ino[name] = a.ino
            self.fs.write(a.ino, 0, content(name, 0))
            vol.commit()
        a = self.fs.create(ROOT_INO, b"filler", 0o100644, 0, 0)
        self.filler = a.ino

    def round(self) -> None:
        """A new version of a few files, and 64 KiB of incompressible filler (log growth).

        A new version is written in place, or as a new file renamed over the old one (a new
        inode: a replica's stale directory or inode cache would show then).
        """
        fs = self.fs
        for i, name in enumerate(self.rng.sample(NAMES, 3)):
            self.version[name] += 1
            data = content(name, self.version[name])
            if i == 0:
                fs.write(self.ino[name], 0, data)
            else:
                a = fs.create(ROOT_INO, b"tmp", 0o100644, 0, 0)
                fs.write(a.ino, 0, data)
                fs.release(a.ino)
                fs.forget(a.ino, 1)
                fs.rename(ROOT_INO, b"tmp", ROOT_INO, name, 0)
                self.ino[name] = a.ino
            self.vol.commit()
        self.fs.write(self.filler, 0, self.rng.randbytes(64 << 10))
        self.vol.commit()


class Reader:
    """Reads every file of the replica in a loop; each read must be one whole version."""

    def __init__(self) -> None:
        self.fs: Filesystem | None = None
        self.errors: list[str] = []
        self.reads = 0
        self.reads_while_resyncing = 0
        self.seen: dict[bytes, int] = dict.fromkeys(NAMES, 0)
        self.stop = False

    # Receiver hooks: they run in the step that applied the blocks (no await in between).
    def on_applied(self, txn) -> None:
        if self.fs is not None:
            self.fs.invalidate(txn.hints)

    def on_resynced(self, volume) -> None:
        if self.fs is not None:
            self.fs.inodes.refresh_all()
            self.fs.dirs.clear()

    @staticmethod
    def read(fs: Filesystem, name: bytes) -> tuple[int, bytes]:
        attr = fs.lookup(ROOT_INO, name)
        try:
            return attr.ino, fs.read(attr.ino, 0, 1 << 20)
        finally:
            fs.forget(attr.ino, 1)

    def check(self, name: bytes, volume: Volume | None = None) -> None:
        got = self.read(self.fs, name)
        data = got[1]
        # What a filesystem without caches reads now: the mount must agree (coherence).
        if volume is not None and self.read(Filesystem(volume, read_only=True), name) != got:
            raise AssertionError(f"{name!r}: stale cache (not what the replica holds)")
        if len(data) != REC * FILE_RECORDS:
            raise AssertionError(f"{name!r}: {len(data)} bytes")
        first = data[:REC]
        if data != first * FILE_RECORDS:
            raise AssertionError(f"{name!r}: torn, mixes versions")
        got, _, version = first.rstrip(b"\n").partition(b":")
        if got != name:
            raise AssertionError(f"{name!r}: holds the records of {got!r}")
        if int(version) < self.seen[name]:
            raise AssertionError(f"{name!r}: version {int(version)} after {self.seen[name]}")
        self.seen[name] = int(version)

    async def wait_reads(self, n: int) -> None:
        """Until the reader has made ``n`` more reads."""
        mark = self.reads
        await wait_until(lambda: self.reads >= mark + n, what=f"{n} reads")

    async def run(self, receiver: Receiver) -> None:
        while not self.stop:
            for name in NAMES:
                try:
                    self.check(name, receiver.volume if self.reads % 4 == 0 else None)
                except Exception as exc:  # the test fails on any of them
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                self.reads += 1
                if receiver.state.value == "resyncing":
                    self.reads_while_resyncing += 1
                await trio.sleep(0)


async def test_reader_on_the_replica_never_sees_an_error_or_a_torn_file(tmp_path, nursery, rng):
    reader = Reader()
    t = Setup(tmp_path, nursery, rng, on_applied=reader.on_applied, on_resynced=reader.on_resynced)
    writer = Writer(t.src, rng)
    await t.start()
    reader.fs = Filesystem(t.receiver.volume, read_only=True)
    nursery.start_soon(reader.run, t.receiver)
    await reader.wait_reads(len(NAMES) * 4)

    await t.force_out_of_sync(writer.round)
    await reader.wait_reads(len(NAMES) * 4)  # it keeps reading the replica as it was at A
    before = dict(reader.seen)
    await t.come_back()
    # The source keeps writing during the resync: S+1..T are staged, then applied with it.
    while not (t.shipper.resync is not None and t.shipper.resync.done):
        writer.round()
        await trio.sleep(0.01)
    await wait_until(t.caught_up, what="caught up")
    await reader.wait_reads(len(NAMES) * 4)  # whole rounds over the final state
    reader.stop = True

    r = t.shipper.status()["resync"]
    assert r["end_seq"] > r["start_seq"]  # transactions overlapped the resync
    assert same_blocks(t.src, t.receiver.volume)
    assert reader.errors == []
    assert reader.reads_while_resyncing > 0
    assert reader.seen == writer.version  # it sees the final state
    assert any(reader.seen[n] > before[n] for n in NAMES)
    print(
        f"\nreader: {reader.reads} reads, {reader.reads_while_resyncing} during the resync; "
        f"resync sent {r['blocks_sent']} blocks ({r['bytes_sent']} bytes), "
        f"{r['blocks_differing']} differed; seq {r['base_seq']} -> {r['end_seq']}"
    )


# -- crashes around the group


class _Crash(Exception):
    """Stands for the process being killed at this point."""


@pytest.mark.log_expected(r"receiver bug")
async def test_crash_before_the_record_discards_the_stage(tmp_path, nursery, rng, monkeypatch):
    t = Setup(tmp_path, nursery, rng)
    for _ in range(10):
        write_run(t.src, rng)
    await t.start()
    await t.force_out_of_sync(lambda: write_run(t.src, rng))
    tv = t.receiver.volume
    base = tv.last_seq
    snapshot = tv.device.read(0, tv.block_count)

    def killed(self):  # the stage is complete and durable; node.json is not written
        self.stage.sync()
        raise _Crash()

    monkeypatch.setattr(resync_mod.TargetResync, "commit", killed)
    await t.come_back()
    await wait_until(lambda: t.shipper.state is ShipperState.RESYNCING, what="resync")
    await wait_until(lambda: t.shipper.resync.phase == "replaying", what="SYNC_END")
    await wait_until(lambda: t.receiver.state.value != "resyncing", what="the crash")
    t.server.stop()
    assert len(stage_files(t.rdir)) == 1
    crash(tv)
    monkeypatch.undo()

    vol = Volume.open(t.rdir)
    assert stage_files(t.rdir) == []  # discarded at restart
    assert vol.state.resync is None
    assert vol.consistent and vol.last_seq == base
    assert vol.device.read(0, vol.block_count) == snapshot  # untouched: still at A

    # It is resynced again next time.
    await t.come_back(Receiver(t.rdir, vol, secret=None, node_id="tgt"))
    await wait_until(lambda: t.shipper.resync.done, what="second resync")
    await wait_until(t.caught_up, what="caught up")
    assert same_blocks(t.src, vol)


# (the simulated crash closes the replica's files under a live receiver: its last words)
@pytest.mark.log_expected(r"receiver bug", r"cannot apply what the last session logged")
async def test_crash_after_the_record_is_finished_at_restart(tmp_path, nursery, rng, monkeypatch):
    t = Setup(tmp_path, nursery, rng)
    for _ in range(10):
        write_run(t.src, rng)
    await t.start()
    await t.force_out_of_sync(lambda: write_run(t.src, rng))
    tv = t.receiver.volume

    real_begin = resync_mod.ResyncRound.begin

    def begin_with_commits(self):  # SYNC_BEGIN is out, the comparison not begun
        msg = real_begin(self)
        for _ in range(3):  # S+1..S+3 overlap the resync and land in the group
            write_run(t.src, rng)
        return msg

    appended = []
    real_append = SamLog.append_encoded

    def append_then_die(self, seq, rec):  # killed in the middle of redoing the group
        if appended:
            raise _Crash()
        appended.append(seq)
        return real_append(self, seq, rec)

    monkeypatch.setattr(resync_mod.ResyncRound, "begin", begin_with_commits)
    monkeypatch.setattr(SamLog, "append_encoded", append_then_die)
    await t.come_back()
    await wait_until(lambda: appended and t.receiver.state.value != "resyncing", what="crash")
    t.server.stop()
    monkeypatch.undo()
    r = t.shipper.resync
    assert not r.done and r.end_seq == r.start_seq + 3 == t.src.last_seq
    with open(os.path.join(t.rdir, "node.json")) as f:
        assert json.load(f)["resync"]["consistent_at"] == r.end_seq
    crash(tv)

    vol = Volume.open(t.rdir)  # redoes the group before anything else
    assert vol.state.resync is None and stage_files(t.rdir) == []
    assert vol.consistent and vol.last_seq == r.end_seq
    assert vol.samlog.first_seq == r.start_seq + 1 and vol.samlog.last_seq == r.end_seq
    assert same_blocks(t.src, vol)

    # The source kept S+1.. pinned: the target resumes streaming from T+1, no new resync.
    assert t.shipper.status()["pinning"]
    for _ in range(3):
        write_run(t.src, rng)
    await t.come_back(Receiver(t.rdir, vol, secret=None, node_id="tgt"))
    await wait_until(t.caught_up, what="streaming after the redo")
    assert t.shipper.state is ShipperState.STREAMING
    assert t.shipper.resync is r  # no second resync
    assert same_blocks(t.src, vol)


# -- the stage file on its own


def test_stage_round_trip_and_damage(tmp_path):
    import lz4.block

    from mirrorfs.store import record
    from mirrorfs.store.txn import Transaction

    uuid = os.urandom(16)
    d = str(tmp_path)
    stage = Stage.create(d, volume_uuid=uuid, block_size=BS, start_seq=10, base_seq=7)
    raw = bytes(range(256)) * 32  # 2 blocks
    stage.append_blocks(5, 2, raw, lz4=False)
    stage.append_blocks(9, 2, lz4.block.compress(raw, store_size=False), lz4=True)
    rec = record.encode_txn(Transaction(11, 1, 0, [(3, b"x" * BS)]), block_size=BS)
    stage.append_txn(11, rec)
    with pytest.raises(LogError):
        stage.append_txn(13, rec)
    stage.sync()
    stage.close()

    back = Stage.open(d, stage.name, volume_uuid=uuid, block_size=BS)
    items = list(back.records())
    assert items == [StagedBlocks(5, raw), StagedBlocks(9, raw), StagedTxn(11, rec)]
    assert (back.start_seq, back.base_seq, back.last_seq) == (10, 7, 11)
    back.close()

    path = os.path.join(d, stage.name)
    with open(path, "r+b") as f:  # flip a byte in the first run's payload
        f.seek(64 + 28 + 100)
        f.write(b"\xff")
    back = Stage.open(d, stage.name, volume_uuid=uuid, block_size=BS)
    with pytest.raises(VolumeError, match="offset 64"):
        list(back.records())
    back.discard()
    assert stage_files(d) == [] and not os.path.exists(os.path.join(d, BLOCK_FILE))
