//! Types that cross the kernel boundary between `gauge-ebpf` and `gauge-agent`.
//!
//! Only plain `#[repr(C)]` data lives here: fixed-width integers, explicit padding, no
//! `bool`, enums, `usize` or pointers (their layout or meaning differs between the BPF
//! target and the host). User space decodes them with `TryFrom` (feature `user`).
#![no_std]

pub mod enforce;
pub mod maps;
pub mod tls;

#[cfg(feature = "user")]
pub mod user;
