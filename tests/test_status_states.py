"""Status of a real source and replica in the states test_status_live.py does not reach:
connecting (nothing listens at the target's address yet), out-of-sync (a target behind the
log cap), resyncing (slowed by the test proxy so that it can be seen) and fenced (a source
that meets a newer epoch after its replica was promoted). Every document is checked field
by field against the schema (tests/status_schema.py) at both ends; the human screen shows
the state in words, no Python repr, and "not connected" rather than zero lag."""

from __future__ import annotations

import json
import os

import pytest

from tests.netproxy import Mode
from tests.repl_util import Cluster, free_port, status, wait_caught_up, wait_target
from tests.status_schema import assert_no_repr, check_status
from tests.util import needs_fuse, run_cli, wait_for

pytestmark = [needs_fuse, pytest.mark.mount]
MiB = 1 << 20


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(str(tmp_path))
    try:
        yield c
    finally:
        c.close()


def both(volume_dir: str) -> tuple[dict, str]:
    """``status --json`` (checked against the schema) and the human screen (no repr)."""
    doc = json.loads(run_cli("status", volume_dir, "--json", check=True).stdout)
    check_status(doc)
    text = run_cli("status", volume_dir, check=True).stdout
    assert_no_repr(text)
    return doc, text


def assert_not_connected(link: dict, text: str) -> None:
    """A link that is down: no stage lag, no wire position, and the screen says so."""
    assert not link["connected"] and link["sent_seq"] is None
    for stage in ("sent_not_received", "received_not_flushed", "flushed_not_applied"):
        assert link["lag"][stage] == {"txns": None, "bytes": None, "seconds": None}, link["lag"]
    assert "not connected" in text, text
    assert "0 txn" not in text, text


def write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_status_of_a_source_connecting_and_a_replica_waiting(cluster):
    port = free_port()  # bound and closed: nothing listens there
    address = f"127.0.0.1:{port}"
    vol = cluster.mkfs("src")
    src = cluster.mount_source(vol, [address])
    write_synced(os.path.join(src.mountpoint, "f"), os.urandom(64 << 10))
    st, text = both(vol)
    assert (st["role"], st["state"], st["running"]) == ("source", "serving", True)
    (t,) = st["targets"]
    assert t["address"] == address and t["state"] == "connecting", t
    assert t["applied_seq"] is None and t["last_contact"] is None and t["connections"] == 0
    assert t["reason"], t  # why it is still connecting (refused), in words
    assert "[Errno" not in t["reason"], t
    assert_not_connected(t, text)
    assert f"{address}" in text and "connecting (not connected, last contact never)" in text

    # The other end of a link that never came up: a replica no source has reached yet.
    rep = cluster.replica("rep", mount=False)
    rst, rtext = both(rep.dir)
    assert (rst["role"], rst["state"], rst["running"], rst["source"]) == (
        "target",
        "waiting",
        True,
        None,
    )
    assert rst["listen"] == rep.address and "none has connected yet" in rtext
    assert "waiting" in rtext


