//! Which container a process runs in, and what its runtime says about it.
//!
//! The cgroup path decides. It is cheap (one small `/proc` file), always there, and
//! every runtime names a container's cgroup after the container's 64-hex id (Docker,
//! containerd, CRI-O, Podman; cgroupfs and systemd drivers; cgroup v1 and v2), so the
//! path alone gives the id, usually the runtime, and under Kubernetes (`kubepods`) the
//! pod UID and QoS class. The runtimes' metadata files only enrich that with names:
//! they may be absent (another mount namespace, a runtime not installed), unreadable,
//! or in a format that changed, and none of that may lose a container already known
//! by its id, so every failure there just leaves a field `None`.

use std::{
    fs::File,
    io::Read as _,
    path::{Path, PathBuf},
};

use serde_json::Value;

/// Real metadata files are far smaller; a bigger one is treated as malformed rather
/// than read whole by a daemon that runs on every host.
const MAX_FILE: u64 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Docker,
    Containerd,
    CriO,
    Podman,
    /// The path holds a bare id (cgroupfs `kubepods`, nested layouts): the metadata may still tell.
    Unknown,
}

impl Runtime {
    pub fn label(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Containerd => "containerd",
            Self::CriO => "cri-o",
            Self::Podman => "podman",
            Self::Unknown => "unknown",
        }
    }
}

/// What a cgroup path says. There is always a container id: a pod's own slice holds no
/// process of its own (its pause/sandbox container has an id like any other), so a
/// path naming a pod but no container is not reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    pub runtime: Runtime,
    /// 64 hex digits, lower-case.
    pub id: String,
    pub pod: Option<PodRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// With dashes, whatever form the path used.
    pub uid: String,
    /// "guaranteed", "burstable" or "besteffort".
    pub qos: &'static str,
}

/// A container, as much as is known of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Container {
    pub runtime: &'static str,
    pub id: String,
    pub name: Option<String>,
    pub pod: Option<Pod>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pod {
    pub uid: String,
    /// "" when only the metadata, not the cgroup path, named the pod.
    pub qos: &'static str,
    pub name: Option<String>,
    pub namespace: Option<String>,
}

impl Container {
    /// The `container` label: the name when known, else the first 12 hex of the id
    /// (what `docker ps` and `crictl ps` show).
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.id.chars().take(12).collect())
    }
}

/// The process's cgroup path from the text of `/proc/PID/cgroup`. Hybrid hosts may keep a
/// container only in the v1 hierarchies, its v2 path being the root or the runtime's own
/// service (where the shim that forked it lives), so a path naming a container wins: v2's,
/// else the first v1 one; then v2's if not the root, the `name=systemd` one, any non-root
/// one. `None` when every hierarchy says `/`.
pub fn cgroup_path(proc_cgroup: &str) -> Option<String> {
    let (mut v2, mut v1) = (None, Vec::new());
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(hierarchy), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        // The kernel marks a v2 cgroup removed while a process (a zombie) still points at it.
        let path = path.strip_suffix(" (deleted)").unwrap_or(path);
        if path.is_empty() || path == "/" {
            continue;
        }
        if hierarchy == "0" && controllers.is_empty() {
            v2 = Some(path);
        } else {
            v1.push((controllers, path));
        }
    }
    let first_v1 = |pick: fn(&str, &str) -> bool| v1.iter().find(|(c, p)| pick(c, p)).map(|(_, path)| *path);
    v2.filter(|path| parse(path).is_some())
        .or_else(|| first_v1(|_, path| parse(path).is_some()))
        .or(v2)
        .or_else(|| first_v1(|controllers, _| controllers == "name=systemd"))
        .or_else(|| first_v1(|_, _| true))
        .map(str::to_owned)
}

