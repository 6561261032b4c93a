"""The source node's services in the mount process: shippers, retention, control socket.

They run in the mount's trio nursery next to ``pyfuse3.main``: one ``Shipper`` task per
target (fan-out, each at its own pace), the control socket (``status``, ``mirror-add``,
``mirror-remove``, ``verify``) and nothing on the commit path: a shipper only notes commits
(``vol.writer.subscribe``) and ships from the log, so an absent target never slows a writer.
Targets can be added and removed while the volume is in use; a new one gets its initial
sync from the running source. ``switchover`` hands the source role to a streaming target
(mirrorfs.node.switchover); the mount then ends and a replica daemon takes the volume.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from mirrorfs.node.control import ControlError, serve_control, socket_path
from mirrorfs.node.events import EventSource
from mirrorfs.repl.address import parse_address
from mirrorfs.repl.auth import PeerPolicyError, check_peer_policy
from mirrorfs.repl.lag import install_retention
from mirrorfs.repl.shipper import Shipper
from mirrorfs.repl.tls import TlsConfig, connector
from mirrorfs.repl.verify import VerifyError, verify_target
from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SourceConfig:
    mirrors: list[tuple[str, int]] = field(default_factory=list)
    secret: bytes | None = None
    #: Where ``secret`` came from: passed on to the replica daemon a switchover starts.
    secret_file: str | None = None
    max_log_bytes: int | None = None
    #: TXN bytes shipped and not yet acknowledged as received. Several 16 MiB transactions
    #: (the commit bound) must fit: with one in flight the target can neither group its
    #: fsyncs nor log one transaction while the next one travels (stop-and-wait).
    window_bytes: int = 64 << 20
    #: Keep accepting writes even after meeting a newer epoch (split brain on purpose).
    force: bool = False
    #: Ship to non-loopback targets without a secret (``mount --insecure``).
    insecure: bool = False
    #: TLS for every target (``--tls-cert/--tls-key/--tls-ca``; also passed on to the
    #: replica daemon a switchover starts).
    tls: TlsConfig | None = None
    #: The FUSE options (``-o``) of this read-write mount: status shows them, and a
    #: switchover gives them to the read-only mount of the replica daemon that follows.
    mount_options: tuple[str, ...] = ()
    #: ``--log``/``--log-level`` as given: the successor of a switchover logs the same way.
    log_argv: tuple[str, ...] = ()
    #: Serve Prometheus metrics here (``--metrics HOST:PORT``; mirrorfs.node.metrics).
    metrics: tuple[str, int] | None = None
    #: ``--metrics`` as given: the replica daemon that follows a switchover serves there.
    metrics_argv: tuple[str, ...] = ()
    #: Take a checkpoint every this many seconds (``mount --checkpoint-every``), keeping
    #: the ``checkpoint_keep`` newest of them (``--checkpoint-keep``; None: all).
    checkpoint_every: float | None = None
    checkpoint_keep: int | None = None


class SourceNode:
    """Replication and control for a read-write volume being served by this process."""

    def __init__(self, volume: Volume, cfg: SourceConfig, *, mountpoint: str = "") -> None:
        self.volume = volume
        self.cfg = cfg
        self.mountpoint = mountpoint
        self.started = time.time()
        self.shippers: dict[tuple[str, int], Shipper] = {}
        self._scopes: dict[tuple[str, int], trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._switching = False
        self.events = EventSource(self.document)  # ``mirrorfs events`` (node/events.py)
        # A live view: targets added or removed later are seen at every checkpoint.
        install_retention(volume, self.shippers.values())
        volume.writer.watch_replication(self._replication_pending)

    def _replication_pending(self) -> bool:
        """A streaming target has not received the last committed transaction yet."""
        from mirrorfs.repl.shipper import ShipperState

        last = self.volume.last_seq
        return any(
            s.state is ShipperState.STREAMING and (s.received_seq or 0) < last
            for s in self.shippers.values()
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED):
        """Start the control socket and one shipper per configured target; run until
        cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            handlers = {
                "status": self._cmd_status,
                "mirror-add": self._cmd_add,
                "mirror-remove": self._cmd_remove,
                "verify": self._cmd_verify,
                "promote": self._cmd_promote,
                "switchover": self._cmd_switchover,
                "checkpoint-create": self._cmd_checkpoint_create,
                "checkpoint-delete": self._cmd_checkpoint_delete,
            }
            streams = {"events": self.events.stream}
            await nursery.start(serve_control, socket_path(self.volume.path), handlers, streams)
            if self.cfg.metrics is not None:
                from mirrorfs.node.metrics import serve_metrics

                await nursery.start(serve_metrics, self.cfg.metrics, self.document)
            for address in self.cfg.mirrors:
                await self.add(address)
            if self.cfg.checkpoint_every:
                from mirrorfs.node.checkpoint_control import schedule

                nursery.start_soon(
                    schedule, self.volume, self.cfg.checkpoint_every, self.cfg.checkpoint_keep
                )
            task_status.started()
            await self._watch_fencing()

    async def _cmd_checkpoint_create(self, request: dict[str, Any]) -> dict[str, Any]:
        from mirrorfs.node.checkpoint_control import create_live

        return await create_live(self.volume, str(request.get("name", "")))

    async def _cmd_checkpoint_delete(self, request: dict[str, Any]) -> dict[str, Any]:
        from mirrorfs.node.checkpoint_control import delete_live

        return await delete_live(self.volume, str(request.get("name", "")))

    async def _watch_fencing(self) -> None:
        """A target that knows a newer epoch fences this source: refuse further writes."""
        from mirrorfs.repl.shipper import ShipperState

        while True:
            await trio.sleep(0.2)
            if self.volume.condition.fenced or self.cfg.force:
                continue
            for shipper in self.shippers.values():
                if shipper.state is ShipperState.FENCED:
                    self.volume.condition.fence(
                        f"fenced by {shipper.label}: {shipper.reason or 'a newer epoch exists'}"
                    )
                    log.error(
                        "%s: %s; refusing writes (EROFS) from now on",
                        self.volume.path,
                        self.volume.condition.fenced,
                    )
                    break

    async def add(self, address: tuple[str, int]) -> Shipper:
        if address in self.shippers:
            raise ControlError(f"already mirroring to {address[0]}:{address[1]}")
        try:
            check_peer_policy(
                *address, self.cfg.secret, self.cfg.insecure, tls=self.cfg.tls is not None
            )
        except PeerPolicyError as exc:
            raise ControlError(str(exc)) from None
        assert self._nursery is not None
        shipper = Shipper(
            self.volume,
            address,
            secret=self.cfg.secret,
            node_id=self.volume.state.node_id,
            window_bytes=self.cfg.window_bytes,
            max_log_bytes=self.cfg.max_log_bytes,
            connect=connector(address, self.cfg.tls),
        )
        scope = trio.CancelScope()
        self.shippers[address] = shipper
        self._scopes[address] = scope

        async def run_shipper(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await shipper.run(task_status=task_status)

        await self._nursery.start(run_shipper, name=f"shipper {shipper.label}")
        log.info("mirroring to %s", shipper.label)
        return shipper

    def remove(self, address: tuple[str, int]) -> None:
        if address not in self.shippers:
            raise ControlError(f"not mirroring to {address[0]}:{address[1]}")
        self._scopes.pop(address).cancel()
        self.shippers.pop(address)
        log.info("stopped mirroring to %s:%d", *address)

    def status(self) -> dict[str, Any]:
        vol = self.volume
        st = vol.state
        return {
            "role": st.role,
            "volume_uuid": st.volume_uuid,
            "node_id": st.node_id,
            "epoch": st.epoch,
            "epochs": st.epochs,
            "committed_seq": vol.last_seq,
            "checkpointed_seq": st.checkpointed_seq,
            "log_first_seq": vol.samlog.first_seq,
            "log_bytes": vol.samlog.size_bytes,
            "log_cap_bytes": self.cfg.max_log_bytes,
            "mountpoint": self.mountpoint,
            "mount_options": _split_options(self.cfg.mount_options),
            "read_only": bool(vol.failed),
            "failed": vol.failed or "",
            "fenced": vol.condition.fenced,
            "tls": self.cfg.tls is not None,
            "pid": os.getpid(),
            "targets": [s.status() for s in self.shippers.values()],
        }

    def document(self) -> dict[str, Any]:
        """The status document (mirrorfs.node.status_model) of this node now."""
        from mirrorfs.node.status_model import status_document

        return status_document({**self.status(), "running": True}, self.volume.path)

    async def _cmd_promote(self, request: dict[str, Any]) -> dict[str, Any]:
        raise ControlError(
            f"{self.volume.path} is already a source (epoch {self.volume.state.epoch})"
        )

    async def _cmd_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.status()}

    async def _cmd_switchover(self, request: dict[str, Any]) -> dict[str, Any]:
        from mirrorfs.node.switchover import DEFAULT_TIMEOUT, SwitchoverRequest, switch_source

        if self._switching:
            raise ControlError("a switchover is already running")
        mount = request.get("mount")
        options = request.get("options")
        req = SwitchoverRequest(
            mount_options=tuple(self.cfg.mount_options if options is None else options),
            to=self._address({"address": request.get("to", "")}),
            listen=str(request.get("listen", "")),
            mountpoint=self.mountpoint if mount is None else str(mount),
            timeout=float(request.get("timeout", DEFAULT_TIMEOUT)),
        )
        self._switching = True
        try:
            report = await switch_source(self, req)
        finally:
            self._switching = False
        assert self._nursery is not None
        self._nursery.start_soon(self._unmount_after_reply)
        return {"switchover": report}

    async def _unmount_after_reply(self) -> None:
        # Let the control server send the reply first; the mount then ends as on SIGTERM
        # (its final commit finds the volume frozen and adds nothing).
        import pyfuse3

        await trio.sleep(0.2)
        log.info("switched over: unmounting %s", self.mountpoint)
        pyfuse3.terminate()

    def _address(self, request: dict[str, Any]) -> tuple[str, int]:
        try:
            return parse_address(str(request.get("address", "")))
        except ValueError as exc:
            raise ControlError(str(exc)) from None

    async def _cmd_add(self, request: dict[str, Any]) -> dict[str, Any]:
        shipper = await self.add(self._address(request))
        return {"target": shipper.status()}

    async def _cmd_remove(self, request: dict[str, Any]) -> dict[str, Any]:
        self.remove(self._address(request))
        return {}

    async def _cmd_verify(self, request: dict[str, Any]) -> dict[str, Any]:
        results = []
        timeout = float(request.get("timeout", 60.0))
        for shipper in list(self.shippers.values()):
            try:
                res = await verify_target(shipper, timeout=timeout)
            except VerifyError as exc:
                results.append({"target": shipper.label, "ok": False, "error": str(exc)})
                continue
            results.append(
                {
                    "target": shipper.label,
                    "ok": res.identical,
                    "seq": res.seq,
                    "blocks": res.blocks,
                    "differing": res.differing,
                    "summary": res.describe(),
                }
            )
        return {"results": results}


def _split_options(options: tuple[str, ...] | list[str]) -> list[str]:
    """``-o`` values (each comma-separated) as one list of options."""
    return [o.strip() for opt in options for o in str(opt).split(",") if o.strip()]
