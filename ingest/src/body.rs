//! Request bodies of the HTTP endpoints (REST `POST /v1/actions`, OTLP/HTTP `POST /v1/traces`):
//! read within `ingest.max_body_bytes`, and `Content-Encoding: gzip` decompressed within the
//! same limit, so that a small compressed body cannot expand into an unbounded one (a "gzip
//! bomb" stops one byte past the limit).
//!
//! Each endpoint turns a [`BodyError`] into its own answer: 413 for [`BodyError::TooLarge`],
//! 415 for [`BodyError::UnsupportedEncoding`], 400 for [`BodyError::InvalidGzip`].

use std::io::Read;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::Bytes;

/// Bodies at least this large are decompressed (and decoded, by the callers) on a blocking
/// thread, so that the async workers never stall for long.
pub const BLOCKING_DECODE_BYTES: usize = 64 * 1024;

/// The `Content-Encoding`s a request body may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentEncoding {
    /// No `Content-Encoding`, or `identity`.
    Identity,
    /// `gzip` (or its old alias `x-gzip`).
    Gzip,
}

/// Why a request body could not be read. The message is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The body, as received or once decompressed, is larger than the limit.
    #[error("{} request body is larger than {limit} bytes", if *.decompressed { "decompressed" } else { "the" })]
    TooLarge { limit: usize, decompressed: bool },
    /// A `Content-Encoding` other than gzip or identity.
    #[error("Content-Encoding {0:?} is not supported; send gzip or no Content-Encoding")]
    UnsupportedEncoding(String),
    /// `Content-Encoding: gzip`, but the body is not valid gzip.
    #[error("invalid gzip body: {0}")]
    InvalidGzip(String),
}

/// A `Content-Type`'s media type, lowercased (`application/json`), and its `charset`
/// parameter if any (lowercased, quotes removed). Other parameters are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaType {
    pub essence: String,
    pub charset: Option<String>,
}

impl MediaType {
    /// The request's media type; `None` without a `Content-Type` header. Type, subtype and
    /// parameter names are case-insensitive (RFC 9110 §8.3.1).
    pub fn from_headers(headers: &HeaderMap) -> Option<MediaType> {
        let value = headers.get(header::CONTENT_TYPE)?;
        let text = String::from_utf8_lossy(value.as_bytes());
        let mut parts = text.split(';');
        let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let charset = parts.find_map(|parameter| {
            let (name, value) = parameter.split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("charset")
                .then(|| value.trim().trim_matches('"').to_ascii_lowercase())
        });
        Some(MediaType { essence, charset })
    }
}

impl ContentEncoding {
    /// The body's encoding from its `Content-Encoding` header (case-insensitive).
    pub fn from_headers(headers: &HeaderMap) -> Result<ContentEncoding, BodyError> {
        let Some(value) = headers.get(header::CONTENT_ENCODING) else {
            return Ok(ContentEncoding::Identity);
        };
        let text = String::from_utf8_lossy(value.as_bytes())
            .trim()
            .to_ascii_lowercase();
        match text.as_str() {
            "" | "identity" => Ok(ContentEncoding::Identity),
            "gzip" | "x-gzip" => Ok(ContentEncoding::Gzip),
            _ => Err(BodyError::UnsupportedEncoding(text)),
        }
    }
}

/// Reads a body of at most `limit` bytes; a `Content-Length` above the limit is refused before
/// anything is read.
pub async fn read_limited(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Bytes, BodyError> {
    let too_large = BodyError::TooLarge {
        limit,
        decompressed: false,
    };
    let declared_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    if declared_length.is_some_and(|length| length > limit) {
        return Err(too_large);
    }
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large)
}

/// The decoded body: as received, or gunzipped within `limit`.
pub fn decode_content(
    encoding: ContentEncoding,
    bytes: Bytes,
    limit: usize,
) -> Result<Bytes, BodyError> {
    match encoding {
        ContentEncoding::Identity => Ok(bytes),
        ContentEncoding::Gzip => gunzip(&bytes, limit),
    }
}

