"""The status document (schema version 1): one shape for a source and a replica.

The daemons answer the control socket's ``status`` with what their parts know (the
shippers', the receiver's, the volume's figures, under their own names); ``status_document``
turns that, or a stopped node's node.json, into the document that ``mirrorfs status --json``
prints, that ``mirrorfs status`` renders (mirrorfs.node.status_view), that the metrics
endpoint exports and that ``mirrorfs events`` watches. Pure: no I/O, the clock is an argument.

A *link* is one replication connection seen from one end: on a source one per target
(``targets``), on a replica its source (``source``). Both ends use the same keys::

    sent_seq       the last TXN the source put on the wire        (source only)
    received_seq   the last TXN the target took off the wire      (the source knows only
                   what the target acknowledged, which is after its fsync: = flushed_seq)
    flushed_seq    the last TXN durable in the target's log
    applied_seq    the last TXN applied to the target's block file

and three lags like pg_stat_replication's write, flush and replay lag, each in transactions,
bytes and seconds (None where this end cannot know; docs/json.md says which):
``sent_not_received``, ``received_not_flushed``, ``flushed_not_applied``, plus ``total``
(committed on the source and not applied on the target). A link that is not connected has
None stage lags: what it last reported is history, not lag, and ``total`` is a lower bound.
"""

from __future__ import annotations

import re
import time
from typing import Any

from mirrorfs.node.json_report import SCHEMA_VERSION

CONNECTED = frozenset({"initial-sync", "resyncing", "streaming"})
#: A shipper between two attempts says ``error`` and ``connecting`` during one, turn about:
#: both are one state for the operator, trying to reach the target (``reason``: what the
#: last attempt met), so that the screen, the metrics and the events do not flicker.
RETRYING = frozenset({"connecting", "error"})
STAGES = ("sent_not_received", "received_not_flushed", "flushed_not_applied")

_UNKNOWN: dict[str, Any] = {"txns": None, "bytes": None, "seconds": None}


_ERRNO = re.compile(r"\[Errno \d+\]\s*")


def reason_text(text: Any) -> str:
    """A reason as people read it: ``[Errno 104] Connection reset`` -> ``Connection reset``."""
    return _ERRNO.sub("", str(text or ""))


def lag(txns: int | None, nbytes: int | None, seconds: float | None) -> dict[str, Any]:
    """One lag figure: transactions, bytes (int) and seconds (float), None when unknown."""
    return {
        "txns": None if txns is None else int(txns),
        "bytes": None if nbytes is None else int(nbytes),
        "seconds": None if seconds is None else float(seconds),
    }


def _age(when: float | None, now: float) -> float | None:
    return round(max(0.0, now - when), 3) if when else None


def _eta(done: float, total: float, seconds: float | None) -> float | None:
    """Seconds left at the pace so far (None before any progress)."""
    if not seconds or done <= 0 or total <= 0:
        return None
    return round(max(0.0, seconds * (total - done) / done), 1)


def progress(
    kind: str, phase: str, done: int, total: int, nbytes: int, seconds: float | None
) -> dict[str, Any]:
    """An initial sync's or a resync's progress (``sync`` of a link)."""
    pct = 100.0 * done / total if total else None
    return {
        "kind": kind,
        "phase": phase,
        "blocks_done": int(done),
        "blocks_total": int(total),
        "percent": None if pct is None else round(min(pct, 100.0), 1),
        "bytes": int(nbytes),
        "seconds": None if seconds is None else float(seconds),
        "eta_seconds": _eta(done, total, seconds),
    }


def _source_sync(t: dict[str, Any]) -> dict[str, Any] | None:
    state = t.get("state")
    sync = t.get("initial_sync")
    if state == "initial-sync" and sync:
        return progress(
            "initial-sync",
            "copying",
            sync.get("blocks_done", 0),
            sync.get("blocks_total", 0),
            sync.get("bytes_sent", 0),
            sync.get("seconds"),
        )
    r = t.get("resync")
    if state == "resyncing" and r and r.get("phase") != "done":
        phase = r.get("phase", "comparing")
        if phase == "comparing":
            done, total = r.get("blocks_compared", 0), r.get("blocks_total", 0)
        else:
            done, total = r.get("blocks_sent", 0), r.get("blocks_differing", 0)
        return progress("resync", phase, done, total, r.get("bytes_sent", 0), r.get("seconds"))
    return None


