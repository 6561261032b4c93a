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
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import mirrorfs
from mirrorfs.cli_args import (
    add_checkpoint_arguments,
    add_json_argument,
    add_log_arguments,
    add_metrics_argument,
    add_node_arguments,
    add_replica_arguments,
    add_secret_arguments,
    add_tls_arguments,
    address_arg,
    duration_arg,
    percent_arg,
    positive_float,
    positive_int,
    size_arg,
)
from mirrorfs.daemon import PROG, CliError, describe, root_cause  # CliError: cli.CliError too
from mirrorfs.node import stop, volume_commands
from mirrorfs.node.control import ControlError
from mirrorfs.repl.wire import ReplError
from mirrorfs.store.errors import StoreError

log = logging.getLogger(__name__)

DEFAULT_INODE_RATIO = 16384


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
    "checkpoints": ("checkpoint",),
    "shell": ("completion",),
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
    p.add_argument("--size", required=True, type=size_arg, help="e.g. 512M, 2G, 1T")
    p.add_argument("--block-size", type=positive_int, default=4096, help="bytes per block")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--inodes", type=positive_int, help="number of inodes")
    group.add_argument(
        "--inode-ratio",
        type=size_arg,
        default=DEFAULT_INODE_RATIO,
        help="bytes of volume per inode",
    )
    p.add_argument(
        "--checkpoint-space",
        type=percent_arg,
        default=volume_commands.DEFAULT_CHECKPOINT_SPACE,
        metavar="PERCENT",
        help="percent of the volume kept for checkpoints' saved blocks",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing volume")
    add_json_argument(p)
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
        type=positive_float,
        default=volume_commands.DEFAULT_COMMIT_INTERVAL,
        metavar="SECONDS",
        help="group-commit interval",
    )
    p.add_argument(
        "--mirror",
        dest="mirrors",
        action="append",
        default=[],
        type=address_arg,
        metavar="HOST:PORT",
        help="ship the volume's transactions to this target (repeatable)",
    )
    add_secret_arguments(p)
    add_tls_arguments(p)
    p.add_argument(
        "--max-log",
        type=size_arg,
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
    p.add_argument(
        "--checkpoint-every",
        type=duration_arg,
        default=None,
        metavar="DURATION",
        help="take a checkpoint this often (e.g. 90, 15m, 1h); named auto-<UTC time>",
    )
    p.add_argument(
        "--checkpoint-keep",
        type=positive_int,
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
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="where a volume is mounted")
    p.add_argument(
        "--timeout",
        type=positive_float,
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

    add_checkpoint_arguments(sub, common)

    p = sub.add_parser("fsck", parents=[common], help="check (and repair) a volume")
    p.add_argument("dir", metavar="DIR", help="volume directory (not mounted)")
    p.add_argument("--repair", action="store_true", help="fix what is found, then check again")
    add_json_argument(p)
    p.set_defaults(func=volume_commands.cmd_fsck)

    p = sub.add_parser(
        "stop", parents=[common], help="stop the replica daemon or mount of a volume, and wait"
    )
    p.add_argument("dir", metavar="DIR", help="volume directory")
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for it to exit",
    )
    p.set_defaults(func=stop.cmd_stop)

    p = sub.add_parser(
        "completion",
        parents=[common],
        help="print a shell completion script (e.g. mirrorfs completion bash > FILE)",
    )
    p.add_argument("shell", choices=COMPLETION_SHELLS, help="the shell to complete for")
    p.set_defaults(func=_cmd_completion)
    parser.epilog = _command_list(sub)
    return parser


COMPLETION_SHELLS = ("bash", "zsh")
#: Arguments completed as directories (volumes, mountpoints); the rest of the paths as files.
_DIRECTORY_METAVARS = ("DIR", "MOUNTPOINT", "MNT")


def _cmd_completion(args: Any) -> int:
    """``mirrorfs completion SHELL``: the script, generated from this very parser by shtab."""
    import shtab

    parser = build_parser()
    for action in _walk_actions(parser):
        if isinstance(action, argparse._SubParsersAction):
            action.help = "command"  # hidden from --help (grouped in its epilog), not here
        elif action.metavar in _DIRECTORY_METAVARS:
            action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
        elif action.metavar in ("FILE", "PATH") or action.dest.endswith("_file"):
            action.complete = shtab.FILE  # type: ignore[attr-defined]
    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    return 0


def _walk_actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _walk_actions(child)


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
