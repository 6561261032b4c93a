"""Starting the processes that serve a volume, and what every command prints: below node/ and
cli, above nothing but the store's file names.

A daemon (``mount`` or ``replica``) runs in the foreground as ``mirrorfs ARGV --foreground``.
Started without ``--foreground``, the command runs that in a new session (``run_detached``)
and waits on a *ready pipe*: the child writes one line, ``ok`` once it serves, or
``error: MESSAGE`` if it failed first (``run_foreground``); the parent then exits 0 or
prints the message as its own one-line error. A child that dies without a word leaves the
pipe empty, and the parent points at the log file.

Under systemd (``Type=notify``, ``--foreground``) the daemon says ``READY=1`` on
``$NOTIFY_SOCKET`` when it reports "ok" (``notify_systemd``); a detached child never does
(its parent is not the service's main process). Where a daemon logs is ``--log``
(``setup_daemon_logging``): DIR/mirrorfs.log by default, rotated (``DaemonLogFile``) and
reopened on SIGHUP (``reopen_logs``), or syslog, stderr, nowhere.

A user error is a ``CliError`` (or an exception the command line knows to print as one
line, ``describe``); ``mirrorfs.cli.main`` prints ``mirrorfs: error: ...`` and exits 1.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
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


def notify_systemd(state: str) -> bool:
    """Tell systemd ``state`` (``READY=1``, ``STOPPING=1``, ...) when it started this process
    as a ``Type=notify`` service: one datagram to the socket named by ``$NOTIFY_SOCKET``
    (sd_notify(3)'s protocol, without libsystemd). False when there is nobody to tell."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path or path[0] not in "/@":
        return False
    address = "\0" + path[1:] if path[0] == "@" else path  # "@": the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s) at %s: %s", state, path, exc.strerror or exc)
        return False
    return True


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
        h = DaemonLogFile(log_file)
        h.setFormatter(formatter)
        root.addHandler(h)


# -- a daemon's log: --log FILE|syslog|stderr|none, --log-level

#: Where ``--log`` may send a daemon's log besides a file.
LOG_SYSLOG, LOG_STDERR, LOG_NONE = "syslog", "stderr", "none"
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"
#: The file log rotates past this size, keeping this many old files (FILE.1 ... FILE.N).
LOG_MAX_BYTES = 64 << 20
LOG_BACKUPS = 4
#: syslog's socket (journald listens there too).
SYSLOG_SOCKET = "/dev/log"
SYSLOG_FORMAT = "mirrorfs[%(process)d]: %(levelname)s %(name)s: %(message)s"


class DaemonLogFile(logging.handlers.RotatingFileHandler):
    """A daemon's log file: rotated past ``LOG_MAX_BYTES``, reopened on SIGHUP (after
    logrotate moved it). A detached daemon's stdout and stderr are the same file (libfuse's
    messages, a dying interpreter's last words): they follow it to the new file."""

    def __init__(
        self,
        path: str,
        max_bytes: int = LOG_MAX_BYTES,
        backups: int = LOG_BACKUPS,
        std_fds: tuple[int, ...] = (1, 2),
    ) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups)
        self.std_fds = std_fds

    def _ident(self) -> tuple[int, int] | None:
        try:
            st = os.fstat(self.stream.fileno()) if self.stream else os.stat(self.baseFilename)
        except (OSError, ValueError):
            return None
        return (st.st_dev, st.st_ino)

    def doRollover(self) -> None:
        old = self._ident()
        super().doRollover()
        self._follow(old)

    def reopen(self) -> None:
        """Write to a new file at the path from now on (the old one was moved away)."""
        self.acquire()
        try:
            old = self._ident()
            if self.stream:
                self.stream.close()
            self.stream = self._open()
            self._follow(old)
        finally:
            self.release()

    def _follow(self, old: tuple[int, int] | None) -> None:
        """Point the std fds that wrote to the old file at the new one."""
        if old is None or self.stream is None:
            return
        for fd in self.std_fds:
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == old:
                os.dup2(self.stream.fileno(), fd)


