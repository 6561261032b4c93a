"""More operators' conventions: shell completion, a weak secret warned of once by a detached
replica, handshake-failure warnings rate-limited under a flood, progress on a terminal."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys

import pytest
import trio

from mirrorfs.repl.admission import FAILURES_LOGGED, HandshakeLimiter, LogThrottle
from mirrorfs.repl.handshake import HandshakeRefused
from mirrorfs.repl.receiver import Receiver
from mirrorfs.repl.stream import FramedStream, handshake_source
from tests.repl_util import free_port, write_secret
from tests.test_cli import assert_one_line_error
from tests.util import REPO, _env, mkfs, pid_alive, run_cli


def test_detached_replica_warns_of_a_weak_secret_once(tmp_path):
    key = write_secret(tmp_path / "key", "short")
    rep_dir = tmp_path / "rep"
    proc = run_cli("replica", rep_dir, "--listen", f"127.0.0.1:{free_port()}", "--secret-file", key)
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
        'COMP_WORDS=(mirrorfs mo); COMP_CWORD=1; _shtab_mirrorfs; echo "${COMPREPLY[*]}"; '
        'COMP_WORDS=(mirrorfs status --); COMP_CWORD=2; _shtab_mirrorfs; echo "${COMPREPLY[*]}"'
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


# -- failed handshakes under a flood: a few lines, then one per period with a count


def test_log_throttle_logs_the_first_few_then_one_line_per_period():
    lim = HandshakeLimiter(log_every=10.0)
    shown = [lim.failed("127.0.0.1", 0.1 * i) for i in range(50)]
    assert shown[:FAILURES_LOGGED] == [(True, 0)] * FAILURES_LOGGED
    assert not any(show for show, _ in shown[FAILURES_LOGGED:])
    assert lim.failed("10.0.0.9", 5.0) == (True, 0)  # another address has its own few
    assert lim.failed("127.0.0.1", 10.5) == (True, 50 - FAILURES_LOGGED)  # the summary
    assert lim.failed("127.0.0.1", 11.0) == (False, 0)
    assert lim.failed("127.0.0.1", 21.0) == (True, 1)
    # Quiet for a whole period: a new burst, logged one by one again.
    assert [lim.failed("127.0.0.1", 40.0 + i)[0] for i in range(4)] == [True] * 3 + [False]
    assert lim.failures == 58


def test_log_throttle_forgets_the_oldest_address_past_its_bound():
    throttle = LogThrottle(first=1, every=10.0, keys=2)
    assert throttle.note("a", 0.0) == (True, 0)
    assert throttle.note("a", 1.0) == (False, 0)
    throttle.note("b", 2.0)
    throttle.note("c", 3.0)  # "a" is forgotten: its next failure starts a burst again
    assert throttle.note("a", 4.0) == (True, 0)


async def test_a_flood_of_failed_handshakes_from_127_0_0_1_logs_a_few_lines(
    tmp_path, caplog, mock_clock
):
    mock_clock.rate = 1.0  # real time, but one that the test can move on
    caplog.set_level(logging.INFO, "mirrorfs")
    rcv = Receiver(
        str(tmp_path / "dst"),
        None,
        secret=b"s" * 32,
        node_id="dst",
        limiter=HandshakeLimiter(log_every=30.0),
    )

    async def garbage(port: int, count: int) -> None:
        for _ in range(count):
            before = rcv.limiter.failures
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(b"\xffGARBAGE" * 8)
            await stream.aclose()
            while rcv.limiter.failures == before:
                await trio.sleep(0.005)

    def failure_lines() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "handshake with 127.0.0.1:" in r.getMessage()
        ]

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            await nursery.start(trio.serve_listeners, rcv.serve, listeners)
            await garbage(port, 200)
            with pytest.raises(HandshakeRefused):  # a wrong proof counts the same
                await handshake_source(
                    FramedStream(await trio.open_tcp_stream("127.0.0.1", port)),
                    secret=b"w" * 32,
                    volume_uuid=bytes(range(16)),
                    node_id="mallory",
                    epochs=[(1, 1)],
                    last_seq=0,
                    allow_initial_sync=True,
                )
            with trio.fail_after(10):
                while rcv.limiter.failures < 201:
                    await trio.sleep(0.005)
            assert len(failure_lines()) == FAILURES_LOGGED, failure_lines()
            mock_clock.jump(31.0)  # a period later: one line with the count
            await garbage(port, 1)
            nursery.cancel_scope.cancel()
    lines = failure_lines()
    assert len(lines) == FAILURES_LOGGED + 1, lines
    assert lines[-1].endswith(f"({201 - FAILURES_LOGGED} more from this address not logged)")
    assert rcv.volume is None


# -- progress on a terminal, none off it


def _run_on_pty(*args: str, timeout: float = 120.0) -> tuple[int, bytes]:
    """``python -m mirrorfs ARGS`` with stdout and stderr on a pseudo-terminal: its exit
    status and everything it wrote."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    env = dict(_env(), TERM="xterm-256color", COLUMNS="100")
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mirrorfs", *map(str, args)],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=REPO,
    )  # fmt: skip
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=30), bytes(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_fsck_draws_a_bar_on_a_terminal_and_no_escapes_off_it(tmp_path):
    vol = tmp_path / "vol"
    mkfs(vol, "16M")
    code, out = _run_on_pty("fsck", vol)
    text = out.decode(errors="replace")
    assert code == 0, text
    assert "\x1b[" in text and "━" in text, text  # rich's bar, drawn with cursor control
    assert f"fsck {vol}: done" in text and "100%" in text, text
    assert "clean" in text, text
    plain = run_cli("fsck", vol)
    assert plain.returncode == 0, plain.stderr
    assert "\x1b" not in plain.stdout + plain.stderr
    assert "━" not in plain.stdout + plain.stderr and "fsck " not in plain.stderr


def test_fsck_reports_every_pass_to_its_progress(tmp_path):
    from mirrorfs.fs import fsck as fsck_mod
    from mirrorfs.store.volume import Volume

    vol = tmp_path / "vol"
    mkfs(vol, "16M")
    seen: list[tuple[str, int, int]] = []
    volume = Volume.open(str(vol), read_only=True)
    try:
        report = fsck_mod.check(volume, progress=lambda *a: seen.append(a))
    finally:
        volume.close()
    assert report.clean
    phases = list(dict.fromkeys(p for p, _, _ in seen))
    assert phases == [
        "inode table", "block runs", "directories", "links", "block bitmap", "checkpoints"
    ]  # fmt: skip
    assert all(0 <= done <= total for _, done, total in seen)


def test_slow_notice_only_after_its_delay_and_only_on_a_terminal():
    import io
    import time

    from mirrorfs.node.progress import slow_notice

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    quick, slow, pipe = Tty(), Tty(), io.StringIO()
    with slow_notice("promoting x", after=5.0, stream=quick):
        pass
    with slow_notice("promoting x", after=0.05, stream=slow):
        time.sleep(0.3)
    with slow_notice("promoting x", after=0.0, stream=pipe):
        time.sleep(0.1)
    assert quick.getvalue() == "" and pipe.getvalue() == ""
    assert slow.getvalue().startswith("\rpromoting x... 0 s")
    assert slow.getvalue().endswith("s)\n") and "promoting x... done (0." in slow.getvalue()
