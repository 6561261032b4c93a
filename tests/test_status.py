"""Status, JSON reports, metrics and events without a mount: the status document from the
daemons' figures, its rendering, the event diff, the metrics text, and the commands on
stopped volumes (mkfs, fsck, status, demote) through the real command line."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from mirrorfs.fuse.request_stats import BOUNDS, RequestStats
from mirrorfs.node import events, metrics
from mirrorfs.node.control import ControlServer, control_stream
from mirrorfs.node.status_model import status_document
from mirrorfs.node.status_view import status_text
from tests.status_schema import LINK, assert_no_repr, check, check_status
from tests.util import REPO, run_cli

NOW = 1_800_000_000.0


def shipper_status(**over) -> dict:
    """What Shipper.status() reports for a streaming target (its keys, real shapes)."""
    st = {
        "address": "127.0.0.1:7001",
        "connected": True,
        "sent_seq": 120,
        "last_contact": NOW - 0.5,
        "txns_sent": 118,
        "resyncs": 0,
        "stages": {
            "committed_not_sent": {"txns": 2, "bytes": 8192, "seconds": 0.01},
            "sent_not_received": {"txns": 10, "bytes": 4 << 20, "seconds": 0.3},
            "flushed_not_applied": {"txns": 5, "bytes": 1 << 20, "seconds": 0.4},
        },
        "state": "streaming",
        "reason": "",
        "target_node_id": "ab12",
        "source_seq": 122,
        "received_seq": 110,
        "applied_seq": 105,
        "lag_txns": 17,
        "lag_bytes": 5 << 20,
        "lag_seconds": 0.4,
        "throughput_bps": 5039056.6,
        "bytes_sent": 1 << 30,
        "unacked_bytes": 4 << 20,
        "window_bytes": 64 << 20,
        "initial_sync": None,
        "resync": None,
        "pinning": True,
        "connections": 1,
    }
    st.update(over)
    return st


def source_raw(*targets: dict) -> dict:
    return {
        "role": "source",
        "running": True,
        "volume_uuid": "00ff",
        "node_id": "cd34",
        "epoch": 2,
        "epochs": [[1, 1], [2, 57]],
        "committed_seq": 122,
        "checkpointed_seq": 100,
        "log_first_seq": 90,
        "log_bytes": 50643703,
        "log_cap_bytes": 1 << 30,
        "mountpoint": "/mnt/src",
        "read_only": False,
        "failed": "",
        "fenced": "",
        "tls": False,
        "pid": 4242,
        "targets": list(targets),
    }


def replica_raw(**over) -> dict:
    raw = {
        "role": "target",
        "running": True,
        "volume_dir": "/srv/rep",
        "listen": "127.0.0.1:7001",
        "tls": False,
        "state": "streaming",
        "source_address": "127.0.0.1:40000",
        "source_node_id": "cd34",
        "source_last_seq": 100,
        "received_seq": 118,
        "applied_seq": 115,
        "consistent": True,
        "last_ack_time": NOW - 0.2,
        "last_contact": NOW - 0.2,
        "bytes_received": 123456,
        "throughput": 1000.5,
        "sync_blocks_copied": 0,
        "sync_blocks_total": 0,
        "sessions": 2,
        "last_error": "",
        "node_id": "ab12",
        "volume_uuid": "00ff",
        "volume_failed": "",
        "resync": None,
        "archives": [],
        "log_kept_from": 0,
        "wire_seq": 120,
        "wire_bytes_pending": 8192,
        "log_bytes": 1 << 20,
        "log_first_seq": 100,
        "epoch": 2,
        "epochs": [[1, 1], [2, 57]],
        "checkpointed_seq": 110,
        "txns_applied": 15,
        "bytes_applied": 60000,
        "resyncs": 1,
        "mountpoint": "/mnt/rep",
        "mounted": True,
        "mount_error": "",
    }
    raw.update(over)
    return raw


# -- the document and its rendering


def test_source_document_has_three_lags_and_human_units():
    doc = status_document(source_raw(shipper_status()), "/srv/src", now=NOW)
    check_status(doc)
    t = doc["targets"][0]
    assert (t["sent_seq"], t["received_seq"], t["flushed_seq"], t["applied_seq"]) == (
        120,
        110,
        110,
        105,
    )
    assert t["lag"]["sent_not_received"] == {"txns": 10, "bytes": 4 << 20, "seconds": 0.3}
    # The target acknowledges only what it fsynced: the source cannot split that stage.
    assert t["lag"]["received_not_flushed"] == {"txns": None, "bytes": None, "seconds": None}
    assert t["lag"]["total"] == {"txns": 17, "bytes": 5 << 20, "seconds": 0.4}
    assert t["last_contact_age_seconds"] == 0.5 and t["throughput_bps"] == 5039056.6
    text = status_text(doc)
    assert_no_repr(text)
    for shown in ("48.3 MiB", "cap 1.0 GiB", "4.8 MiB/s", "1.0 GiB in 1 connection", "500 ms ago"):
        assert shown in text, (shown, text)
    assert "10 txn · 4.0 MiB · 300 ms" in text and "1 from seq 1, 2 from seq 57" in text
    assert "5039056" not in text and "50643703" not in text


def test_a_target_that_is_not_connected_shows_so_not_zero_lag():
    gone = shipper_status(
        state="error",
        connected=False,
        reason="cannot connect: connection refused",
        lag_txns=0,
        lag_bytes=0,
        lag_seconds=0.0,
        last_contact=NOW - 12.0,
    )
    doc = status_document(source_raw(gone), "/srv/src", now=NOW)
    check_status(doc)
    t = doc["targets"][0]
    assert not t["connected"] and t["sent_seq"] is None
    for stage in ("sent_not_received", "received_not_flushed", "flushed_not_applied"):
        assert t["lag"][stage]["txns"] is None, stage
    text = status_text(doc)
    assert_no_repr(text)
    assert "not connected, last contact 12.0 s ago" in text, text
    assert "0 txn ·" not in text, text  # no zero lag for a target nobody hears


def test_initial_sync_progress_is_a_percentage_with_an_eta():
    sync = {"start_seq": 2, "blocks_total": 65536, "blocks_done": 16384, "blocks_sent": 9000,
            "bytes_sent": 36 << 20, "percent": 25.0, "seconds": 10.0}  # fmt: skip
    t = shipper_status(state="initial-sync", initial_sync=sync, received_seq=None)
    doc = status_document(source_raw(t), "/srv/src", now=NOW)
    check_status(doc)
    got = doc["targets"][0]["sync"]
    assert got["percent"] == 25.0 and got["eta_seconds"] == 30.0 and got["bytes"] == 36 << 20
    text = status_text(doc)
    assert_no_repr(text)
    assert "initial sync (copying) 25.0%: 16384 of 65536 blocks, 36.0 MiB, ETA 30.0 s" in text
    # Streaming again: the sync record of the past is not shown as progress.
    done = status_document(source_raw(shipper_status(initial_sync=sync)), "/srv/src", now=NOW)
    assert done["targets"][0]["sync"] is None and "initial sync" not in status_text(done)


def test_several_targets_get_a_table():
    a = shipper_status()
    b = shipper_status(address="127.0.0.1:7002", state="out-of-sync", connected=False,
                       reason="fell 2 GiB behind")  # fmt: skip
    text = status_text(status_document(source_raw(a, b), "/srv/src", now=NOW))
    assert_no_repr(text)
    header = next(line for line in text.splitlines() if "last contact" in line and "target" in line)
    assert "throughput" in header and "behind" in header
    assert "not connected" in text and "out-of-sync" in text


def test_replica_document_names_the_same_positions_and_lags():
    doc = status_document(replica_raw(), "/srv/rep", now=NOW)
    check_status(doc)
    s = doc["source"]
    check(s, LINK, "$.source")
    assert set(s) == set(status_document(source_raw(shipper_status()), "x")["targets"][0])
    assert (s["received_seq"], s["flushed_seq"], s["applied_seq"]) == (120, 118, 115)
    assert s["lag"]["received_not_flushed"] == {"txns": 2, "bytes": 8192, "seconds": None}
    assert s["lag"]["flushed_not_applied"]["txns"] == 3
    assert s["lag"]["sent_not_received"]["txns"] is None  # what was sent is the source's
    assert s["throughput_bps"] == 1000.5 and s["last_contact_age_seconds"] == 0.2
    text = status_text(doc)
    assert_no_repr(text)
    assert "received 120   flushed 118   applied 115" in text and "200 ms ago" in text

    waiting = status_document(replica_raw(state="waiting", source_address=""), "/srv/rep")
    check_status(waiting)
    assert waiting["source"] is None
    assert "none has connected yet" in status_text(waiting)


# -- events


def test_events_diff_sees_a_disconnect_and_a_reconnect():
    up = status_document(source_raw(shipper_status()), "/srv/src", now=NOW)
    down = status_document(
        source_raw(shipper_status(state="error", connected=False, reason="refused")), "/srv/src"
    )
    first = [e["event"] for e in events.exists(up)]
    assert first == ["exists", "exists"]
    got = events.diff(up, down)
    assert [e["event"] for e in got] == ["disconnected"], got
    assert got[0]["peer"] == "127.0.0.1:7001" and got[0]["previous"] == "streaming"
    assert got[0]["reason"] == "refused" and got[0]["version"] == 1
    back = [e["event"] for e in events.diff(down, up)]
    assert back == ["connected", "streaming"], back
    assert events.diff(up, up) == []
    # Down and up again between two looks: the connection count tells.
    again = status_document(source_raw(shipper_status(connections=2)), "/srv/src", now=NOW)
    assert [e["event"] for e in events.diff(up, again)] == ["disconnected", "connected"]


def test_events_of_syncs_fencing_and_promotion():
    sync = {"start_seq": 2, "blocks_total": 10, "blocks_done": 1, "bytes_sent": 1}
    syncing = status_document(source_raw(shipper_status(state="initial-sync",
                                                         initial_sync=sync)), "x")  # fmt: skip
    streaming = status_document(source_raw(shipper_status()), "x")
    assert [e["event"] for e in events.diff(syncing, streaming)] == [
        "initial-sync-finished",
        "streaming",
    ]
    fenced = status_document({**source_raw(shipper_status()), "fenced": "fenced by B"}, "x")
    got = events.diff(streaming, fenced)
    assert [e["event"] for e in got] == ["fenced"] and got[0]["reason"] == "fenced by B"
    rep = status_document(replica_raw(), "r")
    promoted = {**rep, "promoted": True}
    assert [e["event"] for e in events.diff(rep, promoted)] == ["promoted"]


def test_control_socket_streams_events_until_the_client_leaves(tmp_path):
    """A stream command over a real Unix socket: items arrive one line each, in order."""

    async def items(request):
        for i in range(3):
            yield {"n": i, "asked": request.get("x")}
            await trio.sleep(0.01)

    async def main():
        path = str(tmp_path / "control.sock")
        server = ControlServer(path, {}, {"events": items})
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            got = await trio.to_thread.run_sync(
                lambda: list(control_stream(path, {"cmd": "events", "x": 7}))
            )
            nursery.cancel_scope.cancel()
        return got

    got = trio.run(main)
    assert got == [{"ok": True, "event": {"n": i, "asked": 7}} for i in range(3)]


# -- metrics


def test_metrics_text_parses_with_the_three_lags_and_fuse_latencies():
    stats = RequestStats()
    for seconds in (0.00005, 0.003, 0.2, 20.0):
        stats.record("write", seconds, ok=True)
    stats.record("lookup", 0.0001, ok=False)
    doc = status_document(source_raw(shipper_status()), "/srv/src", now=NOW)
    collector = metrics.NodeCollector(lambda: doc, stats)
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    lag = {(s.labels["stage"]): s.value for s in families["mirrorfs_link_lag_transactions"].samples}
    assert lag == {"sent_not_received": 10, "flushed_not_applied": 5, "total": 17}
    pos = {s.labels["position"]: s.value for s in families["mirrorfs_link_position_seq"].samples}
    assert pos == {"source": 122, "sent": 120, "received": 110, "flushed": 110, "applied": 105}
    assert families["mirrorfs_log_bytes"].samples[0].value == 50643703
    assert families["mirrorfs_log_cap_bytes"].samples[0].value == 1 << 30
    req = {s.labels["op"]: s.value for s in families["mirrorfs_fuse_requests"].samples
           if s.name.endswith("_total")}  # fmt: skip
    assert req == {"write": 4, "lookup": 1}
    hist = [s for s in families["mirrorfs_fuse_request_duration_seconds"].samples
            if s.labels.get("op") == "write" and s.name.endswith("_bucket")]  # fmt: skip
    assert len(hist) == len(BOUNDS) + 1
    assert [s.value for s in hist if s.labels["le"] in ("0.0001", "0.25", "+Inf")] == [1, 3, 4]
    state = {s.labels["state"]: s.value for s in families["mirrorfs_link_state"].samples}
    assert state["streaming"] == 1 and sum(state.values()) == 1


@pytest.mark.parametrize(
    "text, says",
    [
        ("nonsense", "expected HOST:PORT"),
        ("127.0.0.1:http", "invalid port"),
        ("127.0.0.1:70000", "out of range"),
        ("example.com:9100", "an IP address or localhost"),
    ],
)
def test_a_bad_metrics_address_is_one_line(tmp_path, text, says):
    proc = run_cli("replica", str(tmp_path / "rep"), "--listen", "127.0.0.1:0", "--metrics", text)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "rep").exists()


def test_a_metrics_address_off_this_machine_needs_consent(tmp_path):
    # Refused by policy before anything binds or connects (no TCP off 127.0.0.1).
    proc = run_cli("replica", str(tmp_path / "rep"), "--listen", "127.0.0.1:0",
                   "--metrics", "192.0.2.1:9100")  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "not a loopback address" in proc.stderr and "--metrics-insecure" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert metrics.parse_metrics_address("[::1]:9100") == ("::1", 9100)
    assert metrics.is_loopback("::1") and metrics.is_loopback("localhost")


# -- the commands on stopped volumes


def test_reports_of_mkfs_fsck_status_and_demote(tmp_path):
    vol = str(tmp_path / "vol")
    got = json.loads(run_cli("mkfs", vol, "--size", "64M", "--json", check=True).stdout)
    assert got == {"version": 1, "command": "mkfs", "volume_dir": vol, "size_bytes": 64 << 20,
                   "block_size": 4096, "blocks": 16384, "inodes": 4096}  # fmt: skip
    human = run_cli("mkfs", str(tmp_path / "v2"), "--size", "64M", check=True).stdout
    assert "64.0 MiB in 16384 blocks of 4.0 KiB" in human and "67108864" not in human

    fsck = json.loads(run_cli("fsck", vol, "--json", check=True).stdout)
    assert (fsck["version"], fsck["command"], fsck["clean"], fsck["problems"]) == (
        1,
        "fsck",
        True,
        [],
    )
    assert isinstance(fsck["blocks_used"], int) and fsck["blocks_total"] == 16384

    st = json.loads(run_cli("status", vol, "--json", check=True).stdout)
    check_status(st)
    assert (st["role"], st["running"], st["state"], st["pid"]) == ("source", False, "stopped", None)
    text = run_cli("status", vol, check=True).stdout
    assert_no_repr(text)
    assert "stopped" in text and "1 from seq 1" in text

    out = run_cli("demote", str(tmp_path / "v2"), check=True).stdout
    assert_no_repr(out)
    assert "epoch history: 1 from seq 1" in out
    dem = json.loads(run_cli("demote", vol, "--json", check=True).stdout)
    assert (dem["version"], dem["command"], dem["epochs"]) == (1, "demote", [[1, 1]])
    assert isinstance(dem["demoted_at"], float) and isinstance(dem["last_seq"], int)
    st = json.loads(run_cli("status", vol, "--json", check=True).stdout)
    check_status(st)
    assert st["role"] == "target" and st["source"] is None


def test_events_of_a_stopped_node_is_one_line(tmp_path):
    vol = str(tmp_path / "vol")
    run_cli("mkfs", vol, "--size", "64M", check=True)
    proc = run_cli("events", vol)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == f"mirrorfs: error: no daemon is running for {vol}"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mirrorfs", *args]


def test_watch_redraws_in_place_under_a_pty(tmp_path):
    vol = str(tmp_path / "vol")
    run_cli("mkfs", vol, "--size", "64M", check=True)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(_cli("status", vol, "--watch", "0.2"), stdin=terminal,
                            stdout=terminal, stderr=terminal, cwd=REPO)  # fmt: skip
    os.close(terminal)
    out = b""
    try:
        deadline = time.monotonic() + 30
        while out.count(vol.encode()) < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    out += os.read(controller, 65536)
                except OSError:
                    break
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(controller)
    text = out.decode(errors="replace")
    assert text.count(vol) >= 3, text  # drawn, then redrawn at least twice
    assert "\x1b[" in text  # cursor movement: in place, not one block after another
    assert proc.returncode == 0


def test_watch_prints_blocks_when_not_a_terminal(tmp_path):
    vol = str(tmp_path / "vol")
    run_cli("mkfs", vol, "--size", "64M", check=True)
    proc = subprocess.Popen(_cli("status", vol, "--watch", "0.1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, text=True)  # fmt: skip
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        while sum(line.startswith("-- ") for line in lines) < 3:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            lines.append(line)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)
    text = "".join(lines)
    assert "\x1b[" not in text and text.count(f"{vol}: source, stopped") == 2
    assert_no_repr(text)
    both = run_cli("status", vol, "--watch", "--json")
    assert both.returncode == 1 and "mirrorfs events" in both.stderr
