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


class VolumeFailed(StoreError):
    """The volume could not persist a change (log or block file I/O error, disk full).

    The volume is then read-only until remounted: what is already committed stays intact.
    """
