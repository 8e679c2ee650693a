//! Policy evaluation: pure and clock-free (times come from events). Counts what each
//! policy limits, per scope key, over its window, and says when a limit is crossed:
//! by a finished call (retries, errors, spend...) or by a held request itself
//! (context ceiling, model, loop, or a limit already crossed).

use std::collections::{HashMap, VecDeque};

use super::config::{PolicyConfig, Scope};

/// Buckets per window: counts are exact to a sixtieth of the window.
const BUCKETS: u64 = 60;
/// Distinct request bodies remembered per key for the loop breaker.
const MAX_HASHES: usize = 4096;

/// Whom a call or request is attributed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub tgid: u32,
    pub agent: String,
    pub cgroup: String,
}

/// What the limits count of a finished call.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallFacts {
    pub at_ns: u64,
    pub retry: bool,
    pub error: bool,
    pub cost_pico: u128,
    pub body_hash: u64,
}

/// What a held request says of itself.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts {
    pub at_ns: u64,
    pub model: Option<String>,
    pub input_tokens: u64,
    pub body_hash: Option<u64>,
    pub retry: bool,
    /// The write begins a request (a body's later writes do not count again).
    pub new_request: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ScopeKey {
    Process(u32),
    Cgroup(String),
    Agent(String),
}

/// A crossed limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub policy: usize,
    pub key: ScopeKey,
    pub limit: &'static str,
    pub observed: f64,
    pub allowed: f64,
}

/// What a fleet budget (`spend_source = "prometheus"`) knows of the fleet's spend,
/// set by the stage before each decision (the engine stays clock-free).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RemoteSpend {
    /// No usable answer and `on_error = "open"` (or no fetcher, as on replay): the
    /// local count alone.
    #[default]
    LocalOnly,
    /// A fresh answer: the fleet's spend in USD. It includes this host's, but
    /// later (scrape and refresh lag), so the local count stays the floor.
    Fleet(f64),
    /// No usable answer and `on_error = "closed"`: the budget counts as spent.
    Exhausted,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    requests: u64,
    retries: u64,
    errors: u64,
    cost_pico: u128,
}

#[derive(Debug, Default)]
struct Window {
    buckets: VecDeque<(u64, Counts)>,
    /// Body hash -> times seen (ns), for the loop breaker.
    bodies: HashMap<u64, VecDeque<u64>>,
}

impl Window {
    fn bucket(&mut self, index: u64) -> &mut Counts {
        if self.buckets.back().is_none_or(|(i, _)| *i < index) {
            self.buckets.push_back((index, Counts::default()));
        }
        // Late events (per-CPU ordering) join the newest bucket; there is one now.
        let newest = self.buckets.len() - 1;
        &mut self.buckets[newest].1
    }

    fn totals(&mut self, oldest: u64, since_ns: u64) -> Counts {
        while self.buckets.front().is_some_and(|(i, _)| *i < oldest) {
            self.buckets.pop_front();
        }
        self.bodies.retain(|_, times| {
            while times.front().is_some_and(|t| *t < since_ns) {
                times.pop_front();
            }
            !times.is_empty()
        });
        self.buckets.iter().fold(Counts::default(), |a, (_, c)| Counts {
            requests: a.requests + c.requests,
            retries: a.retries + c.retries,
            errors: a.errors + c.errors,
            cost_pico: a.cost_pico.saturating_add(c.cost_pico),
        })
    }

    fn see_body(&mut self, hash: u64, at_ns: u64) {
        if self.bodies.len() >= MAX_HASHES && !self.bodies.contains_key(&hash) {
            return;
        }
        self.bodies.entry(hash).or_default().push_back(at_ns);
    }
}

pub struct Engine {
    policies: Vec<PolicyConfig>,
    windows: HashMap<(usize, ScopeKey), Window>,
    /// Per fleet-budget policy: what Prometheus last said.
    remote: HashMap<usize, RemoteSpend>,
}

impl Engine {
    pub fn new(policies: Vec<PolicyConfig>) -> Self {
        Self { policies, windows: HashMap::new(), remote: HashMap::new() }
    }

    /// The fleet's spend for policy `i`, as the next decisions are to see it.
    pub fn set_remote(&mut self, i: usize, remote: RemoteSpend) {
        self.remote.insert(i, remote);
    }

    pub fn remote(&self, i: usize) -> RemoteSpend {
        self.remote.get(&i).copied().unwrap_or_default()
    }

    pub fn policies(&self) -> &[PolicyConfig] {
        &self.policies
    }

    pub fn key(&self, policy: usize, subject: &Subject) -> ScopeKey {
        match self.policies.get(policy).map(|p| p.scope) {
            Some(Scope::Cgroup) if !subject.cgroup.is_empty() => ScopeKey::Cgroup(subject.cgroup.clone()),
            Some(Scope::Agent) => ScopeKey::Agent(subject.agent.clone()),
            _ => ScopeKey::Process(subject.tgid),
        }
    }

