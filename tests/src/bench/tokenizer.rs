//! The tokenizer estimate path: Gauge's token counts (tiktoken-rs, through
//! `gauge_agent::llm::estimate::count`) against Python `tiktoken` on the same
//! chunks of the same text in the same run, the counts required to agree exactly;
//! each encoder's load time and memory; and that a call reporting its usage never
//! loads an encoder.
//!
//! Python tiktoken would download its encoding files; instead the ranks are dumped
//! from the encoder Gauge loaded into a tiktoken cache, which tiktoken checks
//! against OpenAI's SHA-256: agreeing counts then mean the same ranks, pattern and
//! code path, not just a similar tokenizer.

use std::{
    io::Write as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use base64::Engine as _;
use gauge_agent::{
    attribution::process::NoProcesses,
    config::Config,
    llm::{UsageSource, estimate},
    pipeline::Pipeline,
    source::{CaptureEvent, Direction, Payload},
};
use prometheus_client::registry::Registry;

use super::{Row, Scale, median, proc_stat};

/// Python's side, run by `python3` from a temporary copy so the binary runs anywhere.
const SCRIPT: &str = include_str!("../../bench/tokenizer.py");

/// Chunk size: about a prompt, which Gauge counts in one call.
const CHUNK_BYTES: usize = 4096;

/// A first `count` slower than this loaded its encoder; a loaded one takes microseconds.
const LOADED_NOW: Duration = Duration::from_millis(2);

struct Encoding {
    /// tiktoken's name.
    name: &'static str,
    /// A model Gauge maps to it.
    model: &'static str,
}

const ENCODINGS: [Encoding; 2] =
    [Encoding { name: "o200k_base", model: "gpt-4o" }, Encoding { name: "cl100k_base", model: "gpt-4" }];

/// What loading one encoder cost, when this run saw it load.
struct Load {
    time: Duration,
    rss: u64,
}

/// What Python reported for one encoding.
struct PythonRun {
    tokens: u64,
    seconds: f64,
    load_seconds: f64,
    load_rss: u64,
    version: String,
}

pub fn run(scale: Scale) -> anyhow::Result<Vec<Row>> {
    // First, before anything in this module counts a token: calls that report
    // their usage, then the first count of each encoding, which loads it.
    let feed_time = feed_calls_with_usage()?;
    let loads: Vec<Option<Load>> = ENCODINGS.iter().map(|e| first_load(e.model)).collect::<anyhow::Result<_>>()?;

    let mut rows = vec![lazy_row(feed_time, &loads)];
    let chunks = corpus(scale.pick(100_000, 4_000_000));
    let bytes: usize = chunks.iter().map(String::len).sum();
    let repeats = scale.pick(1, 5);
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let chunks_path = dir.path().join("chunks.json");
    std::fs::write(&chunks_path, serde_json::to_vec(&chunks)?).context("writing the corpus")?;
    let script = dir.path().join("tokenizer.py");
    std::fs::write(&script, SCRIPT).context("writing the Python script")?;

    let mut load_rows = Vec::new();
    for (encoding, load) in ENCODINGS.iter().zip(&loads) {
        let short = encoding.name.trim_end_matches("_base");
        let ranks = dir.path().join(format!("{}.tiktoken", encoding.name));
        dump_ranks(encoding, &ranks)?;
        let python = python(&script, encoding.name, &ranks, &chunks_path, repeats)?;
        let (tokens, seconds) = rust(encoding.model, &chunks, repeats)?;
        if tokens != python.tokens {
            bail!(
                "{}: tiktoken-rs counted {tokens} tokens, Python tiktoken {} {} on the same {bytes} bytes",
                encoding.name,
                python.version,
                python.tokens
            );
        }
        let rust_rate = tokens as f64 / seconds;
        let python_rate = python.tokens as f64 / python.seconds;
        let how = format!("{} chunks of ~4 KB ({:.1} MB), one thread, median of {repeats}", chunks.len(), bytes as f64 / 1e6);
        rows.push(Row::new(format!("tiktoken-rs {short}"), rate(rust_rate), format!("estimate::count per chunk; {how}")));
        rows.push(Row::new(
            format!("Python tiktoken {short}"),
            rate(python_rate),
            format!("tiktoken {} encode_ordinary per chunk; {how}", python.version),
        ));
        let ratio = rust_rate / python_rate;
        // No target: Python tiktoken runs the same Rust BPE core, so ~1x is expected
        // and a threshold would only flip with the noise.
        rows.push(Row::new(
            format!("{short}: tiktoken-rs / Python"),
            format!("{ratio:.2}x"),
            "tokens/s over tokens/s, same run (same BPE core; ~1x expected)",
        ));
        rows.push(
            Row::new(format!("{short}: counts agree"), format!("{tokens} = {}", python.tokens), "tiktoken-rs = Python tiktoken, same chunks")
                .target("equal", true),
        );

        load_rows.push(match load {
            Some(load) => Row::new(
                format!("{short}: load, tiktoken-rs"),
                format!("{:.0} ms", load.time.as_secs_f64() * 1e3),
                "first estimate::count in this process (ranks parsed, regex built)",
            ),
            None => Row::new(format!("{short}: load, tiktoken-rs"), "-", "loaded earlier in this process: run `gauge-bench tokenizer` alone"),
        });
        if let Some(load) = load {
            load_rows.push(Row::new(format!("{short}: memory, tiktoken-rs"), megabytes(load.rss), "VmRSS after the first count minus before"));
        }
        load_rows.push(Row::new(
            format!("{short}: load, Python tiktoken"),
            format!("{:.0} ms", python.load_seconds * 1e3),
            "get_encoding from a filled cache + first encode, timed in Python",
        ));
        load_rows.push(Row::new(format!("{short}: memory, Python tiktoken"), megabytes(python.load_rss), "VmRSS after get_encoding minus before"));
    }
    rows.extend(load_rows);
    Ok(rows)
}

fn rate(tokens_per_second: f64) -> String {
    format!("{:.2} M tokens/s", tokens_per_second / 1e6)
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Whether the calls with usage left the encoders unloaded: the first counts after
/// them loaded the encoders, so nothing had before.
fn lazy_row(feed_time: Duration, loads: &[Option<Load>]) -> Row {
    let name = "encoder loaded for calls with usage";
    if loads.iter().all(Option::is_some) {
        Row::new(name, "no", "Pipeline fed 2 calls reporting usage; the first counts after them still loaded both encoders")
            .target("no", true)
    } else if feed_time >= LOADED_NOW {
        // Nothing else in this module counts before; a slow feed is the load.
        Row::new(name, "yes", format!("feeding 2 calls reporting usage took {:.0} ms and left an encoder loaded", feed_time.as_secs_f64() * 1e3))
            .target("no", false)
    } else {
        Row::new(name, "unknown", "an encoder was loaded earlier in this process: run `gauge-bench tokenizer` alone")
    }
}

/// Feeds a fresh Pipeline a streamed gpt-4o-mini call (o200k) and a plain gpt-4
/// call (cl100k), both reporting usage; returns how long the feeding took.
fn feed_calls_with_usage() -> anyhow::Result<Duration> {
    let mut events = Vec::new();
    let mut push = |connection: u64, direction, data: &str| {
        let bytes = data.as_bytes().to_vec();
        events.push(CaptureEvent {
            timestamp_ns: 1000 * (events.len() as u64 + 1),
            tgid: 7,
            tid: 7,
            cgroup_id: 1,
            comm: "agent".into(),
            payload: Payload::Data { direction, connection, call_len: bytes.len() as u32, offset: 0, bytes: bytes.into() },
        });
    };
    let post = |body: &str| {
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
    };
    let chunk = |data: &str| format!("{:x}\r\n{data}\r\n", data.len());

    let streamed = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Say hello."}]}"#;
    push(1, Direction::Write, &post(streamed));
    push(1, Direction::Read, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n");
    push(1, Direction::Read, &chunk("data: {\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}],\"usage\":null}\n\n"));
    push(1, Direction::Read, &chunk("data: {\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n"));
    push(1, Direction::Read, "0\r\n\r\n");

    let plain = r#"{"model":"gpt-4","messages":[{"role":"user","content":"Say hello."}]}"#;
    let answer = r#"{"model":"gpt-4-0613","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"}}],"usage":{"prompt_tokens":9,"completion_tokens":1}}"#;
    push(2, Direction::Write, &post(plain));
    push(2, Direction::Read, &format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}", answer.len()));

    let mut registry = Registry::default();
    let mut pipeline =
        Pipeline::new(&Config::default(), Box::new(NoProcesses), || 0, &mut registry).context("building a Pipeline with the default config")?;
    let mut sources = Vec::new();
    let start = Instant::now();
    for event in &events {
        sources.extend(pipeline.feed(event).iter().map(|f| f.metered.call.usage_source));
    }
    let took = start.elapsed();
    if sources != [UsageSource::Reported, UsageSource::Reported] {
        bail!("the Pipeline finished {sources:?} for two calls reporting usage, not [Reported, Reported]: the bench's captures no longer parse");
    }
    Ok(took)
}

/// Times the first count of `model`'s encoding, and the memory it took, when it
/// is what loads the encoder (None when it was loaded already).
fn first_load(model: &str) -> anyhow::Result<Option<Load>> {
    let me = std::process::id();
    let before = proc_stat::status_bytes(me, "VmRSS")?;
    let start = Instant::now();
    std::hint::black_box(estimate::count(model, std::hint::black_box("hello")));
    let time = start.elapsed();
    let after = proc_stat::status_bytes(me, "VmRSS")?;
    Ok((time >= LOADED_NOW).then(|| Load { time, rss: after.saturating_sub(before) }))
}

/// Tokens in all chunks and the median seconds of `repeats` timed passes, after
/// an untimed one (as in the Python script).
fn rust(model: &str, chunks: &[String], repeats: usize) -> anyhow::Result<(u64, f64)> {
    let tokens: u64 = chunks.iter().map(|c| estimate::count(model, c)).sum();
    let mut seconds = Vec::new();
    for _ in 0..repeats {
        let start = Instant::now();
        let n: u64 = chunks.iter().map(|c| estimate::count(model, std::hint::black_box(c))).sum();
        seconds.push(start.elapsed().as_secs_f64());
        if n != tokens {
            bail!("{model}: tiktoken-rs counted {n} tokens on a repeat, {tokens} on the first pass");
        }
    }
    Ok((tokens, median(&mut seconds)))
}

/// Runs the Python script on the same chunks.
fn python(script: &Path, encoding: &str, ranks: &Path, chunks: &Path, repeats: usize) -> anyhow::Result<PythonRun> {
    let output = Command::new("python3")
        .arg(script)
        .args([std::ffi::OsStr::new(encoding), ranks.as_os_str(), chunks.as_os_str()])
        .arg(repeats.to_string())
        .output()
        .context("running python3 (is it installed?)")?;
    if !output.status.success() {
        bail!(
            "python3 {} {encoding} failed ({}): {}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("reading the Python script's output: {}", String::from_utf8_lossy(&output.stdout)))?;
    let number = |key: &str| json.get(key).and_then(serde_json::Value::as_f64).with_context(|| format!("no {key} in {json}"));
    let mut seconds: Vec<f64> = json
        .get("seconds")
        .and_then(serde_json::Value::as_array)
        .map(|s| s.iter().filter_map(serde_json::Value::as_f64).collect())
        .unwrap_or_default();
    if seconds.is_empty() {
        bail!("no timed passes in the Python script's output: {json}");
    }
    Ok(PythonRun {
        tokens: number("tokens")? as u64,
        seconds: median(&mut seconds),
        load_seconds: number("load_seconds")?,
        load_rss: number("load_rss")? as u64,
        version: json.get("version").and_then(serde_json::Value::as_str).unwrap_or("?").to_owned(),
    })
}

/// Writes the ranks of the encoder Gauge uses for `encoding` as a `.tiktoken` file
/// (base64 token, space, rank, by rank), byte for byte OpenAI's when they are the same.
fn dump_ranks(encoding: &Encoding, path: &Path) -> anyhow::Result<()> {
    let bpe = estimate::encoding_for(encoding.model);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    // Ranks run from 0 without gaps in both encodings; the first id the encoder
    // cannot decode ends them (special tokens come after a gap).
    let mut rank = 0u32;
    while let Ok(token) = bpe.decode_bytes(&[rank]) {
        // Standard base64 with padding, as `.tiktoken` files use.
        writeln!(out, "{} {rank}", base64::engine::general_purpose::STANDARD.encode(&token))?;
        rank += 1;
    }
    out.flush()?;
    if rank < 50_000 {
        bail!("{}: only {rank} ranks decode from tiktoken-rs", encoding.name);
    }
    Ok(())
}

/// About `bytes` of deterministic text cut into chunks of about [`CHUNK_BYTES`]:
/// English prose, code, JSON and other scripts mixed, as prompts mix them.
fn corpus(bytes: usize) -> Vec<String> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut chunks = Vec::new();
    let mut total = 0;
    while total < bytes {
        let mut chunk = String::new();
        while chunk.len() < CHUNK_BYTES {
            match rng.below(4) {
                0 => prose(&mut rng, &mut chunk),
                1 => code(&mut rng, &mut chunk),
                2 => json(&mut rng, &mut chunk),
                _ => other_scripts(&mut rng, &mut chunk),
            }
            chunk.push('\n');
        }
        total += chunk.len();
        chunks.push(chunk);
    }
    chunks
}

/// xorshift64*: the same text on every machine.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const WORDS: &[&str] = &[
    "the", "customer", "asked", "whether", "invoice", "was", "sent", "to", "billing", "team", "and", "we", "don't", "know",
    "it's", "summarise", "ticket", "history", "please", "refund", "order", "shipping", "delayed", "because", "warehouse",
    "in", "Rotterdam", "closed", "on", "Monday", "they'll", "reply", "within", "two", "business", "days", "model", "tokens",
    "latency", "prompt", "context", "window", "retrieval", "augmented", "generation", "kubernetes", "deployment", "failed",
];

fn prose(rng: &mut Rng, out: &mut String) {
    for _ in 0..3 + rng.below(5) {
        let n = 6 + rng.below(14);
        for i in 0..n {
            let word = rng.pick(WORDS);
            if i == 0 {
                let mut letters = word.chars();
                if let Some(first) = letters.next() {
                    out.extend(first.to_uppercase());
                    out.push_str(letters.as_str());
                }
            } else {
                out.push(' ');
                out.push_str(word);
            }
            if rng.below(12) == 0 {
                out.push_str(&format!(" {}", rng.below(100_000)));
            }
            if i + 1 < n && rng.below(9) == 0 {
                out.push(',');
            }
        }
        out.push_str(rng.pick(&[". ", "? ", "! ", ".  "]));
    }
}

fn code(rng: &mut Rng, out: &mut String) {
    let name = rng.pick(&["parse_header", "total_cost", "handleRequest", "fetch_usage", "tokenCount"]);
    let arg = rng.pick(&["input", "buf", "req", "items"]);
    match rng.below(3) {
        0 => out.push_str(&format!(
            "fn {name}({arg}: &[u8]) -> Result<usize, Error> {{\n    let mut n = 0;\n    for (i, b) in {arg}.iter().enumerate() {{\n        if *b == b'\\n' && i > {} {{\n            n += 1;\n        }}\n    }}\n    Ok(n)\n}}\n",
            rng.below(64)
        )),
        1 => out.push_str(&format!(
            "def {name}({arg}, limit={}):\n    \"\"\"Return the first items under the limit.\"\"\"\n    result = []\n    for item in {arg}:\n        if item.cost <= limit:\n            result.append(item)\n    return result\n",
            rng.below(1000)
        )),
        _ => out.push_str(&format!(
            "export async function {name}({arg}) {{\n  const res = await fetch(`/api/v1/${{{arg}.id}}`, {{ method: 'POST' }});\n  if (!res.ok) throw new Error(`status ${{res.status}}`);\n  return (await res.json()).data ?? [];\n}}\n"
        )),
    }
}

fn json(rng: &mut Rng, out: &mut String) {
    out.push_str(&format!(
        "{{\"id\":\"chatcmpl-{:08x}\",\"model\":\"{}\",\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":{}}},\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{} {}\"}}}}],\"created\":{}}}\n",
        rng.below(1 << 30),
        rng.pick(&["gpt-4o-mini", "gpt-4.1", "claude-sonnet-4", "gemini-2.5-pro"]),
        rng.below(20_000),
        rng.below(4_000),
        rng.pick(WORDS),
        rng.pick(WORDS),
        1_700_000_000 + rng.below(100_000_000),
    ));
}

const OTHER: &[&str] = &[
    "Größenänderung der Übersicht fehlgeschlagen.",
    "La réponse a été tronquée à cause d'une erreur réseau.",
    "Не удалось загрузить файл конфигурации.",
    "日本語のテキストを要約してください。",
    "请总结以下对话的要点。",
    "요청이 시간 초과되었습니다.",
    "تمت معالجة الطلب بنجاح.",
    "Το αίτημα απέτυχε.",
    "emoji 🙂🚀✅ and symbols → ≤ ≥ € £ ¥",
];

fn other_scripts(rng: &mut Rng, out: &mut String) {
    for _ in 0..2 + rng.below(4) {
        out.push_str(rng.pick(OTHER));
        out.push(' ');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_corpus_is_deterministic_mixed_and_chunked() {
        let a = corpus(50_000);
        assert_eq!(a, corpus(50_000));
        let text = a.concat();
        assert!(text.len() >= 50_000, "{}", text.len());
        assert!(a.iter().all(|c| c.len() >= CHUNK_BYTES && c.len() < 2 * CHUNK_BYTES));
        for needle in ["fn ", "def ", "\"usage\"", "日本語", "🙂"] {
            assert!(text.contains(needle), "no {needle:?} in the corpus");
        }
    }
}
