"""``python -m mirrorfs ARGS``: the command line (mirrorfs.cli).

``python -m mirrorfs --handover DIR [--timeout S] -- ARGV`` is the helper that a switchover
spawns (mirrorfs.node.handover): it waits for DIR's lock, then runs ``mirrorfs ARGV`` in this
process.
"""

from __future__ import annotations

import sys

from mirrorfs.cli import main
from mirrorfs.node import handover

if sys.argv[1:2] == [handover.HANDOVER_ARG]:
    # While the old process finishes: these imports are most of a successor's start-up.
    import mirrorfs.fuse.mount
    import mirrorfs.node.replica
    import mirrorfs.node.source  # noqa: F401

    raise SystemExit(handover.main(sys.argv[2:], run=main))
raise SystemExit(main())
