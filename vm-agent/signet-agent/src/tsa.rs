//! The native engine's RFC 3161 client: POSTs the engine's TimeStampReq to the
//! profile's timestamp servers in order and answers the first reply the engine's
//! checks accept (granted, our nonce, our message imprint, a signed TSTInfo).
//!
//! Each server is tried up to [`ATTEMPTS`] times when it cannot be reached, fails or
//! does not answer within its time limit; a server that answers with a refusal or a
//! wrong timestamp is not asked again. `http://` servers are reached over TCP,
//! `https://` ones over TLS (rustls): the server's certificate must chain to the
//! system's trusted roots or to `signer.timestamp_ca_file`'s CAs and name the URL's
//! host (sent as SNI). A server whose certificate is not accepted is not asked again,
//! and never over plain HTTP instead.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use signet_authenticode::TimestampRequest;
use signet_protocol::client::send_over;
use signet_protocol::Endpoint;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;

/// How many times one server is tried when it cannot be reached or does not answer.
pub const ATTEMPTS: u32 = 2;

/// The largest reply read (a timestamp with its TSA's chain is a few KiB).
const MAX_REPLY: usize = 1 << 20;

/// Where and how long to ask.
#[derive(Debug, Clone)]
pub struct TsaClient {
    pub servers: Vec<String>,
    /// The limit of one attempt (connect, TLS handshake, send, read the reply).
    pub per_attempt: Duration,
    /// Whom `https://` servers must prove to be.
    pub trust: Trust,
}

/// The trust anchors of `https://` timestamp servers: the system's roots, and the CA
/// certificates of `signer.timestamp_ca_file` when it is set.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    pub ca_file: Option<PathBuf>,
}

impl Trust {
    /// The TLS connector trusting the system's roots and the CA file's; or why there
    /// is none, with the fix.
    fn connector(&self) -> Result<TlsConnector, String> {
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(system_roots().iter().cloned());
        let mut total = added;
        if let Some(ca) = &self.ca_file {
            let certs = read_ca_file(ca)?;
            let (added, ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "signer.timestamp_ca_file: none of its {ignored} certificates can be used as a CA; give the CA certificate that issued the timestamp server's TLS certificate"
                ));
            }
            total += added;
        }
        if total == 0 {
            return Err("this system has no trusted root certificates (install ca-certificates) and signer.timestamp_ca_file is not set; set it to the CA that issued the timestamp server's TLS certificate".into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsConnector::from(Arc::new(config)))
    }

    /// What was trusted, for messages the caller sees too (no path of the agent's).
    fn describe(&self) -> &'static str {
        match &self.ca_file {
            Some(_) => "the system's roots or signer.timestamp_ca_file's CAs",
            None => "the system's roots (signer.timestamp_ca_file is not set)",
        }
    }
}

/// The CA certificates in the PEM file `path`, or why they cannot be read.
fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "cannot read signer.timestamp_ca_file: {e}; fix it in the agent's configuration"
            )
        })?;
    if certs.is_empty() {
        return Err("signer.timestamp_ca_file holds no PEM certificate; fix it in the agent's configuration".into());
    }
    Ok(certs)
}

/// The system's trusted roots (OpenSSL's bundle, `SSL_CERT_FILE` first, on Linux; the
/// certificate store on Windows), read once.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!("a trusted root certificate of this system cannot be read: {e}");
        }
        found.certs
    })
}

impl TsaClient {
    /// The servers with the run's time limit `total` shared out: every attempt at
    /// every server gets an equal part of it (at least one second).
    pub fn new(servers: &[String], total: Duration, trust: Trust) -> TsaClient {
        let n = u32::try_from(servers.len().max(1)).unwrap_or(u32::MAX);
        let per_attempt = (total / n.saturating_mul(ATTEMPTS)).max(Duration::from_secs(1));
        TsaClient {
            servers: servers.to_vec(),
            per_attempt,
            trust,
        }
    }

