"""Mount lifecycle: volume, filesystem, FUSE session and the tasks that serve them.

Everything is set up in one ``AsyncExitStack`` (S3QL's pattern), so whatever failed, the
steps that did happen are undone in reverse order:

    open Volume (flock)  ->  pid file  ->  Filesystem  ->  final commit  ->  pyfuse3.init

and on the way out (``pyfuse3.main`` returned after ``fusermount3 -u``, a signal, or failed):

    pyfuse3.close(unmount=True)  ->  final commit  ->  fs.close  ->  pid file  ->  volume.close

Unmounting first means no request can arrive while the last transaction is sealed; removing
the pid file before ``volume.close`` unlocks means a new mount never sees a stale pid file.
``mirrorfs umount`` waits for this process to exit, i.e. for the final commit.

Tasks in the nursery (one trio loop, one thread): ``pyfuse3.main`` (the request handlers),
``group-commit`` (seals the open transaction every ``commit_interval`` with sync=True),
``signals`` (SIGTERM/SIGINT/SIGHUP -> ``pyfuse3.terminate``), ``ready`` (reports the
mount as live once a stat through it succeeds), ``persister`` (store/committer.py) and the
services of ``MountConfig.services`` (the source's shippers and control socket).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pyfuse3
import trio

from mirrorfs.fs.filesystem import Filesystem
from mirrorfs.fuse.operations import DEFAULT_COMMIT_BOUND, Operations
from mirrorfs.store.errors import VolumeFailed
from mirrorfs.store.files import MOUNT_PID_FILE, atomic_write
from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)

FSNAME_PREFIX = "mirrorfs:"
SUBTYPE = "mirrorfs"
#: How long the mount may take to answer its first stat before it is declared failed.
READY_TIMEOUT = 30.0


class MountError(Exception):
    """The mount could not be set up (one-line message for the user)."""


@dataclass(slots=True)
class MountConfig:
    """What ``mirrorfs mount`` was asked to do."""

    volume_dir: str
    mountpoint: str
    read_only: bool = False
    #: Extra FUSE options (``-o``), e.g. ``allow_other``.
    options: Sequence[str] = field(default_factory=tuple)
    commit_interval: float = 0.5
    commit_bound: int = DEFAULT_COMMIT_BOUND
    write_pid_file: bool = True
    #: Services started next to the FUSE session of a read-write mount (the node layer
    #: passes the source's replication here): each is called with the volume and the
    #: mountpoint and returns a trio task function taking ``task_status``.
    services: Sequence[Callable[[Volume, str], Callable[..., Awaitable[None]]]] = ()


def fuse_options(cfg: MountConfig) -> set[str]:
    """The option set for ``pyfuse3.init``."""
    volume_dir = os.path.abspath(cfg.volume_dir)
    if "," in volume_dir:
        # fsname is one comma-separated mount option; a comma would split it.
        raise MountError(f"volume path {volume_dir!r} contains a comma")
    opts = {f"fsname={FSNAME_PREFIX}{volume_dir}", f"subtype={SUBTYPE}", "default_permissions"}
    for opt in cfg.options:
        opts.update(o.strip() for o in opt.split(",") if o.strip())
    opts.discard("rw")
    if cfg.read_only:
        opts.add("ro")
    return opts


def check_mountpoint(mountpoint: str) -> str:
    """Absolute path of ``mountpoint``; MountError if it is missing or not a directory."""
    path = os.path.abspath(mountpoint)
    if not os.path.exists(path):
        raise MountError(f"mountpoint {path} does not exist")
    if not os.path.isdir(path):
        raise MountError(f"mountpoint {path} is not a directory")
    return path


def run(cfg: MountConfig, on_ready: Callable[[], None] | None = None) -> None:
    """Mount and serve until unmounted or signalled; returns after the final commit.

    ``on_ready`` is called once the mount answers requests. Raises MountError, StoreError
    or FsError (one-line messages) when the mount cannot be set up.
    """
    trio.run(_run, cfg, on_ready)


async def _run(cfg: MountConfig, on_ready: Callable[[], None] | None) -> None:
    volume_dir = os.path.abspath(cfg.volume_dir)
    mountpoint = check_mountpoint(cfg.mountpoint)
    options = fuse_options(cfg)

    async with contextlib.AsyncExitStack() as stack:
        volume = Volume.open(volume_dir, read_only=cfg.read_only)
        stack.callback(_close_volume, volume)
        if volume.state.role != "source" and not cfg.read_only:
            raise MountError(
                f"{volume_dir} is a replica (target): mount it --read-only, or promote it "
                "first (mirrorfs promote)"
            )
        if cfg.write_pid_file:
            _write_pid_file(volume_dir)
            stack.callback(_remove_pid_file, volume_dir)

        fs = Filesystem(volume, read_only=cfg.read_only)
        stack.callback(fs.close)
        ops = Operations(fs, volume, read_only=cfg.read_only, commit_bound=cfg.commit_bound)
        stack.callback(_final_commit, ops, volume)

        log.info("mounting %s at %s (%s)", volume_dir, mountpoint, ",".join(sorted(options)))
        try:
            pyfuse3.init(ops, mountpoint, options)
        except RuntimeError as exc:
            # libfuse printed its own reason on stderr (the log file when detached).
            if "fuse_session_new" in str(exc):
                why = f"libfuse rejected the options {','.join(sorted(options))}"
            else:
                why = f"{exc} (see the log for libfuse's reason)"
            raise MountError(f"cannot mount {volume_dir} at {mountpoint}: {why}") from None
        stack.callback(_unmount, mountpoint)

        await _serve(ops, volume, cfg, mountpoint, on_ready)
        log.info("unmounting %s", mountpoint)


async def _serve(
    ops: Operations,
    volume: Volume,
    cfg: MountConfig,
    mountpoint: str,
    on_ready: Callable[[], None] | None,
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, name="signals")
        if not cfg.read_only:
            await nursery.start(ops.committer.run, name="persister")
            nursery.start_soon(
                ops.committer.group_commit, cfg.commit_interval, ops, name="group-commit"
            )
            for make_service in cfg.services:
                await nursery.start(make_service(volume, mountpoint))
        nursery.start_soon(_announce_ready, mountpoint, on_ready, name="ready")
        try:
            await pyfuse3.main()
            if not cfg.read_only:
                await _final_ship(ops, volume)
        finally:
            # main returns on unmount or terminate(); the helper tasks end with it.
            nursery.cancel_scope.cancel()


#: How long an unmount waits for connected targets to acknowledge the final commit.
FINAL_SHIP_TIMEOUT = 10.0


async def _final_ship(ops: Operations, volume: Volume) -> None:
    """Commit what is open and give streaming targets a bounded time to receive it.

    Runs after the kernel unmounted (no request can arrive) and before the services are
    cancelled, so that a clean unmount leaves the targets at the source's last seq.
    """
    if ops.failsafe:
        return
    before = volume.last_seq
    with trio.move_on_after(FINAL_SHIP_TIMEOUT) as scope:
        try:
            await ops.committer.commit()
        except VolumeFailed as exc:
            ops.enter_failsafe(f"final commit: {exc}")
            return
        if volume.last_seq > before:
            log.info("final commit: transaction %d", volume.last_seq)
        while volume.writer.replication_pending():
            await trio.sleep(0.02)
    if scope.cancelled_caught:
        log.warning(
            "unmount: targets did not acknowledge seq %d within %.0f s",
            volume.last_seq,
            FINAL_SHIP_TIMEOUT,
        )


async def _watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()


async def _announce_ready(mountpoint: str, on_ready: Callable[[], None] | None) -> None:
    """Call ``on_ready`` once a stat through the mount succeeds (INIT done, root served)."""
    try:
        with trio.fail_after(READY_TIMEOUT):
            st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise MountError(f"{mountpoint} did not answer within {READY_TIMEOUT:g} s") from None
    except OSError as exc:
        raise MountError(f"{mountpoint} does not answer: {exc.strerror}") from None
    log.info("mounted at %s (dev %d:%d)", mountpoint, os.major(st.st_dev), os.minor(st.st_dev))
    if on_ready is not None:
        on_ready()


def _unmount(mountpoint: str) -> None:
    # Harmless after fusermount3 -u: libfuse sees the device closed and skips umount2.
    log.debug("closing the FUSE session on %s", mountpoint)
    pyfuse3.close(unmount=True)


def _final_commit(ops: Operations, volume: Volume) -> None:
    if ops.read_only or ops.failsafe:
        return
    seq = volume.commit(sync=True)
    log.info("final commit: %s", f"transaction {seq}" if seq is not None else "nothing pending")


def _close_volume(volume: Volume) -> None:
    volume.close()
    log.info("volume closed")


def _write_pid_file(volume_dir: str) -> None:
    atomic_write(os.path.join(volume_dir, MOUNT_PID_FILE), b"%d\n" % os.getpid(), durable=False)


def _remove_pid_file(volume_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(volume_dir, MOUNT_PID_FILE))
