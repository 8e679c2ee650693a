//! The synchronous pipeline after capture: reassembly -> LLM calls -> attribution ->
//! metering (cost, outcomes) -> policy. Fed one [`CaptureEvent`] at a time by the
//! daemon, or by a replayed recording; policy decisions come out as [`Command`]s for
//! the daemon's executor.

use prometheus_client::registry::Registry;

use crate::{
    anomaly::{AnomalyStage, BudgetState},
    attribution::{Attribution, Attributor, process::ProcessSource},
    config::Config,
    llm::CallId,
    metering::{
        LlmMetrics, ReassemblyMetrics, RetryDetector,
        cardinality::LabelCaps,
        outcomes::Outcomes,
        prices::{Cost, PriceError, PriceTable},
    },
    reassembly::{Metered, Reassembler},
    policy::{Command, Guard, PolicyStage, engine::Subject},
    source::{CaptureEvent, Payload},
};

/// How long after a failed call a repeat of its body counts as a retry.
const RETRY_WINDOW_NS: u64 = 120 * 1_000_000_000;
const RETRY_MEMORY: usize = 65536;

/// A call the pipeline finished, with whom it was for and what it cost.
#[derive(Debug, Clone)]
pub struct Finished {
    pub metered: Metered,
    pub who: Attribution,
    pub cost: Option<Cost>,
}

impl Finished {
    /// The call's identity for logs (process, connection, exchange, start).
    pub fn call_id(&self) -> CallId {
        let (origin, call) = (&self.metered.origin, &self.metered.call);
        CallId { pid: origin.tgid, process_start: self.who.start_time, connection: origin.connection, exchange: call.exchange, start_ns: call.start_ns }
    }
}

pub struct Pipeline {
    reassembler: Reassembler,
    attributor: Attributor,
    retries: RetryDetector,
    llm: LlmMetrics,
    reassembly: ReassemblyMetrics,
    outcomes: Outcomes,
    anomaly: AnomalyStage,
    policy: PolicyStage,
    /// Event time of the last policy tick (limits clearing), at most one a second.
    last_tick_ns: u64,
    metered: Vec<Metered>,
    finished: Vec<Finished>,
}

impl Pipeline {
    /// `processes` tells who a pid is (`/proc` live; nothing on replay); `clock`
    /// gives CLOCK_MONOTONIC ns for the outcome window at scrape time.
    pub fn new(
        config: &Config,
        processes: Box<dyn ProcessSource>,
        clock: fn() -> u64,
        registry: &mut Registry,
    ) -> Result<Self, PriceError> {
        let caps = LabelCaps::register(config.labels.clone(), registry);
        // SAFETY: getpid/getppid have no preconditions.
        let (self_pid, parent_pid) = unsafe { (libc::getpid() as u32, libc::getppid() as u32) };
        let guard = Guard { self_pid, parent_pid, config: config.enforcement.clone() };
        let prices = PriceTable::with_overrides(config.prices.clone())?;
        Ok(Self {
            reassembler: Reassembler::new(config.reassembly_limits()),
            attributor: Attributor::new(config.attribution.clone(), config.agents.clone(), processes),
            retries: RetryDetector::new(RETRY_WINDOW_NS, RETRY_MEMORY),
            llm: LlmMetrics::register(registry, prices, caps.clone()),
            reassembly: ReassemblyMetrics::register(registry),
            outcomes: Outcomes::register(&config.outcomes, caps, clock, registry),
            anomaly: AnomalyStage::register(&config.anomaly, PriceTable::with_overrides(config.prices.clone())?, clock, registry),
            policy: PolicyStage::register(config.policies.clone(), guard, registry),
            last_tick_ns: 0,
            metered: Vec::new(),
            finished: Vec::new(),
        })
    }

    /// Where outcome reports go (the listener's `POST /v1/outcomes`).
    pub fn outcomes(&self) -> Outcomes {
        self.outcomes.clone()
    }

    /// Policy decisions made since last asked, for the executor.
    pub fn take_commands(&mut self) -> Vec<Command> {
        self.policy.take_commands()
    }

