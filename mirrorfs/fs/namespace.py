"""Namespace operations of the filesystem: create, mknod, mkdir, symlink, link, unlink, rmdir,
rename, with Linux ext4 semantics errno for errno.

``NamespaceOps`` is a mixin of ``filesystem.Filesystem``: it uses the state and helpers that
class sets up (``inodes``, ``dirs``, ``data``, ``volume``, ``_refs``, ``_get``, ``_dir``,
``_attr``, ``_drop_link``...). Errors are made with ``layout.fs_error`` because
filesystem.py imports this module.

Every operation checks everything (names, types, emptiness, link counts, free inodes and
blocks) before its first change, so an error leaves nothing half done. Timestamps: a new
inode gets atime = mtime = ctime = now; every directory whose entries change gets mtime and
ctime; every inode whose link count or parent changes gets ctime.
"""

from __future__ import annotations

import errno
import logging
import stat

from mirrorfs.fs.api import Attr
from mirrorfs.fs.directories import MAX_NAME
from mirrorfs.fs.layout import EXTENT_AREA_SIZE, ROOT_INO, Inode, fs_error
from mirrorfs.store.txn import HintKind

log = logging.getLogger(__name__)

MAX_SYMLINK = 4095
LINK_MAX = 65000
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: The source name becomes a whiteout: a character device 0:0 (overlayfs's marker).
RENAME_WHITEOUT = 4
# Blocks a directory (or a symlink target) may need to grow by one block: the block itself
# and extent-tree blocks. Checked up front so that ENOSPC never strikes half way.
GROW_BLOCKS = 3
# Bound on the walk up the tree (a loop of ".." pointers is corruption, not a hang).
MAX_DEPTH = 1 << 16
# Symlink targets up to this size live in the inode (FileData.write_symlink).
INLINE_TARGET = EXTENT_AREA_SIZE

_CREATABLE = (stat.S_IFREG, stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK)


def check_name(name: bytes) -> None:
    """EINVAL for an empty name or one holding b"/" or NUL; ENAMETOOLONG past 255 bytes."""
    if len(name) > MAX_NAME:
        raise fs_error(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name:
        raise fs_error(errno.EINVAL, f"invalid name {name!r}")


def dtype_of(mode: int) -> int:
    """The directory-entry type (DT_*) of an inode mode."""
    return (mode >> 12) & 0xF


class NamespaceOps:
    """Operations that add, remove and move directory entries (mixin of ``Filesystem``)."""

    # -------------------------------------------------------------------------- creation

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        """Create and open a regular file: +1 ref, +1 open handle; EEXIST if it exists."""
        inode = self._new_inode(parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid)
        self._opens[inode.ino] = self._opens.get(inode.ino, 0) + 1
        return self._attr(inode)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Attr:
        """Regular file, fifo, character or block device, or socket (+1 ref)."""
        fmt = stat.S_IFMT(mode) or stat.S_IFREG
        if fmt == stat.S_IFDIR:
            raise fs_error(errno.EPERM)
        if fmt not in _CREATABLE:
            raise fs_error(errno.EINVAL)
        if fmt not in (stat.S_IFCHR, stat.S_IFBLK):
            rdev = 0
        inode = self._new_inode(parent, name, fmt | (mode & 0o7777), uid, gid, rdev=rdev)
        return self._attr(inode)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        """A new, empty directory (+1 ref); the parent's link count goes up by one."""
        inode = self._new_inode(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)
        return self._attr(inode)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        """A symbolic link to ``target`` (1..4095 bytes) (+1 ref)."""
        if not target:
            raise fs_error(errno.ENOENT)
        if len(target) > MAX_SYMLINK:
            raise fs_error(errno.ENAMETOOLONG)
        inode = self._new_inode(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)
        return self._attr(inode)

    def _new_inode(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        *,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> Inode:
        self._writable()
        dinode = self._dir(parent)
        if name in (b".", b".."):
            raise fs_error(errno.EEXIST)
        check_name(name)
        if dinode.nlink == 0:  # removed while still open or looked up
            raise fs_error(errno.ENOENT)
        if self.dirs.lookup(dinode, name) is not None:
            raise fs_error(errno.EEXIST)
        is_dir = stat.S_ISDIR(mode)
        if is_dir and dinode.nlink >= LINK_MAX:
            raise fs_error(errno.EMLINK)
        need = GROW_BLOCKS if self.dirs.needs_block(dinode, name) else 0
        if target is not None and len(target) > INLINE_TARGET:
            need += GROW_BLOCKS
        self._check_space(inodes=1, blocks=need)
        if dinode.mode & stat.S_ISGID:
            # BSD group semantics for setgid directories, and they propagate to subdirs.
            gid = dinode.gid
            if is_dir:
                mode |= stat.S_ISGID
        now = self._now()
        # Written once, below, with its link count (released instead if the entry fails).
        inode = self.inodes.allocate(mode, uid, gid, now, goal=parent, write=False)
        try:
            if target is not None:
                self.data.write_symlink(inode, target)
            self.dirs.add(dinode, name, inode.ino, dtype_of(mode))
        except OSError:
            # ENOSPC despite the estimate: give back what was taken, change nothing else.
            self.data.free_all(inode)
            self.inodes.release(inode)
            raise
        inode.nlink = 2 if is_dir else 1
        inode.rdev = parent if is_dir else rdev
        self.inodes.put(inode)
        if is_dir:
            dinode.nlink += 1
        dinode.mtime_ns = dinode.ctime_ns = now
        self.inodes.put(dinode)
        self._hint(HintKind.ENTRY_ADDED, inode.ino, parent, name)
        self._ref(inode.ino)
        return inode

    def _check_space(self, *, inodes: int = 0, blocks: int = 0) -> None:
        if inodes and self.inodes.free_count < inodes:
            raise fs_error(errno.ENOSPC, "no free inodes")
        if blocks and self.volume.allocator.free_count < blocks:
            raise fs_error(errno.ENOSPC, "no free blocks")

    # ------------------------------------------------------------------------------ links

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        """A new name for a non-directory (+1 ref); EPERM for directories."""
        self._writable()
        inode = self._get(ino)
        if stat.S_ISDIR(inode.mode):
            raise fs_error(errno.EPERM)
        dinode = self._dir(new_parent)
        if new_name in (b".", b".."):
            raise fs_error(errno.EEXIST)
        check_name(new_name)
        if dinode.nlink == 0:
            raise fs_error(errno.ENOENT)
        if self.dirs.lookup(dinode, new_name) is not None:
            raise fs_error(errno.EEXIST)
        if inode.nlink == 0:  # unlinked but open: Linux refuses to bring it back
            raise fs_error(errno.ENOENT)
        if inode.nlink >= LINK_MAX:
            raise fs_error(errno.EMLINK)
        self._check_space(blocks=GROW_BLOCKS if self.dirs.needs_block(dinode, new_name) else 0)
        now = self._now()
        self.dirs.add(dinode, new_name, ino, dtype_of(inode.mode))
        inode.nlink += 1
        inode.ctime_ns = now
        self.inodes.put(inode)
        dinode.mtime_ns = dinode.ctime_ns = now
        self.inodes.put(dinode)
        self._hint(HintKind.ENTRY_ADDED, ino, new_parent, new_name)
        self._ref(ino)
        return self._attr(inode)

    def unlink(self, parent: int, name: bytes) -> None:
        """Remove a non-directory's name; the inode goes when its last link and user go."""
        self._writable()
        dinode = self._dir(parent)
        if name in (b".", b".."):
            raise fs_error(errno.EISDIR)
        check_name(name)
        found = self.dirs.lookup(dinode, name)
        if found is None:
            raise fs_error(errno.ENOENT)
        inode = self._get(found[0])
        if stat.S_ISDIR(inode.mode):
            raise fs_error(errno.EISDIR)
        now = self._now()
        self.dirs.remove(dinode, name)
        dinode.mtime_ns = dinode.ctime_ns = now
        self.inodes.put(dinode)
        inode.nlink -= 1
        inode.ctime_ns = now
        self._hint(HintKind.ENTRY_REMOVED, inode.ino, parent, name)
        self._drop_link(inode)

    def rmdir(self, parent: int, name: bytes) -> None:
        """Remove an empty directory."""
        self._writable()
        dinode = self._dir(parent)
        if name == b".":
            raise fs_error(errno.EINVAL)
        if name == b"..":
            raise fs_error(errno.ENOTEMPTY)
        check_name(name)
        found = self.dirs.lookup(dinode, name)
        if found is None:
            raise fs_error(errno.ENOENT)
        inode = self._get(found[0])
        if not stat.S_ISDIR(inode.mode):
            raise fs_error(errno.ENOTDIR)
        if self.dirs.count(inode):
            raise fs_error(errno.ENOTEMPTY)
        now = self._now()
        self.dirs.remove(dinode, name)
        dinode.nlink -= 1
        dinode.mtime_ns = dinode.ctime_ns = now
        self.inodes.put(dinode)
        inode.nlink = 0
        inode.ctime_ns = now
        self.dirs.forget(inode.ino)
        self._hint(HintKind.ENTRY_REMOVED, inode.ino, parent, name)
        self._drop_link(inode)

    # ----------------------------------------------------------------------------- rename

    def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        """True when directory ``ancestor`` is ``ino`` or one of its ancestors."""
        for _ in range(MAX_DEPTH):
            if ino == ancestor:
                return True
            if ino == ROOT_INO:
                return False
            ino = self.parent_of(self._get(ino))
        raise fs_error(errno.EIO, "directory tree has a loop")

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
        """rename(2)/renameat2(2): flags RENAME_NOREPLACE=1, RENAME_EXCHANGE=2 and
        RENAME_WHITEOUT=4 (as ext4: the source name then names a new character device 0:0
        owned by ``uid``/``gid``; EXCHANGE with NOREPLACE or WHITEOUT is EINVAL)."""
        self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
            flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)
        ):
            raise fs_error(errno.EINVAL)
        if old_name in (b".", b"..") or new_name in (b".", b".."):
            raise fs_error(errno.EINVAL)
        check_name(old_name)
        check_name(new_name)
        odir = self._dir(old_parent)
        ndir = self._dir(new_parent)
        src = self.dirs.lookup(odir, old_name)
        if src is None:
            raise fs_error(errno.ENOENT)
        if ndir.nlink == 0:
            raise fs_error(errno.ENOENT)
        dst = self.dirs.lookup(ndir, new_name)
        if flags & RENAME_EXCHANGE and dst is None:
            raise fs_error(errno.ENOENT)
        if dst is not None and flags & RENAME_NOREPLACE:
            raise fs_error(errno.EEXIST)
        if dst is not None and dst[0] == src[0]:
            return  # the same inode under both names: POSIX says do nothing
        sinode = self._get(src[0])
        tinode = self._get(dst[0]) if dst is not None else None
        if flags & RENAME_EXCHANGE:
            assert tinode is not None
            self._exchange(odir, old_name, sinode, ndir, new_name, tinode)
            return
        s_dir = stat.S_ISDIR(sinode.mode)
        t_dir = tinode is not None and stat.S_ISDIR(tinode.mode)
        moving_dir = s_dir and odir is not ndir
        # Linux checks "source is an ancestor of the target" before the target's type.
        if moving_dir and self._is_ancestor(sinode.ino, ndir.ino):
            raise fs_error(errno.EINVAL)
        if tinode is not None:
            if s_dir and not t_dir:
                raise fs_error(errno.ENOTDIR)
            if t_dir and not s_dir:
                raise fs_error(errno.EISDIR)
            if t_dir and self.dirs.count(tinode):
                raise fs_error(errno.ENOTEMPTY)
        if moving_dir and not t_dir and ndir.nlink >= LINK_MAX:
            raise fs_error(errno.EMLINK)
        whiteout = bool(flags & RENAME_WHITEOUT)
        need = GROW_BLOCKS if tinode is None and self.dirs.needs_block(ndir, new_name) else 0
        self._check_space(inodes=1 if whiteout else 0, blocks=need)

        now = self._now()
        # Add before remove: the add is the step that may need a new block.
        if tinode is None:
            self.dirs.add(ndir, new_name, sinode.ino, dtype_of(sinode.mode))
        else:
            self.dirs.retarget(ndir, new_name, sinode.ino, dtype_of(sinode.mode))
        wh = self._new_whiteout(odir, uid, gid, now) if whiteout else None
        if wh is None:
            self.dirs.remove(odir, old_name)
        else:  # the old entry now names the whiteout: no block to find
            self.dirs.retarget(odir, old_name, wh.ino, dtype_of(wh.mode))
        if moving_dir:
            odir.nlink -= 1
            ndir.nlink += 1
            self._set_parent(sinode, ndir.ino)
        if t_dir:
            ndir.nlink -= 1
        sinode.ctime_ns = now
        self.inodes.put(sinode)
        for d in (odir, ndir) if odir is not ndir else (odir,):
            d.mtime_ns = d.ctime_ns = now
            self.inodes.put(d)
        self._hint(HintKind.ENTRY_REMOVED, sinode.ino, old_parent, old_name)
        if wh is not None:
            self._hint(HintKind.ENTRY_ADDED, wh.ino, old_parent, old_name)
        if tinode is not None:
            self._hint(HintKind.ENTRY_REMOVED, tinode.ino, new_parent, new_name)
            tinode.nlink = 0 if t_dir else tinode.nlink - 1
            tinode.ctime_ns = now
            if t_dir:
                self.dirs.forget(tinode.ino)
            self._drop_link(tinode)
        self._hint(HintKind.ENTRY_ADDED, sinode.ino, new_parent, new_name)

    def _new_whiteout(self, dinode: Inode, uid: int, gid: int, now: int) -> Inode:
        """A whiteout for a name in ``dinode``: mode S_IFCHR with no permission bits, rdev
        0:0, one link, owned like a new file (setgid directories give their group)."""
        if dinode.mode & stat.S_ISGID:
            gid = dinode.gid
        inode = self.inodes.allocate(stat.S_IFCHR, uid, gid, now, goal=dinode.ino)
        inode.nlink = 1
        inode.rdev = 0
        self.inodes.put(inode)
        return inode

    def _exchange(
        self,
        odir: Inode,
        old_name: bytes,
        sinode: Inode,
        ndir: Inode,
        new_name: bytes,
        tinode: Inode,
    ) -> None:
        """RENAME_EXCHANGE: swap two existing entries atomically."""
        s_dir = stat.S_ISDIR(sinode.mode)
        t_dir = stat.S_ISDIR(tinode.mode)
        cross = odir is not ndir
        if cross:
            if s_dir and self._is_ancestor(sinode.ino, ndir.ino):
                raise fs_error(errno.EINVAL)
            if t_dir and self._is_ancestor(tinode.ino, odir.ino):
                raise fs_error(errno.EINVAL)
            # A directory changing sides moves one link from its old parent to its new one.
            if s_dir and not t_dir and ndir.nlink >= LINK_MAX:
                raise fs_error(errno.EMLINK)
            if t_dir and not s_dir and odir.nlink >= LINK_MAX:
                raise fs_error(errno.EMLINK)
        now = self._now()
        self.dirs.retarget(odir, old_name, tinode.ino, dtype_of(tinode.mode))
        self.dirs.retarget(ndir, new_name, sinode.ino, dtype_of(sinode.mode))
        if cross:
            if s_dir and not t_dir:
                odir.nlink -= 1
                ndir.nlink += 1
            elif t_dir and not s_dir:
                ndir.nlink -= 1
                odir.nlink += 1
            if s_dir:
                self._set_parent(sinode, ndir.ino)
            if t_dir:
                self._set_parent(tinode, odir.ino)
        for inode in (sinode, tinode):
            inode.ctime_ns = now
            self.inodes.put(inode)
        for d in (odir, ndir) if cross else (odir,):
            d.mtime_ns = d.ctime_ns = now
            self.inodes.put(d)
        self._hint(HintKind.ENTRY_REMOVED, sinode.ino, odir.ino, old_name)
        self._hint(HintKind.ENTRY_REMOVED, tinode.ino, ndir.ino, new_name)
        self._hint(HintKind.ENTRY_ADDED, tinode.ino, odir.ino, old_name)
        self._hint(HintKind.ENTRY_ADDED, sinode.ino, ndir.ino, new_name)
