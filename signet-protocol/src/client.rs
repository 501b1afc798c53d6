//! HTTP/1.1 requests over any [`Endpoint`], with streamed bodies.
//!
//! One connection per request, but to the agent through the paired link: there a
//! connection is kept open after its answer and used again for the next request
//! ([`crate::link::HostLink::take_idle`]), so a job does not pay a TLS handshake (and
//! the agent's health reads between jobs neither). A kept connection is still the
//! pinned agent's: it was made with the key pinned now, and the agent checks the
//! host's key on every request.

use std::error::Error as StdError;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;

use crate::endpoint::Endpoint;
use crate::transport::{self, TransportError};
use signet_api::wire::{ErrorBody, ErrorCode};

/// The most of an error or JSON answer that is read into memory.
const MAX_SMALL_BODY: usize = 1 << 20;

/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Connect(#[from] TransportError),
    #[error("connection to {endpoint} failed during the request: {source}")]
    Http {
        endpoint: Endpoint,
        #[source]
        source: hyper::Error,
    },
    #[error("{endpoint} sent an answer that is not Signet's: {detail}")]
    Protocol { endpoint: Endpoint, detail: String },
}

/// Sends `req` to `endpoint` and returns the answer with its body still streaming.
/// An endpoint with a registered [`crate::link`] (the agent, from `signetd`) is reached
/// through it.
pub async fn send<B>(
    endpoint: &Endpoint,
    req: Request<B>,
) -> Result<Response<Incoming>, ClientError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    match crate::link::registered(endpoint) {
        Some(link) => send_linked(&link, endpoint, req).await.map_err(|e| {
                if crate::link::refused_by_peer(&e) {
                    ClientError::Connect(TransportError::Connect {
                        endpoint: endpoint.clone(),
                        source: crate::link::refused_error(endpoint),
                    })
                } else if crate::link::closed_by_peer(&e) {
                    ClientError::Connect(TransportError::Connect {
                        endpoint: endpoint.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            format!("the agent at {endpoint} closed the link during the request ({e}); if it keeps doing so, it does not accept this host's key: {}", crate::link::PAIR_FIX),
                        ),
                    })
                } else {
                    e
                }
            }),
        None => send_over(transport::connect(endpoint).await?, endpoint, req).await,
    }
}

/// Sends `req` to the agent at `endpoint` through `link`: on a kept connection when
/// one is ready (a request it could not take — the agent closed it meanwhile — goes
/// on the next, or a new one), else on a new connection, which is kept afterwards.
async fn send_linked<B>(
    link: &crate::link::HostLink,
    endpoint: &Endpoint,
    req: Request<B>,
) -> Result<Response<Incoming>, ClientError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    use bytes::Buf;
    let mut req = req.map(|b| {
        b.map_frame(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining())))
            .map_err(Into::into)
            .boxed_unsync()
    });
    set_host(&mut req, endpoint);
    let http_err = |source| ClientError::Http {
        endpoint: endpoint.clone(),
        source,
    };
    while let Some(mut conn) = link.take_idle() {
        match conn.sender.try_send_request(req).await {
            Ok(resp) => {
                link.keep(conn);
                return Ok(resp);
            }
            Err(mut e) => match e.take_message() {
                Some(r) => req = r,
                None => return Err(http_err(e.into_error())),
            },
        }
    }
    let stream = tokio::io::BufReader::with_capacity(
        crate::TLS_READ_AHEAD,
        transport::connect(endpoint).await?,
    );
    let (tls, pinned) = link
        .handshake_pinned(endpoint, stream)
        .await
        .map_err(|source| {
            ClientError::Connect(TransportError::Connect {
                endpoint: endpoint.clone(),
                source,
            })
        })?;
    let (mut sender, conn_err_rx) = open(tls, endpoint).await?;
    match sender.send_request(req).await {
        Ok(resp) => {
            link.keep(crate::link::Idle {
                sender,
                pinned,
                since: std::time::Instant::now(),
            });
            Ok(resp)
        }
        Err(e) => Err(http_err(connection_error(conn_err_rx, e).await)),
    }
}

