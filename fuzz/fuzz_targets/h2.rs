//! HTTP/2 frame decoder with HPACK, in and out of sync, fed in pieces.
#![no_main]
use gauge_agent::http::h2::Decoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let piece = usize::from(split).max(1);
    for (client, in_sync) in [(true, true), (false, true), (false, false)] {
        let mut decoder = Decoder::new(client, in_sync);
        let mut out = Vec::new();
        for chunk in rest.chunks(piece) {
            let _ = decoder.feed(chunk, &mut out);
            out.clear();
        }
    }
});
