"""pyfuse3's request loop without an epoll round trip for a request that is already queued.

pyfuse3 waits for every request with ``trio.lowlevel.wait_readable(fd)``: the fd is
registered with epoll, the task parks, the scheduler's ``epoll_wait`` reports it and the
registration is dropped again. That is three system calls and a scheduler pass per
request, also when the next request is already waiting (a streaming writer, parallel
clients), and a large part of what a small request costs this process.

pyfuse3 looks its ``trio`` module up at each call (its asyncio mode swaps it the same way:
``pyfuse3.asyncio.enable``), so ``installed()`` puts a proxy there whose
``lowlevel.wait_readable`` first asks the fd with ``poll(0)`` and returns at once when a
request is queued; otherwise it waits as before. Everything else is trio's own.

Why it stays correct: only the holder of pyfuse3's read lock waits on the fd, and it reads
the request right after the wait returns, with no await in between, as before (a request
withdrawn in that instant is the same race pyfuse3 always had). Fairness stays: pyfuse3
takes that ``trio.Lock`` before each wait, and its ``acquire`` is a schedule point, so a
task that finds requests queued still lets the others run once per request.
"""

from __future__ import annotations

import contextlib
import logging
import select
import sys
from collections.abc import Iterator
from typing import Any

import pyfuse3
import trio

log = logging.getLogger(__name__)


class _Lowlevel:
    """``trio.lowlevel`` with a ``wait_readable`` that does not wait for a ready fd."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._polls: dict[int, select.poll] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def wait_readable(self, fd: Any) -> None:
        fileno = fd if isinstance(fd, int) else fd.fileno()
        poller = self._polls.get(fileno)
        if poller is None:
            poller = self._polls[fileno] = select.poll()
            poller.register(fileno, select.POLLIN)
        try:
            ready = poller.poll(0)
        except OSError:
            ready = []
        if ready and ready[0][1] & select.POLLIN:
            return
        await self._real.wait_readable(fd)


class _Trio:
    """The ``trio`` module as pyfuse3 sees it: trio, with ``lowlevel`` replaced."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.lowlevel = _Lowlevel(real.lowlevel)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextlib.contextmanager
def installed() -> Iterator[bool]:
    """pyfuse3 uses the fast wait inside the block; yields whether it could be installed
    (not when pyfuse3 runs on something else than trio, e.g. its asyncio mode)."""
    current = getattr(pyfuse3, "trio", None)
    if current is not sys.modules.get("trio") or current is not trio:
        yield False
        return
    pyfuse3.trio = _Trio(trio)  # type: ignore[attr-defined]
    try:
        yield True
    finally:
        pyfuse3.trio = trio  # type: ignore[attr-defined]
