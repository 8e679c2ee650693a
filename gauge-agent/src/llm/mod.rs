//! LLM stage: recognises LLM API calls in HTTP exchanges and reads their exact usage.
//!
//! `providers` is the table that says which request is which API; `usage` reads
//! token counts from provider responses (whole JSON bodies and streamed events);
//! `call` follows one exchange from request to end and produces an [`LlmCall`].
//!
//! Usage kinds never overlap, so they sum to what was processed: `input` is uncached
//! input, `cache_read` and `cache_write` are the cached parts, `output` includes
//! reasoning, and `reasoning` is reported separately as a subset of `output`.
//! OpenTelemetry GenAI mapping: `gen_ai.usage.input_tokens` = input + cache_read +
//! cache_write, `gen_ai.usage.output_tokens` = output.

pub mod call;
pub mod estimate;
pub mod identity;
pub mod providers;
pub mod request;
pub mod usage;

pub use call::{CallTracker, LlmCall, UsageSource};
pub use identity::{CallId, Exchange};
pub use providers::{Endpoint, Provider, Recognized};
pub use request::RequestContext;
pub use usage::Usage;
