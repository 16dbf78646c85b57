"""Job settings: one typed place with documented defaults, overridable per deployment.

Defaults live here. A deployment overrides any of them with the Airflow Variable
``almanac_settings`` (a JSON object, e.g. ``{"invitation_ttl_days": 14}``); the glue in
``plugins/almanac_airflow/settings.py`` reads it inside tasks, never at DAG parse time.
Unknown keys and values of the wrong type are refused with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from almanac.errors import ConfigError

__all__ = ["Settings", "schedule_timezone"]


@dataclass(frozen=True)
class Settings:
    """Every tunable of every job. Field docs are the reference (README lists them too)."""

    #: Days after ``created_at`` an invitation expires when its ``expires_at`` is NULL.
    invitation_ttl_days: int = 30
    #: Rows deleted per statement by invitation cleanup (bounds each statement's locks).
    invitation_cleanup_chunk_size: int = 5000
    #: Postgres ``lock_timeout`` for cleanup statements, in milliseconds.
    cleanup_lock_timeout_ms: int = 5000
    #: Postgres ``statement_timeout`` for cleanup statements, in milliseconds.
    cleanup_statement_timeout_ms: int = 120_000

    # --- ICS feed sync -------------------------------------------------------------
    #: Days before the run's instant that the sync window starts.
    ics_window_days_back: int = 30
    #: Days after the run's instant that the sync window ends.
    ics_window_days_ahead: int = 365
    #: Smallest and largest number of calendars in one mapped batch task. Each task instance
    #: costs Airflow about a second or two (start, supervisor, API calls) while an unchanged
    #: calendar costs about a millisecond, so batches start at 125 (50 until 2026-12-08): 500
    #: calendars make 4 batches (an even load on 2 or 4 worker slots), 2,000 make 16.
    ics_batch_min: int = 125
    ics_batch_max: int = 500
    #: Batches per run the planner aims for before batches grow past ``ics_batch_min``.
    ics_batch_target_count: int = 16
    #: Fetch limits: connect / read timeouts and a total deadline per feed, in seconds.
    ics_connect_timeout_s: int = 5
    ics_read_timeout_s: int = 20
    ics_fetch_deadline_s: int = 60
    #: Largest feed body accepted, after decompression.
    ics_max_bytes: int = 10 * 1024 * 1024
    #: Redirect hops followed (each re-checked by the address guard).
    ics_max_redirects: int = 5
    #: Tries per feed for transient errors (timeouts, 429, 5xx) inside one task.
    ics_fetch_attempts: int = 3
    #: Longest wait between those tries, in seconds (Retry-After is honoured up to this).
    ics_retry_max_wait_s: int = 30
    #: A feed that suddenly has no events while it had at least this many is held back.
    ics_empty_feed_guard_min_events: int = 10
    #: A batch task fails (so Airflow retries and alerts) when more than this share of its
    #: calendars failed, in percent.
    ics_batch_failure_percent: int = 50
    #: Per-calendar lease lifetime in Redis, in seconds. A live holder renews it every third of
    #: this; a crashed one frees it after this long (a retry of the same task takes it at once).
    ics_lock_ttl_s: int = 30
    #: How long a batch waits, at its end, for leases other runs hold before it reports those
    #: calendars ``busy`` (retryable), in seconds.
    ics_lease_wait_s: int = 10
    #: Wall-time budget of one calendar in seconds: fetch (with its retries), parse and store
    #: together. Past it the calendar is recorded ``error`` and the rest of the batch goes on.
    ics_calendar_budget_s: int = 90
    #: CPU seconds one feed's parse and expansion may use; its worker process is killed past it.
    ics_parse_cpu_s: int = 20
    #: Memory one feed's parse may add to its worker process, in MiB (resident size; the address
    #: space is capped at twice this); the worker is killed past it.
    ics_parse_memory_mb: int = 512
    #: Instances kept per feed at most (unbounded rules are capped).
    ics_max_instances: int = 200_000
    #: Instances kept per series (one UID) at most: its first ones in the window; a warning
    #: names each series cut. Stops one runaway rule from pushing the feed's other events out.
    ics_max_instances_per_series: int = 20_000
    #: Characters kept of each SUMMARY, DESCRIPTION and LOCATION of an event; longer texts are
    #: cut, end in "… [truncated]" and add a warning.
    ics_max_event_text_chars: int = 50_000
    #: Characters of SUMMARY + DESCRIPTION + LOCATION summed over all instances of one feed
    #: kept at most; above it the longest texts are cut (to one common length) with a warning.
    ics_max_feed_text_chars: int = 50_000_000
    #: When a feed changed less than a day after its last full expansion, expand again only the
    #: events (UID groups) whose text changed, and keep the stored instances of the others. A
    #: full expansion still happens once a day (the window moves on), after any parse warning,
    #: and when the kept events could reach ``ics_max_instances`` or ``ics_max_feed_text_chars``.
    ics_reuse_unchanged_events: bool = True
    #: Hosts (``host`` or ``host:port``, comma-separated) the feed address guard lets through
    #: although they are loopback/private: dev and test feed servers. Empty in production.
    ics_allow_hosts: str = ""

    # --- Google Calendar push ------------------------------------------------------
    #: Members per mapped batch task of google_calendar_push.
    google_push_batch_size: int = 100
    #: A push batch task fails when more than this share of its members failed, in percent.
    google_batch_failure_percent: int = 50
    #: Tries per Google API call for 429, 5xx and connection faults.
    google_request_attempts: int = 4
    #: Longest wait between those tries, in seconds (Retry-After is honoured up to this).
    google_retry_max_wait_s: int = 60
    #: Socket timeout per Google API call, in seconds.
    google_request_timeout_s: int = 30
    #: Google Calendar calls per HTTP batch request (1..50; Calendar takes at most 50).
    google_batch_size: int = 50

    # --- Connected accounts (OAuth token refresh, integration health) --------------------
    #: Refresh an access token this long before it expires, in seconds (the spec: 5 minutes).
    oauth_refresh_lead_s: int = 300
    #: Tries per token refresh for 429, 5xx and connection faults (within one task).
    oauth_request_attempts: int = 3
    #: Longest wait between those tries, in seconds (Retry-After is honoured up to this).
    oauth_retry_max_wait_s: int = 10
    #: Socket timeout per provider call (token endpoint, health URL), in seconds.
    oauth_request_timeout_s: int = 10
    #: After a failed refresh the next scheduled one waits this long, doubling per failure in a
    #: row up to ``oauth_refresh_backoff_max_s``; after ``oauth_refresh_max_failures`` failures in
    #: a row the integration is ``error`` and only an on-demand refresh or a reconnect tries again.
    oauth_refresh_backoff_base_s: int = 60
    oauth_refresh_backoff_max_s: int = 3600
    oauth_refresh_max_failures: int = 10
    #: Lifetime assumed for an access token whose provider gave no ``expires_in``, in seconds.
    oauth_default_token_lifetime_s: int = 3600
    #: How long a request-time refresh (inside another job) waits for a refresh already running.
    oauth_refresh_lease_wait_s: int = 15
    #: Refreshes / health checks in flight per task.
    oauth_parallel_requests: int = 8
    #: Integrations per mapped batch task (both DAGs): batches of min..max, aiming at target_count.
    oauth_batch_min: int = 50
    oauth_batch_max: int = 1000
    oauth_batch_target_count: int = 8
    #: A refresh run fails (``summarize``; the failure notifier alerts) when more than this share
    #: of its integrations failed to refresh, in percent (revocations are not failures).
    oauth_refresh_failure_percent: int = 20

    # --- Notifications (outbox dispatch) ---------------------------------------------
    #: Tries per notification before it is ``dead``, per channel (the spec: 5 in development,
    #: 7 in production). Waits double from ``notify_backoff_base_s``; a Retry-After replaces one.
    notify_email_attempts: int = 5
    notify_sms_attempts: int = 5
    notify_push_attempts: int = 5
    notify_backoff_base_s: int = 1
    #: Longest wait between two tries of one notification, in seconds.
    notify_backoff_max_s: int = 3600
    #: Rows one dispatcher claims at a time (``FOR UPDATE SKIP LOCKED``).
    notify_claim_batch: int = 100
    #: Sends in flight at once inside one dispatch task.
    notify_parallel_sends: int = 5
    #: A claim's lease, in seconds: a dispatcher that dies leaves its rows for this long; then
    #: rows not yet handed to the provider are pending again, rows handed over are uncertain.
    notify_lease_s: int = 300
    #: A dispatch task stops claiming after this many seconds (the schedule is every minute).
    notify_run_budget_s: int = 45
    #: How often a waiting dispatcher looks at the outbox when no wake-up arrives, in ms.
    notify_idle_poll_ms: int = 500
    #: Slots of each notification pool (``notifications_<channel>``) that ``./dev up`` creates;
    #: one per dispatch task. 5 in development, 10 in production (set the pools in the UI).
    notify_pool_slots: int = 5
    #: Dispatch tasks per channel per run at most (each takes one slot of its channel's pool).
    notify_workers_per_channel: int = 5
    #: Provider limits, held in Redis across all workers (per second, per channel).
    notify_email_per_second: int = 100
    notify_sms_per_second: int = 10
    notify_push_per_second: int = 500
    #: Per-user limits, per hour and channel. A limited notification waits; it is not failed.
    notify_email_per_user_per_hour: int = 30
    notify_sms_per_user_per_hour: int = 10
    notify_push_per_user_per_hour: int = 60

    @property
    def ics_allow_host_set(self) -> frozenset[str]:
        return frozenset(h.strip() for h in self.ics_allow_hosts.split(",") if h.strip())

    @property
    def ics_parse_limits(self) -> dict[str, int]:
        """The limits ``almanac.ics.parse.parse_feed`` takes, as keyword arguments (the DAGs and
        ``almanac ics inspect`` parse with the same ones)."""
        return {
            "max_instances": self.ics_max_instances,
            "max_instances_per_series": self.ics_max_instances_per_series,
            "max_event_text_chars": self.ics_max_event_text_chars,
            "max_feed_text_chars": self.ics_max_feed_text_chars,
        }

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Any] | None) -> Settings:
        """Defaults updated with ``overrides``; raises ConfigError on unknown keys or bad types."""
        if overrides is None:
            return cls()
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"almanac settings must be a JSON object, got {type(overrides).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ConfigError(f"unknown almanac setting(s): {', '.join(unknown)}; known: {', '.join(known)}")
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            expected = type(getattr(cls, key))
            if type(value) is not expected:  # exact: JSON true is not an int setting
                raise ConfigError(f"almanac setting {key!r} must be {expected.__name__}, got {value!r}")
            if expected is int and value <= 0:
                raise ConfigError(f"almanac setting {key!r} must be positive, got {value!r}")
            values[key] = value
        return dataclasses.replace(cls(), **values)


def schedule_timezone(job: str, default: str = "UTC") -> str:
    """The IANA zone a job's cron schedule is read in: ``ALMANAC_<JOB>_TZ``, else ``default``.

    Schedules are fixed when a DAG file is parsed, so this is an environment variable (no I/O),
    not an Airflow Variable.
    """
    return os.environ.get(f"ALMANAC_{job.upper()}_TZ", default)
