//! Response `Content-Encoding` decoding (gzip, deflate, br, zstd), incremental and
//! bounded: a body that inflates past [`MAX_DECODED`] is cut (a decompression bomb
//! cannot exhaust memory) and reported as such.

use std::io::Write;

/// Most decoded bytes kept per body.
pub const MAX_DECODED: usize = 64 << 20;

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
                let decoder = zstd::stream::write::Decoder::new(Vec::new())
                    .map_err(|e| EncodingError::Corrupt { encoding: "zstd", reason: e.to_string() })?;
                (Some(Box::new(decoder)), "zstd")
            }
            other => return Err(EncodingError::Unsupported(other.to_owned())),
        };
        Ok(Self { sink, name, decoded: 0 })
    }

    pub fn is_identity(&self) -> bool {
        self.sink.is_none()
    }

    fn corrupt(&self, e: std::io::Error) -> EncodingError {
        EncodingError::Corrupt { encoding: self.name, reason: e.to_string() }
    }

    /// Decodes the next piece of the body; returns what became available.
    pub fn decode(&mut self, input: &[u8]) -> Result<Vec<u8>, EncodingError> {
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
    fn unknown_and_corrupt_bodies_are_errors() {
        assert!(matches!(ContentDecoder::for_encoding(Some("compress")), Err(EncodingError::Unsupported(_))));
        let mut d = ContentDecoder::for_encoding(Some("gzip")).expect("gzip");
        assert!(d.decode(b"definitely not gzip at all").is_err());
    }
}
