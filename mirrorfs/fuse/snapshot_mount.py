"""The read-only mount of a checkpoint: ``mirrorfs checkpoint mount DIR NAME MOUNTPOINT``.

Served by the same filesystem code (``fs.filesystem.Filesystem`` and the pyfuse3 adapter)
over a ``store.snapshots.CheckpointView`` of the block file, in its own process, while
another process serves the live volume (the source's mount or the replica daemon) and
holds its lock. Nothing here takes the volume's lock or reads its log: the view reads the
block file only, in the order INTERNALS.md ("Checkpoints") argues is safe. A checkpoint
never changes, so the kernel may cache its pages, entries and attributes for long.

The pid file (``store.files.checkpoint_mount_pid_file``) says which checkpoint is mounted:
``mirrorfs umount`` waits for the process, ``checkpoint delete`` refuses a mounted one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable

import pyfuse3
import trio

from mirrorfs.fs.filesystem import Filesystem
from mirrorfs.fuse.lifecycle import PidFile, watch_signals
from mirrorfs.fuse.mount import FuseSession, MountError, check_mountpoint, fuse_options
from mirrorfs.fuse.operations import Operations
from mirrorfs.store.device import BlockFile
from mirrorfs.store.errors import VolumeLocked
from mirrorfs.store.files import BLOCK_FILE, CHECKPOINT_MOUNTS_DIR, checkpoint_mount_pid_file
from mirrorfs.store.geometry import VolumeSuper
from mirrorfs.store.snapshots import CheckpointView
from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)

#: A checkpoint never changes: the kernel may keep what it learnt of it.
CACHE_TIMEOUT = 3600.0


def open_view(volume_dir: str, name: str) -> tuple[BlockFile, CheckpointView]:
    """The block file (read-only, unlocked) and checkpoint ``name`` over it.

    A volume nobody serves is opened and closed first: that replays what its log holds
    beyond the block file (after a crash). A served one is kept current by its daemon."""
    path = os.path.join(volume_dir, BLOCK_FILE)
    if not os.path.exists(path):
        raise MountError(f"{volume_dir}: not a mirrorfs volume (no block file)")
    try:
        Volume.open(volume_dir).close()
    except VolumeLocked:
        pass
    size = os.path.getsize(path)
    probe = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(probe, 4096, 0)
    finally:
        os.close(probe)
    sb = VolumeSuper.unpack(head, path)
    blocks = BlockFile(path, sb.block_size, size // sb.block_size, read_only=True)
    try:
        view = CheckpointView(blocks.read, sb, name)
    except BaseException:
        blocks.close()
        raise
    return blocks, view


def run(
    volume_dir: str, name: str, mountpoint: str, on_ready: Callable[[], None] | None = None
) -> None:
    """Mount checkpoint ``name`` of ``volume_dir`` read-only and serve until unmounted."""
    trio.run(_run, os.path.abspath(volume_dir), name, mountpoint, on_ready)


async def _run(
    volume_dir: str, name: str, mountpoint: str, on_ready: Callable[[], None] | None
) -> None:
    mountpoint = check_mountpoint(mountpoint)
    # fsname mirrorfs:DIR@NAME: `mirrorfs umount` tells a checkpoint mount by the '@'.
    options = fuse_options(f"{volume_dir}@{name}", read_only=True)
    with contextlib.ExitStack() as stack:
        blocks, view = open_view(volume_dir, name)
        stack.callback(blocks.close)
        view.path = f"{volume_dir}@{name}"  # type: ignore[attr-defined]  (FuseSession logs it)
        os.makedirs(os.path.join(volume_dir, CHECKPOINT_MOUNTS_DIR), exist_ok=True)
        pid = stack.enter_context(PidFile(checkpoint_mount_pid_file(volume_dir, mountpoint)))
        with open(pid.path, "a") as f:  # the pid line, then the checkpoint's name
            f.write(name + "\n")
        fs = Filesystem(view, read_only=True)
        stack.callback(fs.close)
        ops = Operations(
            fs, view, read_only=True, entry_timeout=CACHE_TIMEOUT, attr_timeout=CACHE_TIMEOUT
        )
        session = stack.enter_context(FuseSession(ops, mountpoint, options))
        log.info("checkpoint %r (seq %d) of %s mounted", name, view.info.seq, volume_dir)
        await session.serve([functools.partial(watch_signals, _terminate)], on_ready=on_ready)


def _terminate(sig: object) -> None:
    log.info("received %s: unmounting", sig)
    pyfuse3.terminate()
