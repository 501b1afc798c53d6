//! Who is looking: the Proxmox VE login the browser already has.
//!
//! The browser sends PVE's `PVEAuthCookie` to every port of the node's host name, so
//! it reaches the web UI too. The UI does not read the ticket's signature itself: it
//! asks the local PVE API which privileges the ticket's user has on the node
//! (`GET /api2/json/access/permissions?path=/nodes/NODE`, the cookie forwarded), through
//! the [`PveAuth`] port. [`PveApi`] is the real adapter (HTTPS to `127.0.0.1:8006`,
//! the certificate pinned); tests run it against `StandInPveApi` (in the
//! `signet-test-support` crate, which nothing shipped contains).
//!
//! What each page needs ([`Need`]): `Sys.Audit` on `/nodes/NODE` to read, `Sys.Modify`
//! on `/nodes/NODE` to act (cancel a job). PVE's own roles: `PVEAuditor` has
//! `Sys.Audit`, `PVESysAdmin` and `Administrator` have both.
//!
//! Forms that change something carry a CSRF token ([`csrf_token`]): an HMAC of the
//! ticket under a key the daemon draws at start, checked on every POST. PVE's own
//! `CSRFPreventionToken` protects PVE's API; the UI's calls to PVE only read (GET), so
//! they do not need it.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use sha2::Sha256;
use tokio_rustls::rustls::pki_types::ServerName;

/// The cookie PVE's login sets.
pub const COOKIE: &str = "PVEAuthCookie";
/// The cookie signetd sets for a PVE ticket handed over by the "Signing" tab of
/// another node's PVE UI (`POST /login`): the browser has no PVE login for this node's
/// address, and a framed page gets its own cookies only, partitioned under the PVE
/// page that frames it.
pub const HANDED_COOKIE: &str = "SignetPVEAuth";
/// The privilege the read-only pages need on `/nodes/NODE`.
pub const READ_PRIVILEGE: &str = "Sys.Audit";
/// The privilege actions need on `/nodes/NODE`.
pub const ACT_PRIVILEGE: &str = "Sys.Modify";

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// See a page: `Sys.Audit`.
    Read,
    /// Change something: `Sys.Modify`.
    Act,
}

impl Need {
    pub fn privilege(self) -> &'static str {
        match self {
            Need::Read => READ_PRIVILEGE,
            Need::Act => ACT_PRIVILEGE,
        }
    }
}

/// A user's privileges on one ACL path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Privileges(pub BTreeSet<String>);

impl Privileges {
    pub fn has(&self, privilege: &str) -> bool {
        self.0.contains(privilege)
    }
}

/// Why the user could not be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("you are not logged in to Proxmox VE, or your login expired; log in to the Proxmox VE web interface on this node and open this page again")]
    NotLoggedIn,
    #[error("the Proxmox VE API on this node did not answer the login check; check that pveproxy is running (systemctl status pveproxy). signetd's log has the details")]
    Unavailable(String),
}

/// The port: which privileges the user of `ticket` has on `path`.
pub trait PveAuth: Send + Sync + std::fmt::Debug {
    fn privileges<'a>(
        &'a self,
        ticket: &'a str,
        path: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Privileges, AuthError>> + Send + 'a>>;
}

/// The ACL path of a node.
pub fn node_path(node: &str) -> String {
    format!("/nodes/{node}")
}

/// The `PVEAuthCookie` value in a `Cookie` header, as the browser sent it (still
/// percent-encoded, as PVE's UI stores it).
pub fn ticket_from_cookies(cookie_header: &str) -> Option<&str> {
    cookie_named(cookie_header, COOKIE)
}

/// The value of the cookie `name` in a `Cookie` header, as sent.
pub fn cookie_named<'a>(cookie_header: &'a str, name: &str) -> Option<&'a str> {
    cookie_header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// A ticket as PVE's UI stores it in its cookie (percent-encoded like `escape()`),
