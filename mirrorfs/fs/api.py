"""What the filesystem hands its callers: its error, its limits and its records.

The bottom of ``mirrorfs.fs``: every module of the package may import it, and it imports
none of them, so that the storage primitives (layout, extents, filedata) can raise
``FsError`` without reaching up to ``filesystem.py``.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

MAX_FILE_SIZE = 1 << 44  # 16 TiB; larger sizes get EFBIG


class AtimePolicy(enum.Enum):
    """When reads update atime: the mount options of Linux (``-o relatime`` etc.)."""

    RELATIME = "relatime"  # when not newer than mtime/ctime, or a day old (the default)
    STRICTATIME = "strictatime"  # on every read
    NOATIME = "noatime"  # never


#: The atime mount options, applied by mirrorfs itself (libfuse rejects all but noatime).
ATIME_OPTIONS = frozenset(p.value for p in AtimePolicy) | {"nodiratime"}
# Inode times are int64 nanoseconds: 1677-09-21 to 2262-04-11. Times outside are clamped to
# the nearest one, as Linux clamps to a filesystem's range (ext4: 1901 to 2446).
TIME_MIN_NS = -(1 << 63)
TIME_MAX_NS = (1 << 63) - 1


def clamp_time(ns: int) -> int:
    """``ns`` moved into the range the inode format holds."""
    return min(max(ns, TIME_MIN_NS), TIME_MAX_NS)


class FsError(OSError):
    """A POSIX error from the filesystem; ``errno`` is what the caller should answer."""

    def __init__(self, err: int, message: str = ""):
        super().__init__(err, message or errno.errorcode.get(err, str(err)))


@dataclass(slots=True)
class Attr:
    ino: int
    generation: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int  # in 512-byte units, as st_blocks
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(slots=True)
class SetAttr:
    """Fields to change; None leaves a field as it is.

    ``ctime_ns`` None: the filesystem sets ctime to now; given: the caller's (the kernel's
    writeback cache keeps ctime itself and sends it). ``caller_times``: the caller owns
    mtime and ctime of a regular file (the writeback cache): the filesystem changes them
    only to the values given, never to now, so that they stay what the kernel shows.
    """

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    caller_times: bool = False


@dataclass(slots=True)
class StatFs:
    block_size: int
    blocks: int
    blocks_free: int
    blocks_avail: int
    files: int
    files_free: int
    name_max: int
