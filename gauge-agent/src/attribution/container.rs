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
mod tests {
    use super::*;

    const ID: &str = "3f4e8a9b2c1d0e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f";
    const OUTER: &str = "aaaa8a9b2c1d0e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7dbbbb";
    const UID: &str = "0f3e2a44-8d1b-4c5e-9a77-1234567890ab";
    /// This host's own (hybrid) `/proc/self/cgroup`, and its one non-root path.
    const HOST: &str = "9:name=systemd:/\n4:memory:/process_api/634efdcea8eb6aa1fc794a8b0e1c782c\n1:cpu:/\n0::/\n";
    const API: &str = "/process_api/634efdcea8eb6aa1fc794a8b0e1c782c";

    fn plain(runtime: Runtime) -> Option<ContainerRef> {
        Some(ContainerRef { runtime, id: ID.to_owned(), pod: None })
    }

    fn in_pod(runtime: Runtime, uid: &str, qos: &'static str) -> Option<ContainerRef> {
        Some(ContainerRef { runtime, id: ID.to_owned(), pod: Some(PodRef { uid: uid.to_owned(), qos }) })
    }

    #[test]
    fn each_runtime_is_told_by_its_cgroup_name_under_either_driver() {
        for (path, runtime) in [
            (format!("/docker/{ID}"), Runtime::Docker),
            (format!("/system.slice/docker-{ID}.scope"), Runtime::Docker),
            (format!("/system.slice/containerd-{ID}.scope"), Runtime::Containerd),
            (format!("/system.slice/nerdctl-{ID}.scope"), Runtime::Containerd),
            (format!("/system.slice/cri-containerd-{ID}.scope"), Runtime::Containerd),
            (format!("/machine.slice/crio-{ID}.scope"), Runtime::CriO),
            (format!("/machine.slice/libpod-{ID}.scope"), Runtime::Podman),
            (
                format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"),
                Runtime::Podman,
            ),
            (format!("/libpod_parent/libpod-{ID}"), Runtime::Podman),
            (format!("/default/{ID}"), Runtime::Unknown),
            (format!("/docker/{}", ID.to_ascii_uppercase()), Runtime::Docker),
        ] {
            assert_eq!(parse(&path), plain(runtime), "{path}");
        }
    }

    #[test]
    fn kubepods_paths_give_the_pod_and_its_qos_class_under_either_driver() {
        let u = UID.replace('-', "_");
        let (burstable, besteffort) =
            ("kubepods-burstable.slice/kubepods-burstable", "kubepods-besteffort.slice/kubepods-besteffort");
        for (path, runtime, qos) in [
            (format!("/kubepods/burstable/pod{UID}/{ID}"), Runtime::Unknown, "burstable"),
            (format!("/kubepods/besteffort/pod{UID}/{ID}"), Runtime::Unknown, "besteffort"),
            (format!("/kubepods/pod{UID}/{ID}"), Runtime::Unknown, "guaranteed"),
            (format!("/kubepods/burstable/pod{UID}/crio-{ID}"), Runtime::CriO, "burstable"),
            (
                format!("/kubepods.slice/{burstable}-pod{u}.slice/cri-containerd-{ID}.scope"),
                Runtime::Containerd,
                "burstable",
            ),
            (format!("/kubepods.slice/{burstable}-pod{u}.slice/crio-{ID}.scope"), Runtime::CriO, "burstable"),
            (format!("/kubepods.slice/{besteffort}-pod{u}.slice/docker-{ID}.scope"), Runtime::Docker, "besteffort"),
            (
                format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope"),
                Runtime::Containerd,
                "guaranteed",
            ),
        ] {
            assert_eq!(parse(&path), in_pod(runtime, UID, qos), "{path}");
        }
        let static_pod = "d41d8cd98f00b204e9800998ecf8427e";
        let path = format!("/kubepods.slice/kubepods-pod{static_pod}.slice/crio-{ID}.scope");
        assert_eq!(parse(&path), in_pod(Runtime::CriO, static_pod, "guaranteed"), "static pods have hash UIDs");
    }

    #[test]
    fn nested_containers_resolve_to_the_innermost() {
        assert_eq!(parse(&format!("/actions_job/{ID}")), plain(Runtime::Unknown));
        assert_eq!(parse(&format!("/docker/{OUTER}/docker/{ID}")), plain(Runtime::Docker));
        let kind = format!(
            "/system.slice/docker-{OUTER}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
             kubelet-kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        );
        assert_eq!(parse(&kind), in_pod(Runtime::Containerd, UID, "besteffort"), "kind node");
        let in_dind = format!("/docker/{OUTER}/kubepods/burstable/pod{UID}/{ID}");
        assert_eq!(parse(&in_dind), in_pod(Runtime::Unknown, UID, "burstable"));
    }

