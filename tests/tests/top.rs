//! `gauge-agent top` end to end: real SDK calls metered by the real daemon, then the
//! live view run in a detached tmux session of a fixed size (read back with
//! `capture-pane`, quit with `send-keys q`), and `--once` for scripts. The figures on
//! screen must be those of `/metrics`.

use std::{
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use gauge_tests::{
    agent::agent_binary,
    kernel_tests_enabled,
    sdk::SDK_CALLS,
    world::{World, sum},
};

/// SDK_CALLS makes 7 requests: 6 calls, one of which (fail-once) is retried after a 429.
const SDK_REQUESTS: f64 = 7.0;

/// A tmux server on a socket of this test's own (`-L`), so no one else's sessions are
/// ever seen or touched; the server is killed when dropped.
struct Tmux {
    socket: String,
    session: String,
}

impl Tmux {
    fn start(tag: &str, command: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let unique = format!("gauge-top-{tag}-{}-{nanos}", std::process::id());
        let tmux = Self { socket: unique.clone(), session: unique };
        let out = tmux.run(&["new-session", "-d", "-s", &tmux.session, "-x", "160", "-y", "40", command]);
        assert!(out.status.success(), "tmux new-session failed: {}", String::from_utf8_lossy(&out.stderr));
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().expect("run tmux (apt-get install tmux)")
    }

    fn capture(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", &self.session]).stdout).into_owned()
    }

    fn display(&self, format: &str) -> String {
        String::from_utf8_lossy(&self.run(&["display-message", "-p", "-t", &self.session, format]).stdout).trim().to_owned()
    }

    /// Polls the pane until `done` finds what it wants in it (at most 30 s).
    fn wait_for<T>(&self, what: &str, done: impl Fn(&str) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            let pane = self.capture();
            if let Some(found) = done(&pane) {
                return found;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{what}: not on screen within 30 s; the pane:\n{pane}");
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The fields of the table row of `agent` (the view's border characters dropped).
fn row(screen: &str, agent: &str) -> Option<Vec<String>> {
    screen.lines().find_map(|line| {
        let fields: Vec<String> = line.replace('│', " ").split_whitespace().map(str::to_owned).collect();
        (fields.first().map(String::as_str) == Some(agent)).then_some(fields)
    })
}

/// Runs the SDK calls as `agent` and returns the daemon's /metrics once all of them are counted.
fn metered(world: &World, agent: &str) -> String {
    world.python_as("openai and anthropic SDK calls", SDK_CALLS, agent);
    world.scrape(&[(&[("agent", agent)], SDK_REQUESTS)]).text
}

/// The row matches /metrics: columns in `gauge_agent::top::model::COLUMNS` order.
fn check_row(fields: &[String], metrics: &str, agent: &str) {
    let labels = [("agent", agent)];
    let number = |i: usize| fields[i].parse::<f64>().unwrap_or_else(|_| panic!("column {i} of {fields:?} is not a number"));
    let spend = sum(metrics, "gauge_llm_cost_usd_total", &labels);
    assert!(spend > 0.0, "the SDK calls cost something:\n{metrics}");
    assert!((number(2) - spend).abs() < 1e-6, "spend {} on screen, {spend} in /metrics", fields[2]);
    assert_eq!(number(3), sum(metrics, "gauge_llm_requests_total", &labels), "requests: {fields:?}");
    assert_eq!(number(3), SDK_REQUESTS);
    assert_eq!(number(4), 1.0, "one 429: {fields:?}");
    assert_eq!(number(5), sum(metrics, "gauge_llm_retries_total", &labels), "retries: {fields:?}");
    let tokens = |kinds: &[&str]| -> f64 {
        kinds.iter().map(|k| sum(metrics, "gauge_llm_tokens_total", &[("agent", agent), ("kind", k)])).sum()
    };
    assert_eq!(number(6), tokens(&["input"]), "input tokens: {fields:?}");
    assert_eq!(number(7), tokens(&["cache_read", "cache_write"]), "cache tokens: {fields:?}");
    assert_eq!(number(8), tokens(&["output"]), "output tokens: {fields:?}");
}

#[test]
fn top_shows_each_agent_live_in_a_terminal_and_quits_on_q() {
    if !kernel_tests_enabled("gauge-agent top in tmux") {
        return;
    }
    let world = World::start("");
    let metrics = metered(&world, "top-bot");
    // After top exits the shell says so and stays, so the pane can be read back.
    let command = format!(
        "{} top --listen {} --interval 1; echo \"top exited: $?\"; exec sleep 120",
        agent_binary().display(),
        world.daemon.addr
    );
    let tmux = Tmux::start("live", &command);
    // Two scrapes give a rate: with no calls between them it is 0.
    let fields = tmux.wait_for("the top-bot row with a spend rate", |pane| {
        row(pane, "top-bot").filter(|f| f.len() == 16 && f[1] != "-" && f[3] == "7")
    });
    assert_eq!(fields[1], "0.000000", "no spend between the scrapes: {fields:?}");
    check_row(&fields, &metrics, "top-bot");
    let pane = tmux.capture();
    assert!(pane.contains("daemon up") && pane.contains("probes attached"), "the health header:\n{pane}");
    assert_eq!(tmux.display("#{alternate_on}"), "1", "the view runs on the alternate screen");
    tmux.run(&["send-keys", "-t", &tmux.session, "q"]);
    tmux.wait_for("top exiting with 0 on q", |pane| pane.contains("top exited: 0").then_some(()));
    // Restored: back on the normal screen, the table gone, the cursor shown.
    assert_eq!(tmux.display("#{alternate_on}"), "0", "the alternate screen was left");
    assert_eq!(tmux.display("#{cursor_flag}"), "1", "the cursor is shown again");
    let pane = tmux.capture();
    assert!(!pane.contains("USD/MIN"), "the table is gone after q:\n{pane}");
}

#[test]
fn top_once_prints_the_table_for_scripts_and_says_when_the_daemon_is_unreachable() {
    if !kernel_tests_enabled("gauge-agent top --once") {
        return;
    }
    let world = World::start("");
    let metrics = metered(&world, "top-once-bot");
    let out = Command::new(agent_binary()).args(["top", "--once", "--listen", &world.daemon.addr]).output().expect("run top --once");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "top --once failed: {}", String::from_utf8_lossy(&out.stderr));
    let first = text.lines().next().unwrap_or_default();
    assert!(first.starts_with("daemon up | restarts"), "{text}");
    let header: Vec<&str> = text.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, gauge_agent::top::model::COLUMNS, "{text}");
    let fields = row(&text, "top-once-bot").unwrap_or_else(|| panic!("no top-once-bot row:\n{text}"));
    assert_eq!(fields[1], "-", "one scrape has no rate");
    check_row(&fields, &metrics, "top-once-bot");

    // Nothing listens on port 1 of loopback.
    let out = Command::new(agent_binary()).args(["top", "--once", "--listen", "127.0.0.1:1"]).output().expect("run top --once");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unreachable daemon is an error");
    assert!(stderr.contains("cannot reach the daemon at 127.0.0.1:1"), "{stderr}");
    // And the same, before taking the terminal, for the live view.
    let out = Command::new(agent_binary()).args(["top", "--listen", "127.0.0.1:1"]).output().expect("run top");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("cannot reach the daemon"));
}
