-- Permission prompts a job's attempts published (`permission_request`),
-- recorded before the event goes out, so that every one of them is
-- eventually followed by a `permission_resolved`: the attempt that asked
-- settles it, or — when that attempt's worker died or stopped — the job's
-- next attempt or its ending resolves it as `superseded`. Also how any
-- worker answers a late `permission_response` for it. `resolved_by` NULL:
-- still open.
CREATE TABLE permission_prompts (
    request_id   TEXT PRIMARY KEY,
    job_id       TEXT NOT NULL,
    attempt      BIGINT NOT NULL,
    opened_at_ms BIGINT NOT NULL,
    resolved_by  TEXT
);
CREATE INDEX permission_prompts_job ON permission_prompts (job_id);

-- "Allow for this session" answers, as CLI rules (`Tool` or
-- `Tool(content)`) of the Claude session they were given in. The CLI keeps
-- session rules only in its memory; a cold resume of the session passes
-- them as allowed tools.
CREATE TABLE session_grants (
    claude_session_id TEXT NOT NULL,
    rule              TEXT NOT NULL,
    PRIMARY KEY (claude_session_id, rule)
);
