"""A map of new block content: non-overlapping runs, kept by reference.

The open transaction's blocks live here until it is sealed; the sealed ones stay here until
they are finished; the in-place backlog (``store/inplace.py``) merges finished transactions
into one. Reads patch these runs over the block file.

Data is copied once, by the kernel: an immutable buffer given to ``put`` (``bytes``, or a
memoryview of ``bytes``, such as a slice of the FUSE request's buffer) is kept by reference,
and an overwrite splits the runs it covers into memoryview slices. Only a mutable buffer (a
``bytearray`` of a read-modify-write, a metadata block being built) is copied, since its
owner may change it later. A stored run is never modified in place, so a sealed map can be
read from another thread (the log append, the flusher) while the volume thread fills the
next one.

``runs`` returns the map for a transaction record: adjacent small pieces are joined into
one run (metadata, small sequential writes); large pieces stay views of the caller's
buffers, so a 1 MiB FUSE write reaches ``os.pwritev`` without a Python copy.
"""

from __future__ import annotations

from sortedcontainers import SortedDict

Data = bytes | bytearray | memoryview

#: Pieces at least this large are handed on by reference; smaller adjacent ones are joined.
JOIN_BELOW = 64 << 10


def frozen(data: Data) -> memoryview:
    """``data`` as a read-only byte view that nobody can change under it (copied if needed)."""
    view = memoryview(data)
    if not isinstance(view.obj, bytes):
        return memoryview(bytes(view))
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class BlockOverlay:
    """Blocks written over the block file, as runs ``first_block -> read-only memoryview``."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._runs: SortedDict = SortedDict()
        self.nbytes = 0

    def __bool__(self) -> bool:
        return bool(self._runs)

    def __len__(self) -> int:
        """Number of stored pieces (not blocks)."""
        return len(self._runs)

    def put(self, start: int, data: Data) -> None:
        """Record ``data`` (full blocks) at ``start``, replacing what overlaps."""
        self.put_frozen(start, frozen(data))

    def put_frozen(self, start: int, view: memoryview) -> None:
        """``put`` of a view already made by ``frozen`` (no check, no copy)."""
        bs = self.block_size
        end = start + len(view) // bs
        runs = self._runs
        keys = runs.keys()
        i = runs.bisect_right(start) - 1
        if i < 0:
            i = 0
        # Cut every piece that overlaps [start, end); keep what lies outside of it.
        while i < len(keys):
            s = keys[i]
            if s >= end:
                break
            old = runs[s]
            e = s + len(old) // bs
            if e <= start:
                i += 1
                continue
            del runs[s]
            self.nbytes -= len(old)
            if s < start:
                runs[s] = old[: (start - s) * bs]
                self.nbytes += (start - s) * bs
                i += 1
            if e > end:
                runs[end] = old[(end - s) * bs :]
                self.nbytes += (e - end) * bs
                break
        runs[start] = view
        self.nbytes += len(view)

    def _overlapping(self, start: int, end: int):
        runs = self._runs
        keys = runs.keys()
        i = max(runs.bisect_right(start) - 1, 0)
        bs = self.block_size
        while i < len(keys):
            s = keys[i]
            if s >= end:
                return
            run = runs[s]
            if s + len(run) // bs > start:
                yield s, run
            i += 1

    def patch(self, start: int, count: int, base: bytes) -> bytes:
        """Return ``base`` (the content of start..start+count below) with runs applied."""
        if not self._runs:
            return base
        bs = self.block_size
        end = start + count
        out: bytearray | None = None
        for s, run in self._overlapping(start, end):
            if out is None:
                out = bytearray(base)
            e = s + len(run) // bs
            lo, hi = max(s, start), min(e, end)
            out[(lo - start) * bs : (hi - start) * bs] = run[(lo - s) * bs : (hi - s) * bs]
        return base if out is None else bytes(out)

    def covers(self, start: int, count: int) -> bytes | None:
        """The content of start..start+count if a single piece holds all of it, else None."""
        i = self._runs.bisect_right(start) - 1
        if i < 0:
            return None
        s = self._runs.keys()[i]
        run = self._runs[s]
        bs = self.block_size
        if s + len(run) // bs >= start + count:
            return bytes(run[(start - s) * bs : (start - s + count) * bs])
        return None

    def pieces(self) -> list[tuple[int, memoryview]]:
        """The stored pieces in block order, as they are (adjacent ones not joined)."""
        return list(self._runs.items())

    def runs(self) -> list[tuple[int, bytes | memoryview]]:
        """Runs for a transaction record: adjacent small pieces joined, large ones as views."""
        bs = self.block_size
        out: list[tuple[int, bytes | memoryview]] = []
        group: list[memoryview] = []
        gstart = gend = -1
        for s, run in self._runs.items():
            small = len(run) < JOIN_BELOW
            if group and s == gend and small:
                group.append(run)
                gend += len(run) // bs
                continue
            if group:
                out.append((gstart, group[0] if len(group) == 1 else b"".join(group)))
                group = []
            if small:
                group, gstart, gend = [run], s, s + len(run) // bs
            else:
                out.append((s, run))
        if group:
            out.append((gstart, group[0] if len(group) == 1 else b"".join(group)))
        return out

    def clear(self) -> None:
        self._runs.clear()
        self.nbytes = 0
