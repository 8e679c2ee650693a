//! The HTTP listener: `/metrics` (Prometheus text), `/healthz` (200 once probes are
//! attached, 503 before), `/targets` (JSON list of hooked files), and
//! `POST /v1/outcomes` (what agents achieved, see `metering::outcomes`).
//!
//! Plain HTTP by default; with `[server.tls]` HTTPS only (rustls, ring), and with
//! `client_ca_file` every client must present a certificate signed by that CA
//! (mTLS). `server.metrics_token_file` puts the reads (`/metrics`, `/targets`) behind
//! a bearer token; `/healthz` stays open so that liveness probes need no secret.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::{AtomicBool, Ordering}},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::{get, post},
};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::{net::{TcpListener, TcpStream}, sync::watch, task::JoinSet};

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
    /// What `/metrics` and `/targets` require.
    pub reads: ReadAccess,
}

/// Who may read `/metrics` and `/targets`: anyone who reaches the listener, or with
/// `server.metrics_token_file` only holders of that token.
#[derive(Clone, Debug, Default)]
pub struct ReadAccess {
    pub token: Option<String>,
}

impl ReadAccess {
    /// Checks a request's `Authorization` header.
    pub fn check(&self, authorization: Option<&str>) -> Result<(), (StatusCode, &'static str)> {
        match &self.token {
            Some(token) if !bearer_matches(authorization, token) => Err((
                StatusCode::UNAUTHORIZED,
                "a valid `Authorization: Bearer <token>` (server.metrics_token_file) is required\n",
            )),
            _ => Ok(()),
        }
    }
}

