"""Holes that only node.json shows, and what a repair that accepts a loss changes there.

The SAM log's own recovery (``store/logrecovery.py``) finds holes inside the log. One more
is found against node-local state: ``checkpointed_seq`` beyond the log's end (node.json says
seqs were in place, the log never got that far: storage lost the log's tail, or an old
log directory was put back).

A repair that gave up seqs (``RecoveryReport.lost_first..lost_last``) leaves the log ending
at L; ``accept_loss`` makes node.json agree before anything else reads it:

- ``checkpointed_seq`` at most L (recovery then replays the log from there, and the next
  transaction is L+1);
- a source starts a new epoch at L+1. Its targets may hold the seqs it gave up: with the
  old history they would take the new L+1.. for a continuation of what they have; with the
  new one, a target past L has *diverged* (mirrorfs.repl.fork) and gets a rewind resync,
  one at or before L just follows;
- a target is not consistent again before it has applied ``lost_last`` anew: its block file
  may hold blocks of the lost seqs over older ones of the log's prefix, so it is not served
  or promoted until its source has resent them (from the log, or by a checksum resync when
  the source's log no longer has them; both rewrite every block those seqs wrote).
"""

from __future__ import annotations

import logging

from mirrorfs.store.errors import LogHole
from mirrorfs.store.nodestate import NodeState, Role
from mirrorfs.store.samlog import SamLog

log = logging.getLogger(__name__)


def checkpoint_hole(state: NodeState, samlog: SamLog) -> LogHole | None:
    """The hole when node.json's ``checkpointed_seq`` lies beyond the log's last seq."""
    last, ck = samlog.last_seq, state.checkpointed_seq
    if ck <= last or state.sync_state or state.resync:
        return None
    seg, offset = samlog.end_position()
    return LogHole.found(
        samlog.directory,
        f"node.json has seq up to {ck} checkpointed but the log ends at offset {offset} of "
        f"segment {seg} after seq {last}: seq {last + 1}..{ck} are missing",
        segment=seg,
        offset=offset,
        first=last + 1,
        last=ck,
    )


def accept_loss(path: str, state: NodeState, samlog: SamLog) -> str:
    """Adjust and save node.json after a repair gave up seqs; a note of it ("" if none)."""
    rep = samlog.recovery_report
    hole = checkpoint_hole(state, samlog)
    if hole is not None:
        rep.repaired = True
        rep.reason = rep.reason or hole.detail
        rep.segment, rep.offset = rep.segment or hole.segment, hole.offset
        rep.lose(hole.first, hole.last)
        log.error("%s: repair accepted a hole: %s", path, hole.detail)
    if not rep.lost_first:
        return ""
    last = samlog.last_seq
    state.checkpointed_seq = min(state.checkpointed_seq, last)
    if state.role == Role.SOURCE.value:
        state.epochs.append([state.epoch + 1, last + 1])
        note = f"epoch {state.epoch} starts at seq {last + 1}"
    else:
        state.consistent_at = max(state.consistent_at, rep.lost_last)
        note = f"not consistent before seq {rep.lost_last} is received again"
    state.save(path)
    return note
