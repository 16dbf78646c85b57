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
