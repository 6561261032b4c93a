"""Argument types and option groups of the command line (mirrorfs.cli builds the parser
from them): sizes, durations, addresses, and the options that several commands share."""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

from mirrorfs.daemon import DEFAULT_LOG_LEVEL, LOG_LEVELS, LOG_NONE, LOG_STDERR, LOG_SYSLOG
from mirrorfs.node import checkpoint_commands, commands, replica_command
from mirrorfs.repl.address import AddressError, parse_address, parse_listen
from mirrorfs.store.files import DAEMON_LOG_FILE

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``512M``, ``2G``, ``1T``, ``1.5G``, ``4096`` (binary suffixes) into bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"invalid size {text!r} (bytes, or a number with K, M, G or T)")
    number, suffix = m.groups()
    value = int(float(number) * _SUFFIXES[suffix.upper()])
    if value <= 0:
        raise ValueError(f"invalid size {text!r} (must be positive)")
    return value


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def address_arg(text: str) -> str:
    # (A ValueError of int() passes: argparse then says "invalid address_arg value".)
    try:
        parse_address(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def listen_arg(text: str) -> tuple[str, int]:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def duration_arg(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    mult = units.get(t[-1:])
    try:
        value = float(t[:-1] if mult else t) * (mult or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90, 15m, 1h)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def percent_arg(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r}") from None
    if not 0 <= value <= 50:
        raise argparse.ArgumentTypeError("must be between 0 and 50 (percent)")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def log_target_arg(text: str) -> str:
    """``--log``: syslog, stderr, none, or a file (absolute; its directory must exist)."""
    if text in (LOG_SYSLOG, LOG_STDERR, LOG_NONE):
        return text
    path = os.path.abspath(text)
    if os.path.isdir(path) or not os.path.isdir(os.path.dirname(path)):
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither syslog, stderr, none nor a file in an existing directory"
        )
    return path


def add_log_arguments(p: argparse.ArgumentParser) -> None:
    """Where a daemon (mount, replica) logs, and how much."""
    p.add_argument(
        "--log",
        type=log_target_arg,
        default=None,
        metavar="FILE|syslog|stderr|none",
        help="the daemon's log: a file (rotated; reopened on SIGHUP), syslog (journald), "
        f"stderr (with --foreground) or none (default: DIR/{DAEMON_LOG_FILE})",
    )
    p.add_argument(
        "--log-level", choices=LOG_LEVELS, default=DEFAULT_LOG_LEVEL, help="least level logged"
    )


def add_secret_arguments(p: argparse.ArgumentParser) -> None:
    """How a source authenticates to its targets: a secret, or --insecure off loopback."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--secret-file", metavar="FILE", help="shared secret for the targets (mode 0600)"
    )
    group.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback target without a secret"
    )


def add_tls_arguments(p: argparse.ArgumentParser) -> None:
    """TLS on the replication link (mirrorfs.repl.tls): all three options, or none."""
    group = p.add_argument_group(
        "TLS 1.3 on the replication link, certificates verified both ways (all three or none)"
    )
    group.add_argument("--tls-cert", metavar="FILE", help="this node's certificate (PEM)")
    group.add_argument("--tls-key", metavar="FILE", help="its private key (PEM, unencrypted)")
    group.add_argument(
        "--tls-ca", metavar="FILE", help="the CA certificate that signs every node's (PEM)"
    )


def add_replica_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``mirrorfs replica`` on the argparse subparser ``p`` (sets func)."""
    p.add_argument("dir", metavar="DIR", help="replica volume directory (created if missing)")
    p.add_argument(
        "--listen", required=True, type=listen_arg, metavar="HOST:PORT", help="TCP address"
    )
    p.add_argument(
        "--mount",
        metavar="MNT",
        default=None,
        help="mount the replica read-only here (an empty directory)",
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTS",
        help="FUSE options of the read-only mount, comma-separated (e.g. allow_other)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--secret-file", metavar="FILE", help="shared secret (mode 0600)")
    group.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback address without a secret"
    )
    add_tls_arguments(p)
    p.add_argument("--foreground", action="store_true", help="do not detach (systemd: Type=notify)")
    add_log_arguments(p)
    add_metrics_argument(p)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=replica_command.cmd_replica)


