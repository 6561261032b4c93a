"""The test fault proxy (tests/netproxy.py), with real sockets on 127.0.0.1."""

from __future__ import annotations

import functools
import os
import socket
import socketserver
import threading
import time

import pytest
import trio

from mirrorfs.repl import wire
from mirrorfs.repl.stream import ConnectionClosed, FramedStream
from mirrorfs.repl.wire import ProtocolError
from tests.netproxy import Direction, FaultProxy, Mode


class EchoServer:
    """Echoes every byte; records what each connection received, once it ends."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.connections = 0
        self.done = trio.Event()

    async def handler(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        got = bytearray()
        try:
            while data := await stream.receive_some(65536):
                got += data
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.received.append(bytes(got))
            self.done.set()
            await stream.aclose()

    async def ended(self) -> bytes:
        with trio.fail_after(5):
            await self.done.wait()
        self.done = trio.Event()
        return self.received[-1]


@pytest.fixture
async def setup(nursery):
    echo = EchoServer()
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, host="127.0.0.1"), echo.handler, 0
    )
    port = listeners[0].socket.getsockname()[1]
    proxy = FaultProxy(0, ("127.0.0.1", port))
    proxy_port = await nursery.start(proxy.run)
    return echo, proxy, proxy_port


async def exchange(port: int, data: bytes, *, expect: int | None = None) -> tuple[bytes, bool]:
    """Send ``data`` while reading the echo; return (what came back, whether it was cut)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    got = bytearray()
    cut = False
    expect = len(data) if expect is None else expect

    async def sender():
        try:
            for i in range(0, len(data), 8192):
                await stream.send_all(data[i : i + 8192])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            try:
                while len(got) < expect:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        cut = True
                        break
                    got += chunk
            except trio.BrokenResourceError:
                cut = True
    await stream.aclose()
    return bytes(got), cut


async def assert_closed(stream: trio.SocketStream) -> None:
    """The proxy closed the connection: EOF, or a reset if it left data unread."""
    with trio.fail_after(5):
        try:
            assert await stream.receive_some(100) == b""
        except trio.BrokenResourceError:
            pass


async def test_forwarding_and_counters(setup):
    echo, proxy, port = setup
    data = os.urandom(1 << 20)
    got, cut = await exchange(port, data)
    assert got == data and not cut
    assert await echo.ended() == data
    assert proxy.bytes_up == proxy.bytes_down == len(data)
    (conn,) = proxy.connections
    assert (conn.up, conn.down, conn.cut) == (len(data), len(data), False)
    with trio.fail_after(5):
        while proxy.active:
            await trio.sleep(0.01)


@pytest.mark.parametrize("offset", [0, 5000, 8192])
async def test_cut_up_at_byte(setup, offset):
    echo, proxy, port = setup
    proxy.cut_at(offset, Direction.UP)
    data = os.urandom(100_000)
    got, cut = await exchange(port, data)
    assert cut
    assert await echo.ended() == data[:offset]  # exactly offset bytes reached the server
    assert got == data[: len(got)] and len(got) <= offset
    assert proxy.connections[0].cut and proxy.bytes_up == offset
    # once=True: the next connection is not cut.
    got, cut = await exchange(port, data[:1000])
    assert got == data[:1000] and not cut


async def test_cut_down_at_byte(setup):
    echo, proxy, port = setup
    proxy.cut_at(3000, Direction.DOWN)
    data = os.urandom(10_000)
    got, cut = await exchange(port, data)
    assert cut and got == data[:3000]


async def test_cut_after_counts_from_now(setup):
    echo, proxy, port = setup
    await exchange(port, b"x" * 1000)
    proxy.cut_after(500, Direction.UP)
    data = os.urandom(4000)
    await exchange(port, data)
    await echo.ended()
    assert echo.received[-1] == data[:500]


async def test_flip_byte(setup):
    echo, proxy, port = setup
    proxy.flip_at(100, Direction.UP)
    proxy.flip_at(7, Direction.DOWN, mask=0x01)
    data = os.urandom(1000)
    got, cut = await exchange(port, data)
    assert not cut
    diff = [i for i in range(len(data)) if got[i] != data[i]]
    assert diff == [7, 100]
    assert got[100] == data[100] ^ 0xFF and got[7] == data[7] ^ 0x01
    got, _ = await exchange(port, data)
    assert got == data  # once


async def test_bandwidth_cap(setup):
    echo, proxy, port = setup
    proxy.bandwidth = 400_000
    data = os.urandom(200_000)
    start = trio.current_time()
    got, _ = await exchange(port, data)
    elapsed = trio.current_time() - start
    assert got == data
    # 200 kB each way at 400 kB/s, pipelined: about 0.5 s.
    assert 0.35 < elapsed < 1.5, elapsed


async def test_delay(setup):
    echo, proxy, port = setup
    proxy.delay = 0.1
    start = trio.current_time()
    got, _ = await exchange(port, b"ping")
    elapsed = trio.current_time() - start
    assert got == b"ping" and 0.2 <= elapsed < 1.0, elapsed
    # Latency, not a throughput divisor: many chunks still take about one round trip.
    start = trio.current_time()
    data = os.urandom(500_000)
    got, _ = await exchange(port, data)
    assert got == data and trio.current_time() - start < 1.5


