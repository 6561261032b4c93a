"""The pyfuse3 adapter: each handler calls the Filesystem and converts at the boundary.

Nothing here knows about blocks or inodes on disk. The adapter only

- turns ``Attr``/``StatFs`` into pyfuse3's ``EntryAttributes``/``StatvfsData``,
- keeps the file handle table (fh -> inode, open flags),
- maps every failure to a ``FUSEError`` (see ``_boundary``), because in pyfuse3 any other
  exception that escapes a handler ends ``pyfuse3.main`` and leaves the mountpoint dead,
- commits the volume where POSIX asks for durability (fsync, fsyncdir) and when the open
  transaction grows past a bound (so memory stays bounded between group commits),
- keeps the kernel's page cache right after O_DIRECT writes (fuse/pagecache.py).

The kernel's writeback cache (``writeback_cache``, off by default) changes what arrives:
the kernel owns size, mtime and ctime of regular files and sends them in SETATTR, applies
O_APPEND itself (every WRITE carries its real offset), writes pages back later through any
writable handle, also one opened O_WRONLY (and reads through it to fill partial pages), and
sends writes past the filesystem's size. The handlers below take the offsets and times the
kernel sends as they are in that mode. What no handler can keep in that mode: a write
past the maximum file size or into a full volume succeeds into the page cache, and its
EFBIG or ENOSPC comes at writeback, reported by fsync or close, not by write.

Concurrency: no handler awaits anything. Each one runs between two checkpoints of the trio
loop, so a handler is atomic with respect to the group-commit task and to other handlers;
the Filesystem relies on that (its calls are synchronous and not reentrant).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3

from mirrorfs.fs.filesystem import MAX_FILE_SIZE, Attr, Filesystem, FsError, SetAttr
from mirrorfs.fuse.gate import WriteGate
from mirrorfs.fuse.invalidate import KernelInvalidator
from mirrorfs.fuse.pagecache import DirectWriteCache
from mirrorfs.fuse.request_stats import REQUEST_STATS
from mirrorfs.store.committer import Committer
from mirrorfs.store.errors import NoSpace, VolumeFailed

log = logging.getLogger(__name__)

#: Commit inline from ``write`` when the open transaction holds more than this.
DEFAULT_COMMIT_BOUND = 16 << 20

#: How long the kernel may trust a name or an inode's attributes without asking (seconds).
#: On a read-write mount every change passes through this kernel, which updates or drops
#: what it cached itself (size and times after a write, atime after a read, nlink and ctime
#: after link/unlink/rename, a directory after a change in it), and nothing else writes the
#: volume (it is locked while mounted, and a switchover ends the mount): the cache can stay
#: valid long. A read-only mount may be a replica, whose volume changes underneath it (the
#: invalidator drops what an applied transaction changed): short.
RW_CACHE_TIMEOUT = 60.0
RO_CACHE_TIMEOUT = 2.0

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])

_ACCMODE_WRITE = (os.O_WRONLY, os.O_RDWR)

_clock = time.perf_counter


def _boundary(*, modifies: bool = False) -> Callable[[_F], _F]:
    """Wrap a handler so that only ``FUSEError`` can leave it.

    ``modifies`` handlers answer EROFS on a read-only or failsafe mount before touching
    anything, and wait at the write gate while it is closed (fuse/gate.py). The error
    mapping is the single place where domain errors become errnos.
    """

    def decorate(fn: _F) -> _F:
        name = fn.__name__
        stats = REQUEST_STATS.op(name)  # counts and latency (fuse/request_stats.py)

        @functools.wraps(fn)
        async def handler(self: Operations, *args: Any) -> Any:
            t0 = _clock()
            ok = False
            try:
                if modifies:
                    self._check_writable()
                    if self.gate.closed or self.gate.refusal:
                        await self.gate.enter()  # a switchover is draining: wait, do not fail
                        self._check_writable()
                result = await fn(self, *args)
                ok = True
                return result
            except pyfuse3.FUSEError:
                raise
            except FsError as exc:
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
            except NoSpace:
                raise pyfuse3.FUSEError(errno.ENOSPC) from None
            except VolumeFailed as exc:
                self.enter_failsafe(f"{name}: {exc}")
                raise pyfuse3.FUSEError(errno.EIO) from None
            except Exception as exc:
                # A bug, not a user error: keep the traceback, answer EIO, keep serving.
                log.exception("unexpected error in %s(%s)", name, _brief(args))
                if modifies:
                    # The change may be half done in the open transaction: never commit it.
                    self.enter_failsafe(f"{name}: {exc!r}", discard_open_transaction=True)
                raise pyfuse3.FUSEError(errno.EIO) from None
            finally:
                stats.record(_clock() - t0, ok)

        return handler  # type: ignore[return-value]

    return decorate


def _brief(args: tuple) -> str:
    """Handler arguments for a log line, without megabytes of write data."""
    return ", ".join(
        f"<{len(a)} bytes>" if isinstance(a, bytes) and len(a) > 64 else repr(a) for a in args
    )


@dataclass(slots=True)
class _Handle:
    ino: int
    flags: int

    @property
    def direct(self) -> bool:
        """Opened with O_DIRECT: reads and writes go around the page cache."""
        return bool(self.flags & os.O_DIRECT)


class Operations(pyfuse3.Operations):
    """pyfuse3 request handlers over a ``Filesystem`` on a ``Volume``."""

    # Default: writes go through to the filesystem as they happen (no kernel writeback
    # cache), so that write(2) itself answers EFBIG and ENOSPC. pyfuse3 reads this at INIT;
    # __init__ sets it per mount (``writeback_cache``).
    enable_writeback_cache = False

    def __init__(
        self,
        fs: Filesystem,
        volume: Any,
        *,
        read_only: bool = False,
        entry_timeout: float | None = None,
        attr_timeout: float | None = None,
        commit_bound: int = DEFAULT_COMMIT_BOUND,
        writeback_cache: bool = False,
    ) -> None:
        super().__init__()
        #: The kernel's writeback cache (see the module docstring); never on a read-only
        #: mount, whose volume may change underneath it (the replica).
        self.enable_writeback_cache = bool(writeback_cache and not read_only)
        self.fs = fs
        self.volume = volume
        self.read_only = read_only
        #: Set after the store failed to persist a change: reads go on, writes get EROFS.
        self.failsafe = False
        default_timeout = RO_CACHE_TIMEOUT if read_only else RW_CACHE_TIMEOUT
        self.entry_timeout = default_timeout if entry_timeout is None else entry_timeout
        self.attr_timeout = default_timeout if attr_timeout is None else attr_timeout
        self.commit_bound = commit_bound
        self.committer = Committer(volume, max_in_flight_bytes=4 * commit_bound)
        self.gate = WriteGate(self.committer)
        if not read_only:
            # How the node layer (a planned switchover) reaches the gate of this mount.
            volume.writer.attach_gate(self.gate)
        self._handles: dict[int, _Handle] = {}
        self._dir_handles: dict[int, int] = {}
        self._next_fh = 1
        self._direct_writes = DirectWriteCache()
        #: Drops kernel pages that O_DIRECT writes made stale (fuse/pagecache.py); the mount
        #: runs it (FuseSession's ``invalidator``). None on a read-only mount.
        self.invalidator = None if read_only else KernelInvalidator()

    # -- state

    def enter_failsafe(self, reason: str, *, discard_open_transaction: bool = False) -> None:
        """Switch the mount to read-only after a fault (S3QL's failsafe).

        ``discard_open_transaction``: a change failed half-way, so the open transaction may
        hold half of it. The volume is then marked failed, which makes it refuse to commit
        (also at close): the volume stays at its last committed, consistent transaction,
        losing only changes nobody fsynced.
        """
        if not self.failsafe:
            log.error("the mount is now read-only (failsafe): %s", reason)
        self.failsafe = True
        if discard_open_transaction and getattr(self.volume, "failed", "") is None:
            self.volume.condition.fail(f"a change failed half-way: {reason}")

    def _check_writable(self) -> None:
        if self.read_only or self.failsafe:
            raise pyfuse3.FUSEError(errno.EROFS)
        if self.volume.condition.fenced:
            raise pyfuse3.FUSEError(errno.EROFS)  # a newer epoch exists elsewhere
        failed = getattr(self.volume, "failed", None)
        if failed:  # the volume noticed a failure outside a handler (e.g. at checkpoint)
            self.enter_failsafe(str(failed))
            raise pyfuse3.FUSEError(errno.EROFS)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _handle(self, fh: int) -> _Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    async def commit(self) -> None:
        """Make everything written so far durable (fsync, fsyncdir)."""
        if self.read_only:
            return
        if self.failsafe:
            # The change cannot be made durable any more: say so to whoever asked.
            raise pyfuse3.FUSEError(errno.EIO)
        await self.committer.commit()

    # -- conversions

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attr.ino
        entry.generation = attr.generation
        entry.entry_timeout = self.entry_timeout
        entry.attr_timeout = self.attr_timeout
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_rdev = attr.rdev
        entry.st_size = attr.size
        entry.st_blksize = attr.blksize
        entry.st_blocks = attr.blocks
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        return entry

    # -- lookups and attributes

    @_boundary()
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.lookup(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # pyfuse3: forget must not raise at all (there is no request to answer).
        for ino, nlookup in inode_list:
            try:
                self.fs.forget(ino, nlookup)
            except VolumeFailed as exc:
                self.enter_failsafe(f"forget: {exc}")
            except Exception:
                log.exception("forget(%d, %d) failed", ino, nlookup)

    @_boundary()
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.getattr(inode))

    @_boundary(modifies=True)
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        changes = SetAttr(caller_times=self.enable_writeback_cache)
        if fields.update_size:
            if attr.st_size > MAX_FILE_SIZE:
                raise pyfuse3.FUSEError(errno.EFBIG)
            changes.size = attr.st_size
        if fields.update_mode:
            changes.mode = attr.st_mode
        if fields.update_uid:
            changes.uid = attr.st_uid
        if fields.update_gid:
            changes.gid = attr.st_gid
        # pyfuse3 already turned UTIME_NOW into a concrete timestamp.
        if fields.update_atime:
            changes.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            changes.mtime_ns = attr.st_mtime_ns
        if fields.update_ctime:
            # Only with the writeback cache: the kernel's own ctime of a cached write or
            # change, which its stat shows; keep the same one.
            changes.ctime_ns = attr.st_ctime_ns
        return self._entry(self.fs.setattr(inode, changes))

    @_boundary()
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(inode)

    # -- namespace

    @_boundary(modifies=True)
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        # Owner: the caller (setgid-directory inheritance is the filesystem's business).
        return self._entry(self.fs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @_boundary(modifies=True)
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_boundary(modifies=True)
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_boundary(modifies=True)
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.link(inode, new_parent_inode, new_name))

    @_boundary(modifies=True)
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.unlink(parent_inode, name)

    @_boundary(modifies=True)
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.rmdir(parent_inode, name)

    @_boundary(modifies=True)
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self.fs.rename(
            parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx.uid, ctx.gid
        )

    # -- files

    def _file_info(self, fh: int, handle: _Handle) -> pyfuse3.FileInfo:
        # keep_cache: on a read-write source every change passes through this kernel, so the
        # page cache stays valid across opens (direct writes: fuse/pagecache.py); a read-only
        # mount may be a replica whose blocks change underneath, so it drops the cache on
        # each open.
        keep = self._direct_writes.opened(handle.ino, direct=handle.direct)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep and not self.read_only)

    @_boundary()
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        writable = (flags & os.O_ACCMODE) in _ACCMODE_WRITE
        if writable or flags & os.O_TRUNC:
            self._check_writable()
            if self.gate.closed or self.gate.refusal:
                await self.gate.enter()
                self._check_writable()
        # Without atomic_o_trunc the kernel truncates through setattr; honour the flag
        # anyway should a kernel pass it on.
        if flags & os.O_TRUNC and writable and self.fs.getattr(inode).size != 0:
            self.fs.setattr(inode, SetAttr(size=0))
        self.fs.open(inode)
        fh = self._new_fh()
        handle = self._handles[fh] = _Handle(inode, flags)
        return self._file_info(fh, handle)

    @_boundary(modifies=True)
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        attr = self.fs.create(parent_inode, name, mode, ctx.uid, ctx.gid)  # +1 ref, +1 handle
        fh = self._new_fh()
        handle = self._handles[fh] = _Handle(attr.ino, flags)
        return self._file_info(fh, handle), self._entry(attr)

    @_boundary()
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.fs.read(self._handle(fh).ino, off, size)

    @_boundary(modifies=True)
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        if handle.flags & os.O_APPEND and not self.enable_writeback_cache:
            offset: int | None = None  # the filesystem writes at its own EOF
        else:
            # With the writeback cache the kernel applies O_APPEND itself: its size, which
            # may be ahead of ours (dirty pages), is where the data belongs.
            if off + len(buf) > MAX_FILE_SIZE:
                raise pyfuse3.FUSEError(errno.EFBIG)
            offset = off
        written = self.fs.write(handle.ino, offset, buf)
        invalidator = self.invalidator
        if handle.direct and invalidator and self._direct_writes.direct_write(handle.ino):
            # From the invalidator's task, never awaited here (fuse/pagecache.py).
            invalidator.add_inodes((handle.ino,))
        # Bound the memory of the open transaction and of those being persisted; the write
        # itself already succeeded, so a commit failure switches to failsafe (via _boundary)
        # and says EIO.
        await self.committer.throttle()
        return written

    async def flush(self, fh: int) -> None:
        # close(2): durability is fsync's job, the group commit follows within an interval,
        # so FLUSH has nothing to do. Without the writeback cache, ENOSYS once tells the
        # kernel to stop sending it for this mount (fc->no_flush): one request less per
        # close. With it, FLUSH is answered: kernels before 5.8 skip writing a file's dirty
        # pages back at close (and reporting their ENOSPC or EIO) once no_flush is set.
        if not self.enable_writeback_cache:
            raise pyfuse3.FUSEError(errno.ENOSYS)

    @_boundary()
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            self._direct_writes.released(handle.ino, direct=handle.direct)
            self.fs.release(handle.ino)

    @_boundary()
    async def fsync(self, fh: int, datasync: bool) -> None:
        self._handle(fh)
        await self.commit()

    # -- directories

    @_boundary()
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh = self._new_fh()
        self._dir_handles[fh] = inode
        return fh

    @_boundary()
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        try:
            ino = self._dir_handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None
        for name, attr, next_cookie in self.fs.readdir(ino, start_id):
            if not pyfuse3.readdir_reply(token, name, self._entry(attr), next_cookie):
                break  # the kernel's buffer is full: this entry was not taken
            if name not in (b".", b".."):
                # readdirplus: an accepted entry counts as a lookup for the kernel.
                self.fs.add_ref(attr.ino)

    @_boundary()
    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    @_boundary()
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.commit()

    # -- xattrs (pyfuse3 itself handles XATTR_CREATE / XATTR_REPLACE via getxattr)

    @_boundary(modifies=True)
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self.fs.setxattr(inode, name, value)

    @_boundary()
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.getxattr(inode, name)

    @_boundary()
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.fs.listxattr(inode)

    @_boundary(modifies=True)
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.removexattr(inode, name)

    # -- filesystem

    @_boundary()
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = self.fs.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = st.block_size
        data.f_frsize = st.block_size
        data.f_blocks = st.blocks
        data.f_bfree = st.blocks_free
        data.f_bavail = st.blocks_avail
        data.f_files = st.files
        data.f_ffree = st.files_free
        data.f_favail = st.files_free
        data.f_namemax = st.name_max
        return data