/// An HTTP/1.1 connection over `io`, driven by a task of its own; the receiver gets
/// the connection's error if it ends with one.
async fn open<S, B>(
    io: S,
    endpoint: &Endpoint,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<B>,
        tokio::sync::oneshot::Receiver<hyper::Error>,
    ),
    ClientError,
>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|source| ClientError::Http {
            endpoint: endpoint.clone(),
            source,
        })?;
    let span = tracing::debug_span!("http-client", %endpoint);
    // The connection's own error says more than the request's "canceled" when the
    // peer ends the connection (a TLS alert refusing our key, say).
    let (conn_err_tx, conn_err_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            let _g = span.enter();
            tracing::debug!(error = %e, "connection ended with an error");
            let _ = conn_err_tx.send(e);
        }
    });
    Ok((sender, conn_err_rx))
}

/// The connection's error if it ends with one soon, else the request's `e`.
async fn connection_error(
    conn_err_rx: tokio::sync::oneshot::Receiver<hyper::Error>,
    e: hyper::Error,
) -> hyper::Error {
    tokio::time::timeout(std::time::Duration::from_secs(1), conn_err_rx)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(e)
}

/// Names the host in `req` when it does not.
fn set_host<B>(req: &mut Request<B>, endpoint: &Endpoint) {
    if !req.headers().contains_key(header::HOST) {
        let host = match endpoint {
            Endpoint::Tcp { host, port } | Endpoint::Tls { host, port } => {
                format!("{host}:{port}")
            }
            _ => "signet".to_owned(),
        };
        req.headers_mut().insert(
            header::HOST,
            header::HeaderValue::from_str(&host)
                .unwrap_or(header::HeaderValue::from_static("signet")),
        );
    }
}

/// A request body of any kind, boxed, so one connection carries requests whose
/// bodies differ (an upload, then an empty `GET`).
pub type AnyBody =
    http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn StdError + Send + Sync>>;

/// One HTTP/1.1 connection to an endpoint, used for several requests in turn
/// (keep-alive): a client that uploads a job and then collects its result asks both on
/// one connection instead of connecting twice. A request the connection cannot take
/// any more (the server closed it after its answer, or the answer before was not read
/// to its end) goes on a new connection, which is kept in its place.
#[derive(Debug)]
pub struct Connection {
    endpoint: Endpoint,
    sender: Option<hyper::client::conn::http1::SendRequest<AnyBody>>,
}

impl Connection {
    /// A connection to `endpoint`, made at its first request.
    pub fn new(endpoint: &Endpoint) -> Self {
        Connection {
            endpoint: endpoint.clone(),
            sender: None,
        }
    }

    /// Sends `req` on the kept connection when it can take it, else on a new one
    /// (kept afterwards). An endpoint reached through a paired link goes through it
    /// ([`send`]), which keeps its own connections.
    pub async fn send<B>(&mut self, req: Request<B>) -> Result<Response<Incoming>, ClientError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        use bytes::Buf;
        if crate::link::registered(&self.endpoint).is_some() {
            return send(&self.endpoint, req).await;
        }
        let mut req: Request<AnyBody> = req.map(|b| {
            b.map_frame(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining())))
                .map_err(Into::into)
                .boxed_unsync()
        });
        set_host(&mut req, &self.endpoint);
        authorize(&mut req, &self.endpoint);
        let endpoint = self.endpoint.clone();
        let http_err = |source| ClientError::Http {
            endpoint: endpoint.clone(),
            source,
        };
        if let Some(mut sender) = self.sender.take() {
            // Ready once the answer before was read to its end; an error: closed.
            if sender.ready().await.is_ok() {
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        self.sender = Some(sender);
                        return Ok(resp);
                    }
                    // Not sent at all (the server closed the connection meanwhile):
                    // it goes on a new one.
                    Err(mut e) => match e.take_message() {
                        Some(r) => req = r,
                        None => return Err(http_err(e.into_error())),
                    },
                }
            }
        }
        let io = transport::connect(&self.endpoint).await?;
        let (mut sender, conn_err_rx) = open(io, &self.endpoint).await?;
        match sender.send_request(req).await {
            Ok(resp) => {
                self.sender = Some(sender);
                Ok(resp)
            }
            Err(e) => Err(http_err(connection_error(conn_err_rx, e).await)),
        }
    }

    /// Forgets the kept connection: the next request connects anew.
    pub fn close(&mut self) {
        self.sender = None;
    }
}

