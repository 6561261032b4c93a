"""Replication end to end: a source and its targets as separate processes on 127.0.0.1.

Every test runs the real command line (``mirrorfs replica``, ``mount --mirror``, ``status``,
``verify``, ``mirror``, ``umount``) with real FUSE mounts and real TCP, optionally through
the fault proxy of tests/netproxy.py. The end of most tests is the block-identity check of
DESIGN.md: once the source is unmounted and every target has applied the source's last
seq, the ``blocks`` files are byte-identical. tests/repl_util.py has the helpers; its
``Cluster`` tears down every mount and daemon a test started, also when the test fails.
"""

from __future__ import annotations

import errno
import json
import os
import random
import time

import pytest

from tests.netproxy import Direction
from tests.repl_util import (
    Cluster,
    MiB,
    assert_blocks_identical,
    assert_same_tree,
    build_tree,
    copy_tree,
    finish_and_compare,
    fsync_burst,
    log_text,
    node_status,
    status,
    stopped_status,
    target,
    tree_signature,
    wait_caught_up,
    wait_target,
    write_secret,
)
from tests.status_schema import check_status
from tests.util import expect_errno, fsck, needs_fuse, run_cli, umount, wait_for

pytestmark = [pytest.mark.mount, needs_fuse]

SYNC_STARTED = "initial sync of"  # the source's log line for each initial sync it starts


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(str(tmp_path))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    """A local tree to copy onto the source: a few hundred stdlib files + 3 MiB random."""
    path = str(tmp_path_factory.mktemp("tree") / "tree")
    build_tree(path)
    return path


def cli_status(volume_dir: str) -> dict:
    proc = run_cli("status", volume_dir, "--json", check=True)
    doc = json.loads(proc.stdout)
    check_status(doc)  # the version-1 schema, field by field (docs/json.md)
    return doc


