//! The native engine's RFC 3161 client: POSTs the engine's TimeStampReq to the
//! profile's timestamp servers in order and answers the first reply the engine's
//! checks accept (granted, our nonce, our message imprint, a signed TSTInfo).
//!
//! Each server is tried up to [`ATTEMPTS`] times when it cannot be reached, fails or
//! does not answer within its time limit; a server that answers with a refusal or a
//! wrong timestamp is not asked again. Plain `http://` servers are reached; an
//! `https://` one is skipped with the reason (the osslsigncode backend reaches them).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use signet_authenticode::TimestampRequest;
use signet_protocol::client::send_over;
use signet_protocol::Endpoint;

/// How many times one server is tried when it cannot be reached or does not answer.
pub const ATTEMPTS: u32 = 2;

/// The largest reply read (a timestamp with its TSA's chain is a few KiB).
const MAX_REPLY: usize = 1 << 20;

/// Where and how long to ask.
#[derive(Debug, Clone)]
pub struct TsaClient {
    pub servers: Vec<String>,
    /// The limit of one attempt (connect, send, read the reply).
    pub per_attempt: Duration,
}

impl TsaClient {
    /// The servers with the run's time limit `total` shared out: every attempt at
    /// every server gets an equal part of it (at least one second).
    pub fn new(servers: &[String], total: Duration) -> TsaClient {
        let n = u32::try_from(servers.len().max(1)).unwrap_or(u32::MAX);
        let per_attempt = (total / n.saturating_mul(ATTEMPTS)).max(Duration::from_secs(1));
        TsaClient {
            servers: servers.to_vec(),
            per_attempt,
        }
    }

    /// The first accepted TimeStampResp (DER) for `request`; or, when no server gave
    /// one, what each said.
    pub async fn fetch(&self, request: &TimestampRequest) -> Result<Vec<u8>, String> {
        let mut why = Vec::new();
        for url in &self.servers {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let answer = tokio::time::timeout(self.per_attempt, post(url, request.der())).await;
                let failure = match answer {
                    Err(_) => Failure::Retry(format!(
                        "no answer within {} s",
                        self.per_attempt.as_secs_f32()
                    )),
                    Ok(Err(f)) => f,
                    Ok(Ok(reply)) => match request.check(&reply) {
                        Ok(_) => return Ok(reply),
                        Err(e) => Failure::Final(e),
                    },
                };
                match failure {
                    Failure::Retry(e) if attempt < ATTEMPTS => {
                        tracing::info!(server = %url, "timestamp attempt {attempt} failed: {e}; trying again");
                    }
                    Failure::Retry(e) | Failure::Final(e) => {
                        tracing::warn!(server = %url, "no timestamp: {e}");
                        why.push(format!("{url}: {e}"));
                        break;
                    }
                }
            }
        }
        Err(why.join("; "))
    }
}

enum Failure {
    /// Worth asking the same server again.
    Retry(String),
    /// The server answered; asking again would not help.
    Final(String),
}

