"""More operators' conventions: shell completion, a weak secret warned of once by a detached
replica, handshake-failure warnings rate-limited under a flood, progress on a terminal."""

from __future__ import annotations

import os
import signal
import subprocess

from tests.repl_util import free_port, write_secret
from tests.test_cli import assert_one_line_error
from tests.util import pid_alive, run_cli


def test_detached_replica_warns_of_a_weak_secret_once(tmp_path):
    key = write_secret(tmp_path / "key", "short")
    rep_dir = tmp_path / "rep"
    proc = run_cli(
        "replica", rep_dir, "--listen", f"127.0.0.1:{free_port()}", "--secret-file", key
    )
    pid = 0
    try:
        assert proc.returncode == 0, proc.stderr
        with open(rep_dir / "replica.pid") as f:
            pid = int(f.read())
        weak = [line for line in proc.stderr.splitlines() if "secret is only 5 bytes" in line]
        assert len(weak) == 1, proc.stderr
        assert run_cli("stop", rep_dir).returncode == 0
    finally:
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


# -- shell completion (shtab)


def test_bash_completion_script_is_valid_and_completes(tmp_path):
    proc = run_cli("completion", "bash", check=True)
    script = tmp_path / "mirrorfs.bash"
    script.write_text(proc.stdout)
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    # Sourced, its function offers the commands and a command's options.
    probe = (
        f"source {script}; "
        "COMP_WORDS=(mirrorfs mo); COMP_CWORD=1; _shtab_mirrorfs; echo \"${COMPREPLY[*]}\"; "
        "COMP_WORDS=(mirrorfs status --); COMP_CWORD=2; _shtab_mirrorfs; echo \"${COMPREPLY[*]}\""
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    commands, options = out.stdout.splitlines()
    assert commands.split() == ["mount"]
    assert {"--json", "--watch"} <= set(options.split())


def test_zsh_completion_and_an_unknown_shell(tmp_path):
    proc = run_cli("completion", "zsh", check=True)
    assert proc.stdout.startswith("#compdef mirrorfs")
    assert "switchover" in proc.stdout
    assert_one_line_error(run_cli("completion", "fish"), code=2, contains="invalid choice: 'fish'")
