"""ICS feeds: fetching, parsing and expanding, storing what changed."""
