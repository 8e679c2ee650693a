//! Server-sent events decoder.
#![no_main]
use gauge_agent::http::sse::Decoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let mut decoder = Decoder::default();
    let mut count = |event: &gauge_agent::http::sse::SseEvent<'_>| {
        assert!(event.data.len() <= 3 * rest.len(), "an event holds more than was fed");
    };
    for chunk in rest.chunks(usize::from(split).max(1)) {
        decoder.feed(chunk, &mut count);
    }
    decoder.finish(&mut count);
    // Bounded by what was fed: each buffer's room at most twice what it holds, and
    // a byte that is not UTF-8 is held as U+FFFD (three bytes).
    assert!(decoder.buffered() <= 8 * rest.len() + 4 * 4096, "the decoder holds more than it was fed");
});
