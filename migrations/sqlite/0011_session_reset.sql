-- A pending reset (the `reset_session` control message): the session's
-- jobs accepted after this job order start a new Claude session. Cleared
-- when such a job completes a turn. NULL: no reset pending.
ALTER TABLE sessions ADD COLUMN reset_after_job_order BIGINT;