/// from one as sent (encoded or not); `None` for what is no PVE ticket.
pub fn encode_ticket(ticket: &str) -> Option<String> {
    let decoded = if ticket.contains('%') {
        percent_decode(ticket)?
    } else {
        ticket.to_owned()
    };
    if decoded.len() > 4096 || !decoded.starts_with("PVE:") {
        return None;
    }
    let encoded = decoded
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.@*/+".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    Some(encoded)
}

/// The user a ticket names (`PVE:root@pam:65F0A1B2::SIGNATURE` → `root@pam`). Only
/// meaningful once PVE accepted the ticket, since the signature covers the name.
pub fn ticket_user(ticket: &str) -> Option<String> {
    let decoded = percent_decode(ticket)?;
    let mut parts = decoded.split(':');
    (parts.next()? == "PVE").then_some(())?;
    let user = parts.next()?;
    (!user.is_empty() && user.contains('@')).then(|| user.to_owned())
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The request [`PveApi`] sends: the permissions of the cookie's user on `path`.
pub fn permissions_request(base: &Uri, ticket: &str, path: &str) -> Request<Empty<Bytes>> {
    let query = serde_urlencoded::to_string([("path", path)]).unwrap_or_default();
    let authority = base.authority().map(|a| a.as_str()).unwrap_or("localhost");
    // The request URI is origin-form; the authority goes in Host.
    Request::get(format!("/api2/json/access/permissions?{query}"))
        .header(header::HOST, authority)
        .header(header::ACCEPT, "application/json")
        .header(header::COOKIE, format!("{COOKIE}={ticket}"))
        .body(Empty::new())
        .unwrap_or_default()
}

#[derive(Deserialize)]
struct Envelope {
    data: Option<
        std::collections::BTreeMap<String, std::collections::BTreeMap<String, serde_json::Value>>,
    >,
}

/// Reads PVE's answer to [`permissions_request`]: `{"data": {PATH: {PRIV: 0|1, ...}}}`.
/// A privilege is granted when it is listed; its value only says whether it
/// propagates. 401 means the ticket is not (or no longer) valid.
pub fn parse_permissions(
    status: StatusCode,
    body: &[u8],
    path: &str,
) -> Result<Privileges, AuthError> {
    if status == StatusCode::UNAUTHORIZED {
        return Err(AuthError::NotLoggedIn);
    }
    if !status.is_success() {
        return Err(AuthError::Unavailable(format!(
            "the PVE API answered {status}"
        )));
    }
    let env: Envelope = serde_json::from_slice(body)
        .map_err(|e| AuthError::Unavailable(format!("unreadable PVE API answer: {e}")))?;
    let Some(data) = env.data else {
        return Err(AuthError::NotLoggedIn);
    };
    Ok(Privileges(
        data.get(path)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default(),
    ))
}

/// The real adapter: asks the PVE API at `base` over HTTPS, trusting exactly the
/// certificates in `pin_file` (see [`super::certs`]).
#[derive(Debug, Clone)]
pub struct PveApi {
    pub base: Uri,
    pub pin_file: PathBuf,
    pub timeout: Duration,
}

impl PveApi {
    async fn fetch(&self, req: Request<Empty<Bytes>>) -> Result<(StatusCode, Bytes), String> {
        let host = self.base.host().ok_or("the PVE API address has no host")?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = self.base.port_u16().unwrap_or(8006);
        let pins = std::fs::read(&self.pin_file)
            .map_err(|e| format!("cannot read {}: {e}", self.pin_file.display()))?;
        let config = super::certs::pinned_client(&pins)
            .map_err(|e| format!("{}: {e}", self.pin_file.display()))?;
        let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }
}

impl PveAuth for PveApi {
    fn privileges<'a>(
        &'a self,
        ticket: &'a str,
        path: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Privileges, AuthError>> + Send + 'a>> {
        Box::pin(async move {
            let req = permissions_request(&self.base, ticket, path);
            match tokio::time::timeout(self.timeout, self.fetch(req)).await {
                Ok(Ok((status, body))) => parse_permissions(status, &body, path),
                Ok(Err(e)) => {
                    tracing::warn!(api = %self.base, error = %e, "the PVE API login check failed");
                    Err(AuthError::Unavailable(e))
                }
                Err(_) => {
                    tracing::warn!(api = %self.base, "the PVE API did not answer the login check in time");
                    Err(AuthError::Unavailable("timed out".into()))
                }
            }
        })
    }
}

