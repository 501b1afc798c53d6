//! The connection loop: accepts on a [`Listener`], serves each connection with HTTP/1.1
//! and the router, and closes connections that do not send their request headers in
//! time (no slow-loris). At most `max_connections` connections are served at once per
//! listener (`[limits] max_connections`); the next is accepted when one closes, and
//! until then waits in the kernel's backlog. Each request carries its connection's
//! [`Peer`] as `ConnectInfo`, as `axum::serve` would
//! set it, [`OverTls`] when it came over TLS and [`PeerKey`] when the TLS client
//! presented a key.
//!
//! A connection closes the lingering way ([`Linger`]): an answer given before the
//! request's body was read (a refusal from the headers, a limit passed part-way)
//! reaches the client, which is still sending, instead of a reset that would drop it.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use crate::link::Fingerprint;
use crate::transport::{Listener, Peer};
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tower::Service;

/// Marks a request that came over TLS (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct OverTls;

/// The key the TLS client presented, by fingerprint (a request extension, set when it
/// presented one: the host's key on the agent's link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerKey(pub Fingerprint);

/// Serves `app` on `listener` (with TLS when `tls` is given) until `stop` turns true,
/// then lets requests in flight finish. At most `max_connections` at once.
pub async fn serve(
    mut listener: Listener,
    app: Router,
    header_timeout: Duration,
    max_connections: usize,
    tls: Option<TlsAcceptor>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let (io, peer) = tokio::select! {
            pair = axum::serve::Listener::accept(&mut listener) => pair,
            _ = stop.wait_for(|s| *s) => break,
        };
        let app = app.clone();
        let watcher = graceful.watcher();
        match &tls {
            None => {
                tokio::spawn(async move {
                    connection(io, peer, app, header_timeout, None, watcher).await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    // The handshake is bounded like the headers that follow it.
                    let io = tokio::io::BufReader::with_capacity(crate::TLS_READ_AHEAD, io);
                    match tokio::time::timeout(header_timeout, acceptor.accept(io)).await {
                        Ok(Ok(io)) => {
                            let key = io
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| PeerKey(Fingerprint::of(c)));
                            connection(io, peer, app, header_timeout, Some(key), watcher).await;
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
    tls: Option<Option<PeerKey>>,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn_peer = peer.clone();
    let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(conn_peer.clone()));
        if let Some(key) = tls {
            req.extensions_mut().insert(OverTls);
            if let Some(key) = key {
                req.extensions_mut().insert(key);
            }
        }
        let mut app = app.clone();
        async move { app.call(req.map(axum::body::Body::new)).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(Linger::new(io)), svc);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// How long a closing connection waits for more of what the client still sends.
const LINGER_IDLE: Duration = Duration::from_secs(2);
/// The most a closing connection reads and drops.
const LINGER_MAX: u64 = 1 << 30;
/// The longest a closing connection lingers, however the client trickles.
const LINGER_MAX_TIME: Duration = Duration::from_secs(30);

/// A connection's stream whose shutdown lingers: it closes its sending side (the
/// answer is complete), then reads and drops what the client still sends — until
/// the client closes, is silent for [`LINGER_IDLE`], has sent [`LINGER_MAX`] or
/// [`LINGER_MAX_TIME`] has passed — before it is dropped. Closing a socket with unread data makes the kernel send a
/// reset, which can destroy the answer before the client reads it.
pub struct Linger<I> {
    io: I,
    state: LingerState,
}

enum LingerState {
    Open,
    Draining {
        seen: u64,
        idle: Pin<Box<tokio::time::Sleep>>,
        until: tokio::time::Instant,
    },
    Closed,
}

impl<I> std::fmt::Debug for Linger<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linger").finish_non_exhaustive()
    }
}

impl<I> Linger<I> {
    pub fn new(io: I) -> Self {
        Linger {
            io,
            state: LingerState::Open,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Linger<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Linger<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    // Vectored writes pass through: hyper then sends a body's blocks as they are,
    // instead of copying each into its own buffer first.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                LingerState::Open => {
                    if let Err(e) = ready!(Pin::new(&mut this.io).poll_shutdown(cx)) {
                        this.state = LingerState::Closed;
                        return Poll::Ready(Err(e));
                    }
                    this.state = LingerState::Draining {
                        seen: 0,
                        idle: Box::pin(tokio::time::sleep(LINGER_IDLE)),
                        until: tokio::time::Instant::now() + LINGER_MAX_TIME,
                    };
                }
                LingerState::Draining { seen, idle, until } => {
                    let mut scratch = [0u8; 16 << 10];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                            *seen += buf.filled().len() as u64;
                            if *seen > LINGER_MAX {
                                this.state = LingerState::Closed;
                            } else {
                                let next = (tokio::time::Instant::now() + LINGER_IDLE).min(*until);
                                idle.as_mut().reset(next);
                            }
                        }
                        // The client closed, or the connection broke: done.
                        Poll::Ready(_) => this.state = LingerState::Closed,
                        Poll::Pending => {
                            ready!(idle.as_mut().poll(cx));
                            this.state = LingerState::Closed;
                        }
                    }
                }
                LingerState::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}
