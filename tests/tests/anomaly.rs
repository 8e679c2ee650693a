//! Anomalies end to end: a real openai SDK client that starts looping (the same
//! request again and again) makes the loop detector fire within a bounded number of
//! calls; the finding reaches a webhook, and a policy triggered by it stops the loop.

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    os::unix::process::ExitStatusExt as _,
    process::Stdio,
    sync::mpsc,
    thread,
    time::Duration,
};

use gauge_tests::{
    agent::wait_timeout,
    clients, kernel_tests_enabled,
    world::{World, sum},
};

/// Accepts one POST and hands its body over.
fn webhook() -> (String, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else { return };
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        // Headers, then a JSON body that ends the request.
        while !String::from_utf8_lossy(&request).trim_end().ends_with('}') {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
    });
    (url, rx)
}

#[test]
fn a_looping_sdk_client_fires_the_loop_detector_and_its_policy_stops_it() {
    if !kernel_tests_enabled("loop detection end to end") {
        return;
    }
    let (url, hook) = webhook();
    let config = format!(
        "[[agents]]\nname = \"looper\"\nmatch = {{ cmdline = \"loop-marker\" }}\n\
         [[policies]]\nname = \"break-loops\"\nagent = \"looper\"\non_anomaly = \"loop\"\naction = \"kill\"\ngate = true\n\
         [anomaly.webhook]\nurl = \"{url}\"\nformat = \"json\"\nretries = 0\n"
    );
    let world = World::start(&config);
    let script = r#"
import os, openai
oa = openai.OpenAI(base_url="https://127.0.0.1:%s/v1" % os.environ["GAUGE_TEST_PORT"], api_key="sk-test-secret-0123456789abcdef", max_retries=0)
for _ in range(30):
    oa.chat.completions.create(model="loop-model", messages=[{"role": "user", "content": "check the ticket status"}])
print("never stopped")
"#;
    let mut cmd = clients::python(&world.cert, script);
    cmd.arg("loop-marker")
        .env("GAUGE_TEST_PORT", world.mock.port.to_string())
        .env("SSL_CERT_FILE", &world.cert)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut client = cmd.spawn().expect("start python");
    let status = wait_timeout(&mut client, Duration::from_secs(60)).expect("the looping client ends");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{}", world.daemon.log.text());
    // The detector fires at the fifth identical request; the sixth never leaves.
    assert_eq!(world.mock.received("loop-model"), 5, "{}", world.daemon.log.text());
    let (_, m) = world.daemon.get("/metrics").expect("scrape");
    assert_eq!(sum(&m, "gauge_anomalies_total", &[("agent", "looper"), ("kind", "loop")]), 1.0, "{m}");
    assert_eq!(sum(&m, "gauge_anomalies_total", &[]), 1.0, "only the loop detector fires:\n{m}");
    assert_eq!(sum(&m, "gauge_policy_actions_total", &[("policy", "break-loops"), ("action", "kill")]), 1.0, "{m}");
    assert!(m.contains("gauge_spend_forecast_usd{agent=\"looper\",horizon=\"30d\"}"), "{m}");
    let posted = hook.recv_timeout(Duration::from_secs(20)).expect("the webhook got the finding");
    assert!(posted.starts_with("POST /hook") && posted.contains("\"kind\":\"loop\"") && posted.contains("\"agent\":\"looper\""), "{posted}");
}
