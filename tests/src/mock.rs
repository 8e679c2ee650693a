//! A local HTTPS server (rustls) that remembers, per connection, the exact plaintext
//! it received and sent, for byte-for-byte comparison with what the agent captured.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use std::{path::Path, process::Command, time::Instant};

use rustls::{ServerConfig, ServerConnection, StreamOwned, pki_types::PrivateKeyDer};

/// Writes a self-signed certificate for 127.0.0.1/localhost and its key as PEM files
/// in `dir`; returns (cert, key). Clients trust the certificate itself.
pub fn write_certificate(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).expect("cert");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    (cert, key)
}

/// One connection as the server saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exchange {
    pub received: Vec<u8>,
    pub sent: Vec<u8>,
}

pub struct MockTls {
    pub addr: SocketAddr,
    /// PEM file of the server's self-signed certificate, for clients to trust.
    pub ca_file: PathBuf,
    exchanges: Arc<Mutex<Vec<Exchange>>>,
    _dir: tempfile::TempDir,
}

impl MockTls {
    /// Serves HTTP/1.1 over TLS: each request gets `200` with a body of the size the
    /// path asks for (`/size/N`, default 64 bytes), then the connection closes.
    pub fn start() -> Self {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).expect("cert");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, certified.cert.pem()).expect("write ca");
        let key = PrivateKeyDer::try_from(certified.signing_key.serialize_der()).expect("key der");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .expect("server config");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let exchanges = Arc::new(Mutex::new(Vec::new()));
        let shared = exchanges.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (config, shared) = (config.clone(), shared.clone());
                thread::spawn(move || {
                    if let Some(exchange) = serve(stream, config) {
                        shared.lock().expect("lock").push(exchange);
                    }
                });
            }
        });
        Self { addr, ca_file, exchanges, _dir: dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.addr.port())
    }

    /// Completed connections so far.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.exchanges.lock().expect("lock").clone()
    }

    /// Waits until `n` connections have completed.
    pub fn wait_exchanges(&self, n: usize) -> Vec<Exchange> {
        for _ in 0..300 {
            let done = self.exchanges();
            if done.len() >= n {
                return done;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("mock server: expected {n} completed connections, saw {}", self.exchanges().len());
    }
}

fn serve(tcp: TcpStream, config: Arc<ServerConfig>) -> Option<Exchange> {
    tcp.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let conn = ServerConnection::new(config).ok()?;
    let mut tls = StreamOwned::new(conn, tcp);
    let mut exchange = Exchange::default();
    let request = read_request(&mut tls, &mut exchange.received)?;
    let size = request
        .lines()
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|path| path.strip_prefix("/size/"))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(64);
    let body: Vec<u8> = (0..size).map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[i % 36]).collect();
    let mut response =
        format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n").into_bytes();
    response.extend_from_slice(&body);
    tls.write_all(&response).ok()?;
    tls.flush().ok()?;
    exchange.sent = response;
    tls.conn.send_close_notify();
    let _ = tls.flush();
    // Let the client read to the end before the socket goes away.
    let mut rest = [0u8; 1024];
    let _ = tls.read(&mut rest);
    Some(exchange)
}

/// Reads one request (headers and a Content-Length body); returns the header text.
pub(crate) fn read_request(tls: &mut impl Read, received: &mut Vec<u8>) -> Option<String> {
    let mut buf = [0u8; 65536];
    loop {
        if let Some(end) = find(received, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).into_owned();
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if received.len() >= end + 4 + length {
                return Some(head);
            }
        }
        let n = tls.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        received.extend_from_slice(&buf[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The Python mock of the OpenAI, Anthropic and Gemini APIs (`tests/mock/llm_server.py`),
/// served by hypercorn over HTTP/1.1 and HTTP/2 with known usage.
pub struct MockLlm {
    child: std::process::Child,
    pub port: u16,
    received: PathBuf,
}

impl MockLlm {
    pub fn start(cert: &Path, key: &Path) -> Self {
        let dir = cert.parent().expect("cert dir");
        Self::spawn(&[cert.as_os_str(), key.as_os_str()], &dir.join(format!("port-{}", std::process::id())), None)
    }

    /// The same mock in plain HTTP (as Ollama or vLLM serve) on `port`, writing its
    /// files in `dir`.
    pub fn start_plain(dir: &Path, port: u16) -> Self {
        Self::spawn(&["-".as_ref(), "-".as_ref()], &dir.join(format!("plain-port-{}", std::process::id())), Some(port))
    }

    fn spawn(tls: &[&std::ffi::OsStr], port_file: &Path, port: Option<u16>) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("mock/llm_server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(tls)
            .arg(port_file)
            .args(port.map(|p| p.to_string()))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start mock");
        let port_file = port_file.to_path_buf();
        let start = Instant::now();
        loop {
            if let Some(port) = std::fs::read_to_string(&port_file).ok().and_then(|p| p.trim().parse().ok()) {
                let received = PathBuf::from(format!("{}.received", port_file.display()));
                return Self { child, port, received };
            }
            assert!(child.try_wait().expect("wait").is_none(), "mock LLM server exited");
            assert!(start.elapsed() < Duration::from_secs(20), "mock LLM server did not start");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl MockLlm {
    /// Complete requests the mock received for `model` (as asked, before any suffix).
    pub fn received(&self, model: &str) -> u64 {
        let text = std::fs::read_to_string(&self.received).unwrap_or_default();
        let counts: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        counts.get(model).and_then(serde_json::Value::as_u64).unwrap_or(0)
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

