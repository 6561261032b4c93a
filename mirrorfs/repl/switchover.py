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
``SwitchoverRequest`` holds the source's decisions (pure); ``request_switchover`` drives it
and waits on one event, set by the answer or by the end of the connection. The
orchestration (write gate, drain, roles, processes) is mirrorfs.node.switchover.
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


class SwitchoverRequest:
    """The source's side of SWITCHOVER / SWITCHOVER_DONE, without I/O.

    ``request`` is the frame to send; ``send_failed``, ``on_reply`` and ``on_closed`` are what
    can happen next; once ``settled`` (an answer came or the connection ended), ``outcome``
    gives the PROMOTED answer or raises (``timed_out`` too, when no event came in time).
    """

    def __init__(self, label: str, seq: int, mirror_to: str) -> None:
        self.label = label
        self.seq = seq
        self.mirror_to = mirror_to
        self.reply: SwitchoverDone | None = None  # the first answer
        self.closed = False  # the connection ended: no answer can come any more

    @property
    def settled(self) -> bool:
        """Nothing more to wait for."""
        return self.reply is not None or self.closed

    def request(self) -> Switchover:
        return Switchover(self.seq, self.mirror_to)

    def send_failed(self, exc: Exception) -> SwitchoverFailed:
        """What to raise when the request could not be sent. The stream may hold part of the
        frame; whatever the target got is incomplete, and it acts on whole frames only."""
        return SwitchoverFailed(f"cannot send the switchover request: {exc}")

    def on_reply(self, msg: SwitchoverDone) -> None:
        if self.reply is None:
            self.reply = msg

    def on_closed(self) -> None:
        self.closed = True

    def outcome(self) -> SwitchoverDone:
        """The PROMOTED answer; SwitchoverFailed (refused) or SwitchoverUnknown (no answer,
        or one that the old source must not follow)."""
        reply, label, seq = self.reply, self.label, self.seq
        if reply is None:
            raise SwitchoverUnknown(
                f"target {label} did not answer the switchover request at seq {seq}"
            )
        if reply.result is not SwitchoverResult.PROMOTED:
            raise SwitchoverFailed(f"target {label} refused: {reply.text or 'no reason'}")
        if reply.start_seq != seq + 1:
            # A promoted target at another seq would be a bug there; the old source must not
            # follow it blindly.
            raise SwitchoverUnknown(
                f"target {label} was promoted from seq {reply.start_seq}, not {seq + 1}"
            )
        return reply


async def request_switchover(
    shipper: Any, seq: int, mirror_to: str, *, timeout: float = 30.0
) -> SwitchoverDone:
    """Ask the target of ``shipper`` to take over at ``seq``; its PROMOTED answer.

    Raises SwitchoverFailed (refused, or not sent) or SwitchoverUnknown (sent, no answer
    within ``timeout`` or the connection ended first). Waits on an event that the answer or
    the end of the connection (``shipper.on_session_end``) sets.
    """
    m = SwitchoverRequest(shipper.label, seq, mirror_to)
    settled = trio.Event()

    def on_reply(msg: Any) -> None:
        m.on_reply(msg)
        settled.set()

    def on_end() -> None:
        m.on_closed()
        settled.set()

    shipper.on_message[SwitchoverDone] = on_reply
    shipper.on_session_end.append(on_end)
    try:
        try:
            await shipper.send_message(m.request())
        except ReplError as exc:
            raise m.send_failed(exc) from None
        with trio.move_on_after(timeout):
            await settled.wait()  # an answer, or the connection ended: it cannot come
    finally:
        shipper.on_message.pop(SwitchoverDone, None)
        shipper.on_session_end.remove(on_end)
    reply = m.outcome()
    log.info("target %s took over: epoch %d from seq %d", shipper.label, reply.epoch, seq + 1)
    return reply
