-- Sessions: one row per session_key, carrying the lease that keeps one
-- turn at a time per session. Times are Unix milliseconds from the caller.
CREATE TABLE sessions (
    session_key         TEXT    PRIMARY KEY NOT NULL,
    claude_session_id   TEXT,
    profile             TEXT    NOT NULL,
    status              TEXT    NOT NULL DEFAULT 'idle'
                        CHECK (status IN ('active', 'idle', 'interrupted', 'closed')),
    cwd                 TEXT,
    model               TEXT,
    created_at_ms       INTEGER NOT NULL,
    updated_at_ms       INTEGER NOT NULL,
    last_job_id         TEXT,
    turns               INTEGER NOT NULL DEFAULT 0,
    input_tokens        INTEGER NOT NULL DEFAULT 0,
    output_tokens       INTEGER NOT NULL DEFAULT 0,
    cost_usd            REAL    NOT NULL DEFAULT 0,
    lease_owner         TEXT,
    -- Only grows: fencing token for every write a lease holder makes.
    lease_epoch         INTEGER NOT NULL DEFAULT 0,
    lease_expires_at_ms INTEGER
);

CREATE INDEX sessions_updated_idx ON sessions (updated_at_ms);

CREATE TABLE jobs (
    -- Acceptance order; AUTOINCREMENT so values are never reused.
    job_order      INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id         TEXT    NOT NULL UNIQUE,
    session_key    TEXT    NOT NULL REFERENCES sessions (session_key),
    status         TEXT    NOT NULL
                   CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    attempts       INTEGER NOT NULL DEFAULT 0,
    next_seq       INTEGER NOT NULL DEFAULT 0,
    spec           TEXT    NOT NULL,
    error          TEXT,
    terminal_event TEXT,
    created_at_ms  INTEGER NOT NULL,
    started_at_ms  INTEGER,
    finished_at_ms INTEGER
);

CREATE INDEX jobs_session_status_order_idx ON jobs (session_key, status, job_order);
-- Claims scan runnable jobs oldest first.
CREATE INDEX jobs_runnable_idx ON jobs (job_order) WHERE status IN ('queued', 'running');
