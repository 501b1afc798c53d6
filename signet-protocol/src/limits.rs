//! Limits on an upload as it streams: its size and how long it may stay silent.
//!
//! [`limit`] wraps a request body; the wrapped body ends in an error once the input
//! passes its size limit, sends nothing for the idle time or breaks off, and
//! [`Tripped`] says which, so the answer names the caller's fault instead of a broken
//! relay to the agent.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use futures_util::StreamExt;
use http_body_util::{BodyStream, StreamBody};
use signet_api::wire::{ErrorBody, ErrorCode};

/// Which limit an upload ran into, if any.
#[derive(Debug, Default)]
pub struct Tripped(AtomicU8);

const NONE: u8 = 0;
const TOO_LARGE: u8 = 1;
const STALLED: u8 = 2;
const BROKE_OFF: u8 = 3;

impl Tripped {
    /// The error for the limit the upload ran into; `None` when it ran into none.
    pub fn error(&self, max_size: u64, idle: Duration) -> Option<ErrorBody> {
        match self.0.load(Ordering::SeqCst) {
            TOO_LARGE => Some(too_large(max_size)),
            STALLED => Some(ErrorBody::new(
                ErrorCode::TruncatedInput,
                format!(
                    "the upload sent nothing for {} s and was abandoned; nothing was signed. Send the file again",
                    idle.as_secs()
                ),
            )),
            BROKE_OFF => Some(ErrorBody::new(
                ErrorCode::TruncatedInput,
                "the upload broke off before its end; nothing was signed. Send the file again",
            )),
            _ => None,
        }
    }
}

/// The error for an input above `max_size` bytes.
pub fn too_large(max_size: u64) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::InputTooLarge,
        format!(
            "the input is larger than this profile's limit of {max_size} bytes; nothing was signed"
        ),
    )
}

/// `body`, cut off with an error after `max_size` bytes or `idle` without data.
/// Trailers (after the last byte) pass through as they came.
pub fn limit(body: Body, max_size: u64, idle: Duration) -> (Body, Arc<Tripped>) {
    let tripped = Arc::new(Tripped::default());
    let t = Arc::clone(&tripped);
    let stream = futures_util::stream::unfold(
        (BodyStream::new(body), 0u64, false),
        move |(mut s, seen, done)| {
            let t = Arc::clone(&t);
            async move {
                if done {
                    return None;
                }
                match tokio::time::timeout(idle, s.next()).await {
                    Err(_) => {
                        t.0.store(STALLED, Ordering::SeqCst);
                        Some((
                            Err(std::io::Error::other("upload stalled")),
                            (s, seen, true),
                        ))
                    }
                    Ok(None) => None,
                    Ok(Some(Err(e))) => {
                        t.0.store(BROKE_OFF, Ordering::SeqCst);
                        Some((Err(std::io::Error::other(e)), (s, seen, true)))
                    }
                    Ok(Some(Ok(frame))) => {
                        let seen = seen + frame.data_ref().map_or(0, |d| d.len() as u64);
                        if seen > max_size {
                            t.0.compare_exchange(
                                NONE,
                                TOO_LARGE,
                                Ordering::SeqCst,
                                Ordering::SeqCst,
                            )
                            .ok();
                            Some((
                                Err(std::io::Error::other("input too large")),
                                (s, seen, true),
                            ))
                        } else {
                            Some((Ok(frame), (s, seen, false)))
                        }
                    }
                }
            }
        },
    );
    (Body::new(StreamBody::new(stream)), tripped)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn passes_an_input_within_the_limit() {
        let (b, t) = limit(Body::from(vec![7u8; 100]), 100, Duration::from_secs(60));
        let got = b.collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), 100);
        assert!(t.error(100, Duration::from_secs(60)).is_none());
    }

    #[tokio::test]
    async fn cuts_off_an_input_above_the_limit() {
        let chunks = futures_util::stream::iter(
            (0..5).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![0u8; 40]))),
        );
        let (b, t) = limit(Body::from_stream(chunks), 100, Duration::from_secs(60));
        assert!(b.collect().await.is_err());
        let e = t.error(100, Duration::from_secs(60)).unwrap();
        assert_eq!(e.code, ErrorCode::InputTooLarge);
        assert!(e.message.contains("100 bytes"), "{}", e.message);
    }

    #[tokio::test]
    async fn passes_trailers_on_after_the_data() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert(
            "x-signet-input-sha256",
            http::HeaderValue::from_static("ab"),
        );
        let frames = futures_util::stream::iter([
            Ok::<_, std::io::Error>(hyper::body::Frame::data(bytes::Bytes::from(vec![1u8; 60]))),
            Ok(hyper::body::Frame::data(bytes::Bytes::from(vec![2u8; 40]))),
            Ok(hyper::body::Frame::trailers(trailers.clone())),
        ]);
        let (b, t) = limit(
            Body::new(StreamBody::new(frames)),
            100,
            Duration::from_secs(60),
        );
        let got = b.collect().await.unwrap();
        assert_eq!(got.trailers(), Some(&trailers));
        assert_eq!(got.to_bytes().len(), 100);
        assert!(t.error(100, Duration::from_secs(60)).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn abandons_a_silent_upload() {
        let silent = futures_util::stream::pending::<Result<bytes::Bytes, std::io::Error>>();
        let (b, t) = limit(Body::from_stream(silent), 100, Duration::from_secs(5));
        assert!(b.collect().await.is_err());
        let e = t.error(100, Duration::from_secs(5)).unwrap();
        assert_eq!(e.code, ErrorCode::TruncatedInput);
        assert!(e.message.contains("5 s"), "{}", e.message);
    }
}
