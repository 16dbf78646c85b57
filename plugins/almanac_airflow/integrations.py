"""Connected-accounts glue: providers from Airflow connections, the token key, and the task bodies
of ``oauth_token_refresh`` and ``integration_health``.

- Connection ``oauth_<provider>`` per provider (``almanac.integrations.providers`` has its shape).
  For ``google``, the older connection ``google_oauth`` (login, password, extra ``token_uri``,
  ``api_endpoint``) is read when ``oauth_google`` does not exist.
- Variable ``almanac_token_fernet_key``: the Fernet key(s) tokens are encrypted with.

Read inside tasks only; nothing here does I/O at import time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime

from almanac.batches import ItemResult
from almanac.errors import ConfigError
from almanac.integrations import plan_integration_batches

__all__ = [
    "FERNET_KEY_VARIABLE",
    "LEGACY_GOOGLE_CONN_ID",
    "Providers",
    "health_work",
    "lease_owner",
    "plan_health",
    "plan_refresh",
    "refresh_work",
    "refresher",
    "token_cipher",
    "trigger_refresh_of_expired",
]

log = logging.getLogger(__name__)

FERNET_KEY_VARIABLE = "almanac_token_fernet_key"
LEGACY_GOOGLE_CONN_ID = "google_oauth"


def token_cipher():
    """The ``TokenCipher`` for the key(s) in Variable ``almanac_token_fernet_key``."""
    from airflow.sdk import Variable

    from almanac.google.crypto import TokenCipher

    keys = Variable.get(FERNET_KEY_VARIABLE, default=None)
    if not keys:
        raise ConfigError(
            f"Variable {FERNET_KEY_VARIABLE!r} is not set (dev/CI: AIRFLOW_VAR_ALMANAC_TOKEN_FERNET_KEY)"
        )
    return TokenCipher(keys)


class Providers:
    """``name -> ProviderConfig`` from connection ``oauth_<name>``, each looked up once."""

    def __init__(self) -> None:
        self._found: dict[str, object] = {}

    def __call__(self, name: str):
        if name not in self._found:
            self._found[name] = self._lookup(name)
        found = self._found[name]
        if isinstance(found, ConfigError):
            raise found
        return found

    @staticmethod
    def _lookup(name: str):
        from airflow.sdk import BaseHook

        from almanac.integrations.providers import GOOGLE, ProviderConfig, conn_id

        try:
            wanted = conn_id(name)
        except ConfigError as exc:
            return exc
        tried = [wanted]
        candidates = [wanted] + ([LEGACY_GOOGLE_CONN_ID] if name == GOOGLE else [])
        for candidate in candidates:
            try:
                conn = BaseHook.get_connection(candidate)
            except Exception:  # AirflowNotFoundException and friends
                tried.append(candidate)
                continue
            extra = dict(conn.extra_dejson or {})
            if candidate == LEGACY_GOOGLE_CONN_ID and "token_uri" in extra:
                extra.setdefault("token_url", extra.pop("token_uri"))
            try:
                return ProviderConfig.from_connection(
                    name, login=conn.login, password=conn.password, extra=extra
                )
            except ConfigError as exc:
                return exc
        return ConfigError(
            f"provider {name!r}: Airflow connection {wanted!r} is not defined "
            "(login = client id, password = client secret, extra token_url / health_url)"
        )


def lease_owner(context) -> str:
    """The lease owner of the running task instance: every try of it is the same owner."""
    ti = context["ti"]
    return f"{ti.dag_id}/{ti.run_id}/{ti.task_id}/{ti.map_index}"


def refresher(
    leases, settings, *, providers: Providers | None = None, sleep: Callable[[float], None] = time.sleep
):
    """The ``Refresher`` a task uses (provider connections, the token key, the settings)."""
    from almanac.integrations.refresh import Refresher, RefreshOptions

    options = RefreshOptions.from_settings(settings)
    return Refresher(token_cipher(), providers or Providers(), leases, options, sleep=sleep)


# --- oauth_token_refresh -----------------------------------------------------------------


def _requested_ids(context, asset) -> list[int] | None:
    """The ids a run was asked to refresh (params, or Redis requests); None for a scheduled run."""
    from almanac.batches import as_entity_id
    from almanac.integrations.requests import requested_integration_ids

    params = context.get("params") or {}
    asked = [params["integration_id"]] if params.get("integration_id") is not None else []
    asked += list(params.get("integration_ids") or [])
    if asked:
        return sorted({as_entity_id(value) for value in asked})
    events = list((context.get("triggering_asset_events") or {}).get(asset, []) or [])
    if events:
        # As ics_sync_requested: also the requests stored after this run's queueing.
        run_after = context["dag_run"].run_after.isoformat()
        events += list(context["inlet_events"][asset].after(run_after))
        return requested_integration_ids(event.extra for event in events)
    return None


def _requested_at(context) -> datetime:
    """The instant an asked-for refresh must be newer than: the ``requested_at`` param (what
    ``integration_health`` passes: when it found the tokens refused), else the run's ``run_after``."""
    raw = (context.get("params") or {}).get("requested_at")
    if not raw:
        return context["dag_run"].run_after
    try:
        when = datetime.fromisoformat(str(raw))
    except ValueError:
        raise ConfigError(f"param requested_at is not an ISO 8601 instant: {str(raw)[:40]!r}") from None
    if when.tzinfo is None:
        raise ConfigError("param requested_at needs a UTC offset (e.g. 2026-06-01T12:00:00+00:00)")
    return when


