"""A minimal pyfuse3 passthrough filesystem, the FUSE baseline of the mirrorfs benchmarks.

Every request is forwarded to a local *source* directory with plain system calls on real
file descriptors (os.pread/os.pwrite), so that comparing mirrorfs with this filesystem
measures what mirrorfs adds on top of "Python + pyfuse3 + the FUSE round trip".

The handlers, and how they map inodes to source paths, are in bench/passthrough_ops.py.

Usage: python bench/passthrough.py SOURCE_DIR MOUNTPOINT [--debug] [--writeback-cache]
Runs in the foreground until unmounted (fusermount3 -u MOUNTPOINT) or SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import pyfuse3
import trio
from passthrough_ops import PassthroughOperations

log = logging.getLogger(__name__)


async def _serve(mountpoint: str) -> None:
    """Run pyfuse3 until unmounted; SIGINT/SIGTERM unmount cleanly."""
    async with trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("signal %d: unmounting %s", signum, mountpoint)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signals, name="signals")
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """Mount SOURCE_DIR at MOUNTPOINT and serve it in the foreground."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="directory to expose")
    parser.add_argument("mountpoint", help="where to mount it")
    parser.add_argument("--debug", action="store_true", help="log every FUSE request")
    parser.add_argument(
        "--writeback-cache", action="store_true", help="enable the kernel's writeback cache"
    )
    parser.add_argument("--allow-other", action="store_true", help="mount with allow_other")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    if not os.path.isdir(args.source):
        print(f"passthrough: {args.source}: not a directory", file=sys.stderr)
        return 2
    if not os.path.isdir(args.mountpoint):
        print(f"passthrough: {args.mountpoint}: not a directory", file=sys.stderr)
        return 2

    ops = PassthroughOperations(args.source, writeback_cache=args.writeback_cache)
    options = set(pyfuse3.default_options)
    options.add("fsname=passthrough")
    if args.debug:
        options.add("debug")
    if args.allow_other:
        options.add("allow_other")
    os.umask(0)  # modes from the kernel already carry the caller's umask
    try:
        pyfuse3.init(ops, args.mountpoint, options)
    except RuntimeError as exc:
        print(f"passthrough: cannot mount {args.mountpoint}: {exc}", file=sys.stderr)
        return 1
    try:
        trio.run(_serve, args.mountpoint)
    except BaseException:
        pyfuse3.close(unmount=False)
        raise
    pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
