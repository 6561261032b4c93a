"""The control socket (node.control) and the replica daemon (node.replica) without a mount."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import trio

from mirrorfs.fs.filesystem import ROOT_INO
from mirrorfs.node.control import (
    ControlError,
    ControlServer,
    control_request,
    serve_control,
    socket_path,
)
from mirrorfs.node.replica import (
    ReplicaConfig,
    ReplicaError,
    run_replica,
)
from mirrorfs.repl.address import parse_listen
from mirrorfs.repl.auth import ListenPolicyError
from mirrorfs.repl.receiver import ReceiverState
from mirrorfs.repl.stream import HandshakeRefused
from mirrorfs.repl.wire import RefuseReason
from mirrorfs.store.files import CONTROL_SOCKET, REPLICA_PID_FILE
from mirrorfs.store.volume import Volume
from tests.test_receiver import Source, block_file, source_blocks
from tests.util import _env, is_mounted, lazy_unmount, needs_fuse


async def request(path: str, cmd: dict, timeout: float = 5.0) -> dict:
    """The blocking client, from a worker thread (the server runs in this trio loop)."""
    return await trio.to_thread.run_sync(control_request, path, cmd, timeout)


# ------------------------------------------------------------------------- control socket


async def test_control_round_trip(tmp_path):
    path = str(tmp_path / CONTROL_SOCKET)

    async def status(req: dict) -> dict:
        return {"status": {"state": "waiting", "echo": req.get("x")}}

    async def boom(req: dict) -> dict:
        raise ControlError("cannot do that\nright now")

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, {"status": status, "boom": boom})
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        reply = await request(path, {"cmd": "status", "x": 7})
        assert reply == {"ok": True, "status": {"state": "waiting", "echo": 7}}
        reply = await request(path, {"cmd": "boom"})
        assert reply == {"ok": False, "error": "cannot do that right now"}
        reply = await request(path, {"cmd": "nope"})
        assert not reply["ok"] and "unknown command 'nope'" in reply["error"]
        reply = await request(path, {"no": "cmd"})
        assert not reply["ok"] and "bad request" in reply["error"]

        # Several requests on one connection, answered in order.
        def two() -> bytes:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                s.sendall(b'{"cmd": "status"}\nnot json\n')
                buf = b""
                while buf.count(b"\n") < 2:
                    buf += s.recv(4096)
                return buf

        lines = (await trio.to_thread.run_sync(two)).splitlines()
        assert b'"ok":true' in lines[0] and b"bad request" in lines[1]
        nursery.cancel_scope.cancel()
    assert not os.path.exists(path)  # removed on the way out


def test_no_daemon_is_one_line_error(tmp_path):
    with pytest.raises(ControlError) as ei:
        control_request(socket_path(str(tmp_path)), {"cmd": "status"}, 1.0)
    assert str(ei.value) == f"no daemon is running for {tmp_path}"
    # A stale socket file (nobody listening) says the same.
    s = socket.socket(socket.AF_UNIX)
    s.bind(socket_path(str(tmp_path)))
    s.close()
    with pytest.raises(ControlError, match="no daemon is running"):
        control_request(socket_path(str(tmp_path)), {"cmd": "status"}, 1.0)


async def test_stale_socket_is_replaced_and_live_one_refused(tmp_path):
    path = str(tmp_path / CONTROL_SOCKET)
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # stale: the file stays, nobody listens

    async def ping(req: dict) -> dict:
        return {}

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, {"ping": ping})
        assert (await request(path, {"cmd": "ping"}))["ok"]
        with pytest.raises(ControlError, match="already running"):
            ControlServer(path, {}).bind()
        nursery.cancel_scope.cancel()


async def test_rebind_after_the_socket_file_was_removed(tmp_path):
    path = str(tmp_path / CONTROL_SOCKET)

    async def ping(req: dict) -> dict:
        return {"n": 1}

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_control, path, {"ping": ping})
        os.unlink(path)
        server.rebind_if_gone()
        assert (await request(path, {"cmd": "ping"}))["n"] == 1
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------ daemon


def test_parse_listen():
    assert parse_listen("127.0.0.1:7000") == ("127.0.0.1", 7000)
    assert parse_listen(":7000") == ("", 7000)
    assert parse_listen("[::1]:7000") == ("::1", 7000)
    for bad in ("7000", "host:", "host:x", "::1:7000", "h:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


@pytest.fixture
def source(tmp_path):
    src = Source(str(tmp_path / "src"))
    src.change(3)
    yield src
    src.close()


async def test_daemon_initial_sync_streaming_status_and_shutdown(tmp_path, source):
    rdir = str(tmp_path / "replica")  # missing: becomes a replica through the initial sync
    cfg = ReplicaConfig(rdir, host="127.0.0.1", port=0)
    sock = socket_path(rdir)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            node = await nursery.start(run_replica, cfg)
            assert node.port > 0
            st = (await request(sock, {"cmd": "status"}))["status"]
            assert st["state"] == "waiting" and st["role"] == "target" and not st["consistent"]

            fs, peer = await source.connect(await trio.open_tcp_stream("127.0.0.1", node.port))
            assert peer.empty
            start = await source.initial_sync(fs)
            await source.ack(fs, start)
            # The initial sync wiped DIR: the node-local files are back.
            assert os.path.exists(os.path.join(rdir, REPLICA_PID_FILE))
            source.change(2)
            last = await source.ship(fs, start + 1)
            await source.ack(fs, last)
            assert block_file(rdir) == source_blocks(source)

            st = (await request(sock, {"cmd": "status"}))["status"]
            assert st["state"] == "streaming" and st["consistent"]
            assert st["applied_seq"] == st["received_seq"] == last
            assert st["source_node_id"] == "src" and st["source_address"].startswith("127.0.0.1:")
            assert st["volume_uuid"] == source.vol.uuid.hex() and not st["mounted"]

            # A second source is refused while this one is active.
            other = Source(str(tmp_path / "other"), node_id="intruder")
            try:
                with pytest.raises(HandshakeRefused) as ei:
                    await other.connect(await trio.open_tcp_stream("127.0.0.1", node.port))
                assert ei.value.reason is RefuseReason.BUSY
            finally:
                other.close()
            await fs.aclose()
            nursery.cancel_scope.cancel()
    assert not os.path.exists(sock) and not os.path.exists(os.path.join(rdir, REPLICA_PID_FILE))
    vol = Volume.open(rdir)  # closed and unlocked
    try:
        assert vol.last_seq == last and vol.consistent
    finally:
        vol.close()

    # A restarted daemon resumes from what it has, and refuses another volume.
    async with trio.open_nursery() as nursery:
        node = await nursery.start(run_replica, cfg)
        fs, peer = await source.connect(await trio.open_tcp_stream("127.0.0.1", node.port))
        assert not peer.empty and peer.received_seq == last
        source.change(1)
        await source.ack(fs, await source.ship(fs, last + 1))
        await fs.aclose()
        while node.receiver.state is not ReceiverState.DISCONNECTED:  # it saw the close
            await trio.sleep(0.01)
        other = Source(str(tmp_path / "other2"))
        try:
            with pytest.raises(HandshakeRefused) as ei:
                await other.connect(await trio.open_tcp_stream("127.0.0.1", node.port))
            assert ei.value.reason is RefuseReason.WRONG_VOLUME
        finally:
            other.close()
        nursery.cancel_scope.cancel()
    assert block_file(rdir) == source_blocks(source)


async def test_daemon_refuses_what_it_must(tmp_path):
    with pytest.raises(ListenPolicyError):
        await run_replica(ReplicaConfig(str(tmp_path / "r1"), host="0.0.0.0"))

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("mine")
    with pytest.raises(ReplicaError, match="holds no mirrorfs volume"):
        await run_replica(ReplicaConfig(str(foreign)))
    assert (foreign / "precious.txt").exists()


async def test_daemon_refuses_a_source_volume(tmp_path):
    path = str(tmp_path / "vol")
    Volume.create(path, 1 << 20)
    with pytest.raises(ReplicaError, match="holds the source"):
        await run_replica(ReplicaConfig(path))


async def test_second_daemon_on_the_same_dir_is_refused(tmp_path):
    rdir = str(tmp_path / "replica")
    async with trio.open_nursery() as nursery:
        await nursery.start(run_replica, ReplicaConfig(rdir))
        with pytest.raises(ControlError, match="already running"):
            await run_replica(ReplicaConfig(rdir))
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------- the read-only mount

_CHILD = """
import logging, sys
from mirrorfs.node.replica import ReplicaConfig, main_replica
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
sys.exit(main_replica(ReplicaConfig(sys.argv[1], host="127.0.0.1", port=int(sys.argv[2]),
                                    mountpoint=sys.argv[3])))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _eventually(check, what: str, timeout: float = 10.0) -> None:
    """Poll ``check()`` (blocking I/O through the mount, in a thread) until it is true."""
    with trio.fail_after(timeout):
        while not await trio.to_thread.run_sync(check):
            await trio.sleep(0.02)


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-3000:]


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


