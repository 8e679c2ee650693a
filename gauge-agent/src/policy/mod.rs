//! Policy: behavioural guardrails. The synchronous core (`engine`, `held`, and the
//! stage here) turns finished calls, held requests and kernel stops into
//! [`Command`]s; `executor` carries them out (signals, cgroups, the kernel's maps)
//! and undoes them when their time comes, the agent stops or the config reloads.
//!
//! How money is stopped before it is spent: a process over a limit is marked BLOCK in
//! the kernel, which signals it at its next LLM request's `SSL_write`, before the
//! bytes leave. With `gate = true`, every LLM request of the agent is held (stopped)
//! at `SSL_write` until this stage has checked it: limits reached by earlier
//! responses, context ceiling, model, loop breaker. Held requests are decided in
//! event order, so concurrent requests cannot slip past a limit together.

pub mod cgroup;
pub mod config;
pub mod engine;
pub mod executor;
pub mod held;
pub mod remote;

use std::{collections::HashMap, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use self::{
    config::{Action, EnforcementConfig, OnError, PolicyConfig, SpendSource},
    engine::{CallFacts, Engine, RemoteSpend, RequestFacts, ScopeKey, Subject, Violation},
    held::{HeldRequests, HeldWrite},
    remote::{FleetBudgets, Judged},
};
use crate::{attribution::process::ProcessInfo, pipeline::Finished};

pub const SIGKILL: u32 = 9;
pub const SIGTERM: u32 = 15;
pub const SIGCONT: u32 = 18;
pub const SIGSTOP: u32 = 19;

/// What the executor is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Hold this process's LLM requests for checking (kernel GATE).
    Gate { tgid: u32 },
    /// Signal this process at its next LLM request (kernel BLOCK).
    Block { tgid: u32, signal: u32, gate: bool },
    /// Back to the process's normal state: gated or nothing.
    Unblock { tgid: u32, gate: bool },
    /// Every write on this connection is an LLM request's.
    MarkLlm { tgid: u32, connection: u64 },
    /// Send a signal, now or later.
    Signal { pid: u32, signal: u32, after: Duration },
    /// Freeze the process's cgroup; thaw after `cooldown`.
    Freeze { pid: u32, cooldown: Duration },
    /// Limit the process's cgroup to `share` of a CPU; restore after `cooldown`.
    Throttle { pid: u32, share: f64, cooldown: Duration },
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    agent: String,
    policy: String,
    action: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViolationLabels {
    agent: String,
    policy: String,
    limit: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HeldLabels {
    agent: String,
    decision: &'static str,
}

/// Never acted on: PID 1, kernel threads, the agent and its parent, and what the
/// config protects.
#[derive(Debug, Clone)]
pub struct Guard {
    pub self_pid: u32,
    pub parent_pid: u32,
    pub config: EnforcementConfig,
}

impl Guard {
    pub fn protects(&self, p: &ProcessInfo) -> Option<&'static str> {
        let protect = &self.config.protect;
        if p.tgid <= 1 {
            Some("PID 1 is never acted on")
        } else if p.tgid == 2 || p.ppid == 2 {
            Some("kernel threads are never acted on")
        } else if p.namespace_init {
            Some("a container's PID 1 is never acted on")
        } else if p.tgid == self.self_pid || p.tgid == self.parent_pid {
            Some("the agent and its parent are never acted on")
        } else if protect.comm.contains(&p.comm) || protect.exe.contains(&p.exe) {
            Some("protected by [enforcement.protect]")
        } else if protect.cgroup.iter().any(|re| re.is_match(&p.cgroup)) {
            Some("protected by [enforcement.protect] cgroup")
        } else {
            None
        }
    }
}

/// A limit crossed, remembered per process until the window clears it.
#[derive(Debug, Clone)]
struct Armed {
    violation: Violation,
    agent: String,
}

pub struct PolicyStage {
    engine: Engine,
    held: HeldRequests,
    guard: Guard,
    /// Processes marked BLOCK in the kernel, and why.
    armed: HashMap<u32, Armed>,
    /// Processes known, with their agent (for agent and cgroup scopes).
    known: HashMap<u32, Subject>,
    /// Connections marked as LLM traffic in the kernel.
    marked: std::collections::HashSet<(u32, u64)>,
    /// The connection whose blocked request was last acted on, per process, until
    /// a call on it finishes.
    acted_on: HashMap<u32, u64>,
    commands: Vec<Command>,
    /// Fleet budgets' fetchers, and what each policy last judged (for logging the
    /// changes only).
    fleet: FleetBudgets,
    fleet_seen: HashMap<usize, Judged>,
    actions: Family<ActionLabels, Counter>,
    violations: Family<ViolationLabels, Counter>,
    held_requests: Family<HeldLabels, Counter>,
}

impl PolicyStage {
    pub fn register(policies: Vec<PolicyConfig>, guard: Guard, registry: &mut Registry) -> Self {
        let stage = Self {
            engine: Engine::new(policies),
            held: HeldRequests::default(),
            guard,
            armed: HashMap::new(),
            known: HashMap::new(),
            marked: Default::default(),
            acted_on: HashMap::new(),
            commands: Vec::new(),
            fleet: FleetBudgets::register(registry),
            fleet_seen: HashMap::new(),
            actions: Family::default(),
            violations: Family::default(),
            held_requests: Family::default(),
        };
        registry.register("gauge_policy_actions", "Actions taken by policies (not in dry-run).", stage.actions.clone());
        registry.register("gauge_policy_violations", "Limits crossed, dry-run included.", stage.violations.clone());
        registry.register(
            "gauge_policy_held_requests",
            "LLM requests held at SSL_write for checking, by decision (released, stopped).",
            stage.held_requests.clone(),
        );
        stage
    }

    /// New policies (config reload); counts start afresh.
    pub fn reload(&mut self, policies: Vec<PolicyConfig>, enforcement: EnforcementConfig) {
        self.fleet.sync(&policies);
        self.fleet_seen.clear();
        self.engine = Engine::new(policies);
        self.guard.config = enforcement;
        self.armed.clear();
        self.held = HeldRequests::default();
        let known: Vec<Subject> = self.known.values().cloned().collect();
        self.known.clear();
        for subject in known {
            self.remember(subject, None);
        }
    }

    /// Starts asking Prometheus for the fleet budgets' spend, now and after each
    /// reload (the daemon only: replay and tests count locally). `clock` is the
    /// events' clock, CLOCK_MONOTONIC ns.
    pub fn start_fleet_budgets(&mut self, clock: fn() -> u64) {
        self.fleet.start(clock, self.engine.policies());
    }

    /// Tells the engine what each fleet budget's fetcher has at `now_ns`: a fresh
    /// fleet spend, or, without one, the local count (`on_error = "open"`, before
    /// the first answer, or no fetcher) or a spent budget (`"closed"`).
    fn refresh_fleet(&mut self, now_ns: u64) {
        let mut remotes = Vec::new();
        for (i, p) in self.engine.policies().iter().enumerate() {
            let Some(prometheus) = p.prometheus.as_ref().filter(|_| p.spend_source == SpendSource::Prometheus) else { continue };
            let Some(judged) = self.fleet.judge(&p.name, now_ns) else { continue };
            let remote = match judged {
                Judged::Fresh(usd) => RemoteSpend::Fleet(usd),
                Judged::Pending => RemoteSpend::LocalOnly,
                Judged::Unusable(_) if prometheus.on_error == OnError::Open => RemoteSpend::LocalOnly,
                Judged::Unusable(_) => RemoteSpend::Exhausted,
            };
            // Logged when it changes kind (fresh, pending, unusable for a reason),
            // not at every decision nor for every new value.
            let kind = |j: &Judged| match j {
                Judged::Fresh(_) => None,
                Judged::Pending => Some(""),
                Judged::Unusable(reason) => Some(*reason),
            };
            if self.fleet_seen.get(&i).map(kind) != Some(kind(&judged)) {
                match judged {
                    Judged::Fresh(usd) => tracing::info!(policy = %p.name, fleet_usd = usd, "fleet budget: spend from Prometheus"),
                    Judged::Pending => {}
                    Judged::Unusable(reason) if remote == RemoteSpend::Exhausted => tracing::warn!(
                        policy = %p.name, agent = %p.agent, reason,
                        "fleet budget: no usable answer from Prometheus; on_error = \"closed\": the budget counts as spent and the agent's LLM requests are stopped"
                    ),
                    Judged::Unusable(reason) => tracing::warn!(
                        policy = %p.name, agent = %p.agent, reason,
                        "fleet budget: no usable answer from Prometheus; on_error = \"open\": only this host's spend counts"
                    ),
                }
                self.fleet_seen.insert(i, judged);
            }
            remotes.push((i, remote));
        }
        for (i, remote) in remotes {
            self.engine.set_remote(i, remote);
        }
    }

    /// Whether any policy is configured (else the stage does nothing).
    pub fn active(&self) -> bool {
        !self.engine.policies().is_empty()
    }

    pub fn take_commands(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.commands)
    }

    fn dry_run(&self, policy: &PolicyConfig) -> bool {
        policy.dry_run || self.guard.config.dry_run
    }

    /// A process seen for the first time (or executing a new program).
    pub fn on_process(&mut self, subject: Subject, info: &ProcessInfo) {
        self.remember(subject, Some(info));
    }

    fn remember(&mut self, subject: Subject, info: Option<&ProcessInfo>) {
        if info.is_some_and(|p| self.guard.protects(p).is_some()) || self.engine.policies().is_empty() {
            self.known.remove(&subject.tgid);
            return;
        }
        // Dry-run policies hold requests too (and always release them), so that they
        // count exactly what the real policy would act on.
        if self.engine.gates(&subject.agent) {
            self.commands.push(Command::Gate { tgid: subject.tgid });
        }
        self.known.insert(subject.tgid, subject);
    }

    /// Forgets the processes that are gone (`alive` says which are not), so that a
    /// long-running agent does not grow with every process it ever saw.
    pub fn forget_gone(&mut self, alive: impl Fn(u32) -> bool) {
        self.known.retain(|tgid, _| alive(*tgid));
        self.armed.retain(|tgid, _| alive(*tgid));
        self.acted_on.retain(|tgid, _| alive(*tgid));
        self.marked.retain(|(tgid, _)| alive(*tgid));
    }

    /// A finished call: count it; arm the kernel against the processes now over a limit.
    pub fn on_finished(&mut self, done: &Finished, subject: &Subject) {
        if !self.known.contains_key(&subject.tgid) {
            return;
        }
        // Its connection carries LLM calls: the probes hold or block every later
        // request on it, whatever its protocol (HTTP/2 writes have no request line).
        let connection = (subject.tgid, done.metered.origin.connection);
        if self.acted_on.get(&connection.0) == Some(&connection.1) {
            self.acted_on.remove(&connection.0);
        }
        if self.marked.len() >= 65536 {
            self.marked.clear();
        }
        if self.marked.insert(connection) {
            self.commands.push(Command::MarkLlm { tgid: connection.0, connection: connection.1 });
        }
        self.refresh_fleet(done.metered.call.end_ns);
        let call = &done.metered.call;
        let facts = CallFacts {
            at_ns: call.end_ns,
            retry: call.retry_count.is_some_and(|n| n > 0),
            error: call.status.is_none_or(|s| s >= 400),
            cost_pico: done.cost.map_or(0, |c| c.pico_usd),
            body_hash: call.body_hash,
        };
        for violation in self.engine.on_call(subject, facts) {
            let policy = self.engine.policies()[violation.policy].clone();
            self.arm(&policy, subject, violation);
        }
    }

    /// A limit crossed outside a held request: counted, logged, and (unless dry-run
    /// or alert-only) the processes in scope are armed in the kernel.
    fn arm(&mut self, policy: &PolicyConfig, subject: &Subject, violation: Violation) {
        self.count_violation(policy.name.clone(), &subject.agent, violation.limit);
        log_violation(policy, &subject.agent, subject.tgid, &violation, self.dry_run(policy));
        if self.dry_run(policy) || policy.action == Action::Alert {
            return;
        }
        let signal = if policy.action == Action::Kill { SIGKILL } else { SIGSTOP };
        let gate = self.engine.gates(&subject.agent);
        for tgid in self.in_scope(&violation.key) {
            self.commands.push(Command::Block { tgid, signal, gate });
            self.armed.insert(tgid, Armed { violation: violation.clone(), agent: subject.agent.clone() });
        }
    }

    /// Processes a scope key covers.
    fn in_scope(&self, key: &ScopeKey) -> Vec<u32> {
        self.known
            .values()
            .filter(|s| match key {
                ScopeKey::Process(tgid) => s.tgid == *tgid,
                ScopeKey::Cgroup(cgroup) => s.cgroup == *cgroup,
                ScopeKey::Agent(agent) => s.agent == *agent,
            })
            .map(|s| s.tgid)
            .collect()
    }

    /// A chunk of a held request; the process is stopped until decided.
    pub fn on_held(&mut self, subject: &Subject, at_ns: u64, connection: u64, call_len: u32, offset: u32, bytes: &[u8]) {
        let Some(write) = self.held.feed(subject.tgid, connection, call_len, offset, bytes) else { return };
        let decision = self.decide(subject, at_ns, &write);
        self.held_requests
            .get_or_create(&HeldLabels { agent: subject.agent.clone(), decision: if decision { "released" } else { "stopped" } })
            .inc();
    }

    /// Returns whether the request was released.
    fn decide(&mut self, subject: &Subject, at_ns: u64, write: &HeldWrite) -> bool {
        self.refresh_fleet(at_ns);
        if write.llm && self.marked.insert((write.tgid, write.connection)) {
            self.commands.push(Command::MarkLlm { tgid: write.tgid, connection: write.connection });
        }
        let facts = RequestFacts {
            at_ns,
            model: write.model.clone(),
            input_tokens: write.input_tokens,
            body_hash: write.body_hash,
            retry: write.retry,
            new_request: write.new_request,
        };
        // Armed since (a limit or an anomaly) but held before the kernel map was set.
        if let Some(armed) = self.armed.get(&subject.tgid).cloned()
            && let Some(policy) = self.engine.policies().get(armed.violation.policy).cloned()
        {
            self.act(&policy, &subject.agent, subject.tgid, true);
            return false;
        }
        let violation = self.engine.on_request(subject, &facts);
        let Some(violation) = violation else {
            self.commands.push(Command::Signal { pid: subject.tgid, signal: SIGCONT, after: Duration::ZERO });
            return true;
        };
        let policy = self.engine.policies()[violation.policy].clone();
        self.count_violation(policy.name.clone(), &subject.agent, violation.limit);
        let dry = self.dry_run(&policy);
        log_violation(&policy, &subject.agent, subject.tgid, &violation, dry);
        if dry {
            self.commands.push(Command::Signal { pid: subject.tgid, signal: SIGCONT, after: Duration::ZERO });
            return true;
        }
        self.act(&policy, &subject.agent, subject.tgid, true);
        false
    }

    /// The kernel signalled an armed process at an LLM request's write on
    /// `connection`. A request is often several writes (head, then body); once acted
    /// on, its later writes only continue.
    pub fn on_stopped(&mut self, tgid: u32, connection: u64, signal: u32) {
        if self.acted_on.get(&tgid) == Some(&connection) {
            if signal == SIGSTOP {
                self.commands.push(Command::Signal { pid: tgid, signal: SIGCONT, after: Duration::ZERO });
            }
            return;
        }
        let Some(armed) = self.armed.get(&tgid).cloned() else {
            // Armed by an earlier config: never leave it stopped.
            if signal == SIGSTOP {
                self.commands.push(Command::Signal { pid: tgid, signal: SIGCONT, after: Duration::ZERO });
            }
            return;
        };
        let Some(policy) = self.engine.policies().get(armed.violation.policy).cloned() else { return };
        tracing::warn!(
            policy = %policy.name, agent = %armed.agent, pid = tgid, limit = armed.violation.limit,
            observed = armed.violation.observed, allowed = armed.violation.allowed,
            "LLM request stopped in the kernel before it was sent"
        );
        if self.acted_on.len() >= 16384 {
            self.acted_on.clear();
        }
        self.acted_on.insert(tgid, connection);
        self.act(&policy, &armed.agent, tgid, signal == SIGSTOP);
    }

    /// Applies `policy`'s action to a process; `stopped` when it is held stopped now.
    fn act(&mut self, policy: &PolicyConfig, agent: &str, pid: u32, stopped: bool) {
        let now = Duration::ZERO;
        let cont = Command::Signal { pid, signal: SIGCONT, after: now };
        let commands = match policy.action {
            Action::Alert => vec![cont],
            Action::Kill => vec![Command::Signal { pid, signal: SIGKILL, after: now }],
            Action::Pause => vec![Command::Signal { pid, signal: SIGCONT, after: policy.cooldown }],
            Action::Terminate => vec![
                Command::Signal { pid, signal: SIGTERM, after: now },
                cont,
                Command::Signal { pid, signal: SIGKILL, after: policy.grace },
            ],
            // The process resumes inside its frozen or throttled cgroup.
            Action::Freeze => vec![Command::Freeze { pid, cooldown: policy.cooldown }, cont],
            Action::Throttle => vec![Command::Throttle { pid, share: policy.cpu_share, cooldown: policy.cooldown }, cont],
        };
        let commands = commands.into_iter().filter(|c| stopped || !matches!(c, Command::Signal { signal: SIGCONT, .. }));
        self.commands.extend(commands);
        self.actions.get_or_create(&ActionLabels { agent: agent.to_owned(), policy: policy.name.clone(), action: policy.action.label() }).inc();
        tracing::warn!(policy = %policy.name, agent, pid, action = policy.action.label(), cooldown = ?policy.cooldown, "policy action");
    }

    /// An anomaly of `kind` for the subject's agent: policies triggered by it act
    /// like a crossed limit (the agent's processes are stopped at their next request).
    pub fn on_anomaly(&mut self, subject: &Subject, kind: &'static str, observed: f64, allowed: f64) {
        let triggered: Vec<usize> = self
            .engine
            .policies()
            .iter()
            .enumerate()
            .filter(|(_, p)| p.on_anomaly.as_deref() == Some(kind) && p.applies_to(&subject.agent))
            .map(|(i, _)| i)
            .collect();
        for i in triggered {
            let policy = self.engine.policies()[i].clone();
            let violation = Violation { policy: i, key: self.engine.key(i, subject), limit: kind, observed, allowed };
            self.arm(&policy, subject, violation);
        }
    }

    /// Budget policies of this subject: (policy, spent in its window, limit, window minutes).
    pub fn budgets(&mut self, subject: &Subject, now_ns: u64) -> Vec<(String, f64, f64, u64)> {
        self.refresh_fleet(now_ns);
        let budgets: Vec<(usize, String, f64, u64)> = self
            .engine
            .policies()
            .iter()
            .enumerate()
            .filter(|(_, p)| p.applies_to(&subject.agent))
            .filter_map(|(i, p)| p.max_cost_usd.map(|max| (i, p.name.clone(), max.0, p.window.as_secs() / 60)))
            .collect();
        budgets
            .into_iter()
            .map(|(i, name, max, window)| {
                let key = self.engine.key(i, subject);
                (name, self.engine.spent(i, &key, now_ns), max, window)
            })
            .collect()
    }

    /// Disarms processes whose limits the window (or the fleet) has cleared, and
    /// arms those a fleet budget now stops: Prometheus's answer changes without any
    /// call finishing here.
    pub fn tick(&mut self, now_ns: u64) {
        self.refresh_fleet(now_ns);
        let armed: Vec<(u32, Armed)> = self.armed.iter().map(|(t, a)| (*t, a.clone())).collect();
        for (tgid, a) in armed {
            if !self.engine.still_over(a.violation.policy, &a.violation.key, now_ns) {
                self.armed.remove(&tgid);
                self.commands.push(Command::Unblock { tgid, gate: self.engine.gates(&a.agent) });
                tracing::info!(pid = tgid, agent = %a.agent, limit = a.violation.limit, "limit cleared: LLM requests flow again");
            }
        }
        self.arm_fleet(now_ns);
    }

    /// Arms the known processes over a fleet budget. Alert-only and dry-run
    /// policies are left to count at the next request or call, as local budgets do
    /// (arming them here would count a violation every tick).
    fn arm_fleet(&mut self, now_ns: u64) {
        let fleet: Vec<usize> = (0..self.engine.policies().len()).filter(|&i| self.engine.remote(i) != RemoteSpend::LocalOnly).collect();
        for i in fleet {
            let policy = self.engine.policies()[i].clone();
            if self.dry_run(&policy) || policy.action == Action::Alert {
                continue;
            }
            let subjects: Vec<Subject> = self.known.values().filter(|s| policy.applies_to(&s.agent)).cloned().collect();
            for subject in subjects {
                if self.armed.contains_key(&subject.tgid) {
                    continue;
                }
                let key = self.engine.key(i, &subject);
                if let Some(violation) = self.engine.violation(i, &key, now_ns) {
                    self.arm(&policy, &subject, violation);
                }
            }
        }
    }

    fn count_violation(&self, policy: String, agent: &str, limit: &'static str) {
        self.violations.get_or_create(&ViolationLabels { agent: agent.to_owned(), policy, limit }).inc();
    }
}

fn log_violation(policy: &PolicyConfig, agent: &str, pid: u32, v: &Violation, dry_run: bool) {
    tracing::warn!(
        policy = %policy.name, agent, pid, limit = v.limit, observed = v.observed, allowed = v.allowed,
        action = policy.action.label(), dry_run, "policy limit crossed"
    );
}

#[cfg(test)]
mod tests;
