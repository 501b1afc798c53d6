//! HTTP/1.1 requests over any [`Endpoint`], with streamed bodies.
//!
//! One connection per request: the calls are few and long (a signature takes as long
//! as the token needs), so pooling would buy nothing and cost state.

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
    let stream = transport::connect(endpoint).await?;
    match crate::link::registered(endpoint) {
        Some(link) => {
            let tls = link.handshake(endpoint, stream).await.map_err(|source| {
                ClientError::Connect(TransportError::Connect {
                    endpoint: endpoint.clone(),
                    source,
                })
            })?;
            send_over(tls, endpoint, req).await.map_err(|e| {
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
            })
        }
        None => send_over(stream, endpoint, req).await,
    }
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
    let stream = io;
    let http_err = |source| ClientError::Http {
        endpoint: endpoint.clone(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
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
    if matches!(endpoint, Endpoint::Tls { .. })
        && !req.headers().contains_key(header::AUTHORIZATION)
    {
        if let Some(v) =
            crate::tls::basic_authorization().and_then(|v| header::HeaderValue::from_str(&v).ok())
        {
            req.headers_mut().insert(header::AUTHORIZATION, v);
        }
    }
    match sender.send_request(req).await {
        Ok(resp) => Ok(resp),
        Err(e) => {
            let conn_err = tokio::time::timeout(std::time::Duration::from_secs(1), conn_err_rx)
                .await
                .ok()
                .and_then(Result::ok);
            Err(http_err(conn_err.unwrap_or(e)))
        }
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
}