/// Adds the TLS endpoint's basic authorization to `req` when it has none.
fn authorize<B>(req: &mut Request<B>, endpoint: &Endpoint) {
    if matches!(endpoint, Endpoint::Tls { .. })
        && !req.headers().contains_key(header::AUTHORIZATION)
    {
        if let Some(v) =
            crate::tls::basic_authorization().and_then(|v| header::HeaderValue::from_str(&v).ok())
        {
            req.headers_mut().insert(header::AUTHORIZATION, v);
        }
    }
}

/// Reads a small answer (an error or JSON body, at most 1 MiB) to its end; a
/// connection is ready for its next request only then.
pub async fn read_answer(
    endpoint: &Endpoint,
    resp: Response<Incoming>,
) -> Result<Bytes, ClientError> {
    read_small(endpoint, resp.into_body()).await
}

/// Sends `req` over `io`, a stream already connected to `endpoint`.
pub async fn send_over<S, B>(
    io: S,
    endpoint: &Endpoint,
    mut req: Request<B>,
) -> Result<Response<Incoming>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let http_err = |source| ClientError::Http {
        endpoint: endpoint.clone(),
        source,
    };
    let (mut sender, conn_err_rx) = open(io, endpoint).await?;
    set_host(&mut req, endpoint);
    authorize(&mut req, endpoint);
    match sender.send_request(req).await {
        Ok(resp) => Ok(resp),
        Err(e) => Err(http_err(connection_error(conn_err_rx, e).await)),
    }
}

/// `GET path` and decode a JSON answer; an error answer becomes `Err(Ok(ErrorBody))`.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    endpoint: &Endpoint,
    path_and_query: &str,
) -> Result<Result<T, ErrorBody>, ClientError> {
    let req = Request::get(path_and_query)
        .body(Empty::<Bytes>::new())
        .map_err(|e| ClientError::Protocol {
            endpoint: endpoint.clone(),
            detail: e.to_string(),
        })?;
    let resp = send(endpoint, req).await?;
    if !resp.status().is_success() {
        return Ok(Err(error_body(endpoint, resp).await));
    }
    let bytes = read_small(endpoint, resp.into_body()).await?;
    serde_json::from_slice(&bytes)
        .map(Ok)
        .map_err(|e| ClientError::Protocol {
            endpoint: endpoint.clone(),
            detail: format!("undecodable JSON: {e}"),
        })
}

/// Reads an error answer into an [`ErrorBody`]; an answer that is not Signet's JSON
/// still becomes one, classified by its HTTP status.
pub async fn error_body(endpoint: &Endpoint, resp: Response<Incoming>) -> ErrorBody {
    let status = resp.status();
    match read_small(endpoint, resp.into_body()).await {
        Ok(bytes) => match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => body,
            Err(_) => ErrorBody::new(
                code_for_status(status),
                format!(
                    "{endpoint} answered {status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).trim()
                ),
            ),
        },
        Err(e) => ErrorBody::new(
            code_for_status(status),
            format!("{endpoint} answered {status}; {e}"),
        ),
    }
}

fn code_for_status(status: StatusCode) -> ErrorCode {
    match status.as_u16() {
        403 => ErrorCode::Forbidden,
        404 => ErrorCode::UnknownProfile,
        413 => ErrorCode::InputTooLarge,
        429 => ErrorCode::TooManyJobs,
        415 => ErrorCode::UnsupportedFormat,
        400..=499 => ErrorCode::BadRequest,
        502..=504 => ErrorCode::AgentUnavailable,
        _ => ErrorCode::Internal,
    }
}

async fn read_small(endpoint: &Endpoint, body: Incoming) -> Result<Bytes, ClientError> {
    Limited::new(body, MAX_SMALL_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ClientError::Protocol {
            endpoint: endpoint.clone(),
            detail: format!("reading the answer failed: {e}"),
        })
}

