"""The ``mirrorfs`` command family: mkfs, mount, umount, fsck.

Every user error ends as one line ``mirrorfs: error: ...`` on stderr and a non-zero exit
status (1; 2 for bad arguments and for unexpected errors, whose traceback is printed only
with ``--debug``). Heavy modules are imported by the command that needs them, so that
``--help`` and argument errors work even without FUSE.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from typing import NoReturn

import mirrorfs
from mirrorfs.store.errors import StoreError
from mirrorfs.store.files import DAEMON_LOG_FILE, MOUNT_PID_FILE

log = logging.getLogger(__name__)

PROG = "mirrorfs"
# Copies of mirrorfs.fuse.mount's names (a test checks they agree): importing that module
# pulls in pyfuse3 and trio, which would cost umount and the mount launcher most of a second.
FSNAME_PREFIX = "mirrorfs:"
FUSE_TYPE = "fuse.mirrorfs"
DEFAULT_INODE_RATIO = 16384
LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


class CliError(Exception):
    """A user error detected by the CLI itself (one-line message)."""


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
    host, sep, port = text.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"bad address {text!r}: expected HOST:PORT")
    return text


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
    p.add_argument("--force", action="store_true", help="overwrite an existing volume")
    p.set_defaults(func=cmd_mkfs)

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
        default=0.5,
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
    p.add_argument("--secret-file", metavar="FILE", help="shared secret for the targets")
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
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    from mirrorfs.node import commands, replica

    p = sub.add_parser(
        "replica", parents=[common], help="run a target: receive, apply, mount read-only"
    )
    replica.add_replica_arguments(p)
    commands.add_arguments(sub, common)

    p = sub.add_parser("umount", parents=[common], help="unmount and wait for the final commit")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--timeout", type=_positive_float, default=600.0, metavar="SECONDS")
    p.set_defaults(func=cmd_umount)

    p = sub.add_parser("fsck", parents=[common], help="check (and repair) a volume")
    p.add_argument("dir", metavar="DIR", help="volume directory")
    p.add_argument("--repair", action="store_true")
    p.set_defaults(func=cmd_fsck)
    return parser


def _describe(exc: BaseException) -> str:
    """One line for the user."""
    # FsError is an OSError too (without a filename).
    if isinstance(exc, OSError) and exc.strerror:
        msg = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        msg = str(exc) or type(exc).__name__
    return " ".join(msg.split())


def _setup_logging(
    debug: bool, *, log_file: str | None = None, stderr: bool = True, level: int = logging.WARNING
) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else level)
    formatter = logging.Formatter(LOG_FORMAT)
    if stderr:
        h: logging.Handler = logging.StreamHandler(sys.stderr)
        h.setFormatter(formatter if log_file or debug else logging.Formatter("%(message)s"))
        root.addHandler(h)
    if log_file:
        h = logging.FileHandler(log_file)
        h.setFormatter(formatter)
        root.addHandler(h)


# -- mkfs


def cmd_mkfs(args: argparse.Namespace) -> int:
    from mirrorfs.fs.filesystem import Filesystem
    from mirrorfs.store.volume import Volume

    _setup_logging(args.debug)
    path = os.path.abspath(args.dir)
    bs = args.block_size
    # Geometry and "already a volume" are checked by Volume.create; this is what it cannot
    # say well itself.
    if not os.path.isdir(os.path.dirname(path)):
        raise CliError(f"{os.path.dirname(path)}: no such directory")
    inodes = args.inodes if args.inodes else max(64, args.size // args.inode_ratio)

    Volume.create(path, args.size, block_size=bs, force=args.force)
    volume = Volume.open(path)
    try:
        Filesystem.format(volume, inode_count=inodes, uid=os.getuid(), gid=os.getgid())
    finally:
        volume.close()
    print(
        f"{PROG}: created {path}: {args.size} bytes in {args.size // bs} blocks of {bs}, "
        f"{inodes} inodes"
    )
    return 0


# -- mount


def _passthrough_mount_args(args: argparse.Namespace) -> list[str]:
    extra: list[str] = []
    if args.read_only:
        extra.append("--read-only")
    for opt in args.options:
        extra += ["-o", opt]
    extra += ["--commit-interval", repr(args.commit_interval)]
    for address in args.mirrors:
        extra += ["--mirror", address]
    if args.secret_file:
        extra += ["--secret-file", os.path.abspath(args.secret_file)]
    if args.max_log:
        extra += ["--max-log", str(args.max_log)]
    if args.force:
        extra.append("--force")
    if args.debug:
        extra.append("--debug")
    return extra


def _child_env() -> dict[str, str]:
    # The child runs ``-m mirrorfs`` from "/": make sure it imports this same package.
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(mirrorfs.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    return env


def cmd_mount(args: argparse.Namespace) -> int:
    if args.foreground:
        return _mount_foreground(args)
    return _mount_detached(args)


def _mount_detached(args: argparse.Namespace) -> int:
    """Start ``mount --foreground`` in a new session and wait until it says the mount is live."""
    volume_dir = os.path.abspath(args.dir)
    if not os.path.isdir(volume_dir):
        raise CliError(f"volume directory {volume_dir} does not exist")
    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        what = "is not a directory" if os.path.exists(mountpoint) else "does not exist"
        raise CliError(f"mountpoint {mountpoint} {what}")
    argv = ["mount", volume_dir, mountpoint, *_passthrough_mount_args(args)]
    return run_detached(argv, os.path.join(volume_dir, DAEMON_LOG_FILE), "mount")


def run_detached(argv: list[str], log_path: str, what: str) -> int:
    """Run ``mirrorfs ARGV --foreground`` in a new session, logging to ``log_path``; return
    0 once it reports "ok" on its ready pipe, else raise CliError with its one-line error."""
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "mirrorfs", *argv, "--foreground", "--ready-fd", str(write_fd)]
    try:
        with open(log_path, "ab") as logf:
            child = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                pass_fds=(write_fd,),
                start_new_session=True,
                cwd="/",
                env=_child_env(),
            )
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    if message == "ok":
        return 0
    if message.startswith("error: "):
        raise CliError(message[len("error: ") :])
    status = child.wait()
    raise CliError(f"the {what} process exited with status {status} (see {log_path})")


def _mount_foreground(args: argparse.Namespace) -> int:
    from mirrorfs.fuse.mount import MountConfig, run

    volume_dir = os.path.abspath(args.dir)
    log_file = os.path.join(volume_dir, DAEMON_LOG_FILE) if os.path.isdir(volume_dir) else None
    # A detached child (--ready-fd) has its stderr on the log file already.
    _setup_logging(args.debug, log_file=log_file, stderr=args.ready_fd is None, level=logging.INFO)
    ready_fd = args.ready_fd

    def report(message: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            try:
                os.write(ready_fd, message.encode() + b"\n")
                os.close(ready_fd)
            except OSError:
                pass  # the parent is gone: nobody to tell
            ready_fd = None

    cfg = MountConfig(
        volume_dir=volume_dir,
        mountpoint=args.mountpoint,
        read_only=args.read_only,
        options=args.options,
        commit_interval=args.commit_interval,
        services=[] if args.read_only else [_source_service(args)],
    )
    try:
        run(cfg, on_ready=lambda: report("ok"))
    except BaseException as exc:
        report(f"error: {_describe(exc)}")
        raise
    report("error: the mount ended before it was ready")
    return 0


def _source_service(args: argparse.Namespace):
    """The source node (shippers, control socket) for a read-write mount."""
    from mirrorfs.node.source import SourceConfig, SourceNode, parse_address
    from mirrorfs.repl.auth import load_secret

    cfg = SourceConfig(
        mirrors=[parse_address(a) for a in args.mirrors],
        secret=load_secret(args.secret_file) if args.secret_file else None,
        secret_file=os.path.abspath(args.secret_file) if args.secret_file else None,
        max_log_bytes=args.max_log,
        force=args.force,
    )

    def make(volume, mountpoint):
        return SourceNode(volume, cfg, mountpoint=mountpoint).run

    return make


# -- umount


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def find_mount(mountpoint: str) -> tuple[str, str] | None:
    """(source, fstype) of the topmost mount at ``mountpoint``, or None."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and _unescape_mount_field(fields[1]) == target:
                found = (_unescape_mount_field(fields[0]), fields[2])
    return found


