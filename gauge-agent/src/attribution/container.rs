//! Which container a process runs in. The cgroup path comes first: it is cheap,
//! always there, and every runtime names its containers' cgroups after their 64-hex
//! ids (Docker, containerd, CRI-O, Podman; cgroupfs and systemd drivers; cgroup v1
//! and v2; Kubernetes' `kubepods` paths also carry the pod UID and QoS class). The
//! runtimes' local metadata then only enriches: the container's name and, under
//! Kubernetes, the pod's name and namespace. Missing or malformed metadata is not an
//! error: the container is still known by its id.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
};

use serde_json::Value;

/// Most bytes read from one metadata file.
const MAX_METADATA: u64 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Docker,
    Containerd,
    CriO,
    Podman,
    /// cgroupfs `kubepods` paths do not say which runtime.
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

/// What the cgroup path says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    pub runtime: Runtime,
    /// 64 lower-case hex digits.
    pub id: String,
    pub pod: Option<PodRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
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
    pub qos: &'static str,
    pub name: Option<String>,
    pub namespace: Option<String>,
}

impl Container {
    /// The `container` label: the name when known, else the id's first 12 digits
    /// (as `docker ps` shows it).
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.id.chars().take(12).collect())
    }
}

/// The process's cgroup path from `/proc/PID/cgroup`: the v2 path unless it is the
/// root (hybrid hosts keep containers in v1 hierarchies), else the first v1 path
/// that names a container, else the `name=systemd` one, else any non-root one.
pub fn cgroup_path(proc_cgroup: &str) -> Option<String> {
    let mut v1 = Vec::new();
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else { continue };
        if id == "0" && controllers.is_empty() {
            if path != "/" {
                return Some(path.to_owned());
            }
        } else if path != "/" {
            v1.push((controllers, path));
        }
    }
    v1.iter()
        .find(|(_, path)| parse(path).is_some())
        .or_else(|| v1.iter().find(|(controllers, _)| *controllers == "name=systemd"))
        .or_else(|| v1.first())
        .map(|(_, path)| (*path).to_owned())
}

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A container id in one path component, with the runtime its form names.
fn component_id(part: &str) -> Option<(Runtime, &str)> {
    if is_id(part) {
        return Some((Runtime::Unknown, part));
    }
    // conmon (the monitor process of CRI-O and Podman) is not the container.
    if part.contains("-conmon-") {
        return None;
    }
    let unit = part.strip_suffix(".scope").unwrap_or(part);
    for (prefix, runtime) in [
        ("docker-", Runtime::Docker),
        ("cri-containerd-", Runtime::Containerd),
        ("containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("libpod-", Runtime::Podman),
    ] {
        if let Some(id) = unit.strip_prefix(prefix).filter(|id| is_id(id)) {
            return Some((runtime, id));
        }
    }
    None
}

/// The pod of a `kubepods` component: cgroupfs `pod<uid>`, systemd
/// `kubepods-<qos>-pod<uid_with_underscores>.slice`.
fn component_pod(part: &str) -> Option<String> {
    let uid = match part.strip_suffix(".slice") {
        Some(unit) => unit.rsplit_once("-pod").map(|(_, uid)| uid)?,
        None => part.strip_prefix("pod")?,
    };
    let uid = uid.replace('_', "-");
    (uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(uid)
}

/// The container a cgroup path names; `None` for paths that are not a container's
/// (services, sessions, a pod's own slice). The last component holding an id decides,
/// so nested layouts (a runtime inside a CI job's cgroup) resolve to the innermost.
pub fn parse(path: &str) -> Option<ContainerRef> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let (index, (mut runtime, id)) = parts.iter().enumerate().rev().find_map(|(i, p)| component_id(p).map(|c| (i, c)))?;
    let kube = parts[..index].iter().position(|p| *p == "kubepods" || p.starts_with("kubepods"));
    let pod = kube.and_then(|k| {
        let qos = parts[k..index].iter().find_map(|p| {
            ["besteffort", "burstable"].into_iter().find(|q| p.contains(q))
        });
        let uid = parts[k..index].iter().rev().find_map(|p| component_pod(p))?;
        Some(PodRef { uid, qos: qos.unwrap_or("guaranteed") })
    });
    if runtime == Runtime::Unknown && pod.is_none() {
        // A bare id: cgroupfs Docker (`/docker/<id>`), Podman (`/libpod_parent/libpod-<id>`
        // is caught above), or an unknown runtime.
        if parts[..index].last() == Some(&"docker") {
            runtime = Runtime::Docker;
        }
    }
    Some(ContainerRef { runtime, id: id.to_ascii_lowercase(), pod })
}

/// The last `*.service` or `*.scope` of a path: not a container, but a name for
/// processes that run as systemd units.
pub fn systemd_unit(path: &str) -> Option<String> {
    path.rsplit('/').find(|p| p.ends_with(".service") || p.ends_with(".scope")).map(str::to_owned)
}

/// Where the container runtimes keep their metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataRoots {
    /// Docker: `<id>/config.v2.json`.
    pub docker: PathBuf,
    /// containerd task bundles: `<namespace>/<id>/config.json` (OCI spec).
    pub containerd_tasks: Vec<PathBuf>,
    /// CRI-O and Podman: `<id>/userdata/config.json`, and `containers.json`.
    pub containers_storage: Vec<PathBuf>,
}

