//! The web UI: what the appliance is doing, for people, in the browser they already
//! use for Proxmox VE.
//!
//! `signetd` serves it on its own listener (`[web]` in `signetd.toml`; off when the
//! section is absent, port [`DEFAULT_PORT`] when it names none), always over TLS
//! ([`certs`]: the node's PVE certificate when there is one, so the panel inside the PVE
//! UI loads without a warning). Pages are rendered on the server (askama templates in
//! `templates/web/`); a small script adds live updates (server-sent events) and
//! confirmations, and every page works without it.
//!
//! - [`auth`] — the `PveAuth` port (who is looking, through PVE's login), its HTTPS
//!   adapter, CSRF tokens.
//! - [`certs`] — the served certificate; the pinned trust of the local PVE API.
//! - [`model`] — pure: the verdict in plain words (from the agent's health and where the
//!   host sees the token), the overview's content.
//! - [`chart`] — pure: the recovery page's 24-hour chart as SVG.
//! - [`query`] — read-only queries on `signet.db` (recent jobs, audit pages, the
//!   timeline, signing latencies).
//! - [`pages`] — the handlers: overview, queue and jobs, cancel, token actions, enroll,
//!   recovery timeline, audit (its chain walked on from the last walk), export, events.
//! - [`live`] — the overview's state, re-read while someone watches, sent on change.
//!
//! Handlers are thin: reading goes through [`Daemon::status`] and the database, actions
//! through the audited commands of [`crate::operate`], the same as the other fronts.

pub mod auth;
pub mod certs;
pub mod chart;
pub mod live;
pub mod model;
pub mod pages;
pub mod query;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use signet_protocol::endpoint::Endpoint;
use signet_protocol::transport::Listener;
use tokio_rustls::TlsAcceptor;

use crate::daemon::Daemon;

/// The web UI's port when `[web] listen` is not given.
pub const DEFAULT_PORT: u16 = 7720;
/// The local PVE API.
pub const DEFAULT_PVE_API: &str = "https://127.0.0.1:8006";
/// The node's directory in the PVE cluster file system.
pub const DEFAULT_PVE_LOCAL_DIR: &str = "/etc/pve/local";
/// How often the overview is read again while a browser watches it.
pub const DEFAULT_REFRESH_SECONDS: u64 = 3;

/// `[web]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// TCP endpoints, served with TLS; default `tcp:0.0.0.0:7720`.
    #[serde(default = "default_listen")]
    pub listen: Vec<Endpoint>,
    /// A certificate chain (PEM) to serve instead of the node's PVE certificate.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// The PVE API that checks logins; default `https://127.0.0.1:8006`.
    #[serde(default = "default_pve_api")]
    pub pve_api: String,
    /// The certificate(s) the PVE API must present (PEM); default the node's
    /// `pveproxy-ssl.pem`, else `pve-ssl.pem`, in `pve_local_dir`.
    pub pve_api_cert: Option<PathBuf>,
    /// The PVE node name privileges are checked on (`/nodes/NODE`); default the host
    /// name, as PVE names the node.
    pub node: Option<String>,
    /// The node's directory with its PVE certificates; default `/etc/pve/local`.
    #[serde(default = "default_pve_local_dir")]
    pub pve_local_dir: PathBuf,
    /// How often the overview is read again while someone watches it.
    #[serde(default = "default_refresh")]
    pub refresh_seconds: u64,
    /// Origins that may show the pages in a frame (CSP `frame-ancestors`): PVE's UI
    /// on port 8006 by default; add the address of a reverse proxy in front of PVE.
    #[serde(default = "default_frame_ancestors")]
    pub frame_ancestors: Vec<String>,
}

fn default_listen() -> Vec<Endpoint> {
    vec![Endpoint::Tcp {
        host: "0.0.0.0".into(),
        port: DEFAULT_PORT,
    }]
}
fn default_pve_api() -> String {
    DEFAULT_PVE_API.into()
}
fn default_pve_local_dir() -> PathBuf {
    DEFAULT_PVE_LOCAL_DIR.into()
}
fn default_refresh() -> u64 {
    DEFAULT_REFRESH_SECONDS
}
fn default_frame_ancestors() -> Vec<String> {
    vec![DEFAULT_FRAME_ANCESTOR.into()]
}

/// Who may frame the pages when `frame_ancestors` is not given: PVE's UI on any host.
pub const DEFAULT_FRAME_ANCESTOR: &str = "https://*:8006";