/// How long [`Cached`] trusts an answer of PVE's when the configuration does not say.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(10);
/// The most answers [`Cached`] keeps.
const CACHE_ENTRIES: usize = 1024;

/// Remembers PVE's answers for `ttl`, so a page, its script, its style sheet and its
/// event stream cost one call to PVE, not four. A privilege PVE takes away, or a
/// ticket that expires, is noticed at most `ttl` later. Tickets are kept only as
/// SHA-256 hashes; refusals are not remembered.
#[derive(Debug)]
pub struct Cached<A> {
    inner: A,
    ttl: Duration,
    answers:
        std::sync::Mutex<std::collections::HashMap<[u8; 32], (std::time::Instant, Privileges)>>,
}

impl<A> Cached<A> {
    pub fn new(inner: A, ttl: Duration) -> Cached<A> {
        Cached {
            inner,
            ttl,
            answers: std::sync::Mutex::default(),
        }
    }

    fn key(ticket: &str, path: &str) -> [u8; 32] {
        use sha2::Digest;
        let mut h = Sha256::new();
        h.update(path.as_bytes());
        h.update([0]);
        h.update(ticket.as_bytes());
        h.finalize().into()
    }
}

impl<A: PveAuth> PveAuth for Cached<A> {
    fn privileges<'a>(
        &'a self,
        ticket: &'a str,
        path: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Privileges, AuthError>> + Send + 'a>> {
        Box::pin(async move {
            let key = Self::key(ticket, path);
            let now = std::time::Instant::now();
            {
                let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((at, privileges)) = answers.get(&key) {
                    if now.duration_since(*at) < self.ttl {
                        return Ok(privileges.clone());
                    }
                }
            }
            let answer = self.inner.privileges(ticket, path).await;
            let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
            match &answer {
                Ok(privileges) if !self.ttl.is_zero() => {
                    answers.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
                    if answers.len() < CACHE_ENTRIES {
                        answers.insert(key, (now, privileges.clone()));
                    }
                }
                _ => {
                    answers.remove(&key);
                }
            }
            answer
        })
    }
}

/// The CSRF token for forms shown to the holder of `ticket`.
pub fn csrf_token(key: &[u8; 32], ticket: &str) -> String {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(b"signet-web-csrf\n");
    mac.update(ticket.as_bytes());
    crate::adapters::audit::hex(&mac.finalize().into_bytes())
}

