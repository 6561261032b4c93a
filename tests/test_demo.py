"""examples/demo.py, the README's first command, runs end to end: every step's output is
there, nothing in it reads like a Python repr or a traceback, and it leaves no mount, no
process and no work directory behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.util import REPO, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]

# One line per part of the story, as the demo prints it.
STEPS = (
    "[1/4] A source mirrored to a replica",
    "on the replica's read-only mount:",
    "on the replica",  # the rename arriving
    "verify: all targets identical",
    "[2/4] A backup from a checkpoint, taken on the replica",
    "checkpoint 'nightly' created",
    "the backup holds the checkpoint's state, none of the later writes",
    "[3/4] The bad day: the source dies",
    "$ kill -KILL ",
    "may still be alive behind a cut link",  # the first promote, refused
    "promoted ",
    "[4/4] Failback: the old source rejoins as a target",
    "source -> target at seq",
    "after-failover.txt on the old source's read-only mount: there",
    "stopped the replica daemon",
    "done in ",
)


def _pids_in(text: str) -> set[int]:
    return {int(p) for p in re.findall(r"\(pid (\d+)\)", text)}


def test_demo_tells_the_whole_story(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the demo needs root")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "demo.py")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for line in STEPS:
        assert line in out, f"no {line!r} in the demo's output:\n{out}"
    assert out.index("[1/4]") < out.index("[2/4]") < out.index("[3/4]") < out.index("[4/4]")
    assert "Traceback" not in out
    # No Python repr in what a new user reads: no dict, list or tuple literal.
    assert not re.search(r"[{\[(]'|\{\"|\[\[", out), out
    # Status of both ends, before and after the failover.
    assert out.count("$ mirrorfs status ") == 4
    assert "target, streaming, epoch 2" in out and "source, serving, epoch 2" in out
    # Nothing left behind: its mounts, its daemons (by the pids it printed), its directory.
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()
    for pid in _pids_in(out):
        assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} of the demo is still running"
    assert os.listdir(tmp_path) == []
