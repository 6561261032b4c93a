"""Node commands: status, verify, mirror, promote (control socket or stopped), demote,
switchover (mirrorfs.node.switchover).

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

    p = sub.add_parser(
        "promote", parents=[common], help="make a replica the read-write source (new epoch)"
    )
    p.add_argument("dir", metavar="DIR", help="replica volume directory")
    p.add_argument(
        "--mount",
        metavar="MNT",
        help="mount read-write here (default: where the replica daemon had it mounted)",
    )
    p.add_argument("--no-mount", action="store_true", help="promote only, do not mount")
    p.add_argument(
        "--mirror",
        dest="mirrors",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="start mirroring the new source to this target at once (repeatable)",
    )
    p.add_argument("--secret-file", metavar="FILE", help="shared secret for the targets")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser(
        "demote", parents=[common], help="make a stopped old source a target (failback)"
    )
    p.add_argument("dir", metavar="DIR", help="source volume directory (not mounted)")
    p.set_defaults(func=cmd_demote)

    p = sub.add_parser(
        "switchover",
        parents=[common],
        help="planned role swap: a target becomes the source, this source its target",
    )
    p.add_argument("dir", metavar="DIR", help="source volume directory (mounted)")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="the target to promote")
    p.add_argument(
        "--listen",
        required=True,
        metavar="HOST:PORT",
        help="where this node listens as the new source's target (the new source connects)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--mount", metavar="MNT", help="mount read-only here (default: where DIR is mounted)"
    )
    group.add_argument("--no-mount", action="store_true", help="no read-only mount")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_switchover)


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
        "log_kept_from": state.keep_log_from,
        "archives": state.archives,
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
    for a in st.get("archives") or []:
        lines.append(
            f"  archive: {a.get('path')} (epoch {a.get('epoch')}, {a.get('records')} diverged "
            f"transaction(s) after seq {a.get('fork_seq')})"
            + (f": {a['note']}" if a.get("note") else "")
        )
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


def _wait_unlocked(volume_dir: str, timeout: float = 120.0) -> None:
    """Wait until no process holds the volume (the daemon has unmounted and exited)."""
    import fcntl

    deadline = time.monotonic() + timeout
    path = os.path.join(volume_dir, "lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise CommandError(f"the replica daemon for {volume_dir} did not exit") from None
        finally:
            os.close(fd)
        time.sleep(0.05)


def cmd_promote(args: argparse.Namespace) -> int:
    from mirrorfs.node.promote import PromoteError, describe, promote_stopped

    volume_dir = os.path.abspath(args.dir)
    if not os.path.isdir(volume_dir):
        raise CommandError(f"{volume_dir}: no such volume directory")
    t0 = time.monotonic()
    try:
        reply = control_request(socket_path(volume_dir), {"cmd": "promote"}, timeout=120.0)
    except ControlError as exc:
        if "no daemon is running" not in str(exc):
            raise CommandError(str(exc)) from None
        reply = None
    if reply is not None:
        if not reply.get("ok"):
            raise CommandError(str(reply.get("error", "the replica refused to promote")))
        report = reply["promoted"]
        _wait_unlocked(volume_dir)
    else:
        try:
            report = promote_stopped(volume_dir)
        except PromoteError as exc:
            raise CommandError(str(exc)) from None
        report["mountpoint"] = ""
    mountpoint = "" if args.no_mount else (args.mount or report.get("mountpoint") or "")
    report["mountpoint"] = ""
    for line in describe(report):
        print(line)
    if mountpoint:
        from mirrorfs.cli import main as cli_main

        argv = ["mount", volume_dir, mountpoint]
        for address in args.mirrors:
            argv += ["--mirror", address]
        if args.secret_file:
            argv += ["--secret-file", args.secret_file]
        if cli_main(argv) != 0:
            raise CommandError(f"promoted, but mounting {mountpoint} read-write failed")
        print(f"  mounted read-write at {mountpoint} ({time.monotonic() - t0:.2f}s after promote)")
    elif args.mirrors:
        print(
            "  (--mirror takes effect when the volume is mounted: mirrorfs mount DIR MNT "
            "--mirror ...)"
        )
    return 0


def cmd_switchover(args: argparse.Namespace) -> int:
    from mirrorfs.node import switchover

    return switchover.cmd_switchover(args)


def cmd_demote(args: argparse.Namespace) -> int:
    from mirrorfs.node.demote import DemoteError, demote_stopped, describe

    volume_dir = os.path.abspath(args.dir)
    if not os.path.isdir(volume_dir):
        raise CommandError(f"{volume_dir}: no such volume directory")
    try:
        report = demote_stopped(volume_dir)
    except DemoteError as exc:
        raise CommandError(str(exc)) from None
    for line in describe(report):
        print(line)
    return 0
