-- ics_sync: what the last parse of a calendar's feed was made of, so that a changed feed
-- re-expands only the events whose text changed (almanac.ics.parse: UID groups and digests).
-- Written with the events, in the same transaction, by every sync that parses the feed.

ALTER TABLE calendars
    ADD COLUMN parse_groups     bytea,                    -- the groups' 16-byte digests, sorted; NULL: none
    ADD COLUMN parse_text_chars bigint NOT NULL DEFAULT 0; -- SUMMARY+DESCRIPTION+LOCATION over the stored
                                                           -- instances, at most (exact after a full parse)
