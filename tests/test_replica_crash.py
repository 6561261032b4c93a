"""A replica daemon SIGKILLed while it logs groups of TXNs: nothing it acknowledged is lost.

The replica fsyncs each group of received TXNs once and acknowledges the group as received
only after that fsync (mirrorfs.repl.txn_pipeline). A crash in the middle of a group
(after its appends, before its fsync) may lose that group, which was never acknowledged,
but never a seq that the source saw acknowledged.
"""

from __future__ import annotations

import os
import threading

import pytest

from mirrorfs.store.volume import Volume
from tests.repl_util import Cluster, MiB, finish_and_compare, status, target, wait_caught_up
from tests.util import needs_fuse, wait_for

pytestmark = [pytest.mark.mount, needs_fuse]


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(str(tmp_path))
    try:
        yield c
    finally:
        c.close()


def test_sigkill_during_group_logging_loses_nothing_acked(cluster):
    rep = cluster.replica("rep", mount=False)
    vol = cluster.mkfs("src", "512M")
    src = cluster.mount_source(vol, [rep.address])
    wait_for(lambda: target(status(vol), rep.address)["state"] == "streaming", 30, "streaming")
    stop = threading.Event()
    chunk = os.urandom(MiB)

    def writer() -> None:  # 1 MiB writes, an fsync every 8 MiB, until told to stop
        with open(os.path.join(src.mountpoint, "big"), "wb") as f:
            n = 0
            while not stop.is_set() and n < 300:
                f.write(chunk)
                n += 1
                if n % 8 == 0:
                    f.flush()
                    os.fsync(f.fileno())

    th = threading.Thread(target=writer)
    th.start()
    acked = 0
    try:
        # Until the replica has acknowledged a good part of the stream, note what it acked.
        def progressed() -> bool:
            nonlocal acked
            acked = max(acked, target(status(vol), rep.address)["received_seq"])
            return acked >= 8

        wait_for(progressed, 60, "the replica to acknowledge some transactions")
        progressed()
        rep.kill()  # in the middle of the stream: a group may be appended, not fsynced
    finally:
        stop.set()
        th.join()
    # What the source saw acknowledged is in the replica's log (the open replays it).
    again = Volume.open(rep.dir)
    try:
        assert again.received_seq >= acked, (again.received_seq, acked)
        assert again.last_seq == again.received_seq  # replayed: at a transaction boundary
    finally:
        again.close()
    rep.start()
    wait_caught_up(vol)
    finish_and_compare(src, [rep])
