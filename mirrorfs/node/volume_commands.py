"""The volume commands: mkfs, mount (detached or foreground), umount, fsck.

Each ``cmd_*`` takes the parsed arguments (``mirrorfs.cli`` builds them; ``MountArgs`` is
the same for a caller without a command line) and returns the exit status; a user error is
a ``CliError`` (one line). Heavy modules are imported by the command that needs them, so
that ``umount`` and the detached mount launcher start fast and work without pyfuse3.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mirrorfs.daemon import (
    DEFAULT_LOG_LEVEL,
    PROG,
    CliError,
    check_log_target,
    daemon_log_file,
    reopen_logs,
    run_detached,
    run_foreground,
    setup_daemon_logging,
    setup_logging,
)
from mirrorfs.store.files import MOUNT_PID_FILE, checkpoint_mount_pid_file

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
    if getattr(args, "json", False):
        from mirrorfs.node.json_report import print_json, report

        print_json(
            report(
                "mkfs",
                volume_dir=path,
                size_bytes=args.size,
                block_size=bs,
                blocks=args.size // bs,
                inodes=inodes,
            )
        )
        return 0
    import humanize

    print(
        f"{PROG}: created {path}: {humanize.naturalsize(args.size, binary=True)} in "
        f"{args.size // bs} blocks of {humanize.naturalsize(bs, binary=True)}, {inodes} inodes"
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
    log: str | None = None
    log_level: str = DEFAULT_LOG_LEVEL
    metrics: tuple[str, int] | None = None
    metrics_insecure: bool = False
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
    extra += log_arguments(args)
    extra += metrics_arguments(args)
    if getattr(args, "checkpoint_every", None):
        extra += ["--checkpoint-every", repr(args.checkpoint_every)]
    if getattr(args, "checkpoint_keep", None):
        extra += ["--checkpoint-keep", str(args.checkpoint_keep)]
    if args.debug:
        extra.append("--debug")
    return extra


def log_arguments(args: Any) -> list[str]:
    """``--log`` and ``--log-level`` as given, for the detached child."""
    extra = ["--log", args.log] if args.log else []
    if args.log_level != DEFAULT_LOG_LEVEL:
        extra += ["--log-level", args.log_level]
    return extra


def metrics_arguments(args: Any) -> list[str]:
    """``--metrics`` (and ``--metrics-insecure``) as given, for a detached child and for the
    successors of a promotion or switchover."""
    if getattr(args, "metrics", None) is None:
        return []
    from mirrorfs.node.metrics import metrics_argv

    extra = ["--metrics", metrics_argv(args.metrics)]
    return extra + ["--metrics-insecure"] if args.metrics_insecure else extra


def cmd_mount(args: Any) -> int:
    """``mirrorfs mount DIR MNT``: returns once mounted (``--foreground``: at unmount)."""
    if args.read_only and args.mirrors:
        raise CliError("a read-only mount ships nothing: --mirror needs a read-write mount")
    check_log_target(args.log, foreground=args.foreground)
    if args.secret_file:
        check_secret(args.secret_file)
    tls = check_tls(args)
    _check_metrics(args)
    check_mirrors(
        args.mirrors, secret_given=bool(args.secret_file), insecure=args.insecure, tls=tls
    )
    if args.foreground:
        return _mount_foreground(args)
    return _mount_detached(args)


def check_secret(path: str) -> None:
    """Refuse a secret file the daemon would refuse, here on the user's terminal (SecretError,
    one line). Its warnings (a weak secret) are the daemon's to give: it relays them once."""
    from mirrorfs.repl import auth

    with quiet_auth():
        auth.load_secret(path)


@contextlib.contextmanager
def quiet_auth() -> Iterator[None]:
    """Silence mirrorfs.repl.auth's warnings (a weak secret, --insecure) in a launching
    process that only checks what its daemon will load and warn of again."""
    from mirrorfs.repl import auth

    auth_log = logging.getLogger(auth.__name__)
    disabled, auth_log.disabled = auth_log.disabled, True
    try:
        yield
    finally:
        auth_log.disabled = disabled


