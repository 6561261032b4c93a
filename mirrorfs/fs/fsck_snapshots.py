"""fsck of the checkpoints (snapshots) a volume holds: their structures and their trees.

The save area's table and map (store/snapshots.py) must parse (checksums), name only
checkpoints that exist, hold no block twice for one checkpoint and point only at blocks
outside the save area; every checkpoint's frozen superblock must parse. Then the
filesystem of each checkpoint, read through its ``CheckpointView``, gets the same check as
the live one (``fsck.check``), its block bitmap being the one of that moment: a block a
checkpoint references and nothing saved is found this way. Checkpoints are never repaired,
only reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mirrorfs.fs.layout import FsSuper
from mirrorfs.store.geometry import BITMAP_START
from mirrorfs.store.snapshots import SaveLayout, Table, parse_map

log = logging.getLogger(__name__)


def check_checkpoints(volume: Any, check_tree: Callable[[Any], list[str]]) -> list[str]:
    """Problems of the checkpoints of ``volume`` (an open Volume); [] when clean or none.
    ``check_tree(view)`` returns the problems of the filesystem on a block store."""
    sb = getattr(volume, "sb", None)
    if sb is None or not sb.save_area_blocks or not hasattr(volume, "checkpoint_view"):
        return []
    lay = SaveLayout.of(sb)
    if lay is None:
        return ["checkpoints: the save area is too small to hold its own structures"]
    problems: list[str] = []
    try:
        table = Table.unpack(volume.read(lay.table, 1))
    except ValueError as exc:
        return [f"checkpoints: table block {lay.table}: {exc}"]
    cks = table.checkpoints or []
    ids = [c.id for c in cks]
    if len(set(ids)) != len(ids) or ids != sorted(ids) or any(i >= table.next_id for i in ids):
        problems.append(f"checkpoints: table ids {ids} (next {table.next_id}) are not in order")
    if len({c.name for c in cks}) != len(cks):
        problems.append("checkpoints: two checkpoints share a name")
    indexes = [c.index for c in cks]
    if len(set(indexes)) != len(indexes) or any(i >= lay.max_checkpoints for i in indexes):
        problems.append(f"checkpoints: bad table indexes {indexes}")
    try:
        entries = parse_map(volume.read(lay.map_start, lay.map_blocks), 0, lay.slots)
    except ValueError as exc:
        return [*problems, f"checkpoints: map: {exc}"]
    seen: set[tuple[int, int]] = set()
    for slot, (block, cid) in sorted(entries.items()):
        if cid not in ids:
            problems.append(f"checkpoints: slot {slot} belongs to no checkpoint (id {cid})")
        if (block, cid) in seen:
            problems.append(f"checkpoints: block {block} saved twice for checkpoint id {cid}")
        seen.add((block, cid))
        if block < BITMAP_START or lay.start <= block < lay.end or block >= sb.block_count:
            problems.append(f"checkpoints: slot {slot} saves block {block}, which is never saved")
    for c in cks:
        if c.index >= lay.max_checkpoints:
            continue
        try:
            FsSuper.unpack(volume.read(lay.frozen_start + c.index, 1))
        except Exception as exc:
            problems.append(f"checkpoint {c.name!r}: frozen superblock: {exc}")
            continue
    if problems:
        return problems
    for c in cks:
        try:
            view = volume.checkpoint_view(c.name)
            problems += [f"checkpoint {c.name!r}: {p}" for p in check_tree(view)]
        except Exception as exc:
            problems.append(f"checkpoint {c.name!r}: cannot be read: {exc}")
    return problems
