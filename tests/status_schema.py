"""The JSON schema (version 1) of ``mirrorfs status --json`` and friends, as docs/json.md
states it, for the tests to check reports field by field."""

from __future__ import annotations

import re
from typing import Any

INT, FLOAT, STR, BOOL = int, float, str, bool
OPT_INT, OPT_FLOAT = (int, type(None)), (float, type(None))

LAG = {"txns": OPT_INT, "bytes": OPT_INT, "seconds": OPT_FLOAT}
SYNC = {
    "kind": STR,
    "phase": STR,
    "blocks_done": INT,
    "blocks_total": INT,
    "percent": OPT_FLOAT,
    "bytes": INT,
    "seconds": OPT_FLOAT,
    "eta_seconds": OPT_FLOAT,
}
LINK = {
    "address": STR,
    "node_id": STR,
    "state": STR,
    "connected": BOOL,
    "reason": STR,
    "source_seq": OPT_INT,
    "sent_seq": OPT_INT,
    "received_seq": OPT_INT,
    "flushed_seq": OPT_INT,
    "applied_seq": OPT_INT,
    "lag": {
        "sent_not_received": LAG,
        "received_not_flushed": LAG,
        "flushed_not_applied": LAG,
        "total": LAG,
    },
    "lag_txns": OPT_INT,
    "lag_bytes": OPT_INT,
    "lag_seconds": OPT_FLOAT,
    "last_contact": OPT_FLOAT,
    "last_contact_age_seconds": OPT_FLOAT,
    "throughput_bps": FLOAT,
    "bytes_transferred": INT,
    "txns_sent": OPT_INT,
    "txns_applied": OPT_INT,
    "bytes_applied": OPT_INT,
    "resyncs": INT,
    "sync": (SYNC, type(None)),
    "connections": INT,
}
STATUS = {
    "version": INT,
    "command": STR,
    "volume_dir": STR,
    "role": STR,
    "running": BOOL,
    "state": STR,
    "pid": OPT_INT,
    "volume_uuid": STR,
    "node_id": STR,
    "epoch": OPT_INT,
    "epochs": list,
    "committed_seq": OPT_INT,
    "checkpointed_seq": OPT_INT,
    "received_seq": OPT_INT,
    "flushed_seq": OPT_INT,
    "applied_seq": OPT_INT,
    "log": {
        "bytes": INT,
        "cap_bytes": OPT_INT,
        "first_seq": OPT_INT,
        "kept_from": OPT_INT,
        "segments": OPT_INT,
    },
    "log_bytes": INT,
    "log_kept_from": OPT_INT,
    "mountpoint": STR,
    "mounted": BOOL,
    "mount_options": list,
    "read_only": BOOL,
    "failed": STR,
    "fenced": STR,
    "mount_error": STR,
    "last_refused": STR,
    "listen": STR,
    "tls": BOOL,
    "consistent": BOOL,
    "sync_state": STR,
    "archives": list,
    "checkpoints": list,
    "targets": list,
    "source": (LINK, type(None)),
}


def check(doc: Any, schema: Any, where: str = "$") -> None:
    """Assert that ``doc`` has exactly the keys of ``schema``, each of its type."""
    if isinstance(schema, tuple) and any(isinstance(s, dict) for s in schema):
        if doc is None and type(None) in schema:
            return
        schema = next(s for s in schema if isinstance(s, dict))
    if isinstance(schema, dict):
        assert isinstance(doc, dict), f"{where}: {doc!r} is not an object"
        assert set(doc) == set(schema), (
            f"{where}: keys differ: extra {sorted(set(doc) - set(schema))}, "
            f"missing {sorted(set(schema) - set(doc))}"
        )
        for key, sub in schema.items():
            check(doc[key], sub, f"{where}.{key}")
        return
    types = schema if isinstance(schema, tuple) else (schema,)
    if float in types and isinstance(doc, int) and not isinstance(doc, bool):
        raise AssertionError(f"{where}: {doc!r} is an integer, seconds must be floats")
    if bool not in types and isinstance(doc, bool):
        raise AssertionError(f"{where}: {doc!r} is a boolean")
    assert isinstance(doc, types), f"{where}: {doc!r} is not {types}"


def check_status(doc: dict[str, Any]) -> None:
    check(doc, STATUS)
    assert doc["version"] == 1 and doc["command"] == "status"
    for i, t in enumerate(doc["targets"]):
        check(t, LINK, f"$.targets[{i}]")
    for e in doc["epochs"]:
        assert len(e) == 2 and all(isinstance(x, int) for x in e), doc["epochs"]


_REPR = re.compile(r"[{}\[\]]")


def assert_no_repr(text: str) -> None:
    """No ``{`` or ``[`` (of a Python repr) anywhere in human output."""
    m = _REPR.search(text)
    if m is not None:
        around = text[max(0, m.start() - 60) : m.start() + 60]
        raise AssertionError(f"a Python repr in human output: ...{around!r}")
