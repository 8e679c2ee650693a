//! A streaming chat-completions server in the bench's own process, on rustls: the
//! daemon hooks libssl (and the Python mock's), not rustls, so only the client's
//! side of each call is captured, as with a real provider. Each response is 300
//! SSE chunks, each its own TLS record, then the usage chunk; keep-alive.

use std::{
    io::Write as _,
    net::{TcpListener, TcpStream},
    sync::Arc,
    thread,
};

use anyhow::Context as _;
use rustls::{ServerConfig, ServerConnection, StreamOwned, pki_types::PrivateKeyDer};

use crate::mock::read_request;

/// Content chunks per response.
pub const CHUNKS: usize = 300;
/// Usage each response reports.
pub const PROMPT_TOKENS: u64 = 40;
pub const COMPLETION_TOKENS: u64 = CHUNKS as u64;

pub struct StreamServer {
    pub port: u16,
    /// The server's certificate, for the client to trust.
    pub cert: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl StreamServer {
    pub fn start() -> anyhow::Result<Self> {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
        let dir = tempfile::tempdir()?;
        let cert = dir.path().join("stream-ca.pem");
        std::fs::write(&cert, certified.cert.pem())?;
        let key = PrivateKeyDer::try_from(certified.signing_key.serialize_der()).map_err(anyhow::Error::msg)?;
        let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)?;
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").context("bind the stream server")?;
        let port = listener.local_addr()?.port();
        // The threads end with the process (a bench run).
        thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let config = config.clone();
                thread::spawn(move || serve(tcp, config));
            }
        });
        Ok(Self { port, cert, _dir: dir })
    }
}

fn serve(tcp: TcpStream, config: Arc<ServerConfig>) -> Option<()> {
    let conn = ServerConnection::new(config).ok()?;
    let mut tls = StreamOwned::new(conn, tcp);
    loop {
        let mut received = Vec::new();
        read_request(&mut tls, &mut received)?;
        tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n").ok()?;
        tls.flush().ok()?;
        for i in 0..CHUNKS {
            let event = format!(
                "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"chunks-bench-2024-07-18\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
            );
            tls.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes()).ok()?;
            tls.flush().ok()?;
        }
        let last = format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"chunks-bench-2024-07-18\",\"choices\":[],\"usage\":{{\"prompt_tokens\":{PROMPT_TOKENS},\"completion_tokens\":{COMPLETION_TOKENS},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
            PROMPT_TOKENS + COMPLETION_TOKENS
        );
        tls.write_all(format!("{:x}\r\n{last}\r\n0\r\n\r\n", last.len()).as_bytes()).ok()?;
        tls.flush().ok()?;
    }
}
