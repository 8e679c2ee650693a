//! The rules that name agents (`[[agents]]`), and that map raw workflow and customer
//! values to bounded labels. Pure: they look at a [`ProcessInfo`] chain and a call's
//! request headers, nothing else.

use std::borrow::Cow;

use serde::Deserialize;

use super::process::ProcessInfo;
use crate::config::Pattern;

/// The agent of calls no rule claims.
pub const UNASSIGNED: &str = "unassigned";

/// One `[[agents]]` entry: every matcher it sets must match.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRule {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: AgentMatch,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(try_from = "RawAgentMatch")]
pub struct AgentMatch {
    /// The thread name, exactly (15 bytes at most, as the kernel keeps it).
    pub comm: Option<String>,
    /// The executable: a full path, or a file name when it holds no `/`.
    pub exe: Option<String>,
    /// A regex searched in the command line (arguments joined by spaces).
    pub cmdline: Option<Pattern>,
    /// A regex searched in the cgroup path.
    pub cgroup: Option<Pattern>,
    /// The container: its name, its id, or the id's first 12 digits, exactly.
    pub container: Option<String>,
    /// `NAME=value` (exact) or `NAME` (set at all) in the process environment.
    pub env: Option<String>,
    /// A request header that must be present (e.g. `x-claude-code-session-id`).
    pub header: Option<String>,
    /// A regex searched in the request's `user-agent`.
    pub user_agent: Option<Pattern>,
}

/// `AgentMatch` as written; checked (in deserialization, so that the error names
/// the line) to set at least one matcher.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgentMatch {
    comm: Option<String>,
    exe: Option<String>,
    cmdline: Option<Pattern>,
    cgroup: Option<Pattern>,
    container: Option<String>,
    env: Option<String>,
    header: Option<String>,
    user_agent: Option<Pattern>,
}

impl TryFrom<RawAgentMatch> for AgentMatch {
    type Error = &'static str;

    fn try_from(r: RawAgentMatch) -> Result<Self, Self::Error> {
        let RawAgentMatch { comm, exe, cmdline, cgroup, container, env, header, user_agent } = r;
        let m = Self { comm, exe, cmdline, cgroup, container, env, header, user_agent };
        if m.is_empty() {
            return Err("an agent rule's `match` needs at least one of comm, exe, cmdline, cgroup, container, env, header, user_agent");
        }
        Ok(m)
    }
}

impl AgentMatch {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The environment variable this matcher reads, if any.
    pub fn env_name(&self) -> Option<&str> {
        self.env.as_deref().map(|e| e.split_once('=').map_or(e, |(name, _)| name))
    }

    fn uses_request(&self) -> bool {
        self.header.is_some() || self.user_agent.is_some()
    }

    /// `request` is `None` for an ancestor, which made no call: a rule that needs
    /// request headers does not match it.
    fn matches(&self, p: &ProcessInfo, request: Option<&[(String, String)]>) -> bool {
        let exe_ok = |want: &str| {
            if want.contains('/') { p.exe == want } else { p.name() == want }
        };
        let env_ok = |want: &str| match want.split_once('=') {
            Some((name, value)) => p.env(name) == Some(value),
            None => p.env(want).is_some(),
        };
        let header = |name: &str| request.and_then(|h| h.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()));
        if self.uses_request() && request.is_none() {
            return false;
        }
        self.comm.as_ref().is_none_or(|c| *c == p.comm)
            && self.exe.as_deref().is_none_or(exe_ok)
            && self.cmdline.as_ref().is_none_or(|re| re.is_match(&p.cmdline))
            && self.cgroup.as_ref().is_none_or(|re| re.is_match(&p.cgroup))
            && self.container.as_deref().is_none_or(|want| {
                p.container.as_ref().is_some_and(|c| c.name.as_deref() == Some(want) || c.id == want || c.label() == want)
            })
            && self.env.as_deref().is_none_or(env_ok)
            && self.header.as_deref().is_none_or(|h| header(h).is_some())
            && self.user_agent.as_ref().is_none_or(|re| header("user-agent").is_some_and(|ua| re.is_match(ua)))
    }
}

