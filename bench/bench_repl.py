"""Replication benchmark: a mirrorfs source and one target on this machine (127.0.0.1).

Three phases in one run, each on fresh volumes in one work directory, and one table:

  1. no target   ``mkfs``, ``mount``; the sequential write (--size of random data in 1 MiB
                 writes, then fsync); MB/s.
  2. one target  ``replica --mount``, ``mkfs``, ``mount --mirror`` (direct TCP):
                 - the same sequential write: MB/s, against phase 1 (target >= 0.85x); then
                   how long until the replica has applied all of it, and the shipper's
                   ``bytes_sent`` per byte written;
                 - lag: a paced writer (half the no-target rate, a tick every 20-50 ms: a
                   chunk of data and a new marker file, then fsync) and a reader polling the
                   replica mount for each marker every 2 ms; p50 and p99 of visible - commit;
                 - ``cp -a`` of the stdlib: ``bytes_sent`` per byte of file data.
  3. disconnect  the source mirrors to a replica through tests/netproxy.FaultProxy; under
                 the paced writer the link goes down (cut_all, then paused) for
                 --disconnect-seconds; after it comes back: the time until the target's
                 applied_seq reaches the source's committed_seq of that moment, and the
                 backlog's MB/s.

Positions and byte counters come from the nodes' control sockets (the same request as
``mirrorfs status --json``, without starting a Python process at every poll).

``--tls`` runs instead a comparison of the replicated throughput with TLS on the link and
without it, side by side in alternating rounds, medians (bench/repl_tls.py).

Usage: python bench/bench_repl.py [--quick] [--size 1G] [--disconnect-seconds 30]
       python bench/bench_repl.py --tls [--rounds 5] [--size 256M]
Run it as root (FUSE mounts).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common import (
    CHUNK,
    MB,
    POOL_BYTES,
    REPO_DIR,
    BenchError,
    MirrorfsCli,
    MirrorfsMount,
    ReplicaDaemon,
    Tree,
    check_content,
    copy_tree,
    count_entries,
    describe_environment,
    format_rows,
    human_size,
    log_tail,
    parse_size,
    scan_tree,
    seq_write,
    stdlib_tree,
    volume_size_for,
    work_directory,
)
from meters import (
    MARKER_TIMEOUT,
    POLL,
    RING_BYTES,
    TICK_MAX,
    TICK_MIN,
    MarkerReader,
    PacedWriter,
    SpanMeter,
    disk_of,
    percentile,
)
from nodes import (
    STATUS_POLL,
    commit_volume,
    node_status,
    target_position,
    wait_caught_up,
    wait_streaming,
)
from repl_tls import render as render_tls
from repl_tls import run_comparison, verdict

log = logging.getLogger(__name__)

TARGET_RATIO_WRITE = 0.85

PROXY_CHUNK = 256 * 1024  # the FaultProxy's read size (its default is 16 KiB)
WARMUP = 2.0  # seconds of paced writing before the link goes down
CATCHUP_TIMEOUT = 900.0


# ---- results --------------------------------------------------------------------------------


@dataclass(slots=True)
class Results:
    """Everything the run measured; None where a step did not run."""

    size: int
    solo_write_s: float | None = None
    mirrored_write_s: float | None = None
    drain_s: float | None = None  # fsync returned -> target applied everything
    drain_bytes: int | None = None  # log bytes not yet applied when the fsync returned
    write_wire: int | None = None  # shipper bytes_sent for the sequential write
    lag_s: list[float] = field(default_factory=list)  # commit -> visible on the replica
    lag_fsync_s: list[float] = field(default_factory=list)
    lag_rate: float | None = None  # offered bytes/s
    lag_achieved: float | None = None
    lag_late: int = 0
    cp_wire: int | None = None
    outage_s: float | None = None
    backlog_bytes: int | None = None
    backlog_txns: int | None = None
    reconnect_s: float | None = None  # link up -> the target's applied_seq moves again
    catchup_s: float | None = None  # link up -> applied_seq >= committed_seq at link up
    disconnect_rate: float | None = None  # the writer's offered bytes/s
    disconnect_achieved: float | None = None  # the writer's bytes/s over the whole phase
    errors: list[str] = field(default_factory=list)


# ---- phases ---------------------------------------------------------------------------------


def phase_solo(workdir: str, res: Results, pool: bytes, meter: SpanMeter) -> None:
    """1. The sequential write on a volume without a target."""
    cli = MirrorfsCli(os.path.join(workdir, "solo.log"))
    src = MirrorfsMount(cli, os.path.join(workdir, "solo-vol"), os.path.join(workdir, "solo-mnt"))
    try:
        src.mkfs(volume_size_for(int(res.size * 1.25) + (1 << 30)))
        src.mount()
        os.sync()
        log.info("no target: sequential write")
        with meter.span("seq write, no target", src.pid, None):
            res.solo_write_s = seq_write(os.path.join(src.mountpoint, "big"), res.size, pool)
    finally:
        src.unmount()


def phase_mirrored(
    workdir: str, res: Results, pool: bytes, tree: Tree, samples: int, meter: SpanMeter
) -> None:
    """2. The sequential write, lag and cp -a on a volume mirrored to a replica."""
    cli = MirrorfsCli(os.path.join(workdir, "mirrored.log"))
    rep = ReplicaDaemon(cli, os.path.join(workdir, "rep-vol"), os.path.join(workdir, "rep-mnt"))
    src = MirrorfsMount(cli, os.path.join(workdir, "src-vol"), os.path.join(workdir, "src-mnt"))
    try:
        rep.start()
        port = node_status(rep.volume)["listen"].rsplit(":", 1)[1]
        need = int(res.size * 1.25) + RING_BYTES + int(tree.size * 1.5) + (1 << 30)
        src.mkfs(volume_size_for(need))
        src.mount("--mirror", f"127.0.0.1:{port}")
        wait_streaming(src.volume, rep.mountpoint)
        assert rep.mountpoint is not None

        # The sequential write.
        os.sync()
        _, before = target_position(src.volume)
        log.info("one target: sequential write")
        with meter.span("seq write, one target", src.pid, rep.pid):
            res.mirrored_write_s = seq_write(os.path.join(src.mountpoint, "big"), res.size, pool)
        done = time.monotonic()
        _, behind = target_position(src.volume)
        res.drain_bytes = behind.get("lag_bytes")
        with meter.span("  then until the replica applied it", src.pid, rep.pid):
            res.drain_s = wait_caught_up(src.volume, CATCHUP_TIMEOUT, "sequential write") - done
        _, after = target_position(src.volume)
        res.write_wire = after["bytes_sent"] - before["bytes_sent"]
        check_content(os.path.join(rep.mountpoint, "big"), res.size, pool)

        # Lag under a steady write at about half the no-target rate.
        lag_dir = os.path.join(src.mountpoint, "lag")
        os.mkdir(lag_dir)
        commit_volume(lag_dir)
        wait_caught_up(src.volume, 60, "lag directory")
        if not os.path.isdir(os.path.join(rep.mountpoint, "lag")):
            raise BenchError("lag: the new directory is applied but not visible on the replica")
        assert res.lag_rate is not None
        writer = PacedWriter(lag_dir, res.lag_rate, pool, markers=True, ticks=samples)
        reader = MarkerReader(os.path.join(rep.mountpoint, "lag"), samples)
        log.info("lag: %d samples at %.1f MB/s", samples, res.lag_rate / MB)
        with meter.span("lag test (paced writer + reader)", src.pid, rep.pid):
            reader.start()
            writer.start()
            try:
                writer.join(samples * TICK_MAX * 20 + 60)
                reader.join(MARKER_TIMEOUT + 10)
            finally:
                reader.stop()
                writer.stop()
        if reader.error is not None:
            raise BenchError(f"lag reader: {reader.error}")
        seen = reader.seen_times
        res.lag_s = [s - c for s, c in zip(seen, writer.commit_times, strict=False)]
        res.lag_fsync_s = writer.fsync_seconds
        res.lag_late = writer.late_ticks
        if writer.commit_times:
            res.lag_achieved = writer.bytes_written / (writer.stopped - writer.started)
        if len(res.lag_s) < samples:
            raise BenchError(f"lag: {len(res.lag_s)} of {samples} markers seen on the replica")

        # cp -a: bytes on the wire for a compressible workload.
        wait_caught_up(src.volume, CATCHUP_TIMEOUT, "lag test")
        _, before = target_position(src.volume)
        log.info("one target: cp -a")
        with meter.span("cp -a, one target (to caught up)", src.pid, rep.pid):
            copy_tree(tree, os.path.join(src.mountpoint, "tree"))
            commit_volume(src.mountpoint)  # cp -a does not fsync
            wait_caught_up(src.volume, CATCHUP_TIMEOUT, "cp -a")
        _, after = target_position(src.volume)
        res.cp_wire = after["bytes_sent"] - before["bytes_sent"]
        copied = count_entries(os.path.join(rep.mountpoint, "tree"))
        if copied != tree.count:
            raise BenchError(f"cp -a: {copied} entries on the replica, {tree.count} in the source")
    finally:
        try:
            src.unmount()
        finally:
            rep.stop()


def phase_disconnect(
    workdir: str, res: Results, pool: bytes, outage: float, meter: SpanMeter
) -> None:
    """3. Catch-up after the link between source and target was down for *outage* s."""
    sys.path.insert(0, os.path.join(REPO_DIR, "tests"))
    import netproxy
    from netproxy import FaultProxy

    # With its 16 KiB reads, the Python proxy in our process capped the catch-up at about
    # 60 MB/s, using most of a CPU; in 256 KiB reads it costs a quarter of that.
    netproxy.CHUNK = PROXY_CHUNK

    cli = MirrorfsCli(os.path.join(workdir, "disconnect.log"))
    rep = ReplicaDaemon(cli, os.path.join(workdir, "dc-rep-vol"))
    src = MirrorfsMount(cli, os.path.join(workdir, "dc-src-vol"), os.path.join(workdir, "dc-mnt"))
    proxy: FaultProxy | None = None
    writer: PacedWriter | None = None
    try:
        rep.start()
        port = int(node_status(rep.volume)["listen"].rsplit(":", 1)[1])
        proxy = FaultProxy(listen_port=0, target=("127.0.0.1", port))
        proxy_port = proxy.start()
        src.mkfs(volume_size_for(RING_BYTES + (1 << 30)))
        src.mount("--mirror", f"127.0.0.1:{proxy_port}")
        wait_streaming(src.volume)
        assert res.disconnect_rate is not None
        writer = PacedWriter(src.mountpoint, res.disconnect_rate, pool, markers=False)
        writer.start()
        time.sleep(WARMUP)

        log.info("disconnect: link down for %.0f s", outage)
        with meter.span("link down (writer writing)", src.pid, rep.pid):
            down = time.monotonic()
            proxy.paused = True  # new connections hang too (their handshakes time out)
            proxy.cut_all()
            time.sleep(outage)
            if not writer.alive:
                writer.stop()  # raises the writer's error
                raise BenchError("the paced writer stopped during the outage")
            committed, target = target_position(src.volume)
            applied_at_up = target.get("applied_seq") or 0
            res.backlog_txns = committed - applied_at_up
            res.backlog_bytes = target.get("lag_bytes")
            up = time.monotonic()
            proxy.paused = False
        res.outage_s = up - down
        log.info("disconnect: link up; backlog %s bytes", res.backlog_bytes)

        with meter.span("catch-up (writer writing)", src.pid, rep.pid):
            deadline = up + CATCHUP_TIMEOUT
            while True:
                _, target = target_position(src.volume)
                now = time.monotonic()
                applied = target.get("applied_seq") or 0
                if res.reconnect_s is None and applied > applied_at_up:
                    res.reconnect_s = now - up
                if applied >= committed:
                    res.catchup_s = now - up
                    break
                if now > deadline:
                    raise BenchError(
                        f"catch-up: applied_seq {applied} of {committed} after "
                        f"{CATCHUP_TIMEOUT:.0f} s ({target.get('state')} {target.get('reason')})"
                    )
                time.sleep(STATUS_POLL)
        # Not waiting for the rest: when the writer outpaces the target, that never ends.
        writer.stop()
        res.disconnect_achieved = writer.bytes_written / (writer.stopped - writer.started)
        writer = None
    finally:
        try:
            if writer is not None:
                try:
                    writer.stop()
                except BenchError as exc:
                    log.warning("%s", exc)
            src.unmount()
        finally:
            try:
                rep.stop()
            finally:
                if proxy is not None:
                    proxy.stop()


# ---- the report -----------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


Row = tuple[str, str, str, str, str, str, str]


def render_table(res: Results, tree: Tree, tree_label: str, outage: float) -> str:
    """One row per figure: no target, one target, ratio, target, verdict."""
    size_mb = res.size / MB
    rows: list[Row] = []

    def add(label: str, unit: str, one: str, solo: str = "", ratio: str = "", goal: str = ""):
        rows.append((label, unit, solo, one, ratio, goal, ""))

    solo = size_mb / res.solo_write_s if res.solo_write_s else None
    one = size_mb / res.mirrored_write_s if res.mirrored_write_s else None
    ratio = one / solo if one and solo else None
    verdict = "n/a" if ratio is None else ("PASS" if ratio >= TARGET_RATIO_WRITE else "FAIL")
    rows.append(
        (
            f"seq write {human_size(res.size)} + fsync",
            "MB/s",
            _fmt(solo),
            _fmt(one),
            "" if ratio is None else f"{ratio:.2f}x",
            f">= {TARGET_RATIO_WRITE:.2f}x",
            verdict,
        )
    )
    drain_mb = None if res.drain_bytes is None else res.drain_bytes / MB
    add("  replica behind when the fsync returned", "MB", _fmt(drain_mb))
    add("  then applied all of it after", "s", _fmt(res.drain_s, 2))
    drain_rate = drain_mb / res.drain_s if drain_mb and res.drain_s else None
    add("  = the replica's rate, no other load", "MB/s", _fmt(drain_rate))
    lag_ms = [v * 1000 for v in res.lag_s]
    fsync_ms = [v * 1000 for v in res.lag_fsync_s]
    add("lag commit -> visible on replica, p50", "ms", _fmt(percentile(lag_ms, 50)))
    add("lag commit -> visible on replica, p99", "ms", _fmt(percentile(lag_ms, 99)))
    add(f"  max of {len(lag_ms)} samples", "ms", _fmt(max(lag_ms) if lag_ms else None))
    tail = lag_ms[-max(1, len(lag_ms) // 10) :] if lag_ms else []
    add("  p50 of the last 10% (growing lag?)", "ms", _fmt(percentile(tail, 50)))
    offered = None if res.lag_rate is None else res.lag_rate / MB
    achieved = None if res.lag_achieved is None else res.lag_achieved / MB
    add("  paced writer offered", "MB/s", _fmt(offered))
    add("  paced writer achieved", "MB/s", _fmt(achieved))
    add("  fsync on the source meanwhile, p50", "ms", _fmt(percentile(fsync_ms, 50)))
    add("  fsync on the source meanwhile, p99", "ms", _fmt(percentile(fsync_ms, 99)))
    backlog_mb = None if res.backlog_bytes is None else res.backlog_bytes / MB
    add(f"catch-up after {outage:g} s link down: time", "s", _fmt(res.catchup_s, 2))
    rate = backlog_mb / res.catchup_s if backlog_mb is not None and res.catchup_s else None
    add("  backlog / catch-up time", "MB/s", _fmt(rate))
    add("  backlog at link up", "MB", _fmt(backlog_mb))
    add("  backlog at link up", "txns", _fmt(res.backlog_txns, 0))
    achieved = None if res.disconnect_achieved is None else res.disconnect_achieved / MB
    add("  paced writer achieved, down and catch-up", "MB/s", _fmt(achieved))
    add("  link up -> first transaction applied", "s", _fmt(res.reconnect_s, 2))

    def per_byte(wire: int | None, written: float) -> str:
        return "n/a" if wire is None or not written else f"{wire / written:.3f}"

    add(
        f"wire bytes / byte written, {human_size(res.size)} random",
        "B/B",
        per_byte(res.write_wire, res.size),
    )
    add(
        f"wire bytes / byte written, cp -a {tree_label}",
        "B/B",
        per_byte(res.cp_wire, tree.size),
    )

    header: Row = ("measurement", "unit", "no target", "one target", "ratio", "target", "")
    lines = [header, *rows]
    return format_rows(lines, right=range(2, 5))


def render_spans(meter: SpanMeter) -> str:
    """Where the time went: CPU seconds per process and the disk, per span of the run."""
    disk = meter.disk or "disk"
    header = ("span", "wall s", "CPU s: source", "replica", "bench", f"{disk} MB written", "busy")
    lines = [header]
    for sp in meter.spans:
        lines.append(
            (
                sp.label,
                f"{sp.wall:.1f}",
                _fmt(sp.source),
                _fmt(sp.replica),
                _fmt(sp.bench),
                _fmt(None if sp.disk_written is None else sp.disk_written / MB, 0),
                "n/a" if sp.disk_busy is None else f"{min(sp.disk_busy, 1.0):.0%}",
            )
        )
    return format_rows(lines, right=range(1, len(header)), rule=False)


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the three phases, print the table; 1 if any phase failed."""
    parser = argparse.ArgumentParser(
        description="Benchmark mirrorfs replication to one target on this machine."
    )
    parser.add_argument("--size", default=None, help="sequential write size (default 1G)")
    parser.add_argument(
        "--disconnect-seconds",
        type=float,
        default=None,
        help="how long the link is down (default 30; 5 with --quick)",
    )
    parser.add_argument(
        "--samples", type=int, default=None, help="lag samples (default 400; 100 with --quick)"
    )
    parser.add_argument(
        "--load-rate",
        type=float,
        default=None,
        metavar="MB/s",
        help="paced writer rate (default: half the no-target sequential write rate)",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="parent of the run's temp directory (default: system temp dir)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 64M, 100 lag samples, 5 s disconnect, a small part of the stdlib",
    )
    parser.add_argument("--tree", default=None, help="directory to cp -a instead of the stdlib")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="only compare replication with TLS and without, in alternating rounds",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="--tls rounds (default 5; 2 with --quick)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s: %(message)s",
    )
    if args.tls:
        return main_tls(args)
    size = parse_size(args.size or ("64M" if args.quick else "1G"))
    outage = args.disconnect_seconds
    if outage is None:
        outage = 5.0 if args.quick else 30.0
    samples = args.samples if args.samples is not None else (100 if args.quick else 400)
    if size <= 0 or outage <= 0 or samples <= 0:
        print("bench_repl: --size, --disconnect-seconds and --samples must be > 0", file=sys.stderr)
        return 2

    tree_root, tree_entries, tree_label = stdlib_tree(args.quick, args.tree)
    tree = scan_tree(tree_root, tree_entries)
    pool = os.urandom(min(POOL_BYTES, max(size, CHUNK)))
    res = Results(size)
    load_start = os.getloadavg()[0]
    with work_directory(args.workdir, args.keep) as workdir:
        env_lines = describe_environment(workdir)
        meter = SpanMeter(disk_of(workdir))

        def run(name: str, fn: Callable[[], None]) -> bool:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            try:
                fn()
                return True
            except (BenchError, OSError) as exc:
                res.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                print(f"  {name}: {exc}", file=sys.stderr)
                log_file = os.path.join(workdir, name.split()[0] + ".log")
                print(log_tail(log_file), file=sys.stderr)
                return False

        run("solo (no target)", lambda: phase_solo(workdir, res, pool, meter))
        if args.load_rate is not None:
            rate = args.load_rate * MB
        elif res.solo_write_s:
            rate = size / res.solo_write_s / 2
        else:
            rate = 20 * MB
            res.errors.append("no no-target rate: the paced writer ran at 20 MB/s")
        res.lag_rate = res.disconnect_rate = rate
        run(
            "mirrored (one target)",
            lambda: phase_mirrored(workdir, res, pool, tree, samples, meter),
        )
        run("disconnect", lambda: phase_disconnect(workdir, res, pool, outage, meter))

    print()
    print("mirrorfs replication benchmark" + (" (--quick)" if args.quick else ""))
    for line in env_lines:
        print(line)
    print(
        f"load average (1 min): {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end, "
        f"on {os.cpu_count()} CPUs"
    )
    print(
        "target: a replica daemon on 127.0.0.1 (same machine, same disk); phases 1-2 direct "
        f"TCP, phase 3 through tests/netproxy.py (in this process, {PROXY_CHUNK // 1024} KiB "
        "reads)"
    )
    print(
        f"paced writer: {rate / MB:.1f} MB/s offered (half the no-target rate unless "
        f"--load-rate), ticks of {TICK_MIN * 1000:.0f}-{TICK_MAX * 1000:.0f} ms, fsync per "
        f"tick; lag reader polls the replica mount every {POLL * 1000:.0f} ms"
    )
    shown = ", ".join(tree_entries) if len(tree_entries) < 8 else "all but site-packages"
    print(f"cp -a source: {tree_root} [{shown}], {tree.count} entries, {tree.size / MB:.1f} MB")
    print("MB = 10^6 bytes; wire bytes = the shipper's bytes_sent (TXN frames and headers)")
    print()
    print(render_table(res, tree, tree_label, outage))
    if res.lag_late:
        print(f"note: {res.lag_late} of the lag test's ticks started late (fsync too slow)")
    if meter.spans:
        print()
        print(render_spans(meter))
    for err in res.errors:
        print(f"error: {err}")
    return 1 if res.errors else 0


