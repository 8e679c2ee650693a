//! The detectors: pure and clock-free (times come from calls). Each keeps a little
//! state per agent and says when that agent's behaviour turns costly: a spend-rate
//! spike against its own robust baseline, a retry storm, a loop, runaway context
//! growth in a conversation, or an escalation to a pricier model.

use std::collections::{HashMap, VecDeque};

use super::config::AnomalyConfig;

const MINUTE_NS: u64 = 60_000_000_000;
/// Conversations and request bodies remembered per agent.
const MAX_CONVERSATIONS: usize = 1024;
const MAX_BODIES: usize = 4096;
/// Agents followed; beyond this the least recently seen is forgotten.
const MAX_AGENTS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    SpendSpike,
    RetryStorm,
    Loop,
    ContextGrowth,
    ModelEscalation,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::SpendSpike, Kind::RetryStorm, Kind::Loop, Kind::ContextGrowth, Kind::ModelEscalation];

    pub fn label(self) -> &'static str {
        match self {
            Self::SpendSpike => "spend_spike",
            Self::RetryStorm => "retry_storm",
            Self::Loop => "loop",
            Self::ContextGrowth => "context_growth",
            Self::ModelEscalation => "model_escalation",
        }
    }

    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.label() == label)
    }
}

/// What the detectors see of one finished call.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub agent: String,
    pub tgid: u32,
    pub at_ns: u64,
    pub cost_usd: f64,
    pub retry: bool,
    /// HTTP status; `None` when no answer came.
    pub status: Option<u16>,
    pub model: String,
    /// Prompt tokens: uncached input plus cache reads and writes.
    pub prompt_tokens: u64,
    pub body_hash: u64,
    /// The tool calls the request's latest assistant turn made (see `RequestContext`).
    pub tool_calls: Option<u64>,
    /// The conversation, from a session header; `None` groups by model.
    pub session: Option<String>,
    /// The model's input price (USD per million tokens), when priced.
    pub input_price: Option<f64>,
}

/// A detector fired.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub agent: String,
    pub kind: Kind,
    pub tgid: u32,
    pub at_ns: u64,
    pub observed: f64,
    pub threshold: f64,
    pub detail: String,
}

#[derive(Debug, Default)]
struct AgentState {
    seen_seq: u64,
    /// USD per minute, by minute index, oldest first.
    minutes: VecDeque<(u64, f64)>,
    /// (time, went wrong) of recent calls.
    outcomes: VecDeque<(u64, bool)>,
    bodies: HashMap<u64, VecDeque<u64>>,
    tool_patterns: HashMap<u64, VecDeque<u64>>,
    conversations: HashMap<(u32, String), VecDeque<u64>>,
    calls: u64,
    baseline_price: Option<f64>,
    last_fired: HashMap<Kind, u64>,
}

pub struct Detectors {
    config: AnomalyConfig,
    agents: HashMap<String, AgentState>,
    seq: u64,
}

impl Detectors {
    pub fn new(config: AnomalyConfig) -> Self {
        Self { config, agents: HashMap::new(), seq: 0 }
    }

