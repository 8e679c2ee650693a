//! Tests of `container`, kept apart from the module to keep it readable.

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
