"""ics_sync: resolve a feed's TZIDs (IANA, Windows, Outlook display names, VTIMEZONE) per feed."""

from __future__ import annotations

import logging
import re
import unicodedata
import zoneinfo
from datetime import datetime, timedelta, timezone, tzinfo
from functools import lru_cache

from icalendar.timezone.windows_to_olson import WINDOWS_TO_OLSON

__all__ = ["ZoneResolver", "zone_name"]

log = logging.getLogger(__name__)

# Outlook / Exchange write the *display name* of a Windows zone as TZID, with or without the
# "(UTC+01:00) " prefix. CLDR only maps Windows ids, so the common display names are listed
# here (after the prefix, lower-cased, accents removed). Anything else goes through the city
# heuristic in ``_from_display_name``.
_DISPLAY_NAMES = {
    "eastern time (us & canada)": "America/New_York",
    "central time (us & canada)": "America/Chicago",
    "mountain time (us & canada)": "America/Denver",
    "pacific time (us & canada)": "America/Los_Angeles",
    "pacific time (us & canada), tijuana": "America/Los_Angeles",
    "pacific time (us & canada); tijuana": "America/Los_Angeles",
    "arizona": "America/Phoenix",
    "alaska": "America/Anchorage",
    "hawaii": "Pacific/Honolulu",
    "atlantic time (canada)": "America/Halifax",
    "brasilia": "America/Sao_Paulo",
    "coordinated universal time": "UTC",
    "utc": "UTC",
    "greenwich mean time : dublin, edinburgh, lisbon, london": "Europe/London",
    "dublin, edinburgh, lisbon, london": "Europe/London",
    "amsterdam, berlin, bern, rome, stockholm, vienna": "Europe/Berlin",
    "belgrade, bratislava, budapest, ljubljana, prague": "Europe/Budapest",
    "brussels, copenhagen, madrid, paris": "Europe/Paris",
    "sarajevo, skopje, warsaw, zagreb": "Europe/Warsaw",
    "athens, bucharest": "Europe/Bucharest",
    "helsinki, kyiv, riga, sofia, tallinn, vilnius": "Europe/Helsinki",
    "moscow, st. petersburg": "Europe/Moscow",
    "canberra, melbourne, sydney": "Australia/Sydney",
    "osaka, sapporo, tokyo": "Asia/Tokyo",
    "beijing, chongqing, hong kong, urumqi": "Asia/Shanghai",
    "kuala lumpur, singapore": "Asia/Singapore",
    "chennai, kolkata, mumbai, new delhi": "Asia/Kolkata",
}
_OFFSET_PREFIX = re.compile(r"^\((?:UTC|GMT)\s*(?:([+-])(\d{1,2})(?::?(\d{2}))?)?\)\s*", re.IGNORECASE)


@lru_cache(maxsize=1)
def _iana_by_lower() -> dict[str, str]:
    return {name.lower(): name for name in zoneinfo.available_timezones()}


@lru_cache(maxsize=1)
def _iana_by_city() -> dict[str, list[str]]:
    by_city: dict[str, list[str]] = {}
    for name in sorted(zoneinfo.available_timezones()):
        by_city.setdefault(name.rsplit("/", 1)[-1].lower(), []).append(name)
    return by_city


@lru_cache(maxsize=512)
def _iana(name: str) -> tzinfo | None:
    """An IANA zone by (case-insensitive) name, or None."""
    key = _iana_by_lower().get(name.lower())
    if key is None:
        return None
    try:
        return zoneinfo.ZoneInfo(key)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):  # pragma: no cover - listed but unreadable
        return None


def _strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def _normalise(tzid: str) -> str:
    """A TZID as written, without quotes, escapes, stray colons and surrounding space."""
    text = tzid.replace("\\,", ",").replace("\\;", ";").replace("\\", "")
    text = text.strip().strip('"').strip().rstrip(":").strip()
    return text[5:].strip() if text.upper().startswith("TZID=") else text  # "TZID=TZID=..." (seen)


def _offsets(tz: tzinfo) -> set[timedelta]:
    probes = (datetime(2024, 1, 15, 12), datetime(2024, 7, 15, 12))
    return {tz.utcoffset(p.replace(tzinfo=tz)) for p in probes}


