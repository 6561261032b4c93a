"""Shared pytest setup: make the repository importable as ``mirrorfs`` and ``tests.util``."""

from __future__ import annotations

import os
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
