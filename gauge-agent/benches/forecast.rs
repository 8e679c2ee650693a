//! Back-test of the spend forecast against the naive "last hour again", on synthetic
//! traces with known growth: `cargo bench -p gauge-agent --bench forecast`. Prints
//! each forecast's relative error over the next hour, side by side.

use gauge_agent::anomaly::forecast::traces;

fn main() {
    println!("{:<22} {:>12} {:>12} {:>8}", "trace", "model error", "naive error", "ratio");
    for (name, trace) in
        [("linear growth", traces::linear()), ("compounding context", traces::compounding_context()), ("retry storm", traces::retry_storm())]
    {
        let (model, naive) = traces::backtest(&trace);
        println!("{name:<22} {:>11.1}% {:>11.1}% {:>8.2}", model * 100.0, naive * 100.0, naive / model.max(1e-9));
    }
}
