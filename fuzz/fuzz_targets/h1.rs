//! HTTP/1 decoder, both directions, fed in pieces whose sizes come from the input.
#![no_main]
use gauge_agent::http::h1::{Decoder, Side};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let piece = usize::from(split).max(1);
    for side in [Side::Request, Side::Response] {
        let mut decoder = Decoder::new(side);
        let mut out = Vec::new();
        for chunk in rest.chunks(piece) {
            let _ = decoder.feed(chunk, &mut out);
            out.clear();
        }
        decoder.close(&mut out);
    }
});