    #[test]
    fn units_sessions_pod_slices_and_conmon_are_not_containers() {
        for path in [
            "/system.slice/nginx.service".to_owned(),
            "/user.slice/user-1000.slice/session-3.scope".to_owned(),
            format!("/kubepods/burstable/pod{UID}"),
            format!("/kubepods.slice/kubepods-pod{}.slice", UID.replace('-', "_")),
            format!("/machine.slice/libpod-conmon-{ID}.scope"),
            format!("/kubepods.slice/kubepods-pod{}.slice/crio-conmon-{ID}.scope", UID.replace('-', "_")),
            format!("/docker/{}", &ID[..63]),
            API.to_owned(),
            "/".to_owned(),
            String::new(),
        ] {
            assert_eq!(parse(&path), None, "{path:?}");
        }
        assert_eq!(systemd_unit("/system.slice/nginx.service"), Some("nginx.service".into()));
        assert_eq!(systemd_unit("/user.slice/user-1000.slice/session-3.scope"), Some("session-3.scope".into()));
        assert_eq!(systemd_unit("/process_api/x"), None);
    }

    #[test]
    fn the_telling_cgroup_path_is_chosen_on_v2_hybrid_and_v1_hosts() {
        let v2 = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(cgroup_path(&v2), Some(format!("/system.slice/docker-{ID}.scope")));
        let deleted = cgroup_path("0::/system.slice/nginx.service (deleted)\n");
        assert_eq!(deleted.as_deref(), Some("/system.slice/nginx.service"));
        assert_eq!(cgroup_path(HOST).as_deref(), Some(API), "this host");
        let hybrid = format!("9:name=systemd:/system.slice/x.service\n8:pids:/kubepods/pod{UID}/{ID}\n{HOST}");
        assert_eq!(cgroup_path(&hybrid), Some(format!("/kubepods/pod{UID}/{ID}")), "a container beats systemd");
        let shim = format!("4:memory:/docker/{ID}\n0::/system.slice/containerd.service\n");
        assert_eq!(cgroup_path(&shim), Some(format!("/docker/{ID}")), "a v1 container beats a v2 service");
        let both = format!("4:memory:/docker/{OUTER}\n0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(cgroup_path(&both), Some(format!("/system.slice/docker-{ID}.scope")));
        let v1 = "3:cpu,cpuacct:/system.slice\n2:name=systemd:/system.slice/cron.service\n1:memory:/\n";
        assert_eq!(cgroup_path(v1), Some("/system.slice/cron.service".into()));
        assert_eq!(cgroup_path("3:cpu,cpuacct:/user.slice\n2:name=systemd:/\n"), Some("/user.slice".into()));
        assert_eq!(cgroup_path("2:name=systemd:/\n0::/\n"), None);
        assert_eq!(cgroup_path("garbage\n\n"), None);
    }

    const DOCKER: &str = "var/lib/docker/containers/<id>/config.v2.json";
    const TASKS: &str = "run/containerd/io.containerd.runtime.v2.task";
    const CRIO: &str = "run/containers/storage/overlay-containers/<id>/userdata/config.json";
    const PODMAN: &str = "var/lib/containers/storage/overlay-containers";

    fn write(root: &Path, path: &str, body: &str) {
        let path = root.join(path.replace("<id>", ID));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, body).expect("write");
    }

