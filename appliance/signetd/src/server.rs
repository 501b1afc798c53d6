//! The daemon's HTTP front (`/v1/...`), served on every configured endpoint.
//! It translates requests into [`Daemon`] commands and results into answers.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use signet_protocol::transport::Peer;
use signet_protocol::wire::{ErrorBody, ErrorCode, SignQuery, SIGN_PATH, STATUS_PATH};
use tracing::Instrument;

use crate::daemon::Daemon;

/// How much of a refused upload is read and dropped so the client gets to read the
/// error instead of a broken pipe.
const DRAIN_LIMIT: usize = 64 << 20;

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route(SIGN_PATH, post(sign))
        .route(STATUS_PATH, get(status))
        .fallback(|| async {
            ErrorBody::new(
                ErrorCode::BadRequest,
                "no such API path; the API is POST /v1/sign and GET /v1/status",
            )
        })
        .with_state(daemon)
}

async fn status(State(daemon): State<Arc<Daemon>>) -> impl IntoResponse {
    Json(daemon.status().await)
}

async fn sign(
    State(daemon): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    query: Result<Query<SignQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let accepted = query
        .map_err(|e| {
            ErrorBody::new(
                ErrorCode::BadRequest,
                format!("bad query: {}", e.body_text()),
            )
        })
        .and_then(|Query(q)| daemon.accept(&q, &peer));
    let job = match accepted {
        Ok(job) => job,
        Err(e) => {
            drain(body).await;
            return e.into_response();
        }
    };
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let span = tracing::info_span!("job", job = %job.id, profile = %job.profile);
    let result = daemon
        .relay(&job, body, content_length)
        .instrument(span.clone())
        .await;
    match result {
        Ok(agent_resp) => {
            span.in_scope(|| tracing::info!("signed; streaming the result"));
            let (parts, incoming) = agent_resp.into_parts();
            let mut resp = Body::new(incoming).into_response();
            for h in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
                if let Some(v) = parts.headers.get(&h) {
                    resp.headers_mut().insert(h, v.clone());
                }
            }
            if let Ok(v) = HeaderValue::from_str(&job.id) {
                resp.headers_mut().insert("x-signet-job", v);
            }
            resp
        }
        Err(e) => {
            span.in_scope(|| tracing::warn!(code = %e.code, message = %e.message, "job failed"));
            e.into_response()
        }
    }
}

async fn drain(body: Body) {
    let mut stream = body.into_data_stream();
    let mut seen = 0usize;
    while let Some(Ok(chunk)) = stream.next().await {
        seen += chunk.len();
        if seen > DRAIN_LIMIT {
            break;
        }
    }
}
