"""When promote asks first: the source connected, or heard too recently (no mount)."""

from __future__ import annotations

import pytest

from mirrorfs.node.promote import RECENT_CONTACT, PromoteError, check_source_gone

NOW = 1_000_000.0


def receiver(state: str, last_contact: float = 0.0) -> dict:
    return {
        "state": state,
        "source_address": "127.0.0.1:40000",
        "source_node_id": "abc",
        "last_contact": last_contact,
    }


@pytest.mark.parametrize("state", ["streaming", "initial-sync", "resyncing"])
def test_a_connected_source_is_refused(state):
    with pytest.raises(PromoteError) as info:
        check_source_gone(receiver(state, NOW - 0.25), now=NOW)
    msg = str(info.value)
    assert msg.startswith("the source 'abc' at 127.0.0.1:40000 is still connected")
    assert "last heard 0.2 s ago" in msg and msg.endswith("or pass --force")


def test_a_source_heard_recently_is_refused_then_allowed_once_quiet():
    with pytest.raises(PromoteError, match=r"was last heard 3\.0 s ago and may still be alive"):
        check_source_gone(receiver("disconnected", NOW - 3.0), now=NOW)
    check_source_gone(receiver("disconnected", NOW - RECENT_CONTACT - 0.1), now=NOW)
    check_source_gone(receiver("error", NOW - 60.0), now=NOW)


def test_a_replica_never_contacted_may_be_promoted():
    check_source_gone({}, now=NOW)
    check_source_gone(receiver("waiting"), now=NOW)
