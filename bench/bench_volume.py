"""Single-node volume benchmark: a plain directory, a FUSE passthrough, and mirrorfs.

Runs the same workloads, in one run, on
  (a) a plain local directory,
  (b) bench/passthrough.py (pyfuse3) over a local directory,
  (c) a mirrorfs volume mounted with ``python -m mirrorfs mount``,
all inside one work directory (so on one disk), and prints one table:

  seq write   one file of --size bytes in 1 MiB write() calls, then fsync; MB/s
  seq read    the same file read back in 1 MiB read() calls after dropping caches; MB/s
  create      --files files of 100 bytes each in one directory; files/s
  delete      unlink of those files; files/s
  cp -a       ``cp -a`` of Python's standard library (site-packages excluded); entries/s, MB/s
  peak RSS    VmHWM of the FUSE server process, read just before each unmount; MB

with the ratio mirrorfs / passthrough and the targets (>= 0.7x on sequential write and
read, >= 0.5x on creation, peak RSS < 300 MB). MB = 10**6 bytes.

Usage: python bench/bench_volume.py [--quick] [--size 1G] [--files 10000] [--workdir DIR]
Run it as root for cold-cache reads (echo 3 > /proc/sys/vm/drop_caches).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common import (
    CHUNK,
    MB,
    POOL_BYTES,
    BenchError,
    Tree,
    check_content,
    copy_tree,
    describe_environment,
    format_rows,
    human_size,
    log_tail,
    parse_size,
    scan_tree,
    seq_write,
    stdlib_tree,
    work_directory,
)
from targets import MirrorfsTarget, PassthroughTarget, PlainTarget, Target, can_drop_caches

log = logging.getLogger(__name__)

SMALL_FILE = b"x" * 99 + b"\n"  # 100 bytes

TARGET_RATIO_SEQ = 0.7
TARGET_RATIO_CREATE = 0.5
TARGET_RSS_MB = 300.0


# ---- measurements ---------------------------------------------------------------------------


@dataclass(slots=True)
class Figures:
    """What one target measured. Seconds are None when the step did not run."""

    write_s: float | None = None
    read_s: float | None = None
    create_s: float | None = None
    delete_s: float | None = None
    cp_s: float | None = None
    peak_rss_kib: int | None = None
    errors: list[str] = field(default_factory=list)


def seq_read(path: str, size: int) -> float:
    """Read the file in 1 MiB reads through a fresh open; return seconds."""
    buf = bytearray(CHUNK)
    total = 0
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    if total != size:
        raise BenchError(f"seq read: read {total} bytes, expected {size}")
    return elapsed


def create_files(directory: str, count: int) -> float:
    """Create *count* files of 100 bytes in *directory*; return seconds."""
    start = time.perf_counter()
    for i in range(count):
        fd = os.open(os.path.join(directory, f"f{i:06d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.write(fd, SMALL_FILE)
        finally:
            os.close(fd)
    return time.perf_counter() - start


def delete_files(directory: str, count: int) -> float:
    """Unlink the files that create_files made; return seconds."""
    start = time.perf_counter()
    for i in range(count):
        os.unlink(os.path.join(directory, f"f{i:06d}"))
    return time.perf_counter() - start


# ---- the run --------------------------------------------------------------------------------


def run_target(target: Target, size: int, files: int, pool: bytes, tree: Tree) -> Figures:
    """Run every workload on *target*; errors end the target's run and are recorded."""
    figures = Figures()

    def step(label: str, fn: Callable[[], float | None]) -> float | None:
        log.info("%s: %s", target.name, label)
        return fn()

    try:
        target.setup()
        big = os.path.join(target.root, "big")
        figures.write_s = step("sequential write", lambda: seq_write(big, size, pool))
        target.remount(target.backing_files("big"))
        figures.read_s = step("sequential read", lambda: seq_read(big, size))
        check_content(big, size, pool)
        os.sync()
        small = os.path.join(target.root, "small")
        os.mkdir(small)
        figures.create_s = step(f"create {files} files", lambda: create_files(small, files))
        os.sync()
        figures.delete_s = step(f"delete {files} files", lambda: delete_files(small, files))
        os.rmdir(small)
        os.sync()
        figures.cp_s = step("cp -a", lambda: copy_tree(tree, os.path.join(target.root, "tree")))
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        figures.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        try:
            target.teardown()
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            figures.errors.append(f"teardown: {type(exc).__name__}: {exc}")
        figures.peak_rss_kib = target.peak_rss_kib
    return figures


