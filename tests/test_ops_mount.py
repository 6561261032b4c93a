"""Operators' conventions with real mounts: mount(8)'s helper (direct, ``mount -t``, an
fstab line), umount(8) and the final commit, busy mountpoints, systemd's readiness of a
mount, and a promotion that keeps the replica mount's options."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tests.repl_util import Cluster, free_port, log_text, status, stopped_status, wait_caught_up
from tests.test_cli import assert_one_line_error
from tests.util import (
    REPO,
    Mount,
    cleanup,
    fsck,
    is_mounted,
    mkfs,
    mount,
    needs_fuse,
    pid_alive,
    run_cli,
    umount,
    wait_for,
)

pytestmark = needs_fuse


def _helper(*args: str) -> subprocess.CompletedProcess:
    """``mount.mirrorfs ARGS`` / ``umount.mirrorfs ARGS`` as mount(8) would run them."""
    return subprocess.run(
        [sys.executable, "-m", "mirrorfs.mount_helper", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
    )


def _mount_options(mountpoint) -> set[str]:
    """The options of the topmost mount at ``mountpoint`` in /proc/mounts."""
    found: set[str] = set()
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == os.path.abspath(mountpoint):
                found = set(fields[3].split(","))
    return found


def _mount_count(mountpoint) -> int:
    with open("/proc/self/mounts") as f:
        return sum(line.split()[1] == os.path.abspath(mountpoint) for line in f)


def _mount_pid(vol) -> int:
    with open(os.path.join(vol, "mount.pid")) as f:
        return int(f.read())


def test_mount_helper_with_mounts_calling_convention(tmp_path):
    vol, mnt = str(tmp_path / "vol"), tmp_path / "mnt"
    mnt.mkdir()
    mkfs(vol, "32M")
    m = None
    try:
        proc = _helper(
            "mount", vol, str(mnt), "-o", "rw,allow_other,nosuid,nodev,noexec,_netdev,defaults"
        )
        assert proc.returncode == 0, proc.stderr
        m = Mount(_mount_pid(vol), vol, str(mnt))
        assert is_mounted(mnt)
        assert {"allow_other", "nosuid", "nodev", "noexec"} <= _mount_options(mnt)
        assert status(vol)["mount_options"] == ["allow_other", "nosuid", "nodev", "noexec"]
        data = os.urandom(300_000)
        with open(mnt / "f", "wb") as f:
            f.write(data)  # no fsync: the final commit makes it durable

        proc = _helper("umount", str(mnt), "-n", "-t", "fuse.mirrorfs")
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mnt)
        assert not pid_alive(m.pid)  # umount.mirrorfs returned after the final commit
        assert fsck(vol).returncode == 0
        m = mount(vol, mnt)
        assert (mnt / "f").read_bytes() == data
        umount(m)
    finally:
        cleanup(m)


def test_mount_t_and_fstab_then_plain_umount(tmp_path):
    """``mount -t TYPE`` and an fstab line with the helper on mount(8)'s search path (under
    a type of this test's own, removed afterwards), then umount(8) without our umount
    helper: it returns at once, and the mount process still completes its final commit."""
    if os.geteuid() != 0 or shutil.which("mount") is None or not os.path.isdir("/sbin"):
        pytest.skip("needs root and mount(8) with /sbin")
    fstype = f"mirrorfstest{os.getpid()}"
    helper, fuse_helper = f"/sbin/mount.{fstype}", f"/sbin/mount.fuse.{fstype}"
    vol, mnt = str(tmp_path / "vol"), tmp_path / "mnt"
    mnt.mkdir()
    mkfs(vol, "32M")
    m = None
    try:
        with open(helper, "w") as f:
            f.write(
                f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m mirrorfs.mount_helper "
                'mount "$@"\n'
            )
        os.chmod(helper, 0o755)
        proc = subprocess.run(
            ["mount", "-t", fstype, vol, str(mnt), "-o", "noatime,nodev"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        m = Mount(_mount_pid(vol), vol, str(mnt))
        assert is_mounted(mnt) and {"noatime", "nodev"} <= _mount_options(mnt)
        data = os.urandom(1 << 20)
        with open(mnt / "big", "wb") as f:
            f.write(data)
        proc = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        wait_for(lambda: not pid_alive(m.pid), 60, "the mount process to finish")
        assert "final commit: transaction" in log_text(vol)

        fstab = tmp_path / "fstab"
        fstab.write_text(f"{vol} {mnt} {fstype} allow_other,noexec,_netdev,nofail 0 0\n")
        proc = subprocess.run(
            ["mount", "-T", str(fstab), str(mnt)], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        m = Mount(_mount_pid(vol), vol, str(mnt))
        assert {"allow_other", "noexec"} <= _mount_options(mnt)
        assert (mnt / "big").read_bytes() == data  # durable across the plain umount
        umount(m)

        # Type fuse.TYPE: mount(8) looks for mount.fuse.TYPE before mount.fuse.
        os.rename(helper, fuse_helper)
        proc = subprocess.run(
            ["mount", "-t", f"fuse.{fstype}", vol, str(mnt)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        m = Mount(_mount_pid(vol), vol, str(mnt))
        assert (mnt / "big").read_bytes() == data
        umount(m)
        assert fsck(vol).returncode == 0
    finally:
        for path in (helper, fuse_helper):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        cleanup(m)


def test_busy_mountpoints_are_refused_unless_nonempty(tmp_path):
    vol1, vol2 = str(tmp_path / "vol1"), str(tmp_path / "vol2")
    mkfs(vol1, "16M")
    mkfs(vol2, "16M")
    mnt, full = tmp_path / "mnt", tmp_path / "full"
    mnt.mkdir()
    full.mkdir()
    (full / "hidden").write_text("here before the mount\n")
    m1 = m2 = None
    try:
        m1 = mount(vol1, mnt)
        assert_one_line_error(
            run_cli("mount", vol2, mnt),
            code=1,
            contains=f"mountpoint {mnt} is already a mount point (fuse.mirrorfs mirrorfs:{vol1})"
            ": unmount it first, or pass -o nonempty to mount over it",
        )
        assert _mount_count(mnt) == 1
        assert_one_line_error(
            run_cli("mount", vol2, full, "--foreground"),
            code=1,
            contains=f"mountpoint {full} is not empty: its files would be hidden; pass -o "
            "nonempty to mount over them",
        )
        m2 = mount(vol2, full, "-o", "nonempty")
        assert not (full / "hidden").exists()
        umount(m2)
        assert (full / "hidden").read_text() == "here before the mount\n"
        umount(m1)
    finally:
        cleanup(m2)
        cleanup(m1)


def test_mount_foreground_notifies_systemd(tmp_path):
    vol, mnt = str(tmp_path / "vol"), tmp_path / "mnt"
    mnt.mkdir()
    mkfs(vol, "16M")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(60)
    env = dict(os.environ, PYTHONPATH=REPO, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    popen = subprocess.Popen(
        [sys.executable, "-m", "mirrorfs", "mount", vol, str(mnt), "--foreground"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=REPO,
    )
    m = Mount(popen.pid, vol, str(mnt), popen)
    try:
        ready = sock.recv(4096).decode().split("\n")
        assert ready[0] == "READY=1" and f"MAINPID={popen.pid}" in ready
        assert is_mounted(mnt)  # ready means mounted and answering
        (mnt / "f").write_text("before the stop\n")
        # systemctl reload (logrotate): SIGHUP reopens the log, the mount goes on.
        os.rename(os.path.join(vol, "mirrorfs.log"), tmp_path / "rotated.log")
        popen.send_signal(signal.SIGHUP)
        wait_for(lambda: "log file reopened (SIGHUP)" in log_text(vol), 30, "the reopen")
        assert popen.poll() is None and is_mounted(mnt)
        assert (mnt / "f").read_text() == "before the stop\n"
        popen.send_signal(signal.SIGTERM)  # systemctl stop
        assert sock.recv(4096) == b"STOPPING=1"
        assert popen.wait(timeout=60) == 0
        assert not is_mounted(mnt)
        assert "final commit: transaction" in log_text(vol)
    finally:
        sock.close()
        cleanup(m)


def _node_role(metrics_port: int) -> str:
    """The role that the node serving ``metrics_port`` reports (mirrorfs_node_info)."""
    from tests.test_status_live import scrape

    def role() -> str | None:
        try:
            samples = scrape(metrics_port)
        except OSError:
            return None  # not (yet) listening: the successor is starting
        roles = [dict(lv)["role"] for (n, lv), _ in samples.items() if n == "mirrorfs_node_info"]
        return roles[0] if len(roles) == 1 else None

    found: list[str | None] = [None]

    def answered() -> bool:
        found[0] = role()
        return found[0] is not None

    wait_for(answered, 60, f"the metrics endpoint at 127.0.0.1:{metrics_port}", interval=0.2)
    return found[0] or ""


def test_promote_keeps_the_replica_mount_options_metrics_and_stop(tmp_path):
    c = Cluster(str(tmp_path))
    promoted: Mount | None = None
    try:
        src = c.mkfs("src", "64M")
        mport = free_port()
        rep = c.replica("rep", start=False, extra=("--metrics", f"127.0.0.1:{mport}"))
        rep.options = ("allow_other",)
        rep.start()
        source = c.mount_source(src, [rep.address])
        with open(os.path.join(source.mountpoint, "f"), "w") as f:
            f.write("to the replica\n")
        wait_caught_up(src)
        wait_for(rep.mounted, 60, "the replica's read-only mount")
        assert "allow_other" in _mount_options(rep.mountpoint)
        assert rep.status()["mount_options"] == ["allow_other"]
        c.umount_source(source)

        proc = run_cli("promote", rep.dir, "--force")
        assert proc.returncode == 0, proc.stderr
        assert f"mounted read-write at {rep.mountpoint} with -o allow_other" in proc.stdout
        promoted = Mount(_mount_pid(rep.dir), rep.dir, rep.mountpoint)
        opts = _mount_options(rep.mountpoint)
        assert "allow_other" in opts and "rw" in opts
        assert status(rep.dir)["mount_options"] == ["allow_other"]
        assert _node_role(mport) == "source"  # the replica's endpoint, now the mount's

        # ``mirrorfs stop`` ends a mount as umount does: unmounted, final commit, exited.
        with open(os.path.join(rep.mountpoint, "g"), "w") as f:
            f.write("on the new source\n")
        proc = run_cli("stop", rep.dir)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"stopped the mount of {rep.dir} (pid {promoted.pid})"
        assert not is_mounted(rep.mountpoint) and not pid_alive(promoted.pid)
        assert fsck(rep.dir).returncode == 0
    finally:
        cleanup(promoted)
        c.close()


def test_switchover_keeps_both_mounts_options_and_metrics(tmp_path):
    """The promoted side mounts read-write with its replica mount's options, the old source
    mounts read-only with those of its read-write mount; each keeps its metrics endpoint."""
    from tests.test_switchover import _retire, _successors, _switchover

    c = Cluster(str(tmp_path))
    try:
        a = c.mkfs("a", "64M")
        a_metrics, b_metrics = free_port(), free_port()
        b = c.replica("b", start=False, extra=("--metrics", f"127.0.0.1:{b_metrics}"))
        b.options = ("noexec",)
        b.start()
        a_src = c.mount_source(
            a, [b.address], extra=("-o", "allow_other", "--metrics", f"127.0.0.1:{a_metrics}")
        )
        assert _node_role(a_metrics) == "source" and _node_role(b_metrics) != "source"
        with open(os.path.join(a_src.mountpoint, "f"), "w") as f:
            f.write("before the switchover\n")
        wait_caught_up(a)
        wait_for(b.mounted, 60, "B's read-only mount")
        port = free_port()
        _switchover(a, b.address, f"127.0.0.1:{port}")
        _retire(c, a_src)
        _successors(
            c,
            source=b.dir,
            source_mnt=b.mountpoint,
            replica=a,
            port=port,
            replica_mnt=a_src.mountpoint,
        )
        wait_for(lambda: is_mounted(a_src.mountpoint), 60, "A's read-only mount")
        b_opts, a_opts = _mount_options(b.mountpoint), _mount_options(a_src.mountpoint)
        assert "noexec" in b_opts and "rw" in b_opts and "allow_other" not in b_opts
        assert "allow_other" in a_opts and "ro" in a_opts
        assert status(b.dir)["mount_options"] == ["noexec"]
        assert status(a)["mount_options"] == ["allow_other"]
        assert _node_role(b_metrics) == "source"
        assert _node_role(a_metrics) not in ("", "source")
    finally:
        c.close()


def test_promote_of_a_stopped_replica_takes_o(tmp_path):
    from mirrorfs.store.nodestate import NodeState

    vol, mnt = str(tmp_path / "rep"), tmp_path / "mnt"
    mnt.mkdir()
    mkfs(vol, "16M")
    state = NodeState.load(vol)  # a stopped, consistent replica
    state.role = "target"
    state.save(vol)
    m = None
    try:
        mport = free_port()
        bad = run_cli("promote", vol, "--mount", mnt, "--metrics", "192.0.2.1:9100")
        assert_one_line_error(bad, code=1, contains="--metrics-insecure")
        assert stopped_status(vol)["role"] == "target"  # refused before promoting
        proc = run_cli(
            "promote", vol, "--mount", mnt, "-o", "noexec", "-o", "nodev",
            "--metrics", f"127.0.0.1:{mport}",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert _node_role(mport) == "source"
        assert f"mounted read-write at {mnt} with -o noexec,nodev" in proc.stdout
        m = Mount(_mount_pid(vol), vol, str(mnt))
        assert {"noexec", "nodev", "rw"} <= _mount_options(mnt)
        assert status(vol)["mount_options"] == ["noexec", "nodev"]
        umount(m)
    finally:
        cleanup(m)


def test_lazy_umount_commits_when_the_last_file_closes(tmp_path):
    vol, mnt = str(tmp_path / "vol"), tmp_path / "mnt"
    mnt.mkdir()
    mkfs(vol, "16M")
    m = mount(vol, mnt)
    f = None
    try:
        f = open(mnt / "open-file", "w")  # noqa: SIM115 (kept open across the unmount)
        f.write("written while detached\n")
        f.flush()
        assert_one_line_error(
            _helper("umount", str(mnt)), code=1, contains=f"cannot unmount {mnt}"
        )  # busy: a plain unmount is refused
        proc = _helper("umount", str(mnt), "-l")
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mnt) and m.alive()  # detached, still serving the open file
        f.write("and more\n")
        f.close()
        f = None
        wait_for(lambda: not m.alive(), 60, "the mount process after the last close")
        assert "final commit: transaction" in log_text(vol)
        m = mount(vol, mnt)
        assert (mnt / "open-file").read_text() == "written while detached\nand more\n"
        umount(m)
    finally:
        if f is not None:
            f.close()
        cleanup(m)
