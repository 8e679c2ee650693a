//! The pure half of `gauge-agent top`: the daemon's `/metrics` text parsed, and a
//! per-agent model built from successive scrapes. No I/O, no clock: the caller
//! passes each scrape's time, so every figure here is unit-tested.

use std::collections::BTreeMap;

/// One sample line of the Prometheus / OpenMetrics text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Parses the sample lines of what the daemon's `/metrics` serves (prometheus-client's
/// OpenMetrics text): `name{k="v",...} value [timestamp] [# exemplar]`. Comments
/// (`# HELP`, `# TYPE`, `# UNIT`, `# EOF`) and lines that do not parse are skipped: a
/// metric the view does not know must never stop it. Written here rather than taken
/// from a crate because only this small subset is needed (the one crate for it,
/// prometheus-parse, brings chrono and lazy_static for timestamps `top` never reads).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?;
    let value = value.parse::<f64>().ok()?;
    Some(Sample { name: name.to_owned(), labels, value })
}

/// `k="v",k2="v2"}` -> the pairs and what follows the closing brace. Values may hold
/// `\"`, `\\` and `\n` escapes, and commas or braces inside quotes.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        let mut chars = s[eq + 1..].char_indices();
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        let mut escaped = false;
        let mut end = None;
        for (i, c) in chars {
            match (escaped, c) {
                (true, 'n') => {
                    value.push('\n');
                    escaped = false;
                }
                (true, c) => {
                    value.push(c);
                    escaped = false;
                }
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(eq + 1 + i + 1);
                    break;
                }
                (false, c) => value.push(c),
            }
        }
        labels.push((key, value));
        s = &s[end?..];
    }
}

/// What one agent looks like in one scrape (counters are totals since the daemon's start).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentRow {
    pub agent: String,
    /// `gauge_llm_cost_usd_total`, summed over every other label.
    pub spend_usd: f64,
    /// USD per minute between the last two scrapes; None until there are two.
    pub rate_usd_per_min: Option<f64>,
    pub requests: f64,
    /// Calls whose status is not 2xx (`error`: no response; HTTP/2 `unknown` is not counted).
    pub errors: f64,
    pub input_tokens: f64,
    /// cache_read + cache_write.
    pub cache_tokens: f64,
    pub output_tokens: f64,
    pub retries: f64,
    pub violations: f64,
    pub actions: f64,
    /// `policy:action` of the most recent action seen (the largest count on the first scrape).
    pub last_action: Option<String>,
    pub anomalies: f64,
    pub forecast_1h: Option<f64>,
    pub forecast_24h: Option<f64>,
    /// The soonest `gauge_budget_exhaustion_seconds` of the agent's budget policies.
    pub budget_exhaustion_secs: Option<f64>,
}

/// The capture's health, from the same scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Health {
    pub probes_attached: f64,
    /// `gauge_capture_lost_events_total` (every reason).
    pub lost_events: f64,
    /// Of those, `reason="throttled"`.
    pub throttled_events: f64,
    pub restarts: f64,
    pub return_probes_off: bool,
}

/// One scrape, reduced to what `top` shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub agents: BTreeMap<String, AgentRow>,
    pub health: Health,
    /// Per agent, `policy:action` -> count (to tell which action is new).
    pub action_counts: BTreeMap<String, BTreeMap<String, f64>>,
}

