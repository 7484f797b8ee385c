-- The terminal event as an outbox: set once the broker confirmed it. A
-- worker that dies (or stops) between committing a job's outcome and
-- publishing its terminal event leaves it NULL, and any worker's outbox
-- sweep publishes it later. Rows from before this migration count as
-- published.
ALTER TABLE jobs ADD COLUMN terminal_published_at_ms BIGINT;
UPDATE jobs SET terminal_published_at_ms = finished_at_ms WHERE terminal_event IS NOT NULL;
CREATE INDEX jobs_unpublished_terminal_idx ON jobs (finished_at_ms)
    WHERE terminal_event IS NOT NULL AND terminal_published_at_ms IS NULL;