/// The container a cgroup path names; `None` for anything else (services, sessions, a
/// pod's slice, conmon). The last component holding an id decides, so a container
/// nested in another (Docker in Docker, kind's nodes, a CI job's cgroup) is the inner one.
pub fn parse(path: &str) -> Option<ContainerRef> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let (at, runtime, id) =
        parts.iter().enumerate().rev().find_map(|(i, p)| component_id(p).map(|(r, id)| (i, r, id)))?;
    let pod = kube_pod(&parts[..at]);
    // cgroupfs Docker is the one runtime whose bare-id layout names it, by the parent.
    let docker_parent = at > 0 && parts[at - 1] == "docker";
    let runtime = if runtime == Runtime::Unknown && pod.is_none() && docker_parent { Runtime::Docker } else { runtime };
    Some(ContainerRef { runtime, id: id.to_ascii_lowercase(), pod })
}

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A container id in one path component, and the runtime its form names. conmon, the
/// monitor CRI-O and Podman run beside each container, is `crio-conmon-<id>.scope` or
/// `libpod-conmon-<id>.scope`: no id follows the prefix, so it is not taken for the
/// container it watches (and a conmon nested in a container still counts as in that one).
fn component_id(part: &str) -> Option<(Runtime, &str)> {
    let unit = part.strip_suffix(".scope").unwrap_or(part);
    if is_id(unit) {
        return Some((Runtime::Unknown, unit));
    }
    const FORMS: [(&str, Runtime); 6] = [
        ("docker-", Runtime::Docker),
        ("cri-containerd-", Runtime::Containerd),
        ("containerd-", Runtime::Containerd),
        ("nerdctl-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("libpod-", Runtime::Podman),
    ];
    FORMS.iter().find_map(|(prefix, runtime)| unit.strip_prefix(prefix).filter(|id| is_id(id)).map(|id| (*runtime, id)))
}

/// The systemd driver flattens each kubepods level into a slice name
/// (`kubepods-burstable-pod<uid>.slice`, prefixed by any kubelet `--cgroup-root`, as
/// kind's `kubelet-kubepods-...`), so levels are read as dash-separated tokens.
fn tokens(part: &str) -> impl Iterator<Item = &str> {
    part.strip_suffix(".slice").unwrap_or(part).split('-')
}

/// The pod of the components above a container id, when they are kubelet's.
fn kube_pod(parts: &[&str]) -> Option<PodRef> {
    let (at, uid) = parts.iter().enumerate().rev().find_map(|(i, p)| pod_uid(p).map(|uid| (i, uid)))?;
    let start = parts[..=at].iter().rposition(|p| tokens(p).any(|t| t == "kubepods"))?;
    let qos = parts[start..=at].iter().flat_map(|p| tokens(p)).find_map(|t| match t {
        "burstable" => Some("burstable"),
        "besteffort" => Some("besteffort"),
        _ => None,
    });
    // Guaranteed pods sit right under kubepods, with no QoS level of their own.
    Some(PodRef { uid, qos: qos.unwrap_or("guaranteed") })
}

/// cgroupfs `pod<uid>`, or systemd `...-pod<uid>.slice` whose UID has `_` for `-`
/// (a dash would be read by systemd as another level). Static pods' UIDs are 32 hex.
fn pod_uid(part: &str) -> Option<String> {
    let raw = match part.strip_suffix(".slice") {
        Some(unit) => unit.rsplit('-').next()?.strip_prefix("pod")?,
        None => part.strip_prefix("pod")?,
    };
    let uid = raw.replace('_', "-");
    let valid = (32..=36).contains(&uid.len()) && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    valid.then(|| uid.to_ascii_lowercase())
}

/// The last `*.service` or `*.scope` of a path: never a container, but a name for
/// processes that run as systemd units.
pub fn systemd_unit(path: &str) -> Option<String> {
    let is_unit = |p: &&str| [".service", ".scope"].iter().any(|s| p.strip_suffix(s).is_some_and(|n| !n.is_empty()));
    path.rsplit('/').find(is_unit).map(str::to_owned)
}

/// Where the container runtimes keep their metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataRoots {
    /// Docker: `<id>/config.v2.json`.
    pub docker: PathBuf,
    /// containerd task bundles: `<namespace>/<id>/config.json` (OCI runtime spec).
    pub containerd_tasks: Vec<PathBuf>,
    /// CRI-O and Podman (containers/storage): `<id>/userdata/config.json`, `containers.json`.
    pub containers_storage: Vec<PathBuf>,
}

impl Default for MetadataRoots {
    fn default() -> Self {
        Self::under(Path::new("/"))
    }
}

impl MetadataRoots {
    /// The roots under `root`: a test tree, or the host's `/` mounted in the daemon's container.
    pub fn under(root: &Path) -> Self {
        Self {
            docker: root.join("var/lib/docker/containers"),
            containerd_tasks: vec![root.join("run/containerd/io.containerd.runtime.v2.task")],
            containers_storage: vec![
                root.join("run/containers/storage/overlay-containers"),
                root.join("var/lib/containers/storage/overlay-containers"),
            ],
        }
    }
}

/// The cgroup path of `<proc_root>/<pid>` (`"/"` when every hierarchy says root) and its
/// container; `None` when the process is gone or its cgroup file unreadable.
pub fn of_process(proc_root: &Path, pid: u32, roots: &MetadataRoots) -> Option<(String, Option<Container>)> {
    let text = read_capped(&proc_root.join(pid.to_string()).join("cgroup"))?;
    let Some(path) = cgroup_path(&String::from_utf8_lossy(&text)) else { return Some(("/".to_owned(), None)) };
    let container = parse(&path).map(|r| describe(roots, &r));
    Some((path, container))
}

