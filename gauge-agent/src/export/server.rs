//! The HTTP listener: `/metrics` (Prometheus text), `/healthz` (200 once probes are
//! attached, 503 before), `/targets` (JSON list of hooked files).

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::{AtomicBool, Ordering}},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::source::{discovery::Target, runtime::CaptureState};

/// What the handlers read.
#[derive(Clone)]
pub struct ServerState {
    pub registry: Arc<Registry>,
    pub ready: Arc<AtomicBool>,
    pub targets: watch::Receiver<Vec<Target>>,
}

impl ServerState {
    pub fn new(registry: Registry, capture: &CaptureState) -> Self {
        Self { registry: Arc::new(registry), ready: Arc::new(AtomicBool::new(false)), targets: capture.targets.subscribe() }
    }
}

pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/targets", get(targets))
        .with_state(state)
}

/// Binds `addr` (so a busy port fails at start, with the address in the error) and
/// serves until the returned future is dropped.
pub async fn bind(addr: SocketAddr, state: ServerState) -> anyhow::Result<impl Future<Output = std::io::Result<()>>> {
    use anyhow::Context as _;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}: is another gauge-agent running? choose another with --listen"))?;
    // The bound address, so that `--listen 127.0.0.1:0` reports the port it got.
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(%addr, "serving /metrics, /healthz and /targets");
    Ok(async move { axum::serve(listener, router(state)).await })
}

async fn metrics(State(state): State<ServerState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        ),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], "encoding failed\n".into()),
    }
}

async fn healthz(State(state): State<ServerState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting: probes not attached yet\n")
    }
}

async fn targets(State(state): State<ServerState>) -> Json<Vec<Target>> {
    Json(state.targets.borrow().clone())
}