def _pid_running(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) mirrorfs process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat[stat.rindex(b")") + 2 :][:1]
    return state not in (b"Z", b"X") and b"mirrorfs" in cmdline


def cmd_umount(args: argparse.Namespace) -> int:
    _setup_logging(args.debug)
    target = os.path.realpath(args.mountpoint)
    found = find_mount(target)
    if found is None or found[1] != FUSE_TYPE or not found[0].startswith(FSNAME_PREFIX):
        raise CliError(f"{target} is not a mirrorfs mount")
    volume_dir = found[0][len(FSNAME_PREFIX) :]
    pid = None
    try:
        with open(os.path.join(volume_dir, MOUNT_PID_FILE)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        log.warning("no pid file in %s: not waiting for the final commit", volume_dir)

    proc = subprocess.run(["fusermount3", "-u", target], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"fusermount3 exited with {proc.returncode}"]
        reason = lines[-1].removeprefix("fusermount3: ")
        raise CliError(f"cannot unmount {target}: {reason}")
    if pid is not None:
        deadline = time.monotonic() + args.timeout
        while _pid_running(pid):
            if time.monotonic() > deadline:
                raise CliError(
                    f"unmounted, but the mount process {pid} is still running after "
                    f"{args.timeout:g} s (final commit?)"
                )
            time.sleep(0.05)
    return 0


# -- fsck


def cmd_fsck(args: argparse.Namespace) -> int:
    from mirrorfs.fs import fsck
    from mirrorfs.store.volume import Volume

    _setup_logging(args.debug)
    path = os.path.abspath(args.dir)
    if not os.path.isdir(path):
        raise CliError(f"volume directory {path} does not exist")
    volume = Volume.open(path, read_only=not args.repair, repair_log=args.repair)
    try:
        # With repair, fsck commits its fixes and checks again: ``clean`` is the final state.
        report = fsck.check(volume, repair=args.repair)
        lines = report.describe()
        print(lines if isinstance(lines, str) else "\n".join(lines))
        clean = report.clean
    finally:
        volume.close()
    return 0 if clean else 1


# -- entry point


def _is_mount_error(exc: BaseException) -> bool:
    try:
        from mirrorfs.fuse.mount import MountError
    except ImportError:
        return False
    return isinstance(exc, MountError)


def _node_errors() -> tuple[type[Exception], ...]:
    from mirrorfs.node.commands import CommandError
    from mirrorfs.node.control import ControlError
    from mirrorfs.repl.wire import ReplError

    return (CommandError, ControlError, ReplError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, argument errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except (CliError, StoreError, OSError, *_node_errors()) as exc:
        print(f"{PROG}: error: {_describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if _is_mount_error(exc):
            print(f"{PROG}: error: {_describe(exc)}", file=sys.stderr)
            return 1
        if args.debug:
            traceback.print_exc()
        print(
            f"{PROG}: error: unexpected {type(exc).__name__}: {_describe(exc)} "
            "(run with --debug for a traceback)",
            file=sys.stderr,
        )
        return 2
