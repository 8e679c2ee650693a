//! LLM list prices (an embedded table plus user overrides) and exact call costs.
//!
//! Model matching: an entry with `model = "gpt-4o"` matches "gpt-4o" itself and
//! "gpt-4o" followed by `-` or `@` and a suffix, so dated snapshots
//! ("gpt-4o-2024-08-06", "claude-sonnet-4-5-20250929", "gemini-2.5-flash-001") and
//! Vertex-style versions ("claude-sonnet-4-5@20250929") need no entry of their own.
//! Matching is case-sensitive. A leading "models/" (Gemini) is ignored. An entry with
//! `model_regex` matches when the pattern matches the whole name (it is anchored
//! here). An entry with `provider` applies only to calls with that provider label.
//!
//! Lookup order: user overrides first, in file order, the first match winning (the
//! user controls precedence by ordering); then the embedded table, where the longest
//! matching `model` wins so that "gpt-4o-mini-2024-07-18" is priced as gpt-4o-mini
//! and not as gpt-4o, and regex entries are tried only when no name matches. In the
//! embedded table the longest name the model starts with decides even without a
//! separator, so "gpt-4o-minix" is unpriced rather than priced as gpt-4o: a new
//! variant is more often a new price than a snapshot.
//!
//! Prices become integer pico-USD per token once, at load: prices with up to six
//! decimals are then exact and costs sum without rounding drift.

use std::ops::Add;

use regex::Regex;
use serde::{Deserialize, Deserializer, de::Error as _};

/// The embedded table, as shipped (`gauge-agent prices` prints it).
pub const EMBEDDED: &str = include_str!("../../prices.toml");

/// USD per million tokens, validated non-negative and finite at deserialization.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UsdPerMillion(f64);

impl UsdPerMillion {
    /// `None` for a negative, NaN or infinite price.
    pub fn new(usd: f64) -> Option<Self> {
        (usd.is_finite() && usd >= 0.0).then_some(Self(usd))
    }

    pub fn get(self) -> f64 {
        self.0
    }

    /// 1 USD per million tokens is 1e6 pico-USD per token; `as` saturates, and
    /// `new` has already ruled out negatives and NaN.
    fn pico_per_token(self) -> u128 {
        (self.0 * 1e6).round() as u128
    }
}

impl<'de> Deserialize<'de> for UsdPerMillion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let usd = f64::deserialize(deserializer)?;
        Self::new(usd).ok_or_else(|| {
            D::Error::custom(format!("a price must be a non-negative number of USD per million tokens, got {usd}"))
        })
    }
}

/// A regex validated at deserialization (so toml's error names line and key).
#[derive(Debug, Clone)]
pub struct ModelRegex(Regex);

impl ModelRegex {
    /// Anchors `pattern` so it must match the whole model name.
    pub fn new(pattern: &str) -> Result<Self, regex::Error> {
        Regex::new(&format!("^(?:{pattern})$")).map(Self)
    }

    fn is_match(&self, model: &str) -> bool {
        self.0.is_match(model)
    }
}

impl PartialEq for ModelRegex {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl<'de> Deserialize<'de> for ModelRegex {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let pattern = String::deserialize(deserializer)?;
        Self::new(&pattern)
            .map_err(|err| D::Error::custom(format!("model_regex {pattern:?} is not a valid regex: {err}")))
    }
}

/// One `[[prices]]` entry, USD per million tokens.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceEntry {
    pub provider: Option<String>,
    pub model: Option<String>,
    pub model_regex: Option<ModelRegex>,
    pub input: UsdPerMillion,
    pub cache_read: Option<UsdPerMillion>,
    pub cache_write: Option<UsdPerMillion>,
    pub output: UsdPerMillion,
    pub long_context: Option<LongContext>,
}

/// Rates for the whole call once its prompt exceeds a size (Claude Sonnet 4/4.5 with
/// the 1M context, Gemini Pro above 200k tokens).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LongContext {
    /// The tier applies when input + cache_read + cache_write tokens exceed this.
    pub above_input_tokens: u64,
    pub input: UsdPerMillion,
    pub cache_read: Option<UsdPerMillion>,
    pub cache_write: Option<UsdPerMillion>,
    pub output: UsdPerMillion,
}

