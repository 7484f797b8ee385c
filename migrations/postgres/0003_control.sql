-- Control messages reach every worker; the first to record a request id
-- answers it, so each control message gets exactly one answer.
CREATE TABLE control_requests (
    request_id    TEXT PRIMARY KEY,
    created_at_ms BIGINT NOT NULL
);

-- A permission mode set at runtime (set_permission_mode) for later turns.
ALTER TABLE sessions ADD COLUMN permission_mode TEXT;
