"""Counts and latencies of FUSE requests, per operation, for the metrics endpoint.

``record`` runs once per request in ``operations._boundary``: a dict lookup, three additions
and a bisect over a dozen bounds, no allocation after an operation's first request, no lock
(everything runs on the trio thread). The metrics collector (mirrorfs.node.metrics) reads
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


@dataclass(slots=True)
class OpStats:
    """One operation's requests: how many, how many answered an error, their latencies."""

    count: int = 0
    errors: int = 0
    seconds: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))


class RequestStats:
    """Per-operation request statistics of this process's mount."""

    def __init__(self) -> None:
        self.ops: dict[str, OpStats] = {}

    def record(self, op: str, seconds: float, ok: bool) -> None:
        s = self.ops.get(op)
        if s is None:
            s = self.ops[op] = OpStats()
        s.count += 1
        s.seconds += seconds
        if not ok:
            s.errors += 1
        s.buckets[bisect.bisect_left(BOUNDS, seconds)] += 1


#: The one mount of this process (pyfuse3 allows one per process).
REQUEST_STATS = RequestStats()
