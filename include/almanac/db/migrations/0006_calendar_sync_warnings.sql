-- ics_sync: what the last parse of a calendar's feed warned about (series skipped or capped,
-- texts cut, unknown time zones...), so an operator sees a half-broken feed, not only a broken one.
-- Written by every sync that parses the feed: the first warnings (each cut to a few hundred
-- characters) and how many there were; NULL and 0 when it had none. An unchanged feed is not
-- parsed, so its warnings stay those of its last parse; a failed sync leaves them as they were.

ALTER TABLE calendars
    ADD COLUMN sync_warnings      text[],                     -- the first ones, operator-readable
    ADD COLUMN sync_warning_count integer NOT NULL DEFAULT 0; -- all of them, also those not kept
