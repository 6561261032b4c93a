"""Backup offload of a real database: PostgreSQL on the source, backed up from the replica.

PostgreSQL (Debian's package, installed here when missing) runs pgbench with its data
directory on a source mount; a checkpoint is taken while pgbench writes; on the replica,
once it has applied that checkpoint, the checkpoint is mounted and the data directory
copied out of it file by file while pgbench goes on writing (so the replica keeps
applying under the checkpoint mount). A second server started on that copy must recover (the
checkpoint is one point in time, so the copy is crash-consistent whatever order cp read
it in) and satisfy pgbench's invariant and ``pg_amcheck``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import threading

import pytest

from tests.repl_util import Cluster, free_port
from tests.util import (
    is_mounted,
    lazy_unmount,
    needs_fuse,
    pid_alive,
    public_dir,
    run_cli,
    wait_for,
)

pytestmark = [pytest.mark.mount, needs_fuse]

PG_USER = "postgres"


def _pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))
    return os.path.dirname(found[-1]) if found else None


def _postgres_or_skip() -> str:
    """The directory of PostgreSQL's binaries, installing Debian's package when missing."""
    bindir = _pg_bin()
    if bindir is None:
        if shutil.which("apt-get") is None:
            pytest.skip("PostgreSQL is not installed and there is no apt-get to install it")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            res = subprocess.run(
                ["apt-get", "install", "-y", "-qq", "postgresql"],
                capture_output=True,
                text=True,
                timeout=600,
                env=env,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("apt-get install postgresql took more than 10 minutes")
        bindir = _pg_bin()
        if res.returncode != 0 or bindir is None:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            pytest.skip(f"cannot install postgresql (apt-get exit {res.returncode}): {tail[0]}")
    for tool in ("initdb", "pg_ctl", "pgbench", "pg_amcheck", "psql"):
        if not os.access(os.path.join(bindir, tool), os.X_OK):
            pytest.skip(f"{bindir}/{tool} is missing")
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        pytest.skip(f"there is no {PG_USER!r} user to run the server as")
    if os.geteuid() != 0:
        pytest.skip("needs root to run the server as the postgres user")
    return bindir


def _chown_tree(path: str) -> None:
    pw = pwd.getpwnam(PG_USER)
    for dirpath, dirnames, filenames in os.walk(path):
        os.lchown(dirpath, pw.pw_uid, pw.pw_gid)
        for n in dirnames + filenames:
            os.lchown(os.path.join(dirpath, n), pw.pw_uid, pw.pw_gid)


class _Server:
    """One postgres server this test started (as the postgres user), unix socket only."""

    def __init__(self, bindir: str, datadir: str, sockdir: str, port: int) -> None:
        self.bindir, self.datadir, self.sockdir, self.port = bindir, datadir, sockdir, port
        self.pid = 0
        self.log = os.path.join(sockdir, f"server-{port}.log")

    def run(self, tool: str, *args: str, timeout: float = 120.0, check: bool = True):
        proc = subprocess.run(
            [os.path.join(self.bindir, tool), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            user=PG_USER,
            group=PG_USER,
            cwd=self.sockdir,
            env=dict(
                os.environ,
                PGHOST=self.sockdir,
                PGPORT=str(self.port),
                PGUSER=PG_USER,
                HOME=self.sockdir,
            ),
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{tool} {args} exited {proc.returncode}: "
                f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}{self._log_tail()}"
            )
        return proc

    def _log_tail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "\nserver log:\n" + f.read()[-3000:]
        except OSError:
            return ""

    def start(self) -> None:
        opts = (
            f"-k {self.sockdir} -p {self.port} -c listen_addresses='' "
            "-c shared_buffers=16MB -c max_wal_size=64MB -c max_connections=20"
        )
        self.run(
            "pg_ctl",
            "-D",
            self.datadir,
            "-l",
            self.log,
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
            timeout=90,
        )
        with open(os.path.join(self.datadir, "postmaster.pid")) as f:
            self.pid = int(f.readline())

    def sql(self, query: str) -> str:
        return self.run(
            "psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c", query
        ).stdout.strip()

    def stop(self) -> None:
        """For ``finally``: immediate stop, then SIGKILL the postmaster and its children."""
        if not self.pid:
            return
        with contextlib.suppress(Exception):
            self.run(
                "pg_ctl",
                "-D",
                self.datadir,
                "-m",
                "immediate",
                "-w",
                "-t",
                "20",
                "stop",
                timeout=40,
                check=False,
            )
        for pid in [*self._children(), self.pid]:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not pid_alive(self.pid), 20, f"postmaster {self.pid} to exit")

    def _children(self) -> list[int]:
        kids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2 :].split()[1]) == self.pid:
                kids.append(int(entry))
        return kids


INVARIANT = (
    "select (select sum(abalance) from pgbench_accounts), "
    "(select sum(bbalance) from pgbench_branches), "
    "(select sum(tbalance) from pgbench_tellers), "
    "(select coalesce(sum(delta), 0) from pgbench_history), "
    "(select count(*) from pgbench_history)"
)


def _history(server: _Server) -> int:
    return int(server.sql("select count(*) from pgbench_history"))


class _Bench:
    """pgbench against ``server`` in rounds of 2 s, in a thread, until ``stop()``."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.done = threading.Event()
        self.failed: list[str] = []
        self.rounds = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        args = ("-c", "4", "-j", "2", "-T", "2", "-n", "postgres")
        while not self.done.is_set():
            proc = self.server.run("pgbench", *args, timeout=120, check=False)
            if proc.returncode != 0:
                self.failed.append(proc.stdout[-1000:] + proc.stderr[-1000:])
                return
            self.rounds += 1

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "pgbench did not finish"
        assert not self.failed, self.failed