    /// Feeds one call; returns the findings it triggers (each kind at most once per
    /// agent per `repeat_after`).
    pub fn observe(&mut self, o: &Observation) -> Vec<Finding> {
        if !self.config.enabled {
            return Vec::new();
        }
        self.seq += 1;
        if self.agents.len() >= MAX_AGENTS && !self.agents.contains_key(&o.agent) {
            let oldest = self.agents.iter().min_by_key(|(_, s)| s.seen_seq).map(|(a, _)| a.clone());
            if let Some(agent) = oldest {
                self.agents.remove(&agent);
            }
        }
        let c = &self.config;
        let state = self.agents.entry(o.agent.clone()).or_default();
        state.seen_seq = self.seq;
        state.calls += 1;
        let mut found: Vec<(Kind, f64, f64, String)> = Vec::new();
        if let Some(f) = spend_spike(c, state, o) {
            found.push(f);
        }
        if let Some(f) = retry_storm(c, state, o) {
            found.push(f);
        }
        if let Some(f) = repeated_body(c, state, o) {
            found.push(f);
        }
        if let Some(f) = context_growth(c, state, o) {
            found.push(f);
        }
        if let Some(f) = model_escalation(c, state, o) {
            found.push(f);
        }
        let repeat_ns = c.repeat_after.as_nanos().min(u128::from(u64::MAX)) as u64;
        found
            .into_iter()
            .filter(|(kind, ..)| {
                let quiet = state.last_fired.get(kind).is_none_or(|t| o.at_ns.saturating_sub(*t) >= repeat_ns);
                if quiet {
                    state.last_fired.insert(*kind, o.at_ns);
                }
                quiet
            })
            .map(|(kind, observed, threshold, detail)| Finding {
                agent: o.agent.clone(),
                kind,
                tgid: o.tgid,
                at_ns: o.at_ns,
                observed,
                threshold,
                detail,
            })
            .collect()
    }
}

type Found = (Kind, f64, f64, String);

fn spend_spike(c: &AnomalyConfig, s: &mut AgentState, o: &Observation) -> Option<Found> {
    let cfg = &c.spend_spike;
    let minute = o.at_ns / MINUTE_NS;
    match s.minutes.back_mut() {
        Some((m, usd)) if *m >= minute => *usd += o.cost_usd,
        _ => s.minutes.push_back((minute, o.cost_usd)),
    }
    let oldest = minute.saturating_sub(u64::from(cfg.baseline_minutes));
    while s.minutes.front().is_some_and(|(m, _)| *m < oldest) {
        s.minutes.pop_front();
    }
    let first = s.minutes.front()?.0;
    // Minutes before this one, idle ones included as zero spend.
    let span = minute.saturating_sub(first.max(oldest));
    if span < u64::from(cfg.warmup_minutes) {
        return None;
    }
    let mut baseline: Vec<f64> = (minute - span..minute)
        .map(|m| s.minutes.iter().find(|(bm, _)| *bm == m).map_or(0.0, |(_, usd)| *usd))
        .collect();
    let now = s.minutes.back().map_or(0.0, |(_, usd)| *usd);
    let median = median_of(&mut baseline);
    let mut deviations: Vec<f64> = baseline.iter().map(|v| (v - median).abs()).collect();
    let mad = median_of(&mut deviations) * 1.4826;
    let threshold = (median + cfg.mads * mad).max(cfg.min_ratio * median).max(cfg.min_usd_per_minute);
    (now > threshold).then(|| {
        (Kind::SpendSpike, now, threshold, format!("${now:.4} in the current minute against a baseline median of ${median:.4}/min"))
    })
}

/// The median (0 for no values); sorts `values`.
pub fn median_of(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) { (values[mid - 1] + values[mid]) / 2.0 } else { values[mid] }
}

fn retry_storm(c: &AnomalyConfig, s: &mut AgentState, o: &Observation) -> Option<Found> {
    let cfg = &c.retry_storm;
    let bad = o.retry || o.status.is_none_or(|st| st == 429 || st >= 500);
    s.outcomes.push_back((o.at_ns, bad));
    let since = o.at_ns.saturating_sub(cfg.window.as_nanos().min(u128::from(u64::MAX)) as u64);
    while s.outcomes.front().is_some_and(|(t, _)| *t < since) {
        s.outcomes.pop_front();
    }
    let calls = s.outcomes.len();
    let bad = s.outcomes.iter().filter(|(_, b)| *b).count();
    let ratio = bad as f64 / calls.max(1) as f64;
    (calls >= cfg.min_calls as usize && ratio >= cfg.ratio).then(|| {
        (Kind::RetryStorm, ratio, cfg.ratio, format!("{bad} of the last {calls} calls were retries, 429s or server errors"))
    })
}

