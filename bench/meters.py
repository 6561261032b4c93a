"""The load and the meters of bench_repl.py: the paced writer on the source mount, the
marker reader on the replica mount (lag: commit -> visible), percentiles, and the CPU and
disk accounting of each span."""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from common import CHUNK, BenchError, MiB

TICK_MIN = 0.020  # the paced writer's tick: uniform in [TICK_MIN, TICK_MAX] seconds
TICK_MAX = 0.050
POLL = 0.002  # the lag reader's poll interval
RING_BYTES = 256 * MiB  # the paced writer overwrites one file of this size, round and round
MARKER_TIMEOUT = 60.0  # a marker not visible on the replica after this long: error


# ---- CPU and disk accounting ---------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of *pid* (all its threads), or None if it is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def disk_of(path: str) -> str | None:
    """The /proc/diskstats name of the block device holding *path* (None: not a disk)."""
    real = os.path.realpath(path)
    best, device = "", None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split()[4].encode().decode("unicode_escape")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, device = point, right.split()[1]
    if device is None or not device.startswith("/dev/"):
        return None
    return os.path.basename(os.path.realpath(device))


def disk_counters(name: str | None) -> tuple[int, int] | None:
    """(bytes written, milliseconds busy) of disk *name* so far, from /proc/diskstats."""
    if name is None:
        return None
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if fields[2] == name:
                return int(fields[9]) * 512, int(fields[12])
    return None


@dataclass(slots=True)
class Span:
    """What the source, the replica, this process and the disk did over a wall span."""

    label: str
    wall: float
    source: float | None  # CPU seconds
    replica: float | None
    bench: float
    disk_written: int | None  # bytes
    disk_busy: float | None  # fraction of the wall time with I/O in flight


class SpanMeter:
    """Records spans: ``with meter.span(label, source_pid, replica_pid): ...``."""

    def __init__(self, disk: str | None) -> None:
        self.disk = disk
        self.spans: list[Span] = []

    @contextlib.contextmanager
    def span(self, label: str, source: int | None, replica: int | None) -> Iterator[None]:
        t0, src0, rep0 = os.times(), cpu_seconds(source), cpu_seconds(replica)
        disk0, wall0 = disk_counters(self.disk), time.monotonic()
        try:
            yield
        finally:
            wall = time.monotonic() - wall0
            t1, src1, rep1 = os.times(), cpu_seconds(source), cpu_seconds(replica)
            disk1 = disk_counters(self.disk)
            self.spans.append(
                Span(
                    label,
                    wall,
                    None if src0 is None or src1 is None else src1 - src0,
                    None if rep0 is None or rep1 is None else rep1 - rep0,
                    t1[0] + t1[1] - t0[0] - t0[1],
                    None if disk0 is None or disk1 is None else disk1[0] - disk0[0],
                    None if disk0 is None or disk1 is None else (disk1[1] - disk0[1]) / 1000 / wall,
                )
            )


# ---- the paced writer and the lag reader ----------------------------------------------------


class PacedWriter:
    """Writes at *rate* bytes/s on a source mount, in ticks of 20-50 ms, until stopped.

    A tick: ``rate * tick`` bytes of random data into a ring file (overwritten round and
    round, so that the volume does not fill), with *markers* a new 24-byte file
    ``m{k:06d}``, then fsync of both. ``commit_times[k]`` is when tick k's fsyncs returned.
    A tick that starts late is not made up for.
    """

    def __init__(
        self, directory: str, rate: float, pool: bytes, *, markers: bool, ticks: int | None = None
    ) -> None:
        self.directory = directory
        self.rate = rate
        self.pool = memoryview(pool)
        self.markers = markers
        self.ticks = ticks
        self.commit_times: list[float] = []
        self.fsync_seconds: list[float] = []
        self.bytes_written = 0
        self.late_ticks = 0
        self.error: BaseException | None = None
        self.started = self.stopped = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="PacedWriter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current tick; re-raise what went wrong in the thread."""
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise BenchError(f"paced writer: {type(self.error).__name__}: {self.error}")

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._write()
        except BaseException as exc:  # reported by stop()
            self.error = exc
        self.stopped = time.monotonic()

    def _write(self) -> None:
        rng = random.Random(1)
        ring = os.open(os.path.join(self.directory, "ring"), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            pos = 0
            k = 0
            self.started = next_tick = time.monotonic()
            while not self._stop.is_set() and (self.ticks is None or k < self.ticks):
                interval = rng.uniform(TICK_MIN, TICK_MAX)
                next_tick += interval
                n = int(self.rate * interval)
                while n > 0:
                    piece = min(n, RING_BYTES - pos, CHUNK)
                    at = (self.bytes_written % len(self.pool)) & ~4095
                    piece = min(piece, len(self.pool) - at)
                    self.bytes_written += os.pwrite(ring, self.pool[at : at + piece], pos)
                    pos = (pos + piece) % RING_BYTES
                    n -= piece
                t0 = time.monotonic()
                marker = None
                if self.markers:
                    path = os.path.join(self.directory, f"m{k:06d}")
                    marker = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    os.write(marker, f"{k:08d} {time.time():.4f}\n".encode()[:24].ljust(24))
                try:
                    os.fsync(ring)
                    if marker is not None:
                        os.fsync(marker)
                finally:
                    if marker is not None:
                        os.close(marker)
                now = time.monotonic()
                self.commit_times.append(now)
                self.fsync_seconds.append(now - t0)
                k += 1
                if now < next_tick:
                    self._stop.wait(next_tick - now)
                else:
                    self.late_ticks += 1
                    next_tick = now
        finally:
            os.close(ring)


class MarkerReader:
    """Polls a replica mount every 2 ms for the writer's markers m000000, m000001, ...

    ``seen_times[k]`` is when marker k was first seen with its content (stat: size > 0).
    """

    def __init__(self, directory: str, count: int) -> None:
        self.directory = directory
        self.count = count
        self.seen_times: list[float] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="MarkerReader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            for k in range(self.count):
                path = os.path.join(self.directory, f"m{k:06d}")
                deadline = time.monotonic() + MARKER_TIMEOUT
                while True:
                    try:
                        if os.stat(path).st_size > 0:
                            self.seen_times.append(time.monotonic())
                            break
                    except FileNotFoundError:
                        pass
                    if self._stop.is_set():
                        return
                    if time.monotonic() > deadline:
                        raise BenchError(f"{path} not visible after {MARKER_TIMEOUT:.0f} s")
                    time.sleep(POLL)
        except BaseException as exc:
            self.error = exc


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of *values*; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]
