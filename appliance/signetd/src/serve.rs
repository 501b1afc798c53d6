//! The connection loop: accepts on a [`Listener`], serves each connection with HTTP/1.1
//! and the router, and closes connections that do not send their request headers in
//! time (no slow-loris). Each request carries its connection's
//! [`Peer`](signet_protocol::transport::Peer) as `ConnectInfo`, as `axum::serve` would
//! set it, and [`OverTls`] when it came over TLS.

use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use signet_protocol::transport::{Listener, Peer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tower::Service;

/// Marks a request that came over TLS (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

/// Serves `app` on `listener` (with TLS when `tls` is given) until `stop` turns true,
/// then lets requests in flight finish.
pub async fn serve(
    mut listener: Listener,
    app: Router,
    header_timeout: Duration,
    tls: Option<TlsAcceptor>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let (io, peer) = tokio::select! {
            pair = axum::serve::Listener::accept(&mut listener) => pair,
            _ = stop.wait_for(|s| *s) => break,
        };
        let app = app.clone();
        let watcher = graceful.watcher();
        match &tls {
            None => {
                tokio::spawn(connection(io, peer, app, header_timeout, false, watcher));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // The handshake is bounded like the headers that follow it.
                    match tokio::time::timeout(header_timeout, acceptor.accept(io)).await {
                        Ok(Ok(io)) => {
                            connection(io, peer, app, header_timeout, true, watcher).await;
                        }
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
    graceful.shutdown().await;
}

async fn connection<I>(
    io: I,
    peer: Peer,
    app: Router,
    header_timeout: Duration,
    over_tls: bool,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn_peer = peer.clone();
    let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(conn_peer.clone()));
        if over_tls {
            req.extensions_mut().insert(OverTls);
        }
        let mut app = app.clone();
        async move { app.call(req.map(axum::body::Body::new)).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), svc);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
