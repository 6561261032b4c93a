"""The mount lifecycle: one FUSE session, and the read-write mount built on it.

``FuseSession`` is the lifecycle of any mirrorfs mount, the read-write mount of this module's
``run`` and the replica daemon's read-only mount (mirrorfs.node.replica) alike::

    pyfuse3.init  ->  services  ->  pyfuse3.main ... returned (``fusermount3 -u``,
    ``pyfuse3.terminate``) or cancelled  ->  on_unmounted  ->  services cancelled  ->
    pyfuse3.close(unmount=True)

Tasks in the session's nursery (one trio loop, one thread): ``pyfuse3.main`` (the request
handlers), the caller's services, ``ready`` (reports the mount as live once a stat through
it succeeds, after raising the mount's readahead to 1 MiB: fuse/bdi.py) and the kernel-cache
invalidator (fuse/invalidate.py), started once the mount answers: on the replica for the
blocks applied underneath it, on the read-write mount for pages an O_DIRECT write made
stale (fuse/pagecache.py).

The read-write mount sets itself up in one ``AsyncExitStack`` (S3QL's pattern), so whatever
failed, the steps that did happen are undone in reverse order:

    open Volume (flock)  ->  pid file  ->  Filesystem  ->  final commit  ->  FuseSession

and on the way out (``pyfuse3.main`` returned after ``fusermount3 -u``, a signal, or failed):

    pyfuse3.close(unmount=True)  ->  final commit  ->  fs.close  ->  pid file  ->  volume.close

Unmounting first means no request can arrive while the last transaction is sealed; removing
the pid file before ``volume.close`` unlocks means a new mount never sees a stale pid file.
``mirrorfs umount`` waits for this process to exit, i.e. for the final commit. Its services:
``signals`` (SIGTERM/SIGINT -> ``pyfuse3.terminate``; SIGHUP -> ``on_hangup``), ``persister``
(store/committer.py) and ``group-commit`` (seals the open transaction every
``commit_interval``), and those of ``MountConfig.services`` (the source's shippers and
control socket).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pyfuse3
import trio

from mirrorfs.daemon import notify_systemd
from mirrorfs.fs.api import ATIME_OPTIONS, AtimePolicy
from mirrorfs.fs.filesystem import Filesystem
from mirrorfs.fuse import fastwait
from mirrorfs.fuse.bdi import raise_readahead
from mirrorfs.fuse.invalidate import KernelInvalidator
from mirrorfs.fuse.lifecycle import HANGUP_SIGNALS, PidFile, watch_signals
from mirrorfs.fuse.operations import DEFAULT_COMMIT_BOUND, Operations
from mirrorfs.store.errors import VolumeFailed
from mirrorfs.store.files import MOUNT_PID_FILE
from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)

FSNAME_PREFIX = "mirrorfs:"
SUBTYPE = "mirrorfs"
#: How long the mount may take to answer its first stat before it is declared failed.
READY_TIMEOUT = 30.0

#: ``-o`` options that mirrorfs takes itself rather than passing them to libfuse.
WRITEBACK_OPTION = "writeback_cache"
#: Consent to mount over a directory that is not empty or is a mount point already (libfuse
#: 3 dropped the option and mounts anywhere; mirrorfs asks, as fuse 2 and mount(8) did).
NONEMPTY_OPTION = "nonempty"

#: A trio task function taking ``task_status`` (started with ``nursery.start``).
Service = Callable[..., Awaitable[None]]


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
    #: The kernel's writeback cache (also ``-o writeback_cache``): small writes coalesce in
    #: the page cache, but EFBIG and ENOSPC then come at fsync/close, not at write
    #: (fuse/operations.py). Never on a read-only mount.
    writeback_cache: bool = False
    write_pid_file: bool = True
    #: Services started next to the FUSE session of a read-write mount (the node layer
    #: passes the source's replication here): each is called with the volume and the
    #: mountpoint and returns a trio task function taking ``task_status``.
    services: Sequence[Callable[[Volume, str], Service]] = ()
    #: Called on SIGHUP (the daemon reopens its log file there).
    on_hangup: Callable[[], None] | None = None


def fuse_options(volume_dir: str, extra: Sequence[str] = (), *, read_only: bool) -> set[str]:
    """The option set for ``pyfuse3.init``: ours, then ``extra`` (``-o`` values)."""
    volume_dir = os.path.abspath(volume_dir)
    if "," in volume_dir:
        # fsname is one comma-separated mount option; a comma would split it.
        raise MountError(f"volume path {volume_dir!r} contains a comma")
    opts = {f"fsname={FSNAME_PREFIX}{volume_dir}", f"subtype={SUBTYPE}", "default_permissions"}
    for opt in extra:
        opts.update(o.strip() for o in opt.split(",") if o.strip())
    opts.discard("rw")
    opts.discard(NONEMPTY_OPTION)  # ours (check_mountpoint); libfuse 3 rejects it
    opts.discard(WRITEBACK_OPTION)  # ours (MountConfig.writeback_cache), unknown to libfuse
    # atime options are ours to apply (atime_policy); libfuse rejects all but noatime, which
    # it passes to the kernel (so that /proc/mounts shows it).
    opts -= ATIME_OPTIONS - {"noatime"}
    if read_only:
        opts.add("ro")
    return opts


def atime_policy(extra: Sequence[str]) -> tuple[AtimePolicy, bool]:
    """(when reads update atime, whether directories' atime too) from the ``-o`` values; the
    last of relatime/strictatime/noatime wins, as in mount(8)."""
    policy, diratime = AtimePolicy.RELATIME, True
    for opt in extra:
        for o in (o.strip() for o in opt.split(",")):
            if o == "nodiratime":
                diratime = False
            elif o in ATIME_OPTIONS:
                policy = AtimePolicy(o)
    return policy, diratime


def wants_writeback(cfg: MountConfig) -> bool:
    """Whether the mount of ``cfg`` uses the kernel's writeback cache."""
    asked = cfg.writeback_cache or any(
        o.strip() == WRITEBACK_OPTION for opt in cfg.options for o in opt.split(",")
    )
    return asked and not cfg.read_only


def has_option(extra: Sequence[str], name: str) -> bool:
    """Whether the ``-o`` values ``extra`` (comma-separated strings) hold option ``name``."""
    return any(o.strip() == name for opt in extra for o in opt.split(","))


def _mounted_at(path: str) -> str | None:
    """What is mounted at ``path`` ("TYPE SOURCE"), or None."""
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and _unescape(fields[1]) == path:
                found = f"{fields[2]} {_unescape(fields[0])}"
    return found


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def check_mountpoint(mountpoint: str, *, nonempty: bool = False) -> str:
    """Absolute path of ``mountpoint``; MountError if it is missing, not a directory, or
    busy (a mount point already, or not empty) and ``nonempty`` was not given."""
    path = os.path.abspath(mountpoint)
    if not os.path.exists(path):
        raise MountError(f"mountpoint {path} does not exist")
    if not os.path.isdir(path):
        raise MountError(f"mountpoint {path} is not a directory")
    if nonempty:
        return path
    busy = _mounted_at(os.path.realpath(path))
    if busy is not None:
        raise MountError(
            f"mountpoint {path} is already a mount point ({busy}): unmount it first, "
            f"or pass -o {NONEMPTY_OPTION} to mount over it"
        )
    try:
        empty = not os.listdir(path)
    except OSError as exc:
        raise MountError(f"mountpoint {path}: {exc.strerror}") from None
    if not empty:
        raise MountError(
            f"mountpoint {path} is not empty: its files would be hidden; "
            f"pass -o {NONEMPTY_OPTION} to mount over them"
        )
    return path


# ------------------------------------------------------------------------ the FUSE session


class FuseSession:
    """One FUSE mount of ``ops`` at ``mountpoint``, served by this trio loop.

    pyfuse3 allows one session per process. As a context manager: ``pyfuse3.init`` on entry
    (MountError if the kernel or libfuse refuses), ``pyfuse3.close(unmount=True)`` on exit;
    ``serve`` in between. ``invalidator``: for a mount whose volume changes underneath it
    (the replica); the caller feeds it, the session runs it.
    """

    def __init__(
        self,
        ops: Operations,
        mountpoint: str,
        options: set[str],
        *,
        invalidator: KernelInvalidator | None = None,
    ) -> None:
        self.ops = ops
        self.mountpoint = mountpoint
        self.options = options
        self.invalidator = invalidator

    def __enter__(self) -> FuseSession:
        where = f"{self.ops.volume.path} at {self.mountpoint}"
        log.info("mounting %s (%s)", where, ",".join(sorted(self.options)))
        try:
            pyfuse3.init(self.ops, self.mountpoint, self.options)
        except RuntimeError as exc:
            # libfuse printed its own reason on stderr (the log file when detached).
            if "fuse_session_new" in str(exc):
                why = f"libfuse rejected the options {','.join(sorted(self.options))}"
            else:
                why = f"{exc} (see the log for libfuse's reason)"
            raise MountError(f"cannot mount {where}: {why}") from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Harmless after fusermount3 -u: libfuse sees the device closed and skips umount2.
        log.debug("closing the FUSE session on %s", self.mountpoint)
        pyfuse3.close(unmount=True)

    async def serve(
        self,
        services: Sequence[Service] = (),
        *,
        on_ready: Callable[[], None] | None = None,
        on_unmounted: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Serve requests until unmounted or ``pyfuse3.terminate()``; raises when cancelled.

        ``services`` are started (in order, each awaited until ``started``) before the first
        request is served and cancelled when the mount ends, after ``on_unmounted`` (the
        kernel has unmounted: no request can arrive any more). ``on_ready`` is called once
        the mount answers. MountError if it never does.
        """
        try:
            async with trio.open_nursery() as nursery:
                for service in services:
                    await nursery.start(service)
                nursery.start_soon(self._announce_ready, nursery, on_ready, name="ready")
                try:
                    with fastwait.installed():  # no epoll round trip per queued request
                        await pyfuse3.main()
                    log.info("unmounting %s", self.mountpoint)
                    if on_unmounted is not None:
                        await on_unmounted()
                finally:
                    # main returns on unmount or terminate(); the helper tasks end with it.
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # A mount that never answered: the one-line MountError, not a group of one.
            mount_errors, rest = group.split(MountError)
            if mount_errors is None or rest is not None:
                raise
            first: BaseException = mount_errors
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None

    async def _announce_ready(
        self, nursery: trio.Nursery, on_ready: Callable[[], None] | None
    ) -> None:
        """Once a stat through the mount succeeds (INIT done, root served): start the
        invalidator and call ``on_ready``."""
        mountpoint = self.mountpoint
        try:
            with trio.fail_after(READY_TIMEOUT):
                st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise MountError(f"{mountpoint} did not answer within {READY_TIMEOUT:g} s") from None
        except OSError as exc:
            raise MountError(f"{mountpoint} does not answer: {exc.strerror}") from None
        log.info("mounted at %s (dev %d:%d)", mountpoint, os.major(st.st_dev), os.minor(st.st_dev))
        # Before anyone opens a file: a file's readahead window is fixed when it is opened.
        raise_readahead(st.st_dev)
        if self.invalidator is not None:
            # Not before: the kernel takes no invalidation before it has sent INIT.
            nursery.start_soon(self.invalidator.run, name="invalidator")
        if on_ready is not None:
            on_ready()


# ------------------------------------------------------------------- the read-write mount


def run(cfg: MountConfig, on_ready: Callable[[], None] | None = None) -> None:
    """Mount and serve until unmounted or signalled; returns after the final commit.

    ``on_ready`` is called once the mount answers requests. Raises MountError, StoreError
    or FsError (one-line messages) when the mount cannot be set up.
    """
    trio.run(_run, cfg, on_ready)


async def _run(cfg: MountConfig, on_ready: Callable[[], None] | None) -> None:
    volume_dir = os.path.abspath(cfg.volume_dir)
    mountpoint = check_mountpoint(cfg.mountpoint, nonempty=has_option(cfg.options, NONEMPTY_OPTION))
    options = fuse_options(volume_dir, cfg.options, read_only=cfg.read_only)

    async with contextlib.AsyncExitStack() as stack:
        volume = Volume.open(volume_dir, read_only=cfg.read_only)
        stack.callback(_close_volume, volume)
        if volume.state.role != "source" and not cfg.read_only:
            raise MountError(
                f"{volume_dir} is a replica (target): mount it --read-only, or promote it "
                "first (mirrorfs promote)"
            )
        if cfg.write_pid_file:
            stack.enter_context(PidFile(os.path.join(volume_dir, MOUNT_PID_FILE)))

        atime, diratime = atime_policy(cfg.options)
        fs = Filesystem(volume, read_only=cfg.read_only, atime=atime, diratime=diratime)
        stack.callback(fs.close)
        ops = Operations(
            fs,
            volume,
            read_only=cfg.read_only,
            commit_bound=cfg.commit_bound,
            writeback_cache=wants_writeback(cfg),
        )
        stack.callback(_final_commit, ops, volume)

        session = stack.enter_context(
            FuseSession(ops, mountpoint, options, invalidator=ops.invalidator)
        )
        services: list[Service] = [functools.partial(watch_signals, _terminate)]
        if cfg.on_hangup is not None:
            hangup = cfg.on_hangup
            services.append(functools.partial(watch_signals, lambda sig: hangup(), HANGUP_SIGNALS))
        if not cfg.read_only:
            services += _commit_services(ops, volume, cfg.commit_interval)
            services += [make_service(volume, mountpoint) for make_service in cfg.services]
        final_ship = None if cfg.read_only else functools.partial(_final_ship, ops, volume)
        await session.serve(services, on_ready=on_ready, on_unmounted=final_ship)


def _terminate(sig: signal.Signals) -> None:
    log.info("received %s: unmounting", sig.name)
    notify_systemd("STOPPING=1")
    pyfuse3.terminate()


def _commit_services(ops: Operations, volume: Volume, interval: float) -> list[Service]:
    """Group commit: the persister and the timer that seals (store/committer.py)."""

    async def group_commit(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED):
        task_status.started()
        await ops.committer.group_commit(interval, ops)

    return [ops.committer.run, group_commit]


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


def _final_commit(ops: Operations, volume: Volume) -> None:
    if ops.read_only or ops.failsafe:
        return
    seq = volume.commit(sync=True)
    log.info("final commit: %s", f"transaction {seq}" if seq is not None else "nothing pending")


def _close_volume(volume: Volume) -> None:
    volume.close()
    log.info("volume closed")
