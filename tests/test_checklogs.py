"""The checklogs fixture's reading of daemon logs (tests/conftest.py)."""

from __future__ import annotations

import logging
import re

import pytest

from tests.conftest import _bad, _log_records

LOG = """\
2026-12-02 02:21:44,352 18649 INFO mirrorfs.fuse.mount: mounting /v at /m
2026-12-02 02:21:44,353 18649 WARNING mirrorfs.repl.shipper: target t: connection lost
2026-12-02 02:21:44,354 18649 ERROR mirrorfs.repl.receiver: receiver bug
Traceback (most recent call last):
  File "x.py", line 1, in <module>
trio.EndOfChannel
2026-12-02 02:21:45,000 18649 INFO mirrorfs.fuse.mount: unmounting /m
Traceback (most recent call last):
  File "mirrorfs/cli.py", line 9, in main
KeyError: 'printed on stderr, outside logging'
"""


def test_records_keep_their_tracebacks_and_bad_ones_are_found(tmp_path):
    path = tmp_path / "daemon.log"  # (a mirrorfs.log here would fail this test itself)
    path.write_text(LOG)
    records = _log_records(str(path))
    assert len(records) == 4
    assert "trio.EndOfChannel" in records[2]
    bad = [r for r in records if _bad(r, [])]
    assert [r.split(" ", 4)[3] for r in bad] == ["ERROR", "INFO"]  # the ERROR, and the
    assert "KeyError" in bad[1]  # traceback printed under an INFO line
    assert [r for r in records if _bad(r, [re.compile("receiver bug|KeyError")])] == []


def test_a_warning_is_not_an_error():
    assert not _bad("2026-12-02 02:21:44,353 1 WARNING x: dropped source\n", [])


@pytest.mark.log_expected(r"an expected failure")
def test_an_expected_error_is_allowed():
    logging.getLogger("mirrorfs.test").error("an expected failure, declared by the test")
