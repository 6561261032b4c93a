"""The replica daemon: one trio nursery that follows a source and serves a read-only mount.

Tasks of the nursery (one process, one trio loop, one thread)::

    control      DIR/control.sock (status, promote)              mirrorfs.node.control
    listener     TCP on --listen, a Receiver session per source   mirrorfs.repl.receiver
    fuse         the read-only mount (with --mount, once the replica is consistent): a
                 FuseSession with its kernel-cache invalidator    mirrorfs.fuse.mount

Cache coherence of the mount. The receiver applies a transaction between two awaits and
calls ``_on_applied`` in the same step, which drops the Filesystem's own caches of the
inodes and directories that the transaction's hints name (``Filesystem.invalidate``) and
hands the hints to the session's ``KernelInvalidator`` (mirrorfs.fuse.invalidate). A FUSE
handler, served by the same loop, thus never sees new blocks through old caches; the
kernel's caches are dropped afterwards, from a worker thread.

A replica whose own log has a hole (acknowledged seqs missing, store/logrecovery.py) cuts
it there and is not consistent again before its source has resent them
(``open_replica_volume``, store/holes.py): it is neither mounted nor promoted meanwhile.
The valid records after the hole are archived first (``DIR/archive/hole-...``,
store/archive.py), named in the warning and in status.

An initial sync replaces the volume's own files in DIR (``Volume.create_replica``: blocks,
log, node.json) and leaves the daemon's; ``_on_created`` still checks that the control
socket, the log file and the pid file are in place (cheap, and robust to an operator's
cleanup).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from mirrorfs.daemon import notify_systemd
from mirrorfs.fuse.lifecycle import (
    HANGUP_SIGNALS,
    MOUNT_SIGNALS,
    PidFile,
    watch_signals,
)
from mirrorfs.node.control import ControlError, ControlServer, socket_path
from mirrorfs.node.events import EventSource
from mirrorfs.node.replica_volume import ReplicaError, open_replica_volume, prepare_dir
from mirrorfs.repl.auth import check_listen_policy
from mirrorfs.repl.receiver import Receiver
from mirrorfs.repl.tls import TlsConfig, accept, peer_address
from mirrorfs.repl.wire import Switchover, SwitchoverDone, SwitchoverResult
from mirrorfs.store.files import (
    DAEMON_LOG_FILE,
    REPLICA_PID_FILE,
)
from mirrorfs.store.txn import Transaction
from mirrorfs.store.volume import Volume

if TYPE_CHECKING:
    from mirrorfs.fs.filesystem import Filesystem
    from mirrorfs.fuse.invalidate import KernelInvalidator

log = logging.getLogger(__name__)

#: The control commands of a source, and how a user asks for them (a replica refuses them).
SOURCE_ONLY_COMMANDS = {
    "verify": "verify",
    "mirror-add": "mirror --add",
    "mirror-remove": "mirror --remove",
    "switchover": "switchover",
}


@dataclass(slots=True)
class ReplicaConfig:
    """What ``mirrorfs replica`` was asked to do."""

    volume_dir: str
    host: str = "127.0.0.1"
    port: int = 0
    mountpoint: str | None = None
    secret: bytes | None = None
    #: Where ``secret`` came from: passed on to the mount that a switchover starts.
    secret_file: str | None = None
    insecure: bool = False
    #: TLS for every source (``--tls-cert/--tls-key/--tls-ca``; also passed on to the
    #: mount a switchover starts).
    tls: TlsConfig | None = None
    #: Extra FUSE options for the read-only mount (e.g. ``allow_other``).
    mount_options: Sequence[str] = field(default_factory=tuple)
    #: ``--log``/``--log-level`` as given: the successor of a switchover logs the same way.
    log_argv: Sequence[str] = ()
    write_pid_file: bool = True
    #: Serve Prometheus metrics here (``--metrics HOST:PORT``; mirrorfs.node.metrics).
    metrics: tuple[str, int] | None = None
    #: ``--metrics`` as given: the mount that follows a promotion or switchover serves there.
    metrics_argv: Sequence[str] = ()


@dataclass(slots=True)
class _LiveMount:
    """The read-only mount while it serves: the caches that an applied transaction drops."""

    fs: Filesystem
    invalidator: KernelInvalidator


class ReplicaNode:
    """The replica daemon's state; ``run`` serves until cancelled."""

    def __init__(self, cfg: ReplicaConfig) -> None:
        self.cfg = cfg
        self.path = os.path.abspath(cfg.volume_dir)
        self.port = cfg.port
        self.receiver: Receiver | None = None
        self.control: ControlServer | None = None
        self.mount_error = ""
        self._live: _LiveMount | None = None
        self._mount_wanted = False  # a mount task is running or failed for good
        self._nursery: trio.Nursery | None = None
        self._pid_file: PidFile | None = None
        self._log_ident: tuple[int, int] | None = None
        self._listen_scope = trio.CancelScope()
        self._listening_done = trio.Event()
        self.promoted: dict[str, Any] | None = None
        self.events = EventSource(self.document)  # ``mirrorfs events`` (node/events.py)

    @property
    def mounted(self) -> bool:
        """Whether the read-only mount is live."""
        return self._live is not None

    # ------------------------------------------------------------------------------- run

    async def run(
        self, *, task_status: trio.TaskStatus[ReplicaNode] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; ``started`` with this node once it listens."""
        cfg = self.cfg
        check_listen_policy(cfg.host, cfg.secret, cfg.insecure, tls=cfg.tls is not None)
        if cfg.mountpoint:
            from mirrorfs.fuse.mount import (
                NONEMPTY_OPTION,
                MountError,
                check_mountpoint,
                has_option,
            )

            try:
                check_mountpoint(
                    cfg.mountpoint, nonempty=has_option(cfg.mount_options, NONEMPTY_OPTION)
                )
            except MountError as exc:
                raise ReplicaError(str(exc)) from None
        path = prepare_dir(self.path)
        self._remember_log_file()
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._close_volume)  # last: the volume's lock goes with it
            handlers = {"status": self._cmd_status, "promote": self._cmd_promote}
            handlers.update({cmd: self._source_only(cmd) for cmd in SOURCE_ONLY_COMMANDS})
            control = ControlServer(socket_path(path), handlers, {"events": self.events.stream})
            control.bind()  # refuses when another daemon serves this directory
            self.control = control
            stack.callback(control.close)
            volume = open_replica_volume(path)
            self.receiver = self._make_receiver(volume)
            listeners = await self._listen()
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(control.serve)
                    await nursery.start(self._serve_sources, listeners)
                    if cfg.metrics is not None:
                        from mirrorfs.node.metrics import serve_metrics

                        await nursery.start(serve_metrics, cfg.metrics, self.document)
                    if cfg.write_pid_file:
                        pid_file = PidFile(os.path.join(path, REPLICA_PID_FILE))
                        self._pid_file = stack.enter_context(pid_file)
                    log.info(
                        "replica of %s listening on %s:%d (%s)",
                        path,
                        cfg.host or "*",
                        self.port,
                        "consistent" if volume and volume.consistent else "waiting for a source",
                    )
                    if volume is not None and volume.consistent:
                        self._on_consistent(volume)
                    task_status.started(self)
            finally:
                self._nursery = None

    def _make_receiver(self, volume: Volume | None) -> Receiver:
        """The Receiver, wired to this node: the one place that knows its callbacks."""
        return Receiver(
            self.path,
            volume,
            secret=self.cfg.secret,
            on_applied=self._on_applied,
            on_consistent=self._on_consistent,
            on_created=self._on_created,
            on_resynced=self._on_resynced,
            on_switchover=self._on_switchover,
        )

    async def _listen(self) -> list[trio.SocketListener]:
        cfg = self.cfg
        try:
            listeners = await trio.open_tcp_listeners(cfg.port, host=cfg.host or None)
        except OSError as exc:
            raise ReplicaError(
                f"cannot listen on {cfg.host or '*'}:{cfg.port}: {exc.strerror or exc}"
            ) from None
        self.port = listeners[0].socket.getsockname()[1]
        return listeners

    async def _serve_sources(self, listeners, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept sources until promotion cancels ``_listen_scope``."""
        try:
            with self._listen_scope:
                assert self.receiver is not None
                await trio.serve_listeners(self._serve_one, listeners, task_status=task_status)
        finally:
            self._listening_done.set()

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        """One accepted connection: its TLS handshake (or the plain-TCP check), then the
        receiver's handshake; a peer refused by the first never reaches the second. Both
        count against the receiver's caps on unauthenticated connections."""
        assert self.receiver is not None
        prepare = functools.partial(accept, tls=self.cfg.tls, timeout=self._handshake_timeout())
        await self.receiver.serve(stream, peer_address(stream), prepare=prepare)

    def _handshake_timeout(self) -> float:
        return self.receiver.handshake_timeout if self.receiver is not None else 10.0

    def _close_volume(self) -> None:
        vol = self.receiver.volume if self.receiver is not None else None
        if vol is not None:
            vol.close()
            log.info("volume closed")

    # ------------------------------------------------------------------------- promotion

    async def _cmd_promote(self, request: dict[str, Any]) -> dict[str, Any]:
        """Stop receiving, apply what is logged, start a new epoch, then exit the daemon."""
        from mirrorfs.node.promote import PromoteError, check_source_gone, promote_volume

        vol = self.receiver.volume if self.receiver is not None else None
        if vol is None or not vol.consistent:
            raise ControlError(
                "the replica is not consistent (initial sync or resync incomplete): "
                "promoting it would give a corrupt volume"
            )
        if self.promoted is not None:
            raise ControlError("already promoted")
        before = self.receiver.status() if self.receiver is not None else {}
        connected = before.get("state") == "streaming"
        if not request.get("force"):
            try:
                check_source_gone(before)
            except PromoteError as exc:
                raise ControlError(str(exc)) from None
        # No transaction is received or applied after this: the sessions are cancelled.
        self._listen_scope.cancel()
        await self._listening_done.wait()
        try:
            report = promote_volume(vol)
        except PromoteError as exc:
            raise ControlError(str(exc)) from None
        if connected:
            report["old_source"] = (
                f"the old source {before.get('source_address')} was connected; it had "
                f"announced seq {before.get('source_last_seq')} when it connected and this "
                f"node received up to seq {report['last_applied_seq']}"
            )
        else:
            report["old_source"] = "unknown: the old source is not connected"
        report["mountpoint"] = os.path.abspath(self.cfg.mountpoint) if self.cfg.mountpoint else ""
        report["mount_options"] = list(self.cfg.mount_options)
        report["metrics_argv"] = list(self.cfg.metrics_argv)
        self.promoted = report
        self.events.poke()
        assert self._nursery is not None
        self._nursery.start_soon(self._exit_after_reply)
        return {"promoted": report}

    def _on_switchover(self, msg: Switchover) -> SwitchoverDone:
        """Planned switchover: the receiver found us at the source's seq; promote now.

        Called by the receiver between two awaits (nothing is applied in between); the
        daemon then hands the volume to a read-write mount (mirrorfs.node.switchover).
        """
        from mirrorfs.node.switchover import take_over

        vol = self.receiver.volume if self.receiver is not None else None
        if self.promoted is not None or vol is None:
            return SwitchoverDone(SwitchoverResult.REFUSED, text="already promoted")
        reply, report = take_over(vol, msg, mountpoint=self.cfg.mountpoint or "")
        if report is not None:
            self.promoted = report
            assert self._nursery is not None
            self._nursery.start_soon(self._hand_over, report)
        return reply

    async def _hand_over(self, report: dict[str, Any]) -> None:
        from mirrorfs.node.handover import spawn
        from mirrorfs.node.switchover import successor_argv
        from mirrorfs.repl.receiver import ReceiverState

        # Let the answer go out and the old source close its end first: closing ours with
        # its frames unread would reset the connection, the answer with it.
        with trio.move_on_after(2.0):
            while self.receiver is not None and self.receiver.state is ReceiverState.STREAMING:
                await trio.sleep(0.01)
        self._listen_scope.cancel()
        # The helper waits for the volume's lock, which this process holds to its last step.
        spawn(self.path, successor_argv(self.path, report, self.cfg))
        log.info("switched over: the replica daemon exits; the volume is now a source")
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _exit_after_reply(self) -> None:
        # Let the control server send the reply, then unmount and close everything.
        await trio.sleep(0.2)
        log.info("promoted: the replica daemon exits; the volume is now a source")
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    # ---------------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": "target", "volume_dir": self.path}
        out["listen"] = f"{self.cfg.host or '*'}:{self.port}"
        out["tls"] = self.cfg.tls is not None
        out["pid"] = os.getpid()
        if self.receiver is not None:
            out.update(self.receiver.status())
        out["mountpoint"] = self.cfg.mountpoint or ""
        out["mount_options"] = [
            o.strip() for opt in self.cfg.mount_options for o in opt.split(",") if o.strip()
        ]
        out["mounted"] = self.mounted
        out["mount_error"] = self.mount_error
        return out

    def document(self) -> dict[str, Any]:
        """The status document (mirrorfs.node.status_model) of this node now."""
        from mirrorfs.node.status_model import status_document

        doc = status_document({**self.status(), "running": True}, self.path)
        doc["promoted"] = self.promoted is not None
        return doc

    async def _cmd_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.status()}

    def _source_only(self, cmd: str):
        """The answer to a source's control command (``verify`` ...) asked of a replica."""

        async def refuse(request: dict[str, Any]) -> dict[str, Any]:
            raise ControlError(
                f"{self.path} is a replica (target): {SOURCE_ONLY_COMMANDS[cmd]} only makes "
                "sense on a source; run it on the source node"
            )

        return refuse

    # ------------------------------------------------------------------- receiver events

    def _on_created(self, volume: Volume) -> None:
        """An initial sync replaced the volume files: make sure the daemon's files are there."""
        if self.control is not None:
            self.control.rebind_if_gone()
        self._reopen_log_file()
        if self._pid_file is not None:
            self._pid_file.write()

    def _on_consistent(self, volume: Volume) -> None:
        if not volume.consistent:
            return
        if self.cfg.mountpoint and not self._mount_wanted and self._nursery is not None:
            self._mount_wanted = True
            self._nursery.start_soon(self._serve_mount, volume, name="fuse")

    def _on_applied(self, txn: Transaction) -> None:
        # Runs right after the apply, in the same step of the loop (no await in between).
        live = self._live
        if live is None:
            if self.receiver is not None and self.receiver.volume is not None:
                self._on_consistent(self.receiver.volume)  # a mount that could not start yet
            return
        live.fs.invalidate(txn.hints)
        live.invalidator.add_hints(txn.hints)

    def _on_resynced(self, volume: Volume) -> None:
        """A resync group was applied in this same step: any block may have changed."""
        live = self._live
        if live is None:
            self._on_consistent(volume)
            return
        live.invalidator.add_inodes(live.fs.invalidate_all())

    # ---------------------------------------------------------------------------- mount

    async def _serve_mount(self, volume: Volume) -> None:
        """The read-only mount, until it is unmounted from outside or the daemon ends."""
        from mirrorfs.fs.filesystem import Filesystem
        from mirrorfs.fuse.invalidate import KernelInvalidator
        from mirrorfs.fuse.mount import FuseSession, MountError, fuse_options
        from mirrorfs.fuse.operations import Operations

        assert self.cfg.mountpoint
        mountpoint = os.path.abspath(self.cfg.mountpoint)
        try:
            fs = Filesystem(volume, read_only=True)
        except Exception as exc:
            # E.g. the source never made a filesystem: try again after the next transaction.
            self.mount_error = f"cannot mount {mountpoint}: no filesystem: {exc}"
            log.error("%s (replication goes on)", self.mount_error)
            self._mount_wanted = False
            return
        session = None
        try:
            options = fuse_options(self.path, self.cfg.mount_options, read_only=True)
            invalidator = KernelInvalidator()
            ops = Operations(fs, volume, read_only=True)
            with FuseSession(ops, mountpoint, options, invalidator=invalidator) as session:
                # From the Filesystem to here there is no await: no transaction landed unseen.
                self._live, self.mount_error = _LiveMount(fs, invalidator), ""
                log.info("replica mounted read-only at %s (seq %d)", mountpoint, volume.last_seq)
                try:
                    await session.serve()
                finally:
                    self._live = None
            log.warning("%s was unmounted from outside; replication goes on", mountpoint)
        except MountError as exc:
            self.mount_error = str(exc)
            log.error("%s (replication goes on)", self.mount_error)
        finally:
            fs.close()
            if session is not None:
                log.info("unmounted %s", mountpoint)

    # ------------------------------------------------------------------ node-local files

    def _remember_log_file(self) -> None:
        try:
            st = os.stat(os.path.join(self.path, DAEMON_LOG_FILE))
        except OSError:
            return
        self._log_ident = (st.st_dev, st.st_ino)

    def _reopen_log_file(self) -> None:
        """Write the log to a new DIR/mirrorfs.log after the old one was wiped away."""
        log_path = os.path.join(self.path, DAEMON_LOG_FILE)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler) and handler.baseFilename == log_path:
                handler.close()  # reopened (appending) by the next record
        if self._log_ident is None:
            return
        for fd in (1, 2):  # a detached daemon's stdout and stderr are the log file too
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == self._log_ident and st.st_nlink == 0:
                new = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.dup2(new, fd)
                os.close(new)
        self._remember_log_file()


