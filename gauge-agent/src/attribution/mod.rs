//! Attribution: who made a call (process, container, agent) and for what (workflow,
//! customer). Sits between reassembly and metering: it watches every event to read
//! a process while it is alive, and labels each finished call.

pub mod container;
pub mod process;
pub mod rules;

use serde::Deserialize;

use self::{
    container::Container,
    process::{ProcessInfo, ProcessSource, ProcessTable},
    rules::{AgentResolver, AgentRule, ValueRule, map_value},
};
use crate::{
    llm::RequestContext,
    reassembly::Metered,
    source::{CaptureEvent, Payload},
};

/// How deep the parent chain is followed for an inherited agent.
const MAX_ANCESTORS: usize = 8;

/// `[attribution]`: where workflow and customer come from, and agent defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttributionConfig {
    /// An environment variable that names a process's agent when no rule does; ""
    /// to ignore it.
    pub agent_env: String,
    /// Name the agent of coding agents that announce themselves in their headers.
    pub known_clients: bool,
    /// Processes remembered (oldest and exited ones are forgotten first).
    pub max_processes: usize,
    /// Where the host's `/` is: `/proc` and the container runtimes' metadata are
    /// read under it (e.g. "/host" when the agent runs in a container).
    pub host_root: std::path::PathBuf,
    pub workflow: WorkflowConfig,
    pub customer: CustomerConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkflowConfig {
    /// Request header naming the workflow.
    pub header: String,
    /// Key of the request body's `metadata` object naming the workflow.
    pub metadata_key: String,
    pub rules: Vec<ValueRule>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CustomerConfig {
    /// Add the `customer` label; off by default, since customer ids can be personal data.
    pub enabled: bool,
    pub header: String,
    /// Also read OpenAI's `user` and Anthropic's `metadata.user_id`.
    pub from_body: bool,
    pub rules: Vec<ValueRule>,
}

impl Default for AttributionConfig {
    fn default() -> Self {
        Self {
            agent_env: "GAUGE_AGENT".into(),
            known_clients: true,
            max_processes: 32768,
            host_root: "/".into(),
            workflow: WorkflowConfig::default(),
            customer: CustomerConfig::default(),
        }
    }
}

impl Default for WorkflowConfig {
    fn default() -> Self {
        Self { header: "x-gauge-workflow".into(), metadata_key: "workflow".into(), rules: Vec::new() }
    }
}

impl Default for CustomerConfig {
    fn default() -> Self {
        Self { enabled: false, header: "x-gauge-customer".into(), from_body: true, rules: Vec::new() }
    }
}

/// The labels of one call, before cardinality caps.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attribution {
    pub agent: String,
    pub process: String,
    pub container: String,
    /// What is known of the container (runtime, id, pod), for `gauge_container_info`.
    pub container_info: Option<Container>,
    /// Empty when the call names none.
    pub workflow: String,
    /// `None` when the customer label is off; empty when the call names none.
    pub customer: Option<String>,
    /// For logs only: pids and paths are not labels.
    pub pid: u32,
    pub exe: String,
    /// The process's kernel start time (0 when unknown): with `pid`, names it.
    pub start_time: u64,
}

pub struct Attributor {
    source: Box<dyn ProcessSource>,
    table: ProcessTable,
    agents: AgentResolver,
    config: AttributionConfig,
}

impl Attributor {
    pub fn new(config: AttributionConfig, agents: Vec<AgentRule>, source: Box<dyn ProcessSource>) -> Self {
        let agents = AgentResolver {
            rules: agents,
            known_clients: config.known_clients,
            agent_env: (!config.agent_env.is_empty()).then(|| config.agent_env.clone()),
        };
        Self { source, table: ProcessTable::new(config.max_processes), agents, config }
    }

    /// The environment variables a [`process::ProcFs`] must read for these rules.
    pub fn env_names(config: &AttributionConfig, agents: &[AgentRule]) -> Vec<String> {
        AgentResolver {
            rules: agents.to_vec(),
            known_clients: false,
            agent_env: (!config.agent_env.is_empty()).then(|| config.agent_env.clone()),
        }
        .env_names()
    }

    /// Reads a process the first time it is seen, and again when it executes a new
    /// program, so that a client that exits right after its call is still known.
    /// Returns whether it was (re)read.
    pub fn observe(&mut self, event: &CaptureEvent) -> bool {
        if matches!(event.payload, Payload::Exec) || !self.table.contains(event.tgid) {
            let info = match self.source.read(event.tgid) {
                Some(info) => info,
                None => self.gone_before_read(event),
            };
            self.remember(info);
            return true;
        }
        false
    }

