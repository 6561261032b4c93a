"""DirectWriteCache: when a direct write must drop an inode's kernel pages (no mount)."""

from __future__ import annotations

from mirrorfs.fuse.pagecache import DirectWriteCache


def test_only_inodes_that_a_buffered_handle_opened_need_an_invalidation():
    c = DirectWriteCache()
    assert c.opened(7, direct=True) is True
    assert not c.needs_invalidation(7)  # only direct handles: nothing of it is cached
    assert c.opened(7, direct=False) is True
    assert c.needs_invalidation(7)
    c.invalidated(7, ok=True)
    assert c.needs_invalidation(7)  # the buffered handle is still open: it may cache again
    c.released(7, direct=False)
    assert c.needs_invalidation(7)  # keep_cache: its pages outlive the handle
    c.invalidated(7, ok=True)
    assert not c.needs_invalidation(7)
    c.released(7, direct=True)
    assert not c.needs_invalidation(7)


def test_a_failed_invalidation_drops_the_cache_at_the_next_open():
    c = DirectWriteCache()
    c.opened(3, direct=False)
    c.invalidated(3, ok=False)
    assert c.opened(3, direct=False) is False  # no keep_cache: the kernel drops the pages
    assert c.opened(3, direct=False) is True
