//! Response `Content-Encoding` decoding (gzip, deflate, br, zstd), incremental and
//! bounded: a body that inflates past [`MAX_DECODED`] is cut (a decompression bomb
//! cannot exhaust memory) and reported as such.

use std::io::Write;

/// Most decoded bytes kept per body.
pub const MAX_DECODED: usize = 64 << 20;
/// 2^23 = 8 MiB, the largest zstd window an HTTP decoder must accept (RFC 8878).
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodingError {
    #[error("unsupported content-encoding {0:?}")]
    Unsupported(String),
    #[error("corrupt {encoding} body: {reason}")]
    Corrupt { encoding: &'static str, reason: String },
    #[error("decoded body exceeds {MAX_DECODED} bytes")]
    TooLarge,
}

/// A streaming decompressor that writes its output into a `Vec`.
trait Sink: Write + Send {
    fn output(&mut self) -> &mut Vec<u8>;
    /// The input ended: emit what is still held.
    fn end(&mut self) -> std::io::Result<()>;
}

impl Sink for flate2::write::GzDecoder<Vec<u8>> {
    fn output(&mut self) -> &mut Vec<u8> {
        self.get_mut()
    }
    fn end(&mut self) -> std::io::Result<()> {
        self.try_finish()
    }
}

impl Sink for flate2::write::ZlibDecoder<Vec<u8>> {
    fn output(&mut self) -> &mut Vec<u8> {
        self.get_mut()
    }
    fn end(&mut self) -> std::io::Result<()> {
        self.try_finish()
    }
}

impl Sink for brotli::DecompressorWriter<Vec<u8>> {
    fn output(&mut self) -> &mut Vec<u8> {
        self.get_mut()
    }
    fn end(&mut self) -> std::io::Result<()> {
        self.flush()
    }
}

impl Sink for zstd::stream::write::Decoder<'static, Vec<u8>> {
    fn output(&mut self) -> &mut Vec<u8> {
        self.get_mut()
    }
    fn end(&mut self) -> std::io::Result<()> {
        self.flush()
    }
}

/// Decoder for one body.
pub struct ContentDecoder {
    /// `None` for identity.
    sink: Option<Box<dyn Sink>>,
    name: &'static str,
    decoded: usize,
    /// What the decompressor's own state may hold, from the window the stream
    /// declares (known once its first bytes are seen).
    state_bytes: usize,
}

impl ContentDecoder {
    /// A decoder for the `Content-Encoding` header value (`None`: identity).
    pub fn for_encoding(encoding: Option<&str>) -> Result<Self, EncodingError> {
        let encoding = encoding.map(|e| e.trim().to_ascii_lowercase()).unwrap_or_default();
        let (sink, name): (Option<Box<dyn Sink>>, _) = match encoding.as_str() {
            "" | "identity" => (None, "identity"),
            "gzip" | "x-gzip" => (Some(Box::new(flate2::write::GzDecoder::new(Vec::new()))), "gzip"),
            "deflate" => (Some(Box::new(flate2::write::ZlibDecoder::new(Vec::new()))), "deflate"),
            "br" => (Some(Box::new(brotli::DecompressorWriter::new(Vec::new(), 4096))), "br"),
            "zstd" => {
                let mut decoder = zstd::stream::write::Decoder::new(Vec::new())
                    .map_err(|e| EncodingError::Corrupt { encoding: "zstd", reason: e.to_string() })?;
                // A frame may ask for a 128 MiB window (libzstd's default ceiling) on
                // every connection; RFC 8878 caps HTTP content coding at 8 MiB.
                decoder
                    .window_log_max(ZSTD_WINDOW_LOG_MAX)
                    .map_err(|e| EncodingError::Corrupt { encoding: "zstd", reason: e.to_string() })?;
                (Some(Box::new(decoder)), "zstd")
            }
            other => return Err(EncodingError::Unsupported(other.to_owned())),
        };
        Ok(Self { sink, name, decoded: 0, state_bytes: 0 })
    }

    /// Memory the decompressor holds for this body, as far as it can be known: the
    /// window the stream declares (what the decoder allocates), for the agent's
    /// memory budget.
    pub fn state_bytes(&self) -> usize {
        self.state_bytes
    }

    pub fn is_identity(&self) -> bool {
        self.sink.is_none()
    }

    fn corrupt(&self, e: std::io::Error) -> EncodingError {
        EncodingError::Corrupt { encoding: self.name, reason: e.to_string() }
    }

    /// Decodes the next piece of the body; returns what became available.
    pub fn decode(&mut self, input: &[u8]) -> Result<Vec<u8>, EncodingError> {
        if self.state_bytes == 0 && !input.is_empty() {
            self.state_bytes = declared_window(self.name, input);
        }
        let out = match &mut self.sink {
            None => input.to_vec(),
            Some(sink) => {
                // zstd holds output back until flushed; the others flush as a no-op.
                let written = sink.write_all(input).and_then(|()| sink.flush());
                let out = std::mem::take(sink.output());
                written.map_err(|e| self.corrupt(e))?;
                out
            }
        };
        self.decoded += out.len();
        if self.decoded > MAX_DECODED {
            return Err(EncodingError::TooLarge);
        }
        Ok(out)
    }