def source_link(t: dict[str, Any], now: float) -> dict[str, Any]:
    """A shipper's status (mirrorfs.repl.shipper) as a link of the document."""
    state = str(t.get("state", ""))
    connected = bool(t.get("connected", state in CONNECTED)) and state in CONNECTED
    if state in RETRYING:
        state = "connecting"
    stages = t.get("stages") or {}
    lags: dict[str, Any] = {}
    for name in STAGES:
        got = stages.get(name) if connected else None
        lags[name] = lag(got["txns"], got["bytes"], got["seconds"]) if got else dict(_UNKNOWN)
    total = lag(t.get("lag_txns"), t.get("lag_bytes"), t.get("lag_seconds"))
    lags["total"] = total
    received = t.get("received_seq")
    return {
        "address": str(t.get("address", "")),
        "node_id": str(t.get("target_node_id", "")),
        "state": state,
        "connected": connected,
        "reason": reason_text(t.get("reason")),
        "source_seq": t.get("source_seq"),
        "sent_seq": t.get("sent_seq") if connected else None,
        "received_seq": received,
        "flushed_seq": received,
        "applied_seq": t.get("applied_seq"),
        "lag": lags,
        "lag_txns": total["txns"],
        "lag_bytes": total["bytes"],
        "lag_seconds": total["seconds"],
        "last_contact": float(t.get("last_contact") or 0.0) or None,
        "last_contact_age_seconds": _age(t.get("last_contact"), now),
        "throughput_bps": float(t.get("throughput_bps") or 0.0),
        "bytes_transferred": int(t.get("bytes_sent") or 0),
        "txns_sent": int(t.get("txns_sent") or 0),
        "txns_applied": None,
        "bytes_applied": None,
        "resyncs": int(t.get("resyncs") or 0),
        "sync": _source_sync(t),
        "connections": int(t.get("connections") or 0),
    }


def _target_sync(raw: dict[str, Any]) -> dict[str, Any] | None:
    state = raw.get("state")
    if state == "initial-sync":
        return progress(
            "initial-sync",
            "copying",
            raw.get("sync_blocks_copied", 0),
            raw.get("sync_blocks_total", 0),
            raw.get("bytes_received", 0),
            raw.get("sync_seconds"),
        )
    r = raw.get("resync")
    if state == "resyncing" and r:
        # The target sees blocks arrive, not how many will: no total, no percent.
        return progress("resync", "receiving", r.get("blocks_staged", 0), 0,
                        r.get("bytes_staged", 0), None)  # fmt: skip
    return None


def target_link(raw: dict[str, Any], now: float) -> dict[str, Any] | None:
    """A replica daemon's view of its source (None before any source connected)."""
    state = str(raw.get("state", ""))
    if not raw.get("source_address") and state not in CONNECTED:
        return None
    connected = state in CONNECTED
    flushed, applied = raw.get("received_seq"), raw.get("applied_seq")
    wire = raw.get("wire_seq", flushed)
    known = [s for s in (raw.get("source_last_seq"), wire) if s is not None]
    source_seq = max(known) if known else None
    lags: dict[str, Any] = {name: dict(_UNKNOWN) for name in STAGES}
    if connected and None not in (wire, flushed, applied):
        unflushed = max(0, wire - flushed)
        pending = int(raw.get("wire_bytes_pending") or 0)
        lags["received_not_flushed"] = lag(
            unflushed, pending if pending or not unflushed else None, None
        )
        lags["flushed_not_applied"] = lag(max(0, flushed - applied), None, None)
    total_txns = None
    if source_seq is not None and applied is not None:
        total_txns = max(0, source_seq - applied)
    # Caught up means no bytes and no seconds behind, but only while connected: a source out
    # of reach may have committed since (the transactions stay a lower bound).
    nothing = connected and total_txns == 0
    total = lag(total_txns, 0 if nothing else None, 0.0 if nothing else None)
    lags["total"] = total
    return {
        "address": str(raw.get("source_address", "")),
        "node_id": str(raw.get("source_node_id", "")),
        "state": state,
        "connected": connected,
        "reason": reason_text(raw.get("last_error")),
        "source_seq": source_seq,
        "sent_seq": None,
        "received_seq": wire,
        "flushed_seq": flushed,
        "applied_seq": applied,
        "lag": lags,
        "lag_txns": total["txns"],
        "lag_bytes": total["bytes"],
        "lag_seconds": total["seconds"],
        "last_contact": float(raw.get("last_contact") or 0.0) or None,
        "last_contact_age_seconds": _age(raw.get("last_contact"), now),
        "throughput_bps": float(raw.get("throughput") or 0.0),
        "bytes_transferred": int(raw.get("bytes_received") or 0),
        "txns_sent": None,
        "txns_applied": int(raw.get("txns_applied") or 0),
        "bytes_applied": int(raw.get("bytes_applied") or 0),
        "resyncs": int(raw.get("resyncs") or 0),
        "sync": _target_sync(raw),
        "connections": int(raw.get("sessions") or 0),
    }


