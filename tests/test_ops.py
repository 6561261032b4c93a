"""Operators' conventions without a mount: mount(8)'s helper arguments, help, one-line
errors, the daemon's log (file rotation, SIGHUP, syslog), systemd's readiness protocol,
``mirrorfs stop`` of a replica daemon, and a replica refusing a source's commands."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from mirrorfs import cli, daemon
from mirrorfs.mount_helper import HelperError, mount_argv, umount_argv
from tests.repl_util import free_port, log_text, node_status, write_secret
from tests.test_cli import assert_one_line_error
from tests.util import REPO, mkfs, pid_alive, run_cli, wait_for

# -- mount(8)'s and umount(8)'s calling conventions (pure)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["/v", "/m"], ["mount", "/v", "/m"]),
        (["/v", "/m", "-o", "rw"], ["mount", "/v", "/m"]),
        (
            ["/v", "/m", "-o", "rw,nosuid,nodev,noexec,allow_other,_netdev,defaults,x-systemd.a"],
            ["mount", "/v", "/m", "-o", "nosuid,nodev,noexec,allow_other"],
        ),
        (
            ["/v", "/m", "-n", "-o", "mirror=127.0.0.1:7400,mirror=[::1]:7401,secret_file=/k"],
            [
                "mount",
                "/v",
                "/m",
                "--mirror",
                "127.0.0.1:7400",
                "--mirror",
                "[::1]:7401",
                "--secret-file",
                "/k",
            ],
        ),
        (["/v", "/m", "-o", "ro,noatime"], ["mount", "/v", "/m", "--read-only", "-o", "noatime"]),
        (["-r", "/v", "/m"], ["mount", "/v", "/m", "--read-only"]),
        (["/v", "/m", "-o", "ro,rw"], ["mount", "/v", "/m"]),
        (["/v", "/m", "-w", "-o", "rw,ro"], ["mount", "/v", "/m", "--read-only"]),
        (
            ["/v", "/m", "-o", "max_log=1G,commit_interval=2,log=syslog,log_level=debug,insecure"],
            [
                "mount",
                "/v",
                "/m",
                "--max-log",
                "1G",
                "--commit-interval",
                "2",
                "--log",
                "syslog",
                "--log-level",
                "debug",
                "--insecure",
            ],
        ),
        (["/v", "/m", "-onoauto,nofail,user,comment=x"], ["mount", "/v", "/m"]),
        (
            ["/v", "/m", "-t", "fuse.mirrorfs", "-o", "nonempty"],
            ["mount", "/v", "/m", "-o", "nonempty"],
        ),
    ],
)
def test_mount_helper_arguments(argv, expected):
    assert mount_argv(argv) == (expected, False, False)


def test_mount_helper_fake_and_verbose():
    assert mount_argv(["-fv", "/v", "/m"]) == (["mount", "/v", "/m"], True, True)
    proc = subprocess.run(
        [sys.executable, "-m", "mirrorfs.mount_helper", "mount", "-f", "/v", "/m", "-o", "ro"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "mount.mirrorfs: mirrorfs mount /v /m --read-only"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["/v"], "usage: mount.mirrorfs VOLDIR MOUNTPOINT"),
        (["/v", "/m", "/x"], "usage: mount.mirrorfs VOLDIR MOUNTPOINT"),
        (["/v", "/m", "-o"], "option -o needs a value"),
        (["/v", "/m", "-o", "mirror"], "option mirror needs a value"),
        (["/v", "/m", "-x"], "unknown option -x"),
        (["/v", "/m", "-N", "123"], "mount namespaces"),
    ],
)
def test_mount_helper_bad_arguments(argv, message):
    with pytest.raises(HelperError, match=message):
        mount_argv(argv)


def test_umount_helper_arguments():
    assert umount_argv(["/m"]) == ["umount", "/m"]
    assert umount_argv(["/m", "-n", "-t", "fuse.mirrorfs"]) == ["umount", "/m"]
    assert umount_argv(["-l", "/m"]) == ["umount", "/m", "--lazy"]
    with pytest.raises(HelperError, match="usage: umount.mirrorfs MOUNTPOINT"):
        umount_argv([])


def test_mount_helper_errors_are_one_line(tmp_path):
    # Through the helper's own entry: a read-only mount that should mirror is refused.
    vol = tmp_path / "vol"
    mkfs(vol, "8M")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mirrorfs.mount_helper",
            "mount",
            str(vol),
            str(tmp_path),
            "-o",
            "ro,mirror=127.0.0.1:7400",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert_one_line_error(proc, code=1, contains="--mirror needs a read-write mount")
    proc = subprocess.run(
        [sys.executable, "-m", "mirrorfs.mount_helper", "mount", str(vol)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert_one_line_error(proc, code=2, contains="usage: mount.mirrorfs")


# -- help


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_option_has_help_and_shows_its_default(capsys):
    parser = cli.build_parser()
    for name, sub in _subparsers(parser).items():
        text = sub.format_help()
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"mirrorfs {name} {action.option_strings[0]} has no help"
            if action.default not in (None, False, [], argparse.SUPPRESS):
                shown = str(action.default)
                assert f"default: {shown}" in " ".join(text.split()), (
                    f"mirrorfs {name} {action.option_strings[0]} does not show {shown!r}"
                )


def test_help_groups_the_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    groups = [
        "volume commands:",
        "mirroring commands:",
        "failover commands:",
        "inspection commands:",
    ]
    positions = [out.index(g) for g in groups]
    assert positions == sorted(positions)
    section = {g: out[p:] for g, p in zip(groups, positions, strict=True)}
    assert "  promote " in section["failover commands:"].split("inspection")[0]
    assert "  replica " in section["mirroring commands:"].split("failover")[0]
    for command in _subparsers(cli.build_parser()):
        assert f"\n  {command} " in out, command
    assert "exit status: 0 success; 1 " in out
    assert "other commands:" not in out


# -- misleading messages made right: each one line, at once


@pytest.mark.parametrize(
    "argv, message",
    [
        (["verify", "d", "--timeout", "-5"], "argument --timeout: '-5' must be positive"),
        (["verify", "d", "--timeout", "0"], "argument --timeout: '0' must be positive"),
        (
            ["switchover", "d", "--to", "h:1", "--listen", "h:2", "--timeout", "0"],
            "argument --timeout: '0' must be positive",
        ),
        (["stop", "d", "--timeout", "nan"], "argument --timeout: 'nan' must be positive"),
        (["mount", "a", "b", "--log", "/no/such/dir/x.log"], "argument --log: '/no/such/dir"),
        (
            ["replica", "d", "--listen", "127.0.0.1:0", "--log-level", "loud"],
            "argument --log-level: invalid choice: 'loud'",
        ),
    ],
)
def test_arguments_are_validated_at_parse_time(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mirrorfs: error: {message}"), err
    assert err.count("\n") == 1, err


def test_fsck_and_mount_of_a_regular_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("not a volume")
    assert_one_line_error(run_cli("fsck", f), code=1, contains=f"{f} is not a volume directory")
    assert_one_line_error(run_cli("stop", f), code=1, contains=f"{f}: no such volume directory")


def test_mount_with_a_bad_secret_file_says_why(tmp_path, capsys):
    vol = str(tmp_path / "vol")
    mkfs(vol, "8M")
    key = tmp_path / "key"
    key.write_text("a secret of enough length\n")
    key.chmod(0o644)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    argv = ["mount", vol, str(mnt), "--mirror", "127.0.0.1:9", "--secret-file", str(key)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"mirrorfs: error: {key}: secret file is accessible by group or others (mode 0644); "
        "run chmod 600 on it"
    )
    assert cli.main([*argv[:-1], str(tmp_path / "missing")]) == 1
    assert "cannot open secret file: No such file or directory" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(vol, "mount.pid"))


def test_log_stderr_needs_the_foreground(tmp_path, capsys):
    assert cli.main(["mount", str(tmp_path), str(tmp_path), "--log", "stderr"]) == 1
    assert capsys.readouterr().err.strip() == (
        "mirrorfs: error: --log stderr needs --foreground (a detached daemon has no stderr)"
    )


def test_stop_when_nothing_runs(tmp_path):
    vol = tmp_path / "vol"
    mkfs(vol, "8M")
    (vol / "replica.pid").write_text(f"{os.getpid()}\n")  # a stale pid file naming us
    assert_one_line_error(
        run_cli("stop", vol), code=1, contains=f"no mirrorfs daemon is running for {vol}"
    )


# -- the daemon's log


@pytest.fixture
def root_logging():
    """Restore the root logger's handlers and level after a test that sets them up."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield root
    finally:
        for h in root.handlers:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)


