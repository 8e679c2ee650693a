//! Tests of `cgroup`, kept apart from the module to keep it readable.

use super::*;
use std::fs;

const HYBRID: &str = "9:name=systemd:/\n8:pids:/\n6:freezer:/docker/abc\n\
    4:memory:/process_api/634e\n1:cpu,cpuacct:/docker/abc\n0::/system.slice/docker-abc.scope\n";

fn placement(v2: Option<&str>, freezer: Option<&str>, cpu: Option<&str>) -> Placement {
    let s = |o: Option<&str>| o.map(String::from);
    Placement {
        v2: s(v2),
        freezer: s(freezer),
        cpu: s(cpu),
    }
}

fn put(path: &Path, content: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

/// Hybrid layout with the cpu controller co-mounted as "cpu,cpuacct".
fn hybrid() -> (tempfile::TempDir, CgroupFs) {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    put(&r.join("unified/cgroup.controllers"), "");
    put(&r.join("freezer/docker/abc/freezer.state"), "THAWED\n");
    put(&r.join("cpu,cpuacct/docker/abc/cpu.cfs_quota_us"), "-1\n");
    put(
        &r.join("cpu,cpuacct/docker/abc/cpu.cfs_period_us"),
        "100000\n",
    );
    fs::create_dir_all(r.join("cpuset")).unwrap();
    let fs = CgroupFs::new(r);
    (tmp, fs)
}

fn pure_v2() -> (tempfile::TempDir, CgroupFs) {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    put(&r.join("cgroup.controllers"), "cpu memory");
    let d = r.join("system.slice/app.service");
    put(&d.join("cgroup.freeze"), "0\n");
    put(&d.join("cgroup.events"), "populated 1\nfrozen 1\n");
    put(&d.join("cpu.max"), "max 100000\n");
    put(&d.join("cgroup.procs"), "12\n7\n");
    put(&d.join("worker/cgroup.procs"), "30\n");
    let fs = CgroupFs::new(r);
    (tmp, fs)
}

#[test]
fn of_process_parses_all_layouts() {
    let fs = CgroupFs::new("/nonexistent");
    assert_eq!(
        fs.of_process(HYBRID),
        placement(
            Some("/system.slice/docker-abc.scope"),
            Some("/docker/abc"),
            Some("/docker/abc")
        )
    );
    assert_eq!(
        fs.of_process("0::/user.slice/a:b.scope\n"),
        placement(Some("/user.slice/a:b.scope"), None, None)
    );
    assert_eq!(
        fs.of_process("3:freezer:/x\n2:cpuacct:/y\n1:cpu:/z\n"),
        placement(None, Some("/x"), Some("/z"))
    );
    assert_eq!(fs.of_process("garbage\n"), placement(None, None, None));
}

#[test]
fn root_and_missing_and_dotdot_are_refused() {
    let (_tmp, fs) = hybrid();
    let here = fs.of_process("6:freezer:/\n1:cpu:/\n0::/\n");
    assert!(matches!(fs.freeze(&here), Err(CgroupError::Root)));
    assert!(matches!(fs.throttle(&here, 0.5), Err(CgroupError::Root)));
    assert!(matches!(fs.pids(&here), Err(CgroupError::Root)));
    let none = placement(None, None, None);
    assert!(matches!(
        fs.freeze(&none),
        Err(CgroupError::NoController("freezer"))
    ));
    let escape = placement(None, Some("/docker/../../etc"), None);
    let err = fs.freeze(&escape).unwrap_err();
    assert!(
        matches!(&err, CgroupError::Io { source, .. } if source.kind() == std::io::ErrorKind::InvalidInput)
    );
    assert!(err.to_string().contains(".."));
}

#[test]
fn hybrid_freezes_and_throttles_through_v1() {
    let (tmp, fs) = hybrid();
    let p = fs.of_process(HYBRID);
    // The unified directory has no cgroup.freeze, as on docker's cgroupfs driver.
    let f = fs.freeze(&p).unwrap();
    let dir = tmp.path().join("freezer/docker/abc");
    assert_eq!(
        f,
        Frozen {
            dir: dir.clone(),
            v2: false
        }
    );
    assert_eq!(
        fs::read_to_string(dir.join("freezer.state")).unwrap(),
        "FROZEN"
    );
    fs.thaw(&f).unwrap();
    assert_eq!(
        fs::read_to_string(dir.join("freezer.state")).unwrap(),
        "THAWED"
    );

    let cpu = tmp.path().join("cpu,cpuacct/docker/abc");
    let t = fs.throttle(&p, 0.25).unwrap();
    assert!(!t.v2);
    assert_eq!(
        fs::read_to_string(cpu.join("cpu.cfs_quota_us")).unwrap(),
        "25000"
    );
    assert_eq!(
        fs::read_to_string(cpu.join("cpu.cfs_period_us")).unwrap(),
        "100000"
    );
    fs.restore(&t).unwrap();
    assert_eq!(
        fs::read_to_string(cpu.join("cpu.cfs_quota_us")).unwrap(),
        "-1"
    );
    assert_eq!(
        fs::read_to_string(cpu.join("cpu.cfs_period_us")).unwrap(),
        "100000"
    );
}

#[test]
fn v1_controller_found_through_symlink_or_exact_name() {
    let (tmp, fs) = hybrid();
    std::os::unix::fs::symlink(tmp.path().join("cpu,cpuacct"), tmp.path().join("cpu")).unwrap();
    let t = fs
        .throttle(&placement(None, None, Some("/docker/abc")), 0.0)
        .unwrap();
    assert_eq!(t.dir, tmp.path().join("cpu/docker/abc"));
    assert_eq!(
        fs::read_to_string(t.dir.join("cpu.cfs_quota_us")).unwrap(),
        "1000"
    );
}

#[test]
fn pure_v2_freeze_throttle_restore_pids() {
    let (tmp, fs) = pure_v2();
    let p = fs.of_process("0::/system.slice/app.service\n");
    let dir = tmp.path().join("system.slice/app.service");
    let f = fs.freeze(&p).unwrap();
    assert_eq!(
        f,
        Frozen {
            dir: dir.clone(),
            v2: true
        }
    );
    assert_eq!(fs::read_to_string(dir.join("cgroup.freeze")).unwrap(), "1");
    fs.thaw(&f).unwrap();
    assert_eq!(fs::read_to_string(dir.join("cgroup.freeze")).unwrap(), "0");

    let t = fs.throttle(&p, 2.0).unwrap();
    assert_eq!(
        fs::read_to_string(dir.join("cpu.max")).unwrap(),
        "100000 100000"
    );
    let t2 = fs.throttle(&p, 0.05).unwrap();
    assert_eq!(
        fs::read_to_string(dir.join("cpu.max")).unwrap(),
        "5000 100000"
    );
    fs.restore(&t2).unwrap();
    fs.restore(&t).unwrap();
    assert_eq!(
        fs::read_to_string(dir.join("cpu.max")).unwrap(),
        "max 100000"
    );

    assert_eq!(fs.pids(&p).unwrap(), vec![7, 12, 30]);
    put(&dir.join("cgroup.procs"), "12\nnope\n");
    assert!(fs.pids(&p).is_err());
}

#[test]
fn v2_freeze_times_out_and_thaws_back() {
    let (tmp, fs) = pure_v2();
    let dir = tmp.path().join("system.slice/app.service");
    put(&dir.join("cgroup.events"), "populated 1\nfrozen 0\n");
    let p = placement(Some("/system.slice/app.service"), None, None);
    assert!(matches!(fs.freeze(&p), Err(CgroupError::Timeout(d)) if d == dir));
    assert_eq!(fs::read_to_string(dir.join("cgroup.freeze")).unwrap(), "0");
}

/// Removes the test cgroups even when an assertion fails half-way.
struct Cleanup {
    child: Option<std::process::Child>,
    dirs: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for d in &self.dirs {
            // A task frozen in v1 cannot take SIGKILL until thawed.
            let _ = fs::write(d.join("freezer.state"), "THAWED");
            let _ = fs::write(d.join("cgroup.freeze"), "0");
        }
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in &self.dirs {
            for _ in 0..50 {
                if fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(POLL);
            }
        }
    }
}

