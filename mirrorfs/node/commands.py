"""Node commands: status, verify, mirror, promote (control socket or stopped), demote,
switchover (the source's side is mirrorfs.node.switchover).

``status`` also works on a stopped node: it then reads node.json and the log's bounds
without taking the volume's lock (a running daemon is asked instead).
"""

from __future__ import annotations

import argparse
import contextlib
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
from mirrorfs.node.json_report import print_json
from mirrorfs.node.json_report import report as json_report
from mirrorfs.repl.address import parse_address, parse_listen
from mirrorfs.store.files import LOG_DIR, NODE_FILE

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


def node_status(volume_dir: str) -> dict[str, Any]:
    """The status document (mirrorfs.node.status_model) of the node serving ``volume_dir``,
    or of the stopped node there."""
    from mirrorfs.node.status_model import status_document

    try:
        raw = _ask(volume_dir, {"cmd": "status"}, timeout=5.0)["status"]
        raw.setdefault("running", True)
    except CommandError as exc:
        if "no daemon is running" not in str(exc):
            raise
        raw = _offline_status(volume_dir)
    from mirrorfs.node.checkpoint_commands import checkpoint_rows

    with contextlib.suppress(Exception):  # a volume being made has no block file yet
        raw["checkpoints"] = checkpoint_rows(volume_dir)
    return status_document(raw, volume_dir)


def cmd_status(args: argparse.Namespace) -> int:
    from mirrorfs.node.status_view import status_text, watch_status

    volume_dir = os.path.abspath(args.dir)
    if not os.path.isdir(volume_dir):
        raise CommandError(f"{volume_dir}: no such volume directory")
    doc = node_status(volume_dir)
    if args.watch is not None:
        if args.json:
            raise CommandError("--watch draws for people; for JSON use 'mirrorfs events DIR'")
        try:
            watch_status(lambda: node_status(volume_dir), args.watch)
        except KeyboardInterrupt:
            return 0
    if args.json:
        print_json(doc)
    else:
        print(status_text(doc))
    return 0


def require_source(volume_dir: str, what: str) -> None:
    """Refuse a command that only makes sense on a source when DIR is a replica, whether
    its daemon runs (it would refuse too) or not (rather than "no daemon is running")."""
    from mirrorfs.store.errors import StoreError
    from mirrorfs.store.nodestate import NodeState, Role

    if not os.path.exists(os.path.join(volume_dir, NODE_FILE)):
        return
    try:
        role = NodeState.load(volume_dir).role
    except (StoreError, OSError, ValueError):
        return  # the daemon, or the lack of one, says what is wrong
    if role == Role.TARGET.value:
        raise CommandError(
            f"{volume_dir} is a replica (target): {what} only makes sense on a source; "
            "run it on the source node"
        )


def cmd_events(args: argparse.Namespace) -> int:
    """``mirrorfs events DIR`` (mirrorfs.node.events: imported only for this command)."""
    from mirrorfs.node.events import cmd_events as follow_events

    return follow_events(args)


def cmd_verify(args: argparse.Namespace) -> int:
    volume_dir = os.path.abspath(args.dir)
    require_source(volume_dir, "verify")
    t0 = time.monotonic()
    from mirrorfs.node.progress import spinner

    request = {"cmd": "verify", "timeout": args.timeout}
    with contextlib.nullcontext() if args.json else spinner(f"verifying {volume_dir}"):
        reply = _ask(volume_dir, request, timeout=args.timeout * 4)
    results = reply.get("results", [])
    ok = bool(results) and all(r.get("ok") for r in results)
    if args.json:
        print_json(
            json_report(
                "verify",
                volume_dir=volume_dir,
                ok=ok,
                seconds=round(time.monotonic() - t0, 3),
                results=[_verify_result(r) for r in results],
            )
        )
        return 0 if ok else 1
    if not results:
        print(f"{volume_dir}: no targets to verify")
        return 1
    for r in results:
        print(r.get("summary") or f"{r['target']}: {r.get('error', 'failed')}")
    print(
        f"verify: {'all targets identical' if ok else 'DIFFERENCES FOUND'} "
        f"({time.monotonic() - t0:.1f}s)"
    )
    return 0 if ok else 1


