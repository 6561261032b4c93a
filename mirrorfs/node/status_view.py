"""``mirrorfs status`` for people: one screen per node, from the status document.

Units through humanize (``1.2 GiB``, ``48.0 MiB/s``, ``3.2 seconds ago``), layout through
rich (a key/value grid per node and per link, a table when a source has several targets).
Nothing here prints a Python container: every value is formatted on purpose, so that the
operator never reads ``{...}`` or ``[...]``. ``--watch`` redraws with rich's Live on a
terminal and prints one block after another otherwise (``watch_status``).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import humanize
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

_STAGE_TITLES = {
    "sent_not_received": "sent, not received",
    "received_not_flushed": "received, not flushed",
    "flushed_not_applied": "flushed, not applied",
    "total": "committed, not applied",
}


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else humanize.naturalsize(n, binary=True)


def fmt_rate(bps: float | None) -> str:
    return "-" if bps is None else f"{humanize.naturalsize(bps, binary=True)}/s"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1.0:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60.0:
        return f"{seconds:.1f} s"
    return humanize.precisedelta(seconds, minimum_unit="seconds", format="%0.0f")


def fmt_age(seconds: float | None) -> str:
    return "never" if seconds is None else f"{fmt_duration(seconds)} ago"


def fmt_seq(seq: int | None) -> str:
    return "-" if seq is None else str(seq)


def fmt_lag(lag: dict[str, Any]) -> str:
    """``3 txn · 48.0 KiB · 200 ms``; parts this end cannot know are left out."""
    if lag.get("txns") is None:
        return "unknown here"
    parts = [f"{lag['txns']} txn"]
    if lag.get("bytes") is not None:
        parts.append(fmt_bytes(lag["bytes"]))
    if lag.get("seconds") is not None:
        parts.append(fmt_duration(lag["seconds"]))
    return " · ".join(parts)


def fmt_sync(sync: dict[str, Any] | None) -> str:
    if not sync:
        return ""
    what = "initial sync" if sync["kind"] == "initial-sync" else "resync"
    pct = "" if sync.get("percent") is None else f" {sync['percent']:.1f}%"
    blocks = f"{sync['blocks_done']}" + (
        f" of {sync['blocks_total']} blocks" if sync.get("blocks_total") else " blocks"
    )
    eta = sync.get("eta_seconds")
    tail = f", ETA {fmt_duration(eta)}" if eta is not None else ""
    return f"{what} ({sync['phase']}){pct}: {blocks}, {fmt_bytes(sync.get('bytes'))}{tail}"


def fmt_epochs(epochs: list[list[int]]) -> str:
    return ", ".join(f"{e} from seq {s}" for e, s in epochs) or "-"


def _grid() -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    return grid


def _row(grid: Table, key: str, value: str) -> None:
    grid.add_row(Text(key), Text(value))


def _link_state(link: dict[str, Any]) -> str:
    state = link["state"]
    if not link["connected"]:
        state += f" (not connected, last contact {fmt_age(link['last_contact_age_seconds'])})"
    if link.get("reason"):
        state += f": {link['reason']}"
    return state


def render_link(title: str, link: dict[str, Any]) -> RenderableType:
    """One link (a target of a source, the source of a replica) as a key/value grid."""
    grid = _grid()
    node = f" (node {link['node_id']})" if link.get("node_id") else ""
    _row(grid, title, f"{link['address'] or 'unknown'}{node}")
    _row(grid, "  state", _link_state(link))
    sent = f"sent {link['sent_seq']}   " if link["sent_seq"] is not None else ""
    if title == "target" and link["sent_seq"] is None:
        sent = "sent -   "
    _row(
        grid,
        "  positions",
        f"{sent}received {fmt_seq(link['received_seq'])}   "
        f"flushed {fmt_seq(link['flushed_seq'])}   applied {fmt_seq(link['applied_seq'])}",
    )
    lags = link["lag"]
    if link["connected"]:
        for name in ("sent_not_received", "received_not_flushed", "flushed_not_applied"):
            _row(grid, f"  {_STAGE_TITLES[name]}", fmt_lag(lags[name]))
        _row(grid, f"  {_STAGE_TITLES['total']}", fmt_lag(lags["total"]))
    else:
        behind = lags["total"]["txns"]
        if link["state"] == "fenced":
            text = "nothing to ship: the target follows a newer epoch"
        elif behind is None:
            text = "unknown"
        elif behind == 0:
            text = "unknown (caught up as of last contact)"
        else:
            text = f"at least {behind} txn (as of last contact)"
        _row(grid, "  behind", text)
    _row(grid, "  last contact", fmt_age(link["last_contact_age_seconds"]))
    _row(
        grid,
        "  throughput",
        f"{fmt_rate(link['throughput_bps'])} ({fmt_bytes(link['bytes_transferred'])} in "
        f"{link['connections']} connection(s))",
    )
    if link.get("sync"):
        _row(grid, "  progress", fmt_sync(link["sync"]))
    return grid


def render_targets_table(targets: list[dict[str, Any]]) -> Table:
    """Several targets at a glance, one row each."""
    table = Table(title="targets", title_justify="left", expand=False)
    for column in ("target", "state", "applied", "behind", "last contact", "throughput"):
        table.add_column(column, no_wrap=column in ("target", "applied"))
    for t in targets:
        total = t["lag"]["total"]
        if not t["connected"]:
            behind = "not connected"
        elif t.get("sync"):
            behind = fmt_sync(t["sync"])
        else:
            behind = fmt_lag(total)
        table.add_row(
            Text(t["address"]),
            Text(t["state"]),
            Text(fmt_seq(t["applied_seq"])),
            Text(behind),
            Text(fmt_age(t["last_contact_age_seconds"])),
            Text(fmt_rate(t["throughput_bps"])),
        )
    return table


def render_status(doc: dict[str, Any]) -> RenderableType:
    """The whole screen of one node."""
    head = f"{doc['volume_dir']}: {doc['role'] or 'unknown role'}, {doc['state']}"
    if doc.get("epoch") is not None:
        head += f", epoch {doc['epoch']}"
    if doc.get("pid"):
        head += f" (pid {doc['pid']})"
    parts: list[RenderableType] = [Text(head, style="bold")]
    grid = _grid()
    _row(grid, "volume", f"{doc['volume_uuid'] or '-'}   node {doc['node_id'] or '-'}")
    if doc["role"] == "target" and doc["running"]:
        _row(
            grid,
            "positions",
            f"received {fmt_seq(doc['received_seq'])}   flushed {fmt_seq(doc['flushed_seq'])}   "
            f"applied {fmt_seq(doc['applied_seq'])}   checkpointed "
            f"{fmt_seq(doc['checkpointed_seq'])}",
        )
    else:
        committed = "" if doc["committed_seq"] is None else f"committed {doc['committed_seq']}   "
        _row(grid, "positions", f"{committed}checkpointed {fmt_seq(doc['checkpointed_seq'])}")
    log = doc["log"]
    cap = ""
    if doc["role"] == "source" and doc["running"]:
        cap = f" (cap {fmt_bytes(log['cap_bytes'])})" if log.get("cap_bytes") else " (no cap)"
    where = f", from seq {log['first_seq']}" if log.get("first_seq") is not None else ""
    if log.get("segments") is not None:
        where += f", {log['segments']} segment(s)"
    _row(grid, "log", f"{fmt_bytes(log['bytes'])}{cap}{where}")
    _row(grid, "epochs", fmt_epochs(doc["epochs"]))
    if doc["role"] == "target" and doc["running"]:
        _row(grid, "consistent", "yes" if doc["consistent"] else "no (initial sync or resync)")
    if doc.get("sync_state") and doc["sync_state"] != "consistent":
        _row(grid, "sync state", doc["sync_state"])
    if doc.get("listen"):
        _row(grid, "listening", doc["listen"] + (" (TLS)" if doc["tls"] else ""))
    if doc["mountpoint"]:
        mode = "read-only" if doc["read_only"] else "read-write"
        shown = "mounted" if doc["mounted"] else "not mounted yet"
        _row(grid, "mount", f"{doc['mountpoint']} ({mode}, {shown})")
        if doc.get("mount_options"):
            _row(grid, "mount options", ",".join(doc["mount_options"]))
    for key in ("failed", "fenced", "mount_error", "last_refused"):
        if doc.get(key):
            _row(grid, key.replace("_", " "), doc[key])
    for a in doc.get("archives") or []:
        note = f": {a['note']}" if a.get("note") else ""
        n, after = a.get("records"), a.get("fork_seq") or 0
        what = (
            f"{n} valid transaction(s) cut with a hole at seq {after + 1}"
            if a.get("kind") == "hole"
            else f"{n} diverged transaction(s) after seq {after}"
        )
        _row(grid, "archive", f"{a.get('path')} (epoch {a.get('epoch')}, {what}){note}")
    for c in doc.get("checkpoints") or []:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["time"]))
        _row(
            grid,
            "checkpoint",
            f"{c['name']}: seq {c['seq']}, {when}, holds {fmt_bytes(c['held_bytes'])}",
        )
    parts.append(grid)
    targets = doc.get("targets") or []
    if len(targets) > 1:
        parts.append(render_targets_table(targets))
    for t in targets:
        parts.append(render_link("target", t))
    if doc.get("source"):
        parts.append(render_link("source", doc["source"]))
    elif doc["role"] == "target" and doc["running"]:
        parts.append(Text("source: none has connected yet"))
    if doc["role"] == "source" and doc["running"] and not targets:
        parts.append(Text("targets: none (mirrorfs mirror DIR --add HOST:PORT)"))
    return Group(*parts)


def status_text(doc: dict[str, Any], width: int = 400) -> str:
    """The screen as plain text (no colours), for a pipe or a file: wide, so that a long
    reason stays on one line for grep."""
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, highlight=False, emoji=False)
    console.print(render_status(doc))
    return "\n".join(line.rstrip() for line in out.getvalue().rstrip("\n").split("\n"))


def watch_status(
    fetch: Callable[[], dict[str, Any]], interval: float, *, console: Console | None = None
) -> None:
    """Redraw ``fetch()``'s document every ``interval`` seconds until interrupted: in place
    on a terminal (rich Live), as successive blocks with a time stamp otherwise."""
    console = console or Console(highlight=False, emoji=False)
    if console.is_terminal:
        from rich.live import Live

        with Live(render_status(fetch()), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render_status(fetch()), refresh=True)
    while True:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"-- {stamp}\n{status_text(fetch())}", flush=True)
        time.sleep(interval)
