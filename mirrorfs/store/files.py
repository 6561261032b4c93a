"""The files of a volume directory, and atomic replacement of a small file.

A volume directory holds what the block store owns (the block file, the SAM log, node
state, the resync stage, the archive of diverged records) and what the daemon that serves
it keeps beside them (pid file, log file, control socket). Every module names these files
through the constants here, so that one spelling exists for each.

``atomic_write`` is borg's SaveFile: the new content goes to ``NAME.tmp``, is fsync'd,
renamed over ``NAME``, and the directory is fsync'd, so that after a crash ``NAME`` holds
either the old or the new content, whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

# owned by the block store
BLOCK_FILE = "blocks"
LOG_DIR = "log"
LOCK_FILE = "lock"
NODE_FILE = "node.json"
ARCHIVE_DIR = "archive"
# inside LOG_DIR, beside the segments: the highest seq once durable (store/syncmark.py);
# a dot name, so that it sorts before every segment file
SYNC_MARK_FILE = ".synced"

# kept beside the volume by the process that serves it
MOUNT_PID_FILE = "mount.pid"
REPLICA_PID_FILE = "replica.pid"
DAEMON_LOG_FILE = "mirrorfs.log"
CONTROL_SOCKET = "control.sock"

Data = bytes | bytearray | memoryview


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so that the names created or removed in it survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: Data) -> None:
    """``os.write`` until every byte of ``data`` is written."""
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.write(fd, view[done:])


def atomic_write(
    path: str | os.PathLike[str],
    data: Data | Iterable[Data],
    *,
    mode: int = 0o600,
    durable: bool = True,
) -> None:
    """Replace the file at ``path`` with ``data`` (bytes, or an iterable of byte chunks).

    With ``durable`` (the default) the file and its directory are fsync'd: after a crash
    the file is either the old one or the new one. ``durable=False`` keeps the rename's
    atomicity for readers but skips both fsyncs (pid files, which a crash makes stale
    anyway).
    """
    path = os.fspath(path)
    tmp = path + ".tmp"
    chunks = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        for chunk in chunks:
            write_all(fd, chunk)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(path) or ".")
