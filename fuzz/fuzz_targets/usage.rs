//! Provider response envelopes and usage conversion, for every endpoint.
#![no_main]
use gauge_agent::llm::{Endpoint, usage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = serde_json::from_slice::<usage::Envelope>(data) else { return };
    let mut text = String::new();
    envelope.output_text(&mut text);
    if let Some(raw) = &envelope.usage {
        for endpoint in [Endpoint::ChatCompletions, Endpoint::Responses, Endpoint::Embeddings, Endpoint::Messages] {
            let _ = usage::from_raw(endpoint, raw);
        }
    }
    if let Some(gemini) = &envelope.usage_metadata {
        let _ = usage::from_gemini(gemini);
    }
});
