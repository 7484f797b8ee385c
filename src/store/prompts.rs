//! Permission prompts in the store (issue 12): every `permission_request`
//! a job's attempt publishes is recorded first, so that it is eventually
//! followed by a `permission_resolved` even when the worker that asked
//! dies or stops (the job's next attempt, or its ending, resolves it as
//! `superseded`), and so that any worker can tell a late answer that the
//! prompt is no longer pending. `prompt_store_impl!` writes the methods
//! once for both backends.

use super::{Lease, StoreError};

/// A recorded permission prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRecord {
    /// Ours (the event's `request_id`), never the CLI's.
    pub request_id: String,
    pub job_id: String,
    /// The attempt that asked.
    pub attempt: u32,
    pub opened_at_ms: i64,
    /// How it was settled (the `permission_resolved` event's `by`); `None`
    /// while it is open.
    pub resolved_by: Option<String>,
}

/// Permission prompts (a supertrait of [`super::SessionStore`]).
#[async_trait::async_trait]
pub trait PromptStore: Send + Sync + 'static {
    /// Records an open prompt of the job's `attempt`, before its
    /// `permission_request` goes out. Fenced.
    async fn open_prompt(
        &self,
        lease: &Lease,
        job_id: &str,
        request_id: &str,
        attempt: u32,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Marks a prompt settled, once its `permission_resolved` went out.
    /// Not fenced: only the worker that published that event marks it, and
    /// a mark that is lost only makes a later attempt resolve it again.
    /// `false` if it was not open.
    async fn resolve_prompt(&self, request_id: &str, by: &str) -> Result<bool, StoreError>;

    /// The job's open prompts, oldest first.
    async fn open_prompts(&self, job_id: &str) -> Result<Vec<PromptRecord>, StoreError>;

    async fn get_prompt(&self, request_id: &str) -> Result<Option<PromptRecord>, StoreError>;

    /// Records rules a person allowed for the rest of a Claude session.
    async fn add_session_grants(
        &self,
        claude_session_id: &str,
        rules: &[String],
    ) -> Result<(), StoreError>;

    /// The rules allowed for the rest of a Claude session, in order.
    async fn session_grants(&self, claude_session_id: &str) -> Result<Vec<String>, StoreError>;
}

type PromptRow = (String, String, i64, i64, Option<String>);

pub(crate) fn from_row(r: PromptRow) -> Result<PromptRecord, StoreError> {
    let (request_id, job_id, attempt, opened_at_ms, resolved_by) = r;
    let attempt = u32::try_from(attempt)
        .map_err(|_| StoreError::Other(format!("prompt {request_id}: bad attempt {attempt}")))?;
    Ok(PromptRecord {
        request_id,
        job_id,
        attempt,
        opened_at_ms,
        resolved_by,
    })
}

pub(crate) const PROMPT_COLUMNS: &str = "request_id, job_id, attempt, opened_at_ms, resolved_by";

macro_rules! prompt_store_impl {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::prompts::PromptStore for $store {
            async fn open_prompt(
                &self,
                lease: &Lease,
                job_id: &str,
                request_id: &str,
                attempt: u32,
                now_ms: i64,
            ) -> Result<(), StoreError> {
                let mut tx = self.fenced(lease).await?;
                sqlx::query(
                    "INSERT INTO permission_prompts (request_id, job_id, attempt, opened_at_ms) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(request_id)
                .bind(job_id)
                .bind(i64::from(attempt))
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn resolve_prompt(&self, request_id: &str, by: &str) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "UPDATE permission_prompts SET resolved_by = $1 \
                     WHERE request_id = $2 AND resolved_by IS NULL",
                )
                .bind(by)
                .bind(request_id)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn open_prompts(
                &self,
                job_id: &str,
            ) -> Result<Vec<$crate::store::prompts::PromptRecord>, StoreError> {
                use $crate::store::prompts as p;
                let rows: Vec<(String, String, i64, i64, Option<String>)> =
                    sqlx::query_as(&format!(
                        "SELECT {} FROM permission_prompts \
                         WHERE job_id = $1 AND resolved_by IS NULL \
                         ORDER BY opened_at_ms, request_id",
                        p::PROMPT_COLUMNS
                    ))
                    .bind(job_id)
                    .fetch_all(&self.pool)
                    .await?;
                rows.into_iter().map(p::from_row).collect()
            }

            async fn get_prompt(
                &self,
                request_id: &str,
            ) -> Result<Option<$crate::store::prompts::PromptRecord>, StoreError> {
                use $crate::store::prompts as p;
                let row: Option<(String, String, i64, i64, Option<String>)> =
                    sqlx::query_as(&format!(
                        "SELECT {} FROM permission_prompts WHERE request_id = $1",
                        p::PROMPT_COLUMNS
                    ))
                    .bind(request_id)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(p::from_row).transpose()
            }

            async fn add_session_grants(
                &self,
                claude_session_id: &str,
                rules: &[String],
            ) -> Result<(), StoreError> {
                let mut tx = self.pool.begin().await?;
                for rule in rules {
                    sqlx::query(
                        "INSERT INTO session_grants (claude_session_id, rule) VALUES ($1, $2) \
                         ON CONFLICT (claude_session_id, rule) DO NOTHING",
                    )
                    .bind(claude_session_id)
                    .bind(rule)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn session_grants(
                &self,
                claude_session_id: &str,
            ) -> Result<Vec<String>, StoreError> {
                Ok(sqlx::query_scalar(
                    "SELECT rule FROM session_grants WHERE claude_session_id = $1 ORDER BY rule",
                )
                .bind(claude_session_id)
                .fetch_all(&self.pool)
                .await?)
            }
        }
    };
}

pub(crate) use prompt_store_impl;
