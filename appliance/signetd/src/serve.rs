//! The connection loop: accepts on a [`Listener`], serves each connection with HTTP/1.1
//! and the router, and closes connections that do not send their request headers in
//! time (no slow-loris). Each request carries its connection's [`Peer`](signet_protocol::transport::Peer) as
//! `ConnectInfo`, as `axum::serve` would set it.

use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use signet_protocol::transport::Listener;
use tower::Service;

/// Serves `app` on `listener` until `stop` turns true, then lets requests in flight
/// finish.
pub async fn serve(
    mut listener: Listener,
    app: Router,
    header_timeout: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (io, peer) = tokio::select! {
            pair = axum::serve::Listener::accept(&mut listener) => pair,
            _ = stop.wait_for(|s| *s) => break,
        };
        let app = app.clone();
        let conn_peer = peer.clone();
        let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(conn_peer.clone()));
            let mut app = app.clone();
            async move { app.call(req.map(axum::body::Body::new)).await }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(io), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
}
