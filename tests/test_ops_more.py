"""More operators' conventions: shell completion, a weak secret warned of once by a detached
replica, handshake-failure warnings rate-limited under a flood, progress on a terminal."""

from __future__ import annotations

import os
import signal

from tests.repl_util import free_port, write_secret
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
