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
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import mirrorfs
from mirrorfs.daemon import PROG, CliError, describe, root_cause  # CliError: cli.CliError too
from mirrorfs.node import checkpoint_commands, commands, replica_command, volume_commands
from mirrorfs.node.control import ControlError
from mirrorfs.repl.address import AddressError, parse_address, parse_listen
from mirrorfs.repl.wire import ReplError
from mirrorfs.store.errors import StoreError

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


def _duration_arg(text: str) -> float:
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


def _percent_arg(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r}") from None
    if not 0 <= value <= 50:
        raise argparse.ArgumentTypeError("must be between 0 and 50 (percent)")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but an argument error is one line, not usage plus a message."""

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
    parser = _Parser(prog=PROG, description="A mirrored filesystem volume for Linux.")
    parser.add_argument("--version", action="version", version=f"{PROG} {mirrorfs.__version__}")
    parser.add_argument("--debug", action="store_true", default=False, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("mkfs", parents=[common], help="create a volume with an empty filesystem")
    p.add_argument("dir", metavar="DIR", help="volume directory (created if missing)")
    p.add_argument("--size", required=True, type=_size_arg, help="e.g. 512M, 2G, 1T")
    p.add_argument("--block-size", type=_positive_int, default=4096)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--inodes", type=_positive_int, help="number of inodes")
    group.add_argument(
        "--inode-ratio",
        type=_size_arg,
        default=DEFAULT_INODE_RATIO,
        help="bytes of volume per inode (default %(default)s)",
    )
    p.add_argument(
        "--checkpoint-space",
        type=_percent_arg,
        default=volume_commands.DEFAULT_CHECKPOINT_SPACE,
        metavar="PERCENT",
        help="part of the volume kept for checkpoints' saved blocks (default %(default)s%%)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing volume")
    p.set_defaults(func=volume_commands.cmd_mkfs)

    p = sub.add_parser("mount", parents=[common], help="mount a volume")
    p.add_argument("dir", metavar="DIR", help="volume directory")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--foreground", action="store_true", help="do not detach")
    p.add_argument("--read-only", action="store_true")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTS",
        help="FUSE mount options, comma-separated (e.g. allow_other)",
    )
    p.add_argument(
        "--commit-interval",
        type=_positive_float,
        default=volume_commands.DEFAULT_COMMIT_INTERVAL,
        metavar="SECONDS",
        help="group-commit interval (default %(default)s)",
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
        help="log kept for lagging targets before they go out-of-sync (e.g. 1G)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="keep accepting writes after a target reports a newer epoch (split brain)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_duration_arg,
        default=None,
        metavar="DURATION",
        help="take a checkpoint this often (e.g. 90, 15m, 1h); named auto-<UTC time>",
    )
    p.add_argument(
        "--checkpoint-keep",
        type=_positive_int,
        default=None,
        metavar="N",
        help="keep the N newest scheduled checkpoints, delete older ones",
    )
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=volume_commands.cmd_mount)

    p = sub.add_parser(
        "replica", parents=[common], help="run a target: receive, apply, mount read-only"
    )
    add_replica_arguments(p)
    add_node_arguments(sub, common)

    p = sub.add_parser("umount", parents=[common], help="unmount and wait for the final commit")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--timeout", type=_positive_float, default=600.0, metavar="SECONDS")
    p.set_defaults(func=volume_commands.cmd_umount)

    add_checkpoint_arguments(sub, common)

    p = sub.add_parser("fsck", parents=[common], help="check (and repair) a volume")
    p.add_argument("dir", metavar="DIR", help="volume directory")
    p.add_argument("--repair", action="store_true")
    p.set_defaults(func=volume_commands.cmd_fsck)
    return parser


def _add_secret_arguments(p: argparse.ArgumentParser) -> None:
    """How a source authenticates to its targets: a secret, or --insecure off loopback."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--secret-file", metavar="FILE", help="shared secret for the targets")
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
    p.add_argument("--mount", metavar="MNT", default=None, help="mount the replica read-only")
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
    p.add_argument("--foreground", action="store_true", help="do not detach")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=replica_command.cmd_replica)


def add_node_arguments(sub: Any, common: argparse.ArgumentParser) -> None:
    """The node commands (mirrorfs.node.commands) on the subparsers ``sub``."""
    p = sub.add_parser("status", parents=[common], help="role, positions, lag per target")
    p.add_argument("dir", metavar="DIR", help="volume directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=commands.cmd_status)

    p = sub.add_parser("verify", parents=[common], help="compare every target with the source")
    p.add_argument("dir", metavar="DIR", help="source volume directory (mounted)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=commands.cmd_verify)

    p = sub.add_parser("mirror", parents=[common], help="add or remove a target of a source")
    p.add_argument("dir", metavar="DIR", help="source volume directory (mounted)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--add", metavar="HOST:PORT")
    group.add_argument("--remove", metavar="HOST:PORT")
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
        "--mirror",
        dest="mirrors",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="start mirroring the new source to this target at once (repeatable)",
    )
    _add_secret_arguments(p)
    add_tls_arguments(p)
    p.set_defaults(func=commands.cmd_promote)

    p = sub.add_parser(
        "demote", parents=[common], help="make a stopped old source a target (failback)"
    )
    p.add_argument("dir", metavar="DIR", help="source volume directory (not mounted)")
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
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=commands.cmd_switchover)


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
