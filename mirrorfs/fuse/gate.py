"""The write gate of a read-write mount: hold modifying requests while a switchover drains.

A planned switchover (mirrorfs.node.switchover) closes the gate, commits, waits until the
target has applied the last transaction and freezes the volume. Meanwhile every modifying
request (the ``_boundary(modifies=True)`` handlers and opens for writing) waits at the gate:
it neither fails nor touches the volume. Then the gate either opens again (the switchover
failed: the waiting requests go on as if nothing happened) or refuses (the volume is a
target now: the waiting requests and every later one get EROFS).

The node layer reaches the gate through ``volume.writer.gate`` (``Operations`` attaches it
with ``WritePath.attach_gate``; it is a ``store.writepath.WriteHold``), so the FUSE layer
never imports the node layer.

Concurrency: ``enter`` does not yield while the gate is open. A handler that passes it thus
makes its change in the same step of the trio loop, before the switchover can close the gate
and commit: a change is either in the final commit or was never made.
"""

from __future__ import annotations

import errno
import logging
import time

import pyfuse3
import trio

from mirrorfs.store.committer import Committer

log = logging.getLogger(__name__)


class WriteGate:
    """Open, closed (requests wait) or refusing (requests get ``refusal``)."""

    def __init__(self, committer: Committer) -> None:
        self.committer = committer
        self._opened = trio.Event()
        self._opened.set()
        self.refusal = 0  # errno answered to held and later requests (0: none)
        self.closed_at: float | None = None  # time.monotonic() of the last close
        self.waiting = 0  # requests held right now
        self.held = 0  # requests held since the last close

    @property
    def closed(self) -> bool:
        return not self._opened.is_set()

    async def enter(self) -> None:
        """Called by a modifying handler before it changes anything; FUSEError if refused."""
        while True:
            if self.refusal:
                raise pyfuse3.FUSEError(self.refusal)
            if self._opened.is_set():
                return  # no await on this path: the caller's change follows in this step
            self.waiting += 1
            self.held += 1
            try:
                await self._opened.wait()
            finally:
                self.waiting -= 1

    def close(self) -> None:
        """Hold every modifying request from now on."""
        if self.closed:
            return
        self._opened = trio.Event()
        self.closed_at = time.monotonic()
        self.held = 0
        log.info("write gate closed: modifying requests wait")

    def reopen(self) -> None:
        """Let the held requests (and later ones) go on."""
        if not self.closed:
            return
        log.info(
            "write gate open again after %.3f s (%d request(s) held)",
            time.monotonic() - (self.closed_at or time.monotonic()),
            self.held,
        )
        self._opened.set()

    def refuse(self, err: int = errno.EROFS) -> None:
        """Answer the held requests and every later modifying one with ``err``, for good."""
        self.refusal = err
        log.info(
            "write gate refusing (%s): %d request(s) were held", errno.errorcode[err], self.held
        )
        self._opened.set()

    async def commit(self) -> int:
        """Make everything written so far durable (the committer's fsync); the last seq."""
        await self.committer.commit()
        return self.committer.volume.last_seq
