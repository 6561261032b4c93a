"""The table of bench_io.py: one row per workload, one column per target (medians over
the rounds), the ratios mirrorfs / C passthrough and (mirrorfs + 1 target) / mirrorfs, and
issue 8's target ratio beside each, marked met or missed."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import MiB, format_rows, human_size

TARGET_RSS_MB = 300.0
MAX_LAG_FRACTION = 0.10  # of the burst, when the writer's fsync returns
MIN_ABSORB_RATIO = 1.5  # the replica's catch-up rate / the source's write rate

LABELS = {
    "plain": "plain",
    "passthrough_ll": "C ll",
    "passthrough": "pt.py",
    "mirrorfs": "mirrorfs",
    "mirrorfs+1": "mfs+1",
    "mirrorfs+1tls": "mfs+1 TLS",
}
#: TLS may cost at most 15% of the replication throughput (issue 9).
MIN_TLS_RATIO = 0.85


@dataclass(slots=True)
class Row:
    """One workload row. *c_goal*: mirrorfs / C passthrough must be at least this;
    *one_goal*: (mirrorfs + 1 target) / mirrorfs must be at least this."""

    key: str
    label: str
    unit: str
    c_goal: float | None = None
    one_goal: float | None = None
    digits: int = 1
    mirrored: bool = False  # a row of the mirrored target only


def rows_for(cfg: Any) -> list[Row]:
    """The rows, labelled with this run's sizes."""
    size, rand, burst = human_size(cfg.size), human_size(cfg.rand_size), human_size(cfg.burst)
    files = f"{cfg.files:,}"
    return [
        Row("seq_write", f"seq write 1 MiB x {size}, fsync at end", "MiB/s", 0.8, 0.85),
        Row("seq_read", f"seq read 1 MiB x {size}, cold", "MiB/s", 1.0),
        Row(
            "rand_write", f"4 KiB random write, {rand} file, {cfg.seconds:g} s, fsync", "MiB/s", 0.5
        ),
        Row("rand_read", f"4 KiB random read of the {size} file, cold", "MiB/s", 0.5),
        Row("create", f"create {files} x 4 KiB files", "files/s", 1.0, digits=0),
        Row("stat", f"stat {files} files", "files/s", 0.7, digits=0),
        Row("read_small", f"read {files} files, cold", "files/s", 0.7, digits=0),
        Row("delete", f"delete {files} files", "files/s", 0.7, digits=0),
        Row("fsync_p50", "4 KiB write+fsync latency p50", "ms", digits=2),
        Row("fsync_p99", "4 KiB write+fsync latency p99", "ms", digits=2),
        Row("rss_mb", "peak RSS of the FUSE server (VmHWM)", "MB"),
        Row("rep_rss_mb", "peak RSS of the replica daemon", "MB", mirrored=True),
        Row("burst_write", f"burst: seq write 1 MiB x {burst}, fsync", "MiB/s", mirrored=True),
        Row("lag_mib", "  replica behind when the fsync returned", "MiB", mirrored=True),
        Row(
            "lag_txns", "  replica behind when the fsync returned", "txns", digits=0, mirrored=True
        ),
        Row("catchup_s", "  then caught up after", "s", digits=2, mirrored=True),
        Row("absorb", "  replica's rate catching up (backlog / time)", "MiB/s", mirrored=True),
    ]


def derive(metrics: dict[str, Any]) -> None:
    """Add the figures computed from a round's raw numbers (in place)."""
    lag, catchup = metrics.get("lag_bytes"), metrics.get("catchup_s")
    if lag is not None:
        metrics["lag_mib"] = lag / MiB
        metrics["lag_fraction"] = lag / metrics["burst_bytes"]
    if metrics.get("burst_s"):
        metrics["burst_write"] = metrics["burst_bytes"] / MiB / metrics["burst_s"]
    if lag is not None and catchup is not None:
        # No backlog: the replica kept up with the writer (an infinite ratio: met).
        metrics["absorb"] = lag / MiB / catchup if lag and catchup > 0 else math.inf
    if metrics.get("burst_s") is not None and catchup is not None:
        # From the first write of the burst to the replica having applied all of it.
        metrics["replicated"] = metrics["burst_bytes"] / MiB / (metrics["burst_s"] + catchup)
    cpu = [metrics.get(f"burst_cpu_{who}") for who in ("server", "replica")]
    if metrics.get("burst_bytes") and None not in cpu:
        # Less sensitive to other load on the machine than the rates.
        metrics["burst_cpu_per_gib"] = sum(cpu) / (metrics["burst_bytes"] / (1 << 30))
    for key, _ in CPU_STEPS:
        _cpu_share(metrics, key, "server")
        _cpu_share(metrics, key, "replica")


