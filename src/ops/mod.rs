//! The admin HTTP port (`ops.listen`, off by default): `/metrics`
//! (Prometheus text), `/healthz` (the process and its supervised tasks
//! are alive) and `/readyz` (the broker connection is up, the database
//! answers, the CLI is there, the worker is not stopping).
//!
//! A leaf: it knows nothing of the worker, the store or the broker. The
//! worker hands it a [`Probe`] (what to check) and its [`Metrics`]; the
//! server is one of the worker's supervised tasks.

pub mod metrics;
mod server;

pub use metrics::{GaugeGuard, Metrics};
pub use server::{bind, serve, OpsError};

use async_trait::async_trait;
use serde::Serialize;

/// One readiness check's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// Why not, in words an operator can act on (no secrets).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl Check {
    pub fn ok(name: &'static str) -> Check {
        Check {
            name,
            ok: true,
            detail: String::new(),
        }
    }
    pub fn failed(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            ok: false,
            detail: detail.into(),
        }
    }
}

/// What the admin port asks the process it serves.
#[async_trait]
pub trait Probe: Send + Sync + 'static {
    /// Whether the process and its supervised tasks are alive.
    fn alive(&self) -> bool;
    /// Every readiness check; each bounded in time by the implementation.
    async fn ready(&self) -> Vec<Check>;
    /// Sets gauges read from live state (pool sizes, connection state)
    /// right before a scrape.
    fn observe(&self, metrics: &Metrics);
}
