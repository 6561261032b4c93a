"""Promotion of a replica: unmount-and-promote, stopped replicas, refusals."""

from __future__ import annotations

import os
import re

from tests.repl_util import (
    Cluster,
    build_tree,
    status,
    stopped_status,
    tree_signature,
    wait_caught_up,
)
from tests.util import Mount, cleanup, is_mounted, mount, needs_fuse, run_cli

pytestmark = needs_fuse


def promoted_mount(volume: str, mountpoint: str) -> Mount:
    with open(os.path.join(volume, "mount.pid")) as f:
        return Mount(int(f.read()), volume, mountpoint)


def test_unmount_and_promote_a_running_replica(tmp_path):
    c = Cluster(str(tmp_path))
    promoted: Mount | None = None
    try:
        src = c.mkfs("src")
        rep = c.replica("rep")
        source = c.mount_source(src, [rep.address])
        build_tree(os.path.join(source.mountpoint, "tree"), random_mib=1)
        expected = tree_signature(source.mountpoint)  # reads first: atime updates commit too
        seq = wait_caught_up(src)

        # The source is alive and connected: promoting would make two sources.
        proc = run_cli("promote", rep.dir)
        assert proc.returncode == 1
        err = proc.stderr.strip()
        assert "is still connected (last heard" in err and "pass --force" in err, err
        assert len(err.splitlines()) == 1 and rep.alive()
        st = rep.status()
        assert st["source_address"] and st["last_contact"] > 0
        shown = run_cli("status", rep.dir).stdout
        assert re.search(r"^source\s+127\.0\.0\.1:\d+ \(node \w+\)$", shown, re.M), shown
        assert re.search(r"^  last contact\s+[\d.]+ m?s ago$", shown, re.M), shown

        proc = run_cli("promote", rep.dir, "--force")
        assert proc.returncode == 0, proc.stderr
        assert "epoch 1 -> 2" in proc.stdout and f"seq {seq + 1}" in proc.stdout
        assert "mounted read-write" in proc.stdout
        assert not rep.alive()  # the replica daemon handed over and exited
        promoted = promoted_mount(rep.dir, rep.mountpoint)
        assert is_mounted(rep.mountpoint)

        # the same tree, now writable, in a new epoch
        assert tree_signature(rep.mountpoint) == expected
        with open(os.path.join(rep.mountpoint, "after-failover"), "w") as f:
            f.write("written on the new source\n")
        st = status(rep.dir)
        assert st["role"] == "source" and st["epoch"] == 2
        assert st["epochs"] == [[1, 1], [2, seq + 1]]
        assert st["committed_seq"] >= seq
    finally:
        cleanup(promoted)
        c.close()


def test_promote_a_stopped_replica_and_refusals(tmp_path):
    c = Cluster(str(tmp_path))
    m: Mount | None = None
    try:
        src = c.mkfs("src")
        rep = c.replica("rep", mount=False)
        source = c.mount_source(src, [rep.address])
        with open(os.path.join(source.mountpoint, "f"), "wb") as f:
            f.write(os.urandom(100_000))
        seq = wait_caught_up(src)
        rep.stop()

        # a replica cannot be mounted read-write before promotion
        mnt = c.path("rw", mkdir=True)
        proc = run_cli("mount", rep.dir, mnt)
        assert proc.returncode == 1 and "is a replica" in proc.stderr
        assert "Traceback" not in proc.stderr
        # a source cannot be promoted
        proc = run_cli("promote", src, "--no-mount")
        assert proc.returncode == 1 and "already a source" in proc.stderr

        proc = run_cli("promote", rep.dir)
        assert proc.returncode == 0, proc.stderr
        assert "unknown" in proc.stdout  # nobody can say what the old source had
        st = stopped_status(rep.dir)
        assert st["role"] == "source" and st["epochs"] == [[1, 1], [2, seq + 1]]
        m = mount(rep.dir, mnt)
        with open(os.path.join(mnt, "f"), "rb") as f:
            assert len(f.read()) == 100_000
    finally:
        cleanup(m)
        c.close()