/// Coding agents that announce themselves in their requests.
const KNOWN_CLIENTS: &[(&str, KnownBy)] = &[
    ("claude-code", KnownBy::Header("x-claude-code-session-id")),
    ("claude-code", KnownBy::UserAgentPrefix("claude-cli/")),
    ("codex", KnownBy::UserAgentPrefix("codex_cli_rs/")),
    ("codex", KnownBy::HeaderValue("originator", "codex_cli_rs")),
    ("gemini-cli", KnownBy::UserAgentPrefix("GeminiCLI/")),
];

enum KnownBy {
    Header(&'static str),
    HeaderValue(&'static str, &'static str),
    UserAgentPrefix(&'static str),
}

/// Names the agent of a call: the first `[[agents]]` rule matching the calling
/// process (and its request), then a known client's own headers, then the
/// process's agent variable (`GAUGE_AGENT=name`), then the same for each ancestor
/// in turn (children inherit their parent's agent), else [`UNASSIGNED`].
#[derive(Debug, Clone, Default)]
pub struct AgentResolver {
    pub rules: Vec<AgentRule>,
    pub known_clients: bool,
    /// The environment variable that names a process's agent; `None` to ignore.
    pub agent_env: Option<String>,
}

impl AgentResolver {
    /// The environment variables the rules read.
    pub fn env_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.rules.iter().filter_map(|r| r.matcher.env_name()).map(str::to_owned).collect();
        names.extend(self.agent_env.clone());
        names.sort();
        names.dedup();
        names
    }

    /// `chain` is the calling process, then its ancestors, nearest first.
    pub fn resolve<'a>(&'a self, chain: &'a [ProcessInfo], request: &'a [(String, String)]) -> Cow<'a, str> {
        for (depth, process) in chain.iter().enumerate() {
            let request = (depth == 0).then_some(request);
            if let Some(rule) = self.rules.iter().find(|r| r.matcher.matches(process, request)) {
                return Cow::Borrowed(&rule.name);
            }
            if let Some(name) = request.filter(|_| self.known_clients).and_then(known_client) {
                return Cow::Borrowed(name);
            }
            if let Some(name) = self.agent_env.as_deref().and_then(|v| process.env(v)).filter(|n| !n.is_empty()) {
                return Cow::Borrowed(name);
            }
        }
        Cow::Borrowed(UNASSIGNED)
    }
}

fn known_client(request: &[(String, String)]) -> Option<&'static str> {
    let header = |name: &str| request.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    KNOWN_CLIENTS.iter().find_map(|(agent, by)| {
        let hit = match by {
            KnownBy::Header(name) => header(name).is_some(),
            KnownBy::HeaderValue(name, value) => header(name) == Some(value),
            KnownBy::UserAgentPrefix(prefix) => header("user-agent").is_some_and(|ua| ua.starts_with(prefix)),
        };
        hit.then_some(*agent)
    })
}

/// Maps a raw value (a workflow or customer id from a header or body) to its label:
/// the first rule whose regex matches gives `name` (which may use `$1`-style
/// groups); a value no rule matches is kept as is.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueRule {
    #[serde(rename = "match")]
    pub pattern: Pattern,
    pub name: String,
}

