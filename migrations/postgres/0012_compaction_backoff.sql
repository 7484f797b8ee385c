-- The session's last failed compaction (issue 14): when it failed (Unix
-- ms) and the session's context then (tokens). While set, threshold
-- compaction waits until the profile's `compact_retry_secs` have passed
-- or the context grew by a tenth of the window since. Cleared by a
-- compaction that succeeds, and when the session starts a new Claude
-- session. NULL: no failure to wait out.
ALTER TABLE sessions ADD COLUMN compact_failed_at_ms BIGINT;
ALTER TABLE sessions ADD COLUMN compact_failed_tokens BIGINT;