/// A JSON answer, ready to send.
pub fn json_request<T: serde::Serialize>(
    method: http::Method,
    uri: &str,
    value: &T,
) -> Request<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut req = Request::new(Full::new(Bytes::from(body)));
    *req.method_mut() = method;
    *req.uri_mut() = uri.parse().unwrap_or_default();
    req.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    req
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Listener;
    use axum::{routing::get, Json, Router};

    /// A paired agent's stand-in on a unix socket: its key in `dir/agent`, the host's
    /// in `dir/host`, pinned both ways; it counts the connections it accepts (each a
    /// TLS handshake) and answers every request with "ok" (closing the connection
    /// after each answer without `keep_alive`).
    #[cfg(unix)]
    async fn paired_agent(
        dir: &std::path::Path,
        keep_alive: bool,
    ) -> (
        Endpoint,
        std::sync::Arc<crate::link::HostLink>,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use crate::link::{self, HostLink, Identity};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let (agent_dir, host_dir) = (dir.join("agent"), dir.join("host"));
        let agent = Identity::load_or_create(&agent_dir, "signet-agent").unwrap();
        let host = HostLink::open(&host_dir).unwrap();
        link::write_pin(&host_dir.join(link::AGENT_PIN_FILE), &agent.fingerprint).unwrap();
        link::write_pin(&agent_dir.join(link::HOST_PIN_FILE), &host.fingerprint()).unwrap();
        let acceptor = link::acceptor(&agent, &agent_dir).unwrap();
        let ep = Endpoint::Unix(dir.join("agent.sock"));
        let mut listener = Listener::bind(&ep).await.unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept_peer().await {
                count.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(io).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        let host = Arc::new(host);
        crate::link::register(ep.clone(), host.clone());
        (ep, host, accepted)
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn the_link_keeps_its_connection_while_the_agent_key_stays_pinned() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let (ep, host, accepted) = paired_agent(dir.path(), true).await;
        let get = || async {
            let req = Request::get("/agent/v1/health")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = send(&ep, req).await?;
            read_small(&ep, resp.into_body()).await
        };
        // Requests one after another: one connection, one handshake.
        for _ in 0..3 {
            assert_eq!(get().await.unwrap(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Two at once: a second connection, kept as well.
        let (a, b) = tokio::join!(get(), get());
        assert_eq!(
            (a.unwrap(), b.unwrap()),
            (Bytes::from("ok"), Bytes::from("ok"))
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(get().await.unwrap(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // The host now pins another agent key: no kept connection is used, the new
        // handshake refuses the agent's key.
        let pin = dir.path().join("host").join(crate::link::AGENT_PIN_FILE);
        let agent_key = crate::link::read_pin(&pin).unwrap().unwrap();
        crate::link::write_pin(&pin, &crate::link::Fingerprint::of(b"another agent")).unwrap();
        let e = get().await.unwrap_err().to_string();
        assert!(
            e.contains("it is not the agent this host was paired with"),
            "{e}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 3);

        // Paired again with it: a new connection, kept again.
        crate::link::write_pin(&pin, &agent_key).unwrap();
        assert_eq!(get().await.unwrap(), "ok");
        assert_eq!(get().await.unwrap(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 4);

        // Connections dropped (as when the agent restarts): the next request connects
        // anew and is answered.
        host.forget_connections();
        assert_eq!(get().await.unwrap(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    /// A plain server on a unix socket counting the connections it accepts; it
    /// answers `POST` with `202` and a small body, anything else with its path
    /// (closing the connection after each answer without `keep_alive`).
    #[cfg(unix)]
    async fn counting_server(
        dir: &std::path::Path,
        keep_alive: bool,
    ) -> (Endpoint, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let ep = Endpoint::Unix(dir.join("d.sock"));
        let mut listener = Listener::bind(&ep).await.unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept_peer().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let post = req.method() == http::Method::POST;
                        let path = req.uri().path().to_owned();
                        // The upload is read whole before the answer, as signetd does.
                        let _ = req.into_body().collect().await;
                        let mut resp = Response::new(Full::new(Bytes::from(if post {
                            "{\"job\":\"1\"}".to_owned()
                        } else {
                            path
                        })));
                        if post {
                            *resp.status_mut() = StatusCode::ACCEPTED;
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(io), svc)
                        .await;
                });
            }
        });
        (ep, accepted)
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_connection_carries_the_upload_and_the_collection_in_turn() {
        use std::sync::atomic::Ordering;
        for keep_alive in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (ep, accepted) = counting_server(dir.path(), keep_alive).await;
            let mut conn = Connection::new(&ep);
            for n in 1..=3 {
                let post = Request::post("/v1/sign")
                    .body(Full::new(Bytes::from(vec![7u8; 100_000])))
                    .unwrap();
                let resp = conn.send(post).await.unwrap();
                assert_eq!(resp.status(), StatusCode::ACCEPTED);
                assert_eq!(read_answer(&ep, resp).await.unwrap(), "{\"job\":\"1\"}");
                let get = Request::get(format!("/v1/jobs/{n}/result"))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = conn.send(get).await.unwrap();
                assert_eq!(
                    read_answer(&ep, resp).await.unwrap(),
                    format!("/v1/jobs/{n}/result")
                );
                // Kept alive: one connection for everything; else one per request,
                // each request still answered.
                let want = if keep_alive { 1 } else { 2 * n };
                assert_eq!(
                    accepted.load(Ordering::SeqCst),
                    want,
                    "keep_alive {keep_alive}"
                );
            }
            // Forgotten: the next request connects anew.
            conn.close();
            let resp = conn
                .send(Request::get("/x").body(Empty::<Bytes>::new()).unwrap())
                .await
                .unwrap();
            assert_eq!(read_answer(&ep, resp).await.unwrap(), "/x");
            let want = if keep_alive { 2 } else { 7 };
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                want,
                "keep_alive {keep_alive}"
            );
        }
    }

    #[tokio::test]
    async fn get_json_over_unix_and_tcp_and_error_bodies() {
        let app = Router::new()
            .route("/ok", get(|| async { Json(serde_json::json!({"n": 1})) }))
            .route(
                "/err",
                get(|| async {
                    (
                        StatusCode::FORBIDDEN,
                        Json(ErrorBody::new(ErrorCode::Forbidden, "not you")),
                    )
                }),
            )
            .route(
                "/html",
                get(|| async { (StatusCode::BAD_GATEWAY, "<h1>proxy</h1>") }),
            );
        let dir = tempfile::tempdir().unwrap();
        let mut endpoints: Vec<Endpoint> = vec!["tcp:127.0.0.1:0".parse().unwrap()];
        if cfg!(unix) {
            endpoints.push(Endpoint::Unix(dir.path().join("h.sock")));
        }
        for ep in endpoints {
            let listener = Listener::bind(&ep).await.unwrap();
            let ep = listener.local_endpoint().unwrap();
            let app = app.clone();
            let server = tokio::spawn(async move { axum::serve(listener, app).await });

            let ok: serde_json::Value = get_json(&ep, "/ok").await.unwrap().unwrap();
            assert_eq!(ok["n"], 1);
            let err = get_json::<serde_json::Value>(&ep, "/err")
                .await
                .unwrap()
                .unwrap_err();
            assert_eq!(err, ErrorBody::new(ErrorCode::Forbidden, "not you"));
            let err = get_json::<serde_json::Value>(&ep, "/html")
                .await
                .unwrap()
                .unwrap_err();
            assert_eq!(err.code, ErrorCode::AgentUnavailable);
            assert!(err.message.contains("<h1>proxy</h1>"), "{}", err.message);
            server.abort();
        }
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn an_agent_that_closes_its_connections_still_answers_every_request() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let (ep, _host, accepted) = paired_agent(dir.path(), false).await;
        for n in 1..=4 {
            let req = Request::get("/agent/v1/health")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = send(&ep, req).await.unwrap();
            assert_eq!(read_small(&ep, resp.into_body()).await.unwrap(), "ok");
            // A connection the agent closed is never used again.
            assert_eq!(accepted.load(Ordering::SeqCst), n);
        }
    }
}