def _check_metrics(args: Any) -> None:
    from mirrorfs.node.metrics import MetricsAddressError, check_metrics_policy

    if getattr(args, "metrics", None) is not None and args.read_only:
        raise CliError("--metrics needs a read-write (source) mount; a replica has its own")
    try:
        check_metrics_policy(getattr(args, "metrics", None), args.metrics_insecure)
    except MetricsAddressError as exc:
        raise CliError(str(exc)) from None


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
    volume_dir = check_volume_dir(args.dir)
    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        what = "is not a directory" if os.path.exists(mountpoint) else "does not exist"
        raise CliError(f"mountpoint {mountpoint} {what}")
    argv = ["mount", volume_dir, mountpoint, *_passthrough_mount_args(args)]
    return run_detached(argv, daemon_log_file(volume_dir, args.log), "mount")


def check_volume_dir(path: str) -> str:
    """Absolute ``path``; CliError unless it is a directory (what a volume is)."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise CliError(f"volume directory {path} does not exist")
    if not os.path.isdir(path):
        raise CliError(f"{path} is not a volume directory (a volume is a directory made by mkfs)")
    return path


def _mount_foreground(args: Any) -> int:
    from mirrorfs.fuse.mount import MountConfig, run

    volume_dir = os.path.abspath(args.dir)
    setup_daemon_logging(
        volume_dir,
        debug=args.debug,
        ready_fd=args.ready_fd,
        target=args.log,
        level=args.log_level,
    )

    def serve(on_ready) -> None:
        # Inside run_foreground: a bad secret or TLS file reaches the ready pipe (the
        # user's terminal), not only the log.
        cfg = MountConfig(
            volume_dir=volume_dir,
            mountpoint=args.mountpoint,
            read_only=args.read_only,
            options=args.options,
            commit_interval=args.commit_interval,
            services=[] if args.read_only else [_source_service(args)],
            on_hangup=reopen_logs,
        )
        run(cfg, on_ready=on_ready)

    return run_foreground("mount", args.ready_fd, serve)


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
        mount_options=tuple(args.options),
        log_argv=tuple(log_arguments(args)),
        metrics=getattr(args, "metrics", None),
        metrics_argv=tuple(metrics_arguments(args)),
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
    """``mirrorfs umount MNT``: unmount, then wait until the mount process has exited.

    ``--lazy``: detach the mount now even while files are open in it; the kernel ends the
    FUSE session (and the process makes its final commit) once the last one is closed,
    which is not waited for."""
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

    lazy = bool(getattr(args, "lazy", False))
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), target]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"fusermount3 exited with {proc.returncode}"]
        reason = lines[-1].removeprefix("fusermount3: ")
        raise CliError(f"cannot unmount {target}: {reason}")
    if pid is not None and not lazy:
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
    from mirrorfs.store.nodestate import Role
    from mirrorfs.store.volume import Volume

    setup_logging(args.debug)
    path = check_volume_dir(args.dir)
    volume = Volume.open(path, read_only=not args.repair, repair_log=args.repair)
    try:
        # With repair, fsck commits its fixes and checks again: ``clean`` is the final state.
        log_note = ""
        as_json = getattr(args, "json", False)
        if volume.recovery.replayed or volume.recovery.log_note:
            log_note = volume.recovery.describe()
            if not as_json:
                print(f"log: {log_note}")
        # A replica's blocks come from its source: a local fix would be a transaction the
        # source never had (the log's own repair above only makes it ask for them again).
        repair_fs = args.repair and volume.state.role != Role.TARGET.value
        if args.repair and not repair_fs and not as_json:
            print(
                "replica: the filesystem is only checked, not repaired: its source sends "
                "what it is missing (a local fix would diverge from the source)"
            )
        from mirrorfs.node.progress import phase_bar

        with phase_bar(f"fsck {path}") as progress:
            report = fsck.check(volume, repair=repair_fs, progress=progress)
        if as_json:
            _print_fsck_json(path, report, log_note)
        else:
            lines = report.describe()
            print(lines if isinstance(lines, str) else "\n".join(lines))
        clean = report.clean
    finally:
        volume.close()
    return 0 if clean else 1


def _print_fsck_json(path: str, report: Any, log_note: str) -> None:
    from mirrorfs.node.json_report import print_json
    from mirrorfs.node.json_report import report as json_report

    print_json(
        json_report(
            "fsck",
            volume_dir=path,
            clean=report.clean,
            repair=report.repair,
            log=log_note,
            inodes=report.inodes,
            dirs=report.dirs,
            files=report.files,
            symlinks=report.symlinks,
            others=report.others,
            orphans=report.orphans,
            blocks_used=report.blocks_used,
            blocks_total=report.blocks_total,
            problems=list(report.problems),
            repaired=list(report.repaired),
            remaining=list(report.remaining),
        )
    )