/// A loop: the same request body again, or (bodies growing with the history) the
/// model making the same tool call with the same arguments again.
fn repeated_body(c: &AnomalyConfig, s: &mut AgentState, o: &Observation) -> Option<Found> {
    let cfg = &c.loops;
    // A retry repeats its body by design: the retry-storm detector counts those.
    if o.retry {
        return None;
    }
    let since = o.at_ns.saturating_sub(cfg.window.as_nanos().min(u128::from(u64::MAX)) as u64);
    let repeats = |seen: &mut HashMap<u64, VecDeque<u64>>, key: u64| {
        seen.retain(|_, times| {
            while times.front().is_some_and(|t| *t < since) {
                times.pop_front();
            }
            !times.is_empty()
        });
        if seen.len() >= MAX_BODIES && !seen.contains_key(&key) {
            return 0;
        }
        let times = seen.entry(key).or_default();
        times.push_back(o.at_ns);
        times.len()
    };
    let body = repeats(&mut s.bodies, o.body_hash);
    let tool = o.tool_calls.map_or(0, |pattern| repeats(&mut s.tool_patterns, pattern));
    let wanted = cfg.repeats as usize;
    if body >= wanted {
        Some((Kind::Loop, body as f64, f64::from(cfg.repeats), format!("the same request sent {body} times within {:?}", cfg.window)))
    } else if tool >= wanted {
        let detail = format!("the same tool call with the same arguments made {tool} times within {:?}", cfg.window);
        Some((Kind::Loop, tool as f64, f64::from(cfg.repeats), detail))
    } else {
        None
    }
}

fn context_growth(c: &AnomalyConfig, s: &mut AgentState, o: &Observation) -> Option<Found> {
    let cfg = &c.context_growth;
    let key = (o.tgid, o.session.clone().unwrap_or_else(|| o.model.clone()));
    if s.conversations.len() >= MAX_CONVERSATIONS && !s.conversations.contains_key(&key) {
        s.conversations.clear();
    }
    let tokens = s.conversations.entry(key).or_default();
    tokens.push_back(o.prompt_tokens);
    while tokens.len() > cfg.calls as usize {
        tokens.pop_front();
    }
    if o.prompt_tokens >= cfg.ceiling_tokens {
        let detail = format!("a prompt of {} tokens", o.prompt_tokens);
        return Some((Kind::ContextGrowth, o.prompt_tokens as f64, cfg.ceiling_tokens as f64, detail));
    }
    if tokens.len() < cfg.calls as usize {
        return None;
    }
    let slope = slope(tokens.iter().map(|t| *t as f64));
    (slope >= cfg.slope_tokens).then(|| {
        let detail = format!("prompts grew by {slope:.0} tokens per call over the last {} calls", tokens.len());
        (Kind::ContextGrowth, slope, cfg.slope_tokens, detail)
    })
}

/// Least-squares slope of values at x = 0, 1, 2, ...
pub fn slope(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let n = values.clone().count() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = values.clone().sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (i, y) in values.enumerate() {
        let dx = i as f64 - mean_x;
        num += dx * (y - mean_y);
        den += dx * dx;
    }
    if den == 0.0 { 0.0 } else { num / den }
}

