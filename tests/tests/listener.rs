//! The listener beyond plain HTTP: HTTPS (`[server.tls]`), mutual TLS
//! (`client_ca_file`) and the read token (`server.metrics_token_file`), driven with
//! curl against the real daemon. Certificates are made here with rcgen: a CA, a
//! server certificate for 127.0.0.1, a client certificate the CA signed, and a
//! rogue client certificate signed by another CA.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use gauge_agent::export::server::TlsFiles;
use gauge_tests::{
    agent::{Daemon, Refused},
    kernel_tests_enabled,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

/// The test PKI, as PEM files in a directory of its own.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Self { dir };
        let ca = pki.ca("gauge test CA", "ca");
        let rogue_ca = pki.ca("rogue CA", "rogue-ca");
        let mut server = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).expect("server params");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        pki.leaf(server, &ca, "server");
        pki.leaf(client_params("prometheus"), &ca, "client");
        pki.leaf(client_params("intruder"), &rogue_ca, "rogue");
        // A key that belongs to no certificate here.
        pki.write("other.key", &KeyPair::generate().expect("key").serialize_pem());
        pki
    }

    fn ca(&self, name: &str, file: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.distinguished_name.push(DnType::CommonName, name);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        self.write(&format!("{file}.crt"), &ca.pem());
        ca
    }

    fn leaf(&self, params: CertificateParams, ca: &CertifiedIssuer<'static, KeyPair>, file: &str) {
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, ca).expect("sign");
        self.write(&format!("{file}.crt"), &cert.pem());
        self.write(&format!("{file}.key"), &key.serialize_pem());
    }

    fn write(&self, name: &str, text: &str) {
        let path = self.path(name);
        std::fs::write(&path, text).expect("write PEM");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A `[server.tls]` section; with the CA as `client_ca_file` when `mtls`.
    fn tls_config(&self, mtls: bool) -> String {
        let mut toml = format!(
            "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            self.path("server.crt"),
            self.path("server.key")
        );
        if mtls {
            toml += &format!("client_ca_file = {:?}\n", self.path("ca.crt"));
        }
        toml
    }
}

fn client_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

/// What curl got: the HTTP status (None if no HTTP response came, e.g. the TLS
/// handshake failed or the connection was dropped), and curl's stderr.
#[derive(Debug)]
struct Got {
    status: Option<u16>,
    body: String,
    stderr: String,
}

impl Got {
    /// Asserts that no HTTP answer came and curl said why.
    fn refused(&self, what: &str) {
        assert!(self.status.is_none() && !self.stderr.trim().is_empty(), "{what}: {self:?}");
    }
}

