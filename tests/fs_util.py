"""Fixtures and helpers of the filesystem API tests (tests/test_fs_api.py, test_fs_times.py,
test_fs_rename.py): a formatted volume, a Filesystem on it, errno assertions."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from mirrorfs.fs.filesystem import ROOT_INO, Filesystem, FsError
from mirrorfs.store.volume import Volume

MiB = 1 << 20
R = ROOT_INO


def new_volume(tmp_path) -> str:
    """A 32 MiB volume with an empty filesystem (2000 inodes); its path. Each test module
    makes it its ``vol_path`` fixture: ``vol_path = pytest.fixture(new_volume, name=...)``."""
    path = str(tmp_path / "vol")
    Volume.create(path, 32 * MiB)
    vol = Volume.open(path)
    Filesystem.format(vol, inode_count=2000, uid=0, gid=0)
    vol.close()
    return path


def open_filesystem(vol_path: str) -> Iterator[Filesystem]:
    """The ``fs`` fixture of each test module: a Filesystem on ``vol_path``, closed after."""
    vol = Volume.open(vol_path)
    f = Filesystem(vol)
    yield f
    f.close()
    vol.close()


def err(exc_info) -> int:
    return exc_info.value.errno


def raises(code: int, fn, *args, **kw) -> None:
    with pytest.raises(FsError) as ei:
        fn(*args, **kw)
    assert ei.value.errno == code, f"expected {errno.errorcode[code]}, got {ei.value}"


def mkfile(fs: Filesystem, parent: int, name: bytes, data: bytes = b"", mode=0o644) -> int:
    a = fs.create(parent, name, mode, 0, 0)
    if data:
        fs.write(a.ino, 0, data)
    fs.release(a.ino)
    fs.forget(a.ino, 1)  # as the kernel would, eventually
    return a.ino


def names(fs: Filesystem, d: int) -> list[bytes]:
    return sorted(n for n, _, _ in fs.readdir(d, 0) if n not in (b".", b".."))
