"""Checkpoint create and delete inside the running source (its control socket handlers).

create: close the write gate (modifying requests wait, as for a switchover), commit and
bring the block file up to date until nothing is open, sealed or unflushed, then make the
checkpoint in the (empty) open transaction without an await in between, commit that, put
it in place, reopen the gate. The block file being complete up to the checkpoint before
its table record can be seen is what a checkpoint mount in another process relies on
(INTERNALS.md, "Checkpoints").
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from mirrorfs.node.control import ControlError
from mirrorfs.store.snapshots import CheckpointError
from mirrorfs.store.volume import Volume

log = logging.getLogger(__name__)

SETTLE_ROUNDS = 200
#: How long an unmount waits for a scheduled checkpoint's tick to finish.
TICK_GRACE = 10.0


async def create_live(vol: Volume, name: str) -> dict[str, Any]:
    gate = vol.writer.gate
    snaps = vol.snapshots
    if gate is None or snaps is None:
        raise ControlError("this volume is not mounted read-write here")
    if vol.condition.reason():
        raise ControlError(f"the volume takes no changes: {vol.condition.reason()}")
    gate.close()
    try:
        for _ in range(SETTLE_ROUNDS):
            await gate.commit()
            await trio.to_thread.run_sync(vol.flush_in_place)
            if not (vol.has_local_changes or vol.device.has_backlog):
                break
        else:
            raise ControlError("the volume did not come to rest for the checkpoint")
        try:
            info = snaps.create(name)  # no await since the check above
        except CheckpointError as exc:
            raise ControlError(str(exc)) from None
        await gate.commit()
        await trio.to_thread.run_sync(vol.flush_in_place)
    finally:
        gate.reopen()
    return {"name": info.name, "seq": info.seq}


async def delete_live(vol: Volume, name: str) -> dict[str, Any]:
    gate = vol.writer.gate
    snaps = vol.snapshots
    if gate is None or snaps is None:
        raise ControlError("this volume is not mounted read-write here")
    try:
        freed = snaps.delete(name)
    except CheckpointError as exc:
        raise ControlError(str(exc)) from None
    await gate.commit()
    await trio.to_thread.run_sync(vol.flush_in_place)
    return {"name": name, "freed_blocks": freed}


#: Prefix of the scheduled checkpoints' names; retention deletes only these.
AUTO_PREFIX = "auto-"


def auto_name(now: float) -> str:
    """``auto-`` and the UTC time to the millisecond: sorts as it was taken."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{AUTO_PREFIX}{stamp}.{int(now * 1000) % 1000:03d}Z"


async def schedule(vol: Volume, every: float, keep: int | None) -> None:
    """``mount --checkpoint-every/--checkpoint-keep``: a checkpoint every ``every`` seconds,
    then the oldest scheduled ones beyond ``keep`` deleted (never a mounted one, never one
    made by hand). A failure (full save area, too many checkpoints) is one log line."""
    from mirrorfs.node.checkpoint_commands import mounted_names

    while True:
        await trio.sleep(every)
        try:
            # A tick as a whole: an unmount waits for it (at most TICK_GRACE) rather than
            # cutting it between the new checkpoint and the retirement of the oldest.
            with trio.move_on_after(TICK_GRACE) as scope:
                scope.shield = True
                await _tick(vol, keep, mounted_names)
        except ControlError as exc:
            log.warning("scheduled checkpoint not taken: %s", exc)


async def _tick(vol: Volume, keep: int | None, mounted_names) -> None:
    """One scheduled checkpoint, then retention. The oldest go first only when the table
    has no room for another; otherwise after, so that ``keep`` are there at every moment."""
    snaps = vol.snapshots
    lay = snaps.layout if snaps is not None else None
    full = snaps is not None and lay is not None and len(snaps.checkpoints) >= lay.max_checkpoints
    if keep is not None and full:
        await _retire(vol, keep - 1, mounted_names(vol.path))
    info = await create_live(vol, auto_name(time.time()))
    log.info("scheduled checkpoint %s at seq %d", info["name"], info["seq"])
    if keep is not None:
        await _retire(vol, keep, mounted_names(vol.path))


async def _retire(vol: Volume, keep: int, mounted: dict[str, int]) -> None:
    assert vol.snapshots is not None
    autos = [c.name for c in vol.snapshots.checkpoints if c.name.startswith(AUTO_PREFIX)]
    for name in autos[: max(0, len(autos) - keep)]:
        if name in mounted:
            continue
        await delete_live(vol, name)
