"""A full volume with a checkpoint, through a real mount: ENOSPC, and nothing worse.

Small overwrites of what a checkpoint holds fill the save area (then go to new blocks);
writing new data, or large overwrites, fill the data area. Either way the writer gets
ENOSPC (not EIO, not EROFS), the mount stays read-write and writes work again once
something is deleted, the checkpoint mount still shows the tree of the checkpoint, no
checkpoint is deleted behind the user's back, and fsck is clean.
"""

from __future__ import annotations

import errno
import os

import pytest

from tests.repl_util import Cluster, MiB, status
from tests.test_checkpoint_mount import _CheckpointMounts, _cli_ok, _digest, _listing
from tests.util import fsck, is_mounted, needs_fuse

pytestmark = [pytest.mark.mount, needs_fuse]


def _write(path: str, data: bytes, *, mode: str = "r+b") -> None:
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _overwrite_small(path: str, size: int) -> None:
    """Overwrite ``size`` bytes of ``path`` 4 KiB at a time (each too small to be moved to
    new blocks: every one saves the old block), fsync at the end."""
    with open(path, "r+b", buffering=0) as f:
        for off in range(0, size, 4096):
            os.pwrite(f.fileno(), os.urandom(4096), off)
        os.fsync(f.fileno())


def _fill(paths, mode: str) -> tuple[OSError | None, int]:
    """Write 1 MiB to each of ``paths`` until one fails; (the error, MiB written)."""
    done = 0
    for p in paths:
        try:
            _write(p, os.urandom(MiB), mode=mode)
        except OSError as exc:
            return exc, done
        done += 1
    return None, done


@pytest.mark.parametrize("area", ["save", "data"])
def test_full_volume_with_a_checkpoint_gives_enospc(tmp_path, area):
    cluster = Cluster(str(tmp_path))
    cks = _CheckpointMounts()
    try:
        # save: 10 % of 32 MiB for saved copies, 6 MiB held -> overwriting fills it first.
        # data: half of it for saved copies, 4 MiB held -> new files fill the data area.
        vol = cluster.path("src")
        space = "10" if area == "save" else "50"
        _cli_ok("mkfs", vol, "--size", "32M", "--checkpoint-space", space)
        src = cluster.mount_source(vol)
        root = src.mountpoint
        names = [f"f{i}" for i in range(6 if area == "save" else 4)]
        for n in names:
            _write(os.path.join(root, n), os.urandom(MiB), mode="wb")
        held = {n: _digest(os.path.join(root, n)) for n in names}
        _cli_ok("checkpoint", "create", vol, "ck")
        ck = cks.mount(vol, "ck", cluster.path("ck-mnt"))

        if area == "save":
            # Small overwrites save the old blocks until the save area is short of room;
            # then they go to new blocks like large ones, until the data area is full too.
            for n in names:
                _overwrite_small(os.path.join(root, n), MiB)
            saved = _listing(vol)["ck"]["held_blocks"]
            assert saved > 512, f"only {saved} blocks held: the save area did not fill"
            err, written = _fill([os.path.join(root, f"new{i}") for i in range(64)], "wb")
        else:
            err, written = _fill([os.path.join(root, n) for n in names], "r+b")
            assert err is None, err  # the save area takes these
            err, written = _fill([os.path.join(root, f"new{i}") for i in range(64)], "wb")
        assert err is not None, f"{written} MiB written and no error: the volume is not full"
        assert err.errno == errno.ENOSPC, err
        assert written >= 1, "ENOSPC before anything was written"

        # Still a read-write mount, not failsafe; the checkpoint is kept and still shows
        # exactly what it held.
        assert is_mounted(root) and src.alive()
        st = status(vol)
        assert not st.get("failed") and not st.get("volume_failed"), st
        assert set(_listing(vol)) == {"ck"}
        for n in names:
            assert _digest(os.path.join(ck, n)) == held[n], n
            os.stat(os.path.join(root, n))

        # Delete something, and writes work again: in the data area a file written since
        # the checkpoint (its blocks are held by nothing else); in the save area only a
        # checkpoint's deletion frees saved copies, so that is what the user does.
        if area == "data":
            os.unlink(os.path.join(root, "new0"))
            _write(os.path.join(root, "again"), os.urandom(MiB // 2), mode="wb")
            assert set(_listing(vol)) == {"ck"}
            for n in names:
                assert _digest(os.path.join(ck, n)) == held[n], n
            cks.umount(ck)
        else:
            # Both areas full: still ENOSPC, so no checkpoint was dropped to make room.
            with pytest.raises(OSError) as ei:
                _write(os.path.join(root, "more"), os.urandom(MiB), mode="wb")
            assert ei.value.errno == errno.ENOSPC, ei.value
            assert set(_listing(vol)) == {"ck"}
            assert _digest(os.path.join(ck, names[-1])) == held[names[-1]]
            cks.umount(ck)
            held_blocks = _listing(vol)["ck"]["held_blocks"]
            free_before = os.statvfs(root).f_bfree
            _cli_ok("checkpoint", "delete", vol, "ck")
            assert _listing(vol) == {}
            assert os.statvfs(root).f_bfree >= free_before + held_blocks
            _write(os.path.join(root, names[0]), os.urandom(MiB))
            _write(os.path.join(root, "again"), os.urandom(MiB // 2), mode="wb")
        cluster.umount_source(src)
        res = fsck(vol)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        cks.close()
        cluster.close()
