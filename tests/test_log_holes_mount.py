"""Holes in the SAM log through the command line and real mounts: ``mount`` and ``fsck``
refuse with one line, ``fsck --repair`` accepts the loss and leaves a volume that checks
clean and mounts; a replica with a hole in its own log gets what it lost from its source."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import time

import pytest

from mirrorfs.store.archive import read_archive
from tests.repl_util import Cluster, finish_and_compare, status, target, wait_caught_up
from tests.test_recovery import record_offsets
from tests.util import cleanup, kill_mount, mkfs, mount, needs_fuse, run_cli, wait_for

pytestmark = [
    needs_fuse,
    pytest.mark.log_expected(r"repair (accepted a hole|cut the log)"),
]

FILES = 12


def hashes(directory: str) -> dict[str, str]:
    """sha256 of the volume's own files (block file, node state, log), not the daemon's."""
    names = ["blocks", "node.json"]
    names += [os.path.join("log", n) for n in os.listdir(os.path.join(directory, "log"))]
    out = {}
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def files_then_crash(vol: str, mnt: str) -> str:
    """Mount, write FILES files with fsync (one transaction each), give the flusher time to
    write them in place, SIGKILL the mount; the path of the log segment that holds them."""
    m = mount(vol, mnt)
    try:
        for i in range(FILES):
            with open(os.path.join(mnt, f"f{i}"), "wb") as f:
                f.write(bytes([i + 1]) * 10000)
                f.flush()
                os.fsync(f.fileno())
        time.sleep(0.5)  # (in place or not, the log is what is checked; this makes it worse)
    finally:
        kill_mount(m)
    logdir = os.path.join(vol, "log")
    return os.path.join(logdir, sorted(n for n in os.listdir(logdir) if n.endswith(".seg"))[-1])


def cut_in_the_middle(seg: str) -> tuple[int, int, int]:
    """Truncate inside the record of the middle file: (offset, first seq lost, last seq)."""
    recs = record_offsets(seg)
    off, seq = recs[len(recs) // 2]
    os.truncate(seg, off + 30)
    return off, seq, recs[-1][1]


def take_out_a_record(seg: str) -> tuple[int, int, int]:
    """Remove the middle record: a sequence gap with valid records after it."""
    recs = record_offsets(seg)
    i = len(recs) // 2
    (off, seq), (nxt, _) = recs[i], recs[i + 1]
    with open(seg, "rb") as f:
        data = f.read()
    with open(seg, "wb") as f:
        f.write(data[:off] + data[nxt:])
    return off, seq, recs[-1][1]


def one_line(res) -> str:
    err = res.stderr.strip()
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("damage", [cut_in_the_middle, take_out_a_record])
def test_hole_is_refused_and_repair_accepts_the_loss(tmp_path, damage):
    vol, mnt = str(tmp_path / "vol"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    mkfs(vol, "64M")
    seg = files_then_crash(vol, mnt)
    off, seq, last = damage(seg)
    name = os.path.basename(seg)
    before = hashes(vol)

    err = one_line(run_cli("mount", vol, mnt))
    assert "hole" in err and name in err and f"offset {off}" in err, err
    assert f"seq {seq}..{last}" in err and "fsck --repair" in err, err
    assert not os.path.ismount(mnt)
    assert one_line(run_cli("fsck", vol)) == err  # fsck says the same, and writes nothing
    assert hashes(vol) == before

    res = run_cli("fsck", vol, "--repair")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"gave up seq {seq}..{last}" in res.stdout, res.stdout
    res = run_cli("fsck", vol)
    assert res.returncode == 0 and res.stdout.strip().endswith("clean"), res.stdout + res.stderr
    m = mount(vol, mnt)
    try:
        names = set(os.listdir(mnt))
        assert "f0" in names and len(names) < FILES, names  # f0 was before the hole
        for n in names:
            with open(os.path.join(mnt, n), "rb") as f:
                assert len(f.read()) == 10000
        with open(os.path.join(mnt, "after"), "wb") as f:
            f.write(b"x")
    finally:
        cleanup(m)
    assert run_cli("fsck", vol).returncode == 0


@pytest.mark.parametrize("damage", [cut_in_the_middle, take_out_a_record])
def test_replica_with_a_hole_gets_the_lost_seqs_from_its_source(tmp_path, damage):
    """The replica cuts its log at the hole, but first archives the valid records after it
    (the cut would throw them away), names the file in its warning and in status."""
    cluster = Cluster(str(tmp_path))
    try:
        rep = cluster.replica("rep", mount=False)
        vol = cluster.mkfs("src", "64M")
        src = cluster.mount_source(vol, [rep.address])
        wait_for(lambda: target(status(vol), rep.address)["state"] == "streaming", 30, "stream")
        for i in range(FILES):
            with open(os.path.join(src.mountpoint, f"f{i}"), "wb") as f:
                f.write(bytes([i + 1]) * 10000)
                f.flush()
                os.fsync(f.fileno())
        wait_caught_up(vol)
        rep.kill()
        logdir = os.path.join(rep.dir, "log")
        seg = os.path.join(logdir, sorted(n for n in os.listdir(logdir) if n.endswith(".seg"))[-1])
        _, seq, last = damage(seg)
        rep.start()  # cuts its log at the hole, says so, and is not served until caught up
        with open(os.path.join(rep.dir, "mirrorfs.log")) as f:
            warned = [line for line in f if "has a hole" in line]
        assert len(warned) == 1 and f"seq {seq}..{last}" in warned[0], warned
        archives = glob.glob(os.path.join(rep.dir, "archive", f"hole-*-seq{seq}-{last}.samlog"))
        if damage is cut_in_the_middle:  # nothing valid after the cut
            assert archives == [] and "no valid record follows it" in warned[0], warned
            assert rep.status()["archives"] == []
        else:  # seq+1..last were valid after the gap: kept, verbatim, before the cut
            assert len(archives) == 1 and f"archived in {archives[0]}" in warned[0], warned
            meta, records = read_archive(archives[0], block_size=4096)
            assert meta["kind"] == "hole" and [s for s, _ in records] == list(
                range(seq + 1, last + 1)
            )
            assert [a["path"] for a in rep.status()["archives"]] == archives
            res = run_cli("status", rep.dir)
            row = rf"^archive\s+{re.escape(archives[0])}"  # (the status screen's row)
            assert re.search(row, res.stdout, re.M), res.stdout + res.stderr
            assert f"cut with a hole at seq {seq}" in res.stdout, res.stdout

        def caught_up() -> bool:
            st = rep.status()
            return bool(st.get("consistent")) and st["applied_seq"] >= last

        wait_for(caught_up, 60, "the replica to get the lost seqs again")
        finish_and_compare(src, [rep])  # block-identical again
    finally:
        cluster.close()


def test_source_repaired_past_a_hole_rewinds_a_replica_that_had_the_lost_seqs(tmp_path):
    """The replica acknowledged seqs that the source's log then lost: after ``fsck --repair``
    (a new epoch at the cut) the replica is found diverged and rewound, not fed new
    transactions under the old numbers over blocks of the lost ones."""
    cluster = Cluster(str(tmp_path))
    try:
        rep = cluster.replica("rep", mount=False)
        vol = cluster.mkfs("src", "64M")
        src = cluster.mount_source(vol, [rep.address])
        wait_for(lambda: target(status(vol), rep.address)["state"] == "streaming", 30, "stream")
        for i in range(FILES):
            with open(os.path.join(src.mountpoint, f"f{i}"), "wb") as f:
                f.write(bytes([i + 1]) * 10000)
                f.flush()
                os.fsync(f.fileno())
        wait_caught_up(vol)
        kill_mount(src)
        cluster.sources.remove(src)
        logdir = os.path.join(vol, "log")
        seg = os.path.join(logdir, sorted(n for n in os.listdir(logdir) if n.endswith(".seg"))[-1])
        _, seq, last = cut_in_the_middle(seg)
        res = run_cli("fsck", vol, "--repair")
        assert res.returncode == 0 and f"gave up seq {seq}..{last}" in res.stdout, res.stdout
        src = cluster.mount_source(vol, [rep.address], mountpoint=src.mountpoint)
        with open(os.path.join(src.mountpoint, "after"), "wb") as f:
            f.write(b"written after the repair")
            os.fsync(f.fileno())
        finish_and_compare(src, [rep])  # block-identical: the replica took the new history
    finally:
        cluster.close()
