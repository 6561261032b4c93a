"""Commands that talk to a running node through its control socket: status, verify, mirror.

``status`` also works on a stopped node: it then reads node.json and the log's bounds
without taking the volume's lock (a running daemon is asked instead).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from mirrorfs.node.control import ControlError, control_request, socket_path


class CommandError(Exception):
    """A one-line user error."""


def add_arguments(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common], help="role, positions, lag per target")
    p.add_argument("dir", metavar="DIR", help="volume directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("verify", parents=[common], help="compare every target with the source")
    p.add_argument("dir", metavar="DIR", help="source volume directory (mounted)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("mirror", parents=[common], help="add or remove a target of a source")
    p.add_argument("dir", metavar="DIR", help="source volume directory (mounted)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--add", metavar="HOST:PORT")
    group.add_argument("--remove", metavar="HOST:PORT")
    p.set_defaults(func=cmd_mirror)


def _ask(volume_dir: str, cmd: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    try:
        reply = control_request(socket_path(volume_dir), cmd, timeout=timeout)
    except ControlError as exc:
        raise CommandError(str(exc)) from None
    if not reply.get("ok"):
        raise CommandError(str(reply.get("error", "the daemon refused the request")))
    return reply


def _offline_status(volume_dir: str) -> dict[str, Any]:
    from mirrorfs.store.nodestate import NodeState

    state = NodeState.load(volume_dir)
    logdir = os.path.join(volume_dir, "log")
    segments = sorted(n for n in os.listdir(logdir) if n.endswith(".seg"))
    size = sum(os.path.getsize(os.path.join(logdir, n)) for n in segments)
    return {
        "role": state.role,
        "running": False,
        "volume_uuid": state.volume_uuid,
        "node_id": state.node_id,
        "epoch": state.epoch,
        "epochs": state.epochs,
        "checkpointed_seq": state.checkpointed_seq,
        "sync_state": state.sync_state or "consistent",
        "log_segments": len(segments),
        "log_bytes": size,
    }


def cmd_status(args: argparse.Namespace) -> int:
    volume_dir = os.path.abspath(args.dir)
    if not os.path.isdir(volume_dir):
        raise CommandError(f"{volume_dir}: no such volume directory")
    try:
        status = _ask(volume_dir, {"cmd": "status"}, timeout=5.0)["status"]
        status.setdefault("running", True)
    except CommandError as exc:
        if "no daemon is running" not in str(exc):
            raise
        status = _offline_status(volume_dir)
    if args.json:
        print(json.dumps(status, indent=1, sort_keys=True))
    else:
        print(format_status(volume_dir, status))
    return 0


def _fmt_seconds(value: Any) -> str:
    try:
        return f"{float(value):.2f}s"
    except (TypeError, ValueError):
        return "-"


def format_status(volume_dir: str, st: dict[str, Any]) -> str:
    """Human-readable status lines."""
    lines = [f"{volume_dir}: {st.get('role', '?')}" + ("" if st.get("running") else " (stopped)")]
    for key in (
        "volume_uuid",
        "node_id",
        "epoch",
        "committed_seq",
        "checkpointed_seq",
        "received_seq",
        "applied_seq",
        "state",
        "sync_state",
        "mountpoint",
        "listen",
        "log_bytes",
        "failed",
        "mount_error",
    ):
        if key in st and st[key] not in ("", None):
            lines.append(f"  {key.replace('_', ' ')}: {st[key]}")
    for t in st.get("targets", []):
        reason = f" ({t['reason']})" if t.get("reason") else ""
        lines.append(f"  target {t.get('address')}: {t.get('state')}{reason}")
        sync = t.get("initial_sync")
        if sync:
            lines.append(f"    initial sync: {sync}")
        lines.append(
            f"    received {t.get('received_seq')} applied {t.get('applied_seq')}"
            f"  lag {t.get('lag_txns', '-')} txn / {t.get('lag_bytes', '-')} bytes"
            f" / {_fmt_seconds(t.get('lag_seconds'))}"
            f"  throughput {t.get('throughput_bps', '-')} B/s"
        )
    return "\n".join(lines)


def cmd_verify(args: argparse.Namespace) -> int:
    volume_dir = os.path.abspath(args.dir)
    t0 = time.monotonic()
    reply = _ask(volume_dir, {"cmd": "verify", "timeout": args.timeout}, timeout=args.timeout * 4)
    results = reply.get("results", [])
    if args.json:
        print(json.dumps(results, indent=1))
    elif not results:
        print(f"{volume_dir}: no targets to verify")
    for r in results:
        if not args.json:
            print(r.get("summary") or f"{r['target']}: {r.get('error', 'failed')}")
    if not results:
        return 1
    ok = all(r.get("ok") for r in results)
    if not args.json:
        print(
            f"verify: {'all targets identical' if ok else 'DIFFERENCES FOUND'} "
            f"({time.monotonic() - t0:.1f}s)"
        )
    return 0 if ok else 1


def cmd_mirror(args: argparse.Namespace) -> int:
    volume_dir = os.path.abspath(args.dir)
    if args.add:
        reply = _ask(volume_dir, {"cmd": "mirror-add", "address": args.add})
        print(f"mirroring to {args.add}: {reply.get('target', {}).get('state', 'starting')}")
    else:
        _ask(volume_dir, {"cmd": "mirror-remove", "address": args.remove})
        print(f"stopped mirroring to {args.remove}")
    return 0
