"""The background flusher: writes a volume's in-place backlog from a worker thread.

Committed transactions wait in ``vol.device`` (``InPlaceBlocks``, store/inplace.py) until
their blocks are written in place. ``Flusher.run`` is a trio service that does that in a
worker thread under its own ``trio.CapacityLimiter(1)``, one batch (``flush_step``) at a
time: when the backlog passes ``flush_bytes``, when someone asks (``want``: a checkpoint
that needs an fsync, a writer waiting at the bound), and every ``flush_interval``
otherwise, so that blocks rewritten meanwhile are written once. After each batch it lets
the checkpointer record what is now in place and fsync'd (in the trio thread).

While it runs, ``InPlaceBlocks.driven`` is set: nothing writes or fsyncs the block file in
the trio thread (``WritePath.finish`` does not flush inline, ``maybe_checkpoint`` asks
for an fsync instead of doing one, and ``ApplyPath.apply`` defers too). The source's
``Committer`` runs one beside its persister; a target may run one in its daemon.

``wait_below(bound)`` is the writers' back-pressure: it returns once the backlog is at
most ``bound`` bytes (VolumeFailed if the volume fails meanwhile).
"""

from __future__ import annotations

import logging

import trio

from mirrorfs.store.errors import VolumeFailed
from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)


class Flusher:
    """Writes ``volume.device``'s backlog in place from a worker thread (module doc)."""

    def __init__(
        self, volume: Volume, *, flush_bytes: int = 8 << 20, flush_interval: float = 0.2
    ) -> None:
        self.volume = volume
        self.flush_bytes = flush_bytes
        self.flush_interval = flush_interval
        self._wanted = trio.Event()
        self._flushed = trio.Event()

    def want(self) -> None:
        """Flush now rather than at the next interval (trio thread)."""
        self._wanted.set()

    def note_commit(self) -> None:
        """A transaction was just deferred: start a batch once enough has piled up."""
        if self.volume.device.backlog_bytes >= self.flush_bytes:
            self._wanted.set()

    async def wait_below(self, bound: int) -> None:
        """Return once at most ``bound`` bytes wait to be written in place."""
        vol = self.volume
        dev = vol.device
        while dev.driven and dev.backlog_bytes > bound:
            if vol.failed:
                raise VolumeFailed(vol.failed)
            self._wanted.set()
            await self._flushed.wait()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The service: flush batch after batch until cancelled."""
        vol = self.volume
        dev = vol.device
        limiter = trio.CapacityLimiter(1)
        dev.driven, dev.wake = True, self.want
        try:
            task_status.started()
            while True:
                with trio.move_on_after(self.flush_interval):
                    await self._wanted.wait()
                self._wanted = trio.Event()
                while (dev.has_backlog or dev.sync_wanted) and not vol.failed:
                    try:
                        # Not abandoned on cancel: a batch always completes before the
                        # service ends, so whoever comes next may flush inline.
                        await trio.to_thread.run_sync(dev.flush_step, limiter=limiter)
                    except OSError as exc:
                        # Durable in the log; the replay at the next open writes it in place.
                        why = f"cannot write the block file: {exc.strerror or exc}"
                        vol.condition.fail(why)
                        log.error("%s: %s; the volume is now read-only", vol.path, why)
                    self._flushed.set()
                    self._flushed = trio.Event()
                    vol.checkpointer.maybe_checkpoint()
                    if dev.backlog_bytes < self.flush_bytes and not dev.sync_wanted:
                        break  # let more pile up (coalescing), unless someone waits
        finally:
            dev.driven = False
            self._flushed.set()  # wake waiters: they see driven is off, or the failure
