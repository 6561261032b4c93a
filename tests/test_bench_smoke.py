"""bench/bench_io.py runs end to end: ``--quick`` on a plain directory and a mirrorfs volume
at tiny sizes exits 0 and prints every workload row (no timing is checked)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.util import REPO, needs_fuse

pytestmark = needs_fuse

ROWS = (
    "seq write 1 MiB",
    "seq read 1 MiB",
    "4 KiB random write",
    "4 KiB random read",
    "create 50 x 4 KiB files",
    "stat 50 files",
    "read 50 files, cold",
    "delete 50 files",
    "4 KiB write+fsync latency p50",
    "4 KiB write+fsync latency p99",
    "peak RSS of the FUSE server",
)


def test_bench_io_quick_runs_every_workload(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("bench_io.py needs root (drop_caches)")
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed (bash examples/bootstrap.sh test installs it)")
    report = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    argv = [
        sys.executable,
        os.path.join(REPO, "bench", "bench_io.py"),
        "--quick",
        "--targets",
        "plain,mirrorfs",
        "--size",
        "4M",
        "--rand-size",
        "1M",
        "--seconds",
        "0.5",
        "--files",
        "50",
        "--fsyncs",
        "10",
        "--workdir",
        str(tmp_path),
        "--json",
        str(report),
    ]
    proc = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = proc.stdout
    for row in ROWS:
        assert row in table, f"no row {row!r} in:\n{table}"
    data = json.loads(report.read_text())
    assert [r["target"] for r in data["rounds"]] == ["plain", "mirrorfs"]
    assert all(not r["errors"] for r in data["rounds"])
    # Every mount of the run is gone, and so is its work directory.
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()
    assert os.listdir(tmp_path) == ["bench.json"]


def test_bench_repl_tls_compares_both_links(tmp_path):
    """``bench_repl.py --tls``: one round of each link at a tiny size, a table with both
    columns filled, the verdict line, nothing left mounted."""
    if os.geteuid() != 0:
        pytest.skip("bench_repl.py needs root (FUSE mounts)")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (the benchmark makes its certificates with it)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    argv = [sys.executable, os.path.join(REPO, "bench", "bench_repl.py"), "--tls"]
    argv += ["--rounds", "1", "--size", "4M", "--workdir", str(tmp_path)]
    proc = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split("  ")[0]: line for line in proc.stdout.splitlines()}
    line = rows["replicated throughput"]
    assert "n/a" not in line and ">= 0.85x" in line, line
    assert "TLS cost: " in proc.stdout and "goal under 15%" in proc.stdout
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()
    assert os.listdir(tmp_path) == []
