"""Promotion: a target becomes a read-write source in a new epoch.

``promote`` stops receiving, applies every transaction already in the node's log, starts a
new epoch at the next sequence number (recorded in the epoch history of node.json) and
turns the role to source. On a running replica daemon this happens through its control
socket, after which the daemon unmounts its read-only mount and exits, and the command
mounts the promoted volume read-write at the same mountpoint (unmount-and-promote). On a
stopped replica the volume is promoted in place.

Unplanned failover loses at most what the old source had committed and not shipped; the
report says what this node applied and what it knows of the old source.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from mirrorfs.store.errors import VolumeError
from mirrorfs.store.nodestate import Role
from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)


class PromoteError(Exception):
    """Promotion is refused (one-line reason)."""


#: A source heard from this recently may still be alive: the link may have been cut (a
#: partition, after which it goes on writing), not the source (a crash). Idle sources ping
#: every 5 s, so a live one is heard at least that often while it is connected.
RECENT_CONTACT = 10.0


def check_source_gone(receiver: dict[str, Any], *, now: float | None = None) -> None:
    """Refuse to promote while the source is connected or was heard within
    ``RECENT_CONTACT`` seconds: that is how split brains start (``--force`` skips this).

    ``receiver`` is the replica's receiver status (``Receiver.status()``)."""
    now = time.time() if now is None else now
    node, address = receiver.get("source_node_id"), receiver.get("source_address") or "?"
    who = f"the source {node!r} at {address}" if node else f"the source at {address}"
    last = float(receiver.get("last_contact") or 0.0)
    heard = f"last heard {max(now - last, 0.0):.1f} s ago" if last else "never heard"
    if receiver.get("state") in ("streaming", "initial-sync", "resyncing"):
        raise PromoteError(
            f"{who} is still connected ({heard}): promoting now would make two sources "
            "(split brain); stop the source first, or pass --force"
        )
    if last and now - last < RECENT_CONTACT:
        raise PromoteError(
            f"{who} was {heard} and may still be alive behind a cut link: make sure it is "
            f"down (or wait {RECENT_CONTACT:g} s), or pass --force"
        )


def apply_logged(volume: Volume) -> int:
    """Apply every received-but-unapplied transaction in the log; return how many."""
    n = 0
    if volume.received_seq > volume.last_seq:
        for txn in volume.samlog.scan(volume.last_seq + 1):
            volume.applier.apply(txn)
            n += 1
    return n


def promote_volume(volume: Volume) -> dict[str, Any]:
    """Start a new epoch on a consistent target volume and make it a source.

    Runs between two awaits in a daemon (no transaction can land in the middle). Returns
    what was done, for the report.
    """
    st = volume.state
    if st.role != Role.TARGET.value:
        raise PromoteError(f"{volume.path} is already a source (epoch {st.epoch})")
    if not volume.consistent:
        raise PromoteError(
            f"{volume.path} is not a consistent replica (initial sync or resync incomplete): "
            "promoting it would give a corrupt volume"
        )
    applied_now = apply_logged(volume)
    seq = volume.last_seq
    old_epoch = st.epoch
    st.epochs.append([old_epoch + 1, seq + 1])
    st.role = Role.SOURCE.value
    volume.checkpoint()  # block file durable at seq, node.json saved with the new epoch
    st.checkpointed_seq = max(st.checkpointed_seq, seq)
    st.save(volume.path)
    log.warning(
        "%s promoted: epoch %d -> %d at seq %d (applied %d logged transaction(s) first)",
        volume.path,
        old_epoch,
        old_epoch + 1,
        seq + 1,
        applied_now,
    )
    return {
        "volume": volume.path,
        "last_applied_seq": seq,
        "applied_from_log": applied_now,
        "old_epoch": old_epoch,
        "epoch": old_epoch + 1,
        "epoch_start_seq": seq + 1,
        "promoted_at": time.time(),
    }


def promote_stopped(path: str) -> dict[str, Any]:
    """Promote a replica whose daemon is not running."""
    try:
        volume = Volume.open(os.path.abspath(path))
    except VolumeError as exc:
        raise PromoteError(str(exc)) from None
    try:
        report = promote_volume(volume)
    finally:
        volume.close()
    report["old_source"] = "unknown: the replica was stopped, the old source was not asked"
    return report


def describe(report: dict[str, Any]) -> list[str]:
    lines = [
        f"promoted {report['volume']}: epoch {report['old_epoch']} -> {report['epoch']} "
        f"starting at seq {report['epoch_start_seq']}",
        f"  last transaction applied: seq {report['last_applied_seq']}"
        f" ({report['applied_from_log']} applied from the log during promotion)",
        f"  transactions never received from the old source: {report['old_source']}",
    ]
    if report.get("mountpoint"):
        lines.append(f"  mounted read-write at {report['mountpoint']}")
    return lines
