"""A TCP proxy that injects network faults, for tests (this machine's kernel has no netem).

    client ──► FaultProxy(listen_port) ──► target (host, port)

Run it in a trio nursery (``port = await nursery.start(proxy.run)``) or in a background
thread from synchronous tests (``port = proxy.start()`` ... ``proxy.stop()``, or ``with
FaultProxy(...) as proxy``). Faults can be changed at any time, from any thread:

- ``delay``: seconds added to every chunk, in each direction (one-way latency; chunks are
  pipelined, so throughput is not divided by the delay)
- ``bandwidth``: bytes/s per direction, shared by all connections (None: unlimited)
- ``cut_at(offset, direction)``: close a connection once ``offset`` bytes of it went that way
  (exactly: the receiver gets ``offset`` bytes, then EOF); ``cut_after(n, direction)``: the
  same, ``n`` bytes from now counted over all connections; ``reset_every(n, direction)``:
  reset every connection (RST both ways, not FIN) once ``n`` bytes of it went that way (the
  receiver gets at most ``n`` bytes: a reset may discard what its socket had not sent yet)
- ``flip_at(offset, direction)`` / ``flip_after(n, direction)``: XOR one byte with ``mask``
- ``mode``: what happens to new connections: ACCEPT, REFUSE (accepted then reset at once) or
  BLACKHOLE (accepted, never forwarded, never answered)
- ``paused``: stop forwarding on every connection (a partition; data waits in the proxy)
- ``cut_all()``: close every current connection now

``bytes_up`` (client -> target) and ``bytes_down`` (target -> client) count the bytes
forwarded, in total; ``connections`` has per-connection counts.
"""

from __future__ import annotations

import enum
import logging
import socket
import struct
import threading
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

CHUNK = 16 * 1024
_QUEUE = 256  # chunks in flight per direction (bounds the proxy's memory: 4 MiB)
_POLL = 0.005  # how often a paused connection looks again


class Direction(enum.Enum):
    UP = "up"  # client -> target
    DOWN = "down"  # target -> client


class Mode(enum.Enum):
    """What the proxy does with a new connection."""

    ACCEPT = "accept"
    REFUSE = "refuse"
    BLACKHOLE = "blackhole"


@dataclass(slots=True)
class ConnStats:
    """One proxied connection."""

    id: int
    up: int = 0
    down: int = 0
    open: bool = True
    cut: bool = False  # closed by a fault, not by an endpoint
    reset: bool = False  # and reset (RST) rather than closed

    def count(self, direction: Direction) -> int:
        return self.up if direction is Direction.UP else self.down


@dataclass(slots=True)
class _Rule:
    kind: str  # "cut" or "flip"
    direction: Direction
    offset: int  # byte offset in the connection, or in the proxy's total when ``total``
    total: bool
    once: bool
    mask: int = 0xFF
    reset: bool = False  # a cut that resets the connection (RST) instead of closing it


class _Cut(Exception):
    """A cut rule fired: close the connection."""


class _Pacer:
    """A bandwidth cap shared by all connections in one direction."""

    def __init__(self) -> None:
        self.next_time = 0.0

    async def wait(self, nbytes: int, rate: float) -> None:
        now = trio.current_time()
        start = max(now, self.next_time)
        self.next_time = start + nbytes / rate
        await trio.sleep_until(start)


