"""How many peers may be authenticating at once: a cap per address and in total (pure).

A replica holds nothing for a connection until its peer has proved the shared secret
(mirrorfs.repl.receiver); what an unauthenticated connection does cost is a task, a socket
and a bounded buffer for the length of the handshake's deadline. ``HandshakeLimiter``
bounds that cost: at most ``total`` handshakes in progress from all addresses together,
so a flood cannot exhaust the replica's memory or file descriptors, and, past their first
moments, ``per_host`` from one address.

A new connection beyond a cap is not refused: it takes the place of the least advanced,
oldest handshake in progress (from its address, or from any address at the total cap),
which is dropped. Refusing the newcomer would let whoever fills the slots first keep
them for a whole deadline; on loopback an attacker shares 127.0.0.1 with the real source,
so a flood from that one address would keep the source out. With eviction the newest
connection always gets a slot, and a handshake that moves on keeps it. Dropped first,
oldest first within each rank:

    0  still without its whole HELLO ``HELLO_GRACE`` after it connected (a half HELLO,
       a loris)
    1  past its HELLO (``hello``) but without its proof ``HELLO_GRACE`` after that
    2  connected less than ``HELLO_GRACE`` ago, no HELLO yet
    3  past its HELLO less than ``HELLO_GRACE`` ago, waiting for its proof

The per-address cap displaces only stale handshakes of that address (rank 0 or 1); young
ones (rank 2 and 3) count against the total cap alone, which displaces across addresses
by the same order. A real source sends its HELLO at once and its proof one round trip
later: it is rank 2, then rank 3, and the newest of its rank. An attacker without the
secret can drop its handshake only by opening ``total`` connections inside the moment
before its HELLO, or completing as many HELLOs inside its round trip (and whoever is in
the source's process's event loop: a test, may take a few loop turns for that moment);
the source's retry then gets a slot at once again.

Evictions are logged without letting a flood write the log: ``admit`` says whether to log
this one (at most one line every ``log_every`` seconds) and how many it kept quiet since.
Failed handshakes (a wrong proof, a deadline, garbage) likewise: ``failed`` says whether to
log one, the first ``FAILURES_LOGGED`` of an address each and then one line per
``log_every`` with the count kept quiet (``LogThrottle``, the same for both).

Sans-IO: no trio, no sockets, no clock reads (``now`` is passed in). The caller drops
the handshakes that ``admit`` names in ``Admission.evicted``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

PER_HOST = 8  # handshakes in progress from one address
TOTAL = 128  # handshakes in progress from every address together
LOG_EVERY = 10.0  # seconds between two log lines about dropped or failed handshakes
FAILURES_LOGGED = 3  # failed handshakes of one address logged one by one, before LOG_EVERY
THROTTLED_KEYS = 1024  # addresses whose failures are counted (the oldest idle one is forgotten)
#: How long a handshake may take for its next step (its HELLO after connecting, TLS first,
#: over a WAN; its proof after its HELLO) before it is dropped first for a newcomer.
HELLO_GRACE = 1.0


@dataclass(slots=True, eq=False)
class Ticket:
    """One handshake in progress (compared by identity)."""

    host: str
    started: float
    hello_at: float | None = None  # when its HELLO arrived whole
    pending: bool = True  # still counted (until released or evicted)


@dataclass(slots=True, frozen=True)
class Admission:
    """The answer to a new connection: its ticket, and the handshakes it displaced."""

    ticket: Ticket
    evicted: tuple[Ticket, ...] = ()  # the caller drops these handshakes now
    reason: str = ""  # why they were dropped, one line ("" when none was)
    log: bool = False  # log this eviction (the first one in a ``log_every`` period)
    suppressed: int = 0  # evictions not logged since the last line (when ``log``)


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


def _rank(t: Ticket, stale: float) -> int:
    """How readily ``t`` is dropped for a newcomer, 0 first (the module docstring)."""
    if t.hello_at is None:
        return 0 if t.started <= stale else 2
    return 1 if t.hello_at <= stale else 3


def _victim(tickets: dict[Ticket, None], now: float) -> Ticket:
    """The handshake to drop for a newcomer: the lowest rank, the oldest of that rank (dicts
    keep the order of admission)."""
    stale = now - HELLO_GRACE
    return min(tickets, key=lambda t: _rank(t, stale))  # min keeps the first of equals


@dataclass(slots=True)
class _Quiet:
    logged: int = 0  # lines of this burst so far
    at: float = 0.0  # when the last line was
    quiet: int = 0  # events not logged since


class LogThrottle:
    """Which of a stream of like events (per ``key``) to log: the first ``first`` one by one,
    then one every ``every`` seconds, which carries the count of those kept quiet. A key
    that stayed quiet for ``every`` starts again. At most ``keys`` keys are remembered."""

    def __init__(self, *, first: int = 1, every: float = LOG_EVERY, keys: int = THROTTLED_KEYS):
        self.first = first
        self.every = every
        self.keys = keys
        self._state: dict[str, _Quiet] = {}

    def note(self, key: str, now: float) -> tuple[bool, int]:
        """An event of ``key``: (log it?, how many were kept quiet before it)."""
        st = self._state.pop(key, None)
        if st is None:
            st = _Quiet()
            if len(self._state) >= self.keys:  # dicts keep order: the first is the oldest
                del self._state[next(iter(self._state))]
        self._state[key] = st  # the most recent last
        if st.logged and now - st.at >= self.every and not st.quiet:
            st.logged = 0  # a new burst, after a quiet period
        if st.logged < self.first or now - st.at >= self.every:
            quiet, st.quiet, st.at = st.quiet, 0, now
            st.logged += 1
            return True, quiet
        st.quiet += 1
        return False, 0


class HandshakeLimiter:
    """Counts the handshakes in progress, per host and in total (module docstring).

    ``admit(host, now)`` before the handshake starts; ``hello(ticket, now)`` when its HELLO
    arrived whole; ``release(ticket)`` when it ended or its peer proved the secret (a second
    release, or one after an eviction, does nothing).
    """

    def __init__(
        self, *, per_host: int = PER_HOST, total: int = TOTAL, log_every: float = LOG_EVERY
    ) -> None:
        if per_host < 1 or total < 1:
            raise ValueError("the handshake caps must be at least 1")
        self.per_host = per_host
        self.total = total
        self.log_every = log_every
        self._by_host: dict[str, dict[Ticket, None]] = {}
        self._all: dict[Ticket, None] = {}
        self._evicted_log = LogThrottle(first=1, every=log_every)
        self._failed_log = LogThrottle(first=FAILURES_LOGGED, every=log_every)
        self.evictions = 0  # since the start (for tests and status)
        self.failures = 0  # failed handshakes since the start

    @property
    def pending(self) -> int:
        """Handshakes in progress from every host."""
        return len(self._all)

    def pending_from(self, host: str) -> int:
        """Handshakes in progress from ``host``."""
        return len(self._by_host.get(host, ()))

    def admit(self, host: str, now: float) -> Admission:
        """Count a new connection from ``host``; past a cap, displace the least advanced,
        oldest handshake (module docstring)."""
        evicted: list[Ticket] = []
        reason = ""
        mine = self._by_host.get(host)
        if mine is not None and len(mine) >= self.per_host:
            victim = _victim(mine, now)
            if _rank(victim, now - HELLO_GRACE) <= 1:  # the cap displaces stale ones only
                evicted.append(victim)
                reason = (
                    f"{len(mine)} connections from {host or '?'} are already authenticating "
                    f"(at most {self.per_host} per address)"
                )
        if not evicted and len(self._all) >= self.total:
            evicted.append(_victim(self._all, now))
            reason = (
                f"{len(self._all)} connections are already authenticating (at most {self.total})"
            )
        for t in evicted:
            self.release(t)
        ticket = Ticket(host, now)
        self._by_host.setdefault(host, {})[ticket] = None
        self._all[ticket] = None
        if not evicted:
            return Admission(ticket)
        self.evictions += len(evicted)
        show, quiet = self._evicted_log.note("", now)
        return Admission(ticket, tuple(evicted), reason, log=show, suppressed=quiet)

    def failed(self, host: str, now: float) -> tuple[bool, int]:
        """A handshake from ``host`` failed: (log it?, how many of ``host``'s failures were
        not logged before it) (module docstring)."""
        self.failures += 1
        return self._failed_log.note(host, now)

    def hello(self, ticket: Ticket, now: float) -> None:
        """``ticket``'s HELLO arrived whole (module docstring: what that changes)."""
        ticket.hello_at = now

    def release(self, ticket: Ticket) -> None:
        """``ticket``'s handshake ended, or its peer proved the secret; idempotent."""
        if not ticket.pending:
            return
        ticket.pending = False
        del self._all[ticket]
        mine = self._by_host[ticket.host]
        del mine[ticket]
        if not mine:
            del self._by_host[ticket.host]


__all__ = [
    "FAILURES_LOGGED",
    "LOG_EVERY",
    "PER_HOST",
    "TOTAL",
    "Admission",
    "HandshakeLimiter",
    "LogThrottle",
    "Ticket",
    "host_of",
]
