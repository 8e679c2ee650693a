//! Names of the maps, programs and globals the agent looks up in the eBPF object.
//! Both sides use these constants so that a rename cannot silently break attachment.

/// Ring buffer carrying [`crate::tls::TlsChunkHeader`] records followed by their bytes.
pub const EVENTS: &str = "EVENTS";
/// Per-CPU array of `u64` counters indexed by [`crate::tls::Stat`] values.
pub const STATS: &str = "STATS";
/// Hash map tgid -> [`crate::enforce::Enforcement`]: processes under a policy.
pub const ENFORCE: &str = "ENFORCE";
/// Array of one `u64`: how many entries `ENFORCE` holds. Zero lets the probes skip
/// their `ENFORCE` lookups; user space raises it after an insert and lowers it
/// after a removal, never the other way round.
pub const ENFORCED: &str = "ENFORCED";
/// LRU hash map [`crate::enforce::ConnectionKey`] -> `u8`: known LLM connections.
pub const LLM_CONNECTIONS: &str = "LLM_CONNECTIONS";
/// Global `u32`: the most bytes captured from one `SSL_write`/`SSL_read` call.
pub const GLOBAL_MAX_CALL_BYTES: &str = "MAX_CALL_BYTES";
/// Global `u64`: the size of `EVENTS` in bytes, set with it at load.
pub const GLOBAL_RING_BYTES: &str = "RING_BYTES";
/// Global `u32`: the agent's own tgid, whose TLS traffic is never captured.
pub const GLOBAL_SELF_TGID: &str = "SELF_TGID";
/// Array of one `u64`: how often the start-up canary's return probe fired.
pub const CANARY_HITS: &str = "CANARY_HITS";
/// Per-CPU array of two `u64`: entries and returns seen by the benchmark's
/// counting-only probes.
pub const FLOOR_HITS: &str = "FLOOR_HITS";
/// Global `u32`: 1 when writes are emitted at `SSL_write*` entry because return
/// probes are off (see `gauge-agent` `source::hazards`).
pub const GLOBAL_WRITE_AT_ENTRY: &str = "WRITE_AT_ENTRY";

/// Hash map `u16` port (host order) -> `u8`: ports whose plain-HTTP connections are
/// captured (`capture.plain_http_ports`).
pub const PLAIN_PORTS: &str = "PLAIN_PORTS";

/// LRU hash map [`crate::tls::PlainSocket`] -> `u64` connection id (top bit set).
pub const PLAIN_FDS: &str = "PLAIN_FDS";

/// Array of one `u64`: successful `listen(2)` calls on the host (approximate: CPUs
/// may race), so that `capture.plain_http = "auto"` looks for a local model server
/// only after one may have appeared.
pub const LISTENS: &str = "LISTENS";

/// Program names (the Rust function names in `gauge-ebpf`).
pub mod programs {
    pub const SSL_WRITE_ENTRY: &str = "ssl_write_entry";
    pub const SSL_WRITE_RETURN: &str = "ssl_write_return";
    pub const SSL_WRITE_EX_ENTRY: &str = "ssl_write_ex_entry";
    pub const SSL_WRITE_EX_RETURN: &str = "ssl_write_ex_return";
    pub const SSL_READ_ENTRY: &str = "ssl_read_entry";
    pub const SSL_READ_RETURN: &str = "ssl_read_return";
    pub const SSL_READ_EX_ENTRY: &str = "ssl_read_ex_entry";
    pub const SSL_READ_EX_RETURN: &str = "ssl_read_ex_return";
    pub const SSL_SHUTDOWN_ENTRY: &str = "ssl_shutdown_entry";
    pub const SSL_FREE_ENTRY: &str = "ssl_free_entry";
    pub const GNUTLS_SEND_ENTRY: &str = "gnutls_send_entry";
    pub const GNUTLS_SEND_RETURN: &str = "gnutls_send_return";
    pub const GNUTLS_RECV_ENTRY: &str = "gnutls_recv_entry";
    pub const GNUTLS_RECV_RETURN: &str = "gnutls_recv_return";
    pub const GNUTLS_CLOSE_ENTRY: &str = "gnutls_close_entry";
    pub const GO_TLS_WRITE_ENTRY: &str = "go_tls_write_entry";
    pub const GO_TLS_WRITE_RETURN: &str = "go_tls_write_return";
    pub const GO_TLS_READ_ENTRY: &str = "go_tls_read_entry";
    pub const GO_TLS_READ_RETURN: &str = "go_tls_read_return";
    pub const GO_TLS_CLOSE_ENTRY: &str = "go_tls_close_entry";
    pub const PLAIN_CONNECT_ENTER: &str = "plain_connect_enter";
    pub const PLAIN_CONNECT_EXIT: &str = "plain_connect_exit";
    pub const PLAIN_WRITE_ENTER: &str = "plain_write_enter";
    pub const PLAIN_WRITEV_ENTER: &str = "plain_writev_enter";
    pub const PLAIN_READ_ENTER: &str = "plain_read_enter";
    pub const PLAIN_IO_EXIT: &str = "plain_io_exit";
    pub const PLAIN_CLOSE_ENTER: &str = "plain_close_enter";
    pub const PLAIN_LISTEN_EXIT: &str = "plain_listen_exit";
    pub const SCHED_PROCESS_EXEC: &str = "sched_process_exec";
    pub const SCHED_PROCESS_EXIT: &str = "sched_process_exit";
    /// The start-up canary's no-op return probe.
    pub const CANARY_RETURN: &str = "canary_return";
    /// The benchmark's counting-only probes (`gauge-agent __probe-floor`).
    pub const FLOOR_ENTRY: &str = "floor_entry";
    pub const FLOOR_RETURN: &str = "floor_return";
}
