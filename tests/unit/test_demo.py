from __future__ import annotations

from datetime import UTC, datetime

from almanac.demo import DemoSpec, generate


def test_same_spec_gives_the_same_rows():
    spec = DemoSpec(tenants=2, seed=7)
    assert generate(spec) == generate(spec)


def test_other_seed_gives_other_rows():
    assert generate(DemoSpec(seed=1)).invitations != generate(DemoSpec(seed=2)).invitations


def test_sizes_follow_the_spec():
    spec = DemoSpec(tenants=3, users_per_tenant=5, calendars_per_tenant=2, invitations_per_calendar=4)
    data = generate(spec)
    assert len(data.tenants) == 3
    assert len(data.users) == 15
    assert len(data.calendars) == 6
    assert len(data.calendar_members) == 6 * 5
    assert len(data.invitations) == 6 * 4


def test_invitations_are_created_before_the_anchor():
    anchor = datetime(2026, 3, 1, tzinfo=UTC)
    data = generate(DemoSpec(anchor=anchor, invitations_per_calendar=20))
    created = [row[6] for row in data.invitations]
    assert all(c <= anchor for c in created)
    assert {row[5] for row in data.invitations} == {"pending", "accepted", "declined"}
