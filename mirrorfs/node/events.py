"""``mirrorfs events DIR``: one JSON line per state change, until interrupted (like
``drbdsetup events2``).

The command subscribes over the control socket (``{"cmd": "events"}``; mirrorfs.node.control
streams the replies). The daemon compares status documents (mirrorfs.node.status_model)
taken every ``interval`` seconds, and at once when the node says something happened
(``EventSource.poke``), and sends what changed:

    exists            the state at subscription (the node, then each link)
    connected         a link came up                disconnected   a link went down
    streaming         a link streams transactions   out-of-sync    a target fell behind the log
    initial-sync-started / initial-sync-finished    resync-started / resync-finished
    fenced            a newer epoch fenced this source, or a target refused it as old
    failsafe          the volume went read-only after a storage fault
    promoted          this replica became a source (the daemon then exits)
    state             any other change of a link's or the node's state

Each line: ``{"version": 1, "event": ..., "time": <unix seconds>, "volume_dir", "role",
"peer" (the link's address, "" for the node), "state", "previous", "reason",
"applied_seq"}``. ``diff`` is pure.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import trio

from mirrorfs.node.json_report import SCHEMA_VERSION

Snapshot = Callable[[], dict[str, Any]]
MIN_INTERVAL = 0.05


def _links(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Links by a stable key: a target's address; "source" for a replica's source, whose
    address (an ephemeral port) changes with every connection."""
    out = {t["address"]: t for t in doc.get("targets") or []}
    if doc.get("source"):
        out["source"] = doc["source"]
    return out


def _event(doc: dict[str, Any], event: str, **fields: Any) -> dict[str, Any]:
    return {
        "version": SCHEMA_VERSION,
        "event": event,
        "time": round(time.time(), 3),
        "volume_dir": doc.get("volume_dir", ""),
        "role": doc.get("role", ""),
        "peer": "",
        "state": doc.get("state", ""),
        "previous": "",
        "reason": "",
        "applied_seq": doc.get("applied_seq", doc.get("committed_seq")),
        **fields,
    }


def _link_event(doc: dict[str, Any], link: dict[str, Any], event: str, previous: str):
    return _event(
        doc,
        event,
        peer=link["address"],
        state=link["state"],
        previous=previous,
        reason=link.get("reason", ""),
        applied_seq=link.get("applied_seq"),
    )


def exists(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The ``exists`` lines of a new subscription."""
    yield _event(doc, "exists")
    for link in _links(doc).values():
        yield _link_event(doc, link, "exists", "")


_ENTERED = {
    "streaming": "streaming",
    "out-of-sync": "out-of-sync",
    "fenced": "fenced",
    "initial-sync": "initial-sync-started",
    "resyncing": "resync-started",
}
_LEFT = {"initial-sync": "initial-sync-finished", "resyncing": "resync-finished"}


def _link_changes(doc, old: dict[str, Any] | None, new: dict[str, Any]) -> Iterator[dict]:
    before = old["state"] if old else ""
    was_up = bool(old and old["connected"])
    if old and was_up and new["connected"] and new["connections"] > old["connections"]:
        # It went down and came back between two looks: say so all the same.
        yield _link_event(doc, {**old, "connected": False}, "disconnected", before)
        was_up = False
    if new["connected"] and not was_up:
        yield _link_event(doc, new, "connected", before)
    if before == new["state"]:
        return
    if before in _LEFT and new["state"] == "streaming":
        yield _link_event(doc, new, _LEFT[before], before)
    if not new["connected"] and was_up:
        yield _link_event(doc, new, "disconnected", before)
    named = _ENTERED.get(new["state"])
    if named is not None:
        yield _link_event(doc, new, named, before)
    elif new["connected"] or was_up is new["connected"]:
        yield _link_event(doc, new, "state", before)


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """The events between two status documents of one node (pure)."""
    out: list[dict[str, Any]] = []
    for key, flag in (("promoted", "promoted"), ("fenced", "fenced"), ("failed", "failsafe")):
        if new.get(key) and not old.get(key):
            reason = new[key] if isinstance(new[key], str) else ""
            out.append(_event(new, flag, previous=old.get("state", ""), reason=reason))
    node_changed = new.get("state") != old.get("state") and new.get("role") == "source"
    if node_changed and not any(e["event"] in ("fenced", "failsafe") for e in out):
        out.append(_event(new, "state", previous=old.get("state", "")))
    before = _links(old)
    for key, link in _links(new).items():
        out.extend(_link_changes(new, before.get(key), link))
    for key, link in before.items():
        if key not in _links(new):
            gone = {**link, "state": "removed", "connected": False}
            out.append(_link_event(new, gone, "removed", link["state"]))
    return out


class EventSource:
    """What a daemon's ``events`` stream watches: its snapshot, and a poke for news."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self._news = trio.Event()

    def poke(self) -> None:
        """Something happened: look now rather than at the next interval (sync, no await)."""
        self._news.set()

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The control socket's ``events`` stream (until the subscriber goes away)."""
        try:
            interval = max(MIN_INTERVAL, float(request.get("interval", 0.2)))
        except (TypeError, ValueError):
            interval = 0.2
        doc = self.snapshot()
        for event in exists(doc):
            yield event
        while True:
            with trio.move_on_after(interval):
                await self._news.wait()
            if self._news.is_set():
                self._news = trio.Event()
            new = self.snapshot()
            for event in diff(doc, new):
                yield event
            doc = new


# ------------------------------------------------------------------------ the command


def cmd_events(args: Any) -> int:
    """Print the events of the node serving DIR until interrupted (or ``--count``)."""
    from mirrorfs.daemon import CliError as CommandError
    from mirrorfs.node.control import ControlError, control_stream, socket_path

    volume_dir = os.path.abspath(args.dir)
    if not os.path.isdir(volume_dir):
        raise CommandError(f"{volume_dir}: no such volume directory")
    request = {"cmd": "events", "interval": args.interval}
    seen = 0
    try:
        for reply in control_stream(socket_path(volume_dir), request):
            if not reply.get("ok"):
                raise CommandError(str(reply.get("error", "the daemon refused to stream events")))
            print(json.dumps(reply["event"], sort_keys=True), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                return 0
    except ControlError as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0
    # The daemon closed the stream: it exited (stopped, promoted, switched over).
    end = {"version": SCHEMA_VERSION, "event": "ended", "time": round(time.time(), 3),
           "volume_dir": volume_dir}  # fmt: skip
    print(json.dumps(end, sort_keys=True), flush=True)
    sys.stdout.flush()
    return 0
