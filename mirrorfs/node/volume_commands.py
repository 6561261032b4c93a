"""The volume commands: mkfs, mount (detached or foreground), umount, fsck.

Each ``cmd_*`` takes the parsed arguments (``mirrorfs.cli`` builds them; ``MountArgs`` is
the same for a caller without a command line) and returns the exit status; a user error is
a ``CliError`` (one line). Heavy modules are imported by the command that needs them, so
that ``umount`` and the detached mount launcher start fast and work without pyfuse3.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from mirrorfs.daemon import (
    PROG,
    CliError,
    run_detached,
    run_foreground,
    setup_daemon_logging,
    setup_logging,
)
from mirrorfs.store.files import DAEMON_LOG_FILE, MOUNT_PID_FILE, checkpoint_mount_pid_file

log = logging.getLogger(__name__)

# Copies of mirrorfs.fuse.mount's names (a test checks they agree): importing that module
# pulls in pyfuse3 and trio, which would cost umount and the mount launcher most of a second.
FSNAME_PREFIX = "mirrorfs:"
FUSE_TYPE = "fuse.mirrorfs"
DEFAULT_COMMIT_INTERVAL = 0.5
#: Percent of a new volume kept as the checkpoint save area (mkfs --checkpoint-space).
DEFAULT_CHECKPOINT_SPACE = 10.0


# -- mkfs


def cmd_mkfs(args: Any) -> int:
    """``mirrorfs mkfs DIR --size SIZE``: a volume with an empty filesystem."""
    from mirrorfs.fs.filesystem import Filesystem
    from mirrorfs.store.volume import Volume

    setup_logging(args.debug)
    path = os.path.abspath(args.dir)
    bs = args.block_size
    # Geometry and "already a volume" are checked by Volume.create; this is what it cannot
    # say well itself.
    if not os.path.isdir(os.path.dirname(path)):
        raise CliError(f"{os.path.dirname(path)}: no such directory")
    inodes = args.inodes if args.inodes else max(64, args.size // args.inode_ratio)

    Volume.create(
        path,
        args.size,
        block_size=bs,
        force=args.force,
        checkpoint_space=args.checkpoint_space / 100,
    )
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


@dataclass(slots=True)
class MountArgs:
    """The arguments of ``mirrorfs mount`` (the parser's names and defaults), for a command
    that mounts a volume itself (``promote``)."""

    dir: str
    mountpoint: str
    foreground: bool = False
    read_only: bool = False
    options: list[str] = field(default_factory=list)
    commit_interval: float = DEFAULT_COMMIT_INTERVAL
    mirrors: list[str] = field(default_factory=list)
    secret_file: str | None = None
    insecure: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    max_log: int | None = None
    force: bool = False
    debug: bool = False
    ready_fd: int | None = None
    checkpoint_every: float | None = None
    checkpoint_keep: int | None = None


def _passthrough_mount_args(args: Any) -> list[str]:
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
    if args.insecure:
        extra.append("--insecure")
    for option, path in (
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
        ("--tls-ca", args.tls_ca),
    ):
        if path:
            extra += [option, os.path.abspath(path)]
    if args.max_log:
        extra += ["--max-log", str(args.max_log)]
    if args.force:
        extra.append("--force")
    if getattr(args, "checkpoint_every", None):
        extra += ["--checkpoint-every", repr(args.checkpoint_every)]
    if getattr(args, "checkpoint_keep", None):
        extra += ["--checkpoint-keep", str(args.checkpoint_keep)]
    if args.debug:
        extra.append("--debug")
    return extra


def cmd_mount(args: Any) -> int:
    """``mirrorfs mount DIR MNT``: returns once mounted (``--foreground``: at unmount)."""
    if args.read_only and args.mirrors:
        raise CliError("a read-only mount ships nothing: --mirror needs a read-write mount")
    tls = check_tls(args)
    check_mirrors(
        args.mirrors, secret_given=bool(args.secret_file), insecure=args.insecure, tls=tls
    )
    if args.foreground:
        return _mount_foreground(args)
    return _mount_detached(args)


def check_tls(args: Any) -> bool:
    """Whether TLS options are given; the files are checked here, before anything starts
    (one-line TlsError), and loaded again by the child that uses them."""
    from mirrorfs.repl.tls import load_tls, tls_from_args

    files = tls_from_args(args)
    if files is None:
        return False
    load_tls(files)
    return True


def check_mirrors(
    mirrors: list[str], *, secret_given: bool, insecure: bool, tls: bool = False
) -> None:
    """Refuse unauthenticated targets off this machine before anything is started (the
    child loads and checks the secret itself; here only whether one is given matters)."""
    from mirrorfs.repl.address import parse_address
    from mirrorfs.repl.auth import check_peer_policy

    for address in mirrors:
        host, port = parse_address(address)
        check_peer_policy(host, port, b"given" if secret_given else None, insecure, tls=tls)


def _mount_detached(args: Any) -> int:
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


def _mount_foreground(args: Any) -> int:
    from mirrorfs.fuse.mount import MountConfig, run

    volume_dir = os.path.abspath(args.dir)
    setup_daemon_logging(volume_dir, debug=args.debug, ready_fd=args.ready_fd)
    cfg = MountConfig(
        volume_dir=volume_dir,
        mountpoint=args.mountpoint,
        read_only=args.read_only,
        options=args.options,
        commit_interval=args.commit_interval,
        services=[] if args.read_only else [_source_service(args)],
    )
    return run_foreground("mount", args.ready_fd, lambda on_ready: run(cfg, on_ready=on_ready))


def _source_service(args: Any):
    """The source node (shippers, control socket) for a read-write mount."""
    from mirrorfs.node.source import SourceConfig, SourceNode
    from mirrorfs.repl.address import parse_address
    from mirrorfs.repl.auth import load_secret
    from mirrorfs.repl.tls import load_tls, tls_from_args

    files = tls_from_args(args)
    cfg = SourceConfig(
        mirrors=[parse_address(a) for a in args.mirrors],
        secret=load_secret(args.secret_file) if args.secret_file else None,
        secret_file=os.path.abspath(args.secret_file) if args.secret_file else None,
        max_log_bytes=args.max_log,
        force=args.force,
        insecure=args.insecure,
        tls=load_tls(files) if files is not None else None,
        checkpoint_every=getattr(args, "checkpoint_every", None),
        checkpoint_keep=getattr(args, "checkpoint_keep", None),
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


def cmd_umount(args: Any) -> int:
    """``mirrorfs umount MNT``: unmount, then wait until the mount process has exited."""
    setup_logging(args.debug)
    target = os.path.realpath(args.mountpoint)
    found = find_mount(target)
    if found is None or found[1] != FUSE_TYPE or not found[0].startswith(FSNAME_PREFIX):
        raise CliError(f"{target} is not a mirrorfs mount")
    volume_dir = found[0][len(FSNAME_PREFIX) :]
    pid_file = os.path.join(volume_dir, MOUNT_PID_FILE)
    if "@" in volume_dir and not os.path.isdir(volume_dir):  # DIR@NAME: a checkpoint mount
        pid_file = checkpoint_mount_pid_file(volume_dir.rsplit("@", 1)[0], target)
    pid = None
    try:
        with open(pid_file) as f:
            pid = int(f.read().split()[0])
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


def cmd_fsck(args: Any) -> int:
    """``mirrorfs fsck DIR [--repair]``: 0 when the volume is clean."""
    from mirrorfs.fs import fsck
    from mirrorfs.store.volume import Volume

    setup_logging(args.debug)
    path = os.path.abspath(args.dir)
    if not os.path.isdir(path):
        raise CliError(f"volume directory {path} does not exist")
    volume = Volume.open(path, read_only=not args.repair, repair_log=args.repair)
    try:
        # With repair, fsck commits its fixes and checks again: ``clean`` is the final state.
        if volume.recovery.replayed or volume.recovery.log_note:
            print(f"log: {volume.recovery.describe()}")
        report = fsck.check(volume, repair=args.repair)
        lines = report.describe()
        print(lines if isinstance(lines, str) else "\n".join(lines))
        clean = report.clean
    finally:
        volume.close()
    return 0 if clean else 1
