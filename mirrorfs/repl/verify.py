"""Block-range checksums: is the replica block-equivalent to the source?

Two nodes at the same transaction number have byte-identical block files (DESIGN.md), so a
replica is checked by comparing sha256 digests of block ranges computed on each side *at the
same sequence number*:

- ``range_digests(device_or_volume, ranges)`` digests the committed content (the block
  file, not the open transaction) of each ``(first_block, nblocks)`` range, reading in runs
  of at most 1 MiB. Both sides call it; the target answers VERIFY_REQ with it.
- ``find_differences(compare, ranges)`` narrows differing ranges down by bisection: each
  round asks ``compare`` which of a list of ranges differ, then splits those that do into
  ``fanout`` parts, until they are at most ``granularity`` blocks.
- ``Bisection`` is that loop, pure: ``todo`` are the ranges to compare next, ``feed`` takes
  which of them differ. ``find_differences`` (async) and ``diff_volumes`` (local) drive it,
  and so does the resync (repl/resync.py): the loop is written once.
- ``VerifyRound`` is ``verify_target``'s decisions, pure: the batches of each round, the
  retries of a failed one, the result.
- ``verify_target(peer)`` runs that over a shipper's live connection (VERIFY_REQ /
  VERIFY_REPLY, INTERNALS.md "Replication session" step 6). The shipper computes the source
  digests in its sending task right after it sent transaction ``seq`` and before anything
  later, without awaiting in between, so no commit can slip in: that is how the source "holds
  still" at ``seq`` without stopping writers for longer than the hashing takes.

Target semantics (what the receiver does with VERIFY_REQ(seq, ranges)): it handles the request
in stream order with the TXN frames; once its applied_seq == seq (at once if it already is,
otherwise right after applying ``seq`` and before applying ``seq + 1``) it sends
VERIFY_REPLY(seq, range_digests(volume, ranges)), computed without awaiting. A target that
cannot (its applied_seq is already past ``seq``) answers VERIFY_REPLY(its applied_seq, []),
which the source treats as "try again".
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from mirrorfs.repl.wire import ProtocolError, ReplError, VerifyReply, VerifyReq

log = logging.getLogger(__name__)

READ_RUN = 1 << 20  # bytes per read while digesting
DEFAULT_GRANULARITY = 256  # blocks: how far bisection narrows a difference down
DEFAULT_FANOUT = 16  # parts a differing range is split into per round
# Bytes digested per VERIFY_REQ: the source hashes its side without awaiting (that is what
# makes it one seq), so this bounds how long the event loop (and FUSE) waits on it.
ROUND_BYTES = 64 << 20

Range = tuple[int, int]  # (first_block, nblocks)


class VerifyError(ReplError):
    """A verification could not be carried out (no connection, bad reply, timeout)."""


class _Geometry(Protocol):
    @property
    def block_size(self) -> int: ...

    @property
    def block_count(self) -> int: ...


class _Device(_Geometry, Protocol):
    def read(self, block: int, count: int) -> bytes: ...


def _device(device_or_volume: object) -> _Device:
    # A Volume digests its block file (committed state), never its open transaction.
    return getattr(device_or_volume, "device", device_or_volume)  # type: ignore[return-value]


def range_digests(device_or_volume: object, ranges: Sequence[Range]) -> list[bytes]:
    """sha256 of the committed content of each ``(first_block, nblocks)`` range, in order.

    Synchronous on purpose: called between two awaits, the digests are all of one sequence
    number. ValueError if a range lies outside the volume.
    """
    dev = _device(device_or_volume)
    bs = dev.block_size
    per_read = max(1, READ_RUN // bs)
    out = []
    for first, count in ranges:
        if first < 0 or count < 0 or first + count > dev.block_count:
            raise ValueError(f"range {first}+{count} outside the volume ({dev.block_count})")
        h = hashlib.sha256()
        block, end = first, first + count
        while block < end:
            n = min(per_read, end - block)
            h.update(dev.read(block, n))
            block += n
        out.append(h.digest())
    return out


def whole_volume(block_count: int, range_blocks: int) -> list[Range]:
    """The volume cut into ranges of ``range_blocks`` (the last one shorter)."""
    return [(b, min(range_blocks, block_count - b)) for b in range(0, block_count, range_blocks)]


def split_range(r: Range, parts: int, granularity: int) -> list[Range]:
    """``r`` cut into at most ``parts`` pieces of a multiple of ``granularity`` blocks."""
    first, count = r
    units = -(-count // granularity)
    per = max(1, -(-units // parts)) * granularity
    return [(b, min(per, first + count - b)) for b in range(first, first + count, per)]


def _cut(r: Range, max_blocks: int) -> list[Range]:
    first, count = r
    return [
        (b, min(max_blocks, first + count - b)) for b in range(first, first + count, max_blocks)
    ]


def batches(
    ranges: Sequence[Range], max_blocks: int, max_ranges: int | None = None
) -> Iterator[list[Range]]:
    """Consecutive groups of ranges of at most ``max_blocks`` blocks in all (or one range),
    and of at most ``max_ranges`` ranges each when given."""
    batch: list[Range] = []
    total = 0
    for r in ranges:
        if batch and (
            total + r[1] > max_blocks or (max_ranges is not None and len(batch) >= max_ranges)
        ):
            yield batch
            batch, total = [], 0
        batch.append(r)
        total += r[1]
    if batch:
        yield batch


def merge_ranges(ranges: Sequence[Range]) -> list[Range]:
    """Sorted, with adjacent ranges joined."""
    out: list[Range] = []
    for first, count in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == first:
            out[-1] = (out[-1][0], out[-1][1] + count)
        else:
            out.append((first, count))
    return out


class Bisection:
    """The bisection of differing ranges, without I/O: compare ``todo``, ``feed`` the answer.

    Each round's answers may be of a later sequence number than the previous round's: a
    range that stopped differing (both sides rewrote it since) is simply not reported.
    """

    def __init__(
        self,
        ranges: Sequence[Range],
        *,
        granularity: int = DEFAULT_GRANULARITY,
        fanout: int = DEFAULT_FANOUT,
    ) -> None:
        self.granularity = granularity
        self.fanout = fanout
        self.todo: list[Range] = list(ranges)  # the ranges to compare next (empty: done)
        self.found: list[Range] = []  # differing ranges of at most ``granularity`` blocks
        self.rounds = 0

    @property
    def done(self) -> bool:
        return not self.todo

    def feed(self, differ: Sequence[bool]) -> None:
        """Which ranges of ``todo`` differ (one bool each, in order): the next round."""
        self.rounds += 1
        nxt: list[Range] = []
        for r, d in zip(self.todo, differ, strict=True):
            if not d:
                continue
            if r[1] <= self.granularity:
                self.found.append(r)
            else:
                nxt.extend(split_range(r, self.fanout, self.granularity))
        self.todo = nxt


async def find_differences(
    compare: Callable[[list[Range]], Awaitable[list[bool]]],
    ranges: Sequence[Range],
    *,
    granularity: int = DEFAULT_GRANULARITY,
    fanout: int = DEFAULT_FANOUT,
) -> tuple[list[Range], int]:
    """The ranges of at most ``granularity`` blocks that differ, and the rounds it took.

    ``compare(ranges)`` says, per range, whether the two sides differ (``Bisection``).
    """
    b = Bisection(ranges, granularity=granularity, fanout=fanout)
    while not b.done:
        b.feed(await compare(b.todo))
    return b.found, b.rounds


def diff_volumes(
    a: object,
    b: object,
    *,
    granularity: int = DEFAULT_GRANULARITY,
    fanout: int = DEFAULT_FANOUT,
) -> list[Range]:
    """Differing ranges of two local block files or volumes (tests, tools)."""
    dev = _device(a)
    bis = Bisection(
        whole_volume(dev.block_count, granularity * fanout * fanout),
        granularity=granularity,
        fanout=fanout,
    )
    while not bis.done:
        da, db = range_digests(a, bis.todo), range_digests(b, bis.todo)
        bis.feed([x != y for x, y in zip(da, db, strict=True)])
    return merge_ranges(bis.found)


@dataclass(slots=True)
class VerifyJob:
    """One comparison: its ranges, and once ``done`` the seq, both sides' digests or an error.

    ``notify`` is called once when it is done (the waiting task's wake-up).
    """

    ranges: list[Range]
    notify: Callable[[], None] = lambda: None
    done: bool = False
    seq: int = 0
    source: list[bytes] = field(default_factory=list)
    target: list[bytes] = field(default_factory=list)
    error: str = ""

    def finish(self, error: str = "") -> None:
        if error:
            self.error = error
        self.done = True
        self.notify()


class VerifyChannel:
    """The source's end of VERIFY_REQ / VERIFY_REPLY on one shipper's connections.

    ``request`` (any task) queues a job and waits for it; the rest is pure (``queue``,
    ``next_request``, ``on_reply``, ``fail_all``: no await, no clock). The shipper's sender calls
    ``next_request`` once it has sent every committed transaction, and sends what it returns
    before awaiting anything else; its reader calls ``on_reply``. Replies come in request
    order, so jobs sent are a FIFO.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self._queued: deque[VerifyJob] = deque()
        self._sent: deque[VerifyJob] = deque()

    @property
    def wanted(self) -> bool:
        """A request waits to be sent."""
        return bool(self._queued)

    async def request(
        self, ranges: list[Range], *, timeout: float, wake: Callable[[], None]
    ) -> tuple[int, list[bytes], list[bytes]]:
        """Digests of ``ranges`` on both sides at one seq: ``(seq, source, target)``."""
        done = trio.Event()
        job = self.queue(ranges, notify=done.set)
        wake()
        with trio.move_on_after(timeout):
            await done.wait()
        if not job.done:
            if job in self._queued:
                self._queued.remove(job)
            # (a job already sent stays in _sent: its late reply still pairs with it)
            raise VerifyError(f"target {self.label} did not answer VERIFY_REQ in {timeout:g} s")
        if job.error:
            raise VerifyError(job.error)
        return job.seq, job.source, job.target

    def queue(self, ranges: Sequence[Range], *, notify: Callable[[], None]) -> VerifyJob:
        """A job for ``ranges``, to be sent by the next ``next_request`` (pure)."""
        job = VerifyJob(list(ranges), notify)
        self._queued.append(job)
        return job

    def next_request(self, volume: object) -> VerifyReq | None:
        """The next request, its source digests computed now (synchronously: at one seq)."""
        while self._queued:
            job = self._queued.popleft()
            try:
                job.source = range_digests(volume, job.ranges)
            except ValueError as exc:
                job.finish(str(exc))
                continue
            job.seq = volume.last_seq  # type: ignore[attr-defined]
            self._sent.append(job)
            return VerifyReq(job.seq, job.ranges)
        return None

    def on_reply(self, reply: VerifyReply) -> None:
        if not self._sent:
            raise ProtocolError(f"VERIFY_REPLY for seq {reply.seq} without a request")
        job = self._sent.popleft()
        if reply.seq != job.seq or len(reply.digests) != len(job.ranges):
            # The target was not at that seq (an empty reply): the caller retries.
            job.finish(
                f"target {self.label} answered VERIFY_REQ(seq {job.seq}, {len(job.ranges)} "
                f"ranges) with seq {reply.seq}, {len(reply.digests)} digests"
            )
        else:
            job.target = list(reply.digests)
            job.finish()

    def fail_all(self, why: str) -> None:
        """The connection ended: every waiting request fails (the caller may retry)."""
        for job in (*self._sent, *self._queued):
            job.finish(why)
        self._sent.clear()
        self._queued.clear()


@dataclass(slots=True)
class VerifyResult:
    """What ``verify_target`` found. ``differing`` is empty when the replica is identical."""

    target: str
    seq: int  # the sequence number of the first (whole-volume) comparison
    blocks: int
    rounds: int = 0
    differing: list[Range] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differing

    def describe(self) -> str:
        if self.identical:
            return f"{self.target}: identical at seq {self.seq} ({self.blocks} blocks)"
        n = sum(c for _, c in self.differing)
        where = ", ".join(f"{f}+{c}" for f, c in self.differing[:8])
        more = " ..." if len(self.differing) > 8 else ""
        return f"{self.target}: {n} block(s) differ at seq {self.seq}: {where}{more}"


class VerifyPeer(Protocol):
    """What ``verify_target`` needs of a shipper (mirrorfs.repl.shipper.Shipper is one)."""

    @property
    def volume(self) -> _Geometry: ...

    @property
    def label(self) -> str: ...

    async def verify_round(
        self, ranges: list[Range], *, timeout: float = 60.0
    ) -> tuple[int, list[bytes], list[bytes]]: ...


class VerifyRound:
    """The decisions of ``verify_target``, without I/O: which batch to compare next, when to
    retry, what was found.

    ``next_batch`` gives the ranges of the next VERIFY_REQ (None: done); the driver answers
    with ``on_answer`` (the seq and both sides' digests) or ``on_failure`` (the request
    failed: True means ask the same batch again, False that ``attempts`` are used up).
    """

    def __init__(
        self,
        label: str,
        block_size: int,
        block_count: int,
        ranges: Sequence[Range] | None = None,
        *,
        granularity: int = DEFAULT_GRANULARITY,
        fanout: int = DEFAULT_FANOUT,
        attempts: int = 3,
        round_bytes: int = ROUND_BYTES,
    ) -> None:
        self.max_blocks = max(1, round_bytes // block_size)
        if ranges is None:
            ranges = whole_volume(block_count, min(granularity * fanout * fanout, self.max_blocks))
        cut = [p for r in ranges for p in _cut(r, self.max_blocks)]
        self.result = VerifyResult(label, 0, sum(c for _, c in cut))
        self.attempts = attempts
        self._bisection = Bisection(cut, granularity=granularity, fanout=fanout)
        self._batches: deque[list[Range]] = deque()  # of this round, not answered yet
        self._differ: list[bool] = []
        self._failures = 0  # of the batch in front

    @property
    def done(self) -> bool:
        return self._bisection.done and not self._batches

    def next_batch(self) -> list[Range] | None:
        """The ranges of the next request (the same again after a failure); None: done."""
        if not self._batches:
            if self._bisection.done:
                self.result.differing = merge_ranges(self._bisection.found)
                self.result.rounds = self._bisection.rounds
                return None
            self._batches.extend(batches(self._bisection.todo, self.max_blocks))
            self._differ = []
        return self._batches[0]

    def on_answer(self, seq: int, mine: Sequence[bytes], theirs: Sequence[bytes]) -> None:
        """Both sides' digests of the batch in front, at ``seq``."""
        self._batches.popleft()
        self._failures = 0
        if not self.result.seq:
            self.result.seq = seq
        self._differ += [x != y for x, y in zip(mine, theirs, strict=True)]
        if not self._batches:
            self._bisection.feed(self._differ)

    def on_failure(self) -> bool:
        """The request for the batch in front failed; True: ask it again."""
        self._failures += 1
        return self._failures < self.attempts


async def verify_target(
    shipper: VerifyPeer,
    ranges: Sequence[Range] | None = None,
    *,
    granularity: int = DEFAULT_GRANULARITY,
    fanout: int = DEFAULT_FANOUT,
    timeout: float = 60.0,
    attempts: int = 3,
    round_bytes: int = ROUND_BYTES,
) -> VerifyResult:
    """Compare the target of ``shipper`` with the source, over the shipper's connection.

    ``ranges`` defaults to the whole volume. Each VERIFY_REQ covers at most ``round_bytes``
    (a bigger range is cut), so each is one seq on both sides; successive requests may be at
    later seqs. Raises VerifyError when the shipper is not streaming or the target does not
    answer in ``timeout`` seconds per request.
    """
    vol = shipper.volume
    m = VerifyRound(
        shipper.label,
        vol.block_size,
        vol.block_count,
        ranges,
        granularity=granularity,
        fanout=fanout,
        attempts=attempts,
        round_bytes=round_bytes,
    )
    while (batch := m.next_batch()) is not None:
        try:
            seq, mine, theirs = await shipper.verify_round(batch, timeout=timeout)
        except VerifyError as exc:
            if not m.on_failure():
                raise
            log.info("verify of %s: %s; retrying", shipper.label, exc)
            continue
        m.on_answer(seq, mine, theirs)
    result = m.result
    if result.differing:
        log.warning("verify: %s", result.describe())
    else:
        log.info("verify: %s", result.describe())
    return result