def _from_display_name(tzid: str) -> tzinfo | None:
    """An IANA zone for an Outlook display name like ``(UTC-05:00) Eastern Time (US & Canada)``."""
    text = _strip_accents(tzid)
    offset = None
    match = _OFFSET_PREFIX.match(text)
    if match:
        text = text[match.end() :]
        if match.group(1):
            sign = -1 if match.group(1) == "-" else 1
            offset = sign * timedelta(hours=int(match.group(2)), minutes=int(match.group(3) or 0))
    key = text.strip().lower()
    if key in _DISPLAY_NAMES:
        return _iana(_DISPLAY_NAMES[key])
    if key in (k.lower() for k in WINDOWS_TO_OLSON):
        return _iana(next(v for k, v in WINDOWS_TO_OLSON.items() if k.lower() == key))
    # A list of cities: prefer a zone that CLDR uses as a Windows zone's main city
    # ("Amsterdam, Belgrade, Berlin, ..." -> Europe/Berlin), then any zone named after a city.
    windows_targets = set(WINDOWS_TO_OLSON.values())
    candidates: list[str] = []
    for token in re.split(r"[,;/&()]", key):
        city = token.strip().replace(" ", "_")
        candidates.extend(_iana_by_city().get(city, ()) if city else ())
    candidates.sort(key=lambda name: name not in windows_targets)
    for name in candidates:
        tz = _iana(name)
        if tz is not None and (offset is None or offset in _offsets(tz)):
            return tz
    return None


def zone_name(tz: tzinfo | None) -> str:
    """A stable name for a zone (its IANA key, TZID or offset)."""
    if tz is None:
        return ""
    for attribute in ("key", "_tzid", "zone"):
        value = getattr(tz, attribute, None)
        if isinstance(value, str) and value:
            return value
    if isinstance(tz, timezone):
        return tz.tzname(None) or str(tz)
    return str(tz)


class ZoneResolver:
    """Resolves the TZIDs of ONE feed. Build one per feed: VTIMEZONEs are feed-local.

    icalendar caches custom VTIMEZONE definitions process-wide by TZID (first one wins), so
    two feeds that both define e.g. ``Customized Time Zone`` would share one definition. This
    resolver keeps them per feed and is used for every TZID parameter.

    Order: IANA name (any case) -> Windows zone id (CLDR) -> "globally unique" TZID
    (``/vendor/.../Europe/Berlin``) -> the feed's own VTIMEZONE -> Outlook display name.
    ``resolve`` returns None for an unknown TZID; the caller falls back and notes a problem.
    """

    def __init__(self, vtimezones: dict[str, object] | None = None) -> None:
        self._vtimezones = {_normalise(k).lower(): v for k, v in (vtimezones or {}).items()}
        self._cache: dict[str, tzinfo | None] = {}
        self.problems: list[str] = []

    def resolve(self, tzid: str) -> tzinfo | None:
        if tzid in self._cache:
            return self._cache[tzid]
        tz = self._resolve(tzid)
        self._cache[tzid] = tz
        return tz

    def _resolve(self, tzid: str) -> tzinfo | None:
        name = _normalise(str(tzid))
        if not name:
            return None
        tz = _iana(name)
        if tz is None and name in WINDOWS_TO_OLSON:
            tz = _iana(WINDOWS_TO_OLSON[name])
        if tz is None and "/" in name:
            parts = [p for p in name.split("/") if p]
            for start in range(1, len(parts)):
                tz = _iana("/".join(parts[start:]))
                if tz is not None:
                    break
        if tz is None:
            tz = self._from_vtimezone(name)
        if tz is None:
            tz = _from_display_name(name)
        return tz

    def _from_vtimezone(self, name: str) -> tzinfo | None:
        component = self._vtimezones.get(name.lower())
        if component is None:
            return None
        try:
            return component.to_tz(lookup_tzid=False)
        except Exception as e:  # any broken VTIMEZONE: fall back, note it
            self.problems.append(
                f"VTIMEZONE {name[:60]!r} could not be read ({type(e).__name__}: {str(e)[:120]})"
            )
            return None