impl WebConfig {
    /// Checks the section; the error names the key and the fix.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.listen.is_empty()
            || self
                .listen
                .iter()
                .any(|e| !matches!(e, Endpoint::Tcp { .. }))
        {
            return Err((
                "listen",
                format!("list TCP endpoints to serve the web UI on (with TLS), e.g. listen = [\"tcp:0.0.0.0:{DEFAULT_PORT}\"]"),
            ));
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err((
                "cert",
                "give both cert and key, or neither (then the node's PVE certificate is served)"
                    .into(),
            ));
        }
        let uri: http::Uri = self.pve_api.parse().map_err(|_| {
            (
                "pve_api",
                format!(
                    "{:?} is not a URL; write e.g. {DEFAULT_PVE_API}",
                    self.pve_api
                ),
            )
        })?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err((
                "pve_api",
                format!("the PVE API is spoken to over HTTPS: write e.g. {DEFAULT_PVE_API}"),
            ));
        }
        if let Some(node) = &self.node {
            if node.is_empty() || !node.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err((
                    "node",
                    format!("{node:?} is not a PVE node name (letters, digits and '-')"),
                ));
            }
        }
        if let Some(bad) = self.frame_ancestors.iter().find(|a| {
            a.is_empty() || a.contains(|c: char| c.is_whitespace() || ";,'\"".contains(c))
        }) {
            return Err((
                "frame_ancestors",
                format!("{bad:?} is not a CSP source; write origins such as \"https://pve.example.com\" or \"{DEFAULT_FRAME_ANCESTOR}\""),
            ));
        }
        if self.refresh_seconds == 0 {
            return Err(("refresh_seconds", "give at least 1".into()));
        }
        Ok(())
    }

    /// The node name: configured, or the host's short name.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .and_then(|h| h.trim().split('.').next().map(str::to_owned))
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into())
        })
    }
}

/// The web UI's state, shared by its handlers.
#[derive(Debug)]
pub struct Web {
    pub daemon: Arc<Daemon>,
    pub auth: Arc<dyn auth::PveAuth>,
    /// The PVE node whose privileges are checked.
    pub node: String,
    csrf_key: [u8; 32],
    pub live: live::Live,
    /// The audit page's last walk of the hash chain.
    pub chain: std::sync::Mutex<Option<pages::ChainCache>>,
    /// The pages' `Content-Security-Policy`.
    csp: http::HeaderValue,
    /// Turns true when signetd stops: event streams end, so the server's graceful
    /// shutdown does not wait for them.
    closing: tokio::sync::watch::Sender<bool>,
}

impl Web {
    /// The UI over `daemon`, checking logins through `auth` against `node`, framed
    /// only by PVE's UI ([`DEFAULT_FRAME_ANCESTOR`]).
    pub fn new(daemon: Arc<Daemon>, auth: Arc<dyn auth::PveAuth>, node: String) -> Arc<Web> {
        Web::framed_by(daemon, auth, node, &[DEFAULT_FRAME_ANCESTOR.to_owned()])
    }

    /// [`Web::new`] with the origins that may frame the pages.
    pub fn framed_by(
        daemon: Arc<Daemon>,
        auth: Arc<dyn auth::PveAuth>,
        node: String,
        frame_ancestors: &[String],
    ) -> Arc<Web> {
        let csp = format!(
            "default-src 'self'; frame-ancestors 'self' {}; form-action 'self'",
            frame_ancestors.join(" ")
        );
        let csp = http::HeaderValue::from_str(&csp).unwrap_or_else(|_| {
            http::HeaderValue::from_static("default-src 'self'; frame-ancestors 'self'")
        });
        let mut csrf_key = [0u8; 32];
        if getrandom::fill(&mut csrf_key).is_err() {
            // Without randomness no form would be safe; refuse them all instead.
            tracing::error!("no randomness for the web UI's CSRF key; its forms are refused");
        }
        Arc::new(Web {
            daemon,
            auth,
            node,
            csrf_key,
            live: live::Live::default(),
            chain: std::sync::Mutex::new(None),
            csp,
            closing: tokio::sync::watch::channel(false).0,
        })
    }

    /// Ends the event streams: signetd is stopping.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    pub(crate) fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    pub(crate) fn csp(&self) -> &http::HeaderValue {
        &self.csp
    }

    pub(crate) fn csrf_key(&self) -> Option<&[u8; 32]> {
        (self.csrf_key != [0u8; 32]).then_some(&self.csrf_key)
    }
}

/// Why the web UI cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error(transparent)]
    Cert(#[from] certs::CertError),
    #[error("cannot listen on {endpoint} for the web UI: {message}; change [web] listen")]
    Listen { endpoint: String, message: String },
}

