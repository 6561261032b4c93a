"""Linux system calls that Python's os module lacks, through ctypes, for mount tests:
name_to_handle_at(2), open_by_handle_at(2), renameat2(2)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_FDCWD = -100
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2
MAX_HANDLE_SZ = 128


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    ]


def _check(ret: int, what: str, path: str = "") -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path or None)
    return ret


def name_to_handle_at(path: str) -> _FileHandle:
    """The kernel's file handle of ``path`` (name_to_handle_at(AT_FDCWD, path, ...))."""
    fh = _FileHandle()
    fh.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    ret = _libc.name_to_handle_at(
        AT_FDCWD, os.fsencode(path), ctypes.byref(fh), ctypes.byref(mount_id), 0
    )
    _check(ret, "name_to_handle_at", path)
    return fh


def open_by_handle_at(mount_fd: int, fh: _FileHandle, flags: int = os.O_RDONLY) -> int:
    """A file descriptor for the file behind ``fh`` (needs CAP_DAC_READ_SEARCH)."""
    return _check(_libc.open_by_handle_at(mount_fd, ctypes.byref(fh), flags), "open_by_handle_at")


def renameat2(old: str, new: str, flags: int) -> None:
    """renameat2(AT_FDCWD, old, AT_FDCWD, new, flags)."""
    ret = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    _check(ret, "renameat2", old)


def drop_caches() -> None:
    """Make the kernel forget unused dentries and inodes (and page cache): needs root."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
