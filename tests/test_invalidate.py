"""The kernel-cache invalidator of a read-only mount (fuse/invalidate.py), without a mount."""

from __future__ import annotations

import threading

import trio

from mirrorfs.fuse import invalidate as invalidate_module
from mirrorfs.fuse.invalidate import KernelInvalidator
from mirrorfs.store.txn import Hint, HintKind


async def _until(check, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.01)


async def test_hints_become_one_batch_invalidated_off_the_trio_thread(monkeypatch):
    calls: list[tuple[list, list, bool]] = []
    main = threading.current_thread()

    def fake(entries, inodes):
        calls.append((entries, inodes, threading.current_thread() is main))

    monkeypatch.setattr(invalidate_module, "invalidate", fake)
    inv = KernelInvalidator()
    # Queued before the task runs (the mount is not live yet): kept for the first batch.
    inv.add_hints(
        [
            Hint(HintKind.ENTRY_ADDED, 7, parent=1, name=b"new"),
            Hint(HintKind.INODE_UPDATED, 5),
            Hint(HintKind.ENTRY_REMOVED, 6, parent=2, name=b"old"),
            Hint(HintKind.ENTRY_ADDED, 8, parent=1, name=b"new"),  # the same entry again
            Hint(HintKind.INODE_DELETED, 6),
        ]
    )
    inv.add_inodes([9, 5])
    async with trio.open_nursery() as nursery:
        await nursery.start(inv.run)
        await _until(lambda: calls)
        assert calls == [([(1, b"new"), (2, b"old")], [1, 2, 5, 6, 9], False)]
        inv.add_inodes([])  # nothing queued: no batch
        inv.add_hints([])
        await trio.sleep(0.05)
        assert len(calls) == 1
        inv.add_hints([Hint(HintKind.INODE_UPDATED, 3)])
        await _until(lambda: len(calls) == 2)
        assert calls[1] == ([], [3], False)
        nursery.cancel_scope.cancel()