    /// The first accepted TimeStampResp (DER) for `request`; or, when no server gave
    /// one, what each said.
    pub async fn fetch(&self, request: &TimestampRequest) -> Result<Vec<u8>, String> {
        let mut why = Vec::new();
        // Made once per run, and only when an https:// server is asked.
        let mut tls: Option<Result<TlsConnector, String>> = None;
        for url in &self.servers {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let connector = if url.starts_with("https://") {
                    match tls.get_or_insert_with(|| self.trust.connector()) {
                        Ok(c) => Some(c.clone()),
                        Err(e) => {
                            tracing::warn!(server = %url, "no timestamp: {e}");
                            why.push(format!("{url}: {e}"));
                            break;
                        }
                    }
                } else {
                    None
                };
                let answer = tokio::time::timeout(
                    self.per_attempt,
                    post(url, request.der(), connector, &self.trust),
                )
                .await;
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
    /// The server answered (or proved to be no one we trust); asking again would not
    /// help.
    Final(String),
}

/// One `application/timestamp-query` POST, over TLS with `tls` (an `https://` URL);
/// the reply's body.
async fn post(
    url: &str,
    body: &[u8],
    tls: Option<TlsConnector>,
    trust: &Trust,
) -> Result<Vec<u8>, Failure> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| Failure::Final(format!("not a URL: {e}")))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(Failure::Final(
                "not an http:// or https:// URL: fix the profile's timestamp list".into(),
            ))
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| Failure::Final("the URL names no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| Failure::Retry(format!("cannot connect: {e}")))?;
    // Only a name for messages and the Host header: a timestamp server is an outside
    // party, and `Endpoint::Tls` would carry the client's credentials.
    let endpoint = Endpoint::Tcp {
        host: host.clone(),
        port,
    };
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| host.clone());
    let path = uri
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    let req = http::Request::post(path)
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_TYPE, "application/timestamp-query")
        .header(http::header::ACCEPT, "application/timestamp-reply")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| Failure::Final(format!("cannot make the request: {e}")))?;
    let resp = if https {
        let Some(connector) = tls else {
            return Err(Failure::Final("no TLS set up for an https:// URL".into()));
        };
        let name = ServerName::try_from(host.clone())
            .map_err(|e| Failure::Final(format!("{host:?} is not a TLS server name: {e}")))?;
        let stream = connector
            .connect(name, stream)
            .await
            .map_err(|e| tls_failure(&e, &host, trust))?;
        send_over(stream, &endpoint, req).await
    } else {
        send_over(stream, &endpoint, req).await
    }
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

