//! The HTTP listener: `/metrics` (Prometheus text), `/healthz` (200 once probes are
//! attached, 503 before), `/targets` (JSON list of hooked files), and
//! `POST /v1/outcomes` (what agents achieved, see `metering::outcomes`).

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::{AtomicBool, Ordering}},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::{get, post},
};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::{
    metering::outcomes::{OutcomeReport, Outcomes},
    source::{discovery::Target, runtime::CaptureState},
};

/// Largest outcome report accepted: one small JSON object.
const MAX_OUTCOME_BODY: usize = 16 << 10;

/// What the handlers read.
#[derive(Clone)]
pub struct ServerState {
    pub registry: Arc<Registry>,
    pub ready: Arc<AtomicBool>,
    pub targets: watch::Receiver<Vec<Target>>,
    pub outcomes: Outcomes,
    /// What `POST /v1/outcomes` requires.
    pub writes: WriteAccess,
}

/// Who may use the write endpoint (`POST /v1/outcomes`): on loopback anyone local;
/// beyond loopback only holders of the token (none configured: nobody).
#[derive(Clone, Debug, Default)]
pub struct WriteAccess {
    pub token: Option<String>,
    pub loopback: bool,
}

impl WriteAccess {
    /// Checks a request's `Authorization` header.
    pub fn check(&self, authorization: Option<&str>) -> Result<(), (StatusCode, &'static str)> {
        match &self.token {
            Some(token) => {
                let given = authorization.and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("");
                // Compared in full whatever the first difference, so timing says nothing.
                let same = given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
                if same { Ok(()) } else { Err((StatusCode::UNAUTHORIZED, "a valid `Authorization: Bearer <token>` (server.token_file) is required\n")) }
            }
            None if self.loopback => Ok(()),
            None => Err((
                StatusCode::FORBIDDEN,
                "the listener is not on loopback: set server.token_file to accept outcomes from other hosts\n",
            )),
        }
    }
}

impl ServerState {
    pub fn new(registry: Registry, capture: &CaptureState, outcomes: Outcomes, writes: WriteAccess) -> Self {
        Self {
            writes,
            registry: Arc::new(registry),
            ready: Arc::new(AtomicBool::new(false)),
            targets: capture.targets.subscribe(),
            outcomes,
        }
    }
}

pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/targets", get(targets))
        .route("/v1/outcomes", post(outcome).layer(axum::extract::DefaultBodyLimit::max(MAX_OUTCOME_BODY)))
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
    tracing::info!(%addr, "serving /metrics, /healthz, /targets and POST /v1/outcomes");
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

/// `POST /v1/outcomes` with `{"agent": .., "outcome": .., "count": 1, "value": ..}`.
async fn outcome(State(state): State<ServerState>, headers: axum::http::HeaderMap, body: axum::body::Bytes) -> (StatusCode, String) {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if let Err((status, message)) = state.writes.check(authorization) {
        return (status, message.to_owned());
    }
    let report: OutcomeReport = match serde_json::from_slice(&body) {
        Ok(report) => report,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("expected JSON like {{\"agent\": \"support-bot\", \"outcome\": \"resolved_ticket\", \"count\": 1}}: {e}\n"),
            );
        }
    };
    match state.outcomes.report(&report) {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_need_a_token_beyond_loopback() {
        let local = WriteAccess { token: None, loopback: true };
        assert!(local.check(None).is_ok());
        let open = WriteAccess { token: None, loopback: false };
        assert_eq!(open.check(Some("Bearer x")).map_err(|e| e.0), Err(StatusCode::FORBIDDEN));
        let guarded = WriteAccess { token: Some("s3cret-token".into()), loopback: false };
        assert!(guarded.check(Some("Bearer s3cret-token")).is_ok());
        for wrong in [None, Some("Bearer s3cret-tokem"), Some("s3cret-token"), Some("Bearer s3cret")] {
            assert_eq!(guarded.check(wrong).map_err(|e| e.0), Err(StatusCode::UNAUTHORIZED), "{wrong:?}");
        }
    }
}
