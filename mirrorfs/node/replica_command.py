"""``mirrorfs replica DIR --listen HOST:PORT [--mount MNT]``: start the replica daemon
(mirrorfs.node.replica), detached by default, in the foreground with ``--foreground``."""

from __future__ import annotations

import logging
import os
from typing import Any

from mirrorfs.daemon import (
    CliError,
    check_log_target,
    daemon_log_file,
    reopen_logs,
    run_detached,
    run_foreground,
    setup_daemon_logging,
)
from mirrorfs.node.control import ControlError
from mirrorfs.node.replica import ReplicaConfig, main_replica
from mirrorfs.node.replica_volume import ReplicaError, prepare_dir
from mirrorfs.node.volume_commands import log_arguments, metrics_arguments, quiet_auth
from mirrorfs.repl.address import format_address
from mirrorfs.repl.auth import check_listen_policy
from mirrorfs.repl.wire import ReplError

log = logging.getLogger(__name__)


def cmd_replica(args: Any) -> int:
    """``mirrorfs replica``: returns once the daemon listens (or, --foreground, at exit)."""
    from mirrorfs.fuse.mount import MountError

    check_log_target(args.log, foreground=args.foreground)
    try:
        if args.foreground:
            return _replica_foreground(args)
        return _replica_detached(args)
    except (ReplicaError, ReplError, ControlError, MountError) as exc:
        raise CliError(str(exc)) from None


def _replica_config(args: Any) -> ReplicaConfig:
    from mirrorfs.repl.auth import load_secret
    from mirrorfs.repl.tls import load_tls, tls_from_args

    host, port = args.listen
    secret = load_secret(args.secret_file) if args.secret_file else None
    files = tls_from_args(args)
    tls = load_tls(files) if files is not None else None
    check_listen_policy(host, secret, args.insecure, tls=tls is not None)
    _check_metrics(args)
    return ReplicaConfig(
        volume_dir=os.path.abspath(args.dir),
        host=host,
        port=port,
        mountpoint=os.path.abspath(args.mount) if args.mount else None,
        secret=secret,
        secret_file=os.path.abspath(args.secret_file) if args.secret_file else None,
        insecure=args.insecure,
        tls=tls,
        mount_options=tuple(args.options),
        log_argv=tuple(log_arguments(args)),
        metrics=getattr(args, "metrics", None),
        metrics_argv=tuple(metrics_arguments(args)),
    )


def _check_metrics(args: Any) -> None:
    from mirrorfs.node.metrics import MetricsAddressError, check_metrics_policy

    try:
        check_metrics_policy(getattr(args, "metrics", None), args.metrics_insecure)
    except MetricsAddressError as exc:
        raise CliError(str(exc)) from None


def _replica_detached(args: Any) -> int:
    """Start ``replica --foreground`` in a new session; wait until it says it listens."""
    # Fail here, with the user's terminal, when we can; the daemon gives the warnings.
    with quiet_auth():
        cfg = _replica_config(args)
    volume_dir = prepare_dir(cfg.volume_dir)
    host, port = args.listen
    extra: list[str] = []
    if cfg.mountpoint:
        extra += ["--mount", cfg.mountpoint]
    for opt in args.options:
        extra += ["-o", opt]
    if args.secret_file:
        extra += ["--secret-file", os.path.abspath(args.secret_file)]
    if args.insecure:
        extra.append("--insecure")
    if cfg.tls is not None:
        extra += cfg.tls.files.argv()
    extra += log_arguments(args)
    extra += metrics_arguments(args)
    if getattr(args, "debug", False):
        extra.append("--debug")
    argv = ["replica", volume_dir, "--listen", format_address(host, port), *extra]
    return run_detached(argv, daemon_log_file(volume_dir, args.log), "replica")


def _replica_foreground(args: Any) -> int:
    # Made first, so that a daemon on a new directory logs to DIR/mirrorfs.log from its start.
    volume_dir = prepare_dir(args.dir)
    setup_daemon_logging(
        volume_dir,
        debug=getattr(args, "debug", False),
        ready_fd=args.ready_fd,
        target=args.log,
        level=args.log_level,
    )
    return run_foreground(
        "replica",
        args.ready_fd,
        lambda on_ready: main_replica(
            _replica_config(args), on_ready=on_ready, on_hangup=reopen_logs
        ),
    )
