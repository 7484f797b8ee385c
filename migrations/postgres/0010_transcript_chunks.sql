-- Transcripts stored incrementally: after a turn the lease holder stores
-- only what the CLI appended since the stored copy, as one gzip member in
-- transcript_chunks. The transcript is `transcripts.data` (the base)
-- followed by its chunks in `seq` order: concatenated gzip members, one
-- valid multi-member gzip stream. `size_bytes` and `sha256` in
-- `transcripts` describe the whole. A full write replaces the base and
-- drops the chunks (also how chunks are consolidated).
ALTER TABLE transcripts ADD COLUMN chunks INTEGER NOT NULL DEFAULT 0;

CREATE TABLE transcript_chunks (
    claude_session_id TEXT    NOT NULL
        REFERENCES transcripts (claude_session_id) ON DELETE CASCADE,
    seq               INTEGER NOT NULL,
    data              BYTEA   NOT NULL,
    PRIMARY KEY (claude_session_id, seq)
);
