//! Gauge agent: sees AI agents' LLM calls from TLS plaintext captured in the kernel.
//!
//! The data path, one module per stage:
//! `source` (kernel capture, replay) -> [reassembly, http, llm, attribution, metering,
//! policy: later stages] -> `export` (Prometheus). `app` wires the stages together.

pub mod app;
pub mod cli;
pub mod config;
pub mod export;
pub mod source;
pub mod telemetry;
pub mod http;
pub mod llm;
pub mod metering;
pub mod pipeline;
pub mod reassembly;