impl Default for MetadataRoots {
    fn default() -> Self {
        Self::under(Path::new("/"))
    }
}

impl MetadataRoots {
    /// The roots under `root` (a test tree, or the host's `/` mounted elsewhere).
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

fn read_json(path: &Path) -> Option<Value> {
    let mut bytes = Vec::new();
    std::fs::File::open(path).ok()?.take(MAX_METADATA).read_to_end(&mut bytes).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn text(value: Option<&Value>) -> Option<String> {
    value.and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned)
}

/// Kubernetes facts from a map of annotations or labels, under either the CRI
/// (containerd) or the kubelet (CRI-O, dockershim) keys.
struct KubeKeys {
    container: Option<String>,
    pod: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
}

fn kube_keys(map: Option<&Value>) -> KubeKeys {
    let get = |keys: &[&str]| keys.iter().find_map(|k| text(map.and_then(|m| m.get(*k))));
    KubeKeys {
        container: get(&["io.kubernetes.cri.container-name", "io.kubernetes.container.name"]),
        pod: get(&["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"]),
        namespace: get(&["io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace"]),
        uid: get(&["io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"]),
    }
}

/// What the runtime's files say of the container `r`; never fails.
pub fn describe(roots: &MetadataRoots, r: &ContainerRef) -> Container {
    let mut container = Container {
        runtime: r.runtime.label(),
        id: r.id.clone(),
        name: None,
        pod: r.pod.as_ref().map(|p| Pod { uid: p.uid.clone(), qos: p.qos, name: None, namespace: None }),
    };
    let (runtime, name, kube) = lookup(roots, &r.id).unwrap_or((r.runtime.label(), None, None));
    container.runtime = runtime;
    match kube {
        Some(k) => {
            container.name = k.container.or(name);
            let pod = container.pod.get_or_insert_with(|| Pod { qos: "", ..Pod::default() });
            pod.name = k.pod;
            pod.namespace = k.namespace;
            if let Some(uid) = k.uid.filter(|_| pod.uid.is_empty()) {
                pod.uid = uid;
            }
        }
        None => container.name = name,
    }
    container
}

/// `(runtime, name, kubernetes facts)` from the first runtime that knows `id`.
fn lookup(roots: &MetadataRoots, id: &str) -> Option<(&'static str, Option<String>, Option<KubeKeys>)> {
    if let Some(config) = read_json(&roots.docker.join(id).join("config.v2.json")) {
        let name = text(config.get("Name")).map(|n| n.trim_start_matches('/').to_owned());
        let kube = kube_keys(config.get("Config").and_then(|c| c.get("Labels")));
        return Some(("docker", name, kube.pod.is_some().then_some(kube)));
    }
    for tasks in &roots.containerd_tasks {
        let Ok(namespaces) = std::fs::read_dir(tasks) else { continue };
        for namespace in namespaces.flatten() {
            if let Some(spec) = read_json(&namespace.path().join(id).join("config.json")) {
                let annotations = spec.get("annotations");
                let name = text(annotations.and_then(|a| a.get("nerdctl/name")));
                let kube = kube_keys(annotations);
                return Some(("containerd", name, kube.pod.is_some().then_some(kube)));
            }
        }
    }
    for storage in &roots.containers_storage {
        let dir = storage.join(id);
        if !dir.is_dir() {
            continue;
        }
        let spec = read_json(&dir.join("userdata/config.json"));
        let kube = kube_keys(spec.as_ref().and_then(|s| s.get("annotations")));
        if kube.pod.is_some() {
            return Some(("cri-o", None, Some(kube)));
        }
        return Some(("podman", storage_name(storage, id), None));
    }
    None
}

/// Podman's name for `id`, from the storage's `containers.json` list.
fn storage_name(storage: &Path, id: &str) -> Option<String> {
    let list = read_json(&storage.join("containers.json"))?;
    let entry = list.as_array()?.iter().find(|c| c.get("id").and_then(Value::as_str) == Some(id))?;
    text(entry.get("names").and_then(|n| n.get(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e8a9b2c1d0e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f";
    const UID: &str = "0f3e2a44-8d1b-4c5e-9a77-1234567890ab";

    type Parsed = (Runtime, String, Option<(String, &'static str)>);

    fn parsed(path: &str) -> Option<Parsed> {
        parse(path).map(|r| (r.runtime, r.id, r.pod.map(|p| (p.uid, p.qos))))
    }

    #[test]
    fn runtimes_are_told_by_their_cgroup_names() {
        for (path, runtime) in [
            (format!("/docker/{ID}"), Runtime::Docker),
            (format!("/system.slice/docker-{ID}.scope"), Runtime::Docker),
            (format!("/system.slice/containerd-{ID}.scope"), Runtime::Containerd),
            (format!("/machine.slice/crio-{ID}.scope"), Runtime::CriO),
            (format!("/machine.slice/libpod-{ID}.scope"), Runtime::Podman),
            (format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"), Runtime::Podman),
            (format!("/libpod_parent/libpod-{ID}"), Runtime::Podman),
            (format!("/actions_job/{ID}"), Runtime::Unknown),
        ] {
            assert_eq!(parsed(&path), Some((runtime, ID.to_owned(), None)), "{path}");
        }
    }

    #[test]
    fn kubepods_paths_give_pod_uid_and_qos() {
        let systemd_uid = UID.replace('-', "_");
        for (path, runtime, qos) in [
            (format!("/kubepods/burstable/pod{UID}/{ID}"), Runtime::Unknown, "burstable"),
            (format!("/kubepods/besteffort/pod{UID}/{ID}"), Runtime::Unknown, "besteffort"),
            (format!("/kubepods/pod{UID}/{ID}"), Runtime::Unknown, "guaranteed"),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice/cri-containerd-{ID}.scope"),
                Runtime::Containerd,
                "burstable",
            ),
            (format!("/kubepods.slice/kubepods-pod{systemd_uid}.slice/crio-{ID}.scope"), Runtime::CriO, "guaranteed"),
            (
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{systemd_uid}.slice/docker-{ID}.scope"),
                Runtime::Docker,
                "besteffort",
            ),
        ] {
            assert_eq!(parsed(&path), Some((runtime, ID.to_owned(), Some((UID.to_owned(), qos)))), "{path}");
        }
    }

    #[test]
    fn units_sessions_pod_slices_and_conmon_are_not_containers() {
        for path in [
            "/system.slice/nginx.service".to_owned(),
            "/user.slice/user-1000.slice/session-3.scope".to_owned(),
            format!("/kubepods/burstable/pod{UID}"),
            format!("/machine.slice/libpod-conmon-{ID}.scope"),
            "/process_api/634efdcea8eb6aa1fc794a8b0e1c782c".to_owned(),
            "/".to_owned(),
        ] {
            assert_eq!(parse(&path), None, "{path}");
        }
        assert_eq!(systemd_unit("/system.slice/nginx.service"), Some("nginx.service".into()));
    }

    #[test]
    fn the_telling_cgroup_path_is_chosen() {
        let v2 = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(cgroup_path(&v2), Some(format!("/system.slice/docker-{ID}.scope")));
        let hybrid = format!("9:name=systemd:/\n8:pids:/kubepods/pod{UID}/{ID}\n4:memory:/process_api/634efdcea8eb6aa1fc794a8b0e1c782c\n0::/\n");
        assert_eq!(cgroup_path(&hybrid), Some(format!("/kubepods/pod{UID}/{ID}")));
        let this_host = "9:name=systemd:/\n4:memory:/process_api/634efdcea8eb6aa1fc794a8b0e1c782c\n1:cpu:/\n0::/\n";
        assert_eq!(cgroup_path(this_host), Some("/process_api/634efdcea8eb6aa1fc794a8b0e1c782c".into()));
        let v1_only = "3:name=systemd:/system.slice/cron.service\n2:cpu:/system.slice\n";
        assert_eq!(cgroup_path(v1_only), Some("/system.slice/cron.service".into()));
        assert_eq!(cgroup_path("1:cpu:/\n0::/\n"), None);
    }

    fn write(root: &Path, path: &str, text: &str) {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }

    fn reference(runtime: Runtime) -> ContainerRef {
        ContainerRef { runtime, id: ID.into(), pod: None }
    }

    #[test]
    fn docker_metadata_names_the_container() {
        let root = tempfile::tempdir().expect("tempdir");
        write(root.path(), &format!("var/lib/docker/containers/{ID}/config.v2.json"), r#"{"Name": "/web", "Config": {"Labels": {}}}"#);
        let c = describe(&MetadataRoots::under(root.path()), &reference(Runtime::Docker));
        assert_eq!((c.runtime, c.name.as_deref(), c.label()), ("docker", Some("web"), "web".to_owned()));
    }

    #[test]
    fn containerd_cri_annotations_name_container_pod_and_namespace() {
        let root = tempfile::tempdir().expect("tempdir");
        let spec = format!(
            r#"{{"annotations": {{"io.kubernetes.cri.container-name": "agent", "io.kubernetes.cri.sandbox-name": "bot-7d9f",
               "io.kubernetes.cri.sandbox-namespace": "support", "io.kubernetes.cri.sandbox-uid": "{UID}"}}}}"#
        );
        write(root.path(), &format!("run/containerd/io.containerd.runtime.v2.task/k8s.io/{ID}/config.json"), &spec);
        let r = ContainerRef { runtime: Runtime::Unknown, id: ID.into(), pod: Some(PodRef { uid: UID.into(), qos: "burstable" }) };
        let c = describe(&MetadataRoots::under(root.path()), &r);
        assert_eq!(c.runtime, "containerd");
        assert_eq!(c.name.as_deref(), Some("agent"));
        let pod = c.pod.expect("pod");
        assert_eq!((pod.name.as_deref(), pod.namespace.as_deref(), pod.uid.as_str(), pod.qos), (Some("bot-7d9f"), Some("support"), UID, "burstable"));
    }

    #[test]
    fn cri_o_and_podman_storage_are_told_apart() {
        let root = tempfile::tempdir().expect("tempdir");
        let storage = "run/containers/storage/overlay-containers";
        write(
            root.path(),
            &format!("{storage}/{ID}/userdata/config.json"),
            r#"{"annotations": {"io.kubernetes.container.name": "agent", "io.kubernetes.pod.name": "p", "io.kubernetes.pod.namespace": "ns"}}"#,
        );
        let c = describe(&MetadataRoots::under(root.path()), &reference(Runtime::CriO));
        assert_eq!((c.runtime, c.name.as_deref()), ("cri-o", Some("agent")));
        assert_eq!(c.pod.and_then(|p| p.namespace).as_deref(), Some("ns"));

        let root = tempfile::tempdir().expect("tempdir");
        write(root.path(), &format!("{storage}/{ID}/userdata/config.json"), r#"{"annotations": {}}"#);
        write(root.path(), &format!("{storage}/containers.json"), &format!(r#"[{{"id": "{ID}", "names": ["summarizer"]}}]"#));
        let c = describe(&MetadataRoots::under(root.path()), &reference(Runtime::Podman));
        assert_eq!((c.runtime, c.name.as_deref()), ("podman", Some("summarizer")));
    }

    #[test]
    fn missing_or_malformed_metadata_leaves_the_id() {
        let root = tempfile::tempdir().expect("tempdir");
        write(root.path(), &format!("var/lib/docker/containers/{ID}/config.v2.json"), "{not json");
        let c = describe(&MetadataRoots::under(root.path()), &reference(Runtime::Docker));
        assert_eq!((c.runtime, c.name.clone(), c.label()), ("docker", None, ID[..12].to_owned()));
        let c = describe(&MetadataRoots::under(Path::new("/nonexistent")), &reference(Runtime::Podman));
        assert_eq!((c.runtime, c.label()), ("podman", ID[..12].to_owned()));
    }
}