def cli_verify(volume_dir: str) -> str:
    proc = run_cli("verify", volume_dir, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def source_sync_count(volume_dir: str) -> int:
    return log_text(volume_dir).count(SYNC_STARTED)


def stop_and_fsck(rep) -> None:
    rep.stop()
    proc = fsck(rep.dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- a tree, the replica mount, verify, status


def test_tree_replicates_block_identical(cluster, tree):
    rep = cluster.replica("rep")
    # An empty directory: nothing mounted until an initial sync made it consistent.
    st = rep.status()
    assert (st["state"], st["consistent"], st["applied_seq"]) == ("waiting", False, 0), st
    assert not rep.mounted()
    assert not os.path.exists(os.path.join(rep.dir, "blocks"))

    src = cluster.mount_source(cluster.mkfs("src"), [rep.address])
    wait_for(rep.mounted, 30, "the replica mount after the initial sync")
    assert rep.status()["consistent"]

    copy_tree(tree, os.path.join(src.mountpoint, "tree"))
    wait_caught_up(src.volume)
    expected = tree_signature(os.path.join(src.mountpoint, "tree"))
    assert len(expected) > 200
    assert_same_tree(expected, tree_signature(os.path.join(rep.mountpoint, "tree")))

    # The replica mount is read-only.
    r = os.path.join(rep.mountpoint, "tree")
    expect_errno(errno.EROFS, open, os.path.join(r, "new-file"), "w")
    expect_errno(errno.EROFS, open, os.path.join(r, "data", "r0.bin"), "r+b")
    expect_errno(errno.EROFS, os.unlink, os.path.join(r, "data", "r0.bin"))
    expect_errno(errno.EROFS, os.mkdir, os.path.join(r, "new-dir"))
    expect_errno(errno.EROFS, os.rename, os.path.join(r, "data"), os.path.join(r, "moved"))
    expect_errno(errno.EROFS, os.chmod, os.path.join(r, "data", "r0.bin"), 0o600)
    expect_errno(errno.EROFS, os.truncate, os.path.join(r, "data", "r0.bin"), 0)

    # status --json (the command line) of both sides, caught up. (Reading the source's tree
    # above updated access times: more transactions.)
    seq = wait_caught_up(src.volume)
    t = target(cli_status(src.volume), rep.address)
    assert t["state"] == "streaming", t
    assert (t["received_seq"], t["applied_seq"]) == (seq, seq), t
    assert (t["lag_txns"], t["lag_bytes"], t["lag_seconds"]) == (0, 0, 0), t
    rst = cli_status(rep.dir)
    assert (rst["role"], rst["applied_seq"], rst["mounted"]) == ("target", seq, True), rst

    out = cli_verify(src.volume)
    assert "identical" in out and rep.address in out, out

    finish_and_compare(src, [rep])
    stop_and_fsck(rep)
    assert fsck(src.volume).returncode == 0


def test_replica_mount_follows_changes(cluster):
    """What the kernel cached on the replica is dropped as transactions land (cache
    invalidation): each change shows well within the 2 s entry/attr timeouts."""
    rep = cluster.replica("rep")
    src = cluster.mount_source(cluster.mkfs("src"), [rep.address])
    wait_for(rep.mounted, 30, "the replica mount")
    s, r = os.path.join(src.mountpoint, "d"), os.path.join(rep.mountpoint, "d")
    os.mkdir(s)
    for name in ("keep", "old", "gone", "grow"):
        with open(os.path.join(s, name), "wb") as f:
            f.write(name.encode() * 1000)
    wait_caught_up(src.volume, settle=0.6)

    def write_fsync(path: str, data: bytes, mode: str = "wb") -> None:
        with open(path, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def shows(what: str, predicate, bound: float = 1.5) -> None:
        t0 = time.monotonic()
        while not predicate():
            waited = time.monotonic() - t0
            if waited > bound:
                try:
                    wait_for(predicate, 10, what)
                except AssertionError:
                    raise AssertionError(f"the replica never showed {what}") from None
                raise AssertionError(
                    f"the replica showed {what} only after {time.monotonic() - t0:.1f} s: "
                    "its kernel caches were not invalidated"
                )
            time.sleep(0.01)

    def exists(path: str) -> bool:
        return os.path.lexists(path)

    # Prime the kernel's caches on the replica: lookups, attributes, directory, file pages.
    assert sorted(os.listdir(r)) == ["gone", "grow", "keep", "old"]
    for name in ("keep", "old", "gone", "grow"):
        os.stat(os.path.join(r, name))
    assert not exists(os.path.join(r, "new"))
    fd = os.open(os.path.join(r, "keep"), os.O_RDONLY)
    try:
        assert os.pread(fd, 4, 0) == b"keep"

        write_fsync(os.path.join(s, "new"), b"fresh")
        shows("a new file", lambda: exists(os.path.join(r, "new")))
        with open(os.path.join(r, "new"), "rb") as f:
            assert f.read() == b"fresh"
        assert "new" in os.listdir(r)

        os.rename(os.path.join(s, "old"), os.path.join(s, "renamed"))
        write_fsync(os.path.join(s, "sync1"), b"x")  # fsync commits the rename with it
        shows(
            "a rename",
            lambda: not exists(os.path.join(r, "old")) and exists(os.path.join(r, "renamed")),
        )
        assert "old" not in os.listdir(r)

        os.unlink(os.path.join(s, "gone"))
        write_fsync(os.path.join(s, "sync2"), b"x")
        shows("a deletion", lambda: not exists(os.path.join(r, "gone")))
        assert "gone" not in os.listdir(r)

        os.chmod(os.path.join(s, "keep"), 0o600)
        write_fsync(os.path.join(s, "grow"), b"+" * 5000, mode="ab")
        shows("a larger size", lambda: os.stat(os.path.join(r, "grow")).st_size == 9000)
        shows("a new mode", lambda: os.stat(os.path.join(r, "keep")).st_mode & 0o777 == 0o600)

        # New content under a file that the replica holds open with cached pages.
        with open(os.path.join(s, "keep"), "r+b") as f:
            f.write(b"KEEP")
            f.flush()
            os.fsync(f.fileno())
        shows("new content through an open file", lambda: os.pread(fd, 4, 0) == b"KEEP")
    finally:
        os.close(fd)

    finish_and_compare(src, [rep])


# -- slow link: initial sync, a target killed during it, lag in status


def test_initial_sync_over_slow_link(cluster, tree):
    """``mirror --add`` on a running source: an initial sync through a 2 MiB/s link, a
    target SIGKILLed in the middle of it (the copy restarts), the mount only once
    consistent, writes on the source going on meanwhile, then lag that goes to 0."""
    vol = cluster.mkfs("src")
    src = cluster.mount_source(vol)
    copy_tree(tree, os.path.join(src.mountpoint, "tree"))
    with open(os.path.join(src.mountpoint, "more.bin"), "wb") as f:
        f.write(os.urandom(1 * MiB))

    rep = cluster.replica("rep")
    proxy = cluster.proxy(rep)
    proxy.bandwidth = 2 * MiB
    address = f"127.0.0.1:{proxy.port}"
    run_cli("mirror", vol, "--add", address, check=True)

    def syncing_with_blocks() -> bool:
        st = rep.status()
        assert not rep.mounted(), "the replica mounted before it was consistent"
        return st["state"] == "initial-sync" and st["sync_blocks_copied"] > 0

    wait_for(syncing_with_blocks, 30, "the initial sync to copy blocks")
    # (The source may be done sending already: the proxy buffers a few MiB.)
    t = target(status(vol), address)
    assert t["initial_sync"] is not None and t["initial_sync"]["blocks_sent"] > 0, t

    rep.kill()  # a crash in the middle of the copy
    assert not rep.mounted()
    rep.start()  # same DIR, same port: the copy starts over
    wait_for(lambda: source_sync_count(vol) >= 2, 30, "a second initial sync")

    # The source stays in use during the sync.
    elapsed = fsync_burst(os.path.join(src.mountpoint, "during-sync"), 20, 16 * 1024)
    assert elapsed < 10, f"20 fsync'd writes took {elapsed:.1f} s during an initial sync"

    # Not mounted while copying; mounted once consistent.
    seen_syncing = False
    deadline = time.monotonic() + 60
    while True:
        mounted = rep.mounted()
        st = rep.status()
        if st["state"] == "initial-sync":
            seen_syncing = True
            assert not mounted, st
        if mounted:
            break
        assert time.monotonic() < deadline, f"no replica mount after the initial sync: {st}"
        time.sleep(0.05)
    assert seen_syncing
    assert rep.status()["consistent"]

    # Lag on the slow link: non-zero while a large write is on its way, 0 once caught up.
    with open(os.path.join(src.mountpoint, "lagging.bin"), "wb") as f:
        f.write(os.urandom(4 * MiB))
        os.fsync(f.fileno())
    t = target(cli_status(vol), address)
    assert t["lag_txns"] > 0 and t["lag_bytes"] > 0 and t["lag_seconds"] > 0, t
    proxy.bandwidth = None
    wait_caught_up(vol)
    t = target(cli_status(vol), address)
    assert (t["lag_txns"], t["lag_bytes"], t["lag_seconds"]) == (0, 0, 0), t
    assert t["applied_seq"] == t["source_seq"], t

    assert_same_tree(
        tree_signature(os.path.join(src.mountpoint, "tree")),
        tree_signature(os.path.join(rep.mountpoint, "tree")),
    )
    finish_and_compare(src, [rep])
    stop_and_fsck(rep)


# -- crashes and restarts


def test_replica_sigkill_mid_stream_resumes(cluster):
    rep = cluster.replica("rep")
    vol = cluster.mkfs("src")
    src = cluster.mount_source(vol, [rep.address])
    wait_for(rep.mounted, 30, "the replica mount")
    writer = cluster.writer(os.path.join(src.mountpoint, "w"), size=256 * 1024)
    writer.wait_for_count(20)

    # Kill while transactions are in flight (the target has not applied the last commit).
    def lagging() -> bool:
        t = target(status(vol), rep.address)
        return t["applied_seq"] is not None and t["lag_txns"] > 0

    try:
        wait_for(lagging, 5, "a moment with transactions in flight", interval=0.001)
    except AssertionError:
        pass  # a fast target: kill it anyway, mid-stream
    rep.kill()
    before = writer.count
    writer.wait_for_count(before + 20)  # the source goes on without its target
    t = target(status(vol), rep.address)
    assert t["state"] != "streaming", t

    rep.start()  # on its existing DIR
    wait_for(rep.mounted, 30, "the replica mount after the restart")
    writer.wait_for_count(writer.count + 10)
    writer.stop()
    wait_caught_up(vol)
    assert source_sync_count(vol) == 1, "the restarted target got a second initial sync"
    assert rep.status()["sync_blocks_total"] == 0  # no SYNC_BEGIN since the restart
    assert_same_tree(
        tree_signature(os.path.join(src.mountpoint, "w")),
        tree_signature(os.path.join(rep.mountpoint, "w")),
    )
    finish_and_compare(src, [rep])
    stop_and_fsck(rep)


def test_target_down_never_slows_source_and_restarts_resume(cluster):
    """Timed bursts of fsync'd writes: target streaming (baseline), partitioned (the window
    fills), stopped. Then the target restarts on its DIR and the source remounts: both
    resume from the target's position, without a second initial sync."""
    rep = cluster.replica("rep")
    proxy = cluster.proxy(rep)
    address = f"127.0.0.1:{proxy.port}"
    vol = cluster.mkfs("src", "512M")
    src = cluster.mount_source(vol, [address])
    wait_for(rep.mounted, 30, "the replica mount")
    d = os.path.join(src.mountpoint, "bursts")
    count, size = 80, 128 * 1024  # 10 MiB: more than the shipping window (8 MiB)

    fsync_burst(d, 10, size, "warmup")
    wait_caught_up(vol, settle=0.6)
    baseline = fsync_burst(d, count, size, "base")
    wait_caught_up(vol, settle=0.6)

    proxy.paused = True  # a partition: the connection stays up, nothing gets through
    partitioned = fsync_burst(d, count, size, "part")
    t = target(status(vol), address)
    assert t["lag_txns"] > 0, t

    rep.stop()
    proxy.paused = False
    wait_target(vol, address, lambda t: t["state"] != "streaming", 30, "the target lost")
    down = fsync_burst(d, count, size, "down")

    bound = 3 * baseline + 2.0
    assert partitioned < bound and down < bound, (baseline, partitioned, down)

    rep.start()
    wait_for(rep.mounted, 30, "the replica mount after the restart")
    wait_caught_up(vol)
    assert source_sync_count(vol) == 1, "the restarted target got a second initial sync"
    assert rep.status()["sync_blocks_total"] == 0

    # The source restarts: the new shipper resumes from the target's position.
    umount(src)
    applied = rep.status()["applied_seq"]
    assert applied == stopped_status(vol)["checkpointed_seq"]
    src = cluster.mount_source(vol, [address], mountpoint=src.mountpoint)
    t = wait_target(vol, address, lambda t: t["state"] == "streaming", 30, "streaming again")
    assert t["initial_sync"] is None, t
    fsync_burst(os.path.join(src.mountpoint, "after"), 10, size)
    wait_caught_up(vol)
    assert source_sync_count(vol) == 1
    assert f"received {applied}, applied {applied}" in log_text(vol)
    assert_same_tree(
        tree_signature(src.mountpoint),
        tree_signature(rep.mountpoint),
    )
    finish_and_compare(src, [rep])


def test_umount_ships_the_final_commit(cluster):
    rep = cluster.replica("rep")
    vol = cluster.mkfs("src")
    # A long group-commit interval: what the mkdir below changed is still in the open
    # transaction when umount comes, so the final commit holds it.
    src = cluster.mount_source(vol, [rep.address], extra=("--commit-interval", "60"))
    wait_for(rep.mounted, 30, "the replica mount")
    with open(os.path.join(src.mountpoint, "f"), "wb") as f:
        f.write(b"committed by fsync")
        os.fsync(f.fileno())
    wait_target(vol, rep.address, lambda t: t["lag_txns"] == 0, 30, "caught up")
    os.mkdir(os.path.join(src.mountpoint, "last"))
    umount(src)
    seq = stopped_status(vol)["checkpointed_seq"]
    assert "final commit: transaction" in log_text(vol)
    wait_for(
        lambda: rep.status()["applied_seq"] == seq,
        5,
        f"the target to apply the final commit {seq} (it has {rep.status()['applied_seq']})",
    )
    assert os.path.isdir(os.path.join(rep.mountpoint, "last"))
    assert_blocks_identical(vol, rep.dir)


# -- a faulty network


def test_proxy_cuts_and_flips(cluster, tree):
    """Connections cut and bytes flipped at random points, in both directions, during the
    initial sync and the stream: every fault ends a connection, the source reconnects and
    resumes, nothing damaged is applied, and the replica ends block-identical."""
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    note = f"(seed {seed})"
    vol = cluster.mkfs("src")
    with_tree = cluster.mount_source(vol)
    copy_tree(tree, os.path.join(with_tree.mountpoint, "tree"))
    umount(with_tree)

    rep = cluster.replica("rep")
    proxy = cluster.proxy(rep)
    # The first connection is cut inside the initial sync, the second gets a flipped byte.
    proxy.cut_at(rnd.randrange(2000, 1 * MiB))
    proxy.flip_at(rnd.randrange(1 * MiB, 2 * MiB))
    address = f"127.0.0.1:{proxy.port}"
    src = cluster.mount_source(vol, [address], mountpoint=with_tree.mountpoint)
    wait_for(rep.mounted, 60, f"the replica mount {note}")
    assert len(proxy.connections) >= 3, (proxy.connections, note)

    faults = 0
    w = os.path.join(src.mountpoint, "w")
    os.mkdir(w)
    for i in range(10):
        direction = rnd.choice([Direction.UP, Direction.DOWN])
        kind = rnd.choice(["cut", "flip"])
        # ACKs are small: faults downstream come within a few hundred bytes.
        ahead = rnd.randrange(1, 300_000) if direction is Direction.UP else rnd.randrange(1, 400)
        total = proxy.bytes_up if direction is Direction.UP else proxy.bytes_down
        conns = len(proxy.connections)
        (proxy.cut_after if kind == "cut" else proxy.flip_after)(ahead, direction)
        n = 0
        while (proxy.bytes_up if direction is Direction.UP else proxy.bytes_down) <= total + ahead:
            fsync_burst(w, 4, rnd.randrange(1, 64 * 1024), f"f{i}-{n}-")
            n += 1
            assert n < 400, f"fault {i} never fired {note}"
        faults += 1
        # Every fault ends the connection: a flip is caught by a CRC, never applied.
        wait_for(
            lambda conns=conns: len(proxy.connections) > conns,
            30,
            f"a new connection after {kind} {direction.value} {note}",
        )
    proxy.clear_faults()
    wait_caught_up(src.volume)
    assert_same_tree(tree_signature(src.mountpoint), tree_signature(rep.mountpoint))
    cli_verify(vol)
    finish_and_compare(src, [rep])
    assert faults == 10
    stop_and_fsck(rep)


# -- fan-out


def test_two_targets_and_mirror_add(cluster, tree):
    """Two targets at once; the second added with ``mirror --add`` while a writer keeps
    the source busy: it gets an initial sync, the writer never stalls."""
    a = cluster.replica("a")
    b = cluster.replica("b")
    vol = cluster.mkfs("src")
    src = cluster.mount_source(vol, [a.address])
    copy_tree(tree, os.path.join(src.mountpoint, "tree"))
    wait_caught_up(vol, settle=0.6)

    writer = cluster.writer(os.path.join(src.mountpoint, "busy"), size=128 * 1024)
    writer.wait_for_count(10)
    proc = run_cli("mirror", vol, "--add", b.address, check=True)
    assert b.address in proc.stdout
    wait_for(b.mounted, 60, "the second replica's mount")
    t = target(status(vol), b.address)
    assert t["initial_sync"] is not None and t["initial_sync"]["blocks_sent"] > 0, t
    writer.wait_for_count(writer.count + 20)
    writer.stop()
    assert writer.max_latency < 5.0, f"a write took {writer.max_latency:.1f} s"

    wait_caught_up(vol)
    st = status(vol)
    assert sorted(t["address"] for t in st["targets"]) == sorted([a.address, b.address])
    out = cli_verify(vol)
    assert out.count("identical at seq") == 2, out
    expected = tree_signature(src.mountpoint)
    for rep in (a, b):
        assert_same_tree(expected, tree_signature(rep.mountpoint))
    finish_and_compare(src, [a, b])
    assert_blocks_identical(a.dir, b.dir)


# -- authentication


def test_wrong_secret(cluster):
    """Different secrets, or a secret on one side only: refused, nothing applied, a clear
    reason on both sides, both daemons alive; the right secret then works."""
    good = write_secret(cluster.path("good.secret"), "correct horse battery staple")
    bad = write_secret(cluster.path("bad.secret"), "something else entirely")
    rep = cluster.replica("rep", secret_file=good)
    vol = cluster.mkfs("src")
    src = cluster.mount_source(vol, [rep.address], secret_file=bad)

    def refused(t) -> bool:
        return t["state"] == "error" and "authentication" in t["reason"]

    t = wait_target(vol, rep.address, refused, 30, "the authentication failure")
    assert "secret" in t["reason"], t
    with open(os.path.join(src.mountpoint, "f"), "wb") as f:
        f.write(b"not for that target")
        os.fsync(f.fileno())
    retried = t["connections"] + 1
    wait_for(lambda: target(status(vol), rep.address)["connections"] > retried, 30, "retries")
    st = rep.status()
    assert (st["state"], st["applied_seq"], st["received_seq"]) == ("waiting", 0, 0), st
    assert not rep.mounted()
    assert not os.path.exists(os.path.join(rep.dir, "blocks"))  # nothing created or applied
    assert "authentication" in log_text(rep.dir)
    assert rep.alive() and src.alive()

    # The right secret: an initial sync and the mount.
    umount(src)
    src = cluster.mount_source(vol, [rep.address], secret_file=good, mountpoint=src.mountpoint)
    wait_for(rep.mounted, 30, "the replica mount with the right secret")
    seq = wait_caught_up(vol)
    with open(os.path.join(rep.mountpoint, "f"), "rb") as f:
        assert f.read() == b"not for that target"

    # A secret on one side only: refused again; what the source writes is not applied.
    umount(src)
    src = cluster.mount_source(vol, [rep.address], mountpoint=src.mountpoint)
    wait_target(vol, rep.address, refused, 30, "the authentication failure (no secret)")
    with open(os.path.join(src.mountpoint, "g"), "wb") as f:
        f.write(b"nor this")
        os.fsync(f.fileno())
    committed = status(vol)["committed_seq"]
    assert committed > seq
    tries = target(status(vol), rep.address)["connections"] + 2
    wait_for(lambda: target(status(vol), rep.address)["connections"] >= tries, 30, "retries")
    assert rep.status()["applied_seq"] == seq
    assert not os.path.exists(os.path.join(rep.mountpoint, "g"))
    assert rep.alive() and src.alive()
    assert node_status(rep.dir) is not None