impl PriceEntry {
    /// Checks what serde cannot express; the error is the reason, ready to show.
    pub fn validate(&self) -> Result<(), &'static str> {
        match (&self.model, &self.model_regex) {
            (Some(_), Some(_)) => Err("must set only one of `model` and `model_regex`, not both"),
            (None, None) => Err("must set `model` (a model name) or `model_regex`"),
            (Some(model), None) if model.is_empty() => Err("`model` must be a model name, not empty"),
            _ => Ok(()),
        }
    }

    /// How the entry is named in error messages.
    fn describe(&self) -> String {
        match (&self.model, &self.model_regex) {
            (Some(model), _) => format!("model = {model:?}"),
            (None, Some(re)) => format!("model_regex = {:?}", re.0.as_str()),
            (None, None) => "no model".to_owned(),
        }
    }
}

/// Token counts of one call. The kinds do not overlap: `input` is the uncached part
/// of the prompt, so a caller holding a total prompt count must subtract the cached
/// tokens first or they are charged twice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub output: u64,
}

/// A cost in pico-USD (1e-12 USD): integer, so sums are exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cost {
    pub pico_usd: u128,
}

impl Cost {
    pub fn usd(self) -> f64 {
        self.pico_usd as f64 / 1e12
    }
}

impl Add for Cost {
    type Output = Cost;

    /// Saturates: a meter that stops at u128::MAX pico-USD beats one that panics.
    fn add(self, other: Cost) -> Cost {
        Cost { pico_usd: self.pico_usd.saturating_add(other.pico_usd) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    #[error("Gauge's built-in price table is broken, a bug in Gauge; please report it: {0}")]
    Embedded(String),
    #[error("price override #{index} ({name}) is invalid: {reason}")]
    Override { index: usize, name: String, reason: &'static str },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    as_of: String,
    prices: Vec<PriceEntry>,
}

/// Integer pico-USD per token for each token kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rates {
    input: u128,
    cache_read: u128,
    cache_write: u128,
    output: u128,
}

impl Rates {
    fn new(
        input: UsdPerMillion,
        cache_read: Option<UsdPerMillion>,
        cache_write: Option<UsdPerMillion>,
        output: UsdPerMillion,
    ) -> Self {
        Self {
            input: input.pico_per_token(),
            cache_read: cache_read.unwrap_or(input).pico_per_token(),
            cache_write: cache_write.unwrap_or(input).pico_per_token(),
            output: output.pico_per_token(),
        }
    }

    fn cost(&self, tokens: Tokens) -> Cost {
        let part = |count: u64, rate: u128| Cost { pico_usd: u128::from(count).saturating_mul(rate) };
        part(tokens.input, self.input)
            + part(tokens.cache_read, self.cache_read)
            + part(tokens.cache_write, self.cache_write)
            + part(tokens.output, self.output)
    }
}

#[derive(Debug)]
enum Matcher {
    Name(String),
    Regex(ModelRegex),
}

#[derive(Debug)]
struct Entry {
    provider: Option<String>,
    matcher: Matcher,
    base: Rates,
    long_context: Option<(u64, Rates)>,
}

impl Entry {
    fn compile(entry: PriceEntry) -> Result<Self, &'static str> {
        entry.validate()?;
        let matcher = match (entry.model, entry.model_regex) {
            (Some(model), None) => Matcher::Name(model),
            (None, Some(re)) => Matcher::Regex(re),
            _ => return Err("must set exactly one of `model` and `model_regex`"),
        };
        let long_context = entry
            .long_context
            .map(|lc| (lc.above_input_tokens, Rates::new(lc.input, lc.cache_read, lc.cache_write, lc.output)));
        Ok(Self {
            provider: entry.provider,
            matcher,
            base: Rates::new(entry.input, entry.cache_read, entry.cache_write, entry.output),
            long_context,
        })
    }

    fn applies_to(&self, provider: &str) -> bool {
        self.provider.as_deref().is_none_or(|p| p == provider)
    }

    /// When `model` starts with this entry's name: the name's length and whether the
    /// name ends at a boundary (end, or `-`/`@` and a suffix).
    fn name_prefix(&self, model: &str) -> Option<(usize, bool)> {
        let Matcher::Name(name) = &self.matcher else { return None };
        let rest = model.strip_prefix(name.as_str())?;
        Some((name.len(), rest.is_empty() || (rest.len() > 1 && rest.starts_with(['-', '@']))))
    }

    fn matches(&self, model: &str) -> bool {
        match &self.matcher {
            Matcher::Name(_) => self.name_prefix(model).is_some_and(|(_, at_boundary)| at_boundary),
            Matcher::Regex(re) => re.is_match(model),
        }
    }

    fn cost(&self, tokens: Tokens) -> Cost {
        let prompt = tokens.input.saturating_add(tokens.cache_read).saturating_add(tokens.cache_write);
        match self.long_context {
            Some((above, rates)) if prompt > above => rates.cost(tokens),
            _ => self.base.cost(tokens),
        }
    }
}

/// The price table the meter consults: user overrides, then the embedded list.
#[derive(Debug)]
pub struct PriceTable {
    as_of: String,
    overrides: Vec<Entry>,
    embedded: Vec<Entry>,
}

impl PriceTable {
    /// The embedded table (its parse is tested; a Result all the same, never a panic).
    pub fn embedded() -> Result<Self, PriceError> {
        Self::with_overrides(Vec::new())
    }

