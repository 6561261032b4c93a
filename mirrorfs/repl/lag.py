"""How far behind the targets are (source side): lag figures and log retention.

``CommitTracker`` remembers, for the transactions a target has not applied yet, when each was
committed and how big its log record is, so that the shipper can report lag in bytes and
seconds without reading the log. It is fed from ``vol.writer.subscribe``, which runs inside
``Volume.commit()``: ``note`` must stay O(1) and never block.

``RateMeter`` turns a running byte count into bytes per second over the last few seconds.

Retention (``install_retention``): the volume keeps the log segments that the slowest
connected-or-known target still needs, each target up to its shipper's ``max_log_bytes``;
a target that would pin more stops pinning and becomes out-of-sync.

Nothing here awaits; the shipper owns the objects and calls them from the trio thread only.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import humanize

from mirrorfs.store import record
from mirrorfs.store.errors import StoreError
from mirrorfs.store.segments import segment_first_seq
from mirrorfs.store.txn import Transaction

if TYPE_CHECKING:
    from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)

# Bytes a TXN record adds to its block data (record header, run and hint headers), for the
# estimate of a record that was not read from the log yet.
RECORD_OVERHEAD = 64
MAX_TRACKED = 1 << 16


@dataclass(slots=True)
class _Commit:
    seq: int
    when: float  # time.monotonic() at commit
    size: int  # bytes of its log record (estimated until the shipper read it)


class CommitTracker:
    """Commit time and record size of recent transactions, in sequence order.

    Entries are consecutive sequence numbers; the oldest are dropped once ``max_entries`` is
    reached (a target that is far behind), after which the figures for the oldest unapplied
    transactions are lower bounds and the caller falls back to the log.
    """

    def __init__(self, max_entries: int = MAX_TRACKED) -> None:
        self._entries: deque[_Commit] = deque()
        self._max = max_entries
        self._bytes = 0  # sum of sizes of the entries held

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def first_seq(self) -> int | None:
        return self._entries[0].seq if self._entries else None

    def note(self, txn: Transaction) -> None:
        """A transaction was committed (a ``vol.writer`` commit listener: O(1), no I/O)."""
        entries = self._entries
        if entries and txn.seq != entries[-1].seq + 1:
            # A gap (callbacks registered late, or a log reset): start over.
            entries.clear()
            self._bytes = 0
        size = txn.data_bytes() + RECORD_OVERHEAD
        entries.append(_Commit(txn.seq, time.monotonic(), size))
        self._bytes += size
        if len(entries) > self._max:
            self._bytes -= entries.popleft().size

    def _find(self, seq: int) -> _Commit | None:
        entries = self._entries
        if not entries:
            return None
        i = seq - entries[0].seq
        if 0 <= i < len(entries):
            return entries[i]
        return None

    def size_of(self, seq: int) -> int | None:
        """The size noted for ``seq`` (its data bytes until the record's is known), if held."""
        entry = self._find(seq)
        return entry.size if entry is not None else None

    def set_size(self, seq: int, size: int) -> None:
        """The exact record size of ``seq`` (known once the shipper read it from the log)."""
        entry = self._find(seq)
        if entry is not None:
            self._bytes += size - entry.size
            entry.size = size

    def forget_upto(self, seq: int) -> None:
        """Drop the entries of transactions the target has applied."""
        entries = self._entries
        while entries and entries[0].seq <= seq:
            self._bytes -= entries.popleft().size

    def bytes_after(self, seq: int) -> int:
        """Record bytes of the tracked transactions after ``seq``."""
        entries = self._entries
        if not entries or seq < entries[0].seq:
            return self._bytes
        return sum(e.size for e in entries if e.seq > seq)

    def committed_at(self, seq: int) -> float | None:
        """``time.monotonic()`` when ``seq`` was committed, None if not tracked."""
        entry = self._find(seq)
        return entry.when if entry is not None else None


class RateMeter:
    """Bytes per second over the last ``window`` seconds (acked bytes, for throughput)."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self.total = 0
        self._samples: deque[tuple[float, int]] = deque()
        self._in_window = 0

    def add(self, nbytes: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.total += nbytes
        self._samples.append((now, nbytes))
        self._in_window += nbytes
        self._trim(now)

    def _trim(self, now: float) -> None:
        samples = self._samples
        while samples and samples[0][0] <= now - self.window:
            self._in_window -= samples.popleft()[1]

    def rate(self, now: float | None = None) -> float:
        """Bytes per second over the window (0.0 without traffic in it)."""
        self._trim(time.monotonic() if now is None else now)
        return self._in_window / self.window


def lag_seconds(tracker: CommitTracker, volume: Volume, applied: int) -> float:
    """Seconds since the oldest transaction the target has not applied was committed."""
    if applied >= volume.last_seq:
        return 0.0
    when = tracker.committed_at(applied + 1)
    if when is not None:
        return max(0.0, time.monotonic() - when)
    # Committed before tracking began: the record's own timestamp (wall clock).
    try:
        records = volume.samlog.scan_encoded(applied + 1)
        try:
            got = next(records, None)
        finally:
            records.close()  # type: ignore[attr-defined]
    except StoreError:
        got = None
    if got is None:
        return 0.0
    return max(0.0, (time.time_ns() - record.parse_header(got[1]).timestamp_ns) / 1e9)


def stage_lag(tracker: CommitTracker, volume: Volume, low: int | None, high: int | None) -> dict:
    """The transactions past ``low`` and up to ``high`` (one stage of the way to a target:
    sent but not acknowledged, acknowledged but not applied): how many, their record bytes,
    and the seconds since the oldest of them was committed. None figures when a position is
    unknown (no handshake yet)."""
    if low is None or high is None:
        return {"txns": None, "bytes": None, "seconds": None}
    txns = max(0, high - low)
    if not txns:
        return {"txns": 0, "bytes": 0, "seconds": 0.0}
    nbytes = tracker.bytes_after(low) - tracker.bytes_after(high)
    return {
        "txns": txns,
        "bytes": max(0, nbytes),
        "seconds": round(lag_seconds(tracker, volume, low), 3),
    }


# ---------------------------------------------------------------------------- retention


class Pinner(Protocol):
    """What retention needs of a shipper."""

    max_log_bytes: int | None

    def retain_seq(self) -> int | None: ...

    def drop_pin(self, reason: str) -> None: ...


def log_segments(volume: Volume) -> list[tuple[int, int]]:
    """``(first_seq, bytes)`` of every log segment file, oldest first."""
    directory = volume.samlog.directory
    out = []
    for name in os.listdir(directory):
        first = segment_first_seq(name)
        if first is not None:
            try:
                out.append((first, os.stat(os.path.join(directory, name)).st_size))
            except FileNotFoundError:
                continue
    out.sort()
    return out


def pinned_bytes(segments: Sequence[tuple[int, int]], seq: int) -> int:
    """Log bytes kept only because someone needs ``seq``: the segments that hold it or later
    records, except the last one (the current segment is never retired anyway)."""
    total = 0
    for i, (_first, size) in enumerate(segments[:-1]):
        if segments[i + 1][0] > seq:
            total += size
    return total


def retention(volume: Volume, pinners: Iterable[Pinner]) -> Callable[[], int | None]:
    """A retention policy for these shippers (the iterable is read at every call).

    The log is kept from the lowest seq a connected-or-known target still needs. A target
    whose needs pin more than its shipper's ``max_log_bytes`` stops pinning and becomes
    out-of-sync. Runs inside ``Volume.checkpoint`` (the commit path): no await, and the log
    directory is listed only when some shipper has a cap.
    """

    def retain_from() -> int | None:
        segments: list[tuple[int, int]] | None = None
        low: int | None = None
        for pinner in list(pinners):
            need = pinner.retain_seq()
            if need is None:
                continue
            if pinner.max_log_bytes is not None:
                if segments is None:
                    segments = log_segments(volume)
                held = pinned_bytes(segments, need)
                if held > pinner.max_log_bytes:
                    # (read by people: status, the log; ``binary``: 1 MiB, as --max-log says)
                    behind = humanize.naturalsize(held, binary=True)
                    cap = humanize.naturalsize(pinner.max_log_bytes, binary=True)
                    pinner.drop_pin(
                        f"fell {behind} of log behind (from seq {need}), more than the "
                        f"log cap of {cap}: resync needed"
                    )
                    continue
            low = need if low is None else min(low, need)
        return low

    return retain_from


def install_retention(volume: Volume, pinners: Iterable[Pinner]) -> None:
    """Make ``volume`` keep its log segments for these shippers (see ``retention``)."""
    volume.checkpointer.retain_with(retention(volume, pinners))
