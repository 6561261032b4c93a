"""How many peers may be authenticating at once: a cap per address and in total (pure).

A replica holds nothing for a connection until its peer has proved the shared secret
(mirrorfs.repl.receiver); what an unauthenticated connection does cost is a task, a socket
and a bounded buffer for the length of the handshake's deadline. ``HandshakeLimiter``
bounds that cost: at most ``per_host`` handshakes in progress from one address and
``total`` from all of them, so a flood or a slow sender from one address cannot keep a
source at another address out, and a flood from many addresses cannot exhaust the
replica's memory or file descriptors. A connection beyond a cap is refused at once.

Refusals are logged without letting a flood write the log: ``admit`` says whether to log
this one (at most one line every ``log_every`` seconds) and how many it kept quiet since.

Sans-IO: no trio, no sockets, no clock reads (``now`` is passed in).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

PER_HOST = 8  # handshakes in progress from one address
TOTAL = 128  # handshakes in progress from every address together
LOG_EVERY = 10.0  # seconds between two log lines about refused connections


@dataclass(slots=True, frozen=True)
class Admission:
    """The answer to a new connection: admitted, or refused with a one-line reason."""

    admitted: bool
    reason: str = ""  # why it was refused ("" when admitted)
    log: bool = False  # log this refusal (the first one in a ``log_every`` period)
    suppressed: int = 0  # refusals not logged since the last line (when ``log``)


def host_of(address: str) -> str:
    """The host part of ``host:port`` or ``[v6]:port`` (the key of the per-address cap);
    an address without a port (a test's ``"mem"``) is its own key."""
    if address.startswith("["):
        end = address.find("]")
        return address[1:end] if end > 0 else address
    host, sep, port = address.rpartition(":")
    if sep and host and ":" not in host and port.isdigit():
        return host
    return address


class HandshakeLimiter:
    """Counts the handshakes in progress, per host and in total (module docstring).

    ``admit(host, now)`` before the handshake starts; ``release(host)`` once, when an
    admitted handshake ended (authenticated or not).
    """

    def __init__(
        self, *, per_host: int = PER_HOST, total: int = TOTAL, log_every: float = LOG_EVERY
    ) -> None:
        if per_host < 1 or total < 1:
            raise ValueError("the handshake caps must be at least 1")
        self.per_host = per_host
        self.total = total
        self.log_every = log_every
        self._pending: dict[str, int] = {}
        self._count = 0
        self._logged_at: float | None = None
        self._quiet = 0  # refusals since the last logged one

    @property
    def pending(self) -> int:
        """Handshakes in progress from every host."""
        return self._count

    def pending_from(self, host: str) -> int:
        """Handshakes in progress from ``host``."""
        return self._pending.get(host, 0)

    def admit(self, host: str, now: float) -> Admission:
        """Admit a new connection from ``host`` (counted until ``release``), or refuse it."""
        mine = self._pending.get(host, 0)
        if mine >= self.per_host:
            return self._refuse(
                now,
                f"{mine} connections from {host or '?'} are already authenticating "
                f"(at most {self.per_host} per address)",
            )
        if self._count >= self.total:
            return self._refuse(
                now,
                f"{self._count} connections are already authenticating (at most {self.total})",
            )
        self._pending[host] = mine + 1
        self._count += 1
        return Admission(True)

    def release(self, host: str) -> None:
        """An admitted handshake from ``host`` ended."""
        mine = self._pending.get(host, 0)
        if mine <= 0:
            raise RuntimeError(f"release of {host!r} without a pending handshake")
        if mine == 1:
            del self._pending[host]
        else:
            self._pending[host] = mine - 1
        self._count -= 1

    def _refuse(self, now: float, reason: str) -> Admission:
        if self._logged_at is not None and now - self._logged_at < self.log_every:
            self._quiet += 1
            return Admission(False, reason)
        quiet, self._quiet, self._logged_at = self._quiet, 0, now
        return Admission(False, reason, log=True, suppressed=quiet)
