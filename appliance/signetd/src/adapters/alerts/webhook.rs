//! A webhook: the message POSTed as JSON (`application/json`, the fields of
//! [`Message`]) to an `http://` or `https://` URL, through the project's HTTP client
//! (`signet_protocol::client`; https with the system's CA certificates), with a bearer
//! token when one is configured. Any 2xx answer is taken.

use std::path::Path;

use bytes::Bytes;
use http_body_util::Full;
use secrecy::{ExposeSecret, SecretString};
use signet_protocol::endpoint::Endpoint;

use super::{DeliveryError, Message, DELIVERY_LIMIT};
use crate::config::alerts::WebhookUrl;

/// Reads the webhook's bearer token: the first line of a regular file owned by the
/// daemon's user and open to nobody else.
pub fn read_token(path: &Path) -> Result<SecretString, DeliveryError> {
    crate::config::alerts::check_token_file(path).map_err(DeliveryError::Setup)?;
    let shown = path.display();
    let fix = format!("write the webhook's token into {shown} as root: (umask 077; cat > {shown})");
    let text = std::fs::read_to_string(path)
        .map_err(|e| DeliveryError::Setup(format!("webhook_token_file {shown}: {e}; {fix}")))?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() || token.chars().any(|c| c.is_control()) {
        return Err(DeliveryError::Setup(format!(
            "webhook_token_file {shown} holds no token on its first line; {fix}"
        )));
    }
    Ok(SecretString::from(token))
}

/// POSTs `msg` to `url` (shown as `shown`, which never holds the token).
pub async fn deliver(
    url: &WebhookUrl,
    shown: &str,
    token: Option<&SecretString>,
    msg: &Message,
) -> Result<(), DeliveryError> {
    let endpoint = if url.tls {
        Endpoint::Tls {
            host: url.host.clone(),
            port: url.port,
        }
    } else {
        Endpoint::Tcp {
            host: url.host.clone(),
            port: url.port,
        }
    };
    let body = serde_json::to_vec(msg).map_err(|e| DeliveryError::Setup(e.to_string()))?;
    let mut req = http::Request::post(&url.path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("signetd/", env!("CARGO_PKG_VERSION")),
        );
    let host = if url.host.contains(':') {
        format!("[{}]:{}", url.host, url.port)
    } else {
        format!("{}:{}", url.host, url.port)
    };
    req = req.header(http::header::HOST, host);
    if let Some(t) = token {
        let mut v = http::HeaderValue::from_str(&format!("Bearer {}", t.expose_secret()))
            .map_err(|_| DeliveryError::Setup("the webhook's token is not a valid header value; write it on one line of printable characters".to_owned()))?;
        v.set_sensitive(true);
        req = req.header(http::header::AUTHORIZATION, v);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| DeliveryError::Setup(format!("the webhook's request cannot be made: {e}")))?;
    let unreachable = |detail: String| DeliveryError::Unreachable {
        url: shown.to_owned(),
        detail,
    };
    let resp = tokio::time::timeout(
        DELIVERY_LIMIT,
        signet_protocol::client::send(&endpoint, req),
    )
    .await
    .map_err(|_| unreachable(format!("no answer within {} s", DELIVERY_LIMIT.as_secs())))?
    .map_err(|e| unreachable(e.to_string()))?;
    let status = resp.status();
    // The answer's body is not wanted; the connection ends with it.
    drop(resp);
    if status.is_success() {
        Ok(())
    } else {
        Err(DeliveryError::Refused {
            url: shown.to_owned(),
            status: status.as_u16(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A receiver on 127.0.0.1:0 that answers `status` to one request and gives it back.
    async fn receiver(status: &'static str) -> (u16, tokio::task::JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            s.write_all(
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            String::from_utf8(got).unwrap()
        });
        (port, task)
    }

    #[tokio::test]
    async fn alerts_webhook_posts_json_with_its_token() {
        let (port, got) = receiver("204 No Content").await;
        let url = WebhookUrl::parse(&format!("http://127.0.0.1:{port}/hook?k=1")).unwrap();
        let token = SecretString::from("s3cret".to_owned());
        let m = crate::adapters::alerts::sample();
        deliver(&url, "http://127.0.0.1/hook", Some(&token), &m)
            .await
            .unwrap();
        let req = got.await.unwrap();
        let (head, body) = req.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("POST /hook?k=1 HTTP/1.1\r\n"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("authorization: bearer s3cret"), "{head}");
        assert!(lower.contains("content-type: application/json"), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["kind"], "token-lost");
        assert_eq!(v["state"], "raised");
        assert_eq!(v["hostname"], "pve1");
    }

    #[tokio::test]
    async fn alerts_webhook_refusals_and_absence_are_errors() {
        let (port, got) = receiver("500 Internal Server Error").await;
        let url = WebhookUrl::parse(&format!("http://127.0.0.1:{port}/")).unwrap();
        let m = crate::adapters::alerts::sample();
        let e = deliver(&url, "http://x/", None, &m)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("answered 500") && e.contains("http://x/"), "{e}");
        got.await.unwrap();
        // Nobody listening any more on that port.
        let e = deliver(&url, "http://x/", None, &m)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("could not be reached"), "{e}");
    }

    #[test]
    fn alerts_webhook_token_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "abc\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 0600"), "{e}");
        assert!(!e.contains("abc"), "the token is never shown");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&p).unwrap().expose_secret(), "abc");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_token(&p).unwrap_err().to_string().contains("no token"));
    }
}