    /// A process that exited before the pipeline reached its event. At an exec, what
    /// was read of it before still holds: its parent, cgroup, container and (as
    /// launchers pass it on) environment; only the program is new, known by its
    /// thread name. A launcher such as a pyenv shim execs the real client, which can
    /// make its call and exit while the pipeline is behind; without this its agent
    /// would be lost.
    fn gone_before_read(&self, event: &CaptureEvent) -> ProcessInfo {
        match self.table.get(event.tgid) {
            Some(known) if matches!(event.payload, Payload::Exec) => {
                ProcessInfo { comm: event.comm.to_string(), exe: String::new(), cmdline: String::new(), ..known.clone() }
            }
            _ => ProcessInfo::from_comm(event.tgid, &event.comm),
        }
    }

    pub fn attribute(&mut self, metered: &Metered) -> Attribution {
        let origin = &metered.origin;
        let chain = self.chain(origin.tgid, &origin.comm);
        let request = &metered.call.request;
        let agent = self.agents.resolve(&chain, &request.headers).into_owned();
        let me = &chain[0];
        Attribution {
            agent,
            process: me.name().to_owned(),
            container: me.container.as_ref().map(|c| c.label()).unwrap_or_default(),
            container_info: me.container.clone(),
            workflow: self.workflow(request),
            customer: self.config.customer.enabled.then(|| self.customer(request)),
            pid: me.tgid,
            exe: me.exe.clone(),
            start_time: me.start_time,
        }
    }

    /// A process and its agent as known from the process alone (no request), for
    /// policies that act before a call is seen.
    pub fn process_agent(&mut self, tgid: u32, comm: &str) -> (ProcessInfo, String) {
        let mut chain = self.chain(tgid, comm);
        let agent = self.agents.resolve(&chain, &[]).into_owned();
        (chain.swap_remove(0), agent)
    }

    /// The process, then its ancestors, nearest first; never empty.
    fn chain(&mut self, tgid: u32, comm: &str) -> Vec<ProcessInfo> {
        let me = self.current(tgid, comm);
        let mut chain = vec![me];
        while chain.len() <= MAX_ANCESTORS {
            let Some(last) = chain.last() else { break };
            // pid 1 (init) and 2 (kthreadd) parent everything: inheriting from them
            // would give every orphan the same agent.
            if last.ppid <= 2 || last.ppid == last.tgid {
                break;
            }
            match self.ancestor(last.ppid) {
                Some(parent) => chain.push(parent),
                None => break,
            }
        }
        chain
    }

    /// The cgroup path of a remembered process ("" when unknown).
    pub fn cgroup_of(&self, tgid: u32) -> String {
        self.table.get(tgid).map(|p| p.cgroup.clone()).unwrap_or_default()
    }

    /// Rules changed (config reload).
    pub fn set_rules(&mut self, agents: Vec<AgentRule>) {
        self.agents.rules = agents;
    }

    fn remember(&mut self, info: ProcessInfo) {
        let source = &mut self.source;
        self.table.insert(info, |tgid| source.start_time(tgid).is_some());
    }

    /// The process now holding `tgid`: the remembered one unless the pid was reused.
    fn current(&mut self, tgid: u32, comm: &str) -> ProcessInfo {
        let live_start = self.source.start_time(tgid);
        if let Some(known) = self.table.get(tgid)
            && (live_start.is_none() || live_start == Some(known.start_time))
        {
            return known.clone();
        }
        let info = self.source.read(tgid).unwrap_or_else(|| ProcessInfo::from_comm(tgid, comm));
        self.remember(info.clone());
        info
    }

    fn ancestor(&mut self, tgid: u32) -> Option<ProcessInfo> {
        if let Some(known) = self.table.get(tgid) {
            return Some(known.clone());
        }
        let info = self.source.read(tgid)?;
        self.remember(info.clone());
        Some(info)
    }

    fn workflow(&self, request: &RequestContext) -> String {
        let c = &self.config.workflow;
        let raw = request.header(&c.header).or_else(|| request.metadata(&c.metadata_key));
        raw.map(|raw| map_value(&c.rules, raw).into_owned()).unwrap_or_default()
    }