#[test]
fn real_cgroups_as_root() {
    let root = Path::new("/sys/fs/cgroup");
    // Read from /proc rather than calling geteuid, to stay free of libc and unsafe.
    let is_root = fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    });
    if !is_root || !root.join("unified/cgroup.procs").exists() {
        eprintln!("skipping real_cgroups_as_root: needs root and a hybrid /sys/fs/cgroup");
        return;
    }
    let name = format!("gauge-cgtest-{}", std::process::id());
    let path = format!("/{name}");
    let mut guard = Cleanup {
        child: None,
        dirs: Vec::new(),
    };
    for h in ["unified", "freezer", "cpu"] {
        let d = root.join(h).join(&name);
        fs::create_dir(&d).unwrap();
        guard.dirs.push(d);
    }
    let child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = child.id();
    guard.child = Some(child);
    let cg = CgroupFs::new(root);

    let v2 = root.join("unified").join(&name);
    fs::write(v2.join("cgroup.procs"), pid.to_string()).unwrap();
    let p = placement(Some(&path), None, None);
    assert_eq!(cg.pids(&p).unwrap(), vec![pid]);
    let f = cg.freeze(&p).unwrap();
    assert!(f.v2);
    assert!(
        fs::read_to_string(v2.join("cgroup.events"))
            .unwrap()
            .contains("frozen 1")
    );
    cg.thaw(&f).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        fs::read_to_string(v2.join("cgroup.events"))
            .unwrap()
            .contains("frozen 0")
    );

    let v1 = root.join("freezer").join(&name);
    fs::write(v1.join("cgroup.procs"), pid.to_string()).unwrap();
    let p = placement(Some("/"), Some(&path), None);
    let f = cg.freeze(&p).unwrap();
    assert!(!f.v2);
    assert_eq!(
        fs::read_to_string(v1.join("freezer.state")).unwrap().trim(),
        "FROZEN"
    );
    cg.thaw(&f).unwrap();
    assert_eq!(
        fs::read_to_string(v1.join("freezer.state")).unwrap().trim(),
        "THAWED"
    );

    let cpu = root.join("cpu").join(&name);
    let t = cg
        .throttle(&placement(Some("/"), None, Some(&path)), 0.05)
        .unwrap();
    assert_eq!(t.dir, cpu);
    assert_eq!(
        fs::read_to_string(cpu.join("cpu.cfs_quota_us"))
            .unwrap()
            .trim(),
        "5000"
    );
    cg.restore(&t).unwrap();
    assert_eq!(
        fs::read_to_string(cpu.join("cpu.cfs_quota_us"))
            .unwrap()
            .trim(),
        "-1"
    );
}
