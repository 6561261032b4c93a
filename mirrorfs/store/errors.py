"""Errors of the store layer.

Every error a user can meet carries a one-line message that says what is wrong and where;
the CLI prints ``str(exc)`` and exits non-zero, never a traceback.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every store-layer error (one-line message)."""


class VolumeError(StoreError):
    """The volume directory is missing, not a volume, locked, or damaged."""


class VolumeLocked(VolumeError):
    """Another process holds the volume (it is mounted or being checked)."""


class NoSpace(StoreError):
    """The allocator has fewer free units than asked for; nothing was changed."""


class AllocatorError(StoreError):
    """Double free, free of an unallocated unit, or a unit out of range."""


class LogError(StoreError):
    """A SAM log integrity problem; the message names segment, offset and sequence number."""

    def __init__(self, message: str, *, segment: str = "", offset: int = -1, seq: int = -1):
        super().__init__(message)
        self.segment = segment
        self.offset = offset
        self.seq = seq


class TornRecord(LogError):
    """The log ends inside a record (crash during append): the record was never committed."""


class CorruptRecord(LogError):
    """A complete record fails its checksum, magic, version or structure checks."""


class LogHole(CorruptRecord):
    """Transactions that were durable in the log (acknowledged) are missing or unreadable.

    Not a torn tail: storage lost acknowledged writes, or a record in the middle is bad.
    ``first``..``last`` are the sequence numbers at stake (``last`` 0 when unknown);
    ``segment``/``offset`` say where the readable log ends; ``detail`` is the message without
    the log's name and the advice (what a repair that accepted the loss reports). Opening
    with ``repair`` accepts the loss.
    """

    def __init__(
        self,
        message: str,
        *,
        segment: str = "",
        offset: int = -1,
        first: int = 0,
        last: int = 0,
        detail: str = "",
    ):
        super().__init__(message, segment=segment, offset=offset, seq=first)
        self.first = first
        self.last = last
        self.detail = detail or message

    @classmethod
    def found(
        cls, log_dir: object, detail: str, *, segment: str, offset: int, first: int, last: int
    ) -> LogHole:
        """The hole in the log at ``log_dir``: one line that names it and says what to do."""
        return cls(
            f"SAM log {log_dir} has a hole: {detail} (mirrorfs fsck --repair cuts the log "
            "there and accepts the loss)",
            segment=segment,
            offset=offset,
            first=first,
            last=last,
            detail=detail,
        )


class VolumeFailed(StoreError):
    """The volume could not persist a change (log or block file I/O error, disk full).

    The volume is then read-only until remounted: what is already committed stays intact.
    """
