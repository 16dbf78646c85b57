"""OAuth 2 providers: where their token and health endpoints are, and the product's client credentials.

A provider is configured once, as the Airflow connection ``oauth_<provider>`` (never in the
``integrations`` table): login = client id, password = client secret, extra (JSON, all optional
for ``google``)::

    {"token_url": "https://example.com/oauth/token",      # RFC 6749 token endpoint
     "health_url": "https://example.com/userinfo",        # a cheap authenticated GET
     "client_auth": "post" | "basic",                     # client_secret_post (default) / _basic
     "api_endpoint": "..."}                               # google only: a Calendar API override

``ProviderConfig.from_connection`` reads that shape; the Airflow glue looks the connection up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from almanac.errors import ConfigError

__all__ = ["GOOGLE", "GOOGLE_HEALTH_URL", "GOOGLE_TOKEN_URL", "PROVIDER_NAME", "ProviderConfig", "conn_id"]

PROVIDER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,49}$")  # as the integrations table's CHECK
GOOGLE = "google"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
#: OpenID Connect userinfo: answers any valid Google access token, costs no API quota.
GOOGLE_HEALTH_URL = "https://openidconnect.googleapis.com/v1/userinfo"
_DEFAULTS = {GOOGLE: {"token_url": GOOGLE_TOKEN_URL, "health_url": GOOGLE_HEALTH_URL}}


def conn_id(provider: str) -> str:
    """The Airflow connection id of ``provider``: ``oauth_<provider>``."""
    if not isinstance(provider, str) or not PROVIDER_NAME.match(provider):
        raise ConfigError(f"not a provider name: {str(provider)[:60]!r} (lower case, digits, _)")
    return f"oauth_{provider}"


@dataclass(frozen=True)
class ProviderConfig:
    """One OAuth 2 provider, as the product registered its client there."""

    name: str
    client_id: str
    client_secret: str = field(repr=False)
    token_url: str
    health_url: str | None = None
    client_auth: str = "post"  # "post": client_secret_post; "basic": client_secret_basic
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        conn_id(self.name)  # validates the name
        if not self.client_id or not self.client_secret:
            raise ConfigError(
                f"connection {conn_id(self.name)!r} needs a client id (login) and secret (password)"
            )
        if not self.token_url or not self.token_url.startswith(("https://", "http://")):
            raise ConfigError(f"connection {conn_id(self.name)!r}: extra token_url must be an http(s) URL")
        if self.client_auth not in ("post", "basic"):
            raise ConfigError(f"connection {conn_id(self.name)!r}: client_auth must be 'post' or 'basic'")

    @classmethod
    def from_connection(
        cls, name: str, *, login: str | None, password: str | None, extra: dict[str, Any] | None
    ) -> ProviderConfig:
        """The provider from connection ``oauth_<name>``'s fields (Google's endpoints by default)."""
        values = {**_DEFAULTS.get(name, {}), **{k: v for k, v in (extra or {}).items() if v}}
        return cls(
            name=name,
            client_id=login or "",
            client_secret=password or "",
            token_url=str(values.get("token_url") or ""),
            health_url=str(values["health_url"]) if values.get("health_url") else None,
            client_auth=str(values.get("client_auth") or "post"),
            extra={k: v for k, v in values.items() if k not in ("token_url", "health_url", "client_auth")},
        )