/// Whether `authorization` is `Bearer <token>`, compared in full whatever the first
/// difference, so that timing says nothing about the token.
fn bearer_matches(authorization: Option<&str>, token: &str) -> bool {
    let given = authorization.and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("");
    given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
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
                if bearer_matches(authorization, token) { Ok(()) } else { Err((StatusCode::UNAUTHORIZED, "a valid `Authorization: Bearer <token>` (server.token_file) is required\n")) }
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
            reads: ReadAccess::default(),
            registry: Arc::new(registry),
            ready: Arc::new(AtomicBool::new(false)),
            targets: capture.targets.subscribe(),
            outcomes,
        }
    }

    /// Puts `/metrics` and `/targets` behind `reads`.
    pub fn with_reads(self, reads: ReadAccess) -> Self {
        Self { reads, ..self }
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
/// serves until the returned future is dropped: over TLS with `tls`
/// ([`TlsFiles::load`]), else plain HTTP.
pub async fn bind(
    addr: SocketAddr,
    state: ServerState,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> anyhow::Result<impl Future<Output = std::io::Result<()>>> {
    use anyhow::Context as _;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}: is another gauge-agent running? choose another with --listen"))?;
    // The bound address, so that `--listen 127.0.0.1:0` reports the port it got.
    let addr = listener.local_addr().unwrap_or(addr);
    let scheme = match &tls {
        None => "http",
        Some(_) => "https",
    };
    let metrics_token = state.reads.token.is_some();
    tracing::info!(%addr, scheme, metrics_token, "serving /metrics, /healthz, /targets and POST /v1/outcomes");
    let app = router(state);
    Ok(async move {
        match tls {
            None => axum::serve(listener, app).await,
            Some(tls) => {
                let listener = TlsListener { tcp: listener, acceptor: tokio_rustls::TlsAcceptor::from(tls), handshakes: JoinSet::new() };
                axum::serve(listener, app).await
            }
        }
    })
}

/// `[server.tls]`: the listener's certificate and key (PEM), and optionally the CA
/// that client certificates must be signed by (then every client must present one).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// Set: mutual TLS, a client certificate signed by one of these CAs is required.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// Why the TLS listener cannot be set up; each names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read server.tls.{key} {path}: {source} (the files are read once, at start, as the daemon's user)")]
    Read { key: &'static str, path: PathBuf, source: std::io::Error },
    #[error("server.tls.{key} {path}: {message}")]
    Pem { key: &'static str, path: PathBuf, message: String },
    #[error("server.tls.key_file {key} does not match the certificate in server.tls.cert_file {cert}: give the certificate's own key")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("server.tls: the certificate {cert} or key {key} is refused: {source}")]
    Refused { cert: PathBuf, key: PathBuf, source: rustls::Error },
    #[error("server.tls.client_ca_file {path}: {message}")]
    ClientCa { path: PathBuf, message: String },
}

impl TlsFiles {
    /// Reads and checks the files: the rustls configuration of the listener.
    pub fn load(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        use rustls::pki_types::{PrivateKeyDer, pem::PemObject as _};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = read_certs("cert_file", &self.cert_file)?;
        let key_pem = read("key_file", &self.key_file)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            key: "key_file",
            path: self.key_file.clone(),
            message: format!("no PEM private key (PKCS#8, PKCS#1 or SEC1) found: {e}"),
        })?;
        let refused = |source| TlsError::Refused { cert: self.cert_file.clone(), key: self.key_file.clone(), source };
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(refused)?;
        let builder = match &self.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let ca = |message: String| TlsError::ClientCa { path: path.clone(), message };
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs("client_ca_file", path)? {
                    roots.add(cert).map_err(|e| ca(format!("not a usable CA certificate: {e}")))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| ca(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::Mismatch { cert: self.cert_file.clone(), key: self.key_file.clone() },
            other => refused(other),
        })?;
        // The router speaks HTTP/1.1 only (axum's http1 feature).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { key, path: path.to_owned(), source })
}

/// Every certificate in a PEM file; at least one.
fn read_certs(key: &'static str, path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let pem = read(key, path)?;
    let pem_error = |message: String| TlsError::Pem { key, path: path.to_owned(), message };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(format!("unreadable PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into()));
    }
    Ok(certs)
}

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

/// TCP connections through TLS handshakes, each in a task of its own, so that a
/// client that stalls mid-handshake holds up no one else.
struct TlsListener {
    tcp: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    handshakes: JoinSet<Option<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept(), if self.handshakes.len() < MAX_HANDSHAKES => match accepted {
                    Ok((stream, peer)) => {
                        let acceptor = self.acceptor.clone();
                        self.handshakes.spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => Some((tls, peer)),
                                // A client without a valid certificate, or speaking
                                // plain HTTP: its business, not an error of the daemon.
                                Ok(Err(error)) => {
                                    tracing::debug!(%peer, %error, "TLS handshake failed");
                                    None
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    None
                                }
                            }
                        });
                    }
                    // As axum does for plain TCP: out of fds and the like pass.
                    Err(error) => {
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

async fn metrics(State(state): State<ServerState>, headers: axum::http::HeaderMap) -> axum::response::Response {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if let Err(refused) = state.reads.check(authorization) {
        return refused.into_response();
    }
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        ),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], "encoding failed\n".into()),
    }
    .into_response()
}

async fn healthz(State(state): State<ServerState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting: probes not attached yet\n")
    }
}

async fn targets(State(state): State<ServerState>, headers: axum::http::HeaderMap) -> axum::response::Response {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if let Err(refused) = state.reads.check(authorization) {
        return refused.into_response();
    }
    Json(state.targets.borrow().clone()).into_response()
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

    #[test]
    fn reads_need_the_metrics_token_only_when_one_is_set() {
        assert!(ReadAccess::default().check(None).is_ok());
        let guarded = ReadAccess { token: Some("m3trics".into()) };
        assert!(guarded.check(Some("Bearer m3trics")).is_ok());
        for wrong in [None, Some("Bearer m3tricz"), Some("m3trics"), Some("Bearer ")] {
            assert_eq!(guarded.check(wrong).map_err(|e| e.0), Err(StatusCode::UNAUTHORIZED), "{wrong:?}");
        }
    }

    #[test]
    fn unreadable_or_empty_tls_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = TlsFiles { cert_file: dir.path().join("nope.pem"), key_file: dir.path().join("key.pem"), client_ca_file: None };
        let err = missing.load().expect_err("missing cert").to_string();
        assert!(err.contains("server.tls.cert_file") && err.contains("nope.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem\n").expect("write");
        let err = TlsFiles { cert_file: empty.clone(), ..missing }.load().expect_err("no certificate").to_string();
        assert!(err.contains("server.tls.cert_file") && err.contains("empty.pem") && err.contains("no PEM certificate"), "{err}");
    }
}