/// One `application/timestamp-query` POST; the reply's body.
async fn post(url: &str, body: &[u8]) -> Result<Vec<u8>, Failure> {
    if url.starts_with("https://") {
        return Err(Failure::Final(
            "https timestamp servers are not reached by the native engine: use an http:// server or signer.backend = \"osslsigncode\"".into(),
        ));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e| Failure::Final(format!("not a URL: {e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| Failure::Final("the URL names no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| Failure::Retry(format!("cannot connect: {e}")))?;
    let endpoint = Endpoint::Tcp {
        host: host.clone(),
        port,
    };
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or(host);
    let path = uri
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    let req = http::Request::post(path)
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_TYPE, "application/timestamp-query")
        .header(http::header::ACCEPT, "application/timestamp-reply")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| Failure::Final(format!("cannot make the request: {e}")))?;
    let resp = send_over(stream, &endpoint, req)
        .await
        .map_err(|e| Failure::Retry(format!("HTTP failed: {e}")))?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_REPLY)
        .collect()
        .await
        .map_err(|e| Failure::Retry(format!("the reply was cut short: {e}")))?
        .to_bytes();
    if status.is_server_error() {
        return Err(Failure::Retry(format!("HTTP status {status}")));
    }
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Err(Failure::Final(format!(
            "HTTP status {status}: {}",
            text.trim()
        )));
    }
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use signet_authenticode::HashAlg;
    use signet_test_support::{refused_url, SilentServer, Tsa};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A server on loopback answering every POST with `status` and `body`; counts the
    /// requests it read.
    async fn canned(status: u16, body: Vec<u8>) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/ts", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                // The headers, then as many bytes as Content-Length says.
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        if req.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/timestamp-reply\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                s.write_all(head.as_bytes()).await.unwrap();
                s.write_all(&body).await.unwrap();
                s.shutdown().await.unwrap();
            }
        });
        (url, hits)
    }

    fn request() -> TimestampRequest {
        TimestampRequest::over(b"a signature value", HashAlg::Sha256).unwrap()
    }

    fn client(servers: &[&str]) -> TsaClient {
        TsaClient {
            servers: servers.iter().map(|s| (*s).to_owned()).collect(),
            per_attempt: Duration::from_secs(5),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn servers_are_asked_in_order_passing_over_those_that_fail() {
        let dir = tempfile::tempdir().unwrap();
        let first = Tsa::start(&dir.path().join("first"));
        let second = Tsa::start(&dir.path().join("second"));
        let (failing, hits) = canned(503, b"busy".to_vec()).await;
        let req = request();
        let reply = client(&[&refused_url(), &failing, &first.url, &second.url])
            .fetch(&req)
            .await
            .unwrap();
        assert!(req.check(&reply).is_ok());
        assert_eq!(hits.load(Ordering::SeqCst), ATTEMPTS as usize, "retried");
        assert_eq!((first.replies(), second.replies()), (1, 0));

        // The second answers when it comes first.
        client(&[&second.url, &first.url])
            .fetch(&request())
            .await
            .unwrap();
        assert_eq!((first.replies(), second.replies()), (1, 1));

        // None answers: each says why, in order.
        let dead = refused_url();
        let err = client(&[&dead, &failing]).fetch(&req).await.unwrap_err();
        let (d, f) = (err.find(&dead).unwrap(), err.find(&failing).unwrap());
        assert!(
            d < f && err.contains("cannot connect") && err.contains("503"),
            "{err}"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_server_that_never_answers_is_given_up_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let tsa = Tsa::start(&dir.path().join("tsa"));
        let silent = SilentServer::start();
        let mut c = client(&[&silent.url, &tsa.url]);
        c.per_attempt = Duration::from_secs(1);
        let req = request();
        assert!(req.check(&c.fetch(&req).await.unwrap()).is_ok());
        assert_eq!(tsa.replies(), 1);
        c.servers.pop();
        let err = c.fetch(&req).await.unwrap_err();
        assert!(err.contains("no answer within 1 s"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_timestamp_of_another_imprint_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tsa = Tsa::start(&dir.path().join("tsa"));
        // A real timestamp, of another signature.
        let other = TimestampRequest::over(b"another signature", HashAlg::Sha256).unwrap();
        let wrong = client(&[&tsa.url]).fetch(&other).await.unwrap();
        let (liar, hits) = canned(200, wrong).await;
        let req = request();
        let err = client(&[&liar]).fetch(&req).await.unwrap_err();
        assert!(err.contains("message imprint"), "{err}");
        assert_eq!(hits.load(Ordering::SeqCst), 1, "not asked again");
        let reply = client(&[&liar, &tsa.url]).fetch(&req).await.unwrap();
        assert!(req.check(&reply).is_ok());
        assert_eq!(tsa.replies(), 2);
    }

    #[test]
    fn the_run_limit_is_shared_between_servers_and_attempts() {
        let two = ["http://a/".to_owned(), "http://b/".to_owned()];
        let c = TsaClient::new(&two, Duration::from_secs(600));
        assert_eq!(c.per_attempt, Duration::from_secs(150));
        let c = TsaClient::new(&two, Duration::from_secs(2));
        assert_eq!(c.per_attempt, Duration::from_secs(1));
    }
}
