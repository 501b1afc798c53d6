//! Many files in one request: `multipart/form-data` framing, streamed from disk.
//!
//! A batch request (`POST /v1/batch`, `POST /agent/v1/batch`) carries one part per
//! file, each with a `filename`; the answer carries one part per input part, in the
//! same order, each with an `x-signet-result` header: `signed` (the body is the signed
//! file, or the signature in digest mode) or `error` (the body is an
//! [`ErrorBody`](signet_api::wire::ErrorBody) in JSON). Parts are read from files one after
//! the other, so memory stays constant whatever the batch's size.

use std::io;
use std::path::PathBuf;

use bytes::Bytes;
use futures_util::stream::{self, Stream, StreamExt};

/// Header of an answer part: `signed` or `error`.
pub const RESULT_HEADER: &str = "x-signet-result";
/// The form field name of every part.
pub const FIELD: &str = "file";

/// One part to send.
#[derive(Debug, Clone)]
pub struct Part {
    /// File name put in `Content-Disposition` (made safe for a quoted string).
    pub filename: String,
    /// Extra headers, e.g. [`RESULT_HEADER`].
    pub headers: Vec<(String, String)>,
    pub content_type: &'static str,
    pub body: PartBody,
}

/// Where a part's bytes come from.
#[derive(Debug, Clone)]
pub enum PartBody {
    File(PathBuf),
    Bytes(Bytes),
}

/// A fresh boundary: 32 random hex digits, which no file is expected to contain
/// after a CRLF and two dashes.
pub fn new_boundary() -> String {
    let mut raw = [0u8; 16];
    // The system's random source on every platform; the time below keeps two
    // boundaries apart even if it failed.
    let _ = getrandom::fill(&mut raw);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut s = String::from("signet-");
    for b in raw {
        s.push_str(&format!("{b:02x}"));
    }
    s.push_str(&format!("-{nanos:x}"));
    s
}

/// The `Content-Type` of a batch with this boundary.
pub fn content_type(boundary: &str) -> String {
    format!("multipart/form-data; boundary={boundary}")
}

fn quoted(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The bytes that open a part (`first`: no part came before it).
pub fn part_head(
    boundary: &str,
    filename: &str,
    content_type: &str,
    headers: &[(String, String)],
    first: bool,
) -> Bytes {
    let mut h = String::new();
    if !first {
        h.push_str("\r\n");
    }
    h.push_str(&format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{FIELD}\"; filename=\"{}\"\r\nContent-Type: {content_type}\r\n",
        quoted(filename),
    ));
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    Bytes::from(h)
}

/// The bytes that close a body (`empty`: it had no part).
pub fn closing(boundary: &str, empty: bool) -> Bytes {
    Bytes::from(if empty {
        format!("--{boundary}--\r\n")
    } else {
        format!("\r\n--{boundary}--\r\n")
    })
}

/// The whole multipart body of `parts`, streamed; files are opened when their turn
/// comes. A file that cannot be read ends the stream with its error.
pub fn body(
    boundary: String,
    parts: Vec<Part>,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send {
    let closing = closing(&boundary, parts.is_empty());
    let heads: Vec<Bytes> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| part_head(&boundary, &p.filename, p.content_type, &p.headers, i == 0))
        .collect();
    stream::iter(parts.into_iter().zip(heads))
        .then(|(part, head)| async move {
            let body: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + Send>> =
                match part.body {
                    PartBody::Bytes(b) => Box::pin(stream::once(async move { Ok(b) })),
                    PartBody::File(path) => match tokio::fs::File::open(&path).await {
                        Ok(f) => Box::pin(tokio_util::io::ReaderStream::with_capacity(
                            f,
                            crate::IO_BLOCK,
                        )),
                        Err(e) => Box::pin(stream::once(async move { Err(e) })),
                    },
                };
            stream::once(async move { Ok(head) }).chain(body)
        })
        .flatten()
        .chain(stream::once(async move { Ok(closing) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_parses_back_into_its_parts_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("big.bin"), &big).unwrap();
        let boundary = new_boundary();
        assert!(boundary.len() > 40);
        assert_ne!(boundary, new_boundary());
        let parts = vec![
            Part {
                filename: "a \"b\".exe".into(),
                headers: vec![(RESULT_HEADER.into(), "signed".into())],
                content_type: "application/octet-stream",
                body: PartBody::File(dir.path().join("big.bin")),
            },
            Part {
                filename: "err.exe".into(),
                headers: vec![(RESULT_HEADER.into(), "error".into())],
                content_type: "application/json",
                body: PartBody::Bytes(Bytes::from_static(b"{\"code\":\"internal\"}")),
            },
        ];
        let stream = body(boundary.clone(), parts);
        let mut mp = multer::Multipart::new(stream, boundary);
        let mut seen = Vec::new();
        while let Some(field) = mp.next_field().await.unwrap() {
            let name = field.file_name().unwrap().to_owned();
            let result = field
                .headers()
                .get(RESULT_HEADER)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let data = field.bytes().await.unwrap();
            seen.push((name, result, data));
        }
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].0, "a _b_.exe");
        assert_eq!(seen[0].1, "signed");
        assert_eq!(&seen[0].2[..], &big[..]);
        assert_eq!(seen[1].1, "error");
        assert_eq!(&seen[1].2[..], b"{\"code\":\"internal\"}");
    }

    #[tokio::test]
    async fn a_missing_file_ends_the_stream_with_its_error() {
        let parts = vec![Part {
            filename: "x".into(),
            headers: vec![],
            content_type: "application/octet-stream",
            body: PartBody::File("/nonexistent/x".into()),
        }];
        let items: Vec<_> = body(new_boundary(), parts).collect().await;
        assert!(items.iter().any(|r| r
            .as_ref()
            .is_err_and(|e| e.kind() == io::ErrorKind::NotFound)));
    }
}
