"""Crashes of a SAM log as they really happen, for the recovery tests.

A crash tears only what was never synced: the record being written when the process died,
whose fdatasync never returned, so the sync mark (store/syncmark.py) still names the seq
before it. A test that cuts a record must model that; cutting a record that was synced is
storage losing acknowledged data, a hole (tests/test_log_holes.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from mirrorfs.store import syncmark
from mirrorfs.store.files import SYNC_MARK_FILE
from mirrorfs.store.samlog import SamLog


def crash(log: SamLog) -> None:
    """Stop as a killed process does: what was appended stays (page cache), nothing more is
    synced and the mark stays as the last sync wrote it."""
    os.close(log._fd)
    log._fd = -1
    log._mark.close()
    log._closed = True


def unsync(logdir: str | os.PathLike, seq: int) -> None:
    """Roll the sync mark back to before ``seq``, as a crash leaves it when seq's record was
    written but the fdatasync that would have covered it never returned (the mark is
    written only after one)."""
    d = Path(logdir)
    mark = syncmark.read(d)
    assert mark is not None, f"{d} has no sync mark"
    if mark.seq >= seq:
        with open(d / SYNC_MARK_FILE, "r+b") as f:
            f.write(syncmark.pack(syncmark.SyncMark(mark.generation, seq - 1)))
