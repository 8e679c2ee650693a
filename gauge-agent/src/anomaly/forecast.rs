//! Spend forecasts from behaviour, not a flat extrapolation.
//!
//! The model, per agent, on per-minute series:
//! - call rate: level = EWMA of calls per minute (half-life 5 min, idle minutes count
//!   as zero, so a retry storm's jump shows within minutes); trend = Theil-Sen slope
//!   (the median of pairwise slopes) over the last 30 minutes, which follows steady
//!   growth but not a one-off jump (the level takes that);
//! - cost per call: the same on the minutes that had calls, so context growth (each
//!   call carrying the conversation so far) and model mix show as a rising cost per
//!   call;
//! - both trends are damped with a time constant of 60 minutes (Gardner's damped
//!   trend): `x(t) = level + slope * tau * (1 - exp(-t / tau))`, so a trend seen over
//!   half an hour is not extrapolated unchecked over 30 days;
//! - spend rate `r(t) = max(0, calls(t)) * max(0, cost_per_call(t))`, summed minute by
//!   minute over the horizon (coarser steps past a day).
//!
//! A budget's exhaustion time is the first `t` at which the forecast spend covers
//! what is left of it.

use std::collections::{HashMap, VecDeque};

const MINUTE_NS: u64 = 60_000_000_000;
/// Minutes of history kept per agent.
const HISTORY: usize = 120;
const HALF_LIFE_MIN: f64 = 5.0;
const TREND_MINUTES: usize = 30;
const TAU_MIN: f64 = 60.0;
/// Minutes of history before trends are used (before: level only).
const WARMUP: usize = 5;
/// Most steps when summing a horizon.
const MAX_STEPS: u64 = 1440;

#[derive(Debug, Default, Clone)]
struct Series {
    /// (minute, calls, usd), oldest first, gaps are idle minutes.
    minutes: VecDeque<(u64, u64, f64)>,
}

impl Series {
    fn add(&mut self, at_ns: u64, usd: f64) {
        let minute = at_ns / MINUTE_NS;
        match self.minutes.back_mut() {
            Some((m, calls, cost)) if *m >= minute => {
                *calls += 1;
                *cost += usd;
            }
            _ => self.minutes.push_back((minute, 1, usd)),
        }
        while self.minutes.front().is_some_and(|(m, ..)| minute.saturating_sub(*m) >= HISTORY as u64) {
            self.minutes.pop_front();
        }
    }

    /// Dense per-minute (calls, usd) up to and including `now_minute`.
    fn dense(&self, now_minute: u64) -> Vec<(f64, f64)> {
        let Some(first) = self.minutes.front().map(|(m, ..)| *m) else { return Vec::new() };
        let start = first.max(now_minute.saturating_sub(HISTORY as u64 - 1));
        (start..=now_minute)
            .map(|m| self.minutes.iter().find(|(bm, ..)| *bm == m).map_or((0.0, 0.0), |(_, c, u)| (*c as f64, *u)))
            .collect()
    }
}

/// Level and damped trend of one series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trend {
    pub level: f64,
    pub slope: f64,
}

impl Trend {
    pub fn at(&self, minutes: f64) -> f64 {
        self.level + self.slope * TAU_MIN * (1.0 - (-minutes / TAU_MIN).exp())
    }
}

fn ewma(values: impl Iterator<Item = f64>) -> Option<f64> {
    let alpha = 1.0 - 0.5f64.powf(1.0 / HALF_LIFE_MIN);
    values.fold(None, |acc, v| Some(acc.map_or(v, |a: f64| a + alpha * (v - a))))
}

/// The median of the slopes between every pair of points (x = 0, 1, 2, ...).
pub fn theil_sen(values: &[f64]) -> f64 {
    let mut slopes = Vec::with_capacity(values.len() * values.len() / 2);
    for (i, a) in values.iter().enumerate() {
        for (j, b) in values.iter().enumerate().skip(i + 1) {
            slopes.push((b - a) / (j - i) as f64);
        }
    }
    super::detectors::median_of(&mut slopes)
}

/// The model of one agent's spend, from its dense per-minute history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Model {
    pub calls: Trend,
    pub cost_per_call: Trend,
}

impl Model {
    pub fn fit(history: &[(f64, f64)]) -> Option<Self> {
        if history.is_empty() {
            return None;
        }
        let calls: Vec<f64> = history.iter().map(|(c, _)| *c).collect();
        let active: Vec<f64> = history.iter().filter(|(c, _)| *c > 0.0).map(|(c, u)| u / c).collect();
        let recent = |v: &[f64]| v[v.len().saturating_sub(TREND_MINUTES)..].to_vec();
        let warm = history.len() >= WARMUP;
        let trend_of = |v: &[f64]| if warm { theil_sen(&recent(v)) } else { 0.0 };
        Some(Self {
            calls: Trend { level: ewma(calls.iter().copied())?, slope: trend_of(&calls) },
            cost_per_call: Trend { level: ewma(active.iter().copied()).unwrap_or(0.0), slope: trend_of(&active) },
        })
    }

    /// Spend per minute `minutes` from now.
    pub fn rate(&self, minutes: f64) -> f64 {
        self.calls.at(minutes).max(0.0) * self.cost_per_call.at(minutes).max(0.0)
    }

