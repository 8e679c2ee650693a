//! Exporting what Gauge measured: Prometheus metrics and the HTTP listener.

pub mod metrics;
pub mod otlp;
pub mod server;
