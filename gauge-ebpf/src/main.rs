//! Gauge's kernel side: uprobes on TLS libraries that copy plaintext to a ring buffer.
//!
//! The programs only copy and filter; every byte is parsed in user space.
#![no_std]
#![no_main]

mod emit;
mod enforce;
mod maps;
mod probes;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