def _rate(amount: float, seconds: float | None) -> float | None:
    return amount / seconds if seconds else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def render_table(
    figures: dict[str, Figures], size: int, files: int, tree: Tree, tree_label: str
) -> str:
    """The result table, one row per workload, with the mirrorfs/passthrough ratio."""
    names = ["plain", "passthrough", "mirrorfs"]
    rows: list[tuple[str, str, dict[str, float | None], tuple[str, float] | None]] = []

    def add(
        label: str,
        unit: str,
        get: Callable[[Figures], float | None],
        target: tuple[str, float] | None = None,
    ) -> None:
        rows.append(
            (label, unit, {n: get(figures[n]) if n in figures else None for n in names}, target)
        )

    add(
        f"seq write {human_size(size)} + fsync",
        "MB/s",
        lambda f: _rate(size / MB, f.write_s),
        (">=", TARGET_RATIO_SEQ),
    )
    add(
        f"seq read {human_size(size)}, cold",
        "MB/s",
        lambda f: _rate(size / MB, f.read_s),
        (">=", TARGET_RATIO_SEQ),
    )
    add(
        f"create {files} x 100 B files",
        "files/s",
        lambda f: _rate(files, f.create_s),
        (">=", TARGET_RATIO_CREATE),
    )
    add(f"delete {files} files", "files/s", lambda f: _rate(files, f.delete_s))
    add(
        f"cp -a {tree_label} ({tree.count} entries)",
        "entries/s",
        lambda f: _rate(tree.count, f.cp_s),
    )
    add(
        f"cp -a {tree_label} ({tree.size / MB:.0f} MB)",
        "MB/s",
        lambda f: _rate(tree.size / MB, f.cp_s),
    )
    add(
        "peak RSS of the FUSE process",
        "MB",
        lambda f: f.peak_rss_kib * 1024 / MB if f.peak_rss_kib else None,
    )

    header = ("workload", "unit", *names, "mfs/pt", "target", "")
    lines = [header]
    for label, unit, values, target in rows:
        pt, mfs = values["passthrough"], values["mirrorfs"]
        is_rss = unit == "MB"
        ratio = mfs / pt if (mfs and pt and not is_rss) else None
        if is_rss:
            goal = f"< {TARGET_RSS_MB:.0f} MB"
            verdict = "n/a" if mfs is None else ("PASS" if mfs < TARGET_RSS_MB else "FAIL")
        elif target is not None:
            goal = f"{target[0]} {target[1]:.1f}x"
            verdict = "n/a" if ratio is None else ("PASS" if ratio >= target[1] else "FAIL")
        else:
            goal = verdict = ""
        lines.append(
            (
                label,
                unit,
                *(_fmt(values[n]) for n in names),
                "" if ratio is None else f"{ratio:.2f}x",
                goal,
                verdict,
            )
        )
    return format_rows(lines, right=range(2, 6))


def cache_note(root: bool) -> str:
    """How the cold read was made cold, for the report."""
    if root:
        return (
            "before the read: sync + echo 3 > /proc/sys/vm/drop_caches; FUSE targets "
            "unmounted before and mounted again after (fresh server, fresh open)"
        )
    return (
        "before the read: NOT root, so no drop_caches: sync + posix_fadvise(DONTNEED) on "
        "the backing file; FUSE targets unmounted and mounted again (fresh open)"
    )


def main(argv: list[str] | None = None) -> int:
    """Parse options, run every target, print the table; 1 if any target failed."""
    parser = argparse.ArgumentParser(
        description="Benchmark mirrorfs against a plain directory and a FUSE passthrough."
    )
    parser.add_argument("--size", default=None, help="sequential file size (default 1G)")
    parser.add_argument("--files", type=int, default=None, help="small files (default 10000)")
    parser.add_argument(
        "--workdir",
        default=None,
        help="parent of the run's temp directory (default: system temp dir)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 64M file, 500 files, a small part of the stdlib",
    )
    parser.add_argument(
        "--targets",
        default="plain,passthrough,mirrorfs",
        help="comma-separated subset of plain,passthrough,mirrorfs",
    )
    parser.add_argument("--tree", default=None, help="directory to cp -a instead of the stdlib")
    parser.add_argument(
        "--mkfs-arg",
        action="append",
        default=[],
        help="extra argument for 'mirrorfs mkfs' (repeatable)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s: %(message)s",
    )

    size = parse_size(args.size or ("64M" if args.quick else "1G"))
    files = args.files if args.files is not None else (500 if args.quick else 10000)
    wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(wanted) - {"plain", "passthrough", "mirrorfs"}
    if unknown or not wanted:
        print(f"bench_volume: unknown targets: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if size <= 0 or files < 0:
        print("bench_volume: --size must be > 0 and --files >= 0", file=sys.stderr)
        return 2

    tree_root, tree_entries, tree_label = stdlib_tree(args.quick, args.tree)
    tree = scan_tree(tree_root, tree_entries)
    pool = os.urandom(min(POOL_BYTES, max(size, CHUNK)))
    # Room for the big file, the tree and metadata; at least the documented 4G.
    volume_size = max(4 << 30, int(size * 1.25 + tree.size * 1.5) + (1 << 30))

    results: dict[str, Figures] = {}
    logs: dict[str, str | None] = {}
    load_start = os.getloadavg()[0]
    with work_directory(args.workdir, args.keep) as workdir:
        env_lines = describe_environment(workdir)
        for name in wanted:
            if name == "plain":
                target: Target = PlainTarget(workdir)
            elif name == "passthrough":
                target = PassthroughTarget(workdir)
            else:
                target = MirrorfsTarget(workdir, volume_size, args.mkfs_arg)
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = run_target(target, size, files, pool, tree)
            logs[name] = target.log_path
            for err in results[name].errors:
                print(f"  {name}: {err}", file=sys.stderr)
                if target.log_path:
                    print(log_tail(target.log_path), file=sys.stderr)

    print()
    print("mirrorfs single-node benchmark" + (" (--quick)" if args.quick else ""))
    for line in env_lines:
        print(line)
    # FUSE servers are CPU-bound Python: other busy processes lower every FUSE figure.
    print(
        f"load average (1 min): {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end, "
        f"on {os.cpu_count()} CPUs"
    )
    print(cache_note(can_drop_caches()))
    shown = ", ".join(tree_entries) if len(tree_entries) < 8 else "all but site-packages"
    print(f"cp -a source: {tree_root} [{shown}]")
    print("passthrough: bench/passthrough.py, writeback cache off, entry/attr timeout 300 s")
    print("MB = 10^6 bytes; mfs/pt = mirrorfs / passthrough; peak RSS = VmHWM before unmount")
    print()
    print(render_table(results, size, files, tree, tree_label))
    failed = {n: f.errors for n, f in results.items() if f.errors}
    for name, errors in failed.items():
        for err in errors:
            print(f"error ({name}): {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