/// Decompresses gzip (one or more members) and stops one byte past `limit`.
pub fn gunzip(compressed: &[u8], limit: usize) -> Result<Bytes, BodyError> {
    // One byte over the limit is enough to know the body is too large (a zip bomb stops here).
    let limit_plus_one = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let mut decompressed = Vec::new();
    flate2::read::MultiGzDecoder::new(compressed)
        .take(limit_plus_one)
        .read_to_end(&mut decompressed)
        .map_err(|error| BodyError::InvalidGzip(error.to_string()))?;
    if decompressed.len() > limit {
        return Err(BodyError::TooLarge {
            limit,
            decompressed: true,
        });
    }
    Ok(Bytes::from(decompressed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn gunzip_stops_at_the_limit() {
        let compressed = gzip(&vec![b'x'; 10_000]);
        assert_eq!(gunzip(&compressed, 10_000).unwrap().len(), 10_000);
        assert_eq!(
            gunzip(&compressed, 9_999),
            Err(BodyError::TooLarge {
                limit: 9_999,
                decompressed: true
            })
        );
        assert!(matches!(
            gunzip(b"not gzip", 100),
            Err(BodyError::InvalidGzip(_))
        ));
    }

    #[test]
    fn gunzip_stops_a_bomb_without_inflating_it() {
        // 1 GiB of zeros compresses to about 1 MiB; only limit + 1 bytes are ever produced.
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            encoder.write_all(&zeros).unwrap();
        }
        let bomb = encoder.finish().unwrap();
        assert!(bomb.len() < 100_000, "{}", bomb.len());
        assert!(matches!(
            gunzip(&bomb, 4096),
            Err(BodyError::TooLarge {
                decompressed: true,
                ..
            })
        ));
    }

    #[test]
    fn reads_the_content_encoding_case_insensitively() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            ContentEncoding::from_headers(&headers),
            Ok(ContentEncoding::Identity)
        );
        for (given, expected) in [
            ("gzip", ContentEncoding::Gzip),
            ("GZip ", ContentEncoding::Gzip),
            ("x-gzip", ContentEncoding::Gzip),
            ("identity", ContentEncoding::Identity),
        ] {
            headers.insert(header::CONTENT_ENCODING, given.parse().unwrap());
            assert_eq!(
                ContentEncoding::from_headers(&headers),
                Ok(expected),
                "{given}"
            );
        }
        for refused in ["br", "deflate", "gzip, br", "zstd"] {
            headers.insert(header::CONTENT_ENCODING, refused.parse().unwrap());
            let error = ContentEncoding::from_headers(&headers).unwrap_err();
            assert!(
                matches!(error, BodyError::UnsupportedEncoding(_)),
                "{refused}"
            );
            assert!(error
                .to_string()
                .contains("send gzip or no Content-Encoding"));
        }
    }

    #[test]
    fn reads_the_media_type_and_charset_case_insensitively() {
        let mut headers = HeaderMap::new();
        assert_eq!(MediaType::from_headers(&headers), None);
        for (given, essence, charset) in [
            ("application/json", "application/json", None),
            (
                "Application/JSON; Charset=\"UTF-8\"",
                "application/json",
                Some("utf-8"),
            ),
            (
                "application/json;charset=utf-8;q=1",
                "application/json",
                Some("utf-8"),
            ),
            ("application/jsonx", "application/jsonx", None),
            (" text/plain ; format=flowed", "text/plain", None),
        ] {
            headers.insert(header::CONTENT_TYPE, given.parse().unwrap());
            assert_eq!(
                MediaType::from_headers(&headers),
                Some(MediaType {
                    essence: essence.to_string(),
                    charset: charset.map(str::to_string)
                }),
                "{given}"
            );
        }
    }

    #[tokio::test]
    async fn refuses_a_declared_or_actual_length_over_the_limit() {
        let mut headers = HeaderMap::new();
        let read = read_limited(Body::from(vec![1u8; 100]), &headers, 100).await;
        assert_eq!(read.unwrap().len(), 100);
        let read = read_limited(Body::from(vec![1u8; 101]), &headers, 100).await;
        assert_eq!(
            read,
            Err(BodyError::TooLarge {
                limit: 100,
                decompressed: false
            })
        );
        headers.insert(header::CONTENT_LENGTH, "101".parse().unwrap());
        let read = read_limited(Body::from(vec![1u8; 10]), &headers, 100).await;
        assert!(read.is_err());
    }
}
