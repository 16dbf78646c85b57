"""Fixtures shared by the integration tests that sync calendars from a local feed server."""

from __future__ import annotations

import pytest

from tests.support.feed_server import FeedServer, Route

CALENDARS = range(1, 10)


@pytest.fixture
def server():
    with FeedServer() as srv:
        yield srv


@pytest.fixture
def calendars(db, server):
    """Calendars 1..9 of tenant 1 on the local feed server; returns a function to point one at a route."""
    db.execute("INSERT INTO tenants (id, name) VALUES (1, 't')")
    for cid in CALENDARS:
        db.execute(
            "INSERT INTO calendars (id, tenant_id, name, time_zone, source_url)"
            " VALUES (%s, 1, %s, 'Europe/Berlin', %s)",
            (cid, f"c{cid}", server.url(f"/cal{cid}.ics")),
        )
    db.commit()

    def route(cid: int, r: Route) -> None:
        server.routes[f"/cal{cid}.ics"] = r

    return route
