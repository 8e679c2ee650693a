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

enum Inner {
    Identity,
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
}

/// Decoder for one body.
pub struct ContentDecoder {
    inner: Inner,
    name: &'static str,
    decoded: usize,
}

impl ContentDecoder {
    /// A decoder for the `Content-Encoding` header value (`None`: identity).
    pub fn for_encoding(encoding: Option<&str>) -> Result<Self, EncodingError> {
        let encoding = encoding.map(|e| e.trim().to_ascii_lowercase()).unwrap_or_default();
        let (inner, name) = match encoding.as_str() {
            "" | "identity" => (Inner::Identity, "identity"),
            "gzip" | "x-gzip" => (Inner::Gzip(flate2::write::GzDecoder::new(Vec::new())), "gzip"),
            "deflate" => (Inner::Deflate(flate2::write::ZlibDecoder::new(Vec::new())), "deflate"),
            "br" => (Inner::Brotli(Box::new(brotli::DecompressorWriter::new(Vec::new(), 4096))), "br"),
            "zstd" => {
                let decoder = zstd::stream::write::Decoder::new(Vec::new())
                    .map_err(|e| EncodingError::Corrupt { encoding: "zstd", reason: e.to_string() })?;
                (Inner::Zstd(decoder), "zstd")
            }
            other => return Err(EncodingError::Unsupported(other.to_owned())),
        };
        Ok(Self { inner, name, decoded: 0 })
    }

    pub fn is_identity(&self) -> bool {
        matches!(self.inner, Inner::Identity)
    }

    /// Decodes the next piece of the body; returns what became available.
    pub fn decode(&mut self, input: &[u8]) -> Result<Vec<u8>, EncodingError> {
        let name = self.name;
        let corrupt = |e: std::io::Error| EncodingError::Corrupt { encoding: name, reason: e.to_string() };
        let out = match &mut self.inner {
            Inner::Identity => input.to_vec(),
            Inner::Gzip(d) => {
                d.write_all(input).map_err(corrupt)?;
                std::mem::take(d.get_mut())
            }
            Inner::Deflate(d) => {
                d.write_all(input).map_err(corrupt)?;
                std::mem::take(d.get_mut())
            }
            Inner::Brotli(d) => {
                d.write_all(input).map_err(corrupt)?;
                std::mem::take(d.get_mut())
            }
            Inner::Zstd(d) => {
                d.write_all(input).map_err(corrupt)?;
                d.flush().map_err(corrupt)?;
                std::mem::take(d.get_mut())
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
        let name = self.name;
        let corrupt = |e: std::io::Error| EncodingError::Corrupt { encoding: name, reason: e.to_string() };
        let out = match &mut self.inner {
            Inner::Identity => Vec::new(),
            Inner::Gzip(d) => {
                d.try_finish().map_err(corrupt)?;
                std::mem::take(d.get_mut())
            }
            Inner::Deflate(d) => {
                d.try_finish().map_err(corrupt)?;
                std::mem::take(d.get_mut())
            }
            Inner::Brotli(d) => {
                d.flush().map_err(corrupt)?;
                std::mem::take(d.get_mut())
            }
            Inner::Zstd(d) => {
                d.flush().map_err(corrupt)?;
                std::mem::take(d.get_mut())
            }
        };
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
