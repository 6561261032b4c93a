"""Demotion: a stopped source becomes a target of the volume (failback, step one).

``mirrorfs demote DIR`` turns the role in node.json to target and keeps the epoch history
and the block file as they are. The volume is still consistent at its last seq, so a new
source can bring it up to date with a checksum resync instead of a full copy; the source and
the demoted node find their fork point from their epoch histories (mirrorfs.repl.fork) when
the new source first connects. Until then the demoted node keeps every record of its log
(``NodeState.keep_log_from``): the ones after the fork never reached the new source and are
archived, not retired, before the resync replaces them (mirrorfs.store.archive).

Refused on a target, and on a volume some process holds (mounted, or served by a daemon).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from mirrorfs.store.errors import VolumeError, VolumeLocked
from mirrorfs.store.nodestate import Role
from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)


class DemoteError(Exception):
    """Demotion is refused (one-line reason)."""


def demote_volume(volume: Volume) -> dict[str, Any]:
    """Make the open source ``volume`` a target; return what was done (for the report).

    Synchronous: nothing else may use the volume meanwhile (a daemon calls it between two
    awaits, after its writers were stopped).
    """
    st = volume.state
    if st.role != Role.SOURCE.value:
        raise DemoteError(f"{volume.path} is already a target (epoch {st.epoch})")
    volume.commit()  # nothing is open in a stopped volume; a daemon's last writes are kept
    slog = volume.samlog
    last = volume.last_seq
    keep_from = slog.first_seq or last + 1
    st.role = Role.TARGET.value
    st.keep_log_from = keep_from
    volume.checkpoint()  # the block file is durable at ``last``; the log is kept from keep_from
    st.save(volume.path)
    log.warning(
        "%s demoted: now a target at seq %d (epoch %d); log seq %s kept until a new source "
        "tells the fork point",
        volume.path,
        last,
        st.epoch,
        f"{keep_from}..{last}" if keep_from <= last else "(none)",
    )
    return {
        "volume": volume.path,
        "last_seq": last,
        "epoch": st.epoch,
        "epochs": [list(e) for e in st.epochs],
        "log_kept_from": keep_from,
        "demoted_at": time.time(),
    }


def demote_stopped(path: str) -> dict[str, Any]:
    """Demote the source volume at ``path``, which no process may hold."""
    path = os.path.abspath(path)
    try:
        volume = Volume.open(path)
    except VolumeLocked:
        raise DemoteError(
            f"{path} is in use (mounted, or served by a running daemon): unmount it first"
        ) from None
    except VolumeError as exc:
        raise DemoteError(str(exc)) from None
    try:
        return demote_volume(volume)
    finally:
        volume.close()


def describe(report: dict[str, Any]) -> list[str]:
    kept = report["log_kept_from"]
    last = report["last_seq"]
    return [
        f"demoted {report['volume']}: source -> target at seq {last} "
        f"(epoch {report['epoch']}, epoch history: "
        + ", ".join(f"{e} from seq {s}" for e, s in report["epochs"])
        + ")",
        "  transactions after the fork point (found when a new source connects) are archived "
        "in DIR/archive/, then replaced by the new source's blocks",
        f"  log kept meanwhile: seq {kept}..{last}" if kept <= last else "  log: empty",
        "  next: mirrorfs replica DIR --listen HOST:PORT, then on the new source: "
        "mirrorfs mirror NEWDIR --add HOST:PORT",
    ]
