"""Planned switchover with real processes: zero loss under a writer, round trip, refusals.

``mirrorfs switchover A --to B --listen L``: A stops taking writes (they wait at its write
gate), drains to B, both confirm the same seq, B is promoted and mounted read-write where
its replica was mounted, and A becomes B's target listening on L, already consistent (no
resync). A writer that was writing on A moves to B when A answers EROFS; its pause is
measured.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
import time

import pyfuse3
import pytest
import trio
import trio.testing

from mirrorfs.repl.switchover import switchover_refusal
from mirrorfs.store.volume import Volume
from tests.repl_util import (
    Cluster,
    Replica,
    assert_blocks_identical,
    build_tree,
    finish_and_compare,
    free_port,
    node_status,
    status,
    stopped_status,
    target,
    wait_caught_up,
)
from tests.test_mount import CTX, fuse_errno, make_ops
from tests.util import (
    Mount,
    expect_errno,
    pid_alive,
    run_cli,
    wait_for,
)

_MOUNT = [
    pytest.mark.mount,  # tests/conftest.py adds the FUSE skip (util.needs_fuse)
]


def _mounts(fn):
    for mark in _MOUNT:
        fn = mark(fn)
    return fn


# -- without processes: the gate, the freeze, the target's check


async def test_write_gate_holds_modifying_requests_then_reopens_or_refuses():
    ops, fs, vol = make_ops()
    gate = vol.writer.gate
    assert gate is ops.gate
    await ops.mkdir(1, b"before", 0o755, CTX)  # open: passes without waiting
    gate.close()
    done: list[object] = []

    async def mkdir(name: bytes) -> None:
        try:
            done.append(await ops.mkdir(1, name, 0o755, CTX))
        except pyfuse3.FUSEError as exc:
            done.append(exc.errno)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mkdir, b"held")
        await trio.testing.wait_all_tasks_blocked()  # the request waits at the gate
        assert done == [] and gate.waiting == 1  # held, not failed
        assert (await ops.getattr(1, CTX)).st_ino == 5  # reads go on
        gate.reopen()
    assert len(done) == 1 and not isinstance(done[0], int)

    gate.close()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mkdir, b"refused")
        await trio.testing.wait_all_tasks_blocked()
        assert gate.waiting == 1
        gate.refuse(errno.EROFS)
    assert done[-1] == errno.EROFS
    assert await fuse_errno(ops.mkdir(1, b"later", 0o755, CTX)) == errno.EROFS
    assert await fuse_errno(ops.open(5, os.O_WRONLY, CTX)) == errno.EROFS
    assert gate.held == 1


def test_frozen_volume_seals_nothing_and_target_check(tmp_path):
    path = str(tmp_path / "v")
    Volume.create(path, 16 << 20)
    vol = Volume.open(path)
    try:
        seq = vol.last_seq
        vol.condition.freeze("switchover")
        vol.write(100, b"x" * vol.block_size)
        assert vol.writer.seal() is None and vol.commit() is None and vol.last_seq == seq
        assert switchover_refusal(vol, seq) == "the target is a source already"
        vol.condition.thaw()
        assert vol.commit() == seq + 1  # thawed: the change was kept
        vol.state.role = "target"
        assert switchover_refusal(vol, seq + 1) is None
        assert "applied" in (switchover_refusal(vol, seq + 2) or "")
        assert "not plainly streaming" in (switchover_refusal(vol, seq + 1, busy=True) or "")
    finally:
        vol.close()


# -- real processes


def _content(i: int) -> bytes:
    """What write number ``i`` puts in its file (a few KiB, different for every i)."""
    seed = hashlib.sha256(str(i).encode()).digest()
    return f"write {i}\n".encode() + seed * (1 + i % 97)


class SwitchingWriter(threading.Thread):
    """Writes numbered, fsync'd files on the source's mount; when that refuses, waits until
    ``next_dir`` answers as a source and goes on at ``next_mnt``.

    ``ok`` maps each file name to its content, for the writes that returned success on a
    mirrorfs mount (the device is checked, so a plain directory under a mountpoint in
    transition does not count); ``max_pause`` is the longest gap between two of them.
    """

    def __init__(self, mnt: str, next_dir: str, next_mnt: str) -> None:
        super().__init__(name="switching-writer", daemon=True)
        self.mnt, self.next_dir, self.next_mnt = mnt, next_dir, next_mnt
        self.ok: dict[str, bytes] = {}
        self.ok_on_next = 0
        self.failed: list[tuple[int, str, int | None]] = []
        self.max_pause = 0.0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def _run(self) -> None:
        mnt, dev = self.mnt, os.stat(self.mnt).st_dev
        last_ok = time.monotonic()
        i = 0
        while not self._halt.is_set():
            name, data = f"w{i:06d}", _content(i)
            i += 1
            try:
                fd = os.open(os.path.join(mnt, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                    same = os.fstat(fd).st_dev == dev
                finally:
                    os.close(fd)
            except OSError as exc:
                self.failed.append((i - 1, mnt, exc.errno))
                same = False
            if same:
                now = time.monotonic()
                self.max_pause = max(self.max_pause, now - last_ok)
                last_ok = now
                self.ok[name] = data
                self.ok_on_next += mnt == self.next_mnt
                continue
            if mnt == self.next_mnt:
                time.sleep(0.01)
                continue
            # The source refused: go to the new one once it answers as a source (its
            # control socket is served once the FUSE session is mounted).
            deadline = time.monotonic() + 60
            while not self._halt.is_set():
                st = node_status(self.next_dir, timeout=2.0)
                if st is not None and st.get("role") == "source":
                    break
                if time.monotonic() > deadline:
                    raise AssertionError("the new source never answered as a source")
                time.sleep(0.01)
            mnt, dev = self.next_mnt, os.stat(self.next_mnt).st_dev

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=60)
        if self.error is not None:
            raise AssertionError(f"the writer failed: {self.error!r}")


def _switchover(source_dir: str, to: str, listen: str, *extra: str) -> tuple[int, str]:
    proc = run_cli("switchover", source_dir, "--to", to, "--listen", listen, *extra)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    m = re.search(r"at seq (\d+)", proc.stdout)
    assert m, proc.stdout
    return int(m.group(1)), proc.stdout


def _successors(
    c: Cluster, *, source: str, source_mnt: str, replica: str, port: int, replica_mnt: str | None
) -> tuple[Mount, Replica]:
    """The processes a switchover started through its handover helpers: the new source's
    mount and the old source's replica daemon. They are the cluster's to stop as soon as
    their pid files appear, so that a failing test still cleans them up."""
    rep = Replica(replica, port, replica_mnt)
    c.replicas.append(rep)
    found: list[Mount] = []

    def pid_files() -> bool:
        if not found and os.path.exists(os.path.join(source, "mount.pid")):
            with open(os.path.join(source, "mount.pid")) as f:
                found.append(Mount(int(f.read()), source, source_mnt))
            c.sources.append(found[0])
        if not rep.pid and os.path.exists(os.path.join(replica, "replica.pid")):
            with open(os.path.join(replica, "replica.pid")) as f:
                rep.pid = int(f.read())
        return bool(found and rep.pid)

    wait_for(pid_files, 60, "the successors' pid files")
    wait_for(lambda: (node_status(source) or {}).get("role") == "source", 60, "the new source")
    wait_for(
        lambda: (node_status(replica) or {}).get("state") == "streaming",
        60,
        "the old source to follow the new one",
    )
    assert rep.alive() and found[0].alive()
    return found[0], rep


def _retire(c: Cluster, m: Mount) -> None:
    """A source that switched over: its process is gone, its mountpoint is not its own."""
    wait_for(lambda: not pid_alive(m.pid), 30, f"the old source {m.pid} to exit")
    if m in c.sources:
        c.sources.remove(m)


@_mounts
def test_switchover_under_a_continuous_writer(tmp_path):
    c = Cluster(str(tmp_path))
    writer: SwitchingWriter | None = None
    try:
        a = c.mkfs("a")
        b = c.replica("b")
        a_src = c.mount_source(a, [b.address])
        build_tree(os.path.join(a_src.mountpoint, "tree"), random_mib=1)
        wait_caught_up(a)

        writer = SwitchingWriter(a_src.mountpoint, b.dir, b.mountpoint)
        writer.start()
        wait_for(lambda: len(writer.ok) >= 30 or writer.error, 60, "30 writes on A")
        a_port = free_port()
        listen = f"127.0.0.1:{a_port}"
        seq, out = _switchover(a, b.address, listen)
        assert f"epoch 2 from seq {seq + 1}" in out, out
        _retire(c, a_src)
        b_source, ra = _successors(
            c,
            source=b.dir,
            source_mnt=b.mountpoint,
            replica=a,
            port=a_port,
            replica_mnt=a_src.mountpoint,
        )
        wait_for(lambda: writer.ok_on_next >= 30 or writer.error, 60, "30 writes on B")
        writer.stop()
        print(
            f"switchover: writer pause {writer.max_pause:.3f} s (longest gap between two "
            f"successful fsync'd writes), {len(writer.failed)} write(s) refused; CLI: "
            + " / ".join(line.strip() for line in out.splitlines()[1:2])
        )
        assert writer.max_pause < 10.0
        assert writer.failed and all(
            e == errno.EROFS for _, m, e in writer.failed if m != b.mountpoint
        )

        # Every write that returned success is on the new source, with its content.
        for name, data in writer.ok.items():
            with open(os.path.join(b.mountpoint, name), "rb") as f:
                assert f.read() == data, name

        # The roles and histories, and no resync: A was consistent at seq already.
        st = status(b.dir)
        assert st["role"] == "source" and st["epochs"] == [[1, 1], [2, seq + 1]]
        entry = target(st, listen)
        assert entry["state"] == "streaming"
        assert entry["resync"] is None and entry["initial_sync"] is None, entry
        rst = ra.status()
        assert rst["role"] == "target" and rst["archives"] == []
        assert ra.mounted()  # read-only where A was mounted
        expect_errno(errno.EROFS, open, os.path.join(ra.mountpoint, "x"), "w")

        finish_and_compare(b_source, [ra])  # block files byte-identical
        ra.stop()
        assert stopped_status(a)["epochs"] == [[1, 1], [2, seq + 1]]
        assert stopped_status(b.dir)["epochs"] == [[1, 1], [2, seq + 1]]
    finally:
        if writer is not None and writer.is_alive():
            writer._halt.set()
            writer.join(timeout=60)
        c.close()


@_mounts
def test_round_trip_a_to_b_and_back(tmp_path):
    c = Cluster(str(tmp_path))
    try:
        a = c.mkfs("a")
        b = c.replica("b")
        a_src = c.mount_source(a, [b.address])
        build_tree(os.path.join(a_src.mountpoint, "tree"), random_mib=1)
        wait_caught_up(a)

        # A -> B
        a_port = free_port()
        seq1, _ = _switchover(a, b.address, f"127.0.0.1:{a_port}")
        _retire(c, a_src)
        b_source, ra = _successors(
            c,
            source=b.dir,
            source_mnt=b.mountpoint,
            replica=a,
            port=a_port,
            replica_mnt=a_src.mountpoint,
        )
        with open(os.path.join(b.mountpoint, "on-b"), "wb") as f:
            f.write(os.urandom(300_000))
            os.fsync(f.fileno())
        wait_caught_up(b.dir)
        assert_blocks_identical(b.dir, a)
        out = run_cli("verify", b.dir).stdout
        assert "all targets identical" in out, out

        # B -> A, back where it started
        seq2, out = _switchover(b.dir, ra.address, b.address)
        assert seq2 > seq1 and f"epoch 3 from seq {seq2 + 1}" in out, out
        _retire(c, b_source)
        a_again, rb = _successors(
            c,
            source=a,
            source_mnt=a_src.mountpoint,
            replica=b.dir,
            port=b.port,
            replica_mnt=b.mountpoint,
        )
        with open(os.path.join(a_src.mountpoint, "on-a-again"), "wb") as f:
            f.write(os.urandom(200_000))
            os.fsync(f.fileno())
        wait_caught_up(a)
        assert_blocks_identical(a, b.dir)
        out = run_cli("verify", a).stdout
        assert "all targets identical" in out, out
        history = [[1, 1], [2, seq1 + 1], [3, seq2 + 1]]
        assert status(a)["epochs"] == history
        entry = target(status(a), rb.address)
        assert entry["resync"] is None and entry["initial_sync"] is None, entry
        with open(os.path.join(rb.mountpoint, "on-b"), "rb") as f:
            assert len(f.read()) == 300_000

        finish_and_compare(a_again, [rb])
        rb.stop()
        assert stopped_status(b.dir)["epochs"] == history
    finally:
        c.close()


@_mounts
def test_switchover_refused_keeps_the_source(tmp_path):
    c = Cluster(str(tmp_path))
    try:
        a = c.mkfs("a")
        b = c.replica("b", mount=False)  # a target without a mountpoint cannot serve writers
        d = c.replica("d", mount=False)
        a_src = c.mount_source(a, [b.address, d.address])
        with open(os.path.join(a_src.mountpoint, "f"), "wb") as f:
            f.write(os.urandom(100_000))
        wait_caught_up(a)
        d.stop()
        listen = f"127.0.0.1:{free_port()}"

        def refused(to: str, why: str) -> None:
            proc = run_cli("switchover", a, "--to", to, "--listen", listen, "--timeout", "5")
            assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
            assert why in proc.stderr, proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
            # A is still the source and takes writes.
            st = status(a)
            assert st["role"] == "source" and st["epochs"] == [[1, 1]] and not st["fenced"]
            path = os.path.join(a_src.mountpoint, f"after-{to.replace(':', '-')}")
            with open(path, "wb") as f:
                f.write(b"still the source\n")
                os.fsync(f.fileno())

        refused(d.address, "not streaming")  # the target is not connected
        refused(f"127.0.0.1:{free_port()}", "not mirroring to")
        # Drained and asked, but the target says no: the gate opens again.
        refused(b.address, "no mountpoint")
        assert b.status()["role"] == "target" and b.alive()
        assert run_cli("mirror", a, "--remove", d.address).returncode == 0
        finish_and_compare(a_src, [b])  # nothing of the refused attempts diverged A and B
    finally:
        c.close()
