"""Failover and failback with real processes: promote, demote, rewind resync, fencing.

The round trip: source A mirrors to B; A's last writes never reach B (a partition); A is
killed; B is promoted and written to; A is demoted and rejoins as B's target. Both sides find
the fork point from their epoch histories, A archives what it wrote after the fork, and B
sends only the blocks either side changed since then. And split brain: an old source that
comes back is fenced by a target that follows the new one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import time

import pytest

from mirrorfs.repl.fork import fork_point, judge
from mirrorfs.store import record
from mirrorfs.store.archive import archive_diverged, read_archive
from mirrorfs.store.samlog import SamLog
from mirrorfs.store.txn import Transaction
from tests.repl_util import (
    Cluster,
    MiB,
    Replica,
    build_tree,
    finish_and_compare,
    free_port,
    holds_for,
    status,
    stopped_status,
    target,
    wait_caught_up,
    wait_target,
)
from tests.test_switchover import _successors, _switchover
from tests.util import (
    Mount,
    cleanup,
    expect_errno,
    kill_mount,
    needs_fuse,
    pid_alive,
    run_cli,
    wait_for,
)

_FUSE = needs_fuse

VOLUME_BYTES = 256 * MiB  # Cluster.mkfs's default size


# -- pure parts


def test_fork_point_of_epoch_histories():
    assert fork_point([[1, 1]], [[1, 1]]) is None
    # the promoted node started epoch 2 at seq 91: both share seq 1..90
    assert fork_point([[1, 1], [2, 91]], [[1, 1]]) == 90
    assert fork_point([[1, 1]], [[1, 1], [2, 91]]) == 90
    # two promotions of the same epoch number at different seqs
    assert fork_point([[1, 1], [2, 91]], [[1, 1], [2, 95]]) == 90
    assert fork_point([[1, 1], [2, 91], [3, 120]], [[1, 1], [2, 91]]) == 119

    assert judge([[1, 1], [2, 91]], [[1, 1]], 100).diverged  # the old source wrote on
    behind = judge([[1, 1], [2, 91]], [[1, 1]], 90)
    assert not behind.diverged and behind.adopt  # it only has to catch up
    same = judge([[1, 1]], [[1, 1]], 100)
    assert same.fork_seq is None and not same.diverged and not same.adopt


def _txn(seq: int, fill: int) -> Transaction:
    return Transaction(seq=seq, epoch=1, timestamp_ns=seq, runs=[(10, bytes([fill]) * 4096)])


def test_archive_keeps_the_records_after_the_fork_verbatim(tmp_path):
    logdir = tmp_path / "log"
    uuid = os.urandom(16)
    SamLog.create(logdir, volume_uuid=uuid, block_size=4096)
    with SamLog.open(logdir, volume_uuid=uuid, block_size=4096) as slog:
        slog.segment_bytes = 300  # a few records per segment, so that some can be retired
        for seq in range(1, 8):
            slog.append(_txn(seq, seq))
        slog.sync()
        originals = dict(slog.scan_encoded(1))
        info = archive_diverged(
            str(tmp_path),
            slog,
            volume_uuid=uuid.hex(),
            node_id="n",
            epoch=1,
            fork_seq=4,
            last_seq=7,
        )
    assert os.path.basename(info.path) == "diverged-epoch1-seq5-7.samlog"
    assert (info.first_seq, info.last_seq, info.records, info.note) == (5, 7, 3, "")
    meta, records = read_archive(info.path, block_size=4096)
    assert meta["fork_seq"] == 4 and meta["epoch"] == 1
    assert [(seq, bytes(rec)) for seq, rec in records] == [(s, originals[s]) for s in (5, 6, 7)]

    # records retired before the fork was known are named, not silently missing
    with SamLog.open(logdir, volume_uuid=uuid, block_size=4096) as slog:
        slog.retire(6)
        first = slog.first_seq
        info = archive_diverged(
            str(tmp_path),
            slog,
            volume_uuid=uuid.hex(),
            node_id="n",
            epoch=1,
            fork_seq=2,
            last_seq=7,
        )
    assert first > 3
    assert info.records == 7 - first + 1 and info.first_seq == first
    assert f"seq 3..{first - 1}" in info.note and "retired" in info.note


# -- real processes


def _promoted_mount(volume: str, mountpoint: str) -> Mount:
    with open(os.path.join(volume, "mount.pid")) as f:
        return Mount(int(f.read()), volume, mountpoint)


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _run_ok(*args: str) -> str:
    proc = run_cli(*args)
    assert proc.returncode == 0, f"mirrorfs {' '.join(args)}: {proc.stderr.strip()}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


def _run_refused(*args: str, why: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 1 and why in proc.stderr, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr


@_FUSE
@pytest.mark.mount
def test_unplanned_failover_and_failback(tmp_path):
    c = Cluster(str(tmp_path))
    b_source: Mount | None = None
    try:
        a = c.mkfs("a")
        b = c.replica("b")
        proxy = c.proxy(b)
        a_src = c.mount_source(a, [f"127.0.0.1:{proxy.port}"])
        build_tree(os.path.join(a_src.mountpoint, "tree"), random_mib=1)
        caught_up = wait_caught_up(a)

        # A partition, then A's last writes: committed on A, never received by B.
        proxy.paused = True
        diverged = os.urandom(2 * MiB)
        _write_synced(os.path.join(a_src.mountpoint, "diverged.bin"), diverged)
        writer = c.writer(os.path.join(a_src.mountpoint, "more"), size=32 * 1024)
        writer.wait_for_count(5)
        a_committed = status(a)["committed_seq"]
        assert a_committed > caught_up
        kill_mount(a_src)  # the crash, mid-writes
        c.threads.remove(writer)  # (its writes fail from here on: expected)
        proxy.stop()

        # Unplanned failover: B is promoted and mounted read-write at its mountpoint.
        t0 = time.monotonic()
        out = _run_ok("promote", b.dir, "--force")  # A was just killed: we know it is down
        rto = time.monotonic() - t0
        b_source = _promoted_mount(b.dir, b.mountpoint)
        st = status(b.dir)
        assert st["role"] == "source" and st["epoch"] == 2
        fork = st["epochs"][1][1] - 1
        assert caught_up <= fork < a_committed, (caught_up, fork, a_committed)
        assert "mounted read-write" in out
        print(f"promote (unmount, promote, mount read-write): RTO {rto:.2f} s")

        after = os.urandom(1 * MiB)
        _write_synced(os.path.join(b.mountpoint, "after-failover.bin"), after)
        os.unlink(os.path.join(b.mountpoint, "tree", "data", "r2.bin"))
        os.rename(
            os.path.join(b.mountpoint, "tree", "lib"), os.path.join(b.mountpoint, "tree", "lib2")
        )

        # Failback: A becomes a target of B.
        _run_refused("demote", b.dir, why="in use")
        out = _run_ok("demote", a)
        m = re.search(r"source -> target at seq (\d+)", out)
        assert m, out
        a_last = int(m.group(1))  # A's last commit, the writer's included
        assert a_last >= a_committed
        _run_refused("demote", a, why="already a target")
        st = stopped_status(a)
        assert st["role"] == "target" and st["epochs"] == [[1, 1]]
        assert 0 < st["log_kept_from"] <= fork + 1

        ra = Replica(a, free_port(), c.path("a-ro", mkdir=True))
        c.replicas.append(ra)
        ra.start()
        _run_ok("mirror", b.dir, "--add", ra.address)
        wait_caught_up(b.dir, timeout=120)

        entry = target(status(b.dir), ra.address)
        resync = entry["resync"]
        assert resync is not None and resync["fork_seq"] == fork and resync["phase"] == "done"
        sent_blocks_bytes = resync["blocks_sent"] * 4096
        print(
            f"failback resync: {resync['blocks_differing']} differing blocks, "
            f"{resync['bytes_sent']} bytes of block data, {resync['wire_bytes']} wire bytes "
            f"for {len(diverged)} + {len(after)} bytes written on either side after the fork; "
            f"volume {VOLUME_BYTES} bytes; {resync['seconds']} s"
        )
        # At least the diverged data is sent again, and far less than the volume.
        assert sent_blocks_bytes >= len(diverged)
        assert resync["wire_bytes"] < VOLUME_BYTES // 16

        # A kept what it wrote after the fork, verbatim, and says so.
        rst = ra.status()
        assert len(rst["archives"]) == 1, rst["archives"]
        arch = rst["archives"][0]
        assert os.path.dirname(arch["path"]) == os.path.join(a, "archive")
        assert os.path.basename(arch["path"]).startswith(f"diverged-epoch1-seq{fork + 1}-")
        assert arch["first_seq"] == fork + 1 and arch["last_seq"] == a_last
        assert arch["note"] == ""
        meta, records = read_archive(arch["path"], block_size=4096)
        assert [seq for seq, _ in records] == list(range(fork + 1, a_last + 1))
        archived = b"".join(
            data for _, rec in records for _, data in record.decode_txn(rec, block_size=4096).runs
        )
        assert diverged[:4096] in archived and diverged[-4096:] in archived
        assert "archive" in run_cli("status", a).stdout

        # A's read-only mount shows B's tree, not its own diverged writes.
        assert not os.path.exists(os.path.join(ra.mountpoint, "diverged.bin"))
        with open(os.path.join(ra.mountpoint, "after-failover.bin"), "rb") as f:
            assert f.read() == after
        assert os.path.isdir(os.path.join(ra.mountpoint, "tree", "lib2"))

        out = _run_ok("verify", b.dir)
        assert "all targets identical" in out

        # Switch back: a planned switchover makes A the source again, B its target.
        b_port = free_port()
        seq2, out = _switchover(b.dir, ra.address, f"127.0.0.1:{b_port}")
        assert f"epoch 3 from seq {seq2 + 1}" in out, out
        wait_for(lambda: not pid_alive(b_source.pid), 30, "B's read-write mount to exit")
        assert ra.mountpoint is not None
        a_source, rb = _successors(
            c,
            source=a,
            source_mnt=ra.mountpoint,
            replica=b.dir,
            port=b_port,
            replica_mnt=b.mountpoint,
        )
        st = status(a)
        assert st["role"] == "source" and st["epoch"] == 3, st
        history = [[1, 1], [2, fork + 1], [3, seq2 + 1]]
        assert st["epochs"] == history
        assert rb.status()["role"] == "target"
        entry = target(st, rb.address)
        assert entry["resync"] is None and entry["initial_sync"] is None, entry
        _write_synced(os.path.join(ra.mountpoint, "after-switch-back"), os.urandom(100_000))
        wait_caught_up(a)
        out = _run_ok("verify", a)
        assert "all targets identical" in out
        finish_and_compare(a_source, [rb])  # block files byte-identical
        rb.stop()
        assert stopped_status(b.dir)["epochs"] == history
        st = stopped_status(a)
        assert st["role"] == "source" and st["epochs"] == history
    finally:
        cleanup(b_source)
        c.close()


@_FUSE
@pytest.mark.mount
@pytest.mark.log_expected(r"fenced")
def test_split_brain_old_source_is_fenced(tmp_path):
    c = Cluster(str(tmp_path))
    b_source: Mount | None = None
    a_again: Mount | None = None
    try:
        a = c.mkfs("a")
        b = c.replica("b")
        a_src = c.mount_source(a, [b.address])
        _write_synced(os.path.join(a_src.mountpoint, "f"), os.urandom(300_000))
        wait_caught_up(a)
        kill_mount(a_src)

        _run_ok("promote", b.dir, "--force")  # A was just killed
        b_source = _promoted_mount(b.dir, b.mountpoint)
        rc = c.replica("c")
        _run_ok("mirror", b.dir, "--add", rc.address)
        wait_caught_up(b.dir, timeout=120)
        c_seq = rc.status()["applied_seq"]
        c_blocks = _sha(os.path.join(rc.dir, "blocks"))

        # The old source comes back as a source, mirroring to C, which follows B now.
        a_again = c.mount_source(a, [rc.address], mountpoint=a_src.mountpoint)
        entry = wait_target(
            a, rc.address, lambda t: t["state"] == "fenced", 30, "A to be fenced by C"
        )
        assert "epoch" in entry["reason"], entry
        wait_for(lambda: status(a)["fenced"], 10, "A to refuse writes")
        expect_errno(errno.EROFS, open, os.path.join(a_again.mountpoint, "split-brain"), "w")
        # Nothing of A reached C, which still follows B (checked for a second, not once).
        holds_for(lambda: rc.status()["applied_seq"] == c_seq, 1.0, "C is still at its seq")
        cst = rc.status()
        assert cst["applied_seq"] == c_seq and cst["source_node_id"] == status(b.dir)["node_id"]
        assert _sha(os.path.join(rc.dir, "blocks")) == c_blocks
        assert "fenced" in run_cli("status", a).stdout
    finally:
        cleanup(a_again)
        cleanup(b_source)
        c.close()


@_FUSE
@pytest.mark.mount
def test_failback_of_a_source_that_had_shipped_everything_just_streams(tmp_path):
    """A clean switch of roles: A behind the fork (nothing diverged) adopts B's history and
    streams from B's log; no resync, no archive."""
    c = Cluster(str(tmp_path))
    b_source: Mount | None = None
    try:
        a = c.mkfs("a")
        b = c.replica("b", mount=False)
        a_src = c.mount_source(a, [b.address])
        _write_synced(os.path.join(a_src.mountpoint, "f"), os.urandom(200_000))
        c.umount_source(a_src)  # ships the final commit first
        last = stopped_status(a)["checkpointed_seq"]
        wait_for(lambda: b.status()["applied_seq"] == last, 30, "B to apply A's last seq")
        b.stop()
        _run_ok("promote", b.dir, "--no-mount")
        b_source = c.mount_source(b.dir, mountpoint=c.path("b-rw", mkdir=True))
        _write_synced(os.path.join(b_source.mountpoint, "g"), os.urandom(100_000))

        _run_ok("demote", a)
        ra = Replica(a, free_port(), None)
        c.replicas.append(ra)
        ra.start()
        _run_ok("mirror", b.dir, "--add", ra.address)
        wait_caught_up(b.dir)
        entry = target(status(b.dir), ra.address)
        assert entry["resync"] is None and entry["initial_sync"] is None, entry
        assert ra.status()["archives"] == []
        finish_and_compare(b_source, [ra])
        ra.stop()
        assert stopped_status(a)["epochs"] == [[1, 1], [2, last + 1]]
    finally:
        cleanup(b_source)
        c.close()
