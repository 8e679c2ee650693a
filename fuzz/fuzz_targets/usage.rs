//! Provider response envelopes and usage conversion, for every endpoint.
#![no_main]
use gauge_agent::llm::{Endpoint, usage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = serde_json::from_slice::<usage::Envelope>(data) else { return };
    // An event the stream path leaves unparsed must hold nothing but text.
    let model = envelope.model.as_deref().or(envelope.model_version.as_deref());
    for known in [None, model, Some("gpt-4o-mini")] {
        if usage::only_text(data, known) {
            assert!(!envelope.carries_usage() && envelope.error.is_none(), "only_text let usage or an error through");
            assert!(envelope.response.is_none() && envelope.message.is_none(), "only_text let a wrapped envelope through");
            assert!(envelope.model_version.is_none(), "only_text let modelVersion through");
            assert!(envelope.model.is_none() || envelope.model.as_deref() == known, "only_text let another model through");
        }
    }
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