CPU_STEPS = (
    ("seq_write", "seq write"),
    ("seq_read", "seq read, cold"),
    ("rand_read", "4 KiB random read, cold"),
    ("rand_write", "4 KiB random write (with layout)"),
    ("create", "create"),
    ("stat", "stat"),
    ("read_small", "read small files, cold"),
    ("delete", "delete"),
    ("fsync", "write+fsync loop"),
    ("burst", "burst and catch-up"),
)


def _cpu_share(metrics: dict[str, Any], key: str, who: str) -> None:
    cpu, wall = metrics.get(f"{key}_cpu_{who}"), metrics.get(f"{key}_step_s")
    if cpu is not None and wall:
        metrics[f"{key}_util_{who}"] = cpu / wall


def medians(rounds: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, float]]:
    """Per target, the median of each figure over the rounds that measured it."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        values: dict[str, list[float]] = {}
        for r in rounds:
            if r["target"] != name:
                continue
            for key, value in r["metrics"].items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    values.setdefault(key, []).append(value)
        out[name] = {k: statistics.median(v) for k, v in values.items()}
    return out


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "kept up"
    return f"{value:,.{digits}f}"


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "missed")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isinf(a) or math.isinf(b):
        return None
    return a / b


def render(med: dict[str, dict[str, float]], names: list[str], cfg: Any) -> str:
    """The table: workloads x targets, the two ratios, the goals and met/missed."""
    header = ("workload", "unit", *(LABELS[n] for n in names))
    header += ("mfs/C", "target", "", "+1/mfs", "target", "")
    lines: list[tuple[str, ...]] = [header]
    mfs, c, one = (med.get(n, {}) for n in ("mirrorfs", "passthrough_ll", "mirrorfs+1"))
    if not one:
        one = med.get("mirrorfs+1tls", {})

    def goal_cells(value: float | None, goal: float | None, text: str) -> tuple[str, str, str]:
        if value is None:
            return ("", text if goal is not None else "", "")
        if goal is None:
            return (f"{value:.2f}x", "", "")
        return (f"{value:.2f}x", text, _verdict(value >= goal))

    special: dict[str, Callable[[], tuple[str, ...]]] = {
        "rss_mb": lambda: (
            "",
            f"< {TARGET_RSS_MB:.0f} MB",
            _verdict(None if "rss_mb" not in mfs else mfs["rss_mb"] < TARGET_RSS_MB),
            "",
            f"< {TARGET_RSS_MB:.0f} MB",
            _verdict(None if "rss_mb" not in one else one["rss_mb"] < TARGET_RSS_MB),
        ),
        "lag_mib": lambda: (
            "",
            "",
            "",
            "-" if "lag_fraction" not in one else f"{one['lag_fraction']:.0%} of it",
            f"<= {MAX_LAG_FRACTION:.0%}",
            _verdict(
                None if "lag_fraction" not in one else one["lag_fraction"] <= MAX_LAG_FRACTION
            ),
        ),
        "absorb": lambda: _absorb_cells(one),
    }
    for row in rows_for(cfg):
        if row.mirrored and not {"mirrorfs+1", "mirrorfs+1tls"} & set(names):
            continue
        values = [med.get(n, {}).get(row.key) for n in names]
        cells: tuple[str, ...]
        if row.key in special:
            cells = special[row.key]()
        else:
            key = row.key
            r1 = _ratio(mfs.get(key), c.get(key))
            r2 = _ratio(one.get(key), mfs.get(key))
            c_text = "" if row.c_goal is None else f">= {row.c_goal:.2f}x"
            one_text = "" if row.one_goal is None else f">= {row.one_goal:.2f}x"
            cells = goal_cells(r1, row.c_goal, c_text) + goal_cells(r2, row.one_goal, one_text)
        lines.append((row.label, row.unit, *(_fmt(v, row.digits) for v in values), *cells))
    width = len(names)
    return format_rows(lines, right=range(2, 2 + width + 1))


def _absorb_cells(one: dict[str, float]) -> tuple[str, ...]:
    absorb, write = one.get("absorb"), one.get("burst_write")
    goal = f">= {MIN_ABSORB_RATIO:.1f}x write"
    if absorb is None or not write:
        return ("", "", "", "", goal, "")
    if math.isinf(absorb):
        return ("", "", "", "kept up", goal, "met")
    ratio = absorb / write
    return ("", "", "", f"{ratio:.2f}x write", goal, _verdict(ratio >= MIN_ABSORB_RATIO))


def render_cpu(med: dict[str, dict[str, float]], names: list[str]) -> str:
    """CPU seconds of each FUSE server per wall second of each step (1.00 = one core
    busy all the time: CPU-bound), the replica daemon's after a '+'; '' if none ran."""
    fuse = [n for n in names if n != "plain"]
    if not fuse:
        return ""
    lines: list[tuple[str, ...]] = [("step", *(LABELS[n] for n in fuse))]
    for key, label in CPU_STEPS:
        cells = []
        for n in fuse:
            server = med.get(n, {}).get(f"{key}_util_server")
            replica = med.get(n, {}).get(f"{key}_util_replica")
            cell = "-" if server is None else f"{server:.2f}"
            if replica is not None:
                cell += f" + {replica:.2f}"
            cells.append(cell)
        if any(c != "-" for c in cells):
            lines.append((label, *cells))
    return format_rows(lines, right=range(1, len(fuse) + 1))


