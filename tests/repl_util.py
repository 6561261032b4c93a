"""Helpers for the replication tests: replica daemons, a cluster that cleans up, trees.

Every process runs as in production: ``python -m mirrorfs replica`` and ``mount`` detach
and write their pid files; the tests talk to them through the control socket (status) and
the command line (verify, mirror, umount). A ``Cluster`` records every mount, daemon and
proxy that a test starts and tears all of them down in ``close()``, also when the test
failed; it only ever signals the pids it started itself.
"""

from __future__ import annotations

import contextlib
import filecmp
import hashlib
import os
import random
import shutil
import signal
import socket
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from mirrorfs.node.control import ControlError, control_request, socket_path
from tests.netproxy import FaultProxy
from tests.util import (
    Mount,
    cleanup,
    is_mounted,
    lazy_unmount,
    mkfs,
    mount,
    pid_alive,
    run_cli,
    umount,
    wait_for,
)

MiB = 1 << 20
STDLIB = os.path.dirname(os.__file__)
#: Small stdlib packages for a real tree: a few hundred files of text.
TREE_PACKAGES = ("json", "email", "http", "urllib", "importlib", "xml", "asyncio", "encodings")


class MemoryListener:
    """A listener without sockets, for the session tests.

    While ``serve`` runs, ``connect()`` (a ``Shipper``'s stream factory) returns one end of a
    ``trio.testing.memory_stream_pair`` and serves the other end with ``handler`` in the
    listener's nursery; otherwise it is refused, as a TCP connect to a closed port would be.
    ``stop()`` ends the listener and every connection it served.
    """

    def __init__(self, handler: Callable[[trio.abc.Stream], Awaitable[None]]) -> None:
        self.handler = handler
        self.connections = 0
        self._nursery: trio.Nursery | None = None

    async def serve(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started(0)
                await trio.sleep_forever()
            finally:
                if self._nursery is nursery:  # (not a listener restarted since)
                    self._nursery = None

    def stop(self) -> None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        self._nursery = None

    async def connect(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        if self._nursery is None:
            raise ConnectionRefusedError(111, "Connection refused")
        client, server = trio.testing.memory_stream_pair()
        self.connections += 1
        self._nursery.start_soon(self.handler, server)
        return client


def holds_for(cond: Callable[[], bool], seconds: float, what: str) -> None:
    """Check ``cond`` every 50 ms for ``seconds``; fail as soon as it is false.

    For what must *not* happen (a stale source must not reach a replica): the check runs
    the whole time, instead of sleeping and looking once at the end.
    """
    deadline = time.monotonic() + seconds
    while True:
        if not cond():
            raise AssertionError(f"no longer true: {what}")
        if time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_secret(path: str | os.PathLike, text: str) -> str:
    """A secret file of mode 0600 (the daemons refuse anything looser)."""
    path = os.fspath(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(path, 0o600)
    return path


# -- status


def node_status(volume_dir: str | os.PathLike, timeout: float = 10.0) -> dict[str, Any] | None:
    """The running node's status (control socket), or None when no daemon answers."""
    try:
        reply = control_request(socket_path(os.fspath(volume_dir)), {"cmd": "status"}, timeout)
    except ControlError:
        return None
    assert reply.get("ok"), reply
    return reply["status"]


def status(volume_dir: str | os.PathLike) -> dict[str, Any]:
    st = node_status(volume_dir)
    assert st is not None, f"no daemon answers for {volume_dir}"
    return st


def target(st: dict[str, Any], address: str) -> dict[str, Any]:
    """The entry of ``address`` in a source status."""
    for t in st["targets"]:
        if t["address"] == address:
            return t
    raise AssertionError(f"{address} is not a target: {[t['address'] for t in st['targets']]}")


def wait_caught_up(
    source_dir: str | os.PathLike, timeout: float = 60.0, settle: float = 1.2
) -> int:
    """Wait until every target of the running source has applied its last commit, and the
    source has committed nothing more for ``settle`` seconds (> the group-commit interval);
    return that seq."""
    deadline = time.monotonic() + timeout
    stable_since: float | None = None
    stable_seq = -1
    last: dict[str, Any] = {}
    while True:
        st = node_status(source_dir)
        assert st is not None, f"the source {source_dir} is not running"
        last = st
        seq = st["committed_seq"]
        done = all(t["state"] == "streaming" and t["applied_seq"] == seq for t in st["targets"])
        now = time.monotonic()
        if done and seq == stable_seq:
            if stable_since is not None and now - stable_since >= settle:
                return seq
        else:
            stable_since, stable_seq = (now, seq) if done else (None, -1)
        if now > deadline:
            raise AssertionError(
                f"targets not caught up after {timeout} s: committed {seq}, targets "
                + "; ".join(
                    f"{t['address']} {t['state']} {t['reason']!r} applied {t['applied_seq']}"
                    for t in last["targets"]
                )
            )
        time.sleep(0.05)


def wait_target(
    source_dir: str | os.PathLike, address: str, predicate, timeout: float, what: str
) -> dict[str, Any]:
    """Poll the source's entry for ``address`` until ``predicate(entry)``; return it."""
    found: list[dict[str, Any]] = []

    def check() -> bool:
        st = node_status(source_dir)
        if st is None:
            return False
        entry = target(st, address)
        if predicate(entry):
            found.append(entry)
            return True
        return False

    wait_for(check, timeout, what, interval=0.05)
    return found[0]


def stopped_status(volume_dir: str | os.PathLike) -> dict[str, Any]:
    """``mirrorfs status --json`` of a node that is not running (node.json, log bounds)."""
    import json

    proc = run_cli("status", os.fspath(volume_dir), "--json", check=True)
    st = json.loads(proc.stdout)
    assert st["running"] is False, st
    return st


def log_text(volume_dir: str | os.PathLike) -> str:
    try:
        with open(os.path.join(volume_dir, "mirrorfs.log"), errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


# -- replica daemons


@dataclass
class Replica:
    """A ``mirrorfs replica`` daemon this test started (detached; pid from its pid file)."""

    dir: str
    port: int
    mountpoint: str | None
    secret_file: str | None = None
    pid: int = 0
    #: ``-o`` values of its read-only mount.
    options: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()  # more ``mirrorfs replica`` arguments (e.g. --metrics)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Replica:
        """Start (or restart, on the same DIR and port) and wait until it listens."""
        args = ["replica", self.dir, "--listen", self.address]
        if self.mountpoint:
            args += ["--mount", self.mountpoint]
        if self.secret_file:
            args += ["--secret-file", self.secret_file]
        for opt in self.options:
            args += ["-o", opt]
        args += list(self.extra)
        proc = run_cli(*args, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"replica failed ({proc.returncode}): {proc.stderr.strip()}")
        with open(os.path.join(self.dir, "replica.pid")) as f:
            self.pid = int(f.read())
        assert self._ours(), f"pid {self.pid} is not our replica of {self.dir}"
        return self

    def _ours(self) -> bool:
        """Whether ``pid`` is still the daemon we started (never signal a reused pid)."""
        if not self.pid or not pid_alive(self.pid):
            return False
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
        except OSError:
            return False
        return b"replica" in cmdline and os.fsencode(self.dir) in cmdline

    def alive(self) -> bool:
        return self._ours()

    def status(self) -> dict[str, Any]:
        return status(self.dir)

    def mounted(self) -> bool:
        return bool(self.mountpoint) and is_mounted(self.mountpoint)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait (the daemon unmounts its mount itself); SIGKILL if it hangs."""
        if self._ours():
            os.kill(self.pid, signal.SIGTERM)
            try:
                wait_for(lambda: not pid_alive(self.pid), timeout, f"replica {self.pid} to exit")
            except AssertionError:
                self.kill()
                raise
        self._clear_mount()

    def kill(self) -> None:
        """SIGKILL (a crash) and detach its dead mount."""
        if self._ours():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            wait_for(lambda: not pid_alive(self.pid), 30, f"replica {self.pid} to die")
        self._clear_mount()

    def _clear_mount(self) -> None:
        if self.mountpoint:
            lazy_unmount(self.mountpoint)


# -- a cluster of processes that a test started


@dataclass
class Cluster:
    """Sources, replicas and proxies of one test, all torn down by ``close()``."""

    root: str
    sources: list[Mount] = field(default_factory=list)
    replicas: list[Replica] = field(default_factory=list)
    proxies: list[FaultProxy] = field(default_factory=list)
    threads: list[BackgroundWriter] = field(default_factory=list)

    def path(self, name: str, *, mkdir: bool = False) -> str:
        p = os.path.join(self.root, name)
        if mkdir:
            os.makedirs(p, exist_ok=True)
        return p

    def mkfs(self, name: str = "src", size: str = "256M") -> str:
        vol = self.path(name)
        mkfs(vol, size)
        return vol

    def mount_source(
        self,
        vol: str,
        mirrors: list[str] = (),  # type: ignore[assignment]
        *,
        mountpoint: str | None = None,
        secret_file: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> Mount:
        mnt = mountpoint or self.path(os.path.basename(vol) + "-mnt", mkdir=True)
        args: list[str] = []
        for address in mirrors:
            args += ["--mirror", address]
        if secret_file:
            args += ["--secret-file", secret_file]
        m = mount(vol, mnt, *args, *extra)
        self.sources.append(m)
        return m

    def umount_source(self, m: Mount) -> None:
        umount(m)

    def replica(
        self,
        name: str,
        *,
        mount: bool = True,
        secret_file: str | None = None,
        start: bool = True,
        extra: tuple[str, ...] = (),
    ) -> Replica:
        rep = Replica(
            self.path(name),
            free_port(),
            self.path(name + "-mnt", mkdir=True) if mount else None,
            secret_file,
            extra=extra,
        )
        self.replicas.append(rep)
        if start:
            for attempt in range(3):
                try:
                    rep.start()
                    break
                except AssertionError as exc:
                    # Another process took the free port in between: pick another.
                    if "cannot listen" not in str(exc) or attempt == 2:
                        raise
                    rep.port = free_port()
        return rep

    def proxy(self, rep: Replica) -> FaultProxy:
        p = FaultProxy(target=("127.0.0.1", rep.port))
        self.proxies.append(p)
        p.start()
        return p

    def writer(self, directory: str, **kwargs: Any) -> BackgroundWriter:
        w = BackgroundWriter(directory, **kwargs)
        self.threads.append(w)
        w.start()
        return w

    def close(self) -> None:
        """Stop everything (never raises): writers, sources, replicas, proxies."""
        for w in self.threads:
            with contextlib.suppress(Exception):
                w.stop()
        for m in self.sources:
            cleanup(m)  # umount, else SIGKILL + fusermount3 -u -z
        for p in self.proxies:
            with contextlib.suppress(Exception):
                p.stop()
        for rep in self.replicas:
            try:
                rep.stop(timeout=20)
            except Exception:
                with contextlib.suppress(Exception):
                    rep.kill()


# -- trees


def build_tree(dst: str, *, random_mib: float = 3.0, seed: int = 1) -> None:
    """A real tree: small stdlib packages, a few MiB of random data, links, odd modes."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    os.makedirs(dst)
    for pkg in TREE_PACKAGES:
        src = os.path.join(STDLIB, pkg)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dst, "lib", pkg), ignore=ignore, symlinks=True)
    rnd = random.Random(seed)
    data = os.path.join(dst, "data")
    os.makedirs(data)
    total = int(random_mib * MiB)
    sizes = [total // 2 + 12345, total // 3, total - total // 2 - total // 3 - 12345]
    for i, size in enumerate(sizes):
        with open(os.path.join(data, f"r{i}.bin"), "wb") as f:
            f.write(rnd.randbytes(max(0, size)))
    with open(os.path.join(data, "sparse"), "wb") as f:
        f.seek(3 * MiB)
        f.write(b"end")
    os.symlink("r0.bin", os.path.join(data, "link"))
    os.link(os.path.join(data, "r1.bin"), os.path.join(data, "hard"))
    for mode in (0o600, 0o755, 0o4755):
        p = os.path.join(data, f"m{mode:o}")
        with open(p, "w") as f:
            f.write(f"{mode:o}\n")
        os.chmod(p, mode)
    os.makedirs(os.path.join(dst, "empty", "deep"))


def copy_tree(src: str, dst: str) -> None:
    """copytree keeping symlinks, modes, mtimes and hard links."""
    seen: dict[int, str] = {}

    def copy(s: str, d: str) -> str:
        st = os.lstat(s)
        if st.st_nlink > 1 and st.st_ino in seen:
            os.link(seen[st.st_ino], d)
            return d
        seen[st.st_ino] = d
        return shutil.copy2(s, d)

    shutil.copytree(src, dst, symlinks=True, copy_function=copy)


def tree_signature(root: str) -> dict[str, tuple]:
    """Relative path -> (mode, uid, gid, nlink, size, mtime, content or link target)."""
    sig: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            extra: object = None
            if stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                extra = (digest, inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else None)
            is_dir = stat.S_ISDIR(st.st_mode)
            sig[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_nlink,
                None if is_dir else st.st_size,
                None if is_dir else st.st_mtime_ns,
                extra,
            )
    return sig


def assert_same_tree(expected: dict[str, tuple], actual: dict[str, tuple]) -> None:
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    assert not missing and not extra, f"missing {missing[:10]}, unexpected {extra[:10]}"
    bad = [(p, expected[p], actual[p]) for p in sorted(expected) if expected[p] != actual[p]]
    assert not bad, f"{len(bad)} entries differ, e.g. {bad[:5]}"


def assert_blocks_identical(source_dir: str, replica_dir: str) -> None:
    a, b = os.path.join(source_dir, "blocks"), os.path.join(replica_dir, "blocks")
    assert os.path.getsize(a) == os.path.getsize(b), (os.path.getsize(a), os.path.getsize(b))
    if filecmp.cmp(a, b, shallow=False):
        return
    bs = 4096
    differ = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        block = 0
        while (x := fa.read(bs * 256)) and len(differ) < 10:
            y = fb.read(len(x))
            for i in range(0, len(x), bs):
                if x[i : i + bs] != y[i : i + bs]:
                    differ.append(block + i // bs)
            block += len(x) // bs
    raise AssertionError(f"block files differ, first differing blocks: {differ[:10]}")


def finish_and_compare(source: Mount, replicas: list[Replica]) -> int:
    """Wait until caught up, unmount the source, check that every replica has applied the
    source's last seq and that the block files are byte-identical; return that seq."""
    wait_caught_up(source.volume)
    umount(source)
    seq = stopped_status(source.volume)["checkpointed_seq"]
    for rep in replicas:
        wait_for(
            lambda rep=rep: rep.status()["applied_seq"] == seq,
            30,
            f"{rep.address} to apply seq {seq} (it has {rep.status()['applied_seq']})",
        )
        assert_blocks_identical(source.volume, rep.dir)
    return seq


# -- writers


def fsync_burst(directory: str, count: int, size: int, prefix: str = "burst") -> float:
    """Write ``count`` files of ``size`` random bytes, each fsync'd; the seconds it took."""
    os.makedirs(directory, exist_ok=True)
    data = os.urandom(size)
    t0 = time.monotonic()
    for i in range(count):
        fd = os.open(os.path.join(directory, f"{prefix}{i:05d}"), os.O_WRONLY | os.O_CREAT)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.monotonic() - t0


class BackgroundWriter:
    """A thread that keeps writing fsync'd files into ``directory`` until stopped."""

    def __init__(self, directory: str, *, size: int = 64 * 1024, pause: float = 0.0) -> None:
        self.directory = directory
        self.size = size
        self.pause = pause
        self.count = 0
        self.max_latency = 0.0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)

    def start(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self._thread.start()

    def _run(self) -> None:
        rnd = random.Random(7)
        try:
            while not self._stop.is_set():
                data = rnd.randbytes(1 + rnd.randrange(self.size))
                t0 = time.monotonic()
                path = os.path.join(self.directory, f"w{self.count:05d}")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self.max_latency = max(self.max_latency, time.monotonic() - t0)
                self.count += 1
                if self.pause:
                    self._stop.wait(self.pause)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def wait_for_count(self, n: int, timeout: float = 30.0) -> None:
        wait_for(lambda: self.count >= n or self.error is not None, timeout, f"{n} writes")
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the writer failed: {self.error!r}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        self.check()