def _node_state(raw: dict[str, Any]) -> str:
    if not raw.get("running", True):
        return "stopped"
    if raw.get("role") == "target":
        return str(raw.get("state") or "waiting")
    if raw.get("fenced"):
        return "fenced"
    if raw.get("failed"):
        return "failsafe"
    return "serving"


def status_document(
    raw: dict[str, Any], volume_dir: str, *, now: float | None = None
) -> dict[str, Any]:
    """The version-1 status document of a node from its daemon's (or node.json's) figures."""
    now = time.time() if now is None else now
    running = bool(raw.get("running", True))
    role = str(raw.get("role", ""))
    doc: dict[str, Any] = {
        "version": SCHEMA_VERSION,
        "command": "status",
        "volume_dir": volume_dir,
        "role": role,
        "running": running,
        "state": _node_state(raw),
        "pid": raw.get("pid") if running else None,
        "volume_uuid": str(raw.get("volume_uuid") or ""),
        "node_id": str(raw.get("node_id") or ""),
        "epoch": raw.get("epoch"),
        "epochs": [list(e) for e in raw.get("epochs") or []],
        "committed_seq": raw.get("committed_seq"),
        "checkpointed_seq": raw.get("checkpointed_seq"),
        "received_seq": None,
        "flushed_seq": None,
        "applied_seq": None,
        "log": {
            "bytes": int(raw.get("log_bytes") or 0),
            "cap_bytes": raw.get("log_cap_bytes"),
            "first_seq": raw.get("log_first_seq"),
            "kept_from": raw.get("log_kept_from"),
            "segments": raw.get("log_segments"),
        },
        "log_bytes": int(raw.get("log_bytes") or 0),
        "log_kept_from": raw.get("log_kept_from"),
        "mountpoint": str(raw.get("mountpoint") or ""),
        "mounted": bool(raw.get("mounted", role == "source" and running)),
        "mount_options": [str(o) for o in raw.get("mount_options") or []],
        "read_only": bool(raw.get("read_only", role == "target")),
        "failed": reason_text(raw.get("failed") or raw.get("volume_failed")),
        "fenced": reason_text(raw.get("fenced")),
        "mount_error": reason_text(raw.get("mount_error")),
        "last_refused": reason_text(raw.get("last_refused")),
        "listen": str(raw.get("listen") or ""),
        "tls": bool(raw.get("tls", False)),
        "consistent": raw.get("consistent", raw.get("sync_state", "consistent") == "consistent"),
        "sync_state": str(raw.get("sync_state") or ("consistent" if running else "")),
        "archives": [dict(a) for a in raw.get("archives") or []],
        "checkpoints": [
            {
                "name": str(c["name"]),
                "seq": int(c["seq"]),
                "time": float(c["time"]),
                "held_blocks": int(c["held_blocks"]),
                "held_bytes": int(c["held_bytes"]),
            }
            for c in raw.get("checkpoints") or []
        ],
        "targets": [],
        "source": None,
    }
    if role == "target" and running:
        flushed, applied = raw.get("received_seq"), raw.get("applied_seq")
        doc["received_seq"] = raw.get("wire_seq", flushed)
        doc["flushed_seq"] = flushed
        doc["applied_seq"] = applied
        doc["committed_seq"] = applied
        doc["source"] = target_link(raw, now)
        doc["consistent"] = bool(raw.get("consistent"))
    elif role == "source":
        doc["targets"] = [source_link(t, now) for t in raw.get("targets") or []]
    return doc