#: The rows of the TLS comparison: (key, label, unit, higher is better).
TLS_ROWS = (
    ("seq_write", "seq write on the source, fsync at end", "MiB/s", True),
    ("burst_write", "burst: seq write on the source, fsync", "MiB/s", True),
    ("catchup_s", "  then the replica caught up after", "s", False),
    ("absorb", "  replica's rate catching up (backlog / time)", "MiB/s", True),
    ("replicated", "  replicated: burst / (write + catch-up)", "MiB/s", True),
    ("burst_cpu_per_gib", "  CPU s of source + replica per GiB of it", "s", False),
    ("create", "create 4 KiB files", "files/s", True),
)


def render_tls(med: dict[str, dict[str, float]], names: list[str]) -> str:
    """mirrorfs+1 with TLS against without, side by side ("" unless both ran); the goal:
    TLS costs under 15% (TLS / plain >= MIN_TLS_RATIO, the inverse for times)."""
    if "mirrorfs+1" not in names or "mirrorfs+1tls" not in names:
        return ""
    plain, tls = med.get("mirrorfs+1", {}), med.get("mirrorfs+1tls", {})
    lines: list[tuple[str, ...]] = [
        ("figure", "unit", "mfs+1", "mfs+1 TLS", "TLS/plain", "target", "")
    ]
    goal = f">= {MIN_TLS_RATIO:.2f}x"
    for key, label, unit, higher in TLS_ROWS:
        a, b = plain.get(key), tls.get(key)
        ratio = _ratio(b, a) if higher else _ratio(a, b)
        digits = 0 if unit == "files/s" else 2 if unit == "s" else 1
        cells = (
            ("", goal, "")
            if ratio is None
            else (f"{ratio:.2f}x", goal, _verdict(ratio >= MIN_TLS_RATIO))
        )
        lines.append((label, unit, _fmt(a, digits), _fmt(b, digits), *cells))
    return format_rows(lines, right=range(2, 5))
