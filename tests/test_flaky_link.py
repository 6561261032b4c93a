"""A link that carries some bytes per connection carries all of them (issue 9, item 8).

The real command line (``mirrorfs replica``, ``mount --mirror``, ``verify``) with real FUSE
mounts, through the fault proxy of tests/netproxy.py resetting every connection after
256 KiB and flipping one byte once: a 20 MB file and a small tree reach the replica, which
resumes each large transaction where the last connection was cut (repl.txn_parts).
"""

from __future__ import annotations

import os
import random
import re
import time

import pytest

from tests.netproxy import Direction
from tests.repl_util import (
    Cluster,
    MiB,
    assert_same_tree,
    build_tree,
    copy_tree,
    log_text,
    node_status,
    tree_signature,
    wait_caught_up,
)
from tests.util import needs_fuse, run_cli, umount, wait_for

pytestmark = [pytest.mark.mount, needs_fuse]

KiB = 1 << 10
RESET_EVERY = 256 * KiB


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(str(tmp_path))
    try:
        yield c
    finally:
        c.close()


def test_20mb_file_and_tree_over_a_link_reset_every_256k(cluster, tmp_path):
    """From the first connection on, every connection is reset after 256 KiB: the initial
    sync of a volume holding a tree goes on where each cut left it, then a 20 MB file and
    another tree are shipped in large transactions that resume inside themselves."""
    tree = str(tmp_path / "tree")
    build_tree(tree, random_mib=1.0, seed=9)
    vol = cluster.mkfs("src")
    first = cluster.mount_source(vol)
    copy_tree(tree, os.path.join(first.mountpoint, "tree0"))
    umount(first)

    rep = cluster.replica("rep")
    proxy = cluster.proxy(rep)
    proxy.reset_every(RESET_EVERY, Direction.UP)
    start = time.monotonic()
    src = cluster.mount_source(vol, [f"127.0.0.1:{proxy.port}"], mountpoint=first.mountpoint)
    wait_for(rep.mounted, 120, "the replica mount (initial sync through the resets)")
    sync_time, sync_conns = time.monotonic() - start, len(proxy.connections)
    slog = log_text(vol)
    assert slog.count("initial sync of") == 1, "the initial sync started over"
    assert slog.count("resuming the initial sync") >= 3

    # The file exists and is on the replica before the flip, so that the next connection's
    # first record holds its data (more than one 128 KiB part): the flipped byte falls in
    # that record's first part, which arrives whole. (A small first record would put it in
    # the next record, sent as one frame that the 256 KiB reset cuts: never checked.)
    big = os.path.join(src.mountpoint, "big.bin")
    with open(big, "wb") as f:
        os.fsync(f.fileno())
    wait_caught_up(vol, timeout=120)
    proxy.flip_at(20 * KiB, Direction.UP)  # once, inside the next connection's first part
    proxy.cut_all()
    conns_before = len(proxy.connections)
    start = time.monotonic()
    with open(big, "r+b") as f:
        f.write(random.Random(5).randbytes(20 * MiB))
        f.flush()
        os.fsync(f.fileno())
    copy_tree(tree, os.path.join(src.mountpoint, "tree"))

    # Progress between reconnects: what the replica holds of a record only grows.
    seen: list[tuple[int, int]] = []

    def converged() -> bool:
        st = node_status(rep.dir)
        p = st.get("partial") if st else None
        if p is not None and (not seen or seen[-1] != (p["seq"], p["bytes"])):
            seen.append((p["seq"], p["bytes"]))
        sst = node_status(vol)
        t = sst["targets"][0] if sst else None
        return t is not None and t["applied_seq"] == sst["committed_seq"] and not t["unacked_bytes"]

    wait_for(converged, 240, "the replica to apply everything through the resets", interval=0.05)
    wait_caught_up(vol, timeout=120)
    elapsed = time.monotonic() - start
    cuts = len(proxy.connections) - conns_before
    print(
        f"initial sync through resets every 256 KiB: {sync_time:.1f} s, {sync_conns} "
        f"connections; then 20 MiB + tree: {elapsed:.1f} s, {cuts} connections"
    )

    assert cuts >= 20 * MiB // RESET_EVERY, cuts
    assert seen, "the replica never held a record in part"
    for seq in {s for s, _ in seen}:
        held = [b for s, b in seen if s == seq]
        assert held == sorted(held), (seq, held)
    # And as the source saw it: each record resumed at ever larger offsets.
    resumed: dict[int, list[int]] = {}
    for seq, offset in re.findall(r"resuming seq (\d+) at byte (\d+) of", log_text(vol)):
        resumed.setdefault(int(seq), []).append(int(offset))
    assert sum(map(len, resumed.values())) >= 20 * MiB // RESET_EVERY // 2, resumed
    for seq, offsets in resumed.items():
        assert offsets == sorted(set(offsets)), (seq, offsets)
    assert_same_tree(tree_signature(src.mountpoint), tree_signature(rep.mountpoint))
    proc = run_cli("verify", vol, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # Each cut is one line on each side, never a traceback (checklogs checks the rest).
    rlog, slog = log_text(rep.dir), log_text(vol)
    drops = rlog.count("dropped source")
    # (the log holds the initial sync's cuts too: at most one line per connection in all)
    assert cuts // 2 <= drops <= len(proxy.connections) + 5, (drops, cuts, len(proxy.connections))
    assert "CRC mismatch" in rlog  # the flipped byte ended one connection, nothing more
    proxy.clear_faults()
    umount(src)
