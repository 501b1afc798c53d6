//! `StandInPveApi`: a stand-in for the Proxmox VE API, for tests on machines without
//! PVE. It is **not** PVE: it knows only the tickets it issued
//! ([`StandInPveApi::login`]) and answers the one call the web UI makes,
//! `GET /api2/json/access/permissions?path=PATH`, as PVE does (`{"data": {PATH:
//! {PRIV: 1}}}`, 401 with `{"data":null}` for an unknown ticket). It speaks HTTPS on
//! loopback with a self-signed certificate ([`StandInPveApi::cert_pem`], which the
//! web UI pins as it pins the node's certificate).
//!
//! `GET /standin/login?ticket=T&next=URL` plays PVE's login page for a browser: it
//! sets the `PVEAuthCookie` (percent-encoded, as PVE's UI does) for the host and
//! sends the browser on to `next`. Cookies are per host, not per port, so the browser
//! sends it to the web UI on its own port too — as it does on a real node.
//!
//! For the "Signing" tab's tests it also answers `GET /api2/json/cluster/status` with
//! the nodes set by [`StandInPveApi::set_cluster`] (as PVE does, to a ticket with
//! `Sys.Audit` on `/` only), `GET /api2/json/nodes/NODE/network` (to any valid ticket,
//! as PVE: one bridge with the node's address and a gateway), and serves files the
//! test names ([`StandInPveApi::serve_file`]): the
//! installed `signet-panel.js` under `/pve2/js/`, and a page standing in for PVE's
//! node view.
//!
//! It reads the cookie and makes its certificate on its own, as PVE does, not with
//! the web UI's code under test.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::{header, HeaderMap, StatusCode};
use serde::Deserialize;
use signet_protocol::endpoint::Endpoint;
use signet_protocol::transport::Listener;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// PVE's login cookie.
pub const COOKIE: &str = "PVEAuthCookie";

/// The `PVEAuthCookie` value in a `Cookie` header, as PVE's API reads it.
fn ticket_from_cookies(cookie_header: &str) -> Option<&str> {
    cookie_header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, v)| v.trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// A self-signed certificate for `127.0.0.1` (PEM) and the acceptor serving it.
fn certificate() -> std::io::Result<(String, TlsAcceptor)> {
    let key = rcgen::KeyPair::generate().map_err(std::io::Error::other)?;
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .map_err(std::io::Error::other)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "stand-in PVE API");
    let cert = params.self_signed(&key).map_err(std::io::Error::other)?;
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
        .map_err(std::io::Error::other)?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_no_client_auth()
    .with_single_cert(vec![CertificateDer::from(cert.der().to_vec())], key)
    .map_err(std::io::Error::other)?;
    Ok((cert.pem(), TlsAcceptor::from(Arc::new(config))))
}

/// A request the stand-in received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The `PVEAuthCookie` value sent, as sent.
    pub cookie: Option<String>,
    /// The `path` query parameter.
    pub path: Option<String>,
}

/// A node of the stand-in's cluster, as `GET /cluster/status` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub name: String,
    /// The address PVE resolves the node's name to.
    pub ip: String,
    /// The node that answers (the one the browser is on).
    pub local: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// ticket → (user, ACL path → privileges)
    tickets: BTreeMap<String, (String, BTreeMap<String, BTreeSet<String>>)>,
    calls: Vec<Call>,
    issued: u64,
    cluster: Vec<ClusterNode>,
    /// URL path → file served there.
    files: BTreeMap<String, std::path::PathBuf>,
}

