"""The control socket of a node: ``DIR/control.sock``, one JSON object per line each way.

    client -> daemon   {"cmd": "status", ...}
    daemon -> client   {"ok": true, ...what the handler returned}   e.g. {"ok": true, "status": {}}
                       {"ok": false, "error": "one line"}

A connection may carry several requests, answered in order. A *stream* command (``events``)
answers with one line per item until the client closes the connection; it is the last
request of its connection. The socket is mode 0600: only
its owner (and root) may talk to the daemon. ``serve_control`` is the daemon's side (a trio
task), ``control_request`` the command line's (blocking, no trio).

A daemon that finds a socket file at its path asks it first: if someone answers, another
daemon serves this directory and starting is refused; if nobody does, the file is stale and
is removed. On the way out the daemon removes the socket file if it is still its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import trio

from mirrorfs.store.files import CONTROL_SOCKET

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # a request or a reply longer than this is refused
_BACKLOG = 16
_SUN_PATH_MAX = 108  # bytes of sockaddr_un.sun_path, terminating NUL included

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
#: A stream command: the items it yields go out as ``{"ok": true, "event": item}`` lines.
StreamHandler = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]


class ControlError(Exception):
    """No daemon answers, the socket cannot be bound, or a request failed (one line)."""


def socket_path(volume_dir: str) -> str:
    return os.path.join(os.path.abspath(volume_dir), CONTROL_SOCKET)


@contextlib.contextmanager
def _addressable(path: str) -> Iterator[str]:
    """``path``, or an equivalent short one when it exceeds sun_path (108 bytes).

    A deep DIR (pytest's tmp_path, say) makes DIR/control.sock too long to bind or connect;
    /proc/self/fd/N/control.sock names the same file through an open handle on DIR.
    """
    if len(os.fsencode(path)) < _SUN_PATH_MAX:
        yield path
        return
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


def _connect(s: socket.socket, path: str) -> None:
    with _addressable(path) as short:
        s.connect(short)


def _socket_owner_alive(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket at ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        _connect(s, path)
    except OSError:
        return False
    finally:
        s.close()
    return True


class ControlServer:
    """Serves ``handlers`` (command name -> async callable) on the socket at ``path``."""

    def __init__(
        self,
        path: str,
        handlers: dict[str, Handler],
        streams: dict[str, StreamHandler] | None = None,
    ) -> None:
        self.path = os.path.abspath(path)
        self.handlers = handlers
        self.streams = streams if streams is not None else {}
        self._listener: trio.SocketListener | None = None
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file

    def bind(self) -> None:
        """Bind the socket file (synchronous, so a caller can do it between awaits).

        ControlError if another daemon answers at ``path`` or the socket cannot be made.
        """
        where = os.path.dirname(self.path)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ControlError(f"{self.path} exists and is not a socket")
            if _socket_owner_alive(self.path):
                raise ControlError(f"a daemon is already running for {where}")
            log.info("removing stale control socket %s", self.path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _addressable(self.path) as short:
                raw.bind(short)
            os.chmod(self.path, 0o600)
            raw.listen(_BACKLOG)
        except OSError as exc:
            raw.close()
            raise ControlError(f"cannot bind control socket {self.path}: {exc.strerror or exc}")
        st = os.stat(self.path)
        self._ident = (st.st_dev, st.st_ino)
        old, self._listener = (
            self._listener,
            trio.SocketListener(trio.socket.from_stdlib_socket(raw)),
        )
        if old is not None:
            # Wakes the accept loop, which then picks up the new listener.
            old.socket.close()

    def owns_path(self) -> bool:
        """Whether the socket file at ``path`` is still the one we bound."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return self._ident == (st.st_dev, st.st_ino)

    def rebind_if_gone(self) -> None:
        """Bind again if our socket file was removed (the directory was wiped)."""
        if self._listener is not None and not self.owns_path():
            log.info("control socket %s was removed: binding it again", self.path)
            self._ident = None
            self.bind()

    async def serve(
        self, *, task_status: trio.TaskStatus[ControlServer] = trio.TASK_STATUS_IGNORED
    ):
        """Bind (unless done already) and answer requests until cancelled."""
        if self._listener is None:
            self.bind()
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                while True:
                    listener = self._listener
                    assert listener is not None
                    try:
                        stream = await listener.accept()
                    except (trio.ClosedResourceError, OSError):
                        if self._listener is not listener:
                            continue  # rebound: serve the new socket
                        raise
                    nursery.start_soon(self._client, stream)
        finally:
            self.close()

    def close(self) -> None:
        """Close the socket and remove its file if it is still ours."""
        if self.owns_path():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        if self._listener is not None:
            self._listener.socket.close()
            self._listener = None

    async def _client(self, stream: trio.SocketStream) -> None:
        buf = bytearray()
        try:
            while True:
                while (nl := buf.find(b"\n")) < 0:
                    if len(buf) > MAX_LINE:
                        await stream.send_all(_encode({"ok": False, "error": "request too long"}))
                        return
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                line, buf = bytes(buf[:nl]), buf[nl + 1 :]
                if await self._stream(stream, line):
                    return
                reply = await self._dispatch(line)
                await stream.send_all(_encode(reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _stream(self, stream: trio.SocketStream, line: bytes) -> bool:
        """Serve ``line`` if it asks for a stream command; False if it does not."""
        try:
            request = json.loads(line)
        except ValueError:
            return False
        if not isinstance(request, dict) or request.get("cmd") not in self.streams:
            return False
        items = self.streams[request["cmd"]](request)
        try:
            async for item in items:
                await stream.send_all(_encode({"ok": True, "event": item}))
        finally:
            with trio.CancelScope(shield=True):
                await items.aclose()  # type: ignore[attr-defined]
        return True

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'bad request: expected {"cmd": "..."}'}
        cmd = request["cmd"]
        handler = self.handlers.get(cmd)
        if handler is None:
            known = ", ".join(sorted({*self.handlers, *self.streams}))
            return {"ok": False, "error": f"unknown command {cmd!r} (known: {known})"}
        try:
            result = await handler(request)
        except ControlError as exc:
            return {"ok": False, "error": _one_line(str(exc))}
        except Exception as exc:
            log.exception("control command %r failed", cmd)
            return {"ok": False, "error": _one_line(f"{cmd} failed: {exc!r}")}
        return {"ok": True, **result}


async def serve_control(
    path: str,
    handlers: dict[str, Handler],
    streams: dict[str, StreamHandler] | None = None,
    *,
    task_status: trio.TaskStatus[ControlServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the control socket at ``path`` until cancelled (``started`` with the server).

    Raises ControlError before ``started`` if another daemon answers there.
    """
    await ControlServer(path, handlers, streams).serve(task_status=task_status)


def control_request(path: str, cmd: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the daemon at socket ``path`` and return its reply (blocking).

    The reply is returned as is, ``{"ok": false, ...}`` included; ControlError (one line)
    when no daemon answers or the answer is not a reply.
    """
    where = os.path.dirname(os.path.abspath(path))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            _connect(s, path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no daemon is running for {where}") from None
        except OSError as exc:
            raise ControlError(f"cannot reach the daemon for {where}: {exc.strerror or exc}")
        try:
            s.sendall(_encode(cmd))
            buf = bytearray()
            while b"\n" not in buf:
                data = s.recv(65536)
                if not data:
                    raise ControlError(f"the daemon for {where} closed the connection")
                buf += data
                if len(buf) > MAX_LINE:
                    raise ControlError(f"the daemon for {where} sent an oversized reply")
        except TimeoutError:
            raise ControlError(f"the daemon for {where} did not answer within {timeout:g} s")
        except OSError as exc:
            raise ControlError(f"lost the daemon for {where}: {exc.strerror or exc}")
    finally:
        s.close()
    try:
        reply = json.loads(buf[: buf.index(b"\n")])
    except ValueError:
        raise ControlError(f"the daemon for {where} sent a malformed reply")
    if not isinstance(reply, dict):
        raise ControlError(f"the daemon for {where} sent a malformed reply")
    return reply


def control_stream(path: str, cmd: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Send a stream command to the daemon at ``path`` and yield its replies (blocking)
    until the daemon closes the connection. ControlError when no daemon answers."""
    where = os.path.dirname(os.path.abspath(path))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            _connect(s, path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no daemon is running for {where}") from None
        except OSError as exc:
            raise ControlError(f"cannot reach the daemon for {where}: {exc.strerror or exc}")
        s.sendall(_encode(cmd))
        buf = bytearray()
        while True:
            while (nl := buf.find(b"\n")) >= 0:
                line, buf = bytes(buf[:nl]), buf[nl + 1 :]
                try:
                    reply = json.loads(line)
                except ValueError:
                    raise ControlError(f"the daemon for {where} sent a malformed reply") from None
                yield reply
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                return
            if not data:
                return
            buf += data
            if len(buf) > MAX_LINE:
                raise ControlError(f"the daemon for {where} sent an oversized reply")
    finally:
        s.close()


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _one_line(text: str) -> str:
    return " ".join(text.split())