def test_log_file_rotates_and_the_std_fds_follow(tmp_path):
    path = str(tmp_path / "d.log")
    with open(path, "ab") as f:
        std = os.dup(f.fileno())  # stands for the detached daemon's stderr
    h = daemon.DaemonLogFile(path, max_bytes=2000, backups=2, std_fds=(std,))
    h.setFormatter(logging.Formatter(daemon.LOG_FORMAT))
    logger = logging.getLogger("test.rotation")
    logger.propagate = False
    logger.addHandler(h)
    try:
        for i in range(100):
            logger.warning("record %03d %s", i, "x" * 40)
        os.write(std, b"written to stderr\n")
    finally:
        logger.removeHandler(h)
        h.close()
        os.close(std)
    assert os.path.exists(path + ".1") and os.path.exists(path + ".2")
    assert not os.path.exists(path + ".3")
    for name in (path, path + ".1"):
        assert os.path.getsize(name) <= 2000 + 200
    with open(path) as f:
        text = f.read()
    assert "record 099" in text and "written to stderr" in text  # the fd follows


def test_log_file_reopens_after_logrotate_moved_it(tmp_path):
    path = str(tmp_path / "d.log")
    h = daemon.DaemonLogFile(path, std_fds=())
    logger = logging.getLogger("test.reopen")
    logger.propagate = False
    logger.addHandler(h)
    try:
        logger.warning("before")
        os.rename(path, path + ".old")
        logger.warning("still to the moved file")
        h.reopen()
        logger.warning("after")
    finally:
        logger.removeHandler(h)
        h.close()
    with open(path + ".old") as f:
        assert f.read() == "before\nstill to the moved file\n"
    with open(path) as f:
        assert f.read() == "after\n"