/// The stand-in PVE API, serving until dropped.
#[derive(Debug)]
pub struct StandInPveApi {
    addr: SocketAddr,
    cert_pem: String,
    inner: Arc<Mutex<Inner>>,
    stop: tokio::sync::watch::Sender<bool>,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl StandInPveApi {
    /// Starts it on `127.0.0.1`, on a free port, in the current tokio runtime.
    pub async fn start() -> std::io::Result<StandInPveApi> {
        let (cert_pem, acceptor) = certificate()?;
        let listener = Listener::bind(&Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: 0,
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        let addr = match listener.local_endpoint()? {
            Endpoint::Tcp { host, port } => {
                SocketAddr::new(host.parse().map_err(std::io::Error::other)?, port)
            }
            other => return Err(std::io::Error::other(format!("bound {other}"))),
        };
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route("/api2/json/access/permissions", get(permissions))
            .route("/standin/login", get(browser_login))
            .route("/api2/json/cluster/status", get(cluster_status))
            .route("/api2/json/nodes/{node}/network", get(network))
            .fallback(get(file))
            .with_state(inner.clone());
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(signet_protocol::serve::serve(
            listener,
            app,
            Duration::from_secs(10),
            64,
            Some(acceptor),
            stop_rx,
        ));
        Ok(StandInPveApi {
            addr,
            cert_pem,
            inner,
            stop,
        })
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Its certificate (PEM), for the web UI's `pve_api_cert`.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a ticket for `user` with `privileges` on `path`; answers the ticket as
    /// PVE writes it (`PVE:USER:HEXTIME::SIGNATURE`).
    pub fn login(&self, user: &str, path: &str, privileges: &[&str]) -> String {
        let mut inner = lock(&self.inner);
        inner.issued += 1;
        let ticket = format!(
            "PVE:{user}:{:08X}::standin{}+sig==",
            1_700_000_000 + inner.issued,
            inner.issued
        );
        let privs = BTreeMap::from([(
            path.to_owned(),
            privileges.iter().map(|p| (*p).to_owned()).collect(),
        )]);
        inner
            .tickets
            .insert(ticket.clone(), (user.to_owned(), privs));
        ticket
    }

    /// Gives the user of `ticket` `privileges` on `path` too.
    pub fn grant(&self, ticket: &str, path: &str, privileges: &[&str]) {
        if let Some((_, paths)) = lock(&self.inner).tickets.get_mut(ticket) {
            paths.insert(
                path.to_owned(),
                privileges.iter().map(|p| (*p).to_owned()).collect(),
            );
        }
    }

    /// Makes a ticket invalid, as its expiry would.
    pub fn expire(&self, ticket: &str) {
        lock(&self.inner).tickets.remove(ticket);
    }

    /// The cluster `GET /cluster/status` lists.
    pub fn set_cluster(&self, nodes: &[ClusterNode]) {
        lock(&self.inner).cluster = nodes.to_vec();
    }

    /// Serves the file at `path` under the URL path `at` (e.g. `/pve2/js/signet-panel.js`).
    pub fn serve_file(&self, at: &str, path: &std::path::Path) {
        lock(&self.inner)
            .files
            .insert(at.to_owned(), path.to_owned());
    }

    /// The permission checks received so far.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.inner).calls.clone()
    }
}

impl Drop for StandInPveApi {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// A ticket as the browser stores it: percent-encoded like PVE's UI (`escape()`).
pub fn encode_ticket(ticket: &str) -> String {
    ticket
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn decode(s: &str) -> String {
    serde_urlencoded::from_str::<Vec<(String, String)>>(&format!("t={}", s.replace('+', "%2B")))
        .ok()
        .and_then(|v| v.into_iter().next())
        .map(|(_, v)| v)
        .unwrap_or_default()
}

#[derive(Deserialize)]
struct PathQuery {
    path: Option<String>,
}

async fn permissions(
    State(inner): State<Arc<Mutex<Inner>>>,
    Query(q): Query<PathQuery>,
    headers: HeaderMap,
) -> Response {
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(ticket_from_cookies)
        .map(str::to_owned);
    let mut inner = lock(&inner);
    inner.calls.push(Call {
        cookie: cookie.clone(),
        path: q.path.clone(),
    });
    let Some((_, privs)) = cookie.and_then(|c| inner.tickets.get(&decode(&c)).cloned()) else {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "application/json;charset=UTF-8")],
            r#"{"data":null}"#,
        )
            .into_response();
    };
    let data: BTreeMap<String, BTreeMap<String, u8>> = match &q.path {
        Some(path) => BTreeMap::from([(
            path.clone(),
            privs
                .get(path)
                .map(|p| p.iter().map(|p| (p.clone(), 1)).collect())
                .unwrap_or_default(),
        )]),
        None => privs
            .iter()
            .map(|(path, p)| (path.clone(), p.iter().map(|p| (p.clone(), 1)).collect()))
            .collect(),
    };
    axum::Json(serde_json::json!({ "data": data })).into_response()
}

/// The privileges on each path of the cookie's ticket, `None` for no valid ticket.
fn ticket_paths(inner: &Inner, headers: &HeaderMap) -> Option<BTreeMap<String, BTreeSet<String>>> {
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(ticket_from_cookies)?;
    inner.tickets.get(&decode(cookie)).map(|(_, p)| p.clone())
}

/// `GET /api2/json/cluster/status`, to a ticket with `Sys.Audit` on `/`: the cluster's
/// entry and a `node` entry per node, with PVE's fields.
async fn cluster_status(State(inner): State<Arc<Mutex<Inner>>>, headers: HeaderMap) -> Response {
    let inner = lock(&inner);
    let Some(paths) = ticket_paths(&inner, &headers) else {
        return (StatusCode::UNAUTHORIZED, r#"{"data":null}"#).into_response();
    };
    if !paths.get("/").is_some_and(|p| p.contains("Sys.Audit")) {
        return (StatusCode::FORBIDDEN, r#"{"data":null}"#).into_response();
    }
    let mut data = vec![serde_json::json!({
        "type": "cluster", "id": "cluster", "name": "standin",
        "nodes": inner.cluster.len(), "quorate": 1, "version": 2,
    })];
    for (i, n) in inner.cluster.iter().enumerate() {
        data.push(serde_json::json!({
            "type": "node", "id": format!("node/{}", n.name), "name": n.name,
            "ip": n.ip, "local": u8::from(n.local), "nodeid": i + 1, "online": 1,
            "level": "",
        }));
    }
    axum::Json(serde_json::json!({ "data": data })).into_response()
}

/// `GET /api2/json/nodes/NODE/network`, to any valid ticket: the loopback and a
/// bridge with the node's address and a gateway.
async fn network(
    State(inner): State<Arc<Mutex<Inner>>>,
    axum::extract::Path(node): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let inner = lock(&inner);
    if ticket_paths(&inner, &headers).is_none() {
        return (StatusCode::UNAUTHORIZED, r#"{"data":null}"#).into_response();
    }
    let Some(n) = inner.cluster.iter().find(|n| n.name == node) else {
        return (StatusCode::INTERNAL_SERVER_ERROR, r#"{"data":null}"#).into_response();
    };
    let data = serde_json::json!([
        {"iface": "lo", "type": "loopback", "address": "127.0.0.1", "active": 1},
        {"iface": "vmbr0", "type": "bridge", "address": n.ip, "cidr": format!("{}/8", n.ip),
         "gateway": "127.0.0.254", "active": 1},
    ]);
    axum::Json(serde_json::json!({ "data": data })).into_response()
}

/// A file the test asked to serve.
async fn file(State(inner): State<Arc<Mutex<Inner>>>, uri: http::Uri) -> Response {
    let path = lock(&inner).files.get(uri.path()).cloned();
    let Some(body) = path.and_then(|p| std::fs::read(p).ok()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let kind = match uri.path().rsplit('.').next() {
        Some("js") => "text/javascript",
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css",
        _ => "application/octet-stream",
    };
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

#[derive(Deserialize)]
struct LoginQuery {
    ticket: String,
    next: String,
}

async fn browser_login(Query(q): Query<LoginQuery>) -> Response {
    let cookie = format!(
        "{COOKIE}={}; Path=/; Secure; SameSite=Lax",
        encode_ticket(&q.ticket)
    );
    (
        StatusCode::FOUND,
        [(header::SET_COOKIE, cookie), (header::LOCATION, q.next)],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_survive_the_browsers_encoding() {
        let t = "PVE:root@pam:6571A1B2::standin1+sig==";
        let e = encode_ticket(t);
        assert!(
            !e.contains(':') && !e.contains('+') && !e.contains('='),
            "{e}"
        );
        assert_eq!(decode(&e), t);
        assert_eq!(decode(t), t);
    }
}
