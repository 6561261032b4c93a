"""A map of new block content: non-overlapping runs, large ones kept by reference.

The open transaction's blocks live here until it is sealed; the sealed ones stay here until
they are finished; the in-place backlog (``store/inplace.py``) merges finished transactions
into one. Reads patch these runs over the block file.

Two kinds of piece, by size:

- A large write (at least ``JOIN_BELOW`` bytes, a 128 KiB or 1 MiB FUSE write) is copied
  once, by the kernel: an immutable buffer given to ``put`` (``bytes``, or a memoryview of
  ``bytes``, such as the FUSE request's buffer) is kept by reference, and an overwrite
  splits the pieces it covers into memoryview slices; only a mutable one is copied.
- A small write (a metadata block, a 4 KiB write) is copied into a ``bytearray`` that the
  map owns, merged with the owned piece it overwrites or extends: a block rewritten many
  times in one transaction (an inode-table or bitmap block, a directory block) costs one
  4 KiB copy and no change to the sorted map, and sequential small writes grow one piece.
  Owned pieces never leave the map: ``covers``/``patch`` copy out of them, ``runs`` turns
  them into ``bytes``.

A map is modified only by its owner's thread; once it stops being modified (a sealed
transaction, a flushing batch), other threads may read it (the log append, the flusher):
``pieces`` is for those readers of maps built with ``put_frozen`` (the in-place backlog),
which holds read-only views only.

``runs`` returns the map for a transaction record: adjacent small pieces are joined into
one run (metadata, small sequential writes); large pieces stay views of the caller's
buffers, so a 1 MiB FUSE write reaches ``os.pwritev`` without a Python copy.
"""

from __future__ import annotations

from sortedcontainers import SortedDict

Data = bytes | bytearray | memoryview

#: Pieces at least this large are kept by reference; smaller ones are copied into owned
#: pieces (``put``) and joined with their neighbours (``runs``).
JOIN_BELOW = 64 << 10
#: An owned piece grows by appending up to this size (sequential small writes), then a new
#: one starts: bounds the copy that a later split or ``runs`` makes of it.
OWNED_MAX = 1 << 20


def frozen(data: Data) -> memoryview:
    """``data`` as a read-only byte view that nobody can change under it (copied if needed)."""
    view = memoryview(data)
    if not isinstance(view.obj, bytes):
        return memoryview(bytes(view))
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class BlockOverlay:
    """Blocks written over the block file, as runs ``first_block -> piece``: a read-only
    memoryview (by reference) or an owned ``bytearray`` (small writes, see the module doc)."""

    def __init__(self, block_size: int, *, join_below: int = JOIN_BELOW):
        self.block_size = block_size
        self.join_below = join_below
        self._runs: SortedDict = SortedDict()
        self.nbytes = 0

    def __bool__(self) -> bool:
        return bool(self._runs)

    def __len__(self) -> int:
        """Number of stored pieces (not blocks)."""
        return len(self._runs)

    def put(self, start: int, data: Data) -> None:
        """Record ``data`` (full blocks) at ``start``, replacing what overlaps.

        Small ``data`` is copied (into an owned piece); large ``data`` is kept by reference
        when it is immutable."""
        n = len(data)
        if n >= self.join_below:
            self.put_frozen(start, frozen(data))
            return
        bs = self.block_size
        runs = self._runs
        i = runs.bisect_right(start) - 1
        if i >= 0:
            keys = runs.keys()
            s = keys[i]
            old = runs[s]
            if type(old) is bytearray:
                e = s + len(old) // bs
                end = start + n // bs
                if end <= e:
                    # Inside an owned piece (a metadata block rewritten): copy over it.
                    old[(start - s) * bs : (end - s) * bs] = data
                    return
                if (
                    e >= start
                    and len(old) < OWNED_MAX
                    and (i + 1 == len(keys) or keys[i + 1] >= end)
                ):
                    # Overlapping its tail or right after it, nothing else in the way.
                    self.nbytes += (end - e) * bs
                    old[(start - s) * bs :] = data
                    return
        self.put_frozen(start, bytearray(data))

    def put_frozen(self, start: int, view: memoryview | bytearray) -> None:
        """``put`` of a view already made by ``frozen`` (no check, no copy), or of an owned
        ``bytearray`` nobody else holds."""
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

    def pieces(self) -> list[tuple[int, memoryview | bytearray]]:
        """The stored pieces in block order, as they are (adjacent ones not joined)."""
        return list(self._runs.items())

    def runs(self) -> list[tuple[int, bytes | memoryview]]:
        """Runs for a transaction record: adjacent small pieces joined, large ones as views."""
        bs = self.block_size
        out: list[tuple[int, bytes | memoryview]] = []
        group: list[memoryview] = []
        gstart = gend = -1
        join_below = self.join_below
        for s, run in self._runs.items():
            # Owned pieces are always joined (into bytes): they must not leave the map.
            small = len(run) < join_below or type(run) is bytearray
            if group and s == gend and small:
                group.append(run)
                gend += len(run) // bs
                continue
            if group:
                out.append((gstart, _joined(group)))
                group = []
            if small:
                group, gstart, gend = [run], s, s + len(run) // bs
            else:
                out.append((s, run))
        if group:
            out.append((gstart, _joined(group)))
        return out

    def clear(self) -> None:
        self._runs.clear()
        self.nbytes = 0


def _joined(group: list) -> bytes | memoryview:
    """One run of adjacent pieces: a lone view as it is, anything else as new bytes."""
    if len(group) == 1 and type(group[0]) is memoryview:
        return group[0]
    return b"".join(group)
