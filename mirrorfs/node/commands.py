"""Node commands: status, verify, mirror, promote (control socket or stopped), demote,
switchover (the source's side is mirrorfs.node.switchover).

``status`` also works on a stopped node: it then reads node.json and the log's bounds
without taking the volume's lock (a running daemon is asked instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from typing import Any

from mirrorfs.daemon import PROG, CliError
from mirrorfs.daemon import describe as one_line
from mirrorfs.node.control import ControlError, control_request, socket_path
from mirrorfs.node.handover import wait_lock_free
from mirrorfs.repl.address import parse_address, parse_listen
from mirrorfs.store.files import LOG_DIR

log = logging.getLogger(__name__)


class CommandError(CliError):
    """A one-line user error of a node command."""


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
    logdir = os.path.join(volume_dir, LOG_DIR)
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
    if st.get("source_address"):
        last = float(st.get("last_contact") or 0.0)
        heard = f"last heard {max(time.time() - last, 0.0):.1f}s ago" if last else "never heard"
        node = f" (node {st['source_node_id']})" if st.get("source_node_id") else ""
        lines.append(f"  source: {st['source_address']}{node}, {heard}")
    for a in st.get("archives") or []:
        n, after = a.get("records"), a.get("fork_seq") or 0
        what = (
            f"{n} valid transaction(s) cut with a hole at seq {after + 1}"
            if a.get("kind") == "hole"
            else f"{n} diverged transaction(s) after seq {after}"
        )
        lines.append(
            f"  archive: {a.get('path')} (epoch {a.get('epoch')}, {what})"
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
    if not wait_lock_free(volume_dir, timeout):
        raise CommandError(f"the replica daemon for {volume_dir} did not exit")


def cmd_promote(args: argparse.Namespace) -> int:
    from mirrorfs.node.promote import PromoteError, describe, promote_stopped

    volume_dir = os.path.abspath(args.dir)
    if not os.path.isdir(volume_dir):
        raise CommandError(f"{volume_dir}: no such volume directory")
    _check_promoted_mirrors(args)
    t0 = time.monotonic()
    try:
        request = {"cmd": "promote", "force": bool(args.force)}
        reply = control_request(socket_path(volume_dir), request, timeout=120.0)
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
        _mount_promoted(volume_dir, mountpoint, args)
        print(f"  mounted read-write at {mountpoint} ({time.monotonic() - t0:.2f}s after promote)")
    elif args.mirrors:
        print(
            "  (--mirror takes effect when the volume is mounted: mirrorfs mount DIR MNT "
            "--mirror ...)"
        )
    return 0


def _check_promoted_mirrors(args: argparse.Namespace) -> None:
    """Refuse, before promoting, to mirror the new source unauthenticated off this machine,
    or with TLS files that cannot be used. (A malformed address is reported by the mount
    after the promotion, as before.)"""
    from mirrorfs.repl.auth import PeerPolicyError, check_peer_policy
    from mirrorfs.repl.tls import TlsError, load_tls, tls_from_args

    try:
        files = tls_from_args(args)
        if files is not None:
            load_tls(files)
    except TlsError as exc:
        raise CommandError(f"{exc}; nothing was promoted") from None
    secret = b"given" if args.secret_file else None
    for address in args.mirrors:
        try:
            host, port = parse_address(address)
        except ValueError:
            continue
        try:
            check_peer_policy(host, port, secret, args.insecure, tls=files is not None)
        except PeerPolicyError as exc:
            raise CommandError(f"{exc}; nothing was promoted") from None


def _mount_promoted(volume_dir: str, mountpoint: str, args: argparse.Namespace) -> None:
    """``mirrorfs mount volume_dir mountpoint [--mirror ...]`` after a promotion (with the
    promote command's secret and TLS options); a failure is printed as the mount's own
    error, then as the promotion's (CommandError)."""
    from mirrorfs.node.volume_commands import MountArgs, cmd_mount

    failed = f"promoted, but mounting {mountpoint} read-write failed"
    mirrors = args.mirrors
    for address in mirrors:
        try:
            parse_address(address)
        except ValueError as exc:  # what ``mirrorfs mount --mirror`` says of it
            print(
                f"{PROG}: error: argument --mirror: {exc} (see '{PROG} mount --help')",
                file=sys.stderr,
            )
            raise CommandError(failed) from None
    try:
        cmd_mount(
            MountArgs(
                volume_dir,
                mountpoint,
                mirrors=mirrors,
                secret_file=args.secret_file,
                insecure=args.insecure,
                tls_cert=getattr(args, "tls_cert", None),
                tls_key=getattr(args, "tls_key", None),
                tls_ca=getattr(args, "tls_ca", None),
            )
        )
    except (CliError, OSError) as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        raise CommandError(failed) from None


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


# -- switchover


def _check_listen(text: str) -> None:
    """Refuse an address the new source could not connect to, or that is taken here."""
    try:
        host, port = parse_listen(text)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if host in ("", "0.0.0.0", "::") or port == 0:
        raise CommandError(
            f"--listen {text}: the new source connects there; give this node's address and a "
            "fixed port"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise CommandError(f"cannot listen on {text}: {exc.strerror or exc}") from None


def cmd_switchover(args: argparse.Namespace) -> int:
    """Ask the source serving DIR to switch over (mirrorfs.node.switchover), then wait until
    both new roles serve."""
    volume_dir = os.path.abspath(args.dir)
    if not os.path.isdir(volume_dir):
        raise CommandError(f"{volume_dir}: no such volume directory")
    _check_listen(args.listen)
    mount = "" if args.no_mount else (os.path.abspath(args.mount) if args.mount else None)
    request = {
        "cmd": "switchover",
        "to": args.to,
        "listen": args.listen,
        "mount": mount,
        "timeout": args.timeout,
    }
    t0 = time.monotonic()
    try:
        reply = control_request(socket_path(volume_dir), request, timeout=3 * args.timeout + 10)
    except ControlError as exc:
        raise CommandError(str(exc)) from None
    if not reply.get("ok"):
        raise CommandError(str(reply.get("error", "the source refused the switchover")))
    report = reply["switchover"]
    # Both new roles: this node's replica daemon answers, and the new source streams to it.
    deadline = time.monotonic() + 3 * args.timeout + 30
    st: dict[str, Any] = {}
    while True:
        try:
            got = control_request(socket_path(volume_dir), {"cmd": "status"}, timeout=5.0)
            st = got.get("status", {}) if got.get("ok") else {}
        except ControlError:
            st = {}
        if st.get("role") == "target" and st.get("state") == "streaming":
            break
        if time.monotonic() > deadline:
            raise CommandError(
                f"switched over at seq {report['seq']} (epoch {report['epoch']} on "
                f"{args.to}), but the new source is not streaming to {args.listen} yet "
                f"(this node: {st.get('state') or 'not running'}; see {volume_dir}/mirrorfs.log)"
            )
        time.sleep(0.05)
    report["streaming_after_seconds"] = round(time.monotonic() - t0, 3)
    report["mounted_read_only"] = bool(st.get("mounted"))
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
        return 0
    print(
        f"switched over {volume_dir} to {report['target']} at seq {report['seq']}: "
        f"{report['target']} is the source in epoch {report['epoch']} from seq "
        f"{report['epoch_start_seq']}"
    )
    print(
        f"  writes held on the old source for {report['writes_held_seconds']:.3f} s "
        f"({report['requests_held']} request(s), answered EROFS: write on the new source)"
    )
    where = f", mounted read-only at {report['mountpoint']}" if report["mountpoint"] else ""
    print(f"  {volume_dir}: target listening on {report['listen']}{where}")
    print(f"  the new source streams to it ({report['streaming_after_seconds']:.2f} s in all)")
    return 0
