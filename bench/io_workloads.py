"""The workloads of bench_io.py: fio jobs (psync engine) for the large-file I/O, Python
loops for the small files, the fsync latency and the replica's lag after a burst.

Each function runs one workload in a directory and returns what it measured as plain
numbers (bytes, seconds, counts), the raw material of bench_io.py's rounds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from common import BenchError, first_line, seq_write
from meters import percentile
from nodes import target_position, wait_caught_up

log = logging.getLogger(__name__)

KiB = 1 << 10
SMALL = 4 * KiB  # the small files and the fsync-latency writes
CATCHUP_TIMEOUT = 900.0


# ---- fio ------------------------------------------------------------------------------------


@dataclass(slots=True)
class FioRun:
    """One fio job: bytes moved, its runtime (end_fsync included), I/O count, fio's json."""

    nbytes: int
    seconds: float
    ios: int
    job: dict[str, Any]


def need_fio() -> str:
    """fio's path; BenchError with the fix when it is missing."""
    path = shutil.which("fio")
    if path is None:
        raise BenchError("fio not found (apt-get install fio, or bash examples/bootstrap.sh bench)")
    return path


def run_fio(
    path: str,
    rw: str,
    bs: int,
    size: int,
    *,
    seconds: float | None = None,
    time_based: bool = False,
    io_size: int | None = None,
    end_fsync: bool = False,
) -> FioRun:
    """One fio job on the file *path* with the psync engine; buffered, no fallocate.

    Writes refill their buffer with fresh random data for every I/O, so that no layer can
    compress or deduplicate them; ``overwrite=1`` lays a random-write file out (and fsyncs
    it) before the timed phase, so that random writes overwrite data as a database does.
    """
    argv = [
        need_fio(),
        "--name=" + rw,
        "--filename=" + path,
        "--ioengine=psync",
        "--thread",  # the job in a thread, not a forked child that a kill would miss
        f"--rw={rw}",
        f"--bs={bs}",
        f"--size={size}",
        "--fallocate=none",
        "--refill_buffers=1",
        "--output-format=json",
    ]
    if rw == "randwrite":
        argv.append("--overwrite=1")
    if seconds is not None:
        argv.append(f"--runtime={max(1, round(seconds * 1000))}ms")
    if time_based:
        argv.append("--time_based=1")
    if io_size is not None:
        argv.append(f"--io_size={io_size}")
    if end_fsync:
        argv.append("--end_fsync=1")
    limit = (seconds or 0) * 3 + 1800
    log.info("%s", " ".join(argv))
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        raise BenchError(f"fio {rw} did not finish in {limit:.0f} s") from None
    finally:
        # Also on Ctrl-C: fio must be gone (its files closed) before the mount is unmounted.
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"fio {rw} exited with {proc.returncode}: {first_line(err)}")
    try:
        job = json.loads(out[out.index("{") :])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        raise BenchError(f"fio {rw}: no json in its output: {first_line(out)}") from None
    if job.get("error"):
        raise BenchError(f"fio {rw}: job error {job['error']}")
    side = job["write" if "write" in rw else "read"]
    if not side["io_bytes"] or not side["runtime"]:
        raise BenchError(f"fio {rw}: no I/O done")
    # fio's runtime (ms) covers the job's I/O and its end_fsync, not the file's layout.
    return FioRun(side["io_bytes"], side["runtime"] / 1000, side["total_ios"], job)


# ---- small files ----------------------------------------------------------------------------


def _name(directory: str, i: int) -> str:
    return os.path.join(directory, f"f{i:06d}")


def create_files(directory: str, count: int, pool: bytes) -> float:
    """*count* files of 4 KiB (random data): open(O_CREAT|O_EXCL), write, close; seconds.

    Not fsynced: what an application that makes many files sees."""
    view = memoryview(pool)
    slots = len(pool) // SMALL
    start = time.perf_counter()
    for i in range(count):
        fd = os.open(_name(directory, i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            at = (i % slots) * SMALL
            os.write(fd, view[at : at + SMALL])
        finally:
            os.close(fd)
    return time.perf_counter() - start


def stat_files(directory: str, count: int) -> float:
    """os.stat of each file; seconds."""
    start = time.perf_counter()
    for i in range(count):
        if os.stat(_name(directory, i)).st_size != SMALL:
            raise BenchError(f"stat: {_name(directory, i)} is not {SMALL} bytes")
    return time.perf_counter() - start


def read_files(directory: str, count: int, pool: bytes) -> float:
    """open, read, close of each file (the caller made the caches cold); seconds.
    The content of the first and the last file is checked (untimed)."""
    start = time.perf_counter()
    for i in range(count):
        fd = os.open(_name(directory, i), os.O_RDONLY)
        try:
            n = len(os.read(fd, 2 * SMALL))
        finally:
            os.close(fd)
        if n != SMALL:
            raise BenchError(f"read: {n} bytes from {_name(directory, i)}, expected {SMALL}")
    elapsed = time.perf_counter() - start
    slots = len(pool) // SMALL
    for i in {0, count - 1} if count else set():
        with open(_name(directory, i), "rb") as f:
            at = (i % slots) * SMALL
            if f.read() != pool[at : at + SMALL]:
                raise BenchError(f"read: wrong data in {_name(directory, i)}")
    return elapsed


def delete_files(directory: str, count: int) -> float:
    """unlink of each file; seconds."""
    start = time.perf_counter()
    for i in range(count):
        os.unlink(_name(directory, i))
    return time.perf_counter() - start


# ---- fsync latency --------------------------------------------------------------------------


def fsync_latency(path: str, count: int, budget: float, pool: bytes) -> dict[str, float]:
    """Up to *count* rounds of a 4 KiB pwrite then fsync, appended to one new file (as a
    write-ahead log does), for at most *budget* seconds; p50/p99 in milliseconds."""
    view = memoryview(pool)
    slots = len(pool) // SMALL
    times: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        deadline = time.perf_counter() + budget
        for i in range(count):
            at = (i % slots) * SMALL
            t0 = time.perf_counter()
            os.pwrite(fd, view[at : at + SMALL], i * SMALL)
            os.fsync(fd)
            t1 = time.perf_counter()
            times.append(t1 - t0)
            if t1 > deadline:
                break
    finally:
        os.close(fd)
    ms = [t * 1000 for t in times]
    return {
        "fsync_n": len(ms),
        "fsync_s": sum(times),
        "fsync_p50": percentile(ms, 50),
        "fsync_p99": percentile(ms, 99),
    }


# ---- the replica after a burst --------------------------------------------------------------


def burst_lag(path: str, volume: str, size: int, pool: bytes) -> dict[str, float | None]:
    """*size* bytes in 1 MiB writes and one fsync on the source mount; right when the
    fsync returns, how far the target is behind (its ``lag_bytes`` / ``lag_txns`` in the
    source's status, as ``mirrorfs status --json`` prints it); then the time until its
    applied_seq reaches the source's committed_seq of that moment."""
    seconds = seq_write(path, size, pool)
    done = time.monotonic()
    committed, entry = target_position(volume)
    caught_up = wait_caught_up(volume, CATCHUP_TIMEOUT, "burst")
    lag_bytes = entry.get("lag_bytes")
    catchup = max(0.0, caught_up - done)
    return {
        "burst_bytes": size,
        "burst_s": seconds,
        "lag_bytes": lag_bytes,
        "lag_txns": entry.get("lag_txns"),
        "committed_seq": committed,
        "catchup_s": catchup,
    }
