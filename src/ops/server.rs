//! The admin HTTP server: axum on a listener bound at start-up (so a
//! port in use fails start-up, not later), with the metrics upkeep beside
//! it; both end when their stop token is cancelled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Metrics, Probe};

/// How often histogram samples are drained into buckets between scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error(
    "could not listen on ops.listen = {addr}: {source}. Pick a free address \
     (127.0.0.1:0 for any port) or set ops.listen = \"\" to turn the admin port off"
)]
pub struct OpsError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds the admin port (at start-up).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, OpsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| OpsError { addr, source })
}

#[derive(Clone)]
struct Ops {
    probe: Arc<dyn Probe>,
    metrics: Arc<Metrics>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `stop`, running the
/// metrics upkeep meanwhile.
pub async fn serve(
    listener: TcpListener,
    probe: Arc<dyn Probe>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let addr = listener.local_addr().ok();
    info!(addr = ?addr, "admin port listening (/metrics, /healthz, /readyz)");
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Ops {
            probe,
            metrics: Arc::clone(&metrics),
        });
    let server = axum::serve(listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
    let upkeep = async {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            tokio::select! {
                _ = every.tick() => metrics.upkeep(),
                _ = stop.cancelled() => return,
            }
        }
    };
    let (served, ()) = tokio::join!(server, upkeep);
    if let Err(e) = served {
        warn!(error = %e, "the admin port failed");
    }
}

async fn render(State(ops): State<Ops>) -> Response {
    ops.probe.observe(&ops.metrics);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ops.metrics.render(),
    )
        .into_response()
}

async fn healthz(State(ops): State<Ops>) -> Response {
    let alive = ops.probe.alive();
    let status = if alive {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "alive": alive }))).into_response()
}

async fn readyz(State(ops): State<Ops>) -> Response {
    let checks = ops.probe.ready().await;
    let ready = checks.iter().all(|c| c.ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "ready": ready, "checks": checks }))).into_response()
}