impl Snapshot {
    pub fn from_metrics(text: &str) -> Self {
        let mut snap = Self::default();
        for s in parse(text) {
            let agent = s.label("agent").map(str::to_owned);
            match s.name.as_str() {
                "gauge_llm_cost_usd_total" => {
                    if let Some(r) = row(&mut snap.agents, agent.as_deref()) {
                        r.spend_usd += s.value;
                    }
                }
                "gauge_llm_requests_total" => {
                    if let Some(r) = row(&mut snap.agents, agent.as_deref()) {
                        r.requests += s.value;
                        let status = s.label("status").unwrap_or("");
                        let ok = status.parse::<u16>().is_ok_and(|c| (200..300).contains(&c));
                        if !ok && status != "unknown" {
                            r.errors += s.value;
                        }
                    }
                }
                "gauge_llm_tokens_total" => {
                    if let Some(r) = row(&mut snap.agents, agent.as_deref()) {
                        match s.label("kind") {
                            Some("input") => r.input_tokens += s.value,
                            Some("cache_read" | "cache_write") => r.cache_tokens += s.value,
                            Some("output") => r.output_tokens += s.value,
                            _ => {}
                        }
                    }
                }
                "gauge_llm_retries_total" => {
                    if let Some(r) = row(&mut snap.agents, agent.as_deref()) {
                        r.retries += s.value;
                    }
                }
                "gauge_policy_violations_total" => {
                    if let Some(r) = row(&mut snap.agents, agent.as_deref()) {
                        r.violations += s.value;
                    }
                }
                "gauge_policy_actions_total" => {
                    if let Some(r) = row(&mut snap.agents, agent.as_deref()) {
                        r.actions += s.value;
                    }
                    if let Some(agent) = &agent {
                        let key = format!("{}:{}", s.label("policy").unwrap_or("?"), s.label("action").unwrap_or("?"));
                        *snap.action_counts.entry(agent.clone()).or_default().entry(key).or_default() += s.value;
                    }
                }
                "gauge_anomalies_total" => {
                    if let Some(r) = row(&mut snap.agents, agent.as_deref()) {
                        r.anomalies += s.value;
                    }
                }
                "gauge_spend_forecast_usd" => {
                    let horizon = s.label("horizon").map(str::to_owned);
                    if let Some(r) = row(&mut snap.agents, agent.as_deref()) {
                        match horizon.as_deref() {
                            Some("1h") => r.forecast_1h = Some(s.value),
                            Some("24h") => r.forecast_24h = Some(s.value),
                            _ => {}
                        }
                    }
                }
                "gauge_budget_exhaustion_seconds" => {
                    if let Some(r) = row(&mut snap.agents, agent.as_deref()) {
                        r.budget_exhaustion_secs = Some(r.budget_exhaustion_secs.map_or(s.value, |b| b.min(s.value)));
                    }
                }
                "gauge_probes_attached" => snap.health.probes_attached += s.value,
                "gauge_capture_lost_events_total" => {
                    snap.health.lost_events += s.value;
                    if s.label("reason") == Some("throttled") {
                        snap.health.throttled_events += s.value;
                    }
                }
                "gauge_agent_restarts_total" => snap.health.restarts += s.value,
                "gauge_capture_return_probes" if s.label("state") == Some("off") && s.value > 0.0 => {
                    snap.health.return_probes_off = true;
                }
                _ => {}
            }
        }
        snap
    }
}

/// The agent's row, made on first sight; None for a sample without an agent label.
fn row<'a>(agents: &'a mut BTreeMap<String, AgentRow>, agent: Option<&str>) -> Option<&'a mut AgentRow> {
    let agent = agent?;
    Some(agents.entry(agent.to_owned()).or_insert_with(|| AgentRow { agent: agent.to_owned(), ..AgentRow::default() }))
}

/// Successive scrapes: the latest snapshot, with rates and last actions from the one
/// before.
#[derive(Debug, Default)]
pub struct Model {
    previous: Option<(f64, Snapshot)>,
    last_actions: BTreeMap<String, String>,
    pub current: Snapshot,
    pub scrapes: u64,
    /// Why the last scrape failed, if it did (the rows keep the last good one).
    pub error: Option<String>,
}

impl Model {
    /// A scrape taken at `at_secs` (any monotonic clock, in seconds).
    pub fn update(&mut self, mut snap: Snapshot, at_secs: f64) {
        for (agent, counts) in &snap.action_counts {
            let before = self.previous.as_ref().and_then(|(_, p)| p.action_counts.get(agent));
            let newest = counts
                .iter()
                .filter(|(key, n)| **n > before.and_then(|b| b.get(*key)).copied().unwrap_or(0.0))
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(key, _)| key.clone());
            if let Some(newest) = newest {
                self.last_actions.insert(agent.clone(), newest);
            }
        }
        for row in snap.agents.values_mut() {
            row.last_action = self.last_actions.get(&row.agent).cloned();
            if let Some((then, prev)) = &self.previous {
                let minutes = (at_secs - then) / 60.0;
                let before = prev.agents.get(&row.agent).map_or(0.0, |p| p.spend_usd);
                // A counter that went down means the daemon restarted: no rate this time.
                if minutes > 0.0 && row.spend_usd >= before {
                    row.rate_usd_per_min = Some((row.spend_usd - before) / minutes);
                }
            }
        }
        self.current = snap.clone();
        self.previous = Some((at_secs, snap));
        self.scrapes += 1;
        self.error = None;
    }

    pub fn failed(&mut self, error: String) {
        self.error = Some(error);
    }

    /// The rows, highest spend rate first (then spend, then name).
    pub fn rows(&self) -> Vec<&AgentRow> {
        let mut rows: Vec<&AgentRow> = self.current.agents.values().collect();
        rows.sort_by(|a, b| {
            b.rate_usd_per_min
                .unwrap_or(0.0)
                .total_cmp(&a.rate_usd_per_min.unwrap_or(0.0))
                .then(b.spend_usd.total_cmp(&a.spend_usd))
                .then(a.agent.cmp(&b.agent))
        });
        rows
    }
}

