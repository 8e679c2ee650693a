//! Gauge agent: sees AI agents' LLM calls from TLS plaintext captured in the kernel.
//!
//! The data path, one module per stage:
//! `source` (kernel capture, replay) -> `reassembly` (with `http`) -> `llm` ->
//! `attribution` -> `metering` (tokens, cost, outcomes) -> `anomaly` (detectors,
//! forecasts) -> `policy` (guardrails) -> `export` (Prometheus).
//! `pipeline` chains the synchronous stages; `app` wires the commands.

pub mod anomaly;
pub mod app;
pub mod attribution;
pub mod cli;
pub mod config;
pub mod config_watch;
pub mod export;
pub mod source;
pub mod telemetry;
pub mod top;
pub mod http;
pub mod lifecycle;
pub mod llm;
pub mod metering;
pub mod pipeline;
pub mod policy;
pub mod privileges;
pub mod reassembly;
