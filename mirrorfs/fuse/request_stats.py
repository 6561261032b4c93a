"""Counts and latencies of FUSE requests, per operation, for the metrics endpoint.

``OpStats.record`` runs once per request in ``operations._boundary`` (each handler holds
its operation's ``OpStats``): three additions and a bisect over 15 bounds, nothing allocated,
no lock (everything runs on the trio thread). The metrics collector (mirrorfs.node.metrics) reads
the figures on the same thread when scraped.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

#: Upper bounds (seconds) of the latency histogram's buckets; one more bucket is +Inf.
BOUNDS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
)  # fmt: skip


_bucket = bisect.bisect_left


@dataclass(slots=True)
class OpStats:
    """One operation's requests: how many, how many answered an error, their latencies."""

    count: int = 0
    errors: int = 0
    seconds: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))

    def record(self, seconds: float, ok: bool) -> None:
        """One request (the hot path: three additions and a bisect, nothing allocated)."""
        self.count += 1
        self.seconds += seconds
        if not ok:
            self.errors += 1
        self.buckets[_bucket(BOUNDS, seconds)] += 1


class RequestStats:
    """Per-operation request statistics of this process's mount."""

    def __init__(self) -> None:
        self.ops: dict[str, OpStats] = {}

    def op(self, op: str) -> OpStats:
        """The statistics of ``op`` (made once, when a handler is decorated)."""
        s = self.ops.get(op)
        if s is None:
            s = self.ops[op] = OpStats()
        return s

    def record(self, op: str, seconds: float, ok: bool) -> None:
        self.op(op).record(seconds, ok)


#: The one mount of this process (pyfuse3 allows one per process).
REQUEST_STATS = RequestStats()
