"""google_calendar_push: connected Google accounts and pushing calendar events to them."""

__all__: list[str] = []
