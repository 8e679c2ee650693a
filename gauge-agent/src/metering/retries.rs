//! Which calls are retries: the official SDKs say so in `x-stainless-retry-count`;
//! for other clients, a call that repeats the same request body from the same process
//! within a window after a failed call is one.

use std::collections::HashMap;

use crate::reassembly::Metered;

/// Remembered failures, bounded.
pub struct RetryDetector {
    window_ns: u64,
    capacity: usize,
    /// (tgid, body hash) -> end of the failed call.
    failures: HashMap<(u32, u64), u64>,
}

impl RetryDetector {
    pub fn new(window_ns: u64, capacity: usize) -> Self {
        Self { window_ns, capacity, failures: HashMap::new() }
    }

    /// Whether `m` retries an earlier call; remembers it if it failed.
    pub fn observe(&mut self, m: &Metered) -> bool {
        let call = &m.call;
        let key = (m.origin.tgid, call.body_hash);
        let repeats_failure =
            self.failures.get(&key).is_some_and(|failed_at| call.start_ns.saturating_sub(*failed_at) <= self.window_ns);
        let failed = call.status.is_none_or(|s| s == 408 || s == 409 || s == 429 || s >= 500);
        if failed {
            if self.failures.len() >= self.capacity {
                let horizon = call.start_ns.saturating_sub(self.window_ns);
                self.failures.retain(|_, at| *at >= horizon);
                if self.failures.len() >= self.capacity {
                    self.failures.clear();
                }
            }
            self.failures.insert(key, call.end_ns);
        } else {
            self.failures.remove(&key);
        }
        call.retry_count.map_or(repeats_failure, |n| n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        llm::{Endpoint, LlmCall, Provider},
        reassembly::Origin,
    };

    fn call(status: Option<u16>, hash: u64, at: u64, retry_count: Option<u32>) -> Metered {
        Metered {
            origin: Origin { tgid: 1, comm: "bot".into(), cgroup_id: 0, connection: 1 },
            call: LlmCall {
                provider: Provider::OpenAi,
                endpoint: Endpoint::ChatCompletions,
                request_model: None,
                response_model: None,
                status,
                stream: false,
                start_ns: at,
                first_byte_ns: None,
                first_token_ns: None,
                end_ns: at + 10,
                error_type: None,
                request_id: None,
                usage: None,
                usage_source: crate::llm::UsageSource::None,
                retry_count,
                body_hash: hash,
                incomplete: false,
                by_shape: false,
                request: Default::default(),
                exchange: Default::default(),
            },
        }
    }

    #[test]
    fn sdk_header_decides_when_present() {
        let mut d = RetryDetector::new(60_000_000_000, 100);
        assert!(!d.observe(&call(Some(429), 1, 0, Some(0))));
        assert!(d.observe(&call(Some(200), 1, 100, Some(1))));
    }

    #[test]
    fn the_same_body_after_a_failure_is_a_retry_within_the_window() {
        let mut d = RetryDetector::new(1_000, 100);
        assert!(!d.observe(&call(Some(503), 7, 0, None)));
        assert!(d.observe(&call(Some(200), 7, 500, None)), "repeat after a 503");
        assert!(!d.observe(&call(Some(200), 7, 600, None)), "after a success it is a new request");
        assert!(!d.observe(&call(None, 8, 1_000, None)));
        assert!(!d.observe(&call(Some(200), 8, 5_000, None)), "outside the window");
    }
}
