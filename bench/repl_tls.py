"""``bench_repl.py --tls``: replication with TLS against replication without, side by side.

One run, ``rounds`` rounds that alternate the order (plain then TLS, TLS then plain, ...),
so that a machine that gets busier or quieter during the run weighs on both alike. Each
measurement starts from nothing: a ``mirrorfs replica DIR --listen 127.0.0.1:0`` daemon
(no mount: the link, the replica's log and its applier are what is measured), ``mkfs`` and
``mount --mirror`` of a fresh source, until the target streams; then ``sync``, and

  - a burst: ``size`` bytes of random data (incompressible, so lz4 does not hide the
    cipher) written in 1 MiB writes and fsynced on the source,
  - until the replica has applied all of it (its ``applied_seq`` in the source's status).

Figures per measurement: the source's write MB/s, the replicated MB/s (size / (write +
catch-up)), the catch-up after the fsync, the shipper's bytes on the wire, and the CPU
seconds of both daemons per GiB replicated. Medians over the rounds; TLS / plain; issue
9's goal is that TLS costs under 15% of the replicated throughput (ratio >= 0.85).

TLS: ``--tls-cert/--tls-key/--tls-ca`` on both nodes, TLS 1.3 with mutual verification,
P-256 certificates made with the ``openssl`` commands of README.md (io_targets.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field

from common import (
    MB,
    BenchError,
    MirrorfsCli,
    MirrorfsMount,
    ReplicaDaemon,
    format_rows,
    human_size,
    seq_write,
    volume_size_for,
)
from io_targets import make_certificates
from meters import cpu_seconds
from nodes import listen_port, target_position, wait_caught_up, wait_streaming

log = logging.getLogger(__name__)

GOAL = 0.85  # TLS / plain replicated throughput
CATCHUP_TIMEOUT = 900.0
MODES = ("plain", "tls")


@dataclass(slots=True)
class Measurement:
    """One burst on one fresh pair of nodes."""

    mode: str
    round: int
    write_s: float
    replicated_s: float  # write start -> the replica applied the last transaction
    wire_bytes: int
    source_cpu_s: float | None
    replica_cpu_s: float | None


@dataclass(slots=True)
class Comparison:
    size: int
    rounds: int
    runs: list[Measurement] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _cpu_delta(pid: int | None, before: float | None) -> float | None:
    after = cpu_seconds(pid)
    return None if after is None or before is None else after - before


def measure(workdir: str, mode: str, rnd: int, size: int, pool: bytes) -> Measurement:
    """One burst over a link in ``mode`` ("plain" or "tls"), on fresh volumes."""
    base = os.path.join(workdir, f"{mode}-{rnd}")
    os.makedirs(base)
    cli = MirrorfsCli(os.path.join(workdir, f"{mode}.log"))
    rep = ReplicaDaemon(cli, os.path.join(base, "rep-vol"))
    src = MirrorfsMount(cli, os.path.join(base, "src-vol"), os.path.join(base, "src-mnt"))
    tls_args: list[str] = []
    if mode == "tls":
        pki = os.path.join(workdir, "pki")  # one CA for the run, made once
        rep.extra_args = make_certificates(pki, "replica")
        tls_args = make_certificates(pki, "source")
    try:
        rep.start()
        src.mkfs(volume_size_for(int(size * 1.25) + (1 << 30)))
        src.mount("--mirror", f"127.0.0.1:{listen_port(rep.volume)}", *tls_args)
        wait_streaming(src.volume)
        os.sync()
        _, before = target_position(src.volume)
        cpu_src, cpu_rep = cpu_seconds(src.pid), cpu_seconds(rep.pid)
        began = time.monotonic()
        write_s = seq_write(os.path.join(src.mountpoint, "burst"), size, pool)
        applied = wait_caught_up(src.volume, CATCHUP_TIMEOUT, f"{mode} burst")
        _, after = target_position(src.volume)
        return Measurement(
            mode,
            rnd,
            write_s,
            applied - began,
            after["bytes_sent"] - before["bytes_sent"],
            _cpu_delta(src.pid, cpu_src),
            _cpu_delta(rep.pid, cpu_rep),
        )
    finally:
        try:
            src.unmount()
        finally:
            rep.stop()
            shutil.rmtree(base, ignore_errors=True)  # the next round needs the disk space


def run_comparison(workdir: str, size: int, rounds: int, pool: bytes) -> Comparison:
    """``rounds`` rounds, each plain and TLS, the order alternating; errors are kept."""
    out = Comparison(size, rounds)
    for rnd in range(rounds):
        order = MODES if rnd % 2 == 0 else MODES[::-1]
        for mode in order:
            print(f"round {rnd + 1}/{rounds}: {mode} ...", flush=True, file=sys.stderr)
            try:
                out.runs.append(measure(workdir, mode, rnd, size, pool))
            except (BenchError, OSError) as exc:
                out.errors.append(f"round {rnd + 1} {mode}: {type(exc).__name__}: {exc}")
    return out


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def figures(runs: list[Measurement], size: int) -> dict[str, list[float | None]]:
    """Per figure, its values over ``runs`` (one mode)."""
    gib = size / (1 << 30)
    return {
        "write": [size / MB / m.write_s for m in runs],
        "replicated": [size / MB / m.replicated_s for m in runs],
        "catchup": [m.replicated_s - m.write_s for m in runs],
        "wire": [m.wire_bytes / size for m in runs],
        "cpu_src": [None if m.source_cpu_s is None else m.source_cpu_s / gib for m in runs],
        "cpu_rep": [None if m.replica_cpu_s is None else m.replica_cpu_s / gib for m in runs],
    }


ROWS = (
    # key, label, unit, higher is better (ratio shown as TLS/plain), digits
    ("replicated", "replicated throughput", "MB/s", True, 1),
    ("write", "source write (mirrored)", "MB/s", True, 1),
    ("catchup", "catch-up after fsync", "s", False, 2),
    ("wire", "wire bytes per byte", "x", False, 3),
    ("cpu_src", "source CPU per GiB", "s", False, 2),
    ("cpu_rep", "replica CPU per GiB", "s", False, 2),
)


def render(cmp: Comparison) -> str:
    """The table: medians per mode, the ratio, each round's values (the spread)."""
    by_mode = {m: [r for r in cmp.runs if r.mode == m] for m in MODES}
    figs = {m: figures(by_mode[m], cmp.size) for m in MODES}
    header = ["", "unit", "plain", "TLS", "TLS/plain", "goal", "plain rounds", "TLS rounds"]
    lines = [header]
    for key, label, unit, _higher, digits in ROWS:
        plain, tls = _median(figs["plain"][key]), _median(figs["tls"][key])
        ratio = f"{tls / plain:.2f}x" if plain and tls is not None else "n/a"
        goal = f">= {GOAL:.2f}x" if key == "replicated" else ""
        lines.append(
            [
                label,
                unit,
                _fmt(plain, digits),
                _fmt(tls, digits),
                ratio,
                goal,
                " ".join(_fmt(v, digits) for v in figs["plain"][key]),
                " ".join(_fmt(v, digits) for v in figs["tls"][key]),
            ]
        )
    return format_rows(lines, right=range(2, 6))


def verdict(cmp: Comparison) -> str:
    """One line: what TLS costs of the replicated throughput, against the goal."""
    plain = _median(figures([r for r in cmp.runs if r.mode == "plain"], cmp.size)["replicated"])
    tls = _median(figures([r for r in cmp.runs if r.mode == "tls"], cmp.size)["replicated"])
    if not plain or tls is None:
        return "TLS cost: not measured (see the errors)"
    ratio = tls / plain
    met = "met" if ratio >= GOAL else "NOT met"
    return (
        f"TLS cost: {1 - ratio:.0%} of the replicated throughput (median {tls:.1f} vs "
        f"{plain:.1f} MB/s, {human_size(cmp.size)} bursts, {cmp.rounds} rounds); "
        f"goal under {1 - GOAL:.0%}: {met}"
    )
