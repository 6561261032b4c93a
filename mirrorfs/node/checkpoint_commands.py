"""``mirrorfs checkpoint create|list|delete|mount``: checkpoints (snapshots) of a volume.

create and delete go through the running source's control socket when there is one
(``create_live`` / ``delete_live`` run in that daemon), else open the stopped volume
themselves; both are transactions like any other, so targets get them by applying the
log. list reads the block file without the volume's lock (on a source or a replica,
running or not). mount starts ``fuse/snapshot_mount.py`` in its own process.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import humanize

from mirrorfs.daemon import (
    PROG,
    CliError,
    run_detached,
    run_foreground,
    setup_daemon_logging,
    setup_logging,
)
from mirrorfs.store.files import CHECKPOINT_MOUNTS_DIR, DAEMON_LOG_FILE

log = logging.getLogger(__name__)


def cmd_checkpoint(args: Any) -> int:
    """Dispatch ``mirrorfs checkpoint ACTION``."""
    if args.action == "mount" and getattr(args, "foreground", False):
        return _mount_foreground(args)
    setup_logging(args.debug)
    path = os.path.abspath(args.dir)
    if not os.path.isdir(path):
        raise CliError(f"{path}: no such volume directory")
    if args.action == "create":
        return _create(path, args.name)
    if args.action == "delete":
        return _delete(path, args.name)
    if args.action == "list":
        return _list(path, args.json)
    if args.action == "rollback":
        return _rollback(path, args.name, args.delete_later)
    return _mount(path, args)


def _ask_daemon(path: str, request: dict[str, Any]) -> dict[str, Any] | None:
    """The running daemon's reply to ``request``, None when no daemon serves ``path``."""
    from mirrorfs.node.control import ControlError, control_request, socket_path

    try:
        reply = control_request(socket_path(path), request, timeout=120.0)
    except ControlError as exc:
        if "no daemon is running" in str(exc):
            return None
        raise
    if not reply.get("ok"):
        error = str(reply.get("error", "failed"))
        if error.startswith("unknown command"):
            error = f"{path} is served by a replica: checkpoints are made on the source"
        raise CliError(error)
    return reply


def _create(path: str, name: str) -> int:
    reply = _ask_daemon(path, {"cmd": "checkpoint-create", "name": name})
    if reply is None:
        from mirrorfs.store.volume import Volume

        vol = Volume.open(path)
        try:
            info = vol.checkpoint_create(name)
        finally:
            vol.close()
        seq = info.seq
    else:
        seq = int(reply["seq"])
    print(f"{PROG}: checkpoint {name!r} created at seq {seq}")
    return 0


def mounted_names(path: str) -> dict[str, int]:
    """Checkpoint name -> pid of a live process that mounts it (from the pid files)."""
    out: dict[str, int] = {}
    where = os.path.join(path, CHECKPOINT_MOUNTS_DIR)
    try:
        files = os.listdir(where)
    except FileNotFoundError:
        return out
    for f in files:
        try:
            with open(os.path.join(where, f)) as fh:
                lines = fh.read().splitlines()
            pid, name = int(lines[0]), lines[1]
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            continue
        out[name] = pid
    return out


def _delete(path: str, name: str) -> int:
    pid = mounted_names(path).get(name)
    if pid is not None:
        raise CliError(f"checkpoint {name!r} is mounted (process {pid}): unmount it first")
    reply = _ask_daemon(path, {"cmd": "checkpoint-delete", "name": name})
    if reply is None:
        from mirrorfs.store.volume import Volume

        vol = Volume.open(path)
        try:
            freed = vol.checkpoint_delete(name)
        finally:
            vol.close()
    else:
        freed = int(reply["freed_blocks"])
    print(f"{PROG}: checkpoint {name!r} deleted, {freed} block(s) freed")
    return 0


def _rollback(path: str, name: str, delete_later: bool) -> int:
    """On a stopped source only: a running daemon holds the volume's lock."""
    from mirrorfs.store.errors import VolumeLocked
    from mirrorfs.store.volume import Volume

    try:
        vol = Volume.open(path)
    except VolumeLocked:
        raise CliError(f"{path} is in use (mounted?): unmount it before a rollback") from None
    try:
        n = vol.checkpoint_rollback(name, delete_later=delete_later, hints=_inode_hints)
    finally:
        vol.close()
    print(f"{PROG}: rolled back to checkpoint {name!r} ({n} block(s) rewritten)")
    return 0


def _inode_hints(fs_super: bytes, blocks: list[int]) -> list:
    """INODE_UPDATED for every inode in the inode-table blocks among ``blocks``: a target's
    read-only mount drops its caches of them when it applies the rollback."""
    from mirrorfs.fs.layout import INODE_SIZE, FsSuper
    from mirrorfs.store.txn import Hint, HintKind

    sb = FsSuper.unpack(fs_super)
    per = len(fs_super) // INODE_SIZE
    first, end = sb.inode_table_start, sb.inode_table_start + sb.inode_table_blocks
    hints = []
    for b in blocks:
        if first <= b < end:
            for i in range((b - first) * per, (b - first + 1) * per):
                if 0 < i < sb.inode_count:
                    hints.append(Hint(HintKind.INODE_UPDATED, i))
    return hints


def checkpoint_rows(path: str) -> list[dict[str, Any]]:
    """The checkpoints of the volume at ``path`` as its block file holds them (no lock:
    a source or a replica, running or not): name, seq, time, held blocks and bytes."""
    from mirrorfs.store.device import BlockFile
    from mirrorfs.store.files import BLOCK_FILE
    from mirrorfs.store.geometry import VolumeSuper
    from mirrorfs.store.snapshots import read_listing

    block_file = os.path.join(path, BLOCK_FILE)
    if not os.path.exists(block_file):
        raise CliError(f"{path}: not a mirrorfs volume")
    fd = os.open(block_file, os.O_RDONLY)
    try:
        sb = VolumeSuper.unpack(os.pread(fd, 4096, 0), block_file)
    finally:
        os.close(fd)
    blocks = BlockFile(block_file, sb.block_size, sb.block_count, read_only=True)
    try:
        items = read_listing(blocks.read, sb)
    finally:
        blocks.close()
    return [dict(c.as_dict(), held_bytes=c.held * sb.block_size) for c in items]


def _list(path: str, as_json: bool) -> int:
    rows = checkpoint_rows(path)
    if as_json:
        from mirrorfs.node.json_report import print_json, report

        print_json(report("checkpoint-list", volume_dir=path, checkpoints=rows))
        return 0
    if not rows:
        print("no checkpoints")
        return 0
    print(f"{'NAME':<24} {'SEQ':>10}  {'TIME (UTC)':<19}  HELD")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["time"]))
        held = humanize.naturalsize(r["held_bytes"], binary=True)
        print(f"{r['name']:<24} {r['seq']:>10}  {when:<19}  {held}")
    return 0


def _mount(path: str, args: Any) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        what = "is not a directory" if os.path.exists(mountpoint) else "does not exist"
        raise CliError(f"mountpoint {mountpoint} {what}")
    argv = ["checkpoint", "mount", path, args.name, mountpoint]
    return run_detached(argv, os.path.join(path, DAEMON_LOG_FILE), "checkpoint mount")


def _mount_foreground(args: Any) -> int:
    from mirrorfs.fuse import snapshot_mount

    path = os.path.abspath(args.dir)
    setup_daemon_logging(path, debug=args.debug, ready_fd=args.ready_fd)
    return run_foreground(
        "checkpoint mount",
        args.ready_fd,
        lambda on_ready: snapshot_mount.run(path, args.name, args.mountpoint, on_ready),
    )
