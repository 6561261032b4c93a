"""The fast wait of pyfuse3's request loop (fuse/fastwait.py), without a mount."""

from __future__ import annotations

import socket

import pyfuse3
import trio

from mirrorfs.fuse import fastwait


def test_installed_swaps_pyfuse3s_trio_and_restores_it():
    with fastwait.installed() as ok:
        assert ok
        assert pyfuse3.trio is not trio
        # Everything but lowlevel.wait_readable is trio's own.
        assert pyfuse3.trio.Lock is trio.Lock
        assert pyfuse3.trio.lowlevel.current_task is trio.lowlevel.current_task
    assert pyfuse3.trio is trio


def test_wait_readable_returns_at_once_for_a_ready_fd_and_waits_otherwise():
    a, b = socket.socketpair()

    async def main():
        with fastwait.installed():
            wait = pyfuse3.trio.lowlevel.wait_readable
            with trio.move_on_after(0.2) as idle:
                await wait(a.fileno())  # nothing queued: it really waits
            assert idle.cancelled_caught
            b.send(b"x")
            with trio.fail_after(5):
                await wait(a.fileno())  # queued: returns (poll), no epoll needed
            assert a.recv(1) == b"x"
            got = []

            async def reader():
                await wait(a.fileno())
                got.append(a.recv(1))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.sleep(0.05)
                assert not got  # parked in trio's own wait
                b.send(b"y")
            assert got == [b"y"]

    try:
        trio.run(main)
    finally:
        a.close()
        b.close()