    /// Spend over the next `minutes`.
    pub fn spend(&self, minutes: u64) -> f64 {
        let step = minutes.div_ceil(MAX_STEPS).max(1);
        let mut total = 0.0;
        let mut t = 0;
        while t < minutes {
            let width = step.min(minutes - t);
            total += self.rate(t as f64 + width as f64 / 2.0) * width as f64;
            t += width;
        }
        total
    }

    /// Minutes until the forecast spend reaches `usd`; `None` within `limit` minutes.
    pub fn minutes_to(&self, usd: f64, limit: u64) -> Option<u64> {
        if usd <= 0.0 {
            return Some(0);
        }
        let step = limit.div_ceil(MAX_STEPS).max(1);
        let mut total = 0.0;
        let mut t = 0;
        while t < limit {
            total += self.rate(t as f64 + step as f64 / 2.0) * step as f64;
            t += step;
            if total >= usd {
                return Some(t);
            }
        }
        None
    }
}

/// Per-agent histories.
#[derive(Debug, Default)]
pub struct Forecaster {
    agents: HashMap<String, Series>,
}

impl Forecaster {
    pub fn add(&mut self, agent: &str, at_ns: u64, usd: f64) {
        self.agents.entry(agent.to_owned()).or_default().add(at_ns, usd);
    }

    /// The agents' models at `now_ns`; agents idle for the whole history are dropped.
    pub fn models(&mut self, now_ns: u64) -> Vec<(String, Model)> {
        let now_minute = now_ns / MINUTE_NS;
        self.agents.retain(|_, s| s.minutes.back().is_some_and(|(m, ..)| now_minute.saturating_sub(*m) < HISTORY as u64));
        let mut out: Vec<(String, Model)> =
            self.agents.iter().filter_map(|(a, s)| Model::fit(&s.dense(now_minute)).map(|m| (a.clone(), m))).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

pub mod traces {
    //! Synthetic per-minute traces with known growth, for the back-test (the tests
    //! below and `cargo bench -p gauge-agent --bench forecast`): (calls, usd) for
    //! minutes 0..120.

    /// Call rate growing linearly from 2 to 10 per minute; $0.01 per call.
    pub fn linear() -> Vec<(f64, f64)> {
        (0..120).map(|m| {
            let calls = (2.0 + 8.0 * m as f64 / 120.0).round();
            (calls, calls * 0.01)
        }).collect()
    }

    /// 2 calls a minute, each carrying the conversation so far: cost per call grows
    /// with the number of calls made.
    pub fn compounding_context() -> Vec<(f64, f64)> {
        (0..120).map(|m| (2.0, 2.0 * 0.0005 * (2 * m + 1) as f64)).collect()
    }

    /// 2 calls a minute until a retry storm at minute 50 multiplies them by 5.
    pub fn retry_storm() -> Vec<(f64, f64)> {
        (0..120).map(|m| {
            let calls = if m < 50 { 2.0 } else { 10.0 };
            (calls, calls * 0.01)
        }).collect()
    }

    /// (model error, naive error) forecasting minutes 60..120 from minutes 0..60; the
    /// naive forecast is the last hour's spend again.
    pub fn backtest(trace: &[(f64, f64)]) -> (f64, f64) {
        let actual: f64 = trace[60..120].iter().map(|(_, u)| u).sum();
        let naive: f64 = trace[0..60].iter().map(|(_, u)| u).sum();
        let model = super::Model::fit(&trace[0..60]).map_or(0.0, |m| m.spend(60));
        ((model - actual).abs() / actual, (naive - actual).abs() / actual)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_beats_last_hour_again_on_traces_with_known_growth() {
        for (name, trace) in
            [("linear", traces::linear()), ("compounding context", traces::compounding_context()), ("retry storm", traces::retry_storm())]
        {
            let (model, naive) = traces::backtest(&trace);
            assert!(model < naive, "{name}: model error {model:.3} is not below naive {naive:.3}");
        }
    }

    #[test]
    fn a_jump_moves_the_level_not_the_trend() {
        let step: Vec<f64> = (0..30).map(|m| if m < 20 { 2.0 } else { 10.0 }).collect();
        assert_eq!(theil_sen(&step), 0.0);
        let line: Vec<f64> = (0..30).map(|m| 1.0 + 0.5 * m as f64).collect();
        assert_eq!(theil_sen(&line), 0.5);
    }

    #[test]
    fn a_steady_agent_is_forecast_flat() {
        let steady = vec![(3.0, 0.03); 60];
        let m = Model::fit(&steady).expect("fits");
        assert!((m.spend(60) - 1.8).abs() < 1e-9, "{}", m.spend(60));
        assert_eq!(m.minutes_to(0.9, 60), Some(30));
        assert_eq!(m.minutes_to(10.0, 60), None);
    }

    #[test]
    fn idle_minutes_count_as_zero_and_idle_agents_are_dropped() {
        let mut f = Forecaster::default();
        f.add("bot", 0, 1.0);
        f.add("bot", 10 * MINUTE_NS, 1.0);
        let models = f.models(10 * MINUTE_NS);
        assert_eq!(models.len(), 1);
        assert!(models[0].1.calls.level < 1.0, "idle minutes pull the call rate down");
        assert!(f.models(300 * MINUTE_NS).is_empty());
    }
}