/// Whether `sent` is the CSRF token of `ticket`, compared in constant time.
pub fn csrf_ok(key: &[u8; 32], ticket: &str, sent: &str) -> bool {
    let want = csrf_token(key, ticket);
    want.len() == sent.len()
        && want
            .bytes()
            .zip(sent.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = include_str!("../../../tests/data/pve-api/permissions-root.json");
    const AUDITOR: &str = include_str!("../../../tests/data/pve-api/permissions-auditor.json");
    const NOBODY: &str = include_str!("../../../tests/data/pve-api/permissions-none.json");
    const EXPIRED: &str = include_str!("../../../tests/data/pve-api/permissions-401.json");

    #[test]
    fn a_handed_over_ticket_is_stored_as_pves_ui_stores_it_and_nothing_else_passes() {
        let t = "PVE:root@pam:6571A1B2::abc+/def==";
        let e = encode_ticket(t).unwrap();
        assert_eq!(e, "PVE%3Aroot@pam%3A6571A1B2%3A%3Aabc+/def%3D%3D");
        assert_eq!(
            encode_ticket(&e).as_deref(),
            Some(e.as_str()),
            "encoded already"
        );
        assert_eq!(ticket_user(&e).as_deref(), Some("root@pam"));
        // Nothing that could end the cookie or the header passes through.
        let evil = encode_ticket("PVE:a@b:1::x;\r\nSet-Cookie: y=1").unwrap();
        assert!(!evil.contains([';', '\r', '\n', ' ']), "{evil}");
        for bad in ["", "not a ticket", "%ZZ", &"PVE:".repeat(2000)] {
            assert_eq!(encode_ticket(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_request_forwards_the_cookie_and_asks_for_the_node_path() {
        let base: Uri = "https://127.0.0.1:8006".parse().unwrap();
        let ticket = "PVE%3Aroot%40pam%3A6571A1B2%3A%3AAbC%2Bsig%3D%3D";
        let req = permissions_request(&base, ticket, &node_path("pve1"));
        assert_eq!(req.method(), http::Method::GET);
        assert_eq!(
            req.uri().to_string(),
            "/api2/json/access/permissions?path=%2Fnodes%2Fpve1"
        );
        assert_eq!(req.headers()[header::HOST], "127.0.0.1:8006");
        assert_eq!(
            req.headers()[header::COOKIE],
            format!("PVEAuthCookie={ticket}")
        );
        // A read needs no CSRFPreventionToken.
        assert!(!req.headers().contains_key("csrfpreventiontoken"));
    }

    #[test]
    fn recorded_answers_are_read_as_privileges() {
        let path = "/nodes/pve1";
        let root = parse_permissions(StatusCode::OK, ROOT.as_bytes(), path).unwrap();
        assert!(root.has("Sys.Audit") && root.has("Sys.Modify"), "{root:?}");
        // "Sys.Console": 0 is granted, only not propagated.
        assert!(root.has("Sys.Console"));
        let auditor = parse_permissions(StatusCode::OK, AUDITOR.as_bytes(), path).unwrap();
        assert!(auditor.has("Sys.Audit") && !auditor.has("Sys.Modify"));
        // Privileges on another node do not count here.
        let nobody = parse_permissions(StatusCode::OK, NOBODY.as_bytes(), path).unwrap();
        assert!(!nobody.has("Sys.Audit"), "{nobody:?}");
        assert_eq!(
            parse_permissions(StatusCode::UNAUTHORIZED, EXPIRED.as_bytes(), path),
            Err(AuthError::NotLoggedIn)
        );
        assert!(matches!(
            parse_permissions(StatusCode::INTERNAL_SERVER_ERROR, b"", path),
            Err(AuthError::Unavailable(_))
        ));
        assert!(matches!(
            parse_permissions(StatusCode::OK, b"<html>", path),
            Err(AuthError::Unavailable(_))
        ));
    }

    #[test]
    fn the_ticket_comes_from_the_cookie_header_and_names_its_user() {
        let h = "PVELangCookie=en; PVEAuthCookie=PVE%3Aalice%40pve%3A6571A1B2%3A%3Asig; other=1";
        let t = ticket_from_cookies(h).unwrap();
        assert_eq!(t, "PVE%3Aalice%40pve%3A6571A1B2%3A%3Asig");
        assert_eq!(ticket_user(t).as_deref(), Some("alice@pve"));
        assert_eq!(
            ticket_user("PVE:root@pam:6571A1B2::sig").as_deref(),
            Some("root@pam")
        );
        assert_eq!(ticket_from_cookies("PVELangCookie=en"), None);
        assert_eq!(ticket_from_cookies("PVEAuthCookie="), None);
        assert_eq!(ticket_user("PMG:root@pam:1::s"), None);
        assert_eq!(ticket_user("%zz"), None);
    }

    #[test]
    fn the_csrf_token_belongs_to_one_ticket_and_one_key() {
        let key = [7u8; 32];
        let t = csrf_token(&key, "ticket-a");
        assert_eq!(t.len(), 64);
        assert!(csrf_ok(&key, "ticket-a", &t));
        assert!(!csrf_ok(&key, "ticket-b", &t));
        assert!(!csrf_ok(&[8u8; 32], "ticket-a", &t));
        assert!(!csrf_ok(&key, "ticket-a", ""));
        assert!(!csrf_ok(&key, "ticket-a", &t[..63]));
    }
}
