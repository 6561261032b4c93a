"""Checkpointing: make the block file durable up to a seq and retire log segments.

A checkpoint records in node.json a sequence number whose blocks are all in place and
fsync'd (``checkpointed_seq``: recovery replays the log from the one after), and retires
the log segments that nobody needs any more: not past the checkpoint, not what a target
still needs (the retention policy that the source's replication installs), not the
diverged seqs a demoted source keeps (``keep_log_from``).

Two ways to get there. ``checkpoint`` (close, an apply that completes an initial sync, no
flusher running) writes whatever is deferred in place and fsyncs the block file itself,
then records ``last_seq``. ``maybe_checkpoint`` with a running flusher (the mount) never
writes or fsyncs the block file in the volume thread: when a checkpoint is due it asks the
flusher to fsync after its next batch (``InPlaceBlocks.sync_wanted``) and records
``synced_seq``, the newest seq in place *and* fsync'd, once that passes the checkpoint. So
``checkpointed_seq`` never passes a transaction whose blocks are not durable in place.

It runs in the commit path (after a commit or an apply, when enough log bytes or time
passed, and after each flusher batch), synchronously: the retention policy must not await.
It must not run while a ``persist`` is in flight in a worker thread, which owns the log
then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mirrorfs.store.core import VolumeCore

log = logging.getLogger(__name__)

#: Lowest sequence number some consumer (a target) still needs from the log, or None.
RetentionPolicy = Callable[[], int | None]


def _keep_nothing() -> int | None:
    return None


class Checkpointer:
    """When and how the volume checkpoints; shared by the write and the apply path."""

    def __init__(
        self,
        volume: VolumeCore,
        *,
        every_bytes: int = 256 << 20,
        every_seconds: float = 30.0,
    ) -> None:
        self.volume = volume
        self.every_bytes = every_bytes
        self.every_seconds = every_seconds
        self._retain_from: RetentionPolicy = _keep_nothing
        self._last = time.monotonic()
        self._log_bytes = 0

    def retain_with(self, policy: RetentionPolicy) -> None:
        """Keep log segments for ``policy`` (the source's replication, installed once)."""
        self._retain_from = policy

    def note_logged(self, nbytes: int) -> None:
        """``nbytes`` more were appended to the log since the last checkpoint."""
        self._log_bytes += nbytes

    def restart_clock(self) -> None:
        """The block file was just made durable by someone else (a resync group)."""
        self._last = time.monotonic()
        self._log_bytes = 0

    def maybe_checkpoint(self) -> None:
        """Checkpoint when enough log bytes or time have passed since the last one."""
        vol = self.volume
        # Not while a persist may be running in a worker thread: it owns the log then.
        if vol.condition.failed or vol.read_only or vol._sealed:
            return
        st = vol.state
        if st.checkpointed_seq == vol.last_seq:
            return
        due = (
            self._log_bytes >= self.every_bytes
            or time.monotonic() - self._last >= self.every_seconds
        )
        if not due:
            return
        dev = vol.device
        if not dev.driven:
            self.checkpoint()
            return
        synced = min(dev.synced_seq, vol.last_seq)
        if synced > st.checkpointed_seq:
            st.checkpointed_seq = synced
            st.save(vol.path)
            self.restart_clock()
            self._retire()
        if dev.synced_seq < vol.last_seq:
            dev.sync_wanted = True
            dev.wake()

    def checkpoint(self) -> None:
        """Make the block file durable up to the last commit and retire log segments.

        Must not run while a ``persist`` is in flight in another thread (it owns the log).
        """
        vol = self.volume
        if vol.condition.failed or vol._sealed:
            return
        st = vol.state
        if st.checkpointed_seq != vol.last_seq:
            vol.device.sync()
            st.checkpointed_seq = vol.last_seq
            st.save(vol.path)
        self.restart_clock()
        self._retire()

    def _retire(self) -> None:
        vol = self.volume
        st = vol.state
        keep = self._retain_from()
        upto = st.checkpointed_seq
        if keep is not None:
            upto = min(upto, keep - 1)
        if st.keep_log_from:  # a demoted source: its diverged seqs may be needed
            upto = min(upto, st.keep_log_from - 1)
        if upto > 0:
            vol.samlog.retire(upto)