def _verify_result(r: dict[str, Any]) -> dict[str, Any]:
    """One target's verify result in the report (docs/json.md)."""
    differing = [[int(a), int(n)] for a, n in r.get("differing") or []]
    return {
        "target": str(r.get("target", "")),
        "ok": bool(r.get("ok")),
        "seq": r.get("seq"),
        "blocks": r.get("blocks"),
        "blocks_differing": sum(n for _, n in differing),
        "differing_ranges": differing,
        "error": str(r.get("error") or ""),
        "summary": str(r.get("summary") or r.get("error") or ""),
    }


def cmd_mirror(args: argparse.Namespace) -> int:
    from mirrorfs.node.status_model import source_link

    volume_dir = os.path.abspath(args.dir)
    require_source(volume_dir, "mirror --add" if args.add else "mirror --remove")
    if args.add:
        reply = _ask(volume_dir, {"cmd": "mirror-add", "address": args.add})
        target = source_link(reply.get("target") or {"address": args.add}, time.time())
        if args.wait is not None:
            target = _wait_streaming(volume_dir, target["address"], args.wait)
        if args.json:
            print_json(
                json_report(
                    "mirror", volume_dir=volume_dir, action="add", address=args.add, target=target
                )  # fmt: skip
            )
        else:
            print(f"mirroring to {args.add}: {target['state'] or 'starting'}")
    else:
        _ask(volume_dir, {"cmd": "mirror-remove", "address": args.remove})
        if args.json:
            print_json(
                json_report(
                    "mirror",
                    volume_dir=volume_dir,
                    action="remove",
                    address=args.remove,
                    target=None,
                )  # fmt: skip
            )
        else:
            print(f"stopped mirroring to {args.remove}")
    return 0


def _wait_streaming(volume_dir: str, address: str, timeout: float) -> dict[str, Any]:
    """Follow a new target's initial sync (a bar on a terminal) until it streams."""
    from mirrorfs.node.progress import ProgressTimeout, follow_link

    def fetch() -> dict[str, Any] | None:
        targets = node_status(volume_dir)["targets"]
        return next((t for t in targets if t["address"] == address), None)

    try:
        return follow_link(fetch, address, timeout=timeout)
    except ProgressTimeout as exc:
        raise CommandError(f"target {address}: {exc} after {timeout:g} s") from None


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
    _check_promoted_metrics(args)
    t0 = time.monotonic()
    with _slow(args, f"promoting {volume_dir}"):
        report = _promote(volume_dir, args, promote_stopped, PromoteError)
    mountpoint = "" if args.no_mount else (args.mount or report.get("mountpoint") or "")
    report["mountpoint"] = ""
    # The replica mount's FUSE options (allow_other, ...) unless -o says otherwise.
    options = list(report.get("mount_options") or []) if args.options is None else args.options
    if args.metrics is None:  # the replica daemon's metrics endpoint, unless --metrics is given
        args.metrics, args.metrics_insecure = _carried_metrics(report.get("metrics_argv") or [])
    if args.json:
        if mountpoint:
            _mount_promoted(volume_dir, mountpoint, args, options)
        print_json(_promote_report(volume_dir, report, mountpoint, options, time.monotonic() - t0))
        return 0
    for line in describe(report):
        print(line)
    if mountpoint:
        _mount_promoted(volume_dir, mountpoint, args, options)
        with_options = f" with -o {','.join(options)}" if options else ""
        print(
            f"  mounted read-write at {mountpoint}{with_options} "
            f"({time.monotonic() - t0:.2f}s after promote)"
        )
    elif args.mirrors:
        print(
            "  (--mirror takes effect when the volume is mounted: mirrorfs mount DIR MNT "
            "--mirror ...)"
        )
    return 0


def _slow(args: argparse.Namespace, text: str) -> Any:
    from mirrorfs.node.progress import slow_notice

    return contextlib.nullcontext() if args.json else slow_notice(text)


