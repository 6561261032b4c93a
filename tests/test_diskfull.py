"""A real full disk under a volume: a tmpfs of a few MiB, not an injected error."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess

import pytest

from tests.util import cleanup, mkfs, mount, needs_fuse, run_cli

pytestmark = needs_fuse


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24M", "tmpfs", str(disk)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_host_disk_full_fails_safe_and_recovers(small_disk, tmp_path):
    vol = str(small_disk / "vol")
    mkfs(vol, "200M")  # sparse: the host disk fills long before the volume does
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = mount(vol, mnt)
    synced: dict[str, str] = {}
    try:
        err = None
        for i in range(200):
            data = os.urandom(1 << 20)
            try:
                with open(mnt / f"f{i}", "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                err = exc
                break
            synced[f"f{i}"] = hashlib.sha256(data).hexdigest()
        # The writer's first error: EIO/ENOSPC when its own fsync hit the full disk, or
        # EROFS when a background write in place hit it first and the volume had already
        # failed safe by the next create (timing; both are the fail-safe answer).
        assert err is not None and err.errno in (errno.EIO, errno.ENOSPC, errno.EROFS), err
        # failsafe: reads go on, changes are refused
        with pytest.raises(OSError) as info:
            (mnt / "after").write_text("x")
        assert info.value.errno == errno.EROFS
        first = next(iter(synced))
        assert hashlib.sha256((mnt / first).read_bytes()).hexdigest() == synced[first]
        proc = run_cli("status", vol)
        assert "No space left on device" in proc.stdout
        res = run_cli("umount", str(mnt))
        assert res.returncode == 0, res.stderr
        m = None

        # Mounting while the disk is still full fails with one line, no traceback.
        res = run_cli("mount", vol, str(mnt))
        if res.returncode != 0:
            assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
        else:
            run_cli("umount", str(mnt), check=True)

        # More room: recovery replays the log; every fsynced file is intact; fsck is clean.
        subprocess.run(["mount", "-o", "remount,size=200M", str(small_disk)], check=True)
        m = mount(vol, mnt)
        for name, digest in synced.items():
            assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest, name
        (mnt / "after").write_text("writable again\n")
        run_cli("umount", str(mnt), check=True)
        m = None
        res = run_cli("fsck", vol)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        cleanup(m)