def reopen_logs() -> None:
    """SIGHUP: reopen every daemon log file (logrotate's ``postrotate`` sends it)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, DaemonLogFile):
            handler.reopen()
    log.info("log file reopened (SIGHUP)")


def daemon_log_file(volume_dir: str, target: str | None) -> str | None:
    """The file that a daemon of ``volume_dir`` logs to for ``--log target``: FILE, by
    default DIR/mirrorfs.log; None for syslog, stderr or none."""
    if target in (LOG_SYSLOG, LOG_STDERR, LOG_NONE):
        return None
    if target:
        return os.path.abspath(target)
    return os.path.join(os.path.abspath(volume_dir), DAEMON_LOG_FILE)


def check_log_target(target: str | None, *, foreground: bool) -> None:
    """Refuse a ``--log`` a daemon could not follow (CliError), before it starts."""
    if target == LOG_STDERR and not foreground:
        raise CliError("--log stderr needs --foreground (a detached daemon has no stderr)")
    if target == LOG_SYSLOG and not os.path.exists(SYSLOG_SOCKET):
        raise CliError(f"--log syslog: {SYSLOG_SOCKET} does not exist (no syslog or journald)")


def child_env() -> dict[str, str]:
    """The environment of a child ``python -m mirrorfs``: it runs from "/", so PYTHONPATH
    must name this same checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_ROOT, env.get("PYTHONPATH")) if p)
    return env


def run_detached(argv: list[str], log_path: str | None, what: str) -> int:
    """Run ``mirrorfs ARGV --foreground`` in a new session, its stdout and stderr going to
    ``log_path`` (None: nowhere); return 0 once it reports "ok" on its ready pipe, else raise
    CliError with its one-line error."""
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "mirrorfs", *argv, "--foreground", "--ready-fd", str(write_fd)]
    env = child_env()
    # systemd hears from the process it started (a --foreground daemon), not from a child.
    env.pop("NOTIFY_SOCKET", None)
    try:
        with open(log_path or os.devnull, "ab") as logf:
            child = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                pass_fds=(write_fd,),
                start_new_session=True,
                cwd="/",
                env=env,
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
    where = f" (see {log_path})" if log_path else ""
    raise CliError(f"the {what} process exited with status {status}{where}")


def setup_daemon_logging(
    volume_dir: str,
    *,
    debug: bool,
    ready_fd: int | None,
    target: str | None = None,
    level: str = DEFAULT_LOG_LEVEL,
) -> None:
    """Logging of a foreground daemon, by ``--log target``: a file (DIR/mirrorfs.log when
    DIR exists, by default), syslog, stderr or nowhere; with a file, stderr as well unless
    detached (``ready_fd``: its stderr is that file already)."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else getattr(logging, level.upper()))
    formatter = logging.Formatter(LOG_FORMAT)
    handlers: list[logging.Handler] = []
    if target == LOG_SYSLOG:
        h: logging.Handler = logging.handlers.SysLogHandler(
            SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        h.setFormatter(logging.Formatter(SYSLOG_FORMAT))
        handlers.append(h)
    elif target == LOG_NONE:
        handlers.append(logging.NullHandler())
    else:
        path = daemon_log_file(volume_dir, target)
        if target == LOG_STDERR or ready_fd is None:
            handlers.append(logging.StreamHandler(sys.stderr))
        if path and (target or os.path.isdir(volume_dir)):
            handlers.append(DaemonLogFile(path))
    for h in handlers:
        if h.formatter is None:
            h.setFormatter(formatter)
        root.addHandler(h)


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

    def ready() -> None:
        report("ok")
        notify_systemd(f"READY=1\nSTATUS=serving\nMAINPID={os.getpid()}")

    try:
        serve(ready)
    except BaseException as exc:
        report(f"error: {describe(exc)}")
        raise
    report(f"error: the {what} ended before it was ready")
    return 0