/// A failed TLS handshake: a refusal (not asked again) when TLS itself failed — the
/// certificate not accepted, an alert — with the fix; a broken connection is retried.
fn tls_failure(e: &std::io::Error, host: &str, trust: &Trust) -> Failure {
    use rustls::CertificateError as C;
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return Failure::Retry(format!("the TLS handshake failed: {e}"));
    };
    Failure::Final(match tls {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => format!(
            "the server's TLS certificate does not chain to {}; if the server's certificate comes from a private CA, set signer.timestamp_ca_file in the agent's configuration to that CA's PEM file",
            trust.describe()
        ),
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => format!(
            "the server's TLS certificate is not valid for {host} ({tls}); name the server in the URL as its certificate does"
        ),
        rustls::Error::InvalidCertificate(c) => {
            format!("the server's TLS certificate is not accepted: {c}")
        }
        other => format!("the TLS handshake failed: {other}"),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use signet_authenticode::HashAlg;
    use signet_test_support::{make_tls, refused_url, SilentServer, TlsFront, Tsa};
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
        trusting(servers, Trust::default())
    }

    fn trusting(servers: &[&str], trust: Trust) -> TsaClient {
        TsaClient {
            servers: servers.iter().map(|s| (*s).to_owned()).collect(),
            per_attempt: Duration::from_secs(5),
            trust,
        }
    }

    /// `tsa` behind TLS, with a certificate for 127.0.0.1 from a test CA of its own made
    /// in `dir`; and that CA's file.
    fn behind_tls(dir: &Path, tsa: &Tsa) -> (TlsFront, PathBuf) {
        std::fs::create_dir_all(dir).unwrap();
        let (ca, cert, key) = make_tls(dir);
        (TlsFront::start(&tsa.url, &cert, &key), ca)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn https_servers_must_chain_to_a_trusted_ca_and_name_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let tsa = Tsa::start(&dir.path().join("tsa"));
        let (front, ca) = behind_tls(&dir.path().join("ours"), &tsa);
        let (stranger, _) = behind_tls(&dir.path().join("stranger"), &tsa);
        let ours = Trust {
            ca_file: Some(ca.clone()),
        };
        let req = request();

        // Granted over TLS with its CA in signer.timestamp_ca_file.
        let reply = trusting(&[&front.url], ours.clone())
            .fetch(&req)
            .await
            .unwrap();
        assert!(req.check(&reply).is_ok());
        assert_eq!((front.connections(), tsa.replies()), (1, 1));

        // The system's roots alone do not hold the test CA: refused once, not asked
        // again, and never over plain HTTP.
        let err = client(&[&front.url]).fetch(&req).await.unwrap_err();
        assert!(
            err.contains("does not chain to the system's roots")
                && err.contains("set signer.timestamp_ca_file"),
            "{err}"
        );
        assert_eq!((front.connections(), tsa.replies()), (2, 1));

        // A server whose certificate another CA issued is refused; the next one answers.
        let reply = trusting(&[&stranger.url, &front.url], ours.clone())
            .fetch(&req)
            .await
            .unwrap();
        assert!(req.check(&reply).is_ok());
        assert_eq!(stranger.connections(), 1, "not asked again");
        assert_eq!((front.connections(), tsa.replies()), (3, 2));
        let err = trusting(&[&stranger.url], ours.clone())
            .fetch(&req)
            .await
            .unwrap_err();
        assert!(
            err.contains(&stranger.url)
                && err.contains("the system's roots or signer.timestamp_ca_file's CAs")
                && !err.contains(&ca.display().to_string()),
            "{err}"
        );

        // The certificate is for 127.0.0.1, not for the name in the URL (sent as SNI).
        let named = format!("https://localhost:{}/", front.port);
        let err = trusting(&[&named], ours.clone())
            .fetch(&req)
            .await
            .unwrap_err();
        assert!(err.contains("not valid for localhost"), "{err}");
        assert_eq!((front.connections(), tsa.replies()), (4, 2));

        // A CA file that cannot be read: https servers are not asked, http ones are.
        let missing = Trust {
            ca_file: Some(dir.path().join("missing.pem")),
        };
        let reply = trusting(&[&front.url, &tsa.url], missing.clone())
            .fetch(&req)
            .await
            .unwrap();
        assert!(req.check(&reply).is_ok());
        assert_eq!((front.connections(), tsa.replies()), (4, 3));
        let err = trusting(&[&front.url], missing)
            .fetch(&req)
            .await
            .unwrap_err();
        assert!(
            err.contains("cannot read signer.timestamp_ca_file") && !err.contains("missing.pem"),
            "{err}"
        );

        // A TLS server that never finishes its handshake is tried again, within the
        // limit of each attempt.
        let silent = SilentServer::start();
        let mut c = trusting(&[&silent.url.replace("http://", "https://")], ours);
        c.per_attempt = Duration::from_secs(1);
        let err = c.fetch(&req).await.unwrap_err();
        assert!(err.contains("no answer within 1 s"), "{err}");
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
        let c = TsaClient::new(&two, Duration::from_secs(600), Trust::default());
        assert_eq!(c.per_attempt, Duration::from_secs(150));
        let c = TsaClient::new(&two, Duration::from_secs(2), Trust::default());
        assert_eq!(c.per_attempt, Duration::from_secs(1));
    }
}
