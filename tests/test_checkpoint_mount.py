"""Checkpoints end to end: the real command line, real FUSE mounts, a real replica.

A checkpoint of a mounted source (made through its control socket) keeps the tree as it
was while the live mount deletes, overwrites, truncates and renames; a checkpoint mount
(its own process) shows exactly that tree, on the source and on a replica that got the
checkpoint by applying the log; a reader looping over a checkpoint mount while a writer
rewrites the same files never sees a changed byte; delete frees the space it held.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
import time

import pytest

from tests.repl_util import (
    Cluster,
    MiB,
    assert_same_tree,
    build_tree,
    copy_tree,
    finish_and_compare,
    tree_signature,
    wait_caught_up,
)
from tests.util import fsck, is_mounted, lazy_unmount, needs_fuse, run_cli, wait_for

pytestmark = [pytest.mark.mount, needs_fuse]


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(str(tmp_path))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tree") / "tree")
    build_tree(path, random_mib=2.0)
    return path


def _cli_ok(*args: str) -> str:
    proc = run_cli(*args, timeout=120)
    assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
    return proc.stdout


class _CheckpointMounts:
    """Checkpoint mounts this test made; unmounted (or lazily detached) at the end."""

    def __init__(self) -> None:
        self.points: list[str] = []

    def mount(self, vol: str, name: str, mnt: str) -> str:
        os.makedirs(mnt, exist_ok=True)
        _cli_ok("checkpoint", "mount", vol, name, mnt)
        self.points.append(mnt)
        assert is_mounted(mnt)
        return mnt

    def umount(self, mnt: str) -> None:
        _cli_ok("umount", mnt)
        assert not is_mounted(mnt)

    def close(self) -> None:
        for mnt in self.points:
            if is_mounted(mnt):
                run_cli("umount", mnt, timeout=60)
            lazy_unmount(mnt)


@pytest.fixture
def ckmounts():
    c = _CheckpointMounts()
    try:
        yield c
    finally:
        c.close()


def _mutate(root: str) -> None:
    """Delete, overwrite, truncate, rename and create on a live tree."""
    data = os.path.join(root, "data")
    os.unlink(os.path.join(data, "r2.bin"))
    with open(os.path.join(data, "r0.bin"), "r+b") as f:
        f.seek(1000)
        f.write(os.urandom(300_000))
    os.truncate(os.path.join(data, "r1.bin"), 777)
    os.rename(os.path.join(root, "lib"), os.path.join(root, "lib-renamed"))
    shutil.rmtree(os.path.join(root, "empty"))
    with open(os.path.join(root, "new.bin"), "wb") as f:
        f.write(os.urandom(200_000))
        os.fsync(f.fileno())


def _listing(vol: str) -> dict[str, dict]:
    out = json.loads(_cli_ok("checkpoint", "list", vol, "--json"))
    return {c["name"]: c for c in out["checkpoints"]}


def test_checkpoint_of_a_mounted_source(cluster, tree, ckmounts):
    vol = cluster.mkfs("src", "128M")
    src = cluster.mount_source(vol)
    root = os.path.join(src.mountpoint, "t")
    copy_tree(tree, root)
    before = tree_signature(root)
    _cli_ok("checkpoint", "create", vol, "before")
    _mutate(root)
    after = tree_signature(root)
    assert after != before
    mnt = ckmounts.mount(vol, "before", cluster.path("ck-mnt"))
    assert_same_tree(before, tree_signature(os.path.join(mnt, "t")))
    assert_same_tree(after, tree_signature(root))  # the live mount: the new state
    with pytest.raises(OSError) as ei:
        os.mkdir(os.path.join(mnt, "t", "x"))
    assert ei.value.errno == errno.EROFS
    held = _listing(vol)["before"]["held_blocks"]
    assert held > 0
    st = json.loads(_cli_ok("status", vol, "--json"))
    assert [(c["name"], c["held_blocks"]) for c in st["checkpoints"]] == [("before", held)]
    # A mounted checkpoint cannot be deleted; unmounted, its deletion frees what it held.
    proc = run_cli("checkpoint", "delete", vol, "before")
    assert proc.returncode == 1 and "is mounted" in proc.stderr
    ckmounts.umount(mnt)
    free_before = os.statvfs(src.mountpoint).f_bfree
    out = _cli_ok("checkpoint", "delete", vol, "before")
    assert f"{held} block(s) freed" in out
    assert os.statvfs(src.mountpoint).f_bfree >= free_before + held
    assert _listing(vol) == {}
    cluster.umount_source(src)
    res = fsck(vol)
    assert res.returncode == 0, res.stdout + res.stderr


def test_checkpoint_on_the_replica(cluster, tree, ckmounts):
    vol = cluster.mkfs("src", "128M")
    rep = cluster.replica("rep")
    src = cluster.mount_source(vol, [rep.address])
    root = os.path.join(src.mountpoint, "t")
    copy_tree(tree, root)
    before = tree_signature(root)
    _cli_ok("checkpoint", "create", vol, "backup")
    _mutate(root)
    after = tree_signature(root)
    wait_caught_up(vol)
    assert "backup" in _listing(rep.dir)
    mnt = ckmounts.mount(rep.dir, "backup", cluster.path("rep-ck-mnt"))
    assert_same_tree(before, tree_signature(os.path.join(mnt, "t")))
    assert rep.mountpoint is not None
    wait_for(lambda: os.path.exists(os.path.join(rep.mountpoint, "t", "new.bin")), 30, "apply")
    assert_same_tree(after, tree_signature(os.path.join(rep.mountpoint, "t")))
    # Replication goes on while the checkpoint is mounted on the replica.
    with open(os.path.join(root, "later.bin"), "wb") as f:
        f.write(os.urandom(100_000))
    wait_caught_up(vol)
    assert_same_tree(before, tree_signature(os.path.join(mnt, "t")))
    _cli_ok("verify", vol)  # exit status 0: every range of the target matches
    # Deleted on the source: gone on the replica too (it is a transaction like any other).
    ckmounts.umount(mnt)
    _cli_ok("checkpoint", "create", vol, "second")
    _cli_ok("checkpoint", "delete", vol, "backup")
    wait_caught_up(vol)
    assert set(_listing(rep.dir)) == {"second"}
    proc = run_cli("checkpoint", "create", rep.dir, "nope")
    assert proc.returncode == 1 and "source" in proc.stderr
    finish_and_compare(src, [rep])
    for d in (vol,):
        res = fsck(d)
        assert res.returncode == 0, res.stdout + res.stderr


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _rewrite_while_reading(live: str, ck: str, names: list[str], expected: dict[str, str]):
    """A writer rewrites ``names`` under ``live`` while this thread reads them under the
    checkpoint mount ``ck`` for a few seconds: every read must give the recorded bytes."""
    stop = threading.Event()
    errors: list[BaseException] = []
    rewrites = [0]

    def writer() -> None:
        try:
            while not stop.is_set():
                for n in names:
                    with open(os.path.join(live, n), "r+b") as f:
                        for off in range(0, MiB, 64 * 1024):
                            f.seek(off)
                            f.write(os.urandom(4096))
                    rewrites[0] += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    reads = 0
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline or reads < 8:
            for n in names:
                got = _digest(os.path.join(ck, n))  # a read-only mount drops its cache on open
                assert got == expected[n], f"{n} changed in the checkpoint after {reads} reads"
                reads += 1
    finally:
        stop.set()
        t.join(timeout=30)
    assert not errors, errors
    assert rewrites[0] >= 2, "the writer did not get going"


def _files(root: str) -> tuple[list[str], dict[str, str]]:
    names = [f"f{i}" for i in range(4)]
    for n in names:
        with open(os.path.join(root, n), "wb") as f:
            f.write(os.urandom(MiB))
    return names, {n: _digest(os.path.join(root, n)) for n in names}


def test_reader_never_sees_a_changed_byte(cluster, ckmounts):
    vol = cluster.mkfs("src", "128M")
    src = cluster.mount_source(vol)
    names, expected = _files(src.mountpoint)
    _cli_ok("checkpoint", "create", vol, "still")
    mnt = ckmounts.mount(vol, "still", cluster.path("ck-mnt"))
    _rewrite_while_reading(src.mountpoint, mnt, names, expected)
    assert any(_digest(os.path.join(src.mountpoint, n)) != expected[n] for n in names)


def test_replica_reader_never_sees_a_changed_byte(cluster, ckmounts):
    vol = cluster.mkfs("src", "128M")
    rep = cluster.replica("rep", mount=False)
    src = cluster.mount_source(vol, [rep.address])
    names, expected = _files(src.mountpoint)
    _cli_ok("checkpoint", "create", vol, "still")
    wait_caught_up(vol)
    mnt = ckmounts.mount(rep.dir, "still", cluster.path("rep-ck-mnt"))
    # The replica applies the rewrites (and their saved copies) while the reader reads.
    _rewrite_while_reading(src.mountpoint, mnt, names, expected)
    wait_caught_up(vol)
    assert all(_digest(os.path.join(mnt, n)) == expected[n] for n in names)
    ckmounts.umount(mnt)
    finish_and_compare(src, [rep])


def test_schedule_keeps_the_newest(cluster):
    vol = cluster.mkfs("src", "64M")
    src = cluster.mount_source(vol, extra=("--checkpoint-every", "0.3", "--checkpoint-keep", "3"))
    _cli_ok("checkpoint", "create", vol, "by-hand")
    path = os.path.join(src.mountpoint, "f")
    seen: set[str] = set()

    def five_taken() -> bool:
        with open(path, "wb") as f:  # something changes between checkpoints
            f.write(os.urandom(8192))
        seen.update(n for n in _listing(vol) if n.startswith("auto-"))
        return len(seen) >= 5

    wait_for(five_taken, 60, "five scheduled checkpoints", interval=0.2)
    cluster.umount_source(src)
    names = list(_listing(vol))
    autos = [n for n in names if n.startswith("auto-")]
    assert "by-hand" in names  # retention deletes only scheduled ones
    # Exactly the 3 newest of all that were taken (one more may have come after the last look).
    assert autos == sorted(seen | set(autos))[-3:], (autos, sorted(seen))


def test_rollback_is_mirrored(cluster, tree):
    vol = cluster.mkfs("src", "128M")
    rep = cluster.replica("rep")
    src = cluster.mount_source(vol, [rep.address])
    root = os.path.join(src.mountpoint, "t")
    copy_tree(tree, root)
    before = tree_signature(root)
    _cli_ok("checkpoint", "create", vol, "good")
    _mutate(root)
    wait_caught_up(vol)
    cluster.umount_source(src)
    proc = run_cli("checkpoint", "rollback", vol, "nope")
    assert proc.returncode == 1 and "no checkpoint" in proc.stderr
    _cli_ok("checkpoint", "rollback", vol, "good")
    src = cluster.mount_source(vol, [rep.address])
    assert_same_tree(before, tree_signature(root))
    wait_caught_up(vol)
    assert rep.mountpoint is not None
    rep_root = os.path.join(rep.mountpoint, "t")

    def same() -> bool:
        try:
            return tree_signature(rep_root) == before
        except OSError:
            return False

    wait_for(same, 30, "the replica's live mount to show the rolled-back tree", interval=0.5)
    finish_and_compare(src, [rep])
    res = fsck(vol)
    assert res.returncode == 0, res.stdout + res.stderr


def test_promoted_replica_keeps_its_checkpoints(cluster, tree, ckmounts):
    from tests.util import Mount, cleanup

    vol = cluster.mkfs("src", "128M")
    rep = cluster.replica("rep")
    src = cluster.mount_source(vol, [rep.address])
    root = os.path.join(src.mountpoint, "t")
    copy_tree(tree, root)
    before = tree_signature(root)
    _cli_ok("checkpoint", "create", vol, "pre")
    _mutate(root)
    wait_caught_up(vol)
    cluster.umount_source(src)  # the source is gone
    promoted = None
    try:
        _cli_ok("promote", rep.dir, "--force")
        with open(os.path.join(rep.dir, "mount.pid")) as f:
            promoted = Mount(int(f.read()), rep.dir, rep.mountpoint or "")
        assert set(_listing(rep.dir)) == {"pre"}
        mnt = ckmounts.mount(rep.dir, "pre", cluster.path("promoted-ck"))
        assert_same_tree(before, tree_signature(os.path.join(mnt, "t")))
        # The new source makes and holds checkpoints of its own.
        _cli_ok("checkpoint", "create", rep.dir, "post")
        with open(os.path.join(rep.mountpoint or "", "t", "new.bin"), "r+b") as f:
            f.write(os.urandom(4096))
        assert _listing(rep.dir)["pre"]["seq"] < _listing(rep.dir)["post"]["seq"]
        assert_same_tree(before, tree_signature(os.path.join(mnt, "t")))
        ckmounts.umount(mnt)
    finally:
        cleanup(promoted)
    res = fsck(rep.dir)
    assert res.returncode == 0, res.stdout + res.stderr


def test_failback_resyncs_checkpoints_with_the_data(cluster, ckmounts):
    """A checkpoints, ships, and the roles switch: B (promoted) makes a checkpoint of its
    own while A, cut off, made one that B never got. A demoted and resynced holds exactly
    B's checkpoints (its own lost one is gone with the rest of its diverged writes)."""
    from tests.repl_util import Replica, free_port, stopped_status
    from tests.util import Mount, cleanup

    a = cluster.mkfs("a", "128M")
    b = cluster.replica("b", mount=False)
    a_src = cluster.mount_source(a, [b.address])
    with open(os.path.join(a_src.mountpoint, "f"), "wb") as f:
        f.write(os.urandom(300_000))
    _cli_ok("checkpoint", "create", a, "shipped")
    cluster.umount_source(a_src)
    last = stopped_status(a)["checkpointed_seq"]
    wait_for(lambda: b.status()["applied_seq"] == last, 30, "B to apply A's last seq")
    b.stop()
    # A goes on alone: a write and a checkpoint that B never sees.
    a_alone = cluster.mount_source(a, mountpoint=cluster.path("a-alone", mkdir=True))
    with open(os.path.join(a_alone.mountpoint, "f"), "r+b") as f:
        f.write(os.urandom(100_000))
    _cli_ok("checkpoint", "create", a, "lost")
    cluster.umount_source(a_alone)
    b_source: Mount | None = None
    try:
        _cli_ok("promote", b.dir, "--no-mount")
        b_source = cluster.mount_source(b.dir, mountpoint=cluster.path("b-rw", mkdir=True))
        root = b_source.mountpoint
        with open(os.path.join(root, "g"), "wb") as f:
            f.write(os.urandom(200_000))
        b_tree = tree_signature(root)
        _cli_ok("checkpoint", "create", b.dir, "on-b")
        with open(os.path.join(root, "f"), "r+b") as f:
            f.write(os.urandom(50_000))
        _cli_ok("demote", a)
        ra = Replica(a, free_port(), None)
        cluster.replicas.append(ra)
        ra.start()
        _cli_ok("mirror", b.dir, "--add", ra.address)
        wait_caught_up(b.dir)
        assert set(_listing(a)) == {"shipped", "on-b"}
        mnt = ckmounts.mount(a, "on-b", cluster.path("a-ck"))
        assert_same_tree(b_tree, tree_signature(mnt))
        ckmounts.umount(mnt)
        finish_and_compare(b_source, [ra])
    finally:
        cleanup(b_source)
