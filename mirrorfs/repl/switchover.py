"""The replication half of a planned switchover: SWITCHOVER / SWITCHOVER_DONE.

On the source's existing connection to the target (after every transaction up to ``seq`` was
acknowledged as applied and the source froze its volume at ``seq``)::

    source                                    target
    SWITCHOVER(seq, mirror_to)           ->   refuse unless it holds exactly seq, applied,
                                              consistent, with no resync or fork pending;
                                              else promote (epoch E+1 from seq+1) in the same
                                              step, and take no TXN after it
                                         <-   SWITCHOVER_DONE(PROMOTED, E+1, seq+1)
                                              or SWITCHOVER_DONE(REFUSED, text)

The outcomes for the source: promoted (it becomes a target of the new source), refused or
not sent (nothing changed anywhere: it stays the source), or unknown (the request left but
no answer came back: the target may be a source now, so the old one must not take writes).
The orchestration (write gate, drain, roles, processes) is mirrorfs.node.switchover.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from mirrorfs.repl.wire import ReplError, Switchover, SwitchoverDone, SwitchoverResult

log = logging.getLogger(__name__)


class SwitchoverFailed(ReplError):
    """Nothing changed on the target (refused, or the request never left)."""


class SwitchoverUnknown(ReplError):
    """The request was sent but no answer came: the target may have been promoted."""


def switchover_refusal(volume: Any, seq: int, *, busy: bool = False) -> str | None:
    """Why a target with ``volume`` cannot take over at ``seq`` (None: it can).

    ``busy``: the session is not plainly streaming (initial sync, resync, fork pending).
    """
    if volume is None or busy:
        return "the target is not plainly streaming (initial sync or resync running)"
    if not volume.consistent:
        return "the target is not a consistent replica"
    if volume.state.role != "target":
        return "the target is a source already"
    received, applied = volume.received_seq, volume.last_seq
    if received != seq or applied != seq:
        return f"the target has received seq {received} and applied {applied}, not {seq}"
    return None


async def request_switchover(
    shipper: Any, seq: int, mirror_to: str, *, timeout: float = 30.0
) -> SwitchoverDone:
    """Ask the target of ``shipper`` to take over at ``seq``; its PROMOTED answer.

    Raises SwitchoverFailed (refused, or not sent) or SwitchoverUnknown (sent, no answer
    within ``timeout`` or the connection ended first).
    """
    answers: list[SwitchoverDone] = []
    got = trio.Event()

    def on_reply(msg: Any) -> None:
        answers.append(msg)
        got.set()

    session = shipper.session_id
    shipper.on_message[SwitchoverDone] = on_reply
    try:
        try:
            await shipper.send_message(Switchover(seq, mirror_to))
        except ReplError as exc:
            # The stream may hold part of the frame; whatever the target got is incomplete,
            # and it acts on whole frames only.
            raise SwitchoverFailed(f"cannot send the switchover request: {exc}") from None
        with trio.move_on_after(timeout):
            while not got.is_set():
                if shipper.session_id != session:
                    break  # the connection ended: the answer cannot come any more
                with trio.move_on_after(0.05):
                    await got.wait()
    finally:
        shipper.on_message.pop(SwitchoverDone, None)
    if not answers:
        raise SwitchoverUnknown(
            f"target {shipper.label} did not answer the switchover request at seq {seq}"
        )
    reply = answers[0]
    if reply.result is not SwitchoverResult.PROMOTED:
        raise SwitchoverFailed(f"target {shipper.label} refused: {reply.text or 'no reason'}")
    if reply.start_seq != seq + 1:
        # A promoted target at another seq would be a bug there; the old source must not
        # follow it blindly.
        raise SwitchoverUnknown(
            f"target {shipper.label} was promoted from seq {reply.start_seq}, not {seq + 1}"
        )
    log.info("target %s took over: epoch %d from seq %d", shipper.label, reply.epoch, seq + 1)
    return reply