    fn matching<'a>(&'a self, subject: &'a Subject) -> impl Iterator<Item = usize> + 'a {
        self.policies.iter().enumerate().filter(|(_, p)| p.applies_to(&subject.agent)).map(|(i, _)| i)
    }

    /// Whether any policy for this agent holds its requests for checking.
    pub fn gates(&self, agent: &str) -> bool {
        self.policies.iter().any(|p| p.gate && p.applies_to(agent))
    }

    /// Counts a finished call; returns the limits it makes crossed.
    pub fn on_call(&mut self, subject: &Subject, facts: CallFacts) -> Vec<Violation> {
        let mut out = Vec::new();
        for i in self.matching(subject).collect::<Vec<_>>() {
            let key = self.key(i, subject);
            let gate = self.policies[i].gate;
            let (width, window) = (bucket_ns(&self.policies[i]), self.windows.entry((i, key.clone())).or_default());
            let counts = window.bucket(facts.at_ns / width);
            // Gated requests were counted when released.
            if !gate {
                counts.requests += 1;
            }
            counts.retries += u64::from(facts.retry);
            counts.errors += u64::from(facts.error);
            counts.cost_pico = counts.cost_pico.saturating_add(facts.cost_pico);
            if !gate {
                window.see_body(facts.body_hash, facts.at_ns);
            }
            if let Some(v) = self.over(i, &key, facts.at_ns, None) {
                out.push(v);
            }
        }
        out
    }

    /// Checks a held request against the gated policies; counts it when it passes.
    pub fn on_request(&mut self, subject: &Subject, facts: &RequestFacts) -> Option<Violation> {
        let gated: Vec<usize> = self.matching(subject).filter(|&i| self.policies[i].gate).collect();
        for &i in &gated {
            let key = self.key(i, subject);
            let p = &self.policies[i];
            let violation = |limit, observed: u64, allowed: u64| Violation {
                policy: i,
                key: key.clone(),
                limit,
                observed: observed as f64,
                allowed: allowed as f64,
            };
            if let Some(max) = p.max_input_tokens.filter(|max| facts.input_tokens > *max) {
                return Some(violation("max_input_tokens", facts.input_tokens, max));
            }
            if let (Some(allowed), Some(model)) = (&p.allowed_models, &facts.model)
                && !allowed.allows(model)
            {
                return Some(Violation { limit: "allowed_models", ..violation("allowed_models", 0, 0) });
            }
            if let Some(v) = self.over(i, &key, facts.at_ns, Some(facts)) {
                return Some(v);
            }
        }
        for &i in &gated {
            let key = self.key(i, subject);
            let width = bucket_ns(&self.policies[i]);
            let window = self.windows.entry((i, key)).or_default();
            window.bucket(facts.at_ns / width).requests += u64::from(facts.new_request);
            if let Some(hash) = facts.body_hash {
                window.see_body(hash, facts.at_ns);
            }
        }
        None
    }

    /// The first limit of policy `i` exceeded for `key` at `now_ns`; with `next`,
    /// counting that request as if it were sent.
    fn over(&mut self, i: usize, key: &ScopeKey, now_ns: u64, next: Option<&RequestFacts>) -> Option<Violation> {
        let p = &self.policies[i];
        let (t, window) = window_totals(&mut self.windows, p, i, key, now_ns);
        let extra = |b: bool| u64::from(next.is_some() && b);
        let identical = match (next.and_then(|n| n.body_hash), p.max_identical_requests) {
            (Some(hash), Some(_)) => window.bodies.get(&hash).map_or(0, |v| v.len() as u64) + 1,
            _ => window.bodies.values().map(|v| v.len() as u64).max().unwrap_or(0),
        };
        let count_limits = [
            ("max_retries", p.max_retries, t.retries + extra(next.is_some_and(|n| n.retry))),
            ("max_requests", p.max_requests, t.requests + extra(next.is_some_and(|n| n.new_request))),
            ("max_errors", p.max_errors, t.errors),
            ("max_identical_requests", p.max_identical_requests, identical),
        ];
        for (limit, max, observed) in count_limits {
            if let Some(max) = max.filter(|max| observed > *max) {
                return Some(Violation { policy: i, key: key.clone(), limit, observed: observed as f64, allowed: max as f64 });
            }
        }
        let (spent, exhausted) = effective_spend(t.cost_pico, self.remote.get(&i).copied().unwrap_or_default());
        // A budget is spent once reached: the next request would go past it.
        let budget_over = |max: f64| exhausted || if next.is_some() { spent >= max } else { spent > max };
        if let Some(max) = p.max_cost_usd.map(|m| m.0).filter(|m| budget_over(*m)) {
            return Some(Violation { policy: i, key: key.clone(), limit: "max_cost_usd", observed: spent, allowed: max });
        }
        None
    }