    /// Forgets policy state of processes that are gone (`alive` says which live).
    /// Forgets processes that are gone (`alive` says which live); their open
    /// connections end as if closed. Returns the calls that ended so.
    pub fn forget_gone(&mut self, alive: impl Fn(u32) -> bool) -> &[Finished] {
        self.metered.clear();
        self.finished.clear();
        self.reassembler.end_gone(&alive, &mut self.metered);
        self.policy.forget_gone(alive);
        self.finish_metered();
        &self.finished
    }

    /// Starts asking Prometheus for fleet budgets' spend (`spend_source =
    /// "prometheus"`), now and after each reload; `clock` is CLOCK_MONOTONIC ns. The
    /// daemon only: replay and tests count locally.
    pub fn start_fleet_budgets(&mut self, clock: fn() -> u64) {
        self.policy.start_fleet_budgets(clock);
    }

    /// Policy housekeeping between events (at `now_ns`, CLOCK_MONOTONIC): limits
    /// cleared, and fleet budgets crossed by other hosts' spend.
    pub fn tick(&mut self, now_ns: u64) {
        if self.policy.active() {
            self.policy.tick(now_ns);
        }
    }

    /// A reloaded config's agents and policies; the rest needs a restart.
    pub fn reload(&mut self, config: &Config) {
        self.attributor.set_rules(config.agents.clone());
        self.policy.reload(config.policies.clone(), config.enforcement.clone());
    }

    fn subject(&mut self, tgid: u32, comm: &str) -> (Subject, crate::attribution::process::ProcessInfo) {
        let (info, agent) = self.attributor.process_agent(tgid, comm);
        (Subject { tgid, agent, cgroup: info.cgroup.clone() }, info)
    }

    /// Feeds one event; returns the calls it finished (for logs and tests).
    pub fn feed(&mut self, event: &CaptureEvent) -> &[Finished] {
        if self.attributor.observe(event) && self.policy.active() {
            let (subject, info) = self.subject(event.tgid, &event.comm);
            self.policy.on_process(subject, &info);
        }
        match &event.payload {
            Payload::Held { connection, call_len, offset, bytes } => {
                let (subject, _) = self.subject(event.tgid, &event.comm);
                self.policy.on_held(&subject, event.timestamp_ns, *connection, *call_len, *offset, bytes);
            }
            Payload::Stopped { connection, signal } => self.policy.on_stopped(event.tgid, *connection, *signal),
            _ => {}
        }
        if event.timestamp_ns >= self.last_tick_ns.saturating_add(1_000_000_000) {
            self.last_tick_ns = event.timestamp_ns;
            self.policy.tick(event.timestamp_ns);
        }
        self.metered.clear();
        self.finished.clear();
        self.reassembler.feed(event, &mut self.metered);
        self.finish_metered();
        &self.finished
    }

    /// Attributes, meters and checks the calls reassembly finished (in `metered`).
    fn finish_metered(&mut self) {
        // Taken out and put back, so the stages can be borrowed and the buffer kept.
        let mut ended = std::mem::take(&mut self.metered);
        for metered in ended.drain(..) {
            let who = self.attributor.attribute(&metered);
            let labels = self.llm.labels(&metered.call, &who);
            self.llm.describe_container(&labels, &who);
            let retry = self.retries.observe(&metered);
            let cost = self.llm.record(&metered, &labels, retry);
            if let Some(cost) = cost {
                self.outcomes.add_cost(&labels.agent, metered.call.end_ns, cost);
            }
            let done = Finished { metered, who, cost };
            let findings = self.anomaly.observe(&done, &labels.agent);
            if self.policy.active() {
                let subject = Subject {
                    tgid: done.who.pid,
                    agent: done.who.agent.clone(),
                    cgroup: self.attributor.cgroup_of(done.who.pid),
                };
                self.policy.on_finished(&done, &subject);
                for f in &findings {
                    self.policy.on_anomaly(&subject, f.kind.label(), f.observed, f.threshold);
                }
                for (policy, spent, max, window_minutes) in self.policy.budgets(&subject, done.metered.call.end_ns) {
                    self.anomaly.set_budget(&labels.agent, &policy, BudgetState { spent, max, window_minutes });
                }
            }
            self.finished.push(done);
        }
        self.metered = ended;
        self.reassembly.update(self.reassembler.drops(), self.reassembler.open_connections(), self.reassembler.buffered_bytes());
    }
}
