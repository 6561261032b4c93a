"""The open transaction's blocks: non-overlapping runs of new block content.

Writes land here until the transaction commits; reads of the volume patch these runs over
the block file. Runs are kept merged so that a streaming writer produces a few large runs,
not thousands of 4 KiB objects.
"""

from __future__ import annotations

from sortedcontainers import SortedDict


class BlockOverlay:
    """Blocks written since the last commit, as merged runs ``first_block -> bytearray``."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._runs: SortedDict = SortedDict()
        self.nbytes = 0

    def __bool__(self) -> bool:
        return bool(self._runs)

    def put(self, start: int, data: bytes | bytearray | memoryview) -> None:
        """Record ``data`` (full blocks) at ``start``, replacing what overlaps."""
        bs = self.block_size
        end = start + len(data) // bs
        runs = self._runs
        # The run that starts at or before `start`, if it reaches `start`.
        i = runs.bisect_right(start) - 1
        if i >= 0:
            pstart = runs.keys()[i]
            prun = runs[pstart]
            pend = pstart + len(prun) // bs
            if pend >= start and (i + 1 >= len(runs) or runs.keys()[i + 1] > end):
                # Fast paths: inside the previous run, or extending it at its end.
                if end <= pend:
                    prun[(start - pstart) * bs : (end - pstart) * bs] = data
                    return
                self.nbytes += (end - pend) * bs
                prun[(start - pstart) * bs :] = data
                return
        # General case: merge every run overlapping or touching [start, end).
        lo = start
        hi = end
        victims = []
        j = max(i, 0)
        keys = runs.keys()
        while j < len(keys):
            s = keys[j]
            if s > end:
                break
            e = s + len(runs[s]) // bs
            if e >= start:
                victims.append(s)
                lo = min(lo, s)
                hi = max(hi, e)
            j += 1
        merged = bytearray((hi - lo) * bs)
        for s in victims:
            old = runs.pop(s)
            merged[(s - lo) * bs : (s - lo) * bs + len(old)] = old
            self.nbytes -= len(old)
        merged[(start - lo) * bs : (end - lo) * bs] = data
        runs[lo] = merged
        self.nbytes += len(merged)

    def patch(self, start: int, count: int, base: bytes) -> bytes:
        """Return ``base`` (the block file's content of start..start+count) with runs applied."""
        runs = self._runs
        if not runs:
            return base
        bs = self.block_size
        end = start + count
        i = max(runs.bisect_right(start) - 1, 0)
        keys = runs.keys()
        out: bytearray | None = None
        while i < len(keys):
            s = keys[i]
            if s >= end:
                break
            run = runs[s]
            e = s + len(run) // bs
            if e > start:
                if out is None:
                    out = bytearray(base)
                lo = max(s, start)
                hi = min(e, end)
                out[(lo - start) * bs : (hi - start) * bs] = run[(lo - s) * bs : (hi - s) * bs]
            i += 1
        return base if out is None else bytes(out)

    def covers(self, start: int, count: int) -> bytes | None:
        """The content of start..start+count if a single run holds all of it, else None."""
        i = self._runs.bisect_right(start) - 1
        if i < 0:
            return None
        s = self._runs.keys()[i]
        run = self._runs[s]
        bs = self.block_size
        if s + len(run) // bs >= start + count:
            return bytes(run[(start - s) * bs : (start - s + count) * bs])
        return None

    def runs(self) -> list[tuple[int, bytearray]]:
        return list(self._runs.items())

    def clear(self) -> None:
        self._runs.clear()
        self.nbytes = 0