async def test_refuse_and_blackhole(setup):
    echo, proxy, port = setup
    proxy.mode = Mode.REFUSE
    got, cut = await exchange(port, b"hello")
    assert cut and got == b"" and proxy.refused == 1 and echo.connections == 0

    proxy.mode = Mode.BLACKHOLE
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"hello")
    with trio.move_on_after(0.3) as scope:
        await stream.receive_some(100)
    assert scope.cancelled_caught and echo.connections == 0
    proxy.cut_all()
    await assert_closed(stream)  # a reset here: the proxy never read "hello"
    await stream.aclose()

    proxy.mode = Mode.ACCEPT
    got, cut = await exchange(port, b"hello")
    assert got == b"hello" and not cut


async def test_pause_and_cut_all(setup):
    echo, proxy, port = setup
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    proxy.paused = True
    await stream.send_all(b"held")
    with trio.move_on_after(0.2) as scope:
        await stream.receive_some(100)
    assert scope.cancelled_caught
    proxy.paused = False
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b"held"
    proxy.cut_all()
    await assert_closed(stream)
    await stream.aclose()
    assert proxy.connections[0].cut


async def test_framed_stream_through_faults(setup):
    """What the replication code will see: a flipped byte is a ProtocolError, a cut an EOF."""
    echo, proxy, port = setup
    msg = wire.Txn(7, os.urandom(50_000))
    size = len(msg.encode())

    proxy.flip_at(size + 30_000, Direction.UP)  # inside the second frame
    fs = FramedStream(await trio.open_tcp_stream("127.0.0.1", port))
    with trio.fail_after(5):
        await fs.send(msg)
        await fs.send(msg)
        assert await fs.receive() == msg
        with pytest.raises(ProtocolError, match="CRC mismatch"):
            await fs.receive()
    await fs.aclose()

    proxy.cut_at(size + 100, Direction.UP)
    fs = FramedStream(await trio.open_tcp_stream("127.0.0.1", port))
    with trio.fail_after(5):
        await fs.send(msg)
        try:
            await fs.send(msg)
        except ConnectionClosed:
            pass
        # The cut kills both directions, possibly with the first echo still in flight.
        with pytest.raises(ConnectionClosed):
            while True:
                assert await fs.receive() == msg
    await fs.aclose()
    assert await echo.ended() == (msg.encode() * 2)[: size + 100]


# ---------------------------------------------------------------------------- thread API


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def test_thread_api():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with FaultProxy(0, server.server_address) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                sock.sendall(b"a" * 1000)
                assert recv_exactly(sock, 1000) == b"a" * 1000
                proxy.flip_after(10, Direction.DOWN, mask=0x20)
                sock.sendall(b"b" * 100)
                got = recv_exactly(sock, 100)
                assert got == b"b" * 10 + b"B" + b"b" * 89
                proxy.cut_all()  # from this (non-trio) thread
                assert sock.recv(100) == b""
            deadline = time.monotonic() + 5
            while proxy.active and time.monotonic() < deadline:
                time.sleep(0.01)
            assert (proxy.bytes_up, proxy.bytes_down, proxy.active) == (1100, 1100, 0)
            # The proxy keeps serving new connections after cut_all.
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                sock.sendall(b"again")
                assert recv_exactly(sock, 5) == b"again"
        # Stopped: the port no longer answers.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1)
    finally:
        server.shutdown()
        server.server_close()


async def test_reset_every_connection_after_n_bytes(setup):
    """``reset_every``: each connection gets at most N bytes through, then a reset (RST) on
    both sides; every new connection again (the rule is not used up)."""
    echo, proxy, port = setup
    proxy.reset_every(20_000, Direction.UP)
    data = os.urandom(100_000)
    for i in range(3):
        got, cut = await exchange(port, data)
        assert cut, f"connection {i} was not cut"
        received = await echo.ended()
        assert 0 < len(received) <= 20_000 and received == data[: len(received)]
        assert got == data[: len(got)] and len(got) <= 20_000
        conn = proxy.connections[i]
        assert conn.cut and conn.reset and conn.up == 20_000
    # A reset, not a FIN: once the echoed bytes are read, the client's read fails (ECONNRESET)
    # instead of returning EOF.
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data[:30_000])
    with trio.fail_after(5):
        with pytest.raises(trio.BrokenResourceError):
            while await stream.receive_some(65536):
                pass
    await stream.aclose()
    proxy.clear_faults()
    got, cut = await exchange(port, data)
    assert got == data and not cut


async def test_flip_once_over_every_connection(setup):
    """``flip_after(n)`` flips exactly one byte, once, whichever connection carries it."""
    echo, proxy, port = setup
    proxy.flip_after(1500, Direction.UP)
    data = os.urandom(1000)
    got1, _ = await exchange(port, data)  # bytes 0..999: untouched
    got2, _ = await exchange(port, data)  # bytes 1000..1999: byte 500 of this one flipped
    got3, _ = await exchange(port, data)
    assert got1 == data and got3 == data
    assert [i for i in range(len(data)) if got2[i] != data[i]] == [500]