fn model_escalation(c: &AnomalyConfig, s: &mut AgentState, o: &Observation) -> Option<Found> {
    let cfg = &c.model_escalation;
    let price = o.input_price?;
    if s.calls <= u64::from(cfg.baseline_calls) {
        s.baseline_price = Some(s.baseline_price.map_or(price, |p| p.max(price)));
        return None;
    }
    let baseline = s.baseline_price?;
    let threshold = baseline * cfg.price_ratio;
    (price > threshold).then(|| {
        let detail = format!("{} at ${price}/M input tokens; the agent's baseline models cost up to ${baseline}/M", o.model);
        (Kind::ModelEscalation, price, threshold, detail)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn call(at_s: u64, cost: f64) -> Observation {
        Observation {
            agent: "bot".into(),
            tgid: 1,
            at_ns: at_s * S,
            cost_usd: cost,
            status: Some(200),
            model: "gpt-4o-mini".into(),
            prompt_tokens: 500,
            body_hash: at_s,
            input_price: Some(0.15),
            ..Default::default()
        }
    }

    /// Feeds a trace; returns the kinds that fired, in order.
    fn fired(trace: &[Observation]) -> Vec<Kind> {
        let mut d = Detectors::new(AnomalyConfig::default());
        trace.iter().flat_map(|o| d.observe(o)).map(|f| f.kind).collect()
    }

    /// Two hours of a steady agent: 3 calls a minute, distinct bodies, stable prompts,
    /// costs that wobble, one model. The baseline every anomaly trace departs from.
    fn clean(minutes: u64) -> Vec<Observation> {
        (0..minutes * 3)
            .map(|i| Observation { cost_usd: 0.01 + 0.002 * (i % 5) as f64, prompt_tokens: 500 + (i % 7) * 30, ..call(i * 20, 0.0) })
            .collect()
    }

    #[test]
    fn a_clean_trace_fires_nothing() {
        let false_positives = fired(&clean(120));
        assert!(false_positives.is_empty(), "false positives: {false_positives:?}");
    }

    #[test]
    fn each_anomaly_fires_exactly_its_detector() {
        let after = |trace: Vec<Observation>| {
            let mut t = clean(30);
            let start = t.last().map_or(0, |o| o.at_ns / S) + 20;
            t.extend(trace.into_iter().map(|o| Observation { at_ns: o.at_ns + start * S, ..o }));
            fired(&t)
        };
        // Spend: the same call rate, each call 20 times dearer, for a minute.
        let spike = (0..3).map(|i| Observation { cost_usd: 0.25, ..call(i * 20, 0.0) }).collect();
        assert_eq!(after(spike), vec![Kind::SpendSpike]);
        // Retry storm: 429s answered by SDK retries, distinct bodies, normal cost.
        let storm = (0..20)
            .map(|i| Observation { status: Some(429), retry: i > 0, cost_usd: 0.0, ..call(i, 0.0) })
            .collect();
        assert_eq!(after(storm), vec![Kind::RetryStorm]);
        // Loop: the same body again and again, answered fine.
        let looping = (0..5).map(|i| Observation { body_hash: 42, cost_usd: 0.01, ..call(i * 20, 0.0) }).collect();
        assert_eq!(after(looping), vec![Kind::Loop]);
        // Loop: growing bodies, but the same tool call again and again.
        let tool_loop = (0..5).map(|i| Observation { tool_calls: Some(7), cost_usd: 0.01, ..call(i * 20, 0.0) }).collect();
        assert_eq!(after(tool_loop), vec![Kind::Loop]);
        // Context growth: a conversation whose prompt grows by 3000 tokens a call.
        let growing = (0..5)
            .map(|i| Observation { prompt_tokens: 1000 + 3000 * i, session: Some("s1".into()), cost_usd: 0.01, ..call(i * 20, 0.0) })
            .collect();
        assert_eq!(after(growing), vec![Kind::ContextGrowth]);
        // Model escalation: from gpt-4o-mini ($0.15/M) to a $15/M model.
        let escalation = vec![Observation { model: "o1".into(), input_price: Some(15.0), cost_usd: 0.01, ..call(0, 0.0) }];
        assert_eq!(after(escalation), vec![Kind::ModelEscalation]);
    }

    #[test]
    fn a_finding_is_not_repeated_within_its_quiet_time() {
        let looping: Vec<Observation> = (0..20).map(|i| Observation { body_hash: 42, ..call(i, 0.001) }).collect();
        assert_eq!(fired(&looping), vec![Kind::Loop]);
    }

    #[test]
    fn slope_of_a_line_is_its_step() {
        assert_eq!(slope([1.0, 3.0, 5.0, 7.0].into_iter()), 2.0);
        assert_eq!(slope([4.0].into_iter()), 0.0);
    }

    #[test]
    fn kinds_round_trip_through_their_labels() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_label(kind.label()), Some(kind));
        }
    }
}
