"""The handlers of the passthrough filesystem (bench/passthrough.py): every request is
forwarded to a local *source* directory with plain system calls on real file descriptors.

Inode numbers: the FUSE inode of an entry is the st_ino of the source entry, except that
the source root is FUSE inode 1 (pyfuse3.ROOT_INODE); a source entry whose st_ino happens
to be 1 takes the root's st_ino instead (a swap keeps the mapping one-to-one). The source
must be a single filesystem (no mount points inside it), otherwise st_ino is not unique.

For every inode known to the kernel (lookup count > 0) the filesystem keeps the set of
source paths that reach it (more than one for hard links) and its lookup count. A renamed
directory rewrites the paths of everything below it. An inode whose last path is gone but
which is still open is served through one of its open file descriptors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pyfuse3

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# The kernel has already applied the caller's umask to every mode that it sends.
# The kernel computes append offsets itself, and pyfuse3's buffers are not aligned for
# O_DIRECT (the kernel already bypasses its page cache for an O_DIRECT open of this mount).
_OPEN_FLAGS_DROPPED = os.O_APPEND | os.O_DIRECT

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_AT_FDCWD = -100


def _renameat2(old: str, new: str, flags: int) -> None:
    """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE, which the os module lacks."""
    ret = _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags)
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)


class PassthroughOperations(pyfuse3.Operations):
    """pyfuse3 handlers that forward every request to a source directory."""

    supports_dot_lookup = True

    def __init__(
        self, source: str, *, writeback_cache: bool = False, timeout: float = 300.0
    ) -> None:
        super().__init__()
        self.enable_writeback_cache = writeback_cache
        self._source = os.path.abspath(source)
        self._timeout = timeout
        self._root_st_ino = os.lstat(self._source).st_ino
        # FUSE inode -> source paths that reach it; FUSE inode -> kernel lookup count.
        self._paths: dict[int, set[str]] = {pyfuse3.ROOT_INODE: {self._source}}
        self._lookups: dict[int, int] = {pyfuse3.ROOT_INODE: 1}
        # Open file descriptors (the FUSE file handles) by FUSE inode and vice versa.
        self._fds_of: dict[int, set[int]] = {}
        self._inode_of_fd: dict[int, int] = {}
        # Directory handles: a listing snapshot, taken when a readdir cycle starts.
        self._dirs: dict[int, tuple[int, list[tuple[str, os.stat_result]]]] = {}  # name, stat
        self._next_dir_fh = 1

    # ---- inode and path bookkeeping -------------------------------------------------------

    def _fuse_ino(self, st_ino: int) -> int:
        if st_ino == self._root_st_ino:
            return pyfuse3.ROOT_INODE
        if st_ino == pyfuse3.ROOT_INODE:
            return self._root_st_ino
        return st_ino

    def _path(self, inode: int) -> str:
        """Any source path of *inode*; ENOENT when it has none left."""
        paths = self._paths.get(inode)
        if not paths:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return next(iter(paths))

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _remember(self, inode: int, path: str, lookups: int = 1) -> None:
        """Count *lookups* new kernel references to *inode*, reachable through *path*."""
        self._paths.setdefault(inode, set()).add(path)
        self._lookups[inode] = self._lookups.get(inode, 0) + lookups

    def _drop_path(self, st_ino: int, path: str) -> None:
        """Drop *path*, just removed from the source, from the paths of its inode."""
        paths = self._paths.get(self._fuse_ino(st_ino))
        if paths is not None:
            paths.discard(path)

    def _move_paths(self, old: str, new: str) -> None:
        """After renaming *old* to *new*, rewrite the known paths at and below *old*."""
        prefix = old + os.sep
        for paths in self._paths.values():
            moved = {p for p in paths if p == old or p.startswith(prefix)}
            if moved:
                paths.difference_update(moved)
                paths.update(new + p[len(old) :] for p in moved)

    def _attrs(self, st: os.stat_result, inode: int | None = None) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode if inode is not None else self._fuse_ino(st.st_ino)
        entry.generation = 0
        entry.entry_timeout = self._timeout
        entry.attr_timeout = self._timeout
        entry.st_mode = st.st_mode
        entry.st_nlink = st.st_nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_size = st.st_size
        entry.st_blksize = st.st_blksize
        entry.st_blocks = st.st_blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        return entry

    def _stat(self, inode: int, fh: int | None = None) -> os.stat_result:
        """Stat *inode* through *fh*, one of its paths, or failing that an open fd."""
        if fh is not None:
            return os.fstat(fh)
        paths = self._paths.get(inode)
        if paths:
            return os.lstat(next(iter(paths)))
        fds = self._fds_of.get(inode)
        if fds:
            return os.fstat(next(iter(fds)))
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _lookup_path(self, path: str) -> pyfuse3.EntryAttributes:
        """Stat *path* and count one kernel reference to its inode."""
        entry = self._attrs(_call(os.lstat, path))
        self._remember(entry.st_ino, path)
        return entry

    def _chown_to_caller(self, path: str, ctx: pyfuse3.RequestContext) -> None:
        if ctx.uid != os.geteuid() or ctx.gid != os.getegid():
            _call(os.chown, path, ctx.uid, ctx.gid, follow_symlinks=False)

    # ---- entries ----------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Resolve *name* in *parent_inode*, including "." and ".."."""
        parent = self._path(parent_inode)
        if name == b".":
            path = parent
        elif name == b"..":
            path = parent if parent == self._source else os.path.dirname(parent)
        else:
            path = os.path.join(parent, os.fsdecode(name))
        return self._lookup_path(path)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Drop kernel references; an inode nobody references is forgotten."""
        for inode, count in inode_list:
            if inode == pyfuse3.ROOT_INODE:
                continue  # the root stays known for the life of the mount
            left = self._lookups.get(inode, 0) - count
            if left > 0:
                self._lookups[inode] = left
                continue
            self._lookups.pop(inode, None)
            self._paths.pop(inode, None)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """Stat the source entry of *inode*."""
        return self._attrs(_call(self._stat, inode), inode)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        """Apply size, mode, owner and times, through *fh* when the call had one."""
        target: int | str = fh if fh is not None else self._path(inode)
        follow = fh is not None  # a path must not follow a symlink; an fd has nothing to follow
        if fields.update_size:
            _call(os.truncate, target, attr.st_size)
        if fields.update_mode:
            _call(os.chmod, target, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            _call(os.chown, target, uid, gid, follow_symlinks=follow)
        if fields.update_atime or fields.update_mtime:
            current = _call(self._stat, inode, fh)
            atime = attr.st_atime_ns if fields.update_atime else current.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns
            _call(os.utime, target, ns=(atime, mtime), follow_symlinks=follow)
        return self._attrs(_call(self._stat, inode, fh), inode)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        """Return the target of a symlink."""
        return os.fsencode(_call(os.readlink, self._path(inode)))

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Create a device node, FIFO, socket or regular file."""
        path = self._child(parent_inode, name)
        _call(os.mknod, path, mode, rdev)
        self._chown_to_caller(path, ctx)
        return self._lookup_path(path)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Create a directory."""
        path = self._child(parent_inode, name)
        _call(os.mkdir, path, mode)
        self._chown_to_caller(path, ctx)
        return self._lookup_path(path)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Remove a non-directory entry."""
        path = self._child(parent_inode, name)
        st = _call(os.lstat, path)
        _call(os.unlink, path)
        self._drop_path(st.st_ino, path)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Remove an empty directory."""
        path = self._child(parent_inode, name)
        st = _call(os.lstat, path)
        _call(os.rmdir, path)
        self._drop_path(st.st_ino, path)

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Create a symlink to *target*."""
        path = self._child(parent_inode, name)
        _call(os.symlink, os.fsdecode(target), path)
        self._chown_to_caller(path, ctx)
        return self._lookup_path(path)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        """Rename, honouring RENAME_NOREPLACE and RENAME_EXCHANGE."""
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            _call(_renameat2, old, new, flags)
            # Swap the two subtrees' paths through a name that cannot exist.
            parking = new + "\0"
            self._move_paths(old, parking)
            self._move_paths(new, old)
            self._move_paths(parking, new)
            return
        if flags:
            _call(_renameat2, old, new, flags)
        else:
            try:
                replaced = os.lstat(new).st_ino
            except OSError:
                replaced = None
            _call(os.rename, old, new)
            if replaced is not None:
                self._drop_path(replaced, new)
        self._move_paths(old, new)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Create a hard link to *inode*."""
        path = self._child(new_parent_inode, new_name)
        _call(os.link, self._path(inode), path, follow_symlinks=False)
        return self._lookup_path(path)

    # ---- directories ------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """Open a directory handle; the listing is read when a readdir cycle starts."""
        self._path(inode)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = (inode, [])
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """List the directory from a snapshot, so concurrent changes never skip an entry."""
        inode, listing = self._dirs[fh]
        if start_id == 0:
            listing = []
            with _call(os.scandir, self._path(inode)) as it:
                for dirent in it:
                    try:
                        listing.append((dirent.name, dirent.stat(follow_symlinks=False)))
                    except FileNotFoundError:
                        continue  # removed while we listed it
            self._dirs[fh] = (inode, listing)
        for index in range(start_id, len(listing)):
            name, st = listing[index]
            entry = self._attrs(st)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), entry, index + 1):
                break
            # Joined now, not at snapshot time: the directory may have been renamed since.
            self._remember(entry.st_ino, os.path.join(self._path(inode), name))

    async def releasedir(self, fh: int) -> None:
        """Drop the directory handle and its snapshot."""
        self._dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """fsync the source directory."""
        inode, _ = self._dirs[fh]
        fd = _call(os.open, self._path(inode), os.O_RDONLY | os.O_DIRECTORY)
        try:
            _call(os.fsync, fd)
        finally:
            os.close(fd)

    # ---- files ------------------------------------------------------------------------------

    def _open_flags(self, flags: int) -> int:
        flags &= ~_OPEN_FLAGS_DROPPED
        if self.enable_writeback_cache and flags & os.O_ACCMODE == os.O_WRONLY:
            # With the writeback cache the kernel may read pages of a write-only file.
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    def _track_fd(self, inode: int, fd: int) -> pyfuse3.FileInfo:
        self._fds_of.setdefault(inode, set()).add(fd)
        self._inode_of_fd[fd] = inode
        return pyfuse3.FileInfo(fh=fd)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """Open the source file; the fd is the FUSE file handle."""
        fd = _call(os.open, self._path(inode), self._open_flags(flags))
        return self._track_fd(inode, fd)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """Create and open a regular file."""
        path = self._child(parent_inode, name)
        fd = _call(os.open, path, self._open_flags(flags) | os.O_CREAT, stat.S_IMODE(mode))
        try:
            if ctx.uid != os.geteuid() or ctx.gid != os.getegid():
                _call(os.fchown, fd, ctx.uid, ctx.gid)
            entry = self._attrs(_call(os.fstat, fd))
        except BaseException:
            os.close(fd)
            raise
        self._remember(entry.st_ino, path)
        return self._track_fd(entry.st_ino, fd), entry

    async def read(self, fh: int, off: int, size: int) -> bytes:
        """pread from the source file."""
        return _call(os.pread, fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """pwrite all of *buf* to the source file."""
        view = memoryview(buf)
        done = 0
        while done < len(view):
            done += _call(os.pwrite, fh, view[done:], off + done)
        return done

    async def flush(self, fh: int) -> None:
        """Nothing to do: writes go straight to the source file."""

    async def release(self, fh: int) -> None:
        """Close the source fd."""
        inode = self._inode_of_fd.pop(fh, None)
        if inode is not None:
            fds = self._fds_of.get(inode)
            if fds is not None:
                fds.discard(fh)
                if not fds:
                    del self._fds_of[inode]
        os.close(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        """fdatasync or fsync the source file."""
        _call(os.fdatasync if datasync else os.fsync, fh)

    # ---- whole filesystem and xattrs --------------------------------------------------------

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """statvfs of the source filesystem."""
        sv = _call(os.statvfs, self._source)
        data = pyfuse3.StatvfsData()
        for name in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(data, name, getattr(sv, name))
        return data

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        """Read an extended attribute (not following symlinks)."""
        return _call(os.getxattr, self._path(inode), name, follow_symlinks=False)

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        """Set an extended attribute (not following symlinks)."""
        _call(os.setxattr, self._path(inode), name, value, follow_symlinks=False)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        """List extended attribute names (not following symlinks)."""
        names = _call(os.listxattr, self._path(inode), follow_symlinks=False)
        return [os.fsencode(n) for n in names]

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Remove an extended attribute (not following symlinks)."""
        _call(os.removexattr, self._path(inode), name, follow_symlinks=False)


def _call(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run a system call, turning OSError into the FUSEError of the same errno."""
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
