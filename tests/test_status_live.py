"""Status, metrics and events of a real source and replica (FUSE mounts, TCP on 127.0.0.1
through the test proxy): the JSON documents field by field in the states a pair passes
through (streaming, lagging behind a slow link, disconnected, stopped), human output without
a Python repr, the metrics endpoints scraped during replication, and ``mirrorfs events``
seeing a disconnect and a reconnect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.netproxy import Mode
from tests.repl_util import Cluster, free_port, wait_caught_up
from tests.status_schema import assert_no_repr, check_status
from tests.util import REPO, needs_fuse, run_cli, umount, wait_for

pytestmark = needs_fuse
MiB = 1 << 20


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(str(tmp_path))
    try:
        yield c
    finally:
        c.close()


def cli_status(volume_dir: str) -> dict:
    doc = json.loads(run_cli("status", volume_dir, "--json", check=True).stdout)
    check_status(doc)
    text = run_cli("status", volume_dir, check=True).stdout
    assert_no_repr(text)
    return doc


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value (parsed by
    prometheus_client's own parser)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    hits = [v for (n, lv), v in samples.items() if n == name and set(labels.items()) <= set(lv)]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


class EventReader:
    """``mirrorfs events DIR`` in a child process; its lines collected by a thread."""

    def __init__(self, volume_dir: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mirrorfs", "events", volume_dir, "--interval", "0.05"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        self.events: list[dict] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def names(self) -> list[str]:
        return [e["event"] for e in list(self.events)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)
        self._thread.join(10)


def test_status_metrics_and_events_of_a_live_pair(cluster):
    rport, sport = free_port(), free_port()
    rep = cluster.replica("rep", extra=("--metrics", f"127.0.0.1:{rport}"))
    proxy = cluster.proxy(rep)
    address = f"127.0.0.1:{proxy.port}"
    vol = cluster.mkfs("src")
    src = cluster.mount_source(vol, [address], extra=("--metrics", f"127.0.0.1:{sport}"))
    wait_for(rep.mounted, 60, "the replica mount")
    wait_caught_up(vol)
    src_events, rep_events = EventReader(vol), EventReader(rep.dir)
    try:
        # Streaming, caught up: both documents, and the same figures at both ends.
        st, rst = cli_status(vol), cli_status(rep.dir)
        assert (st["role"], st["state"], st["running"], st["mounted"]) == (
            "source",
            "serving",
            True,
            True,
        )
        (t,) = st["targets"]
        assert (t["address"], t["state"], t["connected"]) == (address, "streaming", True)
        assert t["applied_seq"] == t["flushed_seq"] == t["sent_seq"] == st["committed_seq"]
        assert t["lag"]["total"] == {"txns": 0, "bytes": 0, "seconds": 0.0}
        assert t["last_contact_age_seconds"] is not None and t["node_id"] == rst["node_id"]
        assert (rst["role"], rst["state"], rst["consistent"]) == ("target", "streaming", True)
        s = rst["source"]
        assert s["connected"] and s["node_id"] == st["node_id"]
        assert s["applied_seq"] == rst["applied_seq"] == t["applied_seq"]
        assert isinstance(st["pid"], int) and isinstance(rst["pid"], int)
        ver = json.loads(run_cli("verify", vol, "--json", check=True).stdout)
        assert (ver["version"], ver["command"], ver["ok"]) == (1, "verify", True)
        assert isinstance(ver["seconds"], float)
        (r,) = ver["results"]
        assert (r["target"], r["ok"], r["blocks_differing"], r["differing_ranges"]) == (
            address,
            True,
            0,
            [],
        )
        assert r["seq"] >= t["applied_seq"] and r["blocks"] > 0 and "identical" in r["summary"]

        # Lag behind a slow link: non-zero on the source while the data travels, positions
        # and byte counters moving in the metrics of both ends.
        before_s, before_r = scrape(sport), scrape(rport)
        proxy.bandwidth = 1 * MiB
        with open(os.path.join(src.mountpoint, "lagging.bin"), "wb") as f:
            f.write(os.urandom(8 * MiB))
            os.fsync(f.fileno())
        mid_s = scrape(sport)  # (first: a scrape takes milliseconds, a status a process)
        assert sample(mid_s, "mirrorfs_link_lag_transactions", stage="total") > 0
        assert sample(mid_s, "mirrorfs_link_lag_bytes", stage="total") > 0
        assert sample(mid_s, "mirrorfs_position_seq", position="committed") > sample(
            before_s, "mirrorfs_position_seq", position="committed"
        )
        lagging = cli_status(vol)["targets"][0]
        assert lagging["lag"]["total"]["txns"] > 0 and lagging["lag"]["total"]["bytes"] > 0
        assert lagging["lag"]["total"]["seconds"] > 0
        sent = lagging["lag"]["sent_not_received"]
        assert sent["txns"] + lagging["lag"]["flushed_not_applied"]["txns"] > 0
        proxy.bandwidth = None
        wait_caught_up(vol)
        after_s, after_r = scrape(sport), scrape(rport)
        assert sample(after_s, "mirrorfs_link_lag_transactions", stage="total") == 0
        assert sample(after_s, "mirrorfs_link_bytes_total") > sample(
            before_s, "mirrorfs_link_bytes_total"
        )
        assert sample(after_r, "mirrorfs_position_seq", position="applied") > sample(
            before_r, "mirrorfs_position_seq", position="applied"
        )
        assert sample(after_r, "mirrorfs_transactions_applied_total") > sample(
            before_r, "mirrorfs_transactions_applied_total"
        )
        assert sample(after_s, "mirrorfs_fuse_requests_total", op="write") > 0
        assert sample(after_s, "mirrorfs_link_connected") == 1
        assert sample(after_r, "mirrorfs_mounted") == 1

        # Disconnected: the proxy cuts the link and refuses new connections.
        proxy.mode = Mode.REFUSE
        proxy.cut_all()
        wait_for(lambda: "disconnected" in src_events.names(), 30, "a disconnected event")
        wait_for(lambda: "disconnected" in rep_events.names(), 30, "the replica's event")
        down = cli_status(vol)["targets"][0]
        assert not down["connected"] and down["state"] != "streaming"
        assert all(down["lag"][k]["txns"] is None for k in ("sent_not_received",
                                                            "flushed_not_applied"))  # fmt: skip
        assert "not connected" in run_cli("status", vol, check=True).stdout
        assert sample(scrape(sport), "mirrorfs_link_connected") == 0
        rdown = cli_status(rep.dir)
        assert rdown["state"] == "disconnected" and not rdown["source"]["connected"]

        # And back.
        proxy.mode = Mode.ACCEPT
        wait_for(lambda: "streaming" in src_events.names()[2:], 60, "a streaming event")
        wait_for(lambda: "connected" in rep_events.names()[2:], 30, "the replica's event")
        names = src_events.names()
        assert names[:2] == ["exists", "exists"], names
        gone = names.index("disconnected")
        assert "connected" in names[gone:] and "streaming" in names[gone:], names
        for e in src_events.events:
            assert e["version"] == 1 and e["volume_dir"] == vol and isinstance(e["time"], float)
        assert cli_status(vol)["targets"][0]["connected"]
        assert cli_status(vol)["targets"][0]["connections"] >= 2
    finally:
        src_events.stop()
        rep_events.stop()

    # Stopped: the documents of nodes that are not running.
    umount(src)
    rep.stop()
    st, rst = cli_status(vol), cli_status(rep.dir)
    assert (st["running"], st["state"], st["targets"]) == (False, "stopped", [])
    assert (rst["running"], rst["role"], rst["state"]) == (False, "target", "stopped")
    got = json.loads(run_cli("promote", rep.dir, "--no-mount", "--json", check=True).stdout)
    assert (got["version"], got["command"], got["old_epoch"], got["epoch"]) == (1, "promote", 1, 2)
    assert got["epoch_start_seq"] == got["last_applied_seq"] + 1 and got["mounted"] is False
    assert isinstance(got["promoted_at"], float) and isinstance(got["seconds"], float)
    assert cli_status(rep.dir)["role"] == "source"


def test_initial_sync_progress_in_status(cluster):
    """``mirror --add --json`` on a running source, then an initial sync through a slow
    link: its progress as a percentage on both ends, none once streaming."""
    vol = cluster.mkfs("src")
    src = cluster.mount_source(vol)
    with open(os.path.join(src.mountpoint, "data.bin"), "wb") as f:
        f.write(os.urandom(6 * MiB))
    rep = cluster.replica("rep")
    proxy = cluster.proxy(rep)
    proxy.bandwidth = 1 * MiB
    address = f"127.0.0.1:{proxy.port}"
    # --wait follows the sync (plain lines: stderr is not a terminal) until it streams.
    adding = subprocess.Popen(
        [sys.executable, "-m", "mirrorfs", "mirror", vol, "--add", address, "--wait", "120",
         "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )  # fmt: skip
    try:

        def syncing() -> bool:
            rst = cli_status(rep.dir)
            sync = rst["source"]["sync"] if rst["source"] else None
            return rst["state"] == "initial-sync" and sync is not None and sync["blocks_done"] > 0

        wait_for(syncing, 60, "the replica to report the initial sync")
        proxy.paused = True  # hold the copy where it is while we look
        st = cli_status(vol)
        sync = st["targets"][0]["sync"]
        source_syncing = sync is not None  # (it may be done sending: the proxy buffers some)
        if source_syncing:
            assert sync["kind"] == "initial-sync" and 0 <= sync["percent"] <= 100
            assert sync["blocks_total"] > 0
        text = run_cli("status", rep.dir, check=True).stdout
        assert_no_repr(text)
        assert "initial sync (copying)" in text, text
        proxy.bandwidth = None
        proxy.paused = False
        out, err = adding.communicate(timeout=120)
    finally:
        if adding.poll() is None:
            adding.kill()
            adding.wait()
    assert adding.returncode == 0, err
    added = json.loads(out)
    assert (added["version"], added["command"], added["action"]) == (1, "mirror", "add")
    assert added["target"]["address"] == address and added["target"]["state"] == "streaming"
    assert "\x1b[" not in err, err
    if source_syncing:  # --wait follows the source's view: it saw the copy while we held it
        assert f"{address}: initial sync (copying)" in err, err
    else:
        assert f"{address}: streaming" in err, err
    assert_no_repr(err)
    wait_for(rep.mounted, 60, "the replica mount")
    wait_caught_up(vol)
    st = cli_status(vol)
    assert st["targets"][0]["sync"] is None and st["targets"][0]["state"] == "streaming"
    assert "initial sync" not in run_cli("status", vol, check=True).stdout
    removed = json.loads(run_cli("mirror", vol, "--remove", address, "--json", check=True).stdout)
    assert (removed["action"], removed["target"]) == ("remove", None)
    assert cli_status(vol)["targets"] == []
