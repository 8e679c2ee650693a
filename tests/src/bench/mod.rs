//! `cargo xtask bench`: Gauge's costs, each measured as a ratio side by side in one
//! run (see docs/PERFORMANCE.md). Each measurement returns rows for the table; none
//! asserts a speed, since the machines are noisy: the table says where a target is
//! met, and `--check` turns a missed target into a failed run for those who want it.

pub mod agent_cost;
pub mod gate;
pub mod pipeline;
pub mod probes;
pub mod proc_stat;
pub mod scale;
pub mod stream_server;
pub mod tokenizer;

use std::fmt::Write as _;

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured, e.g. "SSL_write: added per hit".
    pub name: String,
    /// The figure, with its unit.
    pub value: String,
    /// The target as text ("" when there is none).
    pub target: String,
    /// Whether the target is met; None when there is no target.
    pub met: Option<bool>,
    /// How it was measured, in a few words.
    pub how: String,
}

impl Row {
    pub fn new(name: impl Into<String>, value: impl Into<String>, how: impl Into<String>) -> Self {
        Self { name: name.into(), value: value.into(), target: String::new(), met: None, how: how.into() }
    }

    /// The same row with a target and whether it holds.
    pub fn target(mut self, target: impl Into<String>, met: bool) -> Self {
        self.target = target.into();
        self.met = Some(met);
        self
    }
}

/// How much work each measurement does: `Quick` only proves the measurement runs
/// (the suite uses it), `Full` gives figures worth quoting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Quick,
    Full,
}

impl Scale {
    /// `full` when measuring, `quick` when only checking the bench works.
    pub fn pick<T>(self, quick: T, full: T) -> T {
        match self {
            Scale::Quick => quick,
            Scale::Full => full,
        }
    }
}

/// The table, as printed: one section per measurement.
pub fn table(sections: &[(&str, Vec<Row>)]) -> String {
    let widths = |f: fn(&Row) -> usize| sections.iter().flat_map(|(_, rows)| rows.iter().map(f)).max().unwrap_or(0);
    let name_w = widths(|r| r.name.chars().count()).max(7);
    let value_w = widths(|r| r.value.chars().count()).max(5);
    let target_w = widths(|r| r.target.chars().count()).max(6);
    let mut out = String::new();
    for (title, rows) in sections {
        let _ = writeln!(out, "\n{title}");
        let _ = writeln!(out, "  {:<name_w$}  {:>value_w$}  {:<target_w$}  {:<4}  how", "measure", "value", "target", "met");
        for row in rows {
            let met = match row.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            };
            let _ = writeln!(out, "  {:<name_w$}  {:>value_w$}  {:<target_w$}  {:<4}  {}", row.name, row.value, row.target, met, row.how);
        }
    }
    out
}

/// Median of a non-empty sample (sorts it).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lines_up_and_marks_missed_targets() {
        let rows = vec![
            Row::new("a", "1.0 us", "loop").target("<= 2 us", true),
            Row::new("longer name", "3 MB/s", "replay").target(">= 500 MB/s", false),
            Row::new("c", "7", "count"),
        ];
        let text = table(&[("Section", rows)]);
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("  ")).collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[2].contains("NO"), "{text}");
        assert!(lines[1].contains("yes"), "{text}");
        let column = |l: &str| l.find("how").or_else(|| l.find("loop")).or_else(|| l.find("replay")).or_else(|| l.find("count"));
        assert_eq!(column(lines[0]), column(lines[1]), "{text}");
        assert_eq!(column(lines[1]), column(lines[2]), "{text}");
    }

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
