"""Typed fakes of the filesystem and the volume, for driving the FUSE adapter without a mount.

A fake defines exactly the names the adapter uses, with the signatures of the real classes
(``Filesystem``, ``Volume``), and nothing else: a name it does not know is an
AttributeError, not a silent answer. tests/test_adapter.py checks every name of each fake
against its real class, so a renamed or re-typed method fails a test instead of passing
against a fake that no longer matches.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from types import SimpleNamespace

import pyfuse3
import pytest

from mirrorfs.fs.filesystem import Attr, SetAttr, StatFs
from mirrorfs.fuse.operations import Operations
from mirrorfs.store.core import VolumeCondition


def _attr(ino: int = 5, mode: int = stat.S_IFREG | 0o644, size: int = 0) -> Attr:
    return Attr(ino, 1, mode, 1, 0, 0, 0, size, 0, 4096, 1, 2, 3)


class FakeFs:
    """The ``Filesystem`` methods the adapter calls: records calls; ``fail`` maps a method
    name to the exception it raises."""

    #: Bookkeeping of the fake itself (not names of ``Filesystem``).
    RECORDING = frozenset({"calls", "fail", "refs"})
    __slots__ = ("calls", "fail", "refs")

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.fail: dict[str, BaseException] = {}
        self.refs: dict[int, int] = {}

    def _call(self, name: str, *args: object) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]

    # -- lookups and attributes

    def lookup(self, parent: int, name: bytes) -> Attr:
        self._call("lookup", parent, name)
        return _attr()

    def add_ref(self, ino: int) -> None:
        self._call("add_ref", ino)
        self.refs[ino] = self.refs.get(ino, 0) + 1

    def forget(self, ino: int, nlookup: int) -> None:
        self._call("forget", ino, nlookup)

    def getattr(self, ino: int) -> Attr:
        self._call("getattr", ino)
        return _attr(mode=stat.S_IFDIR | 0o755)

    def setattr(self, ino: int, changes: SetAttr) -> Attr:
        self._call("setattr", ino, changes)
        return _attr()

    def readlink(self, ino: int) -> bytes:
        self._call("readlink", ino)
        return b""

    # -- the namespace

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        self._call("mknod", parent, name, mode, rdev, uid, gid)
        return _attr()

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        self._call("mkdir", parent, name, mode, uid, gid)
        return _attr()

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        self._call("symlink", parent, name, target, uid, gid)
        return _attr()

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        self._call("link", ino, new_parent, new_name)
        return _attr()

    def unlink(self, parent: int, name: bytes) -> None:
        self._call("unlink", parent, name)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._call("rmdir", parent, name)

    def rename(
        self,
        old_parent: int,
        old_name: bytes,
        new_parent: int,
        new_name: bytes,
        flags: int = 0,
        uid: int = 0,
        gid: int = 0,
    ) -> None:
        self._call("rename", old_parent, old_name, new_parent, new_name, flags, uid, gid)

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        self._call("create", parent, name, mode, uid, gid)
        return _attr()

    # -- file data

    def open(self, ino: int) -> None:
        self._call("open", ino)

    def release(self, ino: int) -> None:
        self._call("release", ino)

    def read(self, ino: int, offset: int, size: int) -> bytes:
        self._call("read", ino, offset, size)
        return b""

    def write(self, ino: int, offset: int | None, data: bytes) -> int:
        self._call("write", ino, offset, data)
        return len(data)

    # -- directories, xattrs, statfs

    def readdir(self, ino: int, cookie: int) -> Iterator[tuple[bytes, Attr, int]]:
        self._call("readdir", ino, cookie)
        return iter(
            [(b".", _attr(1, stat.S_IFDIR), 1), (b"..", _attr(1, stat.S_IFDIR), 2)]
            + [(b"f%d" % i, _attr(10 + i), 3 + i) for i in range(5)]
        )

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self._call("getxattr", ino, name)
        return b""

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self._call("setxattr", ino, name, value, flags)

    def listxattr(self, ino: int) -> list[bytes]:
        self._call("listxattr", ino)
        return []

    def removexattr(self, ino: int, name: bytes) -> None:
        self._call("removexattr", ino, name)

    def statfs(self) -> StatFs:
        self._call("statfs")
        return StatFs(4096, 1000, 500, 500, 100, 50, 255)


class FakeWriter:
    """What the adapter uses of a volume's write path (``Volume.writer``)."""

    __slots__ = ("gate",)

    def __init__(self) -> None:
        self.gate: object = None

    def attach_gate(self, gate: object) -> None:
        self.gate = gate


class FakeVolume:
    """What the adapter, its committer and its write gate use of a ``Volume``."""

    #: Bookkeeping of the fake itself (not names of ``Volume``).
    RECORDING = frozenset({"commits"})
    __slots__ = ("pending_bytes", "commits", "condition", "writer", "device")

    def __init__(self) -> None:
        self.pending_bytes = 0
        self.commits = 0
        self.condition = VolumeCondition()
        self.writer = FakeWriter()
        # What the committer's throttle reads of the in-place backlog (no flusher here).
        self.device = SimpleNamespace(driven=False, backlog_bytes=0)

    @property
    def failed(self) -> str | None:
        return self.condition.failed

    def commit(self, *, sync: bool = True) -> int | None:
        self.commits += 1
        self.pending_bytes = 0
        return self.commits


CTX = SimpleNamespace(uid=1000, gid=1000, umask=0o022, pid=1)


def make_ops(**kwargs) -> tuple[Operations, FakeFs, FakeVolume]:
    """An ``Operations`` adapter over a fresh ``FakeFs`` and ``FakeVolume``."""
    fs, vol = FakeFs(), FakeVolume()
    return Operations(fs, vol, **kwargs), fs, vol


async def fuse_errno(coro) -> int:
    """Await ``coro``, which must fail with a ``FUSEError``; its errno."""
    with pytest.raises(pyfuse3.FUSEError) as info:
        await coro
    return info.value.errno