@needs_fuse
@pytest.mark.mount
async def test_daemon_mount_sees_changes_within_the_lag(tmp_path, source):
    rdir, mnt = str(tmp_path / "replica"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    port = _free_port()
    stderr_path = str(tmp_path / "replica.stderr")
    with open(stderr_path, "wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, rdir, str(port), mnt],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            env=_env(),
        )
    fs = None
    try:
        with trio.fail_after(20):
            while not os.path.exists(socket_path(rdir)):
                assert child.poll() is None, _tail(stderr_path)
                await trio.sleep(0.02)
        # The control socket is bound before the TCP listener: retry until it listens.
        with trio.fail_after(20):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    break
                except OSError:
                    assert child.poll() is None, _tail(stderr_path)
                    await trio.sleep(0.05)
        fs, _ = await source.connect(stream)
        start = await source.initial_sync(fs)
        await source.ack(fs, start)
        await _eventually(lambda: is_mounted(mnt), "the mount")
        src = source.fs

        def content(name: bytes) -> bytes:
            ino = src.lookup(ROOT_INO, name).ino
            return src.read(ino, 0, 1 << 20)

        assert sorted(os.listdir(mnt)) == ["f1", "f2", "f3"]
        assert _read(os.path.join(mnt, "f1")) == content(b"f1")
        held = open(os.path.join(mnt, "f1"), "rb")  # noqa: SIM115 - open across changes
        try:
            held.read()
            # Change, add, rename, delete on the source; ship; the mount follows.
            ino = src.lookup(ROOT_INO, b"f1").ino
            src.write(ino, 0, b"NEW" * 3000)
            source.change(1)  # f4
            src.rename(ROOT_INO, b"f2", ROOT_INO, b"g2", 0)
            src.unlink(ROOT_INO, b"f3")
            source.vol.commit()
            last = await source.ship(fs, start + 1)
            await source.ack(fs, last)
            want = content(b"f1")
            await _eventually(lambda: _read(os.path.join(mnt, "f1")) == want, "f1 changed")
            await _eventually(
                lambda: sorted(os.listdir(mnt)) == ["f1", "f4", "g2"], "the directory"
            )
            # Kernel caches are dropped right after the apply, by a worker thread: soon.
            await _eventually(lambda: not os.path.exists(os.path.join(mnt, "f3")), "f3 gone")
            await _eventually(lambda: not os.path.exists(os.path.join(mnt, "f2")), "f2 gone")
            assert _read(os.path.join(mnt, "g2")) == content(b"g2")
            assert _read(os.path.join(mnt, "f4")) == content(b"f4")
            assert os.stat(os.path.join(mnt, "f1")).st_size == len(want)
            # An fd held open across the change reads the new bytes (page cache dropped).
            held.seek(0)
            assert held.read(9) == b"NEWNEWNEW"
        finally:
            held.close()
        with pytest.raises(OSError):
            open(os.path.join(mnt, "x"), "wb").close()
        st = await request(socket_path(rdir), {"cmd": "status"})
        assert st["status"]["mounted"] and st["status"]["applied_seq"] == last
    finally:
        if fs is not None:
            await fs.aclose()
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        lazy_unmount(mnt)
    assert child.returncode == 0, _tail(stderr_path)
    assert not is_mounted(mnt) and not os.path.exists(socket_path(rdir))


# ------------------------------------------------------------------------- command line

_CLI_CHILD = """
import argparse, sys
from mirrorfs.cli import add_replica_arguments
p = argparse.ArgumentParser(prog="mirrorfs replica")
add_replica_arguments(p)
a = p.parse_args(sys.argv[1:])
sys.exit(a.func(a))
"""


def _cli_has_replica() -> bool:
    from mirrorfs import cli

    try:
        cli.build_parser().parse_args(["replica", "d", "--listen", "127.0.0.1:1"])
    except SystemExit:
        return False
    return True


def _stop(pid_file: str) -> None:
    with open(pid_file) as f:
        pid = int(f.read())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while os.path.exists(pid_file):
        assert time.monotonic() < deadline, "the replica did not stop"
        time.sleep(0.02)


def test_foreground_arguments_and_sigterm(tmp_path):
    rdir = str(tmp_path / "replica")
    port = _free_port()
    child = subprocess.Popen(
        [sys.executable, "-c", _CLI_CHILD, rdir, "--listen", f"127.0.0.1:{port}", "--foreground"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                reply = control_request(socket_path(rdir), {"cmd": "status"}, 2.0)
                break
            except ControlError:
                assert child.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
        assert reply["status"]["listen"] == f"127.0.0.1:{port}"
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    assert not os.path.exists(socket_path(rdir))

    # A user error becomes a CliError (mirrorfs.cli.main prints it as one line).
    proc = subprocess.run(
        [sys.executable, "-c", _CLI_CHILD, rdir, "--listen", "0.0.0.0:1", "--foreground"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
    )
    assert proc.returncode != 0 and "CliError: refusing to listen on 0.0.0.0" in proc.stderr


@pytest.mark.skipif(not _cli_has_replica(), reason="mirrorfs.cli has no replica command yet")
def test_cli_replica_detaches_once_listening(tmp_path):
    from tests.util import run_cli

    rdir = str(tmp_path / "replica")
    port = _free_port()
    proc = run_cli("replica", rdir, "--listen", f"127.0.0.1:{port}", timeout=60)
    assert proc.returncode == 0, proc.stderr
    try:
        reply = control_request(socket_path(rdir), {"cmd": "status"}, 5.0)
        assert reply["ok"] and reply["status"]["state"] == "waiting"
        again = run_cli("replica", rdir, "--listen", f"127.0.0.1:{_free_port()}")
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        _stop(os.path.join(rdir, REPLICA_PID_FILE))
    bad = run_cli("replica", rdir, "--listen", "0.0.0.0:1")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1


async def test_deep_directory_socket_path(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = str(deep / CONTROL_SOCKET)
    assert len(path) > 108

    async def ping(req: dict) -> dict:
        return {"pong": True}

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, {"ping": ping})
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert (await request(path, {"cmd": "ping"}))["pong"]
        with pytest.raises(ControlError, match="already running"):
            ControlServer(path, {}).bind()
        nursery.cancel_scope.cancel()
    assert not os.path.exists(path)
    with pytest.raises(ControlError, match="no daemon is running"):
        control_request(path, {"cmd": "ping"}, 1.0)
