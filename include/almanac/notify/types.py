"""Notifications: what a channel sender is given (``Message``) and what it answers (``SendResult``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["CHANNELS", "Channel", "Message", "Outcome", "SendResult"]

Channel = Literal["email", "sms", "push"]
CHANNELS: tuple[Channel, ...] = ("email", "sms", "push")

#: ``sent``: the provider accepted it. ``failed``: transient (timeout before the request was
#: sent, 429, 5xx): try again later. ``dead``: permanent (invalid number, rejected address, bad
#: credentials): never again. ``skipped``: nothing to send (no address, no device).
#: ``uncertain``: the request may have reached the provider but no answer came back: resending
#: could deliver it twice, so it is not retried automatically.
Outcome = Literal["sent", "failed", "dead", "skipped", "uncertain"]


@dataclass(frozen=True, slots=True)
class Message:
    """One notification, resolved for its channel.

    ``to``: email: ``(address,)``; sms: ``(E.164 number,)``; push: the user's active FCM
    registration tokens. ``idempotency_key`` is the outbox row's unique key: email derives its
    ``Message-ID`` from it, push its collapse key / tag."""

    notification_id: int
    idempotency_key: str
    channel: Channel
    to: tuple[str, ...]
    subject: str | None
    body: str
    data: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SendResult:
    """What one send came to. ``error`` is operator-readable (the provider's reason, e.g. Twilio's
    code and message) and never holds a secret, a token or a full address/number.
    ``retry_after_s``: the provider's ``Retry-After`` when it gave one. ``dead_tokens``: push
    registration tokens the provider says are gone (UNREGISTERED / 404): their devices are
    disabled."""

    outcome: Outcome
    provider_id: str | None = None
    error: str | None = None
    retry_after_s: float | None = None
    dead_tokens: tuple[str, ...] = ()