def add_node_arguments(sub: Any, common: argparse.ArgumentParser) -> None:
    """The node commands (mirrorfs.node.commands) on the subparsers ``sub``."""
    p = sub.add_parser("status", parents=[common], help="role, positions, lag per target")
    p.add_argument("dir", metavar="DIR", help="volume directory")
    add_json_argument(p)
    p.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        default=None,
        type=positive_float,
        metavar="SECONDS",
        help="redraw every SECONDS (default 2) until interrupted",
    )
    p.set_defaults(func=commands.cmd_status)

    p = sub.add_parser(
        "events", parents=[common], help="one JSON line per state change, until interrupted"
    )
    p.add_argument("dir", metavar="DIR", help="volume directory (a running node)")
    p.add_argument(
        "--interval",
        type=positive_float,
        default=0.2,
        metavar="SECONDS",
        help="how often the daemon looks for changes",
    )
    p.add_argument("--count", type=positive_int, default=None, help="exit after this many events")
    p.set_defaults(func=commands.cmd_events)

    p = sub.add_parser("verify", parents=[common], help="compare every target with the source")
    p.add_argument("dir", metavar="DIR", help="source volume directory (mounted)")
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=120.0,
        metavar="SECONDS",
        help="how long each target may take",
    )
    add_json_argument(p)
    p.set_defaults(func=commands.cmd_verify)

    p = sub.add_parser("mirror", parents=[common], help="add or remove a target of a source")
    p.add_argument("dir", metavar="DIR", help="source volume directory (mounted)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--add", metavar="HOST:PORT", help="start mirroring to this target")
    group.add_argument("--remove", metavar="HOST:PORT", help="stop mirroring to this target")
    p.add_argument(
        "--wait",
        nargs="?",
        const=3600.0,
        default=None,
        type=positive_float,
        metavar="SECONDS",
        help="with --add: follow the initial sync (a progress bar on a terminal) until the "
        "target streams, at most SECONDS (default 3600)",
    )
    add_json_argument(p)
    p.set_defaults(func=commands.cmd_mirror)

    p = sub.add_parser(
        "promote", parents=[common], help="make a replica the read-write source (new epoch)"
    )
    p.add_argument("dir", metavar="DIR", help="replica volume directory")
    p.add_argument(
        "--force",
        action="store_true",
        help="promote even while the source is connected or was heard in the last 10 s",
    )
    p.add_argument(
        "--mount",
        metavar="MNT",
        help="mount read-write here (default: where the replica daemon had it mounted)",
    )
    p.add_argument("--no-mount", action="store_true", help="promote only, do not mount")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=None,
        metavar="OPTS",
        help="FUSE options of the read-write mount, comma-separated (default: those the "
        "replica daemon's mount had, e.g. allow_other)",
    )
    p.add_argument(
        "--mirror",
        dest="mirrors",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="start mirroring the new source to this target at once (repeatable)",
    )
    add_secret_arguments(p)
    add_tls_arguments(p)
    add_metrics_argument(p, default="the replica daemon's, if it had one")
    add_json_argument(p)
    p.set_defaults(func=commands.cmd_promote)

    p = sub.add_parser(
        "demote", parents=[common], help="make a stopped old source a target (failback)"
    )
    p.add_argument("dir", metavar="DIR", help="source volume directory (not mounted)")
    add_json_argument(p)
    p.set_defaults(func=commands.cmd_demote)

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
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=None,
        metavar="OPTS",
        help="FUSE options of this node's read-only mount, comma-separated (default: those "
        "of DIR's mount now, e.g. allow_other)",
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="how long the target may take to catch up and answer",
    )
    add_json_argument(p)
    p.set_defaults(func=commands.cmd_switchover)


def add_json_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json", action="store_true", help="a JSON report (schema: docs/json.md) for programs"
    )


def metrics_arg(text: str) -> tuple[str, int]:
    from mirrorfs.node.metrics import MetricsAddressError, parse_metrics_address

    try:
        return parse_metrics_address(text)
    except MetricsAddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_metrics_argument(p: argparse.ArgumentParser, default: str = "none") -> None:
    p.add_argument(
        "--metrics",
        type=metrics_arg,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (loopback unless "
        f"--metrics-insecure; default: {default})",
    )
    p.add_argument(
        "--metrics-insecure",
        action="store_true",
        help="allow a --metrics address that is not loopback (the endpoint has no auth)",
    )


# -- entry point


def add_checkpoint_arguments(sub: Any, common: argparse.ArgumentParser) -> None:
    """``mirrorfs checkpoint create|list|delete|mount`` (mirrorfs.node.checkpoint_commands)."""
    p = sub.add_parser(
        "checkpoint", parents=[common], help="point-in-time read-only views of a volume"
    )
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = acts.add_parser("create", parents=[common], help="checkpoint the volume now (source)")
    a.add_argument("dir", metavar="DIR")
    a.add_argument("name", metavar="NAME")
    a = acts.add_parser("list", parents=[common], help="name, seq, time, space held")
    a.add_argument("dir", metavar="DIR")
    a.add_argument("--json", action="store_true")
    a = acts.add_parser("delete", parents=[common], help="delete a checkpoint (source)")
    a.add_argument("dir", metavar="DIR")
    a.add_argument("name", metavar="NAME")
    a = acts.add_parser(
        "rollback", parents=[common], help="return a stopped source to a checkpoint"
    )
    a.add_argument("dir", metavar="DIR")
    a.add_argument("name", metavar="NAME")
    a.add_argument(
        "--delete-later",
        action="store_true",
        help="delete the checkpoints newer than NAME (default: keep them)",
    )
    a = acts.add_parser("mount", parents=[common], help="mount a checkpoint read-only")
    a.add_argument("dir", metavar="DIR")
    a.add_argument("name", metavar="NAME")
    a.add_argument("mountpoint", metavar="MOUNTPOINT")
    a.add_argument("--foreground", action="store_true", help="do not detach")
    a.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=checkpoint_commands.cmd_checkpoint)