async def run_replica(
    cfg: ReplicaConfig, *, task_status: trio.TaskStatus[ReplicaNode] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the replica daemon until cancelled; ``started`` (with the node) once listening.

    Raises ReplicaError, ListenPolicyError, ControlError, StoreError (one-line messages)
    when it cannot start.
    """
    await ReplicaNode(cfg).run(task_status=task_status)


def main_replica(
    cfg: ReplicaConfig,
    *,
    on_ready: Callable[[], None] | None = None,
    on_hangup: Callable[[], None] | None = None,
) -> int:
    """Run the daemon in this process until SIGTERM/SIGINT; ``on_ready`` once listening,
    ``on_hangup`` on each SIGHUP (the log file is reopened there)."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            def stop(sig: signal.Signals) -> None:
                log.info("received %s: shutting down", sig.name)
                notify_systemd("STOPPING=1")
                nursery.cancel_scope.cancel()

            async def serve(task_status=trio.TASK_STATUS_IGNORED) -> None:
                await run_replica(cfg, task_status=task_status)
                nursery.cancel_scope.cancel()  # the daemon ended by itself (promoted)

            await nursery.start(watch_signals, stop, MOUNT_SIGNALS)
            if on_hangup is not None:
                await nursery.start(watch_signals, lambda sig: on_hangup(), HANGUP_SIGNALS)
            await nursery.start(serve)
            if on_ready is not None:
                on_ready()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        raise _sole(group) from None
    return 0


def _sole(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (trio's strict groups)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
