"""Notifications: masking recipients (addresses, numbers, device tokens) in errors and logs."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["mask_email", "mask_phone", "mask_recipient", "mask_token", "scrub"]

_EMAIL = re.compile(r"[\w.+%-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(r"\+\d{7,15}")


def mask_email(address: str) -> str:
    """``alice@example.com`` -> ``a***@example.com`` (the domain stays: it tells which provider)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return mask_token(address)
    return f"{local[:1]}***@{domain}"


def mask_phone(number: str) -> str:
    """``+15550100001`` -> ``+1555***0001``: country and area code, then the last four digits."""
    if len(number) <= 8:
        return number[:2] + "***"
    return f"{number[:5]}***{number[-4:]}"


def mask_token(token: str) -> str:
    """A push registration token -> its first 6 characters and an ellipsis."""
    return f"{token[:6]}..."


def mask_recipient(channel: str, value: str) -> str:
    """The mask that fits ``channel`` (``email`` / ``sms`` / ``push``)."""
    if channel == "email":
        return mask_email(value)
    if channel == "sms":
        return mask_phone(value)
    return mask_token(value)


def scrub(text: str, recipients: Iterable[str] = ()) -> str:
    """``text`` (a provider's reason) with ``recipients`` and anything like an address or an
    E.164 number masked: providers quote the recipient back ("The 'To' number +1555... is not
    valid"), and their words end up in the outbox's ``last_error``."""
    for value in recipients:
        if value and value in text:
            masked = (
                mask_email(value)
                if "@" in value
                else (mask_phone(value) if value.startswith("+") else mask_token(value))
            )
            text = text.replace(value, masked)
    text = _EMAIL.sub(lambda m: mask_email(m.group(0)), text)
    return _PHONE.sub(lambda m: mask_phone(m.group(0)), text)