def plan_refresh(context, asset) -> list[dict]:
    """Plan one run of ``oauth_token_refresh``: the integrations due by the data-interval end
    (scheduled, backfill), or the ones asked for (``integration_id(s)`` params, Redis requests,
    ``integration_health``), cut into batches carrying the run's mode."""
    from almanac.integrations.store import due_for_refresh
    from almanac_airflow.hooks import app_db
    from almanac_airflow.runs import interval_end
    from almanac_airflow.settings import load_settings

    settings = load_settings()
    requested = _requested_ids(context, asset)
    if requested is not None:
        ids, mode = requested, {"requested_at": _requested_at(context).isoformat()}
        log.info("refreshing %d requested integration(s): %s", len(ids), ids[:20])
    else:
        before = interval_end(context)
        with app_db() as conn:
            ids = due_for_refresh(conn, before)
        mode = {"due_before": before.isoformat()}
        log.info("%d integration(s) due for refresh before %s", len(ids), before.isoformat())
    return plan_integration_batches(ids, settings, mode)


def refresh_work(batch: dict, context) -> list[ItemResult]:
    """Refresh one batch (``batch["ids"]``) in the batch's mode."""
    from almanac.leases import LeaseKeeper
    from almanac_airflow.hooks import app_db, redis_client
    from almanac_airflow.settings import load_settings

    settings = load_settings()
    due = batch.get("due_before")
    asked = batch.get("requested_at")
    redis = redis_client()
    try:
        with LeaseKeeper(redis, lease_owner(context)) as leases:
            return refresher(leases, settings).refresh_many(
                app_db,
                batch["ids"],
                parallel=settings.oauth_parallel_requests,
                due_before=datetime.fromisoformat(due) if due else None,
                requested_at=datetime.fromisoformat(asked) if asked else None,
            )
    finally:
        redis.close()


# --- integration_health --------------------------------------------------------------------


def plan_health(context) -> list[dict]:
    """Plan one sweep: ``active``/``expired`` integrations not checked since the data-interval end."""
    from almanac.integrations.store import due_for_health_check
    from almanac_airflow.hooks import app_db
    from almanac_airflow.runs import interval_end
    from almanac_airflow.settings import load_settings

    settings = load_settings()
    since = interval_end(context)
    with app_db() as conn:
        ids = due_for_health_check(conn, since)
    log.info("%d integration(s) to check (not checked since %s)", len(ids), since.isoformat())
    context["ti"].xcom_push(key="checked_since", value=since.isoformat())
    return plan_integration_batches(ids, settings, {"checked_since": since.isoformat()})


def health_work(batch: dict, context) -> list[ItemResult]:
    """Check one batch's integrations (one call each, never retried)."""
    from datetime import UTC

    from almanac.integrations.health import HealthChecker
    from almanac.integrations.refresh import plain_session
    from almanac_airflow.hooks import app_db
    from almanac_airflow.settings import load_settings

    settings = load_settings()
    checker = HealthChecker(
        token_cipher(),
        Providers(),
        session=plain_session,
        clock=lambda: datetime.now(UTC),
        timeout_s=float(settings.oauth_request_timeout_s),
    )
    return checker.check_many(
        app_db,
        batch["ids"],
        checked_since=datetime.fromisoformat(batch["checked_since"]),
        parallel=settings.oauth_parallel_requests,
    )


def trigger_refresh_of_expired(context, *, work_task_id: str = "check_batch") -> list[int]:
    """Trigger one ``oauth_token_refresh`` run (conf ``{"integration_ids": [...]}``, run id
    ``integration_health__<run id>``) for the integrations this sweep found ``expired``; skip
    when there are none or a retry finds that run already triggered.

    Raises the Task SDK's ``DagRunTriggerException`` exactly as ``TriggerDagRunOperator`` does
    (the task runner triggers the run through the execution API); importing that operator in the
    DAG file would cost ~450 ms and file I/O at every parse.
    """
    from airflow.sdk.exceptions import AirflowSkipException, DagRunTriggerException

    from almanac_airflow.batches import batch_summaries

    results = [
        r for summary in batch_summaries(context["ti"], work_task_id) for r in summary.get("results", [])
    ]
    expired = sorted({r["integrationId"] for r in results if r.get("healthTo") == "expired"})
    if not expired:
        raise AirflowSkipException("no integration found expired: no refresh to trigger")
    log.info("triggering oauth_token_refresh for %d expired integration(s): %s", len(expired), expired[:20])
    raise DagRunTriggerException(
        trigger_dag_id="oauth_token_refresh",
        dag_run_id=f"integration_health__{context['run_id']}",
        # A refresh made after this sweep's checks began serves the request too (e.g. a scheduled
        # run that found them due, since a check makes an expired integration due at once).
        conf={
            "integration_ids": expired,
            "requested_at": context["ti"].xcom_pull(task_ids="plan_batches", key="checked_since"),
        },
        logical_date=None,
        reset_dag_run=False,
        skip_when_already_exists=True,
        wait_for_completion=False,
        allowed_states=["success"],
        failed_states=["failed"],
        poke_interval=60,
        deferrable=False,
    )
