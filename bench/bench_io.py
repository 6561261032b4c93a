"""I/O benchmark of issue 8: mirrorfs against a plain directory and two FUSE passthroughs.

Runs side by side, in one run, in alternating rounds (default 3; medians), on
  plain            a plain local directory,
  passthrough_ll   libfuse's C low-level passthrough example, built here from
                   /usr/share/doc/libfuse3-dev/examples/passthrough_ll.c, its defaults,
  passthrough      bench/passthrough.py (pyfuse3),
  mirrorfs         a mirrorfs volume,
  mirrorfs+1       a mirrorfs volume mirrored to a replica daemon on 127.0.0.1,
the workloads: sequential 1 MiB writes with fsync at the end; cold sequential read;
4 KiB random writes for --seconds with fsync at the end; cold 4 KiB random reads; small
files created, stat'ed, read cold, deleted; 4 KiB write+fsync latency p50/p99; and for
mirrorfs+1 the replica's lag when a burst's fsync returns and its catch-up time. fio
(psync engine) where it fits, a Python loop elsewhere. One table, with the ratios
mirrorfs / C passthrough and (mirrorfs + 1 target) / mirrorfs against issue 8's targets.

Usage: python bench/bench_io.py [--quick] [--rounds 3] [--targets a,b] [--json FILE]
As root (FUSE mounts, echo 3 > /proc/sys/vm/drop_caches). See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from common import (
    POOL_BYTES,
    REPO_DIR,
    BenchError,
    MiB,
    describe_environment,
    log_tail,
    parse_size,
    work_directory,
)
from io_report import derive, medians, render, render_cpu, render_tls
from io_targets import (
    CPassthroughTarget,
    MirroredTarget,
    TlsMirroredTarget,
    build_passthrough_ll,
)
from io_workloads import (
    SMALL,
    burst_lag,
    create_files,
    delete_files,
    fsync_latency,
    need_fio,
    read_files,
    run_fio,
    stat_files,
)
from meters import cpu_seconds
from targets import MirrorfsTarget, PassthroughTarget, PlainTarget, Target

log = logging.getLogger(__name__)

TARGETS = ("plain", "passthrough_ll", "passthrough", "mirrorfs", "mirrorfs+1", "mirrorfs+1tls")
KiB4 = 4 << 10

# Full run / --quick (an explicit option wins over both).
DEFAULTS = {
    "size": ("512M", "16M"),
    "rand_size": ("64M", "4M"),
    "seconds": (20.0, 1.0),
    "files": (5000, 200),
    "fsyncs": (1000, 50),
    "burst": ("1G", "32M"),
    "rounds": (3, 1),
}


@dataclass(slots=True)
class Config:
    """The sizes of one run."""

    size: int
    rand_size: int
    seconds: float
    files: int
    fsyncs: int
    burst: int
    rounds: int
    quick: bool
    targets: list[str]
    mkfs_args: list[str] = field(default_factory=list)

    def volume_bytes(self) -> int:
        """What a mirrorfs volume must hold at most (no file is deleted before the end)."""
        small = self.files * 2 * SMALL + self.fsyncs * SMALL
        return int((self.size + self.rand_size + self.burst + small) * 1.25) + (1 << 30)


# ---- one round on one target ----------------------------------------------------------------


def make_target(name: str, workdir: str, cfg: Config, ll_binary: str | None) -> Target:
    """A fresh target of kind *name* in *workdir*."""
    if name == "plain":
        return PlainTarget(workdir)
    if name == "passthrough_ll":
        assert ll_binary is not None
        return CPassthroughTarget(workdir, ll_binary)
    if name == "passthrough":
        return PassthroughTarget(workdir)
    if name == "mirrorfs":
        return MirrorfsTarget(workdir, cfg.volume_bytes(), cfg.mkfs_args)
    if name == "mirrorfs+1tls":
        return TlsMirroredTarget(workdir, cfg.volume_bytes(), cfg.mkfs_args)
    return MirroredTarget(workdir, cfg.volume_bytes(), cfg.mkfs_args)


def run_workloads(t: Target, cfg: Config, pool: bytes, m: dict[str, Any], raw: dict) -> None:
    """Every workload on the set-up target *t*; figures into *m*, fio's jobs into *raw*.

    Each timed step starts quiesced (the previous step's data on disk and, for mirrorfs+1,
    applied by the replica); a cold step starts after a remount and drop_caches."""
    root = t.root
    replica = t.replica if isinstance(t, MirroredTarget) else None

    @contextlib.contextmanager
    def step(key: str) -> Iterator[None]:
        # CPU seconds of the FUSE server (and the replica) over the step: is it CPU-bound?
        log.info("%s: %s", t.name, key)
        pids = (t.pid, replica.pid if replica else None)
        before = [cpu_seconds(p) for p in pids]
        t0 = time.perf_counter()
        yield
        m[f"{key}_step_s"] = time.perf_counter() - t0
        for label, pid, b in zip(("server", "replica"), pids, before, strict=True):
            a = cpu_seconds(pid)
            if a is not None and b is not None:
                m[f"{key}_cpu_{label}"] = a - b

    def fio(key: str, *args: Any, **kwargs: Any) -> None:
        with step(key):
            run = run_fio(*args, **kwargs)
        m[key] = run.nbytes / MiB / run.seconds
        m[key + "_bytes"], m[key + "_s"], m[key + "_ios"] = run.nbytes, run.seconds, run.ios
        raw[key] = run.job

    def loop(key: str, count: int, fn: Callable[[], float]) -> None:
        t.quiesce()
        with step(key):
            m[key + "_s"] = fn()
        m[key] = count / m[key + "_s"]

    big = os.path.join(root, "big")
    t.quiesce()
    fio("seq_write", big, "write", MiB, cfg.size, end_fsync=True)
    t.remount([])
    fio("seq_read", big, "read", MiB, cfg.size)
    if m["seq_read_bytes"] != cfg.size:
        raise BenchError(f"seq read: {m['seq_read_bytes']} bytes, expected {cfg.size}")
    t.remount([])
    # Each 4 KiB block at most once (fio's random map): half the file, or --seconds.
    fio("rand_read", big, "randread", KiB4, cfg.size, seconds=cfg.seconds, io_size=cfg.size // 2)
    t.quiesce()
    rand = os.path.join(root, "rand")
    fio(
        "rand_write",
        rand,
        "randwrite",
        KiB4,
        cfg.rand_size,
        seconds=cfg.seconds,
        time_based=True,
        end_fsync=True,
    )

    small = os.path.join(root, "small")
    os.mkdir(small)
    n = cfg.files
    loop("create", n, lambda: create_files(small, n, pool))
    loop("stat", n, lambda: stat_files(small, n))
    t.remount([])
    with step("read_small"):
        m["read_small_s"] = read_files(small, n, pool)
    m["read_small"] = n / m["read_small_s"]
    loop("delete", n, lambda: delete_files(small, n))
    os.rmdir(small)

    t.quiesce()
    with step("fsync"):
        m.update(fsync_latency(os.path.join(root, "fsync-lat"), cfg.fsyncs, cfg.seconds, pool))

    if replica is not None:
        assert isinstance(t, MirroredTarget)
        t.quiesce()
        with step("burst"):
            m.update(burst_lag(os.path.join(root, "burst"), t.mfs.volume, cfg.burst, pool))


def run_round(
    number: int, name: str, parent: str, cfg: Config, pool: bytes, ll: str | None, keep: bool
) -> dict[str, Any]:
    """One round of every workload on a fresh target *name* in its own directory; always
    torn down; the directory is removed afterwards unless *keep*."""
    workdir = os.path.join(parent, f"r{number}-{name.replace('+', '-plus')}")
    os.mkdir(workdir)
    t = make_target(name, workdir, cfg, ll)
    result: dict[str, Any] = {"round": number, "target": name, "metrics": {}, "fio": {}}
    errors: list[str] = []
    start = time.monotonic()
    try:
        t.setup()
        run_workloads(t, cfg, pool, result["metrics"], result["fio"])
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        try:
            t.teardown()
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            errors.append(f"teardown: {type(exc).__name__}: {exc}")
        logs = [t.log_path]
        if isinstance(t, MirroredTarget):
            logs.append(t.replica.cli.log_path)
        for err in errors:
            print(f"  round {number} {name}: {err}", file=sys.stderr)
        for path in logs if errors else []:
            if path:
                print(log_tail(path), file=sys.stderr)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    m = result["metrics"]
    if t.peak_rss_kib:
        m["rss_mb"] = t.peak_rss_kib * 1024 / 1e6
    if isinstance(t, MirroredTarget) and t.replica_rss_kib:
        m["rep_rss_mb"] = t.replica_rss_kib * 1024 / 1e6
    derive(m)
    result["seconds"] = time.monotonic() - start
    result["errors"] = errors
    return result


def _plain_json(value: Any) -> Any:
    """Infinity (a replica that kept up) as the string "inf": strict JSON."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_json(v) for v in value]
    return value


