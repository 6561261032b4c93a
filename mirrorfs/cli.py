"""The ``mirrorfs`` command line: the argument parser of every command, and the dispatch.

The commands themselves are functions in mirrorfs.node (``volume_commands``: mkfs, mount,
umount, fsck; ``replica_command``: replica; ``commands``: status, verify, mirror, promote,
demote, switchover). Every user error ends as one line ``mirrorfs: error: ...`` on stderr
and a non-zero exit status (1; 2 for bad arguments and for unexpected errors, whose
traceback is printed only with ``--debug``). Heavy modules are imported by the command that
needs them, so that ``--help`` and argument errors work even without FUSE.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import mirrorfs
from mirrorfs.daemon import (  # CliError: cli.CliError too
    DEFAULT_LOG_LEVEL,
    LOG_LEVELS,
    LOG_NONE,
    LOG_STDERR,
    LOG_SYSLOG,
    PROG,
    CliError,
    describe,
    root_cause,
)
from mirrorfs.node import commands, replica_command, stop, volume_commands
from mirrorfs.node.control import ControlError
from mirrorfs.repl.address import AddressError, parse_address, parse_listen
from mirrorfs.repl.wire import ReplError
from mirrorfs.store.errors import StoreError
from mirrorfs.store.files import DAEMON_LOG_FILE

log = logging.getLogger(__name__)

DEFAULT_INODE_RATIO = 16384

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


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _address_arg(text: str) -> str:
    # (A ValueError of int() passes: argparse then says "invalid _address_arg value".)
    try:
        parse_address(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _listen_arg(text: str) -> tuple[str, int]:
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _log_target_arg(text: str) -> str:
    """``--log``: syslog, stderr, none, or a file (absolute; its directory must exist)."""
    if text in (LOG_SYSLOG, LOG_STDERR, LOG_NONE):
        return text
    path = os.path.abspath(text)
    if os.path.isdir(path) or not os.path.isdir(os.path.dirname(path)):
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither syslog, stderr, none nor a file in an existing directory"
        )
    return path


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, when it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or not action.option_strings
            or default in (None, False, True, "", [], argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default: %(default)s)"


class _MainHelpFormatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The top-level help: the grouped command list in the epilog keeps its layout."""


#: ``mirrorfs --help`` lists the commands in these groups (others under "other").
COMMAND_GROUPS = {
    "volume": ("mkfs", "mount", "umount", "fsck", "stop"),
    "mirroring": ("replica", "mirror"),
    "failover": ("promote", "switchover", "demote"),
    "inspection": ("status", "verify", "events"),
}
EXIT_CODES = (
    "exit status: 0 success; 1 an error (one line on stderr), differences found by verify, "
    "problems found by fsck; 2 bad arguments or an unexpected error; 130 interrupted"
)


def _command_list(sub: Any) -> str:
    """The epilog of ``mirrorfs --help``: the commands by group, each with its help line."""
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    grouped = {name for names in COMMAND_GROUPS.values() for name in names}
    groups = [(g, [n for n in names if n in helps]) for g, names in COMMAND_GROUPS.items()]
    groups.append(("other", [n for n in helps if n not in grouped]))
    width = max(map(len, helps)) + 2
    lines = []
    for group, names in groups:
        if names:
            lines.append(f"{group} commands:")
            lines += [f"  {name:<{width}}{helps[name]}" for name in names]
            lines.append("")
    lines.append(f"'{PROG} COMMAND --help' describes a command's options.")
    lines.append(EXIT_CODES)
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse, but an argument error is one line, not usage plus a message."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; ``args.func(args)`` runs the chosen one."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="verbose logging; tracebacks for unexpected errors",
    )
    parser = _Parser(
        prog=PROG,
        description="A mirrored filesystem volume for Linux.",
        formatter_class=_MainHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {mirrorfs.__version__}")
    parser.add_argument("--debug", action="store_true", default=False, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, help=argparse.SUPPRESS
    )
    # After add_subparsers, which derives the commands' "mirrorfs CMD" from the usage.
    parser.usage = f"{PROG} [-h] [--version] COMMAND [ARGS...]"

    p = sub.add_parser("mkfs", parents=[common], help="create a volume with an empty filesystem")
    p.add_argument("dir", metavar="DIR", help="volume directory (created if missing)")
    p.add_argument("--size", required=True, type=_size_arg, help="e.g. 512M, 2G, 1T")
    p.add_argument("--block-size", type=_positive_int, default=4096, help="bytes per block")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--inodes", type=_positive_int, help="number of inodes")
    group.add_argument(
        "--inode-ratio",
        type=_size_arg,
        default=DEFAULT_INODE_RATIO,
        help="bytes of volume per inode",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing volume")
    _add_json_argument(p)
    p.set_defaults(func=volume_commands.cmd_mkfs)

    p = sub.add_parser("mount", parents=[common], help="mount a volume")
    p.add_argument("dir", metavar="DIR", help="volume directory")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")
    p.add_argument("--foreground", action="store_true", help="do not detach (systemd: Type=notify)")
    p.add_argument("--read-only", action="store_true", help="mount read-only (ships nothing)")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTS",
        help="FUSE mount options, comma-separated (e.g. allow_other; nonempty: mount over a "
        "directory that is not empty or already a mount point)",
    )
    p.add_argument(
        "--commit-interval",
        type=_positive_float,
        default=volume_commands.DEFAULT_COMMIT_INTERVAL,
        metavar="SECONDS",
        help="group-commit interval",
    )
    p.add_argument(
        "--mirror",
        dest="mirrors",
        action="append",
        default=[],
        type=_address_arg,
        metavar="HOST:PORT",
        help="ship the volume's transactions to this target (repeatable)",
    )
    _add_secret_arguments(p)
    add_tls_arguments(p)
    p.add_argument(
        "--max-log",
        type=_size_arg,
        default=None,
        metavar="SIZE",
        help="log kept for lagging targets before they go out-of-sync (e.g. 1G; default: no cap)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="keep accepting writes after a target reports a newer epoch (split brain)",
    )
    add_log_arguments(p)
    add_metrics_argument(p)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=volume_commands.cmd_mount)

    p = sub.add_parser(
        "replica", parents=[common], help="run a target: receive, apply, mount read-only"
    )
    add_replica_arguments(p)
    add_node_arguments(sub, common)

    p = sub.add_parser("umount", parents=[common], help="unmount and wait for the final commit")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="where a volume is mounted")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=600.0,
        metavar="SECONDS",
        help="how long to wait for the final commit",
    )
    p.add_argument(
        "--lazy",
        action="store_true",
        help="detach now even if files are open; the final commit follows when the last "
        "one is closed (not waited for)",
    )
    p.set_defaults(func=volume_commands.cmd_umount)

    p = sub.add_parser("fsck", parents=[common], help="check (and repair) a volume")
    p.add_argument("dir", metavar="DIR", help="volume directory (not mounted)")
    p.add_argument("--repair", action="store_true", help="fix what is found, then check again")
    _add_json_argument(p)
    p.set_defaults(func=volume_commands.cmd_fsck)

    p = sub.add_parser(
        "stop", parents=[common], help="stop the replica daemon or mount of a volume, and wait"
    )
    p.add_argument("dir", metavar="DIR", help="volume directory")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for it to exit",
    )
    p.set_defaults(func=stop.cmd_stop)
    parser.epilog = _command_list(sub)
    return parser