class FaultProxy:
    """See the module docstring."""

    def __init__(
        self,
        listen_port: int = 0,
        target: tuple[str, int] = ("127.0.0.1", 0),
        *,
        listen_host: str = "127.0.0.1",
    ):
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target = target
        self.port = 0  # bound port, once running
        self.delay = 0.0
        self.bandwidth: float | None = None
        self.mode = Mode.ACCEPT
        self.paused = False
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections: list[ConnStats] = []
        self.refused = 0
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()  # rules are changed from test threads
        self._scopes: dict[int, trio.CancelScope] = {}
        self._pacers = {Direction.UP: _Pacer(), Direction.DOWN: _Pacer()}
        self._token: trio.lowlevel.TrioToken | None = None
        self._loop_thread: int | None = None
        self._run_scope: trio.CancelScope | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._thread_error: BaseException | None = None

    # ------------------------------------------------------------------ faults

    def cut_at(self, offset: int, direction: Direction = Direction.UP, *, once: bool = True):
        """Close the first connection (every one, unless ``once``) at byte ``offset``."""
        self._add(_Rule("cut", direction, offset, False, once))

    def cut_after(self, nbytes: int, direction: Direction = Direction.UP) -> None:
        """Close whichever connection carries the proxy ``nbytes`` further that way."""
        self._add(_Rule("cut", direction, self._total(direction) + nbytes, True, True))

    def reset_every(self, nbytes: int, direction: Direction = Direction.UP) -> None:
        """Reset every connection (from now on) once ``nbytes`` of it went that way."""
        if nbytes < 1:
            raise ValueError("reset_every needs at least one byte per connection")
        self._add(_Rule("cut", direction, nbytes, False, False, reset=True))

    def flip_at(
        self,
        offset: int,
        direction: Direction = Direction.UP,
        *,
        once: bool = True,
        mask: int = 0xFF,
    ) -> None:
        """XOR byte ``offset`` of the first connection (every one, unless ``once``)."""
        self._add(_Rule("flip", direction, offset, False, once, mask))

    def flip_after(self, nbytes: int, direction: Direction = Direction.UP, mask: int = 0xFF):
        """XOR the byte ``nbytes`` from now (over all connections) that goes that way."""
        self._add(_Rule("flip", direction, self._total(direction) + nbytes, True, True, mask))

    def clear_faults(self) -> None:
        """Remove cut/flip rules, delay, bandwidth cap and pause; accept connections."""
        with self._lock:
            self._rules = []
        self.delay = 0.0
        self.bandwidth = None
        self.paused = False
        self.mode = Mode.ACCEPT

    def cut_all(self) -> None:
        """Close every current connection now."""
        self._call_in_loop(self._cut_all_now)

    @property
    def active(self) -> int:
        return sum(1 for c in self.connections if c.open)

    def _add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules = [*self._rules, rule]

    def _total(self, direction: Direction) -> int:
        return self.bytes_up if direction is Direction.UP else self.bytes_down

    def _cut_all_now(self) -> None:
        for scope in list(self._scopes.values()):
            scope.cancel()

    def _call_in_loop(self, fn) -> None:
        if self._token is None or self._loop_thread == threading.get_ident():
            fn()
        else:
            trio.from_thread.run_sync(fn, trio_token=self._token)

    # ------------------------------------------------------------------ trio service

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (or ``stop()``); ``task_status.started(port)``."""
        listeners = await trio.open_tcp_listeners(self.listen_port, host=self.listen_host)
        listener = listeners[0]
        for extra in listeners[1:]:
            await extra.aclose()
        self.port = listener.socket.getsockname()[1]
        self._token = trio.lowlevel.current_trio_token()
        self._loop_thread = threading.get_ident()
        self._run_scope = trio.CancelScope()
        with self._run_scope:
            async with listener, trio.open_nursery() as nursery:
                task_status.started(self.port)
                while True:
                    client = await listener.accept()
                    nursery.start_soon(self._serve, client)

    async def _serve(self, client: trio.SocketStream) -> None:
        mode = self.mode
        if mode is Mode.REFUSE:
            self.refused += 1
            _reset(client)
            await client.aclose()
            return
        stats = ConnStats(len(self.connections))
        self.connections.append(stats)
        scope = trio.CancelScope()
        self._scopes[stats.id] = scope
        server: trio.SocketStream | None = None
        try:
            with scope:
                if mode is Mode.BLACKHOLE:
                    await trio.sleep_forever()
                try:
                    server = await trio.open_tcp_stream(*self.target)
                except OSError as exc:
                    log.info("proxy: cannot reach %s: %s", self.target, exc)
                    _reset(client)
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, stats, Direction.UP, client, server, scope)
                    nursery.start_soon(self._pipe, stats, Direction.DOWN, server, client, scope)
        finally:
            stats.open = False
            if scope.cancelled_caught:
                stats.cut = True
            self._scopes.pop(stats.id, None)
            with trio.CancelScope(shield=True):
                for s in (client, server):
                    if s is not None:
                        if stats.reset:
                            _reset(s)
                        await s.aclose()

    async def _pipe(
        self,
        stats: ConnStats,
        direction: Direction,
        src: trio.SocketStream,
        dst: trio.SocketStream,
        conn_scope: trio.CancelScope,
    ) -> None:
        # A reader task stamps chunks as they arrive and a writer forwards each at its stamp
        # plus the delay, so delay is latency, not a throughput divisor.
        send, recv = trio.open_memory_channel[tuple[float, bytes] | None](_QUEUE)

        async def reader() -> None:
            async with send:
                while True:
                    try:
                        data = await src.receive_some(CHUNK)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        conn_scope.cancel()  # a reset on one side resets the whole connection
                        return
                    if not data:
                        await send.send(None)
                        return
                    await send.send((trio.current_time() + self.delay, data))

        async def writer() -> None:
            async with recv:
                async for item in recv:
                    try:
                        if item is None:
                            await dst.send_eof()  # half-close, as the sender did
                            return
                        deadline, data = item
                        await trio.sleep_until(deadline)
                        while self.paused:
                            await trio.sleep(_POLL)
                        await self._forward(stats, direction, data, dst)
                    except (_Cut, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        conn_scope.cancel()
                        return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(writer)

    async def _forward(
        self, stats: ConnStats, direction: Direction, data: bytes, dst: trio.SocketStream
    ) -> None:
        pos = 0
        while pos < len(data):
            n = len(data) - pos
            rate = self.bandwidth
            if rate:
                n = min(n, max(1024, int(rate / 50)))  # pace in slices of ~20 ms
            piece = bytearray(data[pos : pos + n])
            pos += n
            cut = self._apply_rules(stats, direction, piece)
            if rate and piece:
                await self._pacers[direction].wait(len(piece), rate)
            # Counted before sending, so that when the receiver has a byte the counters
            # include it (tests compute "n bytes from now" from them).
            if direction is Direction.UP:
                stats.up += len(piece)
                self.bytes_up += len(piece)
            else:
                stats.down += len(piece)
                self.bytes_down += len(piece)
            if piece:
                await dst.send_all(piece)
            if cut:
                log.info("proxy: cutting connection %d (%s)", stats.id, direction.value)
                raise _Cut()

    def _apply_rules(self, stats: ConnStats, direction: Direction, piece: bytearray) -> bool:
        """Flip bytes of ``piece`` in place, truncate it at a cut; True if it must cut."""
        conn_off = stats.count(direction)
        total_off = self._total(direction)
        cut = False
        with self._lock:
            keep = []
            for rule in self._rules:
                at = rule.offset - (total_off if rule.total else conn_off)
                if rule.total:
                    at = max(at, 0)  # another connection went past it: fire at once
                if rule.direction is not direction or at < 0:
                    keep.append(rule)
                    continue
                if rule.kind == "cut" and at <= len(piece):
                    # Also when the cut falls right after this piece: the sender may be
                    # waiting for an answer and send nothing more.
                    del piece[at:]
                    cut = True
                    stats.reset = stats.reset or rule.reset
                elif rule.kind == "flip" and at < len(piece):
                    piece[at] ^= rule.mask
                else:
                    keep.append(rule)
                    continue
                if not rule.once:
                    keep.append(rule)
            self._rules = keep
        return cut

    # ------------------------------------------------------------------ thread API

    def start(self, timeout: float = 10.0) -> int:
        """Run in a background thread (for synchronous tests); return the bound port."""
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        self._thread = threading.Thread(target=self._thread_main, name="FaultProxy", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError("proxy did not start")
        if self._thread_error is not None:
            raise RuntimeError(f"proxy failed to start: {self._thread_error}")
        return self.port

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and close every connection (either mode)."""
        if self._run_scope is not None:
            try:
                self._call_in_loop(self._run_scope.cancel)
            except trio.RunFinishedError:
                pass
        if self._thread is not None and self._thread.ident != threading.get_ident():
            self._thread.join(timeout)
            self._thread = None

    def _thread_main(self) -> None:
        async def main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.run)
                self._started.set()

        try:
            trio.run(main)
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._thread_error = exc
            log.exception("proxy thread failed")
        finally:
            self._started.set()

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _reset(stream: trio.SocketStream) -> None:
    """Make the coming close send RST instead of FIN (a refused or broken connection)."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
