-- Cost accounting and budgets (issue 14). A job's cost is what its turns
-- cost (per turn, not the CLI's running totals), whatever its outcome;
-- `identity` is the producer's budget key (a job field), set when the job
-- finishes, so a per-identity budget over a window is one indexed sum.
ALTER TABLE jobs ADD COLUMN cost_usd REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN identity TEXT;
CREATE INDEX jobs_identity_finished_idx ON jobs (identity, finished_at_ms)
    WHERE identity IS NOT NULL;
-- Context use after the session's last completed turn: input plus cache
-- tokens of its last API call, and the model's window (when the CLI says).
ALTER TABLE sessions ADD COLUMN context_tokens INTEGER;
ALTER TABLE sessions ADD COLUMN context_window INTEGER;
