//! Plain-HTTP connections already open when the daemon starts (a keep-alive client
//! of a local model server, a daemon restart): the kernel marks sockets only at
//! `connect`, so these are found in `/proc` and marked once at start. Their first
//! bytes are then seen mid-stream, and reassembly resyncs on the next request.
//! Also whether a local model server listens at all (`capture.plain_http = "auto"`).

use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

/// (tgid, fd) of every established TCP socket whose remote port is in `ports`.
pub fn established(proc_root: &Path, pids: &[u32], ports: &[u16]) -> Vec<(u32, u32)> {
    let mut by_netns: HashMap<String, HashSet<u64>> = HashMap::new();
    let mut found = Vec::new();
    for &pid in pids {
        let dir = proc_root.join(pid.to_string());
        let Ok(netns) = std::fs::read_link(dir.join("ns/net")) else { continue };
        let sockets = by_netns.entry(netns.display().to_string()).or_insert_with(|| {
            ["net/tcp", "net/tcp6"]
                .iter()
                .filter_map(|table| std::fs::read_to_string(dir.join(table)).ok())
                .flat_map(|text| to_ports(&text, ports))
                .collect()
        });
        if sockets.is_empty() {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else { continue };
        for fd in fds.flatten() {
            let Some(number) = fd.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            if socket_inode(&target.display().to_string()).is_some_and(|inode| sockets.contains(&inode)) {
                found.push((pid, number));
            }
        }
    }
    found
}

/// Socket inodes of the established connections to `ports` in a `/proc/net/tcp[6]`
/// table.
pub fn to_ports(table: &str, ports: &[u16]) -> Vec<u64> {
    const ESTABLISHED: &str = "01";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote = fields.get(2)?;
            let port = u16::from_str_radix(remote.rsplit(':').next()?, 16).ok()?;
            (*fields.get(3)? == ESTABLISHED && ports.contains(&port)).then_some(())?;
            fields.get(9)?.parse().ok()
        })
        .collect()
}

/// Whether a process listens on one of `ports` in any network namespace of `pids`:
/// a local model server, for `capture.plain_http = "auto"`.
pub fn listening(proc_root: &Path, pids: &[u32], ports: &[u16]) -> bool {
    let mut seen = HashSet::new();
    pids.iter().any(|pid| {
        let dir = proc_root.join(pid.to_string());
        let Ok(netns) = std::fs::read_link(dir.join("ns/net")) else { return false };
        if seen.contains(&netns) {
            return false;
        }
        let tables: Vec<String> = ["net/tcp", "net/tcp6"].iter().filter_map(|table| std::fs::read_to_string(dir.join(table)).ok()).collect();
        // A namespace counts as looked at only once its tables were read (the
        // process may have exited in between).
        if !tables.is_empty() {
            seen.insert(netns);
        }
        tables.iter().any(|text| listens(text, ports))
    })
}

/// Whether a `/proc/net/tcp[6]` table has a listening socket on one of `ports`.
pub fn listens(table: &str, ports: &[u16]) -> bool {
    const LISTEN: &str = "0A";
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = fields.get(1).and_then(|local| u16::from_str_radix(local.rsplit(':').next()?, 16).ok());
        fields.get(3) == Some(&LISTEN) && port.is_some_and(|p| ports.contains(&p))
    })
}

/// `socket:[12345]` -> 12345.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn established_connections_to_listed_ports_are_picked_from_the_tcp_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:C350 0100007F:2CAE 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1\n\
           1: 0100007F:2CAE 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 100 0 0 10 0\n\
           2: 0100007F:C351 0100007F:01BB 01 00000000:00000000 00:00000000 00000000     0        0 4244 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(to_ports(table, &[11438]), [4242], "the listener (0A) and another port are not");
        assert!(listens(table, &[11438]), "0100007F:2CAE is a listener on 11438");
        assert!(!listens(table, &[50000]), "C350 is a client's port, not a listener's");
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn this_process_s_own_connection_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let found = established(Path::new("/proc"), &[std::process::id()], &[port]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(listening(Path::new("/proc"), &[std::process::id()], &[port]));
    }
}
