//! What discovery reads from executables any process on the host may run (a hostile
//! one included): ELF symbol tables, Go's function table, x86-64 code decoded for
//! Go's RET instructions, and the scan for BoringSSL's known bytes.
#![no_main]
use gauge_agent::source::{boringssl, elf, golang};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = elf::inspect_bytes(data);
    let _ = golang::pclntab_functions(data, &golang::SYMBOLS);
    let _ = golang::function(data, 0x401000);
    let _ = boringssl::find(data, 0);
});
