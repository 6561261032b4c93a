"""DirectWriteCache: when a direct write must drop an inode's kernel pages (no mount)."""

from __future__ import annotations

from mirrorfs.fuse.pagecache import DirectWriteCache


def test_only_inodes_that_a_buffered_handle_opened_need_an_invalidation():
    c = DirectWriteCache()
    assert c.opened(7, direct=True) is True
    assert not c.direct_write(7)  # only direct handles: nothing of it is cached
    assert c.opened(7, direct=False) is True
    assert c.direct_write(7)
    assert c.direct_write(7)  # the buffered handle is still open: it may cache again
    c.released(7, direct=False)
    assert c.direct_write(7)  # keep_cache: its pages outlive the handle
    assert not c.direct_write(7)  # dropped once with no buffered handle open: nothing left
    c.released(7, direct=True)


def test_the_next_open_after_a_direct_write_drops_the_cache():
    c = DirectWriteCache()
    c.opened(3, direct=False)
    assert c.direct_write(3)
    assert c.opened(3, direct=True) is False  # no keep_cache: the kernel drops the pages
    assert c.opened(3, direct=False) is True
