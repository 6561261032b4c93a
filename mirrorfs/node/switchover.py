"""Planned switchover: the source and one of its targets swap roles, losing nothing.

``mirrorfs switchover DIR --to HOST:PORT --listen HOST:PORT [--mount MNT]`` (the command is
in mirrorfs.node.commands) asks the source serving DIR (its control socket) to hand over to
the target at ``--to``:

1. The source closes its write gate (mirrorfs.fuse.gate): modifying requests wait.
2. It commits what is open and waits until the target has applied the last transaction S,
   then freezes the volume at S (nothing more is sealed, so reads, releases and unmounts
   cannot add a transaction that the target never gets).
3. SWITCHOVER(S, listen) on the replication connection (mirrorfs.repl.switchover); the
   target checks that it holds exactly S, promotes itself (epoch E+1 from S+1, as
   ``promote`` does) in the same step and answers SWITCHOVER_DONE(E+1, S+1). Its daemon then
   exits and a handover helper (mirrorfs.node.handover) mounts the volume read-write where
   the replica was mounted, mirroring to ``listen``.
4. The source records epoch E+1 from S+1 in its own history and becomes a target: it holds
   exactly what the new source had at S, so the new source's handshake finds it on the same
   history at S and streams from S+1 (no resync, no archive). The held requests get EROFS,
   the mount ends, and a handover helper starts ``mirrorfs replica DIR --listen listen
   [--mount MNT]`` (read-only, by default where the source was mounted).

If anything fails before the target answered (target not streaming, drain timeout, refusal),
the gate opens again and DIR stays the source: the held requests go on. If the request left
and no answer came, the target may be the source now: DIR then refuses writes (fenced) until
an operator looks (``mirrorfs status`` on both, then ``demote`` and ``mirror --add``).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import trio

from mirrorfs.node.control import ControlError
from mirrorfs.node.handover import spawn
from mirrorfs.node.promote import PromoteError, promote_volume
from mirrorfs.repl.address import parse_address
from mirrorfs.repl.switchover import SwitchoverFailed, SwitchoverUnknown, request_switchover
from mirrorfs.repl.wire import Switchover, SwitchoverDone, SwitchoverResult
from mirrorfs.store.nodestate import Role
from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
#: Commit rounds before the freeze gives up waiting for a quiet volume (atime updates of
#: readers keep arriving; they are not the writers' and are dropped by the freeze).
_QUIET_ROUNDS = 3


@dataclass(slots=True)
class SwitchoverRequest:
    """What the ``switchover`` control command asks of a source."""

    to: tuple[str, int]
    listen: str  # HOST:PORT where this node's replica daemon will listen
    mountpoint: str  # where that daemon mounts read-only ("" = no mount)
    timeout: float = DEFAULT_TIMEOUT
    #: FUSE options of that read-only mount (by default the source mount's own).
    mount_options: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.to[0]}:{self.to[1]}"


# ---------------------------------------------------------------------------- source side


async def drain_and_freeze(volume: Volume, gate: Any, shipper: Any, timeout: float) -> int:
    """With the gate closed: commit, wait until the target applied it all, freeze; the seq.

    SwitchoverFailed if the target stops streaming, trio.TooSlowError after ``timeout``.
    """
    from mirrorfs.repl.shipper import ShipperState

    with trio.fail_after(timeout):
        rounds = 0
        while True:
            await gate.commit()
            while (shipper.applied_seq or 0) < volume.last_seq:
                if shipper.state is not ShipperState.STREAMING:
                    raise SwitchoverFailed(
                        f"target {shipper.label} is {shipper.state.value} "
                        f"({shipper.reason or 'no reason'}) while draining"
                    )
                await trio.sleep(0.005)
            # No await from here to the freeze: the target has applied exactly last_seq.
            quiet = volume.writer.open_bytes == 0 or rounds >= _QUIET_ROUNDS
            if (
                volume.writer.in_flight_seq is None
                and shipper.applied_seq == volume.last_seq
                and quiet
            ):
                volume.condition.freeze(f"switchover to {shipper.label}")
                return volume.last_seq
            rounds += 1


def become_target(volume: Volume, epoch: int, start_seq: int) -> None:
    """The old source takes the new source's history and turns target (synchronous).

    It holds exactly seq ``start_seq - 1``, all of which the new source has: nothing of its
    log is diverged, so nothing needs keeping for a fork (unlike ``demote``).
    """
    st = volume.state
    st.epochs.append([epoch, start_seq])
    st.role = Role.TARGET.value
    st.keep_log_from = 0
    st.save(volume.path)
    log.warning(
        "%s switched over: now a target at seq %d, history %s",
        volume.path,
        start_seq - 1,
        st.epochs,
    )


async def switch_source(node: Any, req: SwitchoverRequest) -> dict[str, Any]:
    """Run the source's side on the SourceNode ``node``; the report (ControlError if not).

    On success the volume is a target, the gate refuses writes and a handover helper will
    start the replica daemon; the caller ends the mount after replying.
    """
    from mirrorfs.repl.shipper import ShipperState

    vol: Volume = node.volume
    shipper = node.shippers.get(req.to)
    gate = vol.writer.gate
    refused = "switchover refused"
    if shipper is None:
        raise ControlError(f"not mirroring to {req.label}: {refused}")
    if gate is None:
        raise ControlError(f"{vol.path} is not mounted read-write here: {refused}")
    if vol.condition.reason() or gate.refusal:
        why = vol.condition.reason() or "writes are refused"
        raise ControlError(f"{vol.path} does not take writes ({why}): {refused}")
    if shipper.state is not ShipperState.STREAMING:
        reason = f" ({shipper.reason})" if shipper.reason else ""
        raise ControlError(
            f"target {req.label} is {shipper.state.value}{reason}, not streaming: {refused}"
        )
    t0 = time.monotonic()
    gate.close()
    try:
        seq = await drain_and_freeze(vol, gate, shipper, req.timeout)
        log.info("switchover: %s frozen at seq %d, applied by %s", vol.path, seq, req.label)
        reply = await request_switchover(shipper, seq, req.listen, timeout=req.timeout)
    except SwitchoverUnknown as exc:
        # The target may be a source now: taking writes here could fork the volume.
        vol.condition.fence(f"switchover to {req.label}: {exc}")
        gate.refuse(errno.EROFS)
        log.error("%s: %s; refusing writes (EROFS) from now on", vol.path, vol.condition.fenced)
        raise ControlError(
            f"{exc}; the target may have been promoted, so {vol.path} refuses writes now: "
            f"check 'mirrorfs status' on the target"
        ) from None
    except BaseException as exc:
        vol.condition.thaw()
        gate.reopen()
        if isinstance(exc, trio.TooSlowError):
            why = f"target {req.label} did not apply everything within {req.timeout:g} s"
        elif isinstance(exc, Exception):
            why = str(exc)
        else:
            raise  # cancelled: the mount is going away anyway
        log.warning("switchover failed, %s stays the source: %s", vol.path, why)
        raise ControlError(f"switchover failed, {vol.path} stays the source: {why}") from None

    become_target(vol, reply.epoch, reply.start_seq)
    gate.refuse(errno.EROFS)
    held = gate.held
    pause = time.monotonic() - t0
    for address in list(node.shippers):
        node.remove(address)  # the connection to the new source must not be retried
    argv = ["replica", vol.path, "--listen", req.listen]
    if req.mountpoint:
        argv += ["--mount", req.mountpoint]
        for opt in req.mount_options:
            argv += ["-o", opt]
    if node.cfg.secret_file:
        argv += ["--secret-file", node.cfg.secret_file]
    if node.cfg.tls is not None:
        argv += node.cfg.tls.files.argv()
    argv += node.cfg.log_argv
    argv += node.cfg.metrics_argv  # this process has exited before the successor binds it
    helper = spawn(vol.path, argv)
    log.warning(
        "switchover to %s done: seq %d, epoch %d from seq %d; writes held %.3f s",
        req.label,
        seq,
        reply.epoch,
        reply.start_seq,
        pause,
    )
    return {
        "volume": vol.path,
        "target": req.label,
        "seq": seq,
        "epoch": reply.epoch,
        "epoch_start_seq": reply.start_seq,
        "writes_held_seconds": round(pause, 4),
        "requests_held": held,
        "listen": req.listen,
        "mountpoint": req.mountpoint,
        "mount_options": list(req.mount_options) if req.mountpoint else [],
        "handover_pid": helper,
    }


# ---------------------------------------------------------------------------- target side


def take_over(
    volume: Volume, msg: Switchover, *, mountpoint: str
) -> tuple[SwitchoverDone, dict[str, Any] | None]:
    """Promote a target that holds exactly ``msg.seq`` (the receiver checked); synchronous.

    Returns the answer and, when promoted, the promotion report.
    """

    def refuse(why: str) -> tuple[SwitchoverDone, None]:
        log.warning("switchover to seq %d refused: %s", msg.seq, why)
        return SwitchoverDone(SwitchoverResult.REFUSED, text=why), None

    if not mountpoint:
        return refuse("the target has no mountpoint to serve writers (replica without --mount)")
    try:
        parse_address(msg.mirror_to)
    except ValueError as exc:
        return refuse(str(exc))
    try:
        report = promote_volume(volume)
    except PromoteError as exc:
        return refuse(str(exc))
    report["old_source"] = f"none lost: planned switchover at seq {msg.seq}"
    report["mountpoint"] = os.path.abspath(mountpoint)
    report["mirror_to"] = msg.mirror_to
    done = SwitchoverDone(SwitchoverResult.PROMOTED, report["epoch"], report["epoch_start_seq"])
    return done, report


def successor_argv(volume_dir: str, report: dict[str, Any], cfg: Any) -> list[str]:
    """``mirrorfs mount`` of the promoted replica, mirroring back to the old source."""
    argv = ["mount", volume_dir, report["mountpoint"], "--mirror", report["mirror_to"]]
    for opt in cfg.mount_options:
        argv += ["-o", opt]
    if cfg.secret_file:
        argv += ["--secret-file", cfg.secret_file]
    if cfg.tls is not None:
        argv += cfg.tls.files.argv()
    argv += cfg.log_argv
    argv += cfg.metrics_argv
    return argv
