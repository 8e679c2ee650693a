//! Loss accounting under a flood: a hostile local process pushes far more plaintext
//! through OpenSSL than the (deliberately small) ring buffer holds. Every record the
//! kernel submitted is accounted for in user space, what did not fit is counted
//! (refused as over the flooder's share of the ring, or lost to a full ring), the
//! daemon stays healthy, and a normal LLM call right after is still metered exactly.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use gauge_tests::{clients, kernel_tests_enabled, world::{World, sum}};

/// 64 KiB of ring; the flood writes 32 MiB, 500 times the ring's size.
const CONFIG: &str = "[capture]\nring_buffer_bytes = 65536\n";

#[test]
fn a_flood_past_the_ring_is_counted_record_for_record_and_capture_goes_on() {
    if !kernel_tests_enabled("flood end to end") {
        return;
    }
    let world = World::start(CONFIG);
    let flood = format!(
        "import ssl, http.client\n\
         ctx = ssl.create_default_context(cafile='{ca}')\n\
         c = http.client.HTTPSConnection('127.0.0.1', {port}, context=ctx)\n\
         chunk = b'x' * 16384\n\
         c.putrequest('POST', '/flood')\n\
         c.putheader('content-length', str(len(chunk) * 2048))\n\
         c.endheaders()\n\
         for _ in range(2048):\n\
         \x20   c.send(chunk)\n\
         c.getresponse().read()\n",
        ca = world.cert.display(),
        port = world.mock.port,
    );
    let mut flooder = Command::new("python3");
    flooder.args(["-c", &flood]);
    clients::run("flooder", &mut flooder);
    // Once the ring is drained, received + decode errors = submitted, exactly.
    let start = Instant::now();
    let (submitted, received, m) = loop {
        let (_, m) = world.daemon.get("/metrics").expect("scrape");
        let submitted = sum(&m, "gauge_capture_kernel_events_total", &[]);
        let received = sum(&m, "gauge_capture_events_total", &[]) + sum(&m, "gauge_capture_lost_events_total", &[("reason", "decode_error")]);
        if submitted == received || start.elapsed() > Duration::from_secs(20) {
            break (submitted, received, m);
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(submitted, received, "records submitted by the kernel vs received:\n{m}");
    let refused = |reason| sum(&m, "gauge_capture_lost_events_total", &[("reason", reason)]);
    assert!(refused("ring_full") + refused("throttled") > 0.0, "the flood never filled the ring:\n{m}");
    let bytes = sum(&m, "gauge_capture_lost_bytes_total", &[]) + sum(&m, "gauge_capture_throttled_bytes_total", &[]);
    assert!(bytes > 0.0, "{m}");
    assert_eq!(world.daemon.get("/healthz").map(|(code, _)| code), Some(200));
    // Capture goes on: a normal call afterwards is metered exactly.
    world.python_as("openai SDK after the flood", gauge_tests::sdk::SDK_CALLS, "after-flood");
    let openai = [("agent", "after-flood"), ("provider", "openai_compatible"), ("model", "gpt-4o-mini-2024-07-18")];
    let after = world.scrape(&[(&openai, 2.0)]);
    after.check("gauge_llm_requests_total", &gauge_tests::world::with(&openai, &[("status", "200")]), 2.0);
    after.tokens(&openai, &[("output", 14.0)]);
}
