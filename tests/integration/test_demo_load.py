from __future__ import annotations

from almanac.demo import DemoSpec, generate, load


def test_loading_twice_inserts_nothing_the_second_time(db):
    data = generate(
        DemoSpec(tenants=2, users_per_tenant=3, calendars_per_tenant=2, invitations_per_calendar=5)
    )
    first = load(db, data)
    assert first == {"tenants": 2, "users": 6, "calendars": 4, "calendar_members": 12, "invitations": 20}
    assert load(db, data) == dict.fromkeys(first, 0)
    assert db.execute("SELECT count(*) FROM invitations").fetchone()[0] == 20


def test_new_rows_after_demo_data_get_fresh_ids(db):
    load(db, generate(DemoSpec(tenants=2)))
    new_id = db.execute("INSERT INTO tenants (name) VALUES ('real') RETURNING id").fetchone()[0]
    assert new_id == 3


def test_demo_calendars_get_their_feed_once_and_user_urls_are_kept(db):
    spec = DemoSpec(tenants=2, calendars_per_tenant=2)
    load(db, generate(spec))  # a stack loaded before demo feeds existed: no URLs
    assert db.execute("SELECT count(*) FROM calendars WHERE source_url IS NULL").fetchone()[0] == 4
    db.execute("UPDATE calendars SET source_url = 'https://example.test/mine.ics' WHERE id = 2")
    db.commit()
    with_feeds = generate(DemoSpec(tenants=2, calendars_per_tenant=2, feed_base_url="http://127.0.0.1:58080"))
    assert load(db, with_feeds)["calendars"] == 3  # the three without a URL
    rows = dict(db.execute("SELECT id, source_url FROM calendars ORDER BY id").fetchall())
    assert rows == {
        1: "http://127.0.0.1:58080/calendar-1.ics",
        2: "https://example.test/mine.ics",
        3: "http://127.0.0.1:58080/calendar-3.ics",
        4: "http://127.0.0.1:58080/calendar-4.ics",
    }
    second = load(db, with_feeds)
    assert second == dict.fromkeys(second, 0)