# ---- the run --------------------------------------------------------------------------------


def preflight(cfg: Config) -> str | None:
    """One-line errors for what the run cannot do without; the C passthrough's binary."""
    if os.geteuid() != 0:
        raise BenchError("must run as root (FUSE mounts, echo 3 > /proc/sys/vm/drop_caches)")
    need_fio()
    fuse_targets = [n for n in cfg.targets if n != "plain"]
    if fuse_targets:
        if not os.path.exists("/dev/fuse"):
            raise BenchError("/dev/fuse does not exist (modprobe fuse)")
        if shutil.which("fusermount3") is None:
            raise BenchError("fusermount3 not found (apt-get install fuse3)")
    if "passthrough" in cfg.targets or any(n.startswith("mirrorfs") for n in cfg.targets):
        try:
            import pyfuse3  # noqa: F401
        except ImportError:
            raise BenchError(f"pyfuse3 not importable by {sys.executable}") from None
    return build_passthrough_ll() if "passthrough_ll" in cfg.targets else None


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(
        description="Issue 8's I/O benchmark: mirrorfs against a plain directory and the C "
        "and Python FUSE passthroughs, alternating rounds, medians."
    )
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 round")
    p.add_argument("--rounds", type=int, help="rounds (default 3; 1 with --quick)")
    p.add_argument("--targets", default=",".join(TARGETS[:-1]), help="comma-separated subset")
    p.add_argument(
        "--tls",
        action="store_true",
        help="also run mirrorfs+1 with TLS on the link (mirrorfs+1tls) beside mirrorfs+1",
    )
    p.add_argument("--size", help="sequential file (default 512M)")
    p.add_argument("--rand-size", help="random-write file (default 64M)")
    p.add_argument("--seconds", type=float, help="random-write/read time (default 20)")
    p.add_argument("--files", type=int, help="small files (default 5000)")
    p.add_argument("--fsyncs", type=int, help="write+fsync samples (default 1000)")
    p.add_argument("--burst", help="mirrorfs+1 burst before the lag is read (default 1G)")
    p.add_argument("--json", metavar="FILE", help="write every round's raw figures here")
    p.add_argument("--workdir", help="parent of the run's temp directory (default: /tmp)")
    p.add_argument("--mkfs-arg", action="append", default=[], help="for mirrorfs mkfs")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("-v", "--verbose", action="store_true", help="log each step")
    a = p.parse_args(argv)

    def pick(key: str) -> Any:
        given = getattr(a, key)
        return given if given is not None else DEFAULTS[key][1 if a.quick else 0]

    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    if a.tls:
        targets += ["mirrorfs+1", "mirrorfs+1tls"]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        p.error(f"unknown targets {unknown}; choose from {','.join(TARGETS)}")
    cfg = Config(
        size=parse_size(pick("size")),
        rand_size=parse_size(pick("rand_size")),
        seconds=pick("seconds"),
        files=pick("files"),
        fsyncs=pick("fsyncs"),
        burst=parse_size(pick("burst")),
        rounds=pick("rounds"),
        quick=a.quick,
        targets=[t for t in TARGETS if t in targets],
        mkfs_args=a.mkfs_arg,
    )
    if min(cfg.size, cfg.rand_size, cfg.burst) < MiB or cfg.seconds <= 0:
        p.error("--size, --rand-size and --burst must be at least 1M, --seconds > 0")
    if cfg.files < 1 or cfg.fsyncs < 1 or cfg.rounds < 1:
        p.error("--files, --fsyncs and --rounds must be at least 1")
    return cfg, a


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def fio_version() -> str:
    proc = subprocess.run([need_fio(), "--version"], capture_output=True, text=True)
    return proc.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    """Run every round, print the table; 1 if any round failed, 2 if it could not start."""
    cfg, args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s: %(message)s",
    )
    # Ctrl-C and SIGTERM unwind through every finally (unmounts, children), also when the
    # shell that started us in the background made SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    # nodes.py reads the control sockets with this checkout's mirrorfs.
    sys.path.insert(1, REPO_DIR)
    try:
        ll_binary = preflight(cfg)
    except BenchError as exc:
        print(f"bench_io: {exc}", file=sys.stderr)
        return 2
    pool = os.urandom(POOL_BYTES)
    rounds: list[dict[str, Any]] = []
    load_start = os.getloadavg()[0]
    started = time.time()
    with work_directory(args.workdir, args.keep) as workdir:
        env_lines = describe_environment(workdir)
        for number in range(1, cfg.rounds + 1):
            # Alternating order (forward, backward, ...): a drift of the machine during
            # the run weighs on every target alike.
            order = cfg.targets if number % 2 else cfg.targets[::-1]
            for name in order:
                print(f"round {number}/{cfg.rounds}: {name} ...", file=sys.stderr, flush=True)
                rounds.append(run_round(number, name, workdir, cfg, pool, ll_binary, args.keep))
    med = medians(rounds, cfg.targets)
    load_end = os.getloadavg()[0]

    print()
    print("mirrorfs I/O benchmark (issue 8)" + (" --quick" if cfg.quick else ""))
    for line in env_lines:
        print(line)
    print(
        f"load average (1 min): {load_start:.2f} at start, {load_end:.2f} at end, on "
        f"{os.cpu_count()} CPUs; {time.time() - started:.0f} s"
    )
    print(
        f"{cfg.rounds} round(s), targets alternating forward/backward, medians; "
        f"{fio_version()} --ioengine=psync, buffered; cold = remount + drop_caches"
    )
    if ll_binary:
        print(f"C ll = libfuse passthrough_ll (gcc -O2), defaults: {ll_binary}")
    print("pt.py = bench/passthrough.py; mfs+1 = mirrorfs + replica on 127.0.0.1 (mounted)")
    if "mirrorfs+1tls" in cfg.targets:
        print("mfs+1 TLS = mfs+1 with --tls-cert/--tls-key/--tls-ca on both (TLS 1.3, P-256)")
    print("MiB = 2^20 bytes, MB = 10^6; ratios of medians; latency: lower is better")
    print()
    print(render(med, cfg.targets, cfg))
    tls_table = render_tls(med, cfg.targets)
    if tls_table:
        print()
        print("replication with TLS (mfs+1 TLS) against without (mfs+1), medians:")
        print(tls_table)
    cpu_table = render_cpu(med, cfg.targets)
    if cpu_table:
        print()
        print("CPU of the FUSE server (+ the replica daemon) per second of each step, medians:")
        print(cpu_table)
    failed = [r for r in rounds if r["errors"]]
    for r in failed:
        for err in r["errors"]:
            print(f"error (round {r['round']} {r['target']}): {err}")
    if args.json:
        report = {
            "config": asdict(cfg),
            "environment": env_lines,
            "load_average": [load_start, load_end],
            "passthrough_ll": ll_binary,
            "rounds": rounds,
            "medians": med,
        }
        with open(args.json, "w") as f:
            json.dump(_plain_json(report), f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # every mount and child was cleaned up on the way out
        print("bench_io: interrupted", file=sys.stderr)
        sys.exit(130)
