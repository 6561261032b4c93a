"""Starting the processes that serve a volume, and what every command prints: below node/ and
cli, above nothing but the store's file names.

A daemon (``mount`` or ``replica``) runs in the foreground as ``mirrorfs ARGV --foreground``.
Started without ``--foreground``, the command runs that in a new session (``run_detached``)
and waits on a *ready pipe*: the child writes one line, ``ok`` once it serves, or
``error: MESSAGE`` if it failed first (``run_foreground``); the parent then exits 0 or
prints the message as its own one-line error. A child that dies without a word leaves the
pipe empty, and the parent points at the log file.

A user error is a ``CliError`` (or an exception the command line knows to print as one
line, ``describe``); ``mirrorfs.cli.main`` prints ``mirrorfs: error: ...`` and exits 1.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable

import trio

from mirrorfs.store.files import DAEMON_LOG_FILE

log = logging.getLogger(__name__)

PROG = "mirrorfs"
LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
# The checkout this package is imported from (the directory that holds mirrorfs/).
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CliError(Exception):
    """A user error: the command line prints its message as one line, without traceback."""


def root_cause(exc: BaseException) -> BaseException:
    """The exception that a user must hear of: a trio nursery wraps a task's failure in
    exception groups (and cancels its siblings); this is the first leaf that is not a
    cancellation, or ``exc`` itself when it is no group."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        exc = (leaves or list(exc.exceptions))[0]
    return exc


def describe(exc: BaseException) -> str:
    """One line for the user (of the root cause, for an exception group)."""
    exc = root_cause(exc)
    # FsError is an OSError too (without a filename).
    if isinstance(exc, OSError) and exc.strerror:
        msg = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        msg = str(exc) or type(exc).__name__
    return " ".join(msg.split())


def setup_logging(
    debug: bool, *, log_file: str | None = None, stderr: bool = True, level: int = logging.WARNING
) -> None:
    """Root logging: bare messages on stderr for a command, timestamped lines for a daemon
    (``log_file``) or with ``debug``."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else level)
    formatter = logging.Formatter(LOG_FORMAT)
    if stderr:
        h: logging.Handler = logging.StreamHandler(sys.stderr)
        h.setFormatter(formatter if log_file or debug else logging.Formatter("%(message)s"))
        root.addHandler(h)
    if log_file:
        h = logging.FileHandler(log_file)
        h.setFormatter(formatter)
        root.addHandler(h)


def child_env() -> dict[str, str]:
    """The environment of a child ``python -m mirrorfs``: it runs from "/", so PYTHONPATH
    must name this same checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_ROOT, env.get("PYTHONPATH")) if p)
    return env


def run_detached(argv: list[str], log_path: str, what: str) -> int:
    """Run ``mirrorfs ARGV --foreground`` in a new session, logging to ``log_path``; return
    0 once it reports "ok" on its ready pipe, else raise CliError with its one-line error."""
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "mirrorfs", *argv, "--foreground", "--ready-fd", str(write_fd)]
    try:
        with open(log_path, "ab") as logf:
            child = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                pass_fds=(write_fd,),
                start_new_session=True,
                cwd="/",
                env=child_env(),
            )
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        lines = pipe.read().decode(errors="replace").strip().splitlines()
    # What the daemon warned of while it started (a log recovery, a weak secret) is the
    # user's to see, not only the log file's.
    while lines and lines[0].startswith("warning: "):
        print(f"{PROG}: {lines.pop(0)}", file=sys.stderr)
    message = lines[0].strip() if lines else ""
    if message == "ok":
        return 0
    if message.startswith("error: "):
        raise CliError(message[len("error: ") :])
    status = child.wait()
    raise CliError(f"the {what} process exited with status {status} (see {log_path})")


def setup_daemon_logging(volume_dir: str, *, debug: bool, ready_fd: int | None) -> None:
    """Logging of a foreground daemon: to DIR/mirrorfs.log (when DIR exists) and stderr,
    except for a detached child (``ready_fd``), whose stderr is that log file already."""
    log_file = os.path.join(volume_dir, DAEMON_LOG_FILE) if os.path.isdir(volume_dir) else None
    setup_logging(debug, log_file=log_file, stderr=ready_fd is None, level=logging.INFO)


class _StartupWarnings(logging.Handler):
    """The WARNING lines of a daemon's start (before it reports ready), one line each."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) < 10:
            self.lines.append(" ".join(record.getMessage().split()))


def run_foreground(
    what: str, ready_fd: int | None, serve: Callable[[Callable[[], None]], object]
) -> int:
    """Run ``serve(on_ready)`` until it returns, telling the ready pipe ``ready_fd`` (if any)
    "ok" when ``on_ready`` is called, or the one-line error that came first."""
    pending = ready_fd
    startup = _StartupWarnings() if ready_fd is not None else None
    if startup is not None:
        logging.getLogger().addHandler(startup)

    def report(message: str) -> None:
        nonlocal pending
        if startup is not None:
            logging.getLogger().removeHandler(startup)
        if pending is not None:
            lines = [f"warning: {w}" for w in (startup.lines if startup else [])]
            try:
                os.write(pending, "\n".join([*lines, message]).encode() + b"\n")
                os.close(pending)
            except OSError:
                pass  # the parent is gone: nobody to tell
            pending = None

    try:
        serve(lambda: report("ok"))
    except BaseException as exc:
        report(f"error: {describe(exc)}")
        raise
    report(f"error: the {what} ended before it was ready")
    return 0