def _promote(volume_dir: str, args: argparse.Namespace, promote_stopped, error) -> dict:
    """Promote through the running daemon (which then exits), or in place when stopped."""
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
        return report
    try:
        report = promote_stopped(volume_dir)
    except error as exc:
        raise CommandError(str(exc)) from None
    report["mountpoint"] = ""
    return report


def _promote_report(
    volume_dir: str,
    promoted: dict[str, Any],
    mountpoint: str,
    options: list[str],
    seconds: float,
) -> dict[str, Any]:
    return json_report(
        "promote",
        volume_dir=volume_dir,
        old_epoch=promoted.get("old_epoch"),
        epoch=promoted.get("epoch"),
        epoch_start_seq=promoted.get("epoch_start_seq"),
        last_applied_seq=promoted.get("last_applied_seq"),
        applied_from_log=promoted.get("applied_from_log"),
        old_source=str(promoted.get("old_source") or ""),
        promoted_at=float(promoted.get("promoted_at") or 0.0),
        mountpoint=mountpoint,
        mounted=bool(mountpoint),
        mount_options=list(options) if mountpoint else [],
        seconds=round(seconds, 3),
    )


def _check_promoted_metrics(args: argparse.Namespace) -> None:
    """Refuse, before promoting, a --metrics address the mount would refuse."""
    from mirrorfs.node.metrics import MetricsAddressError, check_metrics_policy

    try:
        check_metrics_policy(args.metrics, args.metrics_insecure)
    except MetricsAddressError as exc:
        raise CommandError(f"{exc}; nothing was promoted") from None


def _carried_metrics(argv: list[str]) -> tuple[tuple[str, int] | None, bool]:
    """``--metrics`` of the replica daemon (its ``metrics_argv``), for the promoted mount."""
    from mirrorfs.node.metrics import parse_metrics_address

    if len(argv) < 2 or argv[0] != "--metrics":
        return None, False
    return parse_metrics_address(argv[1]), "--metrics-insecure" in argv


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


def _mount_promoted(
    volume_dir: str, mountpoint: str, args: argparse.Namespace, options: list[str]
) -> None:
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
                options=list(options),
                mirrors=mirrors,
                secret_file=args.secret_file,
                insecure=args.insecure,
                tls_cert=getattr(args, "tls_cert", None),
                tls_key=getattr(args, "tls_key", None),
                tls_ca=getattr(args, "tls_ca", None),
                metrics=args.metrics,
                metrics_insecure=args.metrics_insecure,
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
    if args.json:
        print_json(
            json_report(
                "demote",
                volume_dir=volume_dir,
                last_seq=report["last_seq"],
                epoch=report["epoch"],
                epochs=[list(e) for e in report["epochs"]],
                log_kept_from=report["log_kept_from"],
                demoted_at=float(report["demoted_at"]),
            )
        )
        return 0
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
    require_source(volume_dir, "switchover")
    _check_listen(args.listen)
    mount = "" if args.no_mount else (os.path.abspath(args.mount) if args.mount else None)
    request = {
        "cmd": "switchover",
        "to": args.to,
        "listen": args.listen,
        "mount": mount,
        "options": args.options,
        "timeout": args.timeout,
    }
    t0 = time.monotonic()
    with _slow(args, f"switching over {volume_dir} to {args.to}"):
        report = _switch(volume_dir, request, args)
    report["streaming_after_seconds"] = round(time.monotonic() - t0, 3)
    if args.json:
        print_json(json_report("switchover", volume_dir=volume_dir, **report))
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


def _switch(volume_dir: str, request: dict[str, Any], args: argparse.Namespace) -> dict:
    """Ask the source to switch over, then wait for both new roles: this node's replica
    daemon answers, and the new source streams to it."""
    try:
        reply = control_request(socket_path(volume_dir), request, timeout=3 * args.timeout + 10)
    except ControlError as exc:
        raise CommandError(str(exc)) from None
    if not reply.get("ok"):
        raise CommandError(str(reply.get("error", "the source refused the switchover")))
    report = reply["switchover"]
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
    report["mounted_read_only"] = bool(st.get("mounted"))
    return report
