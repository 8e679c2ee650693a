//! The deployment files stay right: the systemd unit verifies and grants exactly the
//! capabilities `gauge_agent::privileges` asks for; the Kubernetes manifests parse,
//! agree with the unit and the daemon's config, and pass the Kubernetes schemas.
//! No root needed. With `CI=true` a missing `systemd-analyze` or kubernetes-validate
//! fails the test instead of skipping it (`cargo xtask setup` installs both).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use gauge_agent::{
    config::Config,
    privileges::{Command as Run, Kernel},
};
use serde_yaml_ng::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A tool the test cannot do without: a failure in CI, a skip with a note elsewhere.
fn tool_present(test: &str, tool: &str, mut probe: Command) -> bool {
    if probe.output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    assert!(!in_ci(), "{test}: {tool} is missing; in CI (CI=true) it must be there (`cargo xtask setup` installs it)");
    eprintln!("skipping {test}: {tool} is missing (`cargo xtask setup` installs it)");
    false
}

/// Every capability the daemon may use: the required and optional ones of `run`
/// with policies, on a kernel that wants CAP_SYS_ADMIN for uprobes.
fn capability_set() -> BTreeSet<String> {
    let run = Run::Run { policies: true };
    run.required(Kernel { uprobes_need_sys_admin: true })
        .into_iter()
        .chain(run.optional())
        .map(|need| need.capability.name().to_owned())
        .collect()
}

const UNIT: &str = "deploy/systemd/gauge-agent.service";

fn unit_text() -> String {
    std::fs::read_to_string(repo().join(UNIT)).expect("read the unit")
}

/// The values of `key=` in the unit, in order (comments and sections skipped).
fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
        .collect()
}

fn unit_value(text: &str, key: &str) -> String {
    let values = unit_values(text, key);
    assert_eq!(values.len(), 1, "{UNIT}: want exactly one {key}=, got {values:?}");
    values.into_iter().next().expect("one value")
}

/// "448M" (systemd: base 1024) or "448Mi" (Kubernetes) in bytes.
fn bytes(size: &str) -> u64 {
    let digits: String = size.chars().take_while(char::is_ascii_digit).collect();
    let number: u64 = digits.parse().unwrap_or_else(|_| panic!("not a size: {size}"));
    let shift = match &size[digits.len()..] {
        "K" | "Ki" => 10,
        "M" | "Mi" => 20,
        "G" | "Gi" => 30,
        other => panic!("unit {other:?} of {size}"),
    };
    number << shift
}

#[test]
fn the_systemd_unit_grants_exactly_the_documented_capabilities() {
    let text = unit_text();
    let want = capability_set();
    assert_eq!(want.len(), 7, "{want:?}");
    for key in ["AmbientCapabilities", "CapabilityBoundingSet"] {
        let got: BTreeSet<String> = unit_value(&text, key).split_whitespace().map(str::to_owned).collect();
        assert_eq!(got, want, "{UNIT}: {key}= must be the set of gauge_agent::privileges");
    }
    // The README's table and example say the same.
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    for cap in &want {
        assert!(readme.contains(&format!("`{cap}`")), "README.md's capability table lacks {cap}");
    }
}

#[test]
fn the_systemd_unit_is_hardened_and_consistent_with_the_daemon() {
    let text = unit_text();
    for (key, value) in [
        ("User", "gauge-agent"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelModules", "yes"),
        ("LockPersonality", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("Restart", "on-failure"),
        ("ExecStart", "/usr/local/bin/gauge-agent run --config /etc/gauge/gauge.toml"),
        // Freeze and throttle write cgroup files.
        ("ProtectControlGroups", "no"),
    ] {
        assert_eq!(unit_value(&text, key), value, "{UNIT}: {key}=");
    }
    // The undo file and heartbeat go where the unit gives the daemon a writable
    // directory, and it outlives a crash (the next start undoes from it).
    let defaults = Config::load(None).expect("embedded default");
    let state_dir = defaults.enforcement.state_file.parent().expect("state dir").to_owned();
    assert_eq!(state_dir, Path::new("/run").join(unit_value(&text, "RuntimeDirectory")), "{UNIT}: RuntimeDirectory=");
    assert_eq!(unit_value(&text, "RuntimeDirectoryPreserve"), "yes");
    // The memory limit covers the documented budgets (ring + queue + connections).
    let budgets = u64::from(defaults.capture.ring_buffer_bytes) + defaults.capture.queue_bytes as u64 + defaults.http.max_buffered_bytes as u64;
    let max = bytes(&unit_value(&text, "MemoryMax"));
    assert!(max >= budgets + (64 << 20), "{UNIT}: MemoryMax= {max} leaves under 64 MiB above the budgets ({budgets})");
    assert!(bytes(&unit_value(&text, "MemoryHigh")) < max);
}

#[test]
fn the_systemd_unit_verifies() {
    let test = "the_systemd_unit_verifies";
    let mut probe = Command::new("systemd-analyze");
    probe.arg("--version");
    if !tool_present(test, "systemd-analyze", probe) {
        return;
    }
    // verify checks that ExecStart's binary exists: point it at the built one.
    let binary = gauge_tests::agent::agent_binary().canonicalize().expect("binary path");
    let text = unit_text().replace(
        "ExecStart=/usr/local/bin/gauge-agent ",
        &format!("ExecStart={} ", binary.display()),
    );
    assert!(text.contains(&format!("ExecStart={}", binary.display())));
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = dir.path().join("gauge-agent.service");
    std::fs::write(&unit, text).expect("write unit");
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{stderr}");
    // Unknown or misspelt keys are only warnings ("Unknown key ..., ignoring"):
    // refuse any line about the unit.
    let about_unit: Vec<&str> = stderr.lines().filter(|l| l.contains("gauge-agent.service")).collect();
    assert!(about_unit.is_empty(), "systemd-analyze verify warns:\n{}", about_unit.join("\n"));
}

const MANIFESTS: &str = "deploy/kubernetes";

/// Every manifest: (file name, document).
fn manifests() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join(MANIFESTS))
        .expect("read deploy/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("read manifest");
        let name = path.file_name().expect("name").to_string_lossy().into_owned();
        // One document per file, so that each is validated on its own.
        let value: Value = serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{name}: not one YAML document: {e}"));
        out.push((name, value));
    }
    out
}

