"""examples/demo.py, the README's first command, runs end to end: every step's output is
there, nothing in it reads like a Python repr or a traceback, and it leaves no mount, no
process and no work directory behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.util import REPO, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]

# One line per part of the story, as the demo prints it.
STEPS = (
    "[1/4] A source mirrored to a replica",
    "on the replica's read-only mount:",
    "gone there: True",  # the rename, arrived on the replica
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


def _processes_with_env(marker: bytes) -> list[str]:
    """The live processes whose environment holds ``marker``: the demo and every process it
    started inherit its TMPDIR (pids alone could have been reused by now)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in env and int(pid) != os.getpid():
            found.append(f"{pid}: {cmd}")
    return found


def _env(tmp_path) -> dict[str, str]:
    if os.geteuid() != 0:
        pytest.skip("the demo needs root")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def _nothing_left(tmp_path) -> None:
    """No mount, no process and no file of the demo's left."""
    with open("/proc/self/mounts") as f:
        assert str(tmp_path) not in f.read()
    assert _processes_with_env(f"TMPDIR={tmp_path}".encode()) == []
    assert os.listdir(tmp_path) == []


def test_demo_tells_the_whole_story(tmp_path):
    env = _env(tmp_path)
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
    _nothing_left(tmp_path)


def test_demo_interrupted_cleans_up(tmp_path):
    """Ctrl-C in the middle (a replica, a source mount and a copy running): the demo stops
    what it started, unmounts, removes its directory, and says so in one line."""
    env = _env(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "examples", "demo.py")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A shell without job control starts background jobs with SIGINT ignored, and an
        # ignored signal stays ignored across exec: give the demo Ctrl-C back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "$ mirrorfs status" in line:  # the tree is being copied onto the source
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(seen) + rest
    assert proc.returncode == 130, out
    assert "demo: interrupted; cleaning up" in out
    assert "Traceback" not in out
    _nothing_left(tmp_path)