def _cli_ok(*args: str) -> str:
    proc = run_cli(*args, timeout=120)
    assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def test_backup_offload_of_postgres_from_a_checkpoint_on_the_replica(tmp_path):
    bindir = _postgres_or_skip()
    with public_dir() as pub:
        _offload(bindir, str(tmp_path), pub)


def _offload(bindir: str, tmp: str, pub: str) -> None:
    cluster = Cluster(tmp)
    servers: list[_Server] = []
    ck_mnt = None
    try:
        vol = cluster.mkfs("src", "256M")
        os.mkdir(os.path.join(pub, "src-mnt"))
        rep = cluster.replica("rep", mount=False)
        src = cluster.mount_source(
            vol, [rep.address], mountpoint=os.path.join(pub, "src-mnt"), extra=("-o", "allow_other")
        )
        sock1, sock2 = os.path.join(pub, "sock1"), os.path.join(pub, "sock2")
        for d in (sock1, sock2):
            os.mkdir(d)
            _chown_tree(d)
        data = os.path.join(src.mountpoint, "pgdata")
        os.mkdir(data, 0o700)
        _chown_tree(data)
        live = _Server(bindir, data, sock1, free_port())
        servers.append(live)
        live.run(
            "initdb",
            "-D",
            data,
            "-U",
            PG_USER,
            "--auth=trust",
            "--no-sync",
            "--no-instructions",
            "-E",
            "UTF8",
            "--locale=C",
            timeout=120,
        )
        live.start()
        live.run("pgbench", "-i", "-s", "1", "-q", "postgres", timeout=120)

        # pgbench writes, in rounds of 2 s, from before the checkpoint until the copy is
        # done: the live side and the replica under the checkpoint mount keep changing.
        bench = _Bench(live)
        try:
            wait_for(lambda: _history(live) > 50, 30, "pgbench to get going", interval=0.2)
            before = _history(live)
            out = _cli_ok("checkpoint", "create", vol, "backup")
            seq = json.loads(_cli_ok("checkpoint", "list", vol, "--json"))["checkpoints"][0]["seq"]
            assert f"at seq {seq}" in out
            wait_for(
                lambda: rep.status()["applied_seq"] >= seq,
                60,
                f"the replica to apply seq {seq}",
                interval=0.2,
            )
            ck_mnt = cluster.path("rep-ck", mkdir=True)
            _cli_ok("checkpoint", "mount", rep.dir, "backup", ck_mnt)
            assert is_mounted(ck_mnt)
            copy = os.path.join(pub, "copy")
            at_copy = _history(live)
            shutil.copytree(os.path.join(ck_mnt, "pgdata"), copy, symlinks=True)
            assert _history(live) > at_copy, "pgbench wrote nothing while the copy ran"
        finally:
            bench.stop()
        _cli_ok("umount", ck_mnt)
        total = _history(live)
        os.unlink(os.path.join(copy, "postmaster.pid"))  # the live server's lock file
        _chown_tree(copy)
        os.chmod(copy, 0o700)

        restored = _Server(bindir, copy, sock2, free_port())
        servers.append(restored)
        restored.start()  # crash recovery from the checkpoint's WAL
        with open(restored.log, errors="replace") as f:
            assert "database system was not properly shut down" in f.read()
        a, b, t_, h, n = (int(x) for x in restored.sql(INVARIANT).split("|"))
        assert a == b == t_ == h, f"pgbench invariant broken: {a} {b} {t_} {h}"
        # Every commit that had returned before the checkpoint, and not all of them.
        assert before <= n < total, (before, n, total)
        restored.run(
            "pg_amcheck", "--install-missing", "--heapallindexed", "-d", "postgres", timeout=120
        )
        a, b, t_, h, _ = (int(x) for x in live.sql(INVARIANT).split("|"))
        assert a == b == t_ == h
    finally:
        for s in reversed(servers):
            s.stop()
        if ck_mnt is not None and is_mounted(ck_mnt):
            run_cli("umount", ck_mnt, timeout=60)
            lazy_unmount(ck_mnt)
        cluster.close()