/// The web UI, bound and ready to serve.
#[allow(missing_debug_implementations)] // TlsAcceptor has no Debug
pub struct Started {
    pub listeners: Vec<(Listener, Endpoint)>,
    pub acceptor: TlsAcceptor,
    pub app: axum::Router,
    pub web: Arc<Web>,
}

/// Binds the web UI's listeners with its certificate and starts the overview's watcher
/// on `tasks`.
pub async fn start(
    daemon: Arc<Daemon>,
    cfg: &WebConfig,
    tasks: &mut crate::supervise::Supervisor,
) -> Result<Started, WebError> {
    let node = cfg.node_name();
    let exists = |p: &Path| p.exists();
    let source = certs::choose(
        cfg.cert.as_deref().zip(cfg.key.as_deref()),
        &cfg.pve_local_dir,
        exists,
        vec![node.clone(), "localhost".into(), "127.0.0.1".into()],
    );
    match &source {
        certs::CertSource::Files { cert, .. } => {
            tracing::info!(cert = %cert.display(), "the web UI serves this certificate");
        }
        certs::CertSource::SelfSigned { .. } => {
            tracing::info!("no PVE certificate on this host; the web UI serves a self-signed one");
        }
    }
    let acceptor = certs::acceptor(&source)?;
    let mut listeners = Vec::new();
    for ep in &cfg.listen {
        let l = Listener::bind(ep).await.map_err(|e| WebError::Listen {
            endpoint: ep.to_string(),
            message: e.to_string(),
        })?;
        let local = l.local_endpoint().map_err(|e| WebError::Listen {
            endpoint: ep.to_string(),
            message: e.to_string(),
        })?;
        listeners.push((l, local));
    }
    let api = auth::PveApi {
        base: cfg.pve_api.parse().map_err(|_| WebError::Listen {
            endpoint: cfg.pve_api.clone(),
            message: "not a URL".into(),
        })?,
        pin_file: cfg
            .pve_api_cert
            .clone()
            .unwrap_or_else(|| certs::pve_api_pin(&cfg.pve_local_dir, exists)),
        timeout: Duration::from_secs(5),
    };
    let auth = auth::Cached::new(api, auth::DEFAULT_CACHE_TTL);
    let web = Web::framed_by(daemon, Arc::new(auth), node, &cfg.frame_ancestors);
    tasks.spawn(
        "web UI overview watcher",
        live::run(web.clone(), Duration::from_secs(cfg.refresh_seconds)),
    );
    Ok(Started {
        listeners,
        acceptor,
        app: pages::router(web.clone()),
        web,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WebConfig, String> {
        let cfg: WebConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.check().map_err(|(k, m)| format!("{k}: {m}"))?;
        Ok(cfg)
    }

    #[test]
    fn the_section_has_sane_defaults_and_names_bad_keys() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg.listen, default_listen());
        assert_eq!(cfg.pve_api, "https://127.0.0.1:8006");
        assert_eq!(cfg.pve_local_dir, Path::new("/etc/pve/local"));
        assert!(parse("node = \"pve-1\"").is_ok());
        assert_eq!(cfg.frame_ancestors, ["https://*:8006"]);
        assert!(parse("frame_ancestors = [\"https://pve.example.com\"]").is_ok());
        for (text, key) in [
            ("listen = [\"unix:/run/x.sock\"]", "listen"),
            ("listen = []", "listen"),
            ("cert = \"/a.pem\"", "cert"),
            ("pve_api = \"http://127.0.0.1:8006\"", "pve_api"),
            ("pve_api = \"not a url\"", "pve_api"),
            ("node = \"a/b\"", "node"),
            ("refresh_seconds = 0", "refresh_seconds"),
            (
                "frame_ancestors = [\"https://a; script-src *\"]",
                "frame_ancestors",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.starts_with(key), "{text}: {e}");
        }
        assert!(parse("colour = \"blue\"").is_err());
    }

    #[test]
    fn signetd_toml_names_the_web_key_that_is_wrong() {
        let path = Path::new("/etc/signet/signetd.toml");
        let base = "agent = \"unix:/run/a.sock\"\ndbus = \"none\"\n";
        let cfg = crate::config::Config::parse(path, base).unwrap();
        assert!(cfg.web.is_none(), "off without [web]");
        let cfg = crate::config::Config::parse(path, &format!("{base}[web]\n")).unwrap();
        assert_eq!(cfg.web.unwrap().listen, default_listen());
        let e = crate::config::Config::parse(
            path,
            &format!("{base}[web]\nlisten = [\"vsock:any:7720\"]\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("key web.listen"), "{e}");
    }
}
