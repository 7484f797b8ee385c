-- Transcripts by identity, not size: the SHA-256 (hex) of the stored
-- transcript's uncompressed JSONL. A worker resumes from its local copy
-- only when that copy hashes the same; otherwise the stored copy wins.
-- A transcript over claude.transcript_max_bytes is recorded with its
-- digest and size but empty `data`, so a stale copy never stands in for it.
-- NULL for rows written before this migration: the stored copy wins.
ALTER TABLE transcripts ADD COLUMN sha256 TEXT;