def add_log_arguments(p: argparse.ArgumentParser) -> None:
    """Where a daemon (mount, replica) logs, and how much."""
    p.add_argument(
        "--log",
        type=_log_target_arg,
        default=None,
        metavar="FILE|syslog|stderr|none",
        help="the daemon's log: a file (rotated; reopened on SIGHUP), syslog (journald), "
        f"stderr (with --foreground) or none (default: DIR/{DAEMON_LOG_FILE})",
    )
    p.add_argument(
        "--log-level", choices=LOG_LEVELS, default=DEFAULT_LOG_LEVEL, help="least level logged"
    )


def _add_secret_arguments(p: argparse.ArgumentParser) -> None:
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
        "--listen", required=True, type=_listen_arg, metavar="HOST:PORT", help="TCP address"
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
    _add_json_argument(p)
    p.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        default=None,
        type=_positive_float,
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
        type=_positive_float,
        default=0.2,
        metavar="SECONDS",
        help="how often the daemon looks for changes",
    )
    p.add_argument("--count", type=_positive_int, default=None, help="exit after this many events")
    p.set_defaults(func=commands.cmd_events)

    p = sub.add_parser("verify", parents=[common], help="compare every target with the source")
    p.add_argument("dir", metavar="DIR", help="source volume directory (mounted)")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=120.0,
        metavar="SECONDS",
        help="how long each target may take",
    )
    _add_json_argument(p)
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
        type=_positive_float,
        metavar="SECONDS",
        help="with --add: follow the initial sync (a progress bar on a terminal) until the "
        "target streams, at most SECONDS (default 3600)",
    )
    _add_json_argument(p)
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
    _add_secret_arguments(p)
    add_tls_arguments(p)
    _add_json_argument(p)
    p.set_defaults(func=commands.cmd_promote)

    p = sub.add_parser(
        "demote", parents=[common], help="make a stopped old source a target (failback)"
    )
    p.add_argument("dir", metavar="DIR", help="source volume directory (not mounted)")
    _add_json_argument(p)
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
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="how long the target may take to catch up and answer",
    )
    _add_json_argument(p)
    p.set_defaults(func=commands.cmd_switchover)


def _add_json_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json", action="store_true", help="a JSON report (schema: docs/json.md) for programs"
    )


def _metrics_arg(text: str) -> tuple[str, int]:
    from mirrorfs.node.metrics import MetricsAddressError, parse_metrics_address

    try:
        return parse_metrics_address(text)
    except MetricsAddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_metrics_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics",
        type=_metrics_arg,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (loopback unless "
        "--metrics-insecure; default: none)",
    )
    p.add_argument(
        "--metrics-insecure",
        action="store_true",
        help="allow a --metrics address that is not loopback (the endpoint has no auth)",
    )


# -- entry point


def _is_mount_error(exc: BaseException) -> bool:
    try:
        from mirrorfs.fuse.mount import MountError
    except ImportError:
        return False
    return isinstance(exc, MountError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, argument errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        try:
            return args.func(args)
        except BaseExceptionGroup as group:
            # A daemon's task failed inside a nursery: report what failed, not the group.
            raise root_cause(group) from group
    except (CliError, StoreError, OSError, ControlError, ReplError) as exc:
        print(f"{PROG}: error: {describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if _is_mount_error(exc):
            print(f"{PROG}: error: {describe(exc)}", file=sys.stderr)
            return 1
        if args.debug:
            traceback.print_exc()
        print(
            f"{PROG}: error: unexpected {type(exc).__name__}: {describe(exc)} "
            "(run with --debug for a traceback)",
            file=sys.stderr,
        )
        return 2
