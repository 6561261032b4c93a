"""Shared pytest setup: make the repository importable as ``mirrorfs`` and ``tests.util``."""

from __future__ import annotations

import logging
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    # Whatever pytest's import mode or working directory, tests import the checkout.
    sys.path.insert(0, REPO)

import pytest  # noqa: E402  (after the sys.path fix above, like tests.util)

from tests import util  # noqa: E402


def _uses_mount_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(
        getattr(fixturedef.func, "mounts_fuse", False)
        for name in item.fixturenames
        for fixturedef in info.name2fixturedefs.get(name, ())
    )


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the marks added here count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test using a ``@mounts_fuse`` fixture is a ``mount`` test; ``mount`` tests skip,
    with the reason, where FUSE is unusable (the one place that skip is decided)."""
    reason = None
    for item in items:
        if _uses_mount_fixture(item):
            item.add_marker(util.needs_fuse)
        if item.get_closest_marker("mount") is not None:
            if reason is None:
                reason = util.fuse_unavailable_reason() or ""
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"FUSE unusable: {reason}"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Record the running test (setup, call, teardown) for util.require_mount_mark."""
    util.current_test = item
    try:
        return (yield)
    finally:
        util.current_test = None


# -- checklogs (S3QL's idea): a traceback or an ERROR that a test did not expect fails it

_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \d+ (\w+) ")
_BAD_LEVELS = {"ERROR", "CRITICAL"}


def _log_records(path: str) -> list[str]:
    """The records of a daemon's log file: a timestamped line and the lines that follow it
    (a traceback, or whatever else the process printed to its stderr, which is that file)."""
    records: list[str] = []
    with open(path, errors="replace") as f:
        for line in f:
            if _RECORD_START.match(line) or not records:
                records.append(line)
            else:
                records[-1] += line
    return records


def _bad(record: str, allowed: list[re.Pattern]) -> bool:
    m = _RECORD_START.match(record)
    level = m.group(1) if m else ""
    if level not in _BAD_LEVELS and "Traceback (most recent call last)" not in record:
        return False
    return not any(p.search(record) for p in allowed)


@pytest.fixture(autouse=True)
def checklogs(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture):
    """Fail a test whose code (caplog) or daemons (``mirrorfs.log`` under its tmp_path)
    logged an ERROR or a traceback it did not declare with
    ``@pytest.mark.log_expected(r"regex", ...)``."""
    # tmp_path is torn down before this fixture: take its path now, read it after the test.
    root = str(request.getfixturevalue("tmp_path")) if "tmp_path" in request.fixturenames else ""
    yield
    allowed = [re.compile(p) for m in request.node.iter_markers("log_expected") for p in m.args]
    problems = []
    for when in ("setup", "call"):
        for rec in caplog.get_records(when):
            if rec.levelno < logging.ERROR and not rec.exc_info:
                continue
            text = rec.getMessage()
            if not any(p.search(text) for p in allowed):
                problems.append(f"{rec.levelname} {rec.name}: {text}")
    if root:
        for dirpath, _dirs, files in os.walk(root):
            if util.DAEMON_LOG in files:
                path = os.path.join(dirpath, util.DAEMON_LOG)
                problems += [f"{path}: {r.strip()}" for r in _log_records(path) if _bad(r, allowed)]
    if problems:
        shown = "\n".join(p[:2000] for p in problems[:5])
        pytest.fail(f"{len(problems)} unexpected error(s) or traceback(s) logged:\n{shown}")
