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


def test_without_a_feed_base_calendars_have_no_feed():
    assert {row[4] for row in generate(DemoSpec()).calendars} == {None}


def test_feed_base_gives_each_calendar_its_own_feed_url():
    data = generate(DemoSpec(feed_base_url="http://127.0.0.1:58080/"))
    urls = [row[4] for row in data.calendars]
    assert urls == [f"http://127.0.0.1:58080/calendar-{row[0]}.ics" for row in data.calendars]
    # Only the URLs differ from the spec without feeds: same ids, names, zones, invitations.
    plain = generate(DemoSpec())
    assert [row[:4] for row in data.calendars] == [row[:4] for row in plain.calendars]
    assert data.invitations == plain.invitations