fn kind<'a>(docs: &'a [(String, Value)], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|(_, d)| d["kind"] == kind).map(|(_, d)| d).collect();
    assert_eq!(found.len(), 1, "want one {kind} in {MANIFESTS}");
    found[0]
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value.as_str().unwrap_or_else(|| panic!("{what}: want a string, got {value:?}"))
}

/// The element of a list whose `name` is `name`.
fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_sequence()
        .and_then(|items| items.iter().find(|i| i["name"] == name))
        .unwrap_or_else(|| panic!("no {name:?} in {list:?}"))
}

#[test]
fn the_kubernetes_manifests_agree_with_the_daemon_and_the_unit() {
    let docs = manifests();
    let kinds: BTreeSet<&str> = docs.iter().map(|(_, d)| str_of(&d["kind"], "kind")).collect();
    assert_eq!(kinds, BTreeSet::from(["ConfigMap", "DaemonSet", "Namespace", "Service", "ServiceMonitor"]));
    let namespace = str_of(&kind(&docs, "Namespace")["metadata"]["name"], "namespace name");
    for (file, doc) in &docs {
        let api = str_of(&doc["apiVersion"], file);
        let want = match str_of(&doc["kind"], file) {
            "DaemonSet" => "apps/v1",
            "ServiceMonitor" => "monitoring.coreos.com/v1",
            _ => "v1",
        };
        assert_eq!(api, want, "{file}: apiVersion");
        if doc["kind"] != "Namespace" {
            assert_eq!(doc["metadata"]["namespace"], namespace, "{file}: namespace");
        }
    }

    // The config: beyond loopback on 9977, with the outcome token, in a container
    // whose host root is /host.
    let config_map = kind(&docs, "ConfigMap");
    let toml = str_of(&config_map["data"]["gauge.toml"], "ConfigMap gauge.toml");
    let config = Config::parse(toml, "deploy/kubernetes/configmap.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert!(!config.server.listen.ip().is_loopback() && config.server.listen.port() == 9977, "{}", config.server.listen);
    assert_eq!(config.attribution.host_root, Path::new("/host"));
    let token_file = config.server.token_file.clone().expect("beyond loopback, outcome reports need server.token_file");
    let metrics_token_file = config.server.metrics_token_file.clone().expect("server.metrics_token_file");

    let daemon_set = kind(&docs, "DaemonSet");
    let pod = &daemon_set["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(daemon_set["spec"]["selector"]["matchLabels"], daemon_set["spec"]["template"]["metadata"]["labels"]);
    let containers = pod["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    let image = str_of(&container["image"], "image");
    assert!(image.contains(':') && !image.ends_with(":latest"), "pin the image: {image}");
    let args: Vec<&str> = container["args"].as_sequence().expect("args").iter().map(|a| str_of(a, "arg")).collect();
    let config_path = args.iter().skip_while(|a| **a != "--config").nth(1).expect("--config FILE");
    assert_eq!(args[0], "run");
    let port = named(&container["ports"], "metrics");
    assert_eq!(port["containerPort"], 9977);
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "metrics", "{probe}");
    }

    // Exactly the unit's capabilities (Kubernetes names them without CAP_), and
    // nothing else: not privileged, everything else dropped.
    let security = &container["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["capabilities"]["drop"], Value::Sequence(vec!["ALL".into()]));
    let added: BTreeSet<String> = security["capabilities"]["add"]
        .as_sequence()
        .expect("capabilities.add")
        .iter()
        .map(|c| format!("CAP_{}", str_of(c, "capability")))
        .collect();
    let unit_caps: BTreeSet<String> = unit_value(&unit_text(), "AmbientCapabilities").split_whitespace().map(str::to_owned).collect();
    assert_eq!(added, unit_caps, "the DaemonSet's capabilities.add must be the unit's set");
    assert_eq!(added, capability_set());

    // The memory limit is the unit's.
    let limit = str_of(&container["resources"]["limits"]["memory"], "limits.memory");
    assert_eq!(bytes(limit), bytes(&unit_value(&unit_text(), "MemoryMax")), "limits.memory vs the unit's MemoryMax");

    // Mounts: the config and tokens where the config says, the host's / read-only
    // at /host with its /proc and (writable) cgroups, BTF, the undo directory.
    let mounts = &container["volumeMounts"];
    let volumes = &pod["volumes"];
    let mount_of = |path: &Path| -> (&Value, &Value) {
        let mount = mounts
            .as_sequence()
            .expect("volumeMounts")
            .iter()
            .filter(|m| path.starts_with(str_of(&m["mountPath"], "mountPath")))
            .max_by_key(|m| str_of(&m["mountPath"], "mountPath").len())
            .unwrap_or_else(|| panic!("nothing mounted at {}", path.display()));
        (mount, named(volumes, str_of(&mount["name"], "mount name")))
    };
    let (_, config_volume) = mount_of(Path::new(config_path));
    assert_eq!(config_volume["configMap"]["name"], config_map["metadata"]["name"]);
    let (_, tokens) = mount_of(&token_file);
    let (_, metrics_tokens) = mount_of(&metrics_token_file);
    assert_eq!(tokens, metrics_tokens);
    let secret = str_of(&tokens["secret"]["secretName"], "tokens secretName");
    // The daemon refuses a token file others may read.
    let mode = tokens["secret"]["defaultMode"].as_u64().expect("defaultMode");
    assert_eq!(mode & 0o077, 0, "the token files must be owner-only (defaultMode {mode:o})");
    for (path, host, writable) in
        [("/host", "/", false), ("/host/proc", "/proc", false), ("/host/sys/fs/cgroup", "/sys/fs/cgroup", true), ("/sys/kernel/btf", "/sys/kernel/btf", false)]
    {
        let (mount, volume) = mount_of(Path::new(path));
        assert_eq!(mount["mountPath"], path);
        assert_eq!(volume["hostPath"]["path"], host, "{path}");
        assert_eq!(mount["readOnly"].as_bool().unwrap_or(false), !writable, "{path} readOnly");
    }
    let (state_mount, state_volume) = mount_of(&config.enforcement.state_file);
    assert!(state_volume["hostPath"]["path"].is_string(), "the undo file must outlive the pod: {state_volume:?}");
    assert_ne!(state_mount["readOnly"], true);

    // The Service and ServiceMonitor reach the port, the monitor with the token.
    let service = kind(&docs, "Service");
    assert_eq!(service["spec"]["selector"], daemon_set["spec"]["template"]["metadata"]["labels"]);
    let service_port = named(&service["spec"]["ports"], "metrics");
    assert_eq!(service_port["port"], 9977);
    assert_eq!(service_port["targetPort"], "metrics");
    let monitor = kind(&docs, "ServiceMonitor");
    assert_eq!(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]);
    let endpoints = monitor["spec"]["endpoints"].as_sequence().expect("endpoints");
    assert_eq!(endpoints.len(), 1);
    let endpoint = &endpoints[0];
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["authorization"]["credentials"]["name"], secret);
    let key = metrics_token_file.file_name().expect("file name").to_string_lossy().into_owned();
    assert_eq!(endpoint["authorization"]["credentials"]["key"], key.as_str());
}

#[test]
fn the_kubernetes_manifests_pass_the_schemas() {
    let test = "the_kubernetes_manifests_pass_the_schemas";
    let mut probe = Command::new("python3");
    probe.args(["-m", "kubernetes_validate", "--version"]);
    if !tool_present(test, "kubernetes-validate (pip)", probe) {
        return;
    }
    let dir = repo().join(MANIFESTS);
    let mut checked = 0;
    for (file, doc) in manifests() {
        // A CRD: not in the built-in schemas (its fields are checked above).
        if doc["kind"] == "ServiceMonitor" {
            continue;
        }
        let out = Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "--kubernetes-version", "1.34.0"])
            .arg(dir.join(&file))
            .output()
            .expect("run kubernetes-validate");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && said.contains("passed"), "{file}:\n{said}");
        checked += 1;
    }
    assert_eq!(checked, 4);
}