    type Described = (&'static str, Option<String>, Option<Pod>);

    fn described(files: &[(&str, &str)], r: Option<ContainerRef>) -> Described {
        let root = tempfile::tempdir().expect("tempdir");
        files.iter().for_each(|(path, body)| write(root.path(), path, body));
        let c = describe(&MetadataRoots::under(root.path()), &r.expect("a container path"));
        assert_eq!(c.id, ID);
        (c.runtime, c.name, c.pod)
    }

    fn named(runtime: &'static str, name: &str, pod: Option<Pod>) -> Described {
        (runtime, Some(name.to_owned()), pod)
    }

    fn pod(uid: &str, qos: &'static str, name: &str, namespace: Option<&str>) -> Option<Pod> {
        Some(Pod { uid: uid.into(), qos, name: Some(name.into()), namespace: namespace.map(Into::into) })
    }

    #[test]
    fn docker_names_come_from_config_v2_and_dockershim_labels() {
        let web = described(&[(DOCKER, r#"{"Name": "/web"}"#)], plain(Runtime::Unknown));
        assert_eq!(web, named("docker", "web", None), "found by a bare id");
        let labels = r#"{"Name": "/k8s_agent_bot_x", "Config": {"Labels": {"io.kubernetes.container.name": "agent",
            "io.kubernetes.pod.name": "bot", "io.kubernetes.pod.namespace": "support"}}}"#;
        let agent = described(&[(DOCKER, labels)], in_pod(Runtime::Docker, UID, "burstable"));
        assert_eq!(agent, named("docker", "agent", pod(UID, "burstable", "bot", Some("support"))));
    }

    #[test]
    fn containerd_names_come_from_cri_and_nerdctl_annotations() {
        let cri = r#"{"annotations": {"io.kubernetes.cri.container-name": "agent", "io.kubernetes.cri.sandbox-name": "bot",
            "io.kubernetes.cri.sandbox-namespace": "support", "io.kubernetes.cri.sandbox-uid": "u-1"}}"#;
        let k8s = format!("{TASKS}/k8s.io/<id>/config.json");
        let agent = described(&[(&k8s, cri)], in_pod(Runtime::Unknown, UID, "besteffort"));
        assert_eq!(
            agent,
            named("containerd", "agent", pod(UID, "besteffort", "bot", Some("support"))),
            "the path's UID wins"
        );
        let sandbox =
            r#"{"annotations": {"io.kubernetes.cri.sandbox-name": "bot", "io.kubernetes.cri.sandbox-uid": "u-1"}}"#;
        let pause = described(&[(&k8s, sandbox)], plain(Runtime::Unknown));
        assert_eq!(pause, ("containerd", None, pod("u-1", "", "bot", None)), "a pod known from metadata alone");
        let nerdctl = [(&*format!("{TASKS}/default/<id>/config.json"), r#"{"annotations": {"nerdctl/name": "db"}}"#)];
        assert_eq!(described(&nerdctl, plain(Runtime::Unknown)), named("containerd", "db", None));
        let moby = described(&[(&format!("{TASKS}/moby/<id>/config.json"), "{}")], plain(Runtime::Unknown));
        assert_eq!(moby, ("docker", None, None), "Docker's own containerd namespace");
    }

    #[test]
    fn cri_o_and_podman_are_told_apart_in_containers_storage() {
        let crio = r#"{"annotations": {"io.kubernetes.container.name": "agent", "io.kubernetes.pod.name": "bot",
            "io.kubernetes.pod.namespace": "support", "io.kubernetes.pod.uid": "u-2"}}"#;
        let agent = described(&[(CRIO, crio)], plain(Runtime::Unknown));
        assert_eq!(agent, named("cri-o", "agent", pod("u-2", "", "bot", Some("support"))));
        let list = format!(r#"[{{"id": "{OUTER}", "names": ["other"]}}, {{"id": "{ID}", "names": ["summarizer"]}}]"#);
        let bundle = format!("{PODMAN}/<id>/userdata/config.json");
        let files = [(&*bundle, r#"{"annotations": {}}"#), (&*format!("{PODMAN}/containers.json"), &*list)];
        assert_eq!(described(&files, plain(Runtime::Unknown)), named("podman", "summarizer", None));
        let unannotated = described(&[(CRIO, "{}")], plain(Runtime::CriO));
        assert_eq!(unannotated, ("cri-o", None, None), "a crio- cgroup is CRI-O even without annotations");
    }

    #[test]
    fn missing_or_malformed_metadata_leaves_only_runtime_and_id() {
        assert_eq!(described(&[(DOCKER, "{not json")], plain(Runtime::Unknown)), ("docker", None, None));
        let wrong_types = described(&[(DOCKER, r#"{"Name": 7, "Config": []}"#)], plain(Runtime::Docker));
        assert_eq!(wrong_types, ("docker", None, None));
        let files = [(CRIO, "["), (&*format!("{PODMAN}/containers.json"), r#"{"not": "a list"}"#)];
        assert_eq!(described(&files, plain(Runtime::Podman)), ("podman", None, None));
        assert_eq!(described(&[], plain(Runtime::Podman)), ("podman", None, None));
        assert_eq!(described(&[], plain(Runtime::Unknown)), ("unknown", None, None));
        let big = format!(r#"{{"Name": "/web", "pad": "{}"}}"#, " ".repeat(MAX_FILE as usize));
        assert_eq!(described(&[(DOCKER, &big)], plain(Runtime::Docker)), ("docker", None, None), "over the cap");
        let bare = Container { runtime: "docker", id: ID.into(), name: None, pod: None };
        assert_eq!(bare.label(), &ID[..12]);
        let root = tempfile::tempdir().expect("tempdir");
        write(root.path(), "var/lib/docker/containers/x/config.v2.json", r#"{"Name": "/escaped"}"#);
        let forged = ContainerRef { runtime: Runtime::Docker, id: "../containers/x".into(), pod: None };
        assert_eq!(describe(&MetadataRoots::under(root.path()), &forged).name, None, "only real ids are looked up");
    }

    #[test]
    fn a_process_is_read_from_its_proc_cgroup_file() {
        let root = tempfile::tempdir().expect("tempdir");
        let cgroup = format!("0::/system.slice/docker-{ID}.scope\n");
        write(root.path(), "proc/42/cgroup", &cgroup);
        write(root.path(), DOCKER, r#"{"Name": "/web"}"#);
        write(root.path(), "proc/43/cgroup", HOST);
        write(root.path(), "proc/44/cgroup", "0::/\n");
        let (proc, roots) = (root.path().join("proc"), MetadataRoots::under(root.path()));
        let (path, container) = of_process(&proc, 42, &roots).expect("readable");
        assert_eq!((path, container.map(|c| c.label())), (cgroup[3..].trim_end().to_owned(), Some("web".to_owned())));
        assert_eq!(of_process(&proc, 43, &roots), Some((API.to_owned(), None)));
        assert_eq!(of_process(&proc, 44, &roots), Some(("/".to_owned(), None)));
        assert_eq!(of_process(&proc, 45, &roots), None, "gone");
        assert_eq!(MetadataRoots::default().docker, Path::new("/var/lib/docker/containers"));
    }
}