pub fn map_value<'a>(rules: &[ValueRule], raw: &'a str) -> Cow<'a, str> {
    for rule in rules {
        if let Some(captures) = rule.pattern.captures(raw) {
            let mut out = String::new();
            captures.expand(&rule.name, &mut out);
            return Cow::Owned(out);
        }
    }
    Cow::Borrowed(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml: &str) -> Vec<AgentRule> {
        #[derive(Deserialize)]
        struct File {
            agents: Vec<AgentRule>,
        }
        toml::from_str::<File>(toml).expect("rules parse").agents
    }

    fn process(comm: &str, exe: &str, cmdline: &str) -> ProcessInfo {
        ProcessInfo { tgid: 10, comm: comm.into(), exe: exe.into(), cmdline: cmdline.into(), ..Default::default() }
    }

    #[test]
    fn first_matching_rule_names_the_agent() {
        let resolver = AgentResolver {
            rules: rules(
                r#"
                [[agents]]
                name = "support-bot"
                match = { cmdline = "support_bot\\.py" }
                [[agents]]
                name = "any-python"
                match = { exe = "python3.11" }
                "#,
            ),
            ..Default::default()
        };
        let bot = process("python3", "/usr/bin/python3.11", "python3 support_bot.py --live");
        let other = process("python3", "/usr/bin/python3.11", "python3 other.py");
        assert_eq!(resolver.resolve(&[bot], &[]), "support-bot");
        assert_eq!(resolver.resolve(&[other], &[]), "any-python");
        assert_eq!(resolver.resolve(&[process("curl", "/usr/bin/curl", "curl")], &[]), UNASSIGNED);
    }

    #[test]
    fn every_matcher_of_a_rule_must_hold() {
        let resolver = AgentResolver {
            rules: rules("[[agents]]\nname = \"a\"\nmatch = { comm = \"node\", env = \"TEAM=ml\" }\n"),
            ..Default::default()
        };
        let mut p = process("node", "/usr/bin/node", "node app.js");
        assert_eq!(resolver.resolve(std::slice::from_ref(&p), &[]), UNASSIGNED);
        p.env = vec![("TEAM".into(), "ml".into())];
        assert_eq!(resolver.resolve(&[p], &[]), "a");
    }

    #[test]
    fn children_inherit_their_parents_agent_and_their_own_rule_wins() {
        let resolver = AgentResolver {
            rules: rules("[[agents]]\nname = \"pipeline\"\nmatch = { cmdline = \"run_pipeline\" }\n[[agents]]\nname = \"fetcher\"\nmatch = { comm = \"curl\" }\n"),
            agent_env: Some("GAUGE_AGENT".into()),
            ..Default::default()
        };
        let parent = process("bash", "/bin/bash", "bash run_pipeline.sh");
        let child = process("python3", "/usr/bin/python3", "python3 step.py");
        assert_eq!(resolver.resolve(&[child, parent.clone()], &[]), "pipeline");
        assert_eq!(resolver.resolve(&[process("curl", "/usr/bin/curl", "curl"), parent], &[]), "fetcher");
    }

    #[test]
    fn the_agent_variable_names_a_process_no_rule_claims() {
        let resolver = AgentResolver { agent_env: Some("GAUGE_AGENT".into()), ..Default::default() };
        let mut p = process("python3", "/usr/bin/python3", "python3 x.py");
        p.env = vec![("GAUGE_AGENT".into(), "summarizer".into())];
        assert_eq!(resolver.resolve(&[p], &[]), "summarizer");
        assert_eq!(resolver.env_names(), vec!["GAUGE_AGENT".to_owned()]);
    }

    #[test]
    fn request_headers_can_name_the_agent() {
        let resolver = AgentResolver {
            rules: rules("[[agents]]\nname = \"sdk-bot\"\nmatch = { user_agent = \"^OpenAI/Python\" }\n"),
            known_clients: true,
            ..Default::default()
        };
        let p = process("node", "/usr/bin/node", "node cli.js");
        let claude = vec![("x-claude-code-session-id".to_owned(), "abc".to_owned())];
        assert_eq!(resolver.resolve(std::slice::from_ref(&p), &claude), "claude-code");
        let sdk = vec![("user-agent".to_owned(), "OpenAI/Python 3.57.0".to_owned())];
        assert_eq!(resolver.resolve(std::slice::from_ref(&p), &sdk), "sdk-bot");
        // An ancestor made no request: header rules never match it.
        assert_eq!(resolver.resolve(&[process("sh", "/bin/sh", "sh"), p], &[]), UNASSIGNED);
    }

    #[test]
    fn values_map_through_rules_with_groups() {
        #[derive(Deserialize)]
        struct File {
            rules: Vec<ValueRule>,
        }
        let rules = toml::from_str::<File>("rules = [{ match = '^ticket-\\d+-(\\w+)$', name = 'ticket-$1' }]").expect("parse").rules;
        assert_eq!(map_value(&rules, "ticket-8812-triage"), "ticket-triage");
        assert_eq!(map_value(&rules, "nightly"), "nightly");
    }
}