@pytest.mark.log_expected(r"out-of-sync", r"log cap")
def test_status_out_of_sync_then_resyncing(cluster):
    rep = cluster.replica("rep", mount=False)
    proxy = cluster.proxy(rep)
    address = f"127.0.0.1:{proxy.port}"
    vol = cluster.mkfs("src", "64M")  # (fewer blocks for the resync to compare)
    src = cluster.mount_source(vol, [address], extra=("--max-log", "1M"))
    write_synced(os.path.join(src.mountpoint, "f"), os.urandom(1 * MiB))
    wait_caught_up(vol)

    # The target goes away; the source writes until it no longer keeps the log for it
    # (a checkpoint retires segments once 256 MiB were logged: the same 8 MiB rewritten, so
    # that the resync has little to send).
    proxy.mode = Mode.REFUSE
    proxy.cut_all()
    data = os.urandom(8 * MiB)
    for i in range(64):
        write_synced(os.path.join(src.mountpoint, "f"), data[i:] + data[:i])
        if status(vol)["targets"][0]["state"] == "out-of-sync":
            break
    wait_target(vol, address, lambda t: t["state"] == "out-of-sync", 30, "out-of-sync")
    st, text = both(vol)
    (t,) = st["targets"]
    assert "log cap" in t["reason"] and t["resyncs"] == 0 and t["sync"] is None, t
    assert t["lag"]["total"]["txns"] > 0  # what it missed (a lower bound)
    assert_not_connected(t, text)
    assert "out-of-sync (not connected" in text and "resync needed" in text
    assert "log cap of 1.0 MiB" in text  # in units people read
    rst, rtext = both(rep.dir)
    assert rst["state"] == "disconnected", rst["state"]
    assert_not_connected(rst["source"], rtext)
    assert rst["consistent"] is True  # still a consistent copy, only old

    # Back, through a slow link: the resync can be seen at both ends.
    proxy.bandwidth = 256 << 10
    proxy.mode = Mode.ACCEPT

    wait_for(lambda: rep.status()["state"] == "resyncing", 30, "the replica to resync")
    proxy.paused = True  # hold the copy where it is while we look
    try:
        st, text = both(vol)
        (t,) = st["targets"]
        assert t["state"] == "resyncing" and t["connected"] and t["resyncs"] == 1, t
        if t["sync"] is not None:  # (the source may be done sending: the proxy buffers)
            assert t["sync"]["kind"] == "resync" and t["sync"]["phase"] in ("comparing",
                                                                            "sending")  # fmt: skip
            assert "resync (" in text, text
        assert "resyncing" in text and "not connected" not in text
        rst, rtext = both(rep.dir)
        # (the resync is staged: the old copy stays consistent until it is committed)
        assert rst["state"] == "resyncing" and rst["consistent"] is True
        s = rst["source"]
        assert s["connected"] and s["state"] == "resyncing" and s["node_id"] == st["node_id"]
        assert s["sync"] is not None and s["sync"]["kind"] == "resync"
        assert "resyncing" in rtext and "resync (receiving)" in rtext
        assert "not connected" not in rtext
    finally:
        proxy.paused = False
        proxy.bandwidth = None
    wait_caught_up(vol, timeout=60)
    st, text = both(vol)
    (t,) = st["targets"]
    assert (t["state"], t["connected"], t["resyncs"], t["sync"]) == ("streaming", True, 1, None)
    assert "resync" not in text.split("throughput")[-1]
    rst, _ = both(rep.dir)
    assert rst["state"] == "streaming" and rst["consistent"] and rst["source"]["resyncs"] >= 1


@pytest.mark.log_expected(r"fenced", r"epoch")
def test_status_of_a_fenced_source(cluster):
    rep = cluster.replica("rep", mount=False)
    proxy = cluster.proxy(rep)
    address = f"127.0.0.1:{proxy.port}"
    vol = cluster.mkfs("src")
    src = cluster.mount_source(vol, [address])
    write_synced(os.path.join(src.mountpoint, "f"), os.urandom(256 << 10))
    wait_caught_up(vol)

    # The link goes down; the replica is promoted (a newer epoch) and comes back.
    proxy.mode = Mode.REFUSE
    proxy.cut_all()
    rep.stop()
    run_cli("promote", rep.dir, "--no-mount", "--force", check=True)
    run_cli("demote", rep.dir, check=True)
    rep.start()
    proxy.mode = Mode.ACCEPT

    wait_for(lambda: bool(status(vol)["fenced"]), 30, "the source to be fenced")
    st, text = both(vol)
    assert st["fenced"] and "epoch" in st["fenced"], st["fenced"]
    (t,) = st["targets"]
    assert t["state"] == "fenced" and "epoch" in t["reason"], t
    assert_not_connected(t, text)
    assert ", fenced" in text.splitlines()[0] and "follows a newer epoch" in text
    rst, rtext = both(rep.dir)
    assert rst["role"] == "target" and rst["epoch"] == 2, (rst["role"], rst["epoch"])
    assert len(rst["epochs"]) == 2 and rst["source"] is None
    # The stale source was refused at its handshake: the replica says who and why.
    assert rst["last_refused"].startswith("127.0.0.1:") and "epoch" in rst["last_refused"]
    assert "last refused" in rtext and "epoch" in rtext.split("last refused")[1]
