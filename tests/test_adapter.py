"""The FUSE adapter without a mount: error mapping, failsafe, read-only, EFBIG, readdir.

These drive ``Operations`` directly, over the typed fakes of tests/fakes.py (and once over
a real volume), for what a mount cannot provoke on demand. The first tests prove the fakes
themselves: each name of a fake exists on the real class with the same signature.
"""

from __future__ import annotations

import ast
import errno
import inspect
import os
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from mirrorfs.fs.filesystem import MAX_FILE_SIZE, Filesystem, FsError
from mirrorfs.fuse import operations
from mirrorfs.fuse.operations import Operations
from mirrorfs.store.errors import NoSpace, VolumeFailed
from mirrorfs.store.volume import Volume
from tests.fakes import CTX, FakeFs, FakeVolume, fuse_errno, make_ops

# -- the fakes against the real classes


def _public(fake: type) -> set[str]:
    return {n for n in dir(fake) if not n.startswith("_") and n not in fake.RECORDING} - {
        "RECORDING"
    }


def _shape(fn) -> list[tuple[str, object, bool]]:
    """Parameter names, kinds and whether each has a default (annotations aside)."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    return [(p.name, p.kind, p.default is not p.empty) for p in params]


def _mismatches(fake: type, real: object) -> list[str]:
    real_name = real.__name__ if isinstance(real, type) else type(real).__name__
    bad = []
    for name in sorted(_public(fake)):
        ours = getattr(fake, name)
        theirs = getattr(real, name, None)
        if theirs is None and not hasattr(real, name):
            bad.append(f"{fake.__name__}.{name}: no such name on {real_name}")
        elif callable(ours) and not callable(theirs):
            bad.append(f"{fake.__name__}.{name}: a method, but not callable on the real one")
        elif callable(ours) and _shape(ours) != _shape(theirs):
            bad.append(
                f"{fake.__name__}.{name}{inspect.signature(ours)} != {theirs.__name__}"
                f"{inspect.signature(theirs)}"
            )
    return bad


def _fs_names_used_by_the_adapter() -> set[str]:
    tree = ast.parse(inspect.getsource(operations))
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "fs"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }


def test_fake_fs_has_exactly_what_the_adapter_uses_with_the_real_signatures():
    assert _public(FakeFs) == _fs_names_used_by_the_adapter()
    assert _mismatches(FakeFs, Filesystem) == []


def test_fake_volume_names_exist_on_a_real_volume(tmp_path):
    path = str(tmp_path / "vol")
    Volume.create(path, 4 << 20)
    vol = Volume.open(path)
    try:
        assert _mismatches(FakeVolume, vol) == []
    finally:
        vol.close()


def test_fakes_refuse_unknown_names():
    fs, vol = FakeFs(), FakeVolume()
    with pytest.raises(AttributeError):
        fs.fallocate(5, 0, 0, 1)  # a Filesystem method the adapter does not call
    with pytest.raises(AttributeError):
        fs.no_such_method()
    with pytest.raises(AttributeError):
        vol.frozen = "switchover"  # __slots__: no attribute the fake does not declare


# -- the adapter


@pytest.mark.log_expected(r"unexpected error in", r"failsafe", r"forget\(")
async def test_adapter_maps_errors():
    ops, fs, vol = make_ops()
    fs.fail["lookup"] = FsError(errno.ENAMETOOLONG)
    assert await fuse_errno(ops.lookup(1, b"x" * 300, CTX)) == errno.ENAMETOOLONG
    fs.fail["mkdir"] = NoSpace("full")
    assert await fuse_errno(ops.mkdir(1, b"d", 0o755, CTX)) == errno.ENOSPC
    fs.fail["getattr"] = RuntimeError("a bug")
    assert await fuse_errno(ops.getattr(1, CTX)) == errno.EIO  # logged, mount lives on
    assert not ops.failsafe
    fs.fail.clear()
    fs.fail["unlink"] = VolumeFailed("disk on fire")
    assert await fuse_errno(ops.unlink(1, b"f", CTX)) == errno.EIO
    assert ops.failsafe
    fs.fail.clear()
    assert await fuse_errno(ops.create(1, b"g", 0o644, os.O_WRONLY, CTX)) == errno.EROFS
    assert await fuse_errno(ops.mkdir(1, b"d", 0o755, CTX)) == errno.EROFS
    assert (await ops.getattr(1, CTX)).st_ino == 5  # reads go on
    fs.fail["forget"] = RuntimeError("forget must never raise")
    await ops.forget([(5, 1), (6, 2)])
    assert vol.failed is None  # a storage failure: what is open may still be committed


@pytest.mark.log_expected(r"unexpected error in rename", r"failsafe")
async def test_adapter_bug_in_a_change_discards_the_open_transaction():
    ops, fs, vol = make_ops()
    fs.fail["rename"] = KeyError("a bug half-way through")
    assert await fuse_errno(ops.rename(1, b"a", 1, b"b", 0, CTX)) == errno.EIO
    assert ops.failsafe and vol.failed  # the volume will not commit the half change
    assert await fuse_errno(ops.unlink(1, b"a", CTX)) == errno.EROFS


async def test_adapter_read_only():
    ops, fs, vol = make_ops(read_only=True)
    assert await fuse_errno(ops.mkdir(1, b"d", 0o755, CTX)) == errno.EROFS
    assert await fuse_errno(ops.open(5, os.O_RDWR, CTX)) == errno.EROFS
    fi = await ops.open(5, os.O_RDONLY, CTX)
    assert await ops.read(fi.fh, 0, 10) == b""
    await ops.fsync(fi.fh, False)
    assert vol.commits == 0
    assert not [c for c in fs.calls if c[0] == "mkdir"]


async def test_adapter_flush_is_refused_once_without_writeback_and_answered_with_it():
    """FLUSH has nothing to do: without the writeback cache it answers ENOSYS, which makes
    the kernel stop sending it (one request less per close); with the cache it is answered,
    so that close(2) writes dirty pages back and reports their errors on any kernel."""
    ops, fs, _ = make_ops()
    fi = await ops.open(5, os.O_RDONLY, CTX)
    assert await fuse_errno(ops.flush(fi.fh)) == errno.ENOSYS
    wb, _, _ = make_ops(writeback_cache=True)
    fi = await wb.open(5, os.O_WRONLY, CTX)
    assert await wb.flush(fi.fh) is None


async def test_adapter_efbig_before_the_filesystem():
    ops, fs, vol = make_ops()
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 999999999999999
    fields = SimpleNamespace(
        update_size=True,
        update_mode=False,
        update_uid=False,
        update_gid=False,
        update_atime=False,
        update_mtime=False,
    )
    assert await fuse_errno(ops.setattr(5, attr, fields, None, CTX)) == errno.EFBIG
    fi = await ops.open(5, os.O_WRONLY, CTX)
    assert await fuse_errno(ops.write(fi.fh, MAX_FILE_SIZE, b"x")) == errno.EFBIG
    assert not [c for c in fs.calls if c[0] in ("setattr", "write")]


async def test_adapter_write_append_commit_bound_and_fsync(tmp_path):
    """On a real volume: O_APPEND writes at EOF, the size bound seals, fsync makes durable."""
    path = str(tmp_path / "vol")
    Volume.create(path, 16 << 20)
    vol = Volume.open(path)
    Filesystem.format(vol, inode_count=64)
    fs = Filesystem(vol)
    ops = Operations(fs, vol, commit_bound=64 << 10)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(ops.committer.run)
            fi, attr = await ops.create(1, b"f", 0o100644, os.O_WRONLY | os.O_APPEND, CTX)
            assert await ops.write(fi.fh, 12345, b"abc") == 3  # O_APPEND: at EOF, not 12345
            assert fs.getattr(attr.st_ino).size == 3
            fi2 = await ops.open(attr.st_ino, os.O_WRONLY, CTX)
            before = vol.last_seq
            big = os.urandom(256 << 10)  # past the in-flight bound: sealed and persisted
            assert await ops.write(fi2.fh, 4096, big) == len(big)
            await ops.fsync(fi2.fh, True)
            assert vol.last_seq > before and vol.pending_bytes == 0
            seqs = [t.seq for t in vol.samlog.scan(before + 1)]
            assert seqs == list(range(before + 1, vol.last_seq + 1))
            assert fs.read(attr.st_ino, 4096, len(big)) == big
            await ops.release(fi.fh)
            await ops.release(fi2.fh)
            assert await fuse_errno(ops.read(fi.fh, 0, 1)) == errno.EBADF
            nursery.cancel_scope.cancel()
    finally:
        fs.close()
        vol.close()
    # what fsync returned for is in the log and in place after a reopen
    vol = Volume.open(path)
    try:
        fs = Filesystem(vol)
        ino = fs.lookup(1, b"f").ino
        assert fs.read(ino, 0, 3) == b"abc"
        assert fs.read(ino, 4096, len(big)) == big
    finally:
        vol.close()


async def test_adapter_readdir_counts_accepted_entries(monkeypatch):
    ops, fs, vol = make_ops()
    accepted: list[tuple[bytes, int]] = []

    def reply(token, name, attr, next_id):
        if len(accepted) == 4:
            return False
        accepted.append((name, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = await ops.opendir(1, CTX)
    await ops.readdir(fh, 0, object())
    assert [n for n, _ in accepted] == [b".", b"..", b"f0", b"f1"]
    assert fs.refs == {10: 1, 11: 1}  # "." and ".." and the refused entry are not counted


async def test_adapter_writeback_takes_the_kernels_offsets_and_ctime(tmp_path):
    """With the writeback cache: O_APPEND writes land at the kernel's offset (its size may be
    ahead of ours), and a SETATTR's ctime is kept rather than replaced by now."""
    path = str(tmp_path / "vol")
    Volume.create(path, 16 << 20)
    vol = Volume.open(path)
    Filesystem.format(vol, inode_count=64)
    fs = Filesystem(vol)
    ops = Operations(fs, vol, writeback_cache=True)
    assert ops.enable_writeback_cache
    assert not Operations(fs, vol, read_only=True, writeback_cache=True).enable_writeback_cache
    try:
        fi, attr = await ops.create(1, b"f", 0o100644, os.O_WRONLY | os.O_APPEND, CTX)
        assert await ops.write(fi.fh, 8192, b"abc") == 3  # the kernel's EOF, not ours (0)
        assert fs.read(attr.st_ino, 8192, 3) == b"abc"
        assert fs.getattr(attr.st_ino).size == 8195
        assert await fuse_errno(ops.write(fi.fh, MAX_FILE_SIZE, b"x")) == errno.EFBIG
        new = pyfuse3.EntryAttributes()
        new.st_mtime_ns = 1_000_000_000_123
        new.st_ctime_ns = 2_000_000_000_456
        fields = SimpleNamespace(
            update_size=False,
            update_mode=False,
            update_uid=False,
            update_gid=False,
            update_atime=False,
            update_mtime=True,
            update_ctime=True,
        )
        got = await ops.setattr(attr.st_ino, new, fields, fi.fh, CTX)
        assert (got.st_mtime_ns, got.st_ctime_ns) == (1_000_000_000_123, 2_000_000_000_456)
        # truncate(2) to the same size: the kernel sends no times and keeps its own, so the
        # filesystem keeps them too (its stat must agree with the kernel's after eviction).
        new.st_size = 8195
        fields.update_mtime = fields.update_ctime = False
        fields.update_size = True
        got = await ops.setattr(attr.st_ino, new, fields, fi.fh, CTX)
        assert (got.st_mtime_ns, got.st_ctime_ns) == (1_000_000_000_123, 2_000_000_000_456)
        await ops.release(fi.fh)
    finally:
        fs.close()
        vol.close()