    /// USD spent in policy `i`'s window for `key` at `now_ns`.
    pub fn spent(&mut self, i: usize, key: &ScopeKey, now_ns: u64) -> f64 {
        let Some(p) = self.policies.get(i) else { return 0.0 };
        let remote = self.remote.get(&i).copied().unwrap_or_default();
        effective_spend(window_totals(&mut self.windows, p, i, key, now_ns).0.cost_pico, remote).0
    }

    /// The first window limit of policy `i` that `key` is over at `now_ns`.
    pub fn violation(&mut self, i: usize, key: &ScopeKey, now_ns: u64) -> Option<Violation> {
        self.over(i, key, now_ns, None)
    }

    /// Whether policy `i` is still over a window limit for `key` at `now_ns`.
    pub fn still_over(&mut self, i: usize, key: &ScopeKey, now_ns: u64) -> bool {
        self.over(i, key, now_ns, None).is_some()
    }
}

/// USD a budget counts as spent, and whether it counts as spent whatever the sum
/// (fleet spend unknown, failing closed). A fresh fleet answer already includes
/// this host's spend, only later: the larger of the two is the best estimate.
fn effective_spend(local_pico: u128, remote: RemoteSpend) -> (f64, bool) {
    let local = local_pico as f64 / 1e12;
    match remote {
        RemoteSpend::LocalOnly => (local, false),
        RemoteSpend::Fleet(fleet) => (local.max(fleet), false),
        RemoteSpend::Exhausted => (local, true),
    }
}

/// Policy `i`'s counts for `key` over its window ending at `now_ns`, and the window.
fn window_totals<'a>(
    windows: &'a mut HashMap<(usize, ScopeKey), Window>,
    p: &PolicyConfig,
    i: usize,
    key: &ScopeKey,
    now_ns: u64,
) -> (Counts, &'a Window) {
    let width = bucket_ns(p);
    let oldest = (now_ns / width).saturating_sub(BUCKETS - 1);
    let since = now_ns.saturating_sub(p.window.as_nanos().min(u128::from(u64::MAX)) as u64);
    let window = windows.entry((i, key.clone())).or_default();
    (window.totals(oldest, since), window)
}

