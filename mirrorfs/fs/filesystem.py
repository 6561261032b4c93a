"""POSIX semantics on the blocks of a volume: no pyfuse3 types here.

Every method is synchronous and runs between two awaits of the caller, so each call is
atomic with respect to the group-commit timer: a call either completes and leaves the
filesystem consistent, or raises ``FsError`` having changed nothing (checks, including
ENOSPC, come before the first change).
Names are ``bytes``. Times are integer nanoseconds since the epoch.
Lookup counting follows the kernel's rules: lookup, create, mknod, mkdir, symlink and link
add one reference to the inode they return; ``forget`` drops references; an inode whose
link count is 0 is freed when it has no references and no open handles left. Until then it
is on the on-disk orphan list, so that a crash frees it at the next open.

The namespace operations (mknod, mkdir, symlink, link, unlink, rmdir, rename, create) live
in ``namespace.NamespaceOps``; this module holds the types, the lifecycle, attributes, file
I/O, readdir and xattrs. Semantics follow Linux ext4 errno for errno.

Where things live: a directory's entries are records in its data blocks (``directories``);
the parent of a directory is kept in its inode's ``rdev`` field, which directories do not
otherwise use (``getattr`` reports rdev 0 for them), so moving a directory rewrites only
its inode, which rename writes anyway for ctime.
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from collections.abc import Iterable, Iterator

from mirrorfs.fs import filedata, inodes, xattrs
from mirrorfs.fs.api import (
    MAX_FILE_SIZE,
    AtimePolicy,
    Attr,
    FsError,
    SetAttr,
    StatFs,
    clamp_time,
)
from mirrorfs.fs.directories import DirectoryStore
from mirrorfs.fs.layout import Inode
from mirrorfs.fs.namespace import LINK_MAX, MAX_NAME, MAX_SYMLINK, NamespaceOps, check_name
from mirrorfs.store.blockstore import BlockStore
from mirrorfs.store.txn import Hint, HintKind

log = logging.getLogger(__name__)

__all__ = [
    "LINK_MAX",
    "MAX_FILE_SIZE",
    "MAX_NAME",
    "MAX_SYMLINK",
    "ROOT_INO",
    "Attr",
    "Filesystem",
    "FsError",
    "SetAttr",
    "StatFs",
    "check_name",
]

ROOT_INO = 1
# relatime: refresh atime at least this often even when it is newer than mtime and ctime.
RELATIME_NS = 24 * 3600 * 10**9
XATTR_PREFIXES = (b"user.", b"trusted.", b"security.")
FALLOC_FL_KEEP_SIZE = 1

SAVE_HEADROOM = filedata.SAVE_HEADROOM


class Filesystem(NamespaceOps):
    """The filesystem on an opened Volume (see the module docstring)."""

    def __init__(
        self,
        volume: BlockStore,
        *,
        read_only: bool = False,
        atime: AtimePolicy = AtimePolicy.RELATIME,
        diratime: bool = True,
    ) -> None:
        """Open the filesystem on an opened Volume; frees orphan inodes left by a crash.

        ``atime`` and ``diratime`` say when reads update atime (``-o noatime`` etc.)."""
        self.volume = volume
        self.read_only = bool(read_only or volume.read_only)
        self.atime, self.diratime = atime, diratime
        self.block_size: int = volume.block_size
        self.sb = inodes.read_super(volume)
        self.inodes = inodes.InodeTable(volume, self.sb)
        self.data = filedata.FileData(volume, self.inodes)
        self.xattrs = xattrs.XattrStore(volume, self.data)
        self.dirs = DirectoryStore(volume, self.data)
        # Kernel references (lookup counts) and open handles per inode number.
        self._refs: dict[int, int] = {}
        self._opens: dict[int, int] = {}
        if not self.read_only:
            self._free_orphans()

    @staticmethod
    def format(volume: BlockStore, *, inode_count: int, uid: int = 0, gid: int = 0) -> None:
        """Write an empty filesystem (root directory mode 0o755) onto a fresh volume."""
        sb = inodes.format_layout(volume, inode_count)
        table = inodes.InodeTable(volume, sb)
        now = time.time_ns()
        root = table.allocate(stat.S_IFDIR | 0o755, uid, gid, now)
        if root.ino != ROOT_INO:
            raise FsError(errno.EIO, f"root directory got inode {root.ino}, expected {ROOT_INO}")
        root.nlink = 2
        root.rdev = ROOT_INO  # the root is its own parent
        table.put(root)
        volume.commit()

    def _free_orphans(self) -> None:
        freed = 0
        for ino in self.inodes.orphans():
            inode = self.inodes.get(ino)
            if inode.nlink == 0:
                self._destroy(inode)
                freed += 1
            else:  # linked again before the crash: just take it off the list
                self.inodes.remove_orphan(inode)
        if freed:
            log.info("freed %d orphan inode(s) left by an unclean shutdown", freed)
            self.volume.commit()

    def close(self) -> None:
        """Drop caches; does not commit."""
        self.dirs.clear()
        self._refs.clear()
        self._opens.clear()

    def invalidate(self, hints: Iterable[Hint]) -> None:
        """Forget cached state that a transaction applied underneath us changed (replica)."""
        for h in hints:
            if h.kind in (HintKind.INODE_UPDATED, HintKind.INODE_DELETED):
                self.inodes.refresh(h.ino)
                self.dirs.forget(h.ino)
            else:
                self.dirs.forget(h.parent)

    def invalidate_all(self) -> list[int]:
        """Forget every cached inode and directory (a resync may have changed any block).

        Returns the inodes the kernel holds references to, whose kernel caches the caller
        should drop as well.
        """
        self.inodes.refresh_all()
        self.dirs.clear()
        return sorted(self._refs)

    # ------------------------------------------------------------------------------ helpers

    @staticmethod
    def _now() -> int:
        return time.time_ns()

    def _writable(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS)
        # Checkpoints: a change may have to save the old content of the metadata blocks it
        # rewrites; refuse it up front (ENOSPC, nothing changed) rather than half-way.
        # (File data: FileData.write decides and checks for itself.)
        if not self.volume.save_room(SAVE_HEADROOM):
            raise FsError(errno.ENOSPC)

    def _get(self, ino: int) -> Inode:
        return self.inodes.get(ino)

    def _dir(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if not stat.S_ISDIR(inode.mode):
            raise FsError(errno.ENOTDIR)
        return inode

    @staticmethod
    def parent_of(dinode: Inode) -> int:
        """The parent directory of directory ``dinode`` (the root is its own parent)."""
        return dinode.rdev or ROOT_INO

    @staticmethod
    def _set_parent(dinode: Inode, parent: int) -> None:
        dinode.rdev = parent

    def _attr(self, inode: Inode) -> Attr:
        is_dir = stat.S_ISDIR(inode.mode)
        return Attr(
            ino=inode.ino,
            generation=inode.generation,
            mode=inode.mode,
            nlink=inode.nlink,
            uid=inode.uid,
            gid=inode.gid,
            rdev=0 if is_dir else inode.rdev,
            size=inode.size,
            blocks=inode.blocks * (self.block_size // 512),
            blksize=self.block_size,
            atime_ns=inode.atime_ns,
            mtime_ns=inode.mtime_ns,
            ctime_ns=inode.ctime_ns,
        )

    def _hint(self, kind: HintKind, ino: int, parent: int = 0, name: bytes = b"") -> None:
        self.volume.hint(Hint(kind, ino, parent, name))

    def _ref(self, ino: int, n: int = 1) -> None:
        self._refs[ino] = self._refs.get(ino, 0) + n

    def _in_use(self, ino: int) -> bool:
        return bool(self._refs.get(ino) or self._opens.get(ino))

    def _drop_link(self, inode: Inode) -> None:
        """Write ``inode`` after its link count went down; free or orphan it at zero."""
        if inode.nlink > 0:
            self.inodes.put(inode)
        elif self._in_use(inode.ino):
            self.inodes.add_orphan(inode)  # writes the inode with its list link
        else:
            self._destroy(inode)

    def _maybe_free(self, ino: int) -> None:
        if self.read_only or ino == ROOT_INO or self._in_use(ino):
            return
        try:
            inode = self.inodes.get(ino)
        except FsError:
            return
        if inode.nlink == 0:
            self._destroy(inode)

    def _destroy(self, inode: Inode) -> None:
        """Free everything of an inode whose last link and last reference are gone."""
        if stat.S_ISDIR(inode.mode):
            self.dirs.forget(inode.ino)
        self.xattrs.free(inode)
        self.data.free_all(inode)
        self.inodes.release(inode)
        self._refs.pop(inode.ino, None)
        self._opens.pop(inode.ino, None)

    def _touch_atime(self, inode: Inode) -> None:
        """A read's atime update, by the policy: relatime (only when atime is not newer than
        mtime/ctime or a day old), strictatime (always) or noatime (never)."""
        if self.read_only or self.atime is AtimePolicy.NOATIME:
            return
        if not self.diratime and stat.S_ISDIR(inode.mode):
            return
        now = self._now()
        a = inode.atime_ns
        strict = self.atime is AtimePolicy.STRICTATIME
        if strict or a <= inode.mtime_ns or a <= inode.ctime_ns or now - a >= RELATIME_NS:
            inode.atime_ns = now
            self.inodes.put(inode)

    # -------------------------------------------------------------- lookups and attributes

    def lookup(self, parent: int, name: bytes) -> Attr:
        """The inode named ``name`` in directory ``parent`` (+1 ref); b"." and b".." too.

        b"." is also how the kernel finds an inode again by number after it evicted it, to
        serve a file handle (open_by_handle_at, NFS; FUSE_EXPORT_SUPPORT, which pyfuse3
        asks for): then ``parent`` is that inode, of any type. A freed or deleted inode is
        ENOENT, which the kernel turns into ESTALE; a reused number has a new generation,
        which the kernel checks against the handle's.
        """
        if name == b".":
            inode = self._get(parent)
            if inode.nlink == 0:
                raise FsError(errno.ENOENT, f"inode {parent} is deleted")
        elif name == b"..":
            inode = self.inodes.get(self.parent_of(self._dir(parent)))
        else:
            dinode = self._dir(parent)
            check_name(name)
            found = self.dirs.lookup(dinode, name)
            if found is None:
                raise FsError(errno.ENOENT)
            inode = self.inodes.get(found[0])
        self._ref(inode.ino)
        return self._attr(inode)

    def add_ref(self, ino: int) -> None:
        """+1 reference (a readdirplus entry accepted by the kernel)."""
        self._ref(ino)

    def forget(self, ino: int, nlookup: int) -> None:
        """Drop ``nlookup`` references; frees an unlinked inode with nothing left."""
        left = self._refs.get(ino, 0) - nlookup
        if left > 0:
            self._refs[ino] = left
            return
        self._refs.pop(ino, None)
        self._maybe_free(ino)

    def getattr(self, ino: int) -> Attr:
        return self._attr(self._get(ino))

    def setattr(self, ino: int, changes: SetAttr) -> Attr:
        """chmod, chown, truncate, utimes in one call; ctime becomes now (or the one given)."""
        self._writable()
        inode = self._get(ino)
        now = self._now()
        size = changes.size
        # The writeback cache owns a regular file's times: only the ones it sends count.
        own_times = not (changes.caller_times and stat.S_ISREG(inode.mode))
        if size is not None:
            if stat.S_ISDIR(inode.mode):
                raise FsError(errno.EISDIR)
            if not stat.S_ISREG(inode.mode):
                raise FsError(errno.EINVAL)
            if size < 0:
                raise FsError(errno.EINVAL)
            if size > MAX_FILE_SIZE:
                raise FsError(errno.EFBIG)
            # First, since it is the only part that can fail (ENOSPC) once checks pass.
            if size != inode.size:
                self.data.truncate(inode, size)
            # The truncate syscalls update mtime/ctime even when the size stays (Linux VFS).
            if own_times:
                inode.mtime_ns = now
        if changes.mode is not None:
            inode.mode = stat.S_IFMT(inode.mode) | (changes.mode & 0o7777)
        if changes.uid is not None or changes.gid is not None:
            if changes.uid is not None:
                inode.uid = changes.uid
            if changes.gid is not None:
                inode.gid = changes.gid
            if not stat.S_ISDIR(inode.mode):
                # Linux: chown drops set-user-ID, and set-group-ID when it means "setgid"
                # (group-exec set) rather than mandatory locking.
                inode.mode &= ~stat.S_ISUID
                if inode.mode & stat.S_IXGRP:
                    inode.mode &= ~stat.S_ISGID
        if changes.atime_ns is not None:
            inode.atime_ns = clamp_time(changes.atime_ns)
        if changes.mtime_ns is not None:
            inode.mtime_ns = clamp_time(changes.mtime_ns)
        if changes.ctime_ns is not None:
            inode.ctime_ns = clamp_time(changes.ctime_ns)
        elif own_times:
            inode.ctime_ns = now
        self.inodes.put(inode)
        return self._attr(inode)

    def readlink(self, ino: int) -> bytes:
        inode = self._get(ino)
        if not stat.S_ISLNK(inode.mode):
            raise FsError(errno.EINVAL)
        target = self.data.read_symlink(inode)
        self._touch_atime(inode)
        return target

    # ------------------------------------------------------------------------------ files

    def open(self, ino: int) -> None:
        """+1 open handle."""
        self._get(ino)
        self._opens[ino] = self._opens.get(ino, 0) + 1

    def release(self, ino: int) -> None:
        """-1 open handle; frees an unlinked inode with nothing left."""
        left = self._opens.get(ino, 0) - 1
        if left > 0:
            self._opens[ino] = left
            return
        self._opens.pop(ino, None)
        self._maybe_free(ino)

    def _file(self, ino: int) -> Inode:
        inode = self._get(ino)
        if stat.S_ISDIR(inode.mode):
            raise FsError(errno.EISDIR)
        return inode

    def read(self, ino: int, offset: int, size: int) -> bytes:
        inode = self._file(ino)
        if offset < 0 or size < 0:
            raise FsError(errno.EINVAL)
        if offset >= inode.size or size == 0:
            return b""
        data = self.data.read(inode, offset, min(size, inode.size - offset))
        self._touch_atime(inode)
        return data

    def write(self, ino: int, offset: int | None, data: bytes) -> int:
        """Write ``data`` at ``offset`` (None: at the end); zero-fills a gap past EOF."""
        self._writable()  # FileData.write checks room for the saved copies it needs
        inode = self._file(ino)
        if offset is None:
            offset = inode.size
        if offset < 0:
            raise FsError(errno.EINVAL)
        if offset >= MAX_FILE_SIZE and data:
            raise FsError(errno.EFBIG)
        if not data:
            return 0
        # A write that crosses the maximum size is short, as on Linux (FileData clips it).
        n = self.data.write(inode, offset, data)
        inode.mtime_ns = inode.ctime_ns = self._now()
        self.inodes.put(inode)
        return n

    def fallocate(self, ino: int, mode: int, offset: int, length: int) -> None:
        """Mode 0 (extend size) or FALLOC_FL_KEEP_SIZE; other modes EOPNOTSUPP."""
        self._writable()
        inode = self._file(ino)
        if not stat.S_ISREG(inode.mode):
            raise FsError(errno.ENODEV)
        if offset < 0 or length <= 0:
            raise FsError(errno.EINVAL)
        if mode & ~FALLOC_FL_KEEP_SIZE:
            raise FsError(errno.EOPNOTSUPP)
        if offset + length > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG)
        self.data.fallocate(inode, offset, length, bool(mode & FALLOC_FL_KEEP_SIZE))
        inode.mtime_ns = inode.ctime_ns = self._now()
        self.inodes.put(inode)

    # ------------------------------------------------------------------------ directories

    def readdir(self, ino: int, cookie: int) -> Iterator[tuple[bytes, Attr, int]]:
        """(name, attr, next_cookie) from ``cookie`` (0 = start), b"." and b".." first.

        Cookie 1 = after ".", 2 = after "..", p + 3 = after the entry at byte position p of
        the directory data; entries never move, so cookies survive additions and removals.
        """
        dinode = self._dir(ino)
        if cookie == 0:
            self._touch_atime(dinode)
            yield b".", self._attr(dinode), 1
        if cookie <= 1:
            yield b"..", self._attr(self.inodes.get(self.parent_of(dinode))), 2
        for pos, name, child, _dtype in self.dirs.entries(dinode, max(cookie - 2, 0)):
            try:
                inode = self.inodes.get(child)
            except FsError:
                log.error("directory %d: entry %r points at free inode %d", ino, name, child)
                continue
            yield name, self._attr(inode), pos + 3

    # ---------------------------------------------------------------------------- xattrs

    def _xattr_target(self, ino: int, name: bytes, *, write: bool) -> Inode:
        if not name.startswith(XATTR_PREFIXES):
            raise FsError(errno.EOPNOTSUPP)
        if name in XATTR_PREFIXES:
            raise FsError(errno.EINVAL)
        inode = self._get(ino)
        if name.startswith(b"user.") and not (stat.S_ISREG(inode.mode) or stat.S_ISDIR(inode.mode)):
            # Linux: user.* only on regular files and directories.
            raise FsError(errno.EPERM if write else errno.ENODATA)
        return inode

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """The value of xattr ``name``; ENODATA if absent."""
        return self.xattrs.get(self._xattr_target(ino, name, write=False), name)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        """Set xattr ``name``; ``flags`` XATTR_CREATE (EEXIST) / XATTR_REPLACE (ENODATA)."""
        self._writable()
        inode = self._xattr_target(ino, name, write=True)
        self.xattrs.set(inode, name, value, flags)
        inode.ctime_ns = self._now()
        self.inodes.put(inode)

    def listxattr(self, ino: int) -> list[bytes]:
        return self.xattrs.list(self._get(ino))

    def removexattr(self, ino: int, name: bytes) -> None:
        self._writable()
        inode = self._xattr_target(ino, name, write=True)
        self.xattrs.remove(inode, name)
        inode.ctime_ns = self._now()
        self.inodes.put(inode)

    # ---------------------------------------------------------------------------- statfs

    def statfs(self) -> StatFs:
        alloc = self.volume.allocator
        # The free part of the checkpoint save area is free but not available to files;
        # what checkpoints hold there counts as used.
        spare = getattr(self.volume, "spare_blocks", 0)
        return StatFs(
            block_size=self.block_size,
            blocks=alloc.total,
            blocks_free=alloc.free_count + spare,
            blocks_avail=alloc.free_count,
            files=self.inodes.total,
            files_free=self.inodes.free_count,
            name_max=MAX_NAME,
        )
