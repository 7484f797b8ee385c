-- Fair scheduling: claims go to the least recently served session first,
-- so a session with many queued jobs cannot starve one with a single job.
ALTER TABLE sessions ADD COLUMN last_served_at_ms INTEGER;

-- Session transcripts, so a session continues on any worker (any host, any
-- CLI config dir). One row per Claude session id, written by the lease
-- holder after every completed turn (fenced); `data` is the CLI's JSONL
-- transcript, gzipped; `size_bytes` its uncompressed size.
CREATE TABLE transcripts (
    claude_session_id TEXT    PRIMARY KEY NOT NULL,
    session_key       TEXT    NOT NULL,
    data              BLOB    NOT NULL,
    size_bytes        INTEGER NOT NULL,
    updated_at_ms     INTEGER NOT NULL
);

CREATE INDEX transcripts_session_idx ON transcripts (session_key);