fn bucket_ns(p: &PolicyConfig) -> u64 {
    let window = p.window.as_nanos().min(u128::from(u64::MAX)) as u64;
    (window / BUCKETS).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn engine(toml: &str) -> Engine {
        #[derive(serde::Deserialize)]
        struct File {
            policies: Vec<PolicyConfig>,
        }
        Engine::new(toml::from_str::<File>(toml).expect("policies").policies)
    }

    fn bot(tgid: u32) -> Subject {
        Subject { tgid, agent: "bot".into(), cgroup: "/c".into() }
    }

    #[test]
    fn retries_past_the_cap_are_a_violation_and_age_out() {
        let mut e = engine("[[policies]]\nname = \"r\"\nagent = \"bot\"\nmax_retries = 2\nwindow = \"60s\"\naction = \"kill\"\n");
        let retry = CallFacts { at_ns: S, retry: true, ..Default::default() };
        assert!(e.on_call(&bot(1), retry).is_empty());
        assert!(e.on_call(&bot(1), retry).is_empty());
        let v = e.on_call(&bot(1), retry);
        assert_eq!(v.first().map(|v| (v.limit, v.observed, v.allowed)), Some(("max_retries", 3.0, 2.0)));
        assert!(e.on_call(&bot(2), retry).is_empty(), "process scope: another process counts apart");
        assert!(e.still_over(0, &ScopeKey::Process(1), 30 * S));
        assert!(!e.still_over(0, &ScopeKey::Process(1), 70 * S), "the window moved on");
        assert!(e.on_call(&Subject { agent: "other".into(), ..bot(1) }, retry).is_empty());
    }

    #[test]
    fn a_gated_request_is_checked_before_it_is_sent() {
        let mut e = engine(
            "[[policies]]\nname = \"g\"\nagent = \"*\"\nmax_retries = 2\nmax_input_tokens = 100\nallowed_models = [\"gpt-4o-mini\"]\nmax_identical_requests = 2\naction = \"kill\"\ngate = true\n",
        );
        let ok = RequestFacts { at_ns: S, model: Some("gpt-4o-mini".into()), input_tokens: 50, body_hash: Some(7), retry: false, new_request: true };
        assert_eq!(e.on_request(&bot(1), &ok), None);
        let big = RequestFacts { input_tokens: 101, ..ok.clone() };
        assert_eq!(e.on_request(&bot(1), &big).map(|v| v.limit), Some("max_input_tokens"));
        let other = RequestFacts { model: Some("gpt-4o".into()), ..ok.clone() };
        assert_eq!(e.on_request(&bot(1), &other).map(|v| v.limit), Some("allowed_models"));
        assert_eq!(e.on_request(&bot(1), &ok), None, "second identical body");
        assert_eq!(e.on_request(&bot(1), &ok).map(|v| v.limit), Some("max_identical_requests"));
        // Two failed retries so far: a third retry would cross max_retries = 2.
        let failed_retry = CallFacts { at_ns: S, retry: true, error: true, ..Default::default() };
        e.on_call(&bot(1), failed_retry);
        e.on_call(&bot(1), failed_retry);
        let retry = RequestFacts { retry: true, body_hash: Some(8), ..ok.clone() };
        assert_eq!(e.on_request(&bot(1), &retry).map(|v| (v.limit, v.observed)), Some(("max_retries", 3.0)));
        assert_eq!(e.on_request(&bot(1), &RequestFacts { body_hash: Some(9), ..ok }), None, "a fresh request may go");
    }

    #[test]
    fn a_spent_budget_stops_the_next_request() {
        let mut e = engine("[[policies]]\nname = \"b\"\nagent = \"bot\"\nscope = \"agent\"\nmax_cost_usd = 0.01\nwindow = \"30d\"\naction = \"kill\"\ngate = true\n");
        let request = RequestFacts { at_ns: S, ..Default::default() };
        assert_eq!(e.on_request(&bot(1), &request), None);
        assert!(e.on_call(&bot(1), CallFacts { at_ns: S, cost_pico: 6_000_000_000, ..Default::default() }).is_empty());
        assert_eq!(e.on_request(&bot(2), &request), None, "half the budget left, in any process of the agent");
        assert!(e.on_call(&bot(2), CallFacts { at_ns: S, cost_pico: 6_000_000_000, ..Default::default() }).len() == 1);
        assert_eq!(e.on_request(&bot(3), &request).map(|v| v.limit), Some("max_cost_usd"));
    }

    const FLEET: &str = "[[policies]]\nname = \"f\"\nagent = \"bot\"\nscope = \"agent\"\nmax_cost_usd = 1.0\nwindow = \"24h\"\naction = \"kill\"\ngate = true\nspend_source = \"prometheus\"\n[policies.prometheus]\nurl = \"http://127.0.0.1:9\"\nquery = \"x\"\n";

    #[test]
    fn a_fleet_budget_takes_the_larger_of_fleet_and_local_spend() {
        let mut e = engine(FLEET);
        let request = RequestFacts { at_ns: S, ..Default::default() };
        let key = ScopeKey::Agent("bot".into());
        e.set_remote(0, RemoteSpend::Fleet(0.4));
        assert_eq!(e.on_request(&bot(1), &request), None, "the fleet has spent 0.4 of 1.0");
        assert!((e.spent(0, &key, S) - 0.4).abs() < 1e-12);
        e.set_remote(0, RemoteSpend::Fleet(1.0));
        let v = e.on_request(&bot(1), &request);
        assert_eq!(v.map(|v| (v.limit, v.observed, v.allowed)), Some(("max_cost_usd", 1.0, 1.0)), "reached by the fleet");
        // The fleet's answer lags this host's own spend: the local count is the floor.
        e.set_remote(0, RemoteSpend::Fleet(0.0));
        assert!(e.on_call(&bot(1), CallFacts { at_ns: S, cost_pico: 1_500_000_000_000, ..Default::default() }).len() == 1);
        assert!((e.spent(0, &key, S) - 1.5).abs() < 1e-12);
        assert!(e.still_over(0, &key, 2 * S));
    }

    #[test]
    fn an_unknown_fleet_spend_falls_back_to_local_or_counts_as_spent() {
        let mut e = engine(FLEET);
        let request = RequestFacts { at_ns: S, ..Default::default() };
        let key = ScopeKey::Agent("bot".into());
        e.set_remote(0, RemoteSpend::LocalOnly);
        assert_eq!(e.on_request(&bot(1), &request), None, "open: the local count, nothing spent");
        assert!(!e.still_over(0, &key, S));
        e.set_remote(0, RemoteSpend::Exhausted);
        assert_eq!(e.on_request(&bot(1), &request).map(|v| v.limit), Some("max_cost_usd"), "closed: spent");
        assert!(e.still_over(0, &key, S), "armed processes stay blocked while it is unknown");
        e.set_remote(0, RemoteSpend::Fleet(0.1));
        assert!(!e.still_over(0, &key, S), "and are let go once Prometheus answers below the budget");
    }
}