    fn customer(&self, request: &RequestContext) -> String {
        let c = &self.config.customer;
        let from_body = || c.from_body.then(|| request.user.as_deref().or_else(|| request.metadata("user_id"))).flatten();
        let raw = request.header(&c.header).or_else(from_body);
        raw.map(|raw| map_value(&c.rules, raw).into_owned()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{llm::LlmCall, reassembly::Origin};

    /// A process table that knows one parent (pid 10) and its child (pid 11).
    struct Family;

    impl ProcessSource for Family {
        fn read(&mut self, tgid: u32) -> Option<ProcessInfo> {
            let (ppid, cmdline) = match tgid {
                10 => (1, "python3 run_batch.py --nightly"),
                11 => (10, "curl https://api.openai.com"),
                _ => return None,
            };
            Some(ProcessInfo { tgid, ppid, start_time: 7, comm: "x".into(), cmdline: cmdline.into(), ..Default::default() })
        }
        fn start_time(&mut self, tgid: u32) -> Option<u64> {
            (tgid == 10 || tgid == 11).then_some(7)
        }
    }

    fn metered(tgid: u32, request: RequestContext) -> Metered {
        let call = LlmCall { request, ..LlmCall::for_test(Some(200)) };
        Metered { origin: Origin { tgid, comm: "curl".into(), cgroup_id: 0, connection: 1 }, call }
    }

    fn attributor(config: &str) -> Attributor {
        let config = crate::config::Config::parse(config, "test.toml").expect("config");
        Attributor::new(config.attribution, config.agents, Box::new(Family))
    }

    #[test]
    fn workflow_and_customer_come_from_headers_then_body_through_rules() {
        let mut a = attributor(
            "[attribution.workflow]\nrules = [{ match = '^ticket-\\d+-(\\w+)$', name = '$1' }]\n[attribution.customer]\nenabled = true\n",
        );
        let headers = RequestContext {
            headers: vec![("x-gauge-workflow".into(), "ticket-88-triage".into()), ("x-gauge-customer".into(), "acme".into())],
            user: Some("user-9".into()),
            ..Default::default()
        };
        let who = a.attribute(&metered(11, headers));
        assert_eq!((who.workflow.as_str(), who.customer.as_deref()), ("triage", Some("acme")));
        let body = RequestContext {
            metadata: vec![("workflow".into(), "digest".into()), ("user_id".into(), "cust-7".into())],
            ..Default::default()
        };
        let who = a.attribute(&metered(11, body));
        assert_eq!((who.workflow.as_str(), who.customer.as_deref()), ("digest", Some("cust-7")));
        let who = attributor("").attribute(&metered(11, RequestContext::default()));
        assert_eq!((who.workflow.as_str(), who.customer), ("", None), "customer is off by default");
    }

    #[test]
    fn a_child_inherits_the_agent_of_its_parent() {
        let mut a = attributor("[[agents]]\nname = \"nightly\"\nmatch = { cmdline = 'run_batch\\.py' }\n");
        assert_eq!(a.attribute(&metered(11, RequestContext::default())).agent, "nightly");
        assert_eq!(a.attribute(&metered(10, RequestContext::default())).agent, "nightly");
    }

    /// A launcher (pid 20) that is read once, then execs its client and is gone.
    #[derive(Default)]
    struct Launcher {
        reads: u32,
    }

    impl ProcessSource for Launcher {
        fn read(&mut self, tgid: u32) -> Option<ProcessInfo> {
            self.reads += 1;
            (tgid == 20 && self.reads == 1).then(|| ProcessInfo {
                tgid,
                ppid: 1,
                start_time: 9,
                comm: "python3".into(),
                exe: "/usr/bin/bash".into(),
                cmdline: "bash /root/.pyenv/libexec/pyenv exec python3".into(),
                cgroup: "/system.slice/agents.service".into(),
                env: vec![("GAUGE_AGENT".into(), "upgraded-bot".into())],
                ..Default::default()
            })
        }
        fn start_time(&mut self, _: u32) -> Option<u64> {
            None
        }
    }

    #[test]
    fn a_client_gone_before_its_exec_was_read_keeps_what_its_launcher_passed_on() {
        let config = crate::config::Config::parse("", "test.toml").expect("config");
        let mut a = Attributor::new(config.attribution, config.agents, Box::new(Launcher::default()));
        let event = |payload| CaptureEvent { timestamp_ns: 1, tgid: 20, tid: 20, cgroup_id: 0, comm: "python3".into(), payload };
        assert!(a.observe(&event(Payload::Exec)));
        assert!(a.observe(&event(Payload::Exec)), "the exec of the real client is read again, and finds it gone");
        let who = a.attribute(&metered(20, RequestContext::default()));
        assert_eq!((who.agent.as_str(), who.process.as_str(), who.exe.as_str()), ("upgraded-bot", "python3", ""));
        assert_eq!(a.cgroup_of(20), "/system.slice/agents.service");

        // Without an earlier read there is only the thread name.
        let mut fresh = Attributor::new(AttributionConfig::default(), Vec::new(), Box::new(Launcher { reads: 1 }));
        assert!(fresh.observe(&event(Payload::Exec)));
        assert_eq!(fresh.attribute(&metered(20, RequestContext::default())).agent, rules::UNASSIGNED);
    }

    #[test]
    fn a_process_gone_before_it_was_read_is_known_by_its_thread_name() {
        let mut a = attributor("[[agents]]\nname = \"fetcher\"\nmatch = { comm = \"curl\" }\n");
        let who = a.attribute(&metered(999, RequestContext::default()));
        assert_eq!((who.agent.as_str(), who.process.as_str(), who.container.as_str()), ("fetcher", "curl", ""));
    }
}
