-- Session lifecycle and retention (issue 13).
--
-- `lifecycle_started_at_ms`: the session's conversation has begun
-- (`session.started` recorded); NULL again once it has ended
-- (`session.ended`: reset, expired, deleted, budget). `lifecycle_job_id`:
-- the job that last began it, so a retried attempt records nothing twice.
-- `idle_marked_at_ms`: `session.idle` recorded for the current quiet
-- spell; cleared when the session's next attempt starts.
ALTER TABLE sessions ADD COLUMN lifecycle_started_at_ms INTEGER;
ALTER TABLE sessions ADD COLUMN lifecycle_job_id TEXT;
ALTER TABLE sessions ADD COLUMN idle_marked_at_ms INTEGER;
-- Sessions that already hold a conversation count as started.
UPDATE sessions SET lifecycle_started_at_ms = created_at_ms WHERE claude_session_id IS NOT NULL;

-- Lifecycle events as an outbox: written in the transaction that changes
-- the session, published by any worker (claimed for a while first, so
-- usually by one), then marked. `body` is the event without its
-- `event_id`, which is this row's id.
CREATE TABLE session_events (
    event_id         INTEGER PRIMARY KEY AUTOINCREMENT,
    session_key      TEXT    NOT NULL,
    type             TEXT    NOT NULL,
    body             TEXT    NOT NULL,
    created_at_ms    INTEGER NOT NULL,
    claimed_until_ms INTEGER,
    published_at_ms  INTEGER
);
CREATE INDEX session_events_unpublished_idx ON session_events (event_id)
    WHERE published_at_ms IS NULL;
CREATE INDEX session_events_published_idx ON session_events (published_at_ms)
    WHERE published_at_ms IS NOT NULL;

-- Fleet-wide singletons (the retention prune): one holder at a time,
-- like a session lease; `epoch` grows with every new holder.
-- `last_finished_at_ms`: when a holder last finished its run, so the
-- fleet runs it once per interval, not once per worker.
CREATE TABLE maintenance_leases (
    name          TEXT    PRIMARY KEY NOT NULL,
    owner         TEXT,
    epoch         INTEGER NOT NULL DEFAULT 0,
    expires_at_ms INTEGER,
    last_finished_at_ms INTEGER
);

-- Retention scans.
CREATE INDEX jobs_finished_idx ON jobs (finished_at_ms) WHERE finished_at_ms IS NOT NULL;
CREATE INDEX transcripts_updated_idx ON transcripts (updated_at_ms);
CREATE INDEX control_requests_created_idx ON control_requests (created_at_ms);
