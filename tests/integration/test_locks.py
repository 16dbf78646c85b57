from __future__ import annotations

from almanac.locks import entity_lock


def test_second_holder_is_refused_until_the_first_releases(redis_client):
    with entity_lock(redis_client, "almanac:lock:test:1", 60) as first:
        assert first
        with entity_lock(redis_client, "almanac:lock:test:1", 60) as second:
            assert not second
        assert redis_client.exists("almanac:lock:test:1")  # the refused one freed nothing
    with entity_lock(redis_client, "almanac:lock:test:1", 60) as again:
        assert again


def test_lock_expires_with_its_ttl(redis_client):
    with entity_lock(redis_client, "almanac:lock:test:2", 60) as taken:
        assert taken
        assert 0 < redis_client.ttl("almanac:lock:test:2") <= 60


def test_an_expired_lock_retaken_by_another_is_not_freed_by_the_first(redis_client):
    with entity_lock(redis_client, "almanac:lock:test:3", 60) as taken:
        assert taken
        redis_client.set("almanac:lock:test:3", "someone-else")  # ours expired, another took it
    assert redis_client.get("almanac:lock:test:3") == b"someone-else"
