"""Where two copies of a volume parted: the fork point of two epoch histories (pure).

An epoch history is a list of ``(epoch, first seq of that epoch)``, oldest first; a promotion
appends one entry (mirrorfs.node.promote). Two nodes agree on every transaction up to the
fork point F and on none after it, as far as their histories tell:

- identical histories: no fork (the copies may only be ahead of or behind each other);
- one history a strict prefix of the other: F = (first seq of the first epoch that the
  longer history has and the shorter one does not) - 1;
- histories that differ at some entry (the same epoch number started at different seqs,
  or different epochs): F = (the lower of the two first seqs of the differing entries) - 1.

A target whose received position is past F holds transactions the source never had: it
*diverged* (an old source that wrote after the failover, or a replica that got more from the
old source than the promoted one did). One at or before F is just behind: the source's log
can carry it on, once it adopts the source's history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Epochs = Sequence[Sequence[int]]


def fork_point(source: Epochs, target: Epochs) -> int | None:
    """The last seq both histories share, or None when they are identical."""
    src = [(int(e), int(s)) for e, s in source]
    tgt = [(int(e), int(s)) for e, s in target]
    for a, b in zip(src, tgt, strict=False):
        if a != b:
            return min(a[1], b[1]) - 1
    if len(src) == len(tgt):
        return None
    longer = src if len(src) > len(tgt) else tgt
    return longer[min(len(src), len(tgt))][1] - 1


@dataclass(slots=True, frozen=True)
class ForkVerdict:
    """How a target stands against a source, from both histories and its position."""

    fork_seq: int | None  # F, None when the histories are identical
    diverged: bool  # the target holds transactions after F

    @property
    def adopt(self) -> bool:
        """The target is behind the fork: it may take the source's history at once."""
        return self.fork_seq is not None and not self.diverged

    def describe(self, received_seq: int) -> str:
        if self.fork_seq is None:
            return "same epoch history"
        if self.diverged:
            return (
                f"diverged after seq {self.fork_seq}: the target holds seq "
                f"{self.fork_seq + 1}..{received_seq} that the source never had"
            )
        return f"behind the fork at seq {self.fork_seq}"


def judge(source: Epochs, target: Epochs, received_seq: int) -> ForkVerdict:
    """The verdict for a target at ``received_seq`` (durable in its log) against a source."""
    fork = fork_point(source, target)
    return ForkVerdict(fork, fork is not None and received_seq > fork)
