"""The kernel's backing-device settings of a FUSE mount: readahead.

What the kernel and libfuse 3.14 negotiate at INIT (pyfuse3 3.5's ``fuse_init`` touches only
capability bits, never ``max_write`` or ``max_readahead``):

- writes: libfuse sizes its request buffer for FUSE_MAX_MAX_PAGES (256) pages, offers
  ``max_write`` = 1 MiB and ``max_pages`` = 256, and the kernel (``fs.fuse.max_pages_limit``
  = 256) takes them: a ``dd bs=1M`` write arrives as 1 MiB WRITE requests already.
- reads: the kernel offers its bdi's default readahead (128 KiB) as ``max_readahead`` and
  libfuse answers with the same, so buffered reads arrive as 128 KiB READ requests whatever
  the application's read size. The bdi's ``read_ahead_kb`` can be raised after the mount
  (by root): files opened from then on read ahead up to that much, in requests of up to
  ``max_pages``.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: Readahead window for mirrorfs mounts: one request of max_pages (256 x 4 KiB pages).
READAHEAD_KB = 1024


def bdi_path(st_dev: int, name: str) -> str:
    """The sysfs file ``name`` of the backing device of a mount whose ``st_dev`` is given."""
    return f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/{name}"


def raise_readahead(st_dev: int, kib: int = READAHEAD_KB) -> int | None:
    """Set the mount's readahead to at least ``kib`` KiB; returns the value now in force.

    None when the setting cannot be read or written (not root, no sysfs): the mount works
    as before, with the kernel's default readahead.
    """
    path = bdi_path(st_dev, "read_ahead_kb")
    try:
        with open(path) as f:
            current = int(f.read())
        if current >= kib:
            return current
        with open(path, "w") as f:
            f.write(f"{kib}\n")
        with open(path) as f:
            current = int(f.read())
    except (OSError, ValueError) as exc:
        log.debug("cannot raise the readahead (%s): %s", path, exc)
        return None
    log.debug("readahead of the mount: %d KiB", current)
    return current
