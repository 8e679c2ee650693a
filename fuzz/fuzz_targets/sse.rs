//! Server-sent events decoder.
#![no_main]
use gauge_agent::http::sse::Decoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let mut decoder = Decoder::default();
    let mut out = Vec::new();
    for chunk in rest.chunks(usize::from(split).max(1)) {
        decoder.feed(chunk, &mut out);
    }
    decoder.finish(&mut out);
});
