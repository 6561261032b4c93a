"""The mount mark cannot be forgotten: an unmarked test that mounts fails, a test using a
``@mounts_fuse`` fixture is marked (tests/conftest.py, tests/util.py)."""

from __future__ import annotations

import pytest

from tests import util


def test_an_unmarked_test_that_mounts_fails(tmp_path):
    assert util.current_test is not None and util.current_test.name.startswith("test_an_")
    with pytest.raises(AssertionError, match="has no mount mark"):
        util.mount(tmp_path / "vol", tmp_path / "mnt")
    with pytest.raises(AssertionError, match="has no mount mark"):
        util.run_cli("mount", tmp_path / "vol", tmp_path / "mnt")
    with pytest.raises(AssertionError, match="has no mount mark"):
        util.run_cli("replica", tmp_path / "r", "--listen", "127.0.0.1:1", "--mount", tmp_path)
    assert util.run_cli("mkfs", "--help").returncode == 0  # what does not mount is free


@pytest.fixture
@util.mounts_fuse
def flagged():
    """Stands for a fixture that mounts (it does not: only its flag matters here)."""
    return None


def test_a_test_using_a_mount_fixture_is_marked(flagged, request):
    assert request.node.get_closest_marker("mount") is not None
    util.require_mount_mark("mounts")  # marked: allowed
