//! Capture sources: where [`CaptureEvent`]s come from.
//!
//! The kernel source (`kernel`, `discovery`, `elf`) and the replay of a recording
//! (`recording`) produce the same typed events, so everything downstream can be
//! tested without a kernel. Nothing downstream reads the clock: time comes from events.

pub mod discovery;
pub mod boringssl;
pub mod elf;
pub mod event;
pub mod golang;
pub mod hazards;
pub mod kernel;
pub mod openssl;
pub mod plain;
pub mod recording;
pub mod redact;
pub mod runtime;
pub mod tracefs;

pub use event::{CaptureEvent, Comm, Direction, Payload};