    /// The body ended: whatever the decoder still held.
    pub fn finish(&mut self) -> Result<Vec<u8>, EncodingError> {
        let Some(sink) = &mut self.sink else { return Ok(Vec::new()) };
        let ended = sink.end();
        let out = std::mem::take(sink.output());
        ended.map_err(|e| self.corrupt(e))?;
        self.decoded += out.len();
        Ok(out)
    }
}

/// The window a compressed stream declares in its first bytes, which is what its
/// decoder allocates; the largest allowed where the header is cut short.
fn declared_window(encoding: &str, first: &[u8]) -> usize {
    const ZSTD_MAX: usize = 1 << ZSTD_WINDOW_LOG_MAX;
    match encoding {
        // 32 KiB window plus inflate's tables.
        "gzip" | "deflate" => 48 << 10,
        // RFC 7932 9.1: WBITS in the stream's first bits.
        "br" => {
            let b = first[0];
            let wbits = if b & 1 == 0 {
                16
            } else if (b >> 1) & 7 != 0 {
                17 + ((b >> 1) & 7)
            } else if (b >> 4) & 7 != 0 {
                8 + ((b >> 4) & 7)
            } else {
                17
            };
            1 << wbits
        }
        // RFC 8878 3.1.1.1: the frame header descriptor, then the window
        // descriptor, or for a single segment (the window is the content) the
        // dictionary id and the content size.
        "zstd" => match first {
            [0x28, 0xb5, 0x2f, 0xfd, descriptor, rest @ ..] => {
                let window = if descriptor & 0x20 == 0 {
                    rest.first().map(|&w| {
                        let base = 1usize << (10 + u32::from(w >> 3)).min(usize::BITS - 4);
                        base + base / 8 * usize::from(w & 7)
                    })
                } else {
                    let dictionary = [0, 1, 2, 4][usize::from(descriptor & 3)];
                    let size_bytes = [1, 2, 4, 8][usize::from(descriptor >> 6)];
                    rest.get(dictionary..dictionary + size_bytes).map(|b| {
                        let size = b.iter().rev().fold(0u64, |n, &byte| n << 8 | u64::from(byte));
                        // A two-byte size is stored less 256.
                        let size = if size_bytes == 2 { size + 256 } else { size };
                        usize::try_from(size).unwrap_or(usize::MAX)
                    })
                };
                window.unwrap_or(ZSTD_MAX).min(ZSTD_MAX)
            }
            _ => ZSTD_MAX,
        },
        _ => 0,
    }
}

impl std::fmt::Debug for ContentDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ContentDecoder({})", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &[u8] = b"data: {\"usage\":{\"prompt_tokens\":3}}\n\n";

    fn encoded(encoding: &str) -> Vec<u8> {
        let body = TEXT.repeat(50);
        match encoding {
            "gzip" => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(&body).expect("gzip");
                e.finish().expect("gzip")
            }
            "deflate" => {
                let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(&body).expect("zlib");
                e.finish().expect("zlib")
            }
            "br" => {
                let mut out = Vec::new();
                let mut e = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                e.write_all(&body).expect("br");
                drop(e);
                out
            }
            "zstd" => zstd::encode_all(body.as_slice(), 3).expect("zstd"),
            _ => body,
        }
    }

    #[test]
    fn every_encoding_decodes_in_small_pieces() {
        for encoding in ["gzip", "deflate", "br", "zstd", "identity"] {
            let mut d = ContentDecoder::for_encoding(Some(encoding)).expect("supported");
            let mut out = Vec::new();
            for piece in encoded(encoding).chunks(7) {
                out.extend(d.decode(piece).expect("decodes"));
            }
            out.extend(d.finish().expect("finishes"));
            assert_eq!(out, TEXT.repeat(50), "{encoding}");
        }
    }

    #[test]
    fn decoder_state_is_the_window_the_stream_declares() {
        let state = |encoding: &str, body: &[u8]| {
            let mut d = ContentDecoder::for_encoding(Some(encoding)).expect("supported");
            let _ = d.decode(body);
            d.state_bytes()
        };
        // The test encoder asks brotli for a 2^22 window.
        assert_eq!(state("br", &encoded("br")), 1 << 22);
        assert_eq!(state("gzip", &encoded("gzip")), 48 << 10);
        assert_eq!(state("identity", TEXT), 0);
        // A streamed zstd frame declares its window (2 MiB at level 3); one
        // compressed whole is a single segment, counted at its content size.
        assert_eq!(state("zstd", &encoded("zstd")), 1 << 21);
        let body = TEXT.repeat(50);
        let whole = zstd::bulk::compress(&body, 3).expect("zstd");
        assert_eq!(state("zstd", &whole), body.len());
        // A frame declaring a 128 MiB window is counted at the cap and refused.
        let mut hostile = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, (27 - 10) << 3];
        hostile.extend([0u8; 16]);
        let mut d = ContentDecoder::for_encoding(Some("zstd")).expect("zstd");
        assert!(d.decode(&hostile).is_err(), "a window past 8 MiB is refused");
        assert_eq!(d.state_bytes(), 1 << 23);
    }

    #[test]
    fn unknown_and_corrupt_bodies_are_errors() {
        assert!(matches!(ContentDecoder::for_encoding(Some("compress")), Err(EncodingError::Unsupported(_))));
        let mut d = ContentDecoder::for_encoding(Some("gzip")).expect("gzip");
        assert!(d.decode(b"definitely not gzip at all").is_err());
    }
}
