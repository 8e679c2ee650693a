//! `cargo xtask bench` works end to end: every measurement runs in its quick form
//! against the real daemon, probes and clients, and prints its rows. No figure is
//! checked here (the machines are noisy; the table is for reading), only that each
//! measurement ran and that the exact ones held: calls metered, no events lost,
//! token counts equal to Python tiktoken's.

use std::process::Command;

use gauge_tests::kernel_tests_enabled;

#[test]
fn every_measurement_runs_and_prints_its_rows() {
    if !kernel_tests_enabled("cargo xtask bench --quick") {
        return;
    }
    let output = Command::new(env!("CARGO_BIN_EXE_gauge-bench")).arg("--quick").env("RUST_BACKTRACE", "0").output().expect("run gauge-bench");
    let table = String::from_utf8_lossy(&output.stdout);
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "gauge-bench --quick failed:\n{table}\n{log}");
    for section in ["1. Overhead", "2. Agent cost", "3. Pipeline", "4. Tokenizer", "5. Scale", "6. Gate"] {
        assert!(table.contains(section), "{section} missing:\n{table}");
    }
    assert!(!table.contains("could not measure"), "{table}");
    // Rows whose outcome is exact, not a speed: they must hold even in a quick run.
    for exact in ["calls metered / made", "o200k: counts agree", "cl100k: counts agree", "capture events lost", "LLM calls metered / made"] {
        let row = table.lines().find(|l| l.trim_start().starts_with(exact)).unwrap_or_else(|| panic!("no row {exact}:\n{table}"));
        assert!(row.contains(" yes "), "{exact} does not hold:\n{row}\n\n{table}");
    }
}
