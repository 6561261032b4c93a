"""The open transaction's run map against a plain dict model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mirrorfs.store.overlay import BlockOverlay

BS = 16
NBLOCKS = 64

writes = st.lists(
    st.tuples(st.integers(0, NBLOCKS - 1), st.integers(1, 8), st.integers(0, 255)),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    writes,
    st.integers(0, NBLOCKS - 1),
    st.integers(1, 16),
    st.sampled_from([1 << 20, 3 * BS]),  # all small (owned), or mixed with by-reference
    st.booleans(),
)
def test_overlay_matches_model(ops, rstart, rcount, join_below, mutable):
    ov = BlockOverlay(BS, join_below=join_below)
    model: dict[int, bytes] = {}
    for start, count, fill in ops:
        count = min(count, NBLOCKS - start)
        data = bytes([fill]) * (BS * count)
        if mutable:
            buf = bytearray(data)
            ov.put(start, buf)
            buf[:] = b"\xaa" * len(buf)  # the caller reuses its buffer: no effect
        else:
            ov.put(start, data)
        for i in range(count):
            model[start + i] = bytes([fill]) * BS
    # runs never overlap and cover exactly the written blocks
    covered: dict[int, bytes] = {}
    prev_end = -1
    for s, run in ov.runs():
        assert len(run) % BS == 0 and s >= prev_end
        assert not isinstance(run, bytearray)  # nothing mutable leaves the map
        for i in range(len(run) // BS):
            covered[s + i] = bytes(run[i * BS : (i + 1) * BS])
        prev_end = s + len(run) // BS
    assert covered == model
    assert ov.nbytes == len(model) * BS
    # reads patch the base
    rcount = min(rcount, NBLOCKS - rstart)
    base = b"\xee" * (BS * rcount)
    got = ov.patch(rstart, rcount, base)
    want = b"".join(model.get(rstart + i, b"\xee" * BS) for i in range(rcount))
    assert got == want
    hit = ov.covers(rstart, rcount)
    if hit is not None:
        assert hit == want


def test_streaming_writes_make_one_run():
    ov = BlockOverlay(BS)
    for i in range(100):
        ov.put(10 + i * 4, bytes([i]) * (BS * 4))
    runs = ov.runs()
    assert len(runs) == 1
    assert runs[0][0] == 10 and len(runs[0][1]) == 400 * BS
    ov.clear()
    assert not ov and ov.nbytes == 0


def test_rewrites_of_a_small_block_stay_one_piece():
    """A metadata block rewritten again and again (and its neighbours) in one transaction
    is copied over in place: the map does not fragment."""
    ov = BlockOverlay(BS)
    for i in range(50):
        ov.put(7, bytes([i]) * BS)
        ov.put(8, bytes([i + 1]) * BS)
        ov.put(7, bytes([i + 2]) * (2 * BS))
    assert len(ov) == 1 and ov.nbytes == 2 * BS
    assert ov.runs() == [(7, bytes([51]) * (2 * BS))]


def test_large_immutable_writes_are_kept_by_reference():
    ov = BlockOverlay(BS, join_below=4 * BS)
    data = bytes(range(8 * BS))
    ov.put(0, data)
    ((start, run),) = ov.runs()
    assert start == 0 and isinstance(run, memoryview) and run.obj is data