/// The table's columns, the same in the live view and `--once`.
pub const COLUMNS: [&str; 16] = [
    "AGENT", "USD/MIN", "SPEND_USD", "REQS", "ERRS", "RETRY", "TOK_IN", "TOK_CACHE", "TOK_OUT", "VIOL", "ACTS", "LAST_ACTION",
    "ANOM", "FCST_1H", "FCST_24H", "BUDGET_IN",
];

/// One row as text cells, in [`COLUMNS`] order.
pub fn cells(row: &AgentRow) -> [String; 16] {
    let usd = |v: f64| format!("{v:.6}");
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), usd);
    let count = |v: f64| format!("{v:.0}");
    [
        row.agent.clone(),
        opt(row.rate_usd_per_min),
        usd(row.spend_usd),
        count(row.requests),
        count(row.errors),
        count(row.retries),
        count(row.input_tokens),
        count(row.cache_tokens),
        count(row.output_tokens),
        count(row.violations),
        count(row.actions),
        row.last_action.clone().unwrap_or_else(|| "-".to_owned()),
        count(row.anomalies),
        opt(row.forecast_1h),
        opt(row.forecast_24h),
        row.budget_exhaustion_secs.map_or_else(|| "-".to_owned(), duration),
    ]
}

/// Seconds as `45s`, `12m`, `3.5h`, `2.0d`.
pub fn duration(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.0}s")
    } else if secs < 3600.0 {
        format!("{:.0}m", secs / 60.0)
    } else if secs < 86_400.0 {
        format!("{:.1}h", secs / 3600.0)
    } else {
        format!("{:.1}d", secs / 86_400.0)
    }
}

/// The header line on capture health.
pub fn health_line(model: &Model) -> String {
    let h = &model.current.health;
    let daemon = match &model.error {
        Some(error) => format!("daemon DOWN ({error})"),
        None if model.scrapes == 0 => "daemon: waiting for the first scrape".to_owned(),
        None => "daemon up".to_owned(),
    };
    let total: f64 = model.current.agents.values().map(|r| r.spend_usd).sum();
    // `+ 0.0`: an empty float sum is -0.0, which would print as "-0.000000".
    let rate: f64 = model.current.agents.values().filter_map(|r| r.rate_usd_per_min).sum::<f64>() + 0.0;
    format!(
        "{daemon} | restarts {:.0} | probes attached {:.0}{} | lost events {:.0} (throttled {:.0}) | agents {} | spend {total:.6} USD, {rate:.6} USD/min",
        h.restarts,
        h.probes_attached,
        if h.return_probes_off { " (return probes OFF)" } else { "" },
        h.lost_events,
        h.throttled_events,
        model.current.agents.len(),
    )
}

