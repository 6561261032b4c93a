"""A/B of two mirrorfs trees on the small-file and fsync workloads, alternating rounds.

    python bench/ab_small.py --tree base=/path/to/old/checkout --tree head=. [--rounds 3]

Each tree gets its own volume, made and mounted with that tree's ``python -m mirrorfs``;
per round each workload (bench/io_workloads.py: create, stat, read cold after a remount
and drop_caches, delete, 4 KiB write+fsync latency) runs on every tree in turn, the order
flipped every round. Medians and the ratio of every tree to the first one. For finding a
regression on a shared (noisy) machine, where only side-by-side figures mean anything.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import POOL_BYTES, is_mounted, read_pid_file, seq_write  # noqa: E402
from io_workloads import (  # noqa: E402
    create_files,
    delete_files,
    fsync_latency,
    read_files,
    run_fio,
    stat_files,
)
from targets import drop_caches  # noqa: E402

P99: dict[str, float] = {}  # the last fsync run's p99 per tree (ms)
WORKLOADS = ("create", "stat", "read", "delete", "fsync")
#: Also: "randwrite" (fio, 4 KiB random writes over a 64 MiB file laid out first, for
#: RANDWRITE_SECONDS, fsync at the end; IOPS; its n is the number of writes done).
RANDWRITE_SECONDS = 10.0
#: And "seqwrite": 1 MiB writes of --seq-mib MiB and one fsync (MiB/s; CPU per MiB).


class Tree:
    def __init__(self, name: str, path: str, work: str, mount_args: list[str]) -> None:
        self.name = name
        self.path = os.path.abspath(path)
        self.volume = os.path.join(work, f"{name}-vol")
        self.mnt = os.path.join(work, f"{name}-mnt")
        self.log = os.path.join(work, f"{name}.log")
        self.mount_args = mount_args
        self.pid: int | None = None

    def cli(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=self.path)
        with open(self.log, "ab") as out:
            subprocess.run(
                [sys.executable, "-m", "mirrorfs", *args],
                cwd=self.path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=300,
            )

    def mkfs(self) -> None:
        os.makedirs(self.mnt, exist_ok=True)
        self.cli("mkfs", self.volume, "--size", "4G")

    def mount(self) -> None:
        self.cli("mount", self.volume, self.mnt, *self.mount_args)
        self.pid = read_pid_file(os.path.join(self.volume, "mount.pid"))

    def umount(self) -> None:
        if is_mounted(self.mnt):
            self.cli("umount", self.mnt)
        self.pid = None


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of *pid* and its threads, in seconds."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_pyspy(pid: int | None, out: str | None) -> subprocess.Popen | None:
    if out is None or pid is None:
        return None
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    argv = [spy, "record", "-r", "200", "--threads", "-f", "raw", "-o", out + ".txt"]
    proc = subprocess.Popen(
        [*argv, "--pid", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(1.0)  # attached
    return proc


def stop_pyspy(proc: subprocess.Popen | None) -> None:
    if proc is not None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def run_one(
    tree: Tree, workload: str, n: int, pool: bytes, prof: str | None = None
) -> tuple[float, float]:
    """One workload on one tree: operations per second (fsync: p50 ms), and the mount
    process's CPU time per operation in microseconds."""
    d = os.path.join(tree.mnt, "d")
    if workload == "read":
        tree.umount()
        drop_caches([])
        tree.mount()
    if workload == "randwrite":
        seq_write(os.path.join(tree.mnt, "rw"), 64 << 20, pool)  # laid out, untimed
    spy = start_pyspy(tree.pid, prof)
    c0 = cpu_seconds(tree.pid)
    if workload == "create":
        os.mkdir(d)
        r = n / create_files(d, n, pool)
    elif workload == "stat":
        r = n / stat_files(d, n)
    elif workload == "read":
        r = n / read_files(d, n, pool)
    elif workload == "delete":
        r = n / delete_files(d, n)
        os.rmdir(d)
    elif workload == "seqwrite":
        f = os.path.join(tree.mnt, "seq")
        seconds = seq_write(f, n << 20, pool)
        os.unlink(f)
        r = n / seconds  # MiB/s; its n is MiB written
    elif workload == "randwrite":
        f = os.path.join(tree.mnt, "rw")
        run = run_fio(
            f,
            "randwrite",
            4096,
            64 << 20,
            seconds=RANDWRITE_SECONDS,
            time_based=True,
            end_fsync=True,
        )
        os.unlink(f)
        r, n = run.ios / run.seconds, run.ios
    elif workload == "fsync":
        f = os.path.join(tree.mnt, "wal")
        lat = fsync_latency(f, n, 30.0, pool)
        r = lat["fsync_p50"]
        P99[tree.name] = lat["fsync_p99"]
        os.unlink(f)
    else:
        raise ValueError(workload)
    cpu = (cpu_seconds(tree.pid) - c0) / n * 1e6
    stop_pyspy(spy)
    return r, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--fsyncs", type=int, default=1000)
    ap.add_argument("--seq-mib", type=int, default=256)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument(
        "-o",
        dest="mount_args",
        action="append",
        default=[],
        help="extra mount argument (repeatable), for every tree",
    )
    ap.add_argument("--pyspy", metavar="DIR", help="py-spy record (raw) each workload of round 0")
    args = ap.parse_args()
    workloads = args.workloads.split(",")
    pool = os.urandom(POOL_BYTES // 16)
    work = tempfile.mkdtemp(prefix="ab-small-")
    trees = [Tree(*t.split("=", 1), work, args.mount_args) for t in args.tree]
    results: dict[tuple[str, str], list[float]] = {}
    try:
        for t in trees:
            t.mkfs()
            t.mount()
        for r in range(args.rounds):
            order = trees if r % 2 == 0 else trees[::-1]
            for w in workloads:
                for t in order:
                    os.sync()
                    time.sleep(0.3)
                    n = {"fsync": args.fsyncs, "seqwrite": args.seq_mib}.get(w, args.files)
                    prof = args.pyspy and r == 0 and os.path.join(args.pyspy, f"{t.name}-{w}")
                    v, cpu = run_one(t, w, n, pool, prof or None)
                    results.setdefault((t.name, w), []).append(v)
                    results.setdefault((t.name, w + "-cpu"), []).append(cpu)
                    if w == "fsync":
                        results.setdefault((t.name, "fsync-p99"), []).append(P99[t.name])
                    print(
                        f"round {r} {w:7s} {t.name:8s} {v:10.2f}  mount cpu {cpu:7.1f} us/op",
                        flush=True,
                    )
    finally:
        for t in trees:
            try:
                t.umount()
            except Exception as exc:  # noqa: BLE001
                print(f"umount {t.name}: {exc}")
                subprocess.run(["fusermount3", "-u", "-z", t.mnt])
        subprocess.run(["rm", "-rf", work])
    first = trees[0].name
    print(f"\nmedians ({args.rounds} rounds; ops/s, fsync: p50 ms); ratio to {first}")
    keys = [x for w in workloads for x in (w, w + "-cpu")]
    keys += ["fsync-p99"] if "fsync" in workloads else []
    for key in keys:
        base = statistics.median(results[(first, key)])
        cells = []
        for t in trees:
            m = statistics.median(results[(t.name, key)])
            cells.append(f"{t.name} {m:9.2f} ({m / base:4.2f}x)")
        print(f"  {key:10s} " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