    /// The embedded table with `overrides` taking precedence, first match winning.
    pub fn with_overrides(overrides: Vec<PriceEntry>) -> Result<Self, PriceError> {
        let file: PriceFile = toml::from_str(EMBEDDED).map_err(|err| PriceError::Embedded(err.to_string()))?;
        let embedded = compile_all(file.prices, |index, name, reason| {
            PriceError::Embedded(format!("entry #{index} ({name}) is invalid: {reason}"))
        })?;
        let overrides = compile_all(overrides, |index, name, reason| PriceError::Override { index, name, reason })?;
        Ok(Self { as_of: file.as_of, overrides, embedded })
    }

    /// The date the embedded list prices were taken from.
    pub fn as_of(&self) -> &str {
        &self.as_of
    }

    /// None when no entry prices this model.
    pub fn cost(&self, provider: &str, model: &str, tokens: Tokens) -> Option<Cost> {
        self.find(provider, model).map(|entry| entry.cost(tokens))
    }

    /// Entries in the table, overrides included.
    pub fn len(&self) -> usize {
        self.overrides.len() + self.embedded.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn find(&self, provider: &str, model: &str) -> Option<&Entry> {
        let model = model.strip_prefix("models/").unwrap_or(model);
        if let Some(entry) = self.overrides.iter().find(|e| e.applies_to(provider) && e.matches(model)) {
            return Some(entry);
        }
        let applicable = || self.embedded.iter().filter(|e| e.applies_to(provider));
        // The longest name decides even when it fails the boundary test, so that
        // "gpt-4o-minix" is not priced as gpt-4o: it is a model this table lacks.
        applicable()
            .filter_map(|e| e.name_prefix(model).map(|(len, at_boundary)| (len, at_boundary, e)))
            // max_by_key keeps the last of equals; a reversed min keeps the first.
            .min_by_key(|&(len, ..)| std::cmp::Reverse(len))
            .and_then(|(_, at_boundary, e)| at_boundary.then_some(e))
            .or_else(|| applicable().find(|e| matches!(e.matcher, Matcher::Regex(_)) && e.matches(model)))
    }
}

/// Numbers entries from 1, as people count `[[prices]]` blocks.
fn compile_all(
    entries: Vec<PriceEntry>,
    error: impl Fn(usize, String, &'static str) -> PriceError,
) -> Result<Vec<Entry>, PriceError> {
    entries
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            let name = entry.describe();
            Entry::compile(entry).map_err(|reason| error(i + 1, name, reason))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Config {
        prices: Vec<PriceEntry>,
    }

    fn entries(toml_text: &str) -> Vec<PriceEntry> {
        toml::from_str::<Config>(toml_text).unwrap().prices
    }

    fn parse_error(toml_text: &str) -> String {
        toml::from_str::<Config>(toml_text).unwrap_err().to_string()
    }

    fn table() -> PriceTable {
        PriceTable::embedded().unwrap()
    }

    fn rate(table: &PriceTable, provider: &str, model: &str) -> Option<u128> {
        table.cost(provider, model, Tokens { input: 1, ..Tokens::default() }).map(|c| c.pico_usd)
    }

    #[test]
    fn embedded_table_parses_and_every_entry_validates() {
        let file: PriceFile = toml::from_str(EMBEDDED).unwrap();
        for entry in &file.prices {
            assert_eq!(entry.validate(), Ok(()), "{entry:?}");
        }
        let table = table();
        assert!(table.as_of().len() == 10 && table.as_of().starts_with("20"), "{}", table.as_of());
        assert!(table.len() > 25, "{}", table.len());
        assert!(!table.is_empty());
    }

    #[test]
    fn dated_names_match_their_family_and_the_longest_family_wins() {
        let table = table();
        assert_eq!(rate(&table, "openai", "gpt-4o-mini-2024-07-18"), Some(150_000));
        assert_eq!(rate(&table, "openai", "gpt-4o-2024-08-06"), Some(2_500_000));
        assert_eq!(rate(&table, "openai", "gpt-4o-2024-05-13"), Some(5_000_000));
        assert_eq!(rate(&table, "anthropic", "claude-sonnet-4-5-20250929"), Some(3_000_000));
        assert_eq!(rate(&table, "anthropic", "claude-sonnet-4-5@20250929"), Some(3_000_000));
        assert_eq!(rate(&table, "anthropic", "claude-opus-4-1-20250805"), Some(15_000_000));
        assert_eq!(rate(&table, "anthropic", "claude-opus-4-5-20251101"), Some(5_000_000));
        assert_eq!(rate(&table, "gemini", "models/gemini-2.5-flash"), Some(300_000));
        assert_eq!(rate(&table, "gemini", "gemini-2.5-flash-lite-preview-09-2025"), Some(100_000));
    }

    #[test]
    fn near_misses_and_unknown_models_are_unpriced_whatever_the_route() {
        let table = table();
        assert_eq!(rate(&table, "openai", "gpt-4o-minix"), None);
        assert_eq!(rate(&table, "openai", "gpt-4o-"), None);
        assert_eq!(rate(&table, "openai", "gpt-4"), None);
        // A model costs its vendor's list price through Azure or a proxy too.
        assert_eq!(rate(&table, "azure_openai", "gpt-4o"), rate(&table, "openai", "gpt-4o"));
        assert_eq!(rate(&table, "openai_compatible", "gpt-4o-mini-2024-07-18"), Some(150_000));
    }

    #[test]
    fn cost_is_exact_in_pico_usd_for_every_token_kind() {
        let table = table();
        // 1000 x 150_000 + 2000 x 75_000 + 500 x 600_000 pico-USD
        let tokens = Tokens { input: 1000, cache_read: 2000, cache_write: 0, output: 500 };
        let cost = table.cost("openai", "gpt-4o-mini", tokens).unwrap();
        assert_eq!(cost.pico_usd, 600_000_000);
        assert!((cost.usd() - 0.0006).abs() < 1e-15);
        // 1234 x 3e6 + 91011 x 3e5 + 5678 x 3.75e6 + 1213 x 15e6 pico-USD
        let tokens = Tokens { input: 1234, cache_read: 91_011, cache_write: 5678, output: 1213 };
        let cost = table.cost("anthropic", "claude-sonnet-4-5", tokens).unwrap();
        assert_eq!(cost.pico_usd, 70_492_800_000);
        assert_eq!((cost + cost).pico_usd, 140_985_600_000);
    }

    #[test]
    fn huge_counts_saturate_instead_of_overflowing() {
        let tokens = Tokens { input: u64::MAX, cache_read: u64::MAX, cache_write: u64::MAX, output: u64::MAX };
        let cost = table().cost("openai", "o1-pro", tokens).unwrap();
        assert!(cost.pico_usd > u128::from(u64::MAX));
        let max = Cost { pico_usd: u128::MAX };
        assert_eq!(max + max, max);
    }

    #[test]
    fn long_context_tier_applies_strictly_above_the_threshold() {
        let table = table();
        let at = Tokens { input: 150_000, cache_read: 50_000, cache_write: 0, output: 1000 };
        // 150_000 x 3e6 + 50_000 x 3e5 + 1000 x 15e6
        assert_eq!(table.cost("anthropic", "claude-sonnet-4-5", at).unwrap().pico_usd, 480_000_000_000);
        let above = Tokens { cache_write: 1, ..at };
        // 150_000 x 6e6 + 50_000 x 6e5 + 1 x 7.5e6 + 1000 x 22.5e6
        assert_eq!(table.cost("anthropic", "claude-sonnet-4-5", above).unwrap().pico_usd, 952_507_500_000);
        let long = Tokens { input: 200_001, ..Tokens::default() };
        assert_eq!(table.cost("gemini", "gemini-2.5-pro", long).unwrap().pico_usd, 200_001 * 2_500_000);
        assert_eq!(table.cost("anthropic", "claude-opus-4-1", long).unwrap().pico_usd, 200_001 * 15_000_000);
    }

    #[test]
    fn long_context_cache_rates_default_to_the_tier_input() {
        let prices = entries(
            "[[prices]]\nmodel = \"m\"\ninput = 1\noutput = 2\n\
             long_context = { above_input_tokens = 10, input = 3, output = 4 }\n",
        );
        let table = PriceTable::with_overrides(prices).unwrap();
        let tokens = Tokens { input: 5, cache_read: 4, cache_write: 2, output: 1 };
        assert_eq!(table.cost("x", "m", tokens).unwrap().pico_usd, 11 * 3_000_000 + 4_000_000);
    }

    #[test]
    fn overrides_win_in_file_order_over_the_embedded_table() {
        let prices = entries(concat!(
            "[[prices]]\nmodel = \"gpt-4o\"\ninput = 1\noutput = 1\n",
            "[[prices]]\nmodel = \"gpt-4o-mini\"\ninput = 9\noutput = 9\n",
            "[[prices]]\nprovider = \"openai_compatible\"\nmodel_regex = \"my-.*-model\"\ninput = 0.000001\noutput = 0\n",
        ));
        let table = PriceTable::with_overrides(prices).unwrap();
        assert_eq!(table.len(), PriceTable::embedded().unwrap().len() + 3);
        assert_eq!(rate(&table, "openai", "gpt-4o-2024-08-06"), Some(1_000_000));
        assert_eq!(rate(&table, "azure_openai", "gpt-4o-mini-2024-07-18"), Some(1_000_000));
        assert_eq!(rate(&table, "openai_compatible", "my-tuned-model"), Some(1));
        assert_eq!(rate(&table, "openai_compatible", "my-tuned-model-v2"), None);
        assert_eq!(rate(&table, "groq", "my-tuned-model"), None);
        assert_eq!(rate(&table, "openai", "gpt-5"), Some(1_250_000));
    }

    #[test]
    fn a_negative_or_infinite_price_is_rejected_with_line_and_key() {
        let err = parse_error("[[prices]]\nmodel = \"m\"\ninput = -1\noutput = 1\n");
        assert!(err.contains("non-negative number of USD per million tokens, got -1"), "{err}");
        assert!(err.contains("input") && err.contains("line 3"), "{err}");
        let err = parse_error("[[prices]]\nmodel = \"m\"\ninput = 1\noutput = inf\n");
        assert!(err.contains("got inf") && err.contains("output") && err.contains("line"), "{err}");
    }

    #[test]
    fn a_bad_regex_is_rejected_with_line_and_key() {
        let err = parse_error("[[prices]]\nmodel_regex = \"gpt-(4o\"\ninput = 1\noutput = 1\n");
        assert!(err.contains("model_regex") && err.contains("not a valid regex") && err.contains("line"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_rejected_with_its_name_and_line() {
        let err = parse_error("[[prices]]\nmodel = \"m\"\ninptu = 1\ninput = 1\noutput = 1\n");
        assert!(err.contains("inptu") && err.contains("line"), "{err}");
        let err = parse_error("[[prices]]\nmodel = \"m\"\ninput = 1\noutput = 1\nlong_context = { above = 1 }\n");
        assert!(err.contains("above") && err.contains("line"), "{err}");
    }

    #[test]
    fn an_entry_needs_exactly_one_of_model_and_model_regex() {
        let both = entries("[[prices]]\nmodel = \"m\"\nmodel_regex = \"m.*\"\ninput = 1\noutput = 1\n");
        assert!(both[0].validate().unwrap_err().contains("only one of `model` and `model_regex`, not both"));
        let neither = entries("[[prices]]\ninput = 1\noutput = 1\n");
        assert!(neither[0].validate().unwrap_err().contains("must set `model` (a model name) or `model_regex`"));
        let err = PriceTable::with_overrides(neither).unwrap_err().to_string();
        assert!(err.contains("price override #1 (no model)") && err.contains("or `model_regex`"), "{err}");
    }
}