def main_tls(args: argparse.Namespace) -> int:
    """``--tls``: the comparison of bench/repl_tls.py, its table and its verdict."""
    size = parse_size(args.size or ("32M" if args.quick else "256M"))
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    if size <= 0 or rounds <= 0:
        print("bench_repl: --size and --rounds must be > 0", file=sys.stderr)
        return 2
    pool = os.urandom(min(POOL_BYTES, max(size, CHUNK)))
    load_start = os.getloadavg()[0]
    with work_directory(args.workdir, args.keep) as workdir:
        env_lines = describe_environment(workdir)
        cmp = run_comparison(workdir, size, rounds, pool)
    print()
    print("mirrorfs replication, TLS against plain" + (" (--quick)" if args.quick else ""))
    for line in env_lines:
        print(line)
    print(
        f"load average (1 min): {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end, "
        f"on {os.cpu_count()} CPUs"
    )
    print(
        f"each measurement: fresh source and replica daemon (no replica mount) on 127.0.0.1, "
        f"a {human_size(size)} burst of random data in 1 MiB writes + fsync, until the "
        f"replica applied it; {rounds} rounds, order alternating; medians"
    )
    print("MB = 10^6 bytes; replicated throughput = burst / (write + catch-up)")
    print()
    print(render_tls(cmp))
    print()
    print(verdict(cmp))
    for err in cmp.errors:
        print(f"error: {err}")
    return 1 if cmp.errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything was cleaned up on the way out
        print("bench_repl: interrupted", file=sys.stderr)
        sys.exit(130)