/// The container `r` with what its runtime's files add; never fails. The runtime becomes
/// the one whose files hold the id, which also settles the paths that did not say.
pub fn describe(roots: &MetadataRoots, r: &ContainerRef) -> Container {
    let mut pod = r.pod.as_ref().map(|p| Pod { uid: p.uid.clone(), qos: p.qos, ..Pod::default() });
    // The id becomes a path component, so only a real one is looked up (the fields are public).
    let id = is_id(&r.id).then_some(r.id.as_str());
    let found =
        id.and_then(|id| docker(roots, id).or_else(|| containerd(roots, id)).or_else(|| storage(roots, id, r.runtime)));
    let Some(found) = found else { return Container { runtime: r.runtime.label(), id: r.id.clone(), name: None, pod } };
    let kube = found.kube;
    if kube.names_a_pod() {
        let pod = pod.get_or_insert_with(Pod::default);
        if pod.uid.is_empty() {
            pod.uid = kube.uid.unwrap_or_default();
        }
        (pod.name, pod.namespace) = (kube.pod, kube.namespace);
    }
    // Kubernetes' container name, not the runtime's (dockershim's is `k8s_<container>_<pod>_...`).
    Container { runtime: found.runtime, id: r.id.clone(), name: kube.container.or(found.name), pod }
}

/// What one runtime's files say of a container.
struct Found {
    runtime: &'static str,
    name: Option<String>,
    kube: Kube,
}

struct Kube {
    container: Option<String>,
    pod: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
}

impl Kube {
    fn names_a_pod(&self) -> bool {
        self.pod.is_some() || self.namespace.is_some() || self.uid.is_some()
    }
}

/// Kubernetes facts from labels or annotations, under the CRI plugin's keys
/// (containerd) or the kubelet's (CRI-O, dockershim).
fn kube(map: Option<&Value>) -> Kube {
    let get = |keys: [&str; 2]| keys.iter().find_map(|k| text(map.and_then(|m| m.get(*k))));
    Kube {
        container: get(["io.kubernetes.cri.container-name", "io.kubernetes.container.name"]),
        pod: get(["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"]),
        namespace: get(["io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace"]),
        uid: get(["io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"]),
    }
}

// Each runtime counts as having found the container when its directory for the id
// exists, even if the file in it cannot be read: the runtime is then still known.

fn docker(roots: &MetadataRoots, id: &str) -> Option<Found> {
    let dir = roots.docker.join(id);
    if !dir.is_dir() {
        return None;
    }
    let config = read_json(&dir.join("config.v2.json"));
    let name = text(config.as_ref().and_then(|c| c.get("Name"))).map(|n| n.trim_start_matches('/').to_owned());
    let kube = kube(config.as_ref().and_then(|c| c.pointer("/Config/Labels")));
    Some(Found { runtime: "docker", name: name.filter(|n| !n.is_empty()), kube })
}

fn containerd(roots: &MetadataRoots, id: &str) -> Option<Found> {
    for tasks in &roots.containerd_tasks {
        let Ok(namespaces) = std::fs::read_dir(tasks) else { continue };
        for namespace in namespaces.flatten() {
            let bundle = namespace.path().join(id);
            if !bundle.is_dir() {
                continue;
            }
            let spec = read_json(&bundle.join("config.json"));
            let annotations = spec.as_ref().and_then(|s| s.get("annotations"));
            // Docker runs its containers through containerd, in the `moby` namespace.
            let runtime = if namespace.file_name() == "moby" { "docker" } else { "containerd" };
            let name = text(annotations.and_then(|a| a.get("nerdctl/name")));
            return Some(Found { runtime, name, kube: kube(annotations) });
        }
    }
    None
}

/// CRI-O and Podman share containers/storage; only CRI-O (Kubernetes) writes the
/// kubelet's annotations, so they, or a `crio-` cgroup, tell the two apart.
fn storage(roots: &MetadataRoots, id: &str, said: Runtime) -> Option<Found> {
    let dirs: Vec<PathBuf> = roots.containers_storage.iter().map(|root| root.join(id)).filter(|d| d.is_dir()).collect();
    if dirs.is_empty() {
        return None;
    }
    let annotations = dirs.iter().find_map(|d| read_json(&d.join("userdata/config.json")));
    let kube = kube(annotations.as_ref().and_then(|s| s.get("annotations")));
    let is_crio = said == Runtime::CriO || kube.names_a_pod();
    // Podman writes no name annotation; its names are in the storage's container list,
    // which may sit under another root than the container's bundle.
    let name = match kube.container {
        Some(_) => None,
        None => roots.containers_storage.iter().find_map(|root| listed_name(root, id)),
    };
    Some(Found { runtime: if is_crio { "cri-o" } else { "podman" }, name, kube })
}

/// `id`'s first name in `<root>/containers.json`, a list of `{"id", "names": [..]}`.
fn listed_name(root: &Path, id: &str) -> Option<String> {
    let list = read_json(&root.join("containers.json"))?;
    let entry = list.as_array()?.iter().find(|c| c.get("id").and_then(Value::as_str) == Some(id))?;
    text(entry.get("names").and_then(|n| n.get(0)))
}

fn text(value: Option<&Value>) -> Option<String> {
    value.and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned)
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&read_capped(path)?).ok()
}

/// At most [`MAX_FILE`] bytes of a regular file: anything else (a FIFO would block the
/// caller forever) is not read. A cut-short JSON file then fails to parse, as it should.
fn read_capped(path: &Path) -> Option<Vec<u8>> {
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    File::open(path).ok()?.take(MAX_FILE).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

#[cfg(test)]
#[path = "container_tests.rs"]
mod tests;