def test_log_to_syslog(tmp_path, monkeypatch, root_logging):
    sock_path = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(sock_path)
        s.settimeout(10)
        monkeypatch.setattr(daemon, "SYSLOG_SOCKET", sock_path)
        daemon.setup_daemon_logging(
            str(tmp_path), debug=False, ready_fd=3, target="syslog", level="warning"
        )
        logging.getLogger("mirrorfs.test").info("not at warning")
        logging.getLogger("mirrorfs.test").warning("to syslog")
        data = s.recv(4096).decode()
    # <28>: facility daemon (3), priority warning (4)
    assert data == f"<28>mirrorfs[{os.getpid()}]: WARNING mirrorfs.test: to syslog\x00"
    assert not os.path.exists(tmp_path / "mirrorfs.log")


# -- systemd's readiness protocol


def _notify_socket(tmp_path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify.sock"))
    s.settimeout(60)
    return s


def test_notify_systemd(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert daemon.notify_systemd("READY=1") is False
    with _notify_socket(tmp_path) as s:
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
        assert daemon.notify_systemd("READY=1") is True
        assert s.recv(4096) == b"READY=1"
    name = f"mirrorfs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert daemon.notify_systemd("STOPPING=1") is True
        assert s.recv(4096) == b"STOPPING=1"


# -- a replica daemon (no mount): systemd readiness, SIGHUP, refusals, mirrorfs stop


def test_replica_daemon_under_systemd_and_stop(tmp_path):
    """``replica --foreground`` as a Type=notify service: READY=1 once it listens, its log
    reopened on SIGHUP, source-only commands refused in one line, STOPPING=1 and a clean
    exit on SIGTERM; then ``mirrorfs stop`` on the detached daemon."""
    rep_dir = tmp_path / "rep"
    port = free_port()
    env = dict(os.environ, PYTHONPATH=REPO, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    with _notify_socket(tmp_path) as s:
        popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mirrorfs",
                "replica",
                str(rep_dir),
                "--listen",
                f"127.0.0.1:{port}",
                "--foreground",
                "-o",
                "allow_other",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
        )
        try:
            ready = s.recv(4096).decode()
            assert ready.split("\n")[0] == "READY=1", ready
            assert f"MAINPID={popen.pid}" in ready.split("\n")
            st = node_status(rep_dir)  # it answers once ready
            assert st is not None and st["role"] == "target"
            assert st["mount_options"] == ["allow_other"]

            for argv, what in (
                (["verify", rep_dir], "verify"),
                (["mirror", rep_dir, "--add", "127.0.0.1:9"], "mirror --add"),
                (
                    [
                        "switchover",
                        rep_dir,
                        "--to",
                        "127.0.0.1:9",
                        "--listen",
                        f"127.0.0.1:{free_port()}",
                    ],
                    "switchover",
                ),
            ):
                assert_one_line_error(
                    run_cli(*argv),
                    code=1,
                    contains=f"{rep_dir} is a replica (target): {what} only makes sense on "
                    "a source; run it on the source node",
                )

            log_path = rep_dir / "mirrorfs.log"
            os.rename(log_path, tmp_path / "rotated.log")
            popen.send_signal(signal.SIGHUP)
            wait_for(lambda: "log file reopened (SIGHUP)" in log_text(rep_dir), 30, "reopen")
            assert popen.poll() is None

            popen.send_signal(signal.SIGTERM)
            assert s.recv(4096) == b"STOPPING=1"
            assert popen.wait(timeout=60) == 0
        finally:
            if popen.poll() is None:
                popen.kill()
                popen.wait()

    # Detached this time; ``mirrorfs stop`` ends it and waits.
    proc = run_cli("replica", rep_dir, "--listen", f"127.0.0.1:{port}")
    assert proc.returncode == 0, proc.stderr
    with open(rep_dir / "replica.pid") as f:
        pid = int(f.read())
    try:
        proc = run_cli("stop", rep_dir)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"stopped the replica daemon of {rep_dir} (pid {pid})"
        assert not pid_alive(pid) and node_status(rep_dir) is None
        assert "received SIGTERM: shutting down" in log_text(rep_dir)
        assert_one_line_error(run_cli("stop", rep_dir), code=1, contains="no mirrorfs daemon")
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_replica_secret_file_reason_reaches_the_terminal(tmp_path):
    key = write_secret(tmp_path / "key", "a secret of enough length")
    os.chmod(key, 0o640)
    proc = run_cli("replica", tmp_path / "rep", "--listen", "127.0.0.1:0", "--secret-file", key)
    assert_one_line_error(proc, code=1, contains="secret file is accessible by group or others")


def test_source_commands_on_a_stopped_replica(tmp_path):
    from mirrorfs.store.nodestate import NodeState

    vol = str(tmp_path / "rep")
    mkfs(vol, "8M")
    state = NodeState.load(vol)
    state.role = "target"
    state.save(vol)
    for argv, what in (
        (["verify", vol], "verify"),
        (["mirror", vol, "--add", "127.0.0.1:9"], "mirror --add"),
        (["mirror", vol, "--remove", "127.0.0.1:9"], "mirror --remove"),
        (["switchover", vol, "--to", "127.0.0.1:9", "--listen", "127.0.0.1:9"], "switchover"),
    ):
        assert_one_line_error(
            run_cli(*argv),
            code=1,
            contains=f"{vol} is a replica (target): {what} only makes sense on a source",
        )


def test_detached_daemon_logs_where_log_says(tmp_path):
    """``--log FILE``: the detached daemon's records (and its stderr) go to FILE, not to
    DIR/mirrorfs.log; ``--log none``: nowhere; ``--log-level warning``: no INFO."""
    log_file = tmp_path / "elsewhere.log"
    rep1, rep2 = tmp_path / "rep1", tmp_path / "rep2"
    started = []
    try:
        proc = run_cli("replica", rep1, "--listen", f"127.0.0.1:{free_port()}", "--log", log_file)
        assert proc.returncode == 0, proc.stderr
        started.append(rep1)
        proc = run_cli("replica", rep2, "--listen", f"127.0.0.1:{free_port()}", "--log", "none")
        assert proc.returncode == 0, proc.stderr
        started.append(rep2)
        text = log_file.read_text()
        assert "INFO mirrorfs.node.replica: replica of" in text
        assert not (rep1 / "mirrorfs.log").exists() and not (rep2 / "mirrorfs.log").exists()
    finally:
        for d in started:
            run_cli("stop", d)
    assert "received SIGTERM: shutting down" in log_file.read_text()
    assert not (rep2 / "mirrorfs.log").exists()
    rep3 = tmp_path / "rep3"
    log3 = tmp_path / "quiet.log"
    proc = run_cli(
        "replica",
        rep3,
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--log",
        log3,
        "--log-level",
        "warning",
    )
    assert proc.returncode == 0, proc.stderr
    assert run_cli("stop", rep3).returncode == 0
    assert " INFO " not in log3.read_text()