/// The whole table as plain text, columns aligned (`--once`).
pub fn plain(model: &Model) -> String {
    let rows: Vec<[String; 16]> = model.rows().into_iter().map(cells).collect();
    let mut widths = COLUMNS.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join(" ").trim_end().to_owned()
    };
    let mut out = health_line(model);
    out.push('\n');
    out.push_str(&line(&COLUMNS.map(str::to_owned)));
    out.push('\n');
    for row in &rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("no LLM calls seen yet\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# HELP gauge_llm_cost_usd Cost.
# TYPE gauge_llm_cost_usd counter
gauge_llm_cost_usd_total{agent="bot",process="python3",container="",workflow="",provider="openai",model="gpt-4o-mini-2024-07-18",source="reported"} 0.25
gauge_llm_cost_usd_total{agent="bot",process="python3",container="",workflow="",provider="openai",model="gpt-4o-mini",source="estimated"} 0.5
gauge_llm_cost_usd_total{agent="other",process="curl",container="",workflow="",provider="openai",model="x",source="reported"} 0.125
gauge_llm_requests_total{agent="bot",process="python3",container="",workflow="",provider="openai",model="m",status="200"} 5
gauge_llm_requests_total{agent="bot",process="python3",container="",workflow="",provider="openai",model="m",status="429"} 3
gauge_llm_requests_total{agent="bot",process="python3",container="",workflow="",provider="openai",model="m",status="error"} 1
gauge_llm_requests_total{agent="bot",process="python3",container="",workflow="",provider="openai",model="m",status="unknown"} 2
gauge_llm_requests_total{agent="other",process="curl",container="",workflow="",provider="openai",model="x",status="200"} 1
gauge_llm_tokens_total{agent="bot",process="p",container="",workflow="",provider="openai",model="m",kind="input",source="reported"} 100
gauge_llm_tokens_total{agent="bot",process="p",container="",workflow="",provider="openai",model="m",kind="cache_read",source="reported"} 20
gauge_llm_tokens_total{agent="bot",process="p",container="",workflow="",provider="openai",model="m",kind="cache_write",source="reported"} 5
gauge_llm_tokens_total{agent="bot",process="p",container="",workflow="",provider="openai",model="m",kind="output",source="estimated"} 7
gauge_llm_retries_total{agent="bot",process="p",container="",workflow="",provider="openai",model="m"} 3
gauge_policy_violations_total{agent="bot",policy="cap",limit="max_retries"} 1
gauge_policy_actions_total{agent="bot",policy="cap",action="kill"} 1
gauge_anomalies_total{agent="bot",kind="retry_storm"} 2
gauge_spend_forecast_usd{agent="bot",horizon="1h"} 1.5
gauge_spend_forecast_usd{agent="bot",horizon="24h"} 36.0
gauge_spend_forecast_usd{agent="bot",horizon="30d"} 999.0
gauge_budget_exhaustion_seconds{agent="bot",policy="b1"} 7200.0
gauge_budget_exhaustion_seconds{agent="bot",policy="b2"} 600.0
gauge_probes_attached 12
gauge_capture_lost_events_total{reason="ring_full"} 4
gauge_capture_lost_events_total{reason="throttled"} 2
gauge_agent_restarts_total{reason="clean"} 1
gauge_agent_restarts_total{reason="crash"} 1
gauge_llm_request_duration_seconds_bucket{agent="bot",workflow="",provider="openai",model="m",le="+Inf"} 9
# EOF
"#;

    #[test]
    fn parses_labels_with_escapes_commas_and_braces() {
        let s = parse(r#"m_total{a="x\"y",b="1,2}",c="back\\slash",d="new\nline"} 3.5 1700000000"#);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name, "m_total");
        assert_eq!(s[0].label("a"), Some("x\"y"));
        assert_eq!(s[0].label("b"), Some("1,2}"));
        assert_eq!(s[0].label("c"), Some("back\\slash"));
        assert_eq!(s[0].label("d"), Some("new\nline"));
        assert_eq!(s[0].value, 3.5);
    }

    #[test]
    fn parses_bare_samples_special_values_and_skips_junk() {
        let s = parse("# TYPE x gauge\nx 1\ny{} +Inf\nz NaN\nbroken{a=\"1\" 2\n\nnovalue\n");
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!((s[0].name.as_str(), s[0].value), ("x", 1.0));
        assert!(s[1].value.is_infinite() && s[1].labels.is_empty());
        assert!(s[2].value.is_nan());
    }

    #[test]
    fn one_scrape_builds_each_agents_row_and_the_health() {
        let snap = Snapshot::from_metrics(SCRAPE);
        let bot = &snap.agents["bot"];
        assert_eq!(bot.spend_usd, 0.75);
        assert_eq!(bot.requests, 11.0);
        assert_eq!(bot.errors, 4.0, "429 and error count, unknown does not");
        assert_eq!((bot.input_tokens, bot.cache_tokens, bot.output_tokens), (100.0, 25.0, 7.0));
        assert_eq!((bot.retries, bot.violations, bot.actions, bot.anomalies), (3.0, 1.0, 1.0, 2.0));
        assert_eq!((bot.forecast_1h, bot.forecast_24h), (Some(1.5), Some(36.0)));
        assert_eq!(bot.budget_exhaustion_secs, Some(600.0), "the soonest budget");
        assert_eq!(snap.agents["other"].spend_usd, 0.125);
        assert_eq!(snap.agents.len(), 2);
        let h = &snap.health;
        assert_eq!((h.probes_attached, h.lost_events, h.throttled_events, h.restarts), (12.0, 6.0, 2.0, 2.0));
    }

    #[test]
    fn the_rate_comes_from_the_delta_between_scrapes_and_rows_sort_by_it() {
        let mut model = Model::default();
        model.update(Snapshot::from_metrics(SCRAPE), 100.0);
        assert_eq!(model.rows()[0].rate_usd_per_min, None);
        assert_eq!(model.rows()[0].agent, "bot", "by spend while no rate is known");
        assert_eq!(model.rows()[0].last_action.as_deref(), Some("cap:kill"), "an action already taken shows");
        // 30 s later, "other" spent 0.5 more and "bot" nothing.
        let later = SCRAPE.replace("source=\"reported\"} 0.125", "source=\"reported\"} 0.625");
        model.update(Snapshot::from_metrics(&later), 130.0);
        let rows = model.rows();
        assert_eq!(rows[0].agent, "other");
        assert!((rows[0].rate_usd_per_min.unwrap_or_default() - 1.0).abs() < 1e-12, "0.5 USD in 30 s = 1 USD/min");
        assert_eq!(rows[1].rate_usd_per_min, Some(0.0));
        // A daemon restart resets the counters: no negative rate.
        model.update(Snapshot::from_metrics(&SCRAPE.replace("0.125", "0.0")), 160.0);
        assert_eq!(model.current.agents["other"].rate_usd_per_min, None);
    }

    #[test]
    fn the_last_action_is_the_one_whose_count_grew() {
        let mut model = Model::default();
        let one = "gauge_policy_actions_total{agent=\"a\",policy=\"cap\",action=\"kill\"} 3\n\
                   gauge_policy_actions_total{agent=\"a\",policy=\"rate\",action=\"pause\"} 1\n";
        model.update(Snapshot::from_metrics(one), 0.0);
        assert_eq!(model.current.agents["a"].last_action.as_deref(), Some("cap:kill"));
        model.update(Snapshot::from_metrics(&one.replace("} 1", "} 2")), 1.0);
        assert_eq!(model.current.agents["a"].last_action.as_deref(), Some("rate:pause"));
        model.update(Snapshot::from_metrics(&one.replace("} 1", "} 2")), 2.0);
        assert_eq!(model.current.agents["a"].last_action.as_deref(), Some("rate:pause"), "kept while nothing new");
        assert_eq!(model.current.agents["a"].actions, 5.0);
    }

    #[test]
    fn plain_output_has_the_header_columns_and_a_row_per_agent() {
        let mut model = Model::default();
        model.update(Snapshot::from_metrics(SCRAPE), 0.0);
        let text = plain(&model);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("daemon up | restarts 2 | probes attached 12 | lost events 6 (throttled 2)"), "{text}");
        assert!(lines[0].ends_with("spend 0.875000 USD, 0.000000 USD/min"), "{text}");
        assert_eq!(lines[1].split_whitespace().collect::<Vec<_>>(), COLUMNS);
        let bot: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            bot,
            ["bot", "-", "0.750000", "11", "4", "3", "100", "25", "7", "1", "1", "cap:kill", "2", "1.500000", "36.000000", "10m"]
        );
        assert!(lines[3].starts_with("other "), "{text}");
        assert!(plain(&Model::default()).contains("no LLM calls seen yet"));
    }

    #[test]
    fn a_failed_scrape_is_shown_and_the_rows_stay() {
        let mut model = Model::default();
        model.update(Snapshot::from_metrics(SCRAPE), 0.0);
        model.failed("connection refused".into());
        assert!(health_line(&model).starts_with("daemon DOWN (connection refused)"));
        assert_eq!(model.rows().len(), 2);
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(duration(45.0), "45s");
        assert_eq!(duration(600.0), "10m");
        assert_eq!(duration(5400.0), "1.5h");
        assert_eq!(duration(172_800.0), "2.0d");
    }
}
