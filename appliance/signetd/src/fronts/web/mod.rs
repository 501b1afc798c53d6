//! The web UI: what the appliance is doing, for people, in the browser they already
//! use for Proxmox VE.
//!
//! `signetd` serves it on its own listener (`[web]` in `signetd.toml`; off when the
//! section is absent, port [`DEFAULT_PORT`](crate::config::DEFAULT_PORT) when it names none), always over TLS
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
//! - [`pages`] — the handlers: overview, queue and jobs, cancel, token actions, enroll,
//!   recovery timeline, audit (its chain walked on from the last walk), export, events.
//! - [`live`] — the overview's state, re-read while someone watches, sent on change;
//!   the queue's and the audit log's live parts, re-read while watched ([`live::polled`]).
//!
//! Handlers are thin: reading goes through [`Daemon::status`] and the read model of
//! [`crate::services::reads`] (the same methods as D-Bus and the operator's routes, on a
//! read-only connection), actions through the audited commands of
//! [`crate::services::operate`], the same as the other fronts.

pub mod auth;
pub mod certs;
pub mod chart;
pub mod live;
pub mod model;
pub mod pages;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use signet_protocol::endpoint::Endpoint;
use signet_protocol::transport::Listener;
use tokio_rustls::TlsAcceptor;

use crate::config::{WebConfig, DEFAULT_FRAME_ANCESTOR};
use crate::services::daemon::Daemon;

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
    /// How often a watched page's live part is read again (`refresh_seconds`).
    pub refresh: Duration,
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
        Web::with(
            daemon,
            auth,
            node,
            frame_ancestors,
            Duration::from_secs(crate::config::DEFAULT_REFRESH_SECONDS),
        )
    }

    /// [`Web::framed_by`], the live parts read again every `refresh`.
    pub fn with(
        daemon: Arc<Daemon>,
        auth: Arc<dyn auth::PveAuth>,
        node: String,
        frame_ancestors: &[String],
        refresh: Duration,
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
            refresh,
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
    tasks: &mut crate::services::supervise::Supervisor,
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
    let refresh = Duration::from_secs(cfg.refresh_seconds);
    let web = Web::with(daemon, Arc::new(auth), node, &cfg.frame_ancestors, refresh);
    tasks.spawn("web UI overview watcher", live::run(web.clone(), refresh));
    Ok(Started {
        listeners,
        acceptor,
        app: pages::router(web.clone()),
        web,
    })
}