fn curl(url: &str, args: &[&str]) -> Got {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl (installed by cargo xtask setup)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    let status = code.trim().parse().ok().filter(|&c| c != 0 && out.status.success());
    Got { status, body: body.to_owned(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

/// Waits until `/healthz` answers 200 through `args` (the probes are attached).
fn wait_healthy(daemon: &Daemon, url: &str, args: &[&str]) {
    let start = Instant::now();
    loop {
        let got = curl(&format!("{url}/healthz"), args);
        if got.status == Some(200) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "not healthy in 30 s ({got:?}):\n{}", daemon.log.text());
        thread::sleep(Duration::from_millis(100));
    }
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

#[test]
fn https_scrape_works_with_the_ca_and_plain_http_is_refused() {
    if !kernel_tests_enabled("https_scrape_works_with_the_ca_and_plain_http_is_refused") {
        return;
    }
    let pki = Pki::new();
    let daemon = Daemon::start(&pki.tls_config(false));
    let ca = pki.path("ca.crt");
    let https = format!("https://{}", daemon.addr);
    wait_healthy(&daemon, &https, &["--cacert", s(&ca)]);
    assert!(daemon.log.text().contains("scheme=\"https\"") || daemon.log.text().contains("scheme=https"), "{}", daemon.log.text());

    // Clients that connect and stall mid-handshake (one sends half a record) hold
    // up no one: each handshake runs on its own.
    use std::io::Write as _;
    let silent = std::net::TcpStream::connect(&daemon.addr).expect("connect");
    let mut half = std::net::TcpStream::connect(&daemon.addr).expect("connect");
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).expect("half a ClientHello");
    let got = curl(&format!("{https}/metrics"), &["--cacert", s(&ca)]);
    assert_eq!(got.status, Some(200), "{got:?}");
    assert!(got.body.contains("gauge_capture_bytes_total"), "not a scrape: {}", got.body);
    drop((silent, half));
    let got = curl(&format!("{https}/targets"), &["--cacert", s(&ca)]);
    assert_eq!(got.status, Some(200), "{got:?}");

    // Without the CA, curl does not trust the certificate.
    curl(&format!("{https}/metrics"), &[]).refused("an untrusted certificate was accepted");
    // The listener speaks TLS only: a plain HTTP request gets no HTTP answer.
    curl(&format!("http://{}/metrics", daemon.addr), &[]).refused("plain HTTP was served");
    assert!(gauge_tests::agent::http_get(&daemon.addr, "/healthz").is_none(), "plain HTTP answered /healthz");
}

#[test]
fn mtls_requires_a_client_certificate_signed_by_the_ca() {
    if !kernel_tests_enabled("mtls_requires_a_client_certificate_signed_by_the_ca") {
        return;
    }
    let pki = Pki::new();
    let daemon = Daemon::start(&pki.tls_config(true));
    let ca = pki.path("ca.crt");
    let https = format!("https://{}", daemon.addr);
    let (client_cert, client_key) = (pki.path("client.crt"), pki.path("client.key"));
    let client = ["--cacert", s(&ca), "--cert", s(&client_cert), "--key", s(&client_key)];
    wait_healthy(&daemon, &https, &client);

    let got = curl(&format!("{https}/metrics"), &client);
    assert_eq!(got.status, Some(200), "the CA-signed client was refused: {got:?}");
    assert!(got.body.contains("gauge_capture_bytes_total"), "not a scrape: {}", got.body);

    // No client certificate: refused, /healthz included (the handshake fails).
    for path in ["/metrics", "/healthz"] {
        curl(&format!("{https}{path}"), &["--cacert", s(&ca)]).refused(&format!("{path} served without a client certificate"));
    }
    // A certificate from another CA: refused.
    let (rogue_cert, rogue_key) = (pki.path("rogue.crt"), pki.path("rogue.key"));
    let rogue = ["--cacert", s(&ca), "--cert", s(&rogue_cert), "--key", s(&rogue_key)];
    curl(&format!("{https}/metrics"), &rogue).refused("a client certificate of another CA was accepted");
    // The daemon still serves the right client after the refusals.
    assert_eq!(curl(&format!("{https}/metrics"), &client).status, Some(200));
}

#[test]
fn the_metrics_token_guards_reads_and_leaves_healthz_open() {
    if !kernel_tests_enabled("the_metrics_token_guards_reads_and_leaves_healthz_open") {
        return;
    }
    let pki = Pki::new();
    pki.write("metrics-token", "m3trics-t0ken-for-prometheus\n");
    let config = format!("[server]\nmetrics_token_file = {:?}\n", pki.path("metrics-token"));
    let daemon = Daemon::start(&config);
    let http = format!("http://{}", daemon.addr);
    wait_healthy(&daemon, &http, &[]);

    for path in ["/metrics", "/targets"] {
        let url = format!("{http}{path}");
        let none = curl(&url, &[]);
        assert_eq!(none.status, Some(401), "{path} without a token: {none:?}");
        assert!(none.body.contains("metrics_token_file"), "the refusal should say what is needed: {}", none.body);
        let wrong = curl(&url, &["-H", "Authorization: Bearer m3trics-t0ken-for-prometheuz"]);
        assert_eq!(wrong.status, Some(401), "{path} with a wrong token: {wrong:?}");
        let right = curl(&url, &["-H", "Authorization: Bearer m3trics-t0ken-for-prometheus"]);
        assert_eq!(right.status, Some(200), "{path} with the token: {right:?}");
    }
    let scrape = curl(&format!("{http}/metrics"), &["-H", "Authorization: Bearer m3trics-t0ken-for-prometheus"]);
    assert!(scrape.body.contains("gauge_capture_bytes_total"), "not a scrape: {}", scrape.body);
    let health = curl(&format!("{http}/healthz"), &[]);
    assert_eq!(health.status, Some(200), "/healthz must stay open: {health:?}");

    // `gauge-agent targets` sends the token from --token-file, and without it says
    // what is missing.
    let targets = |extra: &[&str]| {
        Command::new(gauge_tests::agent::agent_binary())
            .args(["targets", "--json", "--listen", &daemon.addr])
            .args(extra)
            .output()
            .expect("run gauge-agent targets")
    };
    let out = targets(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("metrics_token_file") && stderr.contains("--token-file"), "{stderr}");
    let out = targets(&["--token-file", s(&pki.path("metrics-token"))]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).trim_start().starts_with('['), "not a target list");
}

#[test]
fn tls_and_token_files_that_cannot_be_used_stop_the_start_naming_them() {
    if !kernel_tests_enabled("tls_and_token_files_that_cannot_be_used_stop_the_start_naming_them") {
        return;
    }
    let pki = Pki::new();
    let refused = |config: String| -> String {
        match Daemon::start_through(&["env".to_owned()], &config) {
            Ok(daemon) => panic!("the daemon started with {config}:\n{}", daemon.log.text()),
            Err(Refused { status, log }) => {
                assert!(!status.success(), "{status}");
                log
            }
        }
    };
    let mismatched = format!(
        "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        pki.path("server.crt"),
        pki.path("other.key")
    );
    let log = refused(mismatched);
    assert!(log.contains("other.key") && log.contains("does not match") && log.contains("server.crt"), "{log}");

    let missing = format!("[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n", pki.path("server.crt"), pki.path("gone.key"));
    let log = refused(missing);
    assert!(log.contains("server.tls.key_file") && log.contains("gone.key"), "{log}");

    pki.write("open-token", "t0ken\n");
    std::fs::set_permissions(pki.path("open-token"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let log = refused(format!("[server]\nmetrics_token_file = {:?}\n", pki.path("open-token")));
    assert!(log.contains("open-token") && log.contains("chmod 600"), "{log}");
}

/// The same checks without a daemon (no root needed): what `TlsFiles::load` says.
#[test]
fn tls_files_are_checked_and_named_when_loaded() {
    let pki = Pki::new();
    let files = |cert: &str, key: &str, ca: Option<&str>| TlsFiles {
        cert_file: pki.path(cert),
        key_file: pki.path(key),
        client_ca_file: ca.map(|c| pki.path(c)),
    };
    files("server.crt", "server.key", None).load().expect("a matching pair loads");
    files("server.crt", "server.key", Some("ca.crt")).load().expect("with a client CA");
    let err = files("server.crt", "other.key", None).load().expect_err("mismatch").to_string();
    assert!(err.contains("other.key") && err.contains("server.crt") && err.contains("does not match"), "{err}");
    let err = files("server.crt", "server.crt", None).load().expect_err("a certificate is no key").to_string();
    assert!(err.contains("server.tls.key_file") && err.contains("private key"), "{err}");
    let err = files("server.crt", "server.key", Some("server.key")).load().expect_err("a key is no CA").to_string();
    assert!(err.contains("server.tls.client_ca_file") && err.contains("server.key"), "{err}");
    let err = files("missing.crt", "server.key", None).load().expect_err("missing").to_string();
    assert!(err.contains("server.tls.cert_file") && err.contains("missing.crt"), "{err}");
}
