//! The agent's HTTP front: translates requests into [`Agent`] calls and results into
//! answers. No logic of its own.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::TryStreamExt;
use signet_protocol::batch::{self, Part, PartBody, RESULT_HEADER};
use signet_protocol::wire::{
    AgentSignQuery, ErrorBody, ErrorCode, AGENT_BATCH_PATH, AGENT_HEALTH_PATH, AGENT_SIGN_PATH,
};
use tokio::io::AsyncWriteExt;

use crate::agent::{Agent, Spool};

/// The agent's router.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(AGENT_SIGN_PATH, post(sign))
        .route(AGENT_BATCH_PATH, post(batch))
        .route(AGENT_HEALTH_PATH, get(health))
        .fallback(|| async {
            ErrorBody::new(
                ErrorCode::BadRequest,
                "no such agent API path; see /agent/v1/health",
            )
        })
        .with_state(agent)
}

async fn health(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    Json(agent.health().await)
}

async fn sign(
    State(agent): State<Arc<Agent>>,
    query: Result<Query<AgentSignQuery>, QueryRejection>,
    body: Body,
) -> Result<Response, ErrorBody> {
    let Query(query) = query.map_err(|e| {
        ErrorBody::new(
            ErrorCode::BadRequest,
            format!("bad query: {}", e.body_text()),
        )
    })?;
    let span = tracing::info_span!("job", file = query.filename.as_deref().unwrap_or("-"));
    let _g = span.enter();
    drop(_g);
    let spool = agent.spool()?;
    receive(&spool, body).await?;
    {
        use tracing::Instrument;
        agent.sign(&spool, &query).instrument(span.clone()).await?;
    }
    send(spool).await
}

/// The most files one batch may carry.
const MAX_BATCH: usize = 1000;

async fn batch(
    State(agent): State<Arc<Agent>>,
    query: Result<Query<AgentSignQuery>, QueryRejection>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, ErrorBody> {
    let Query(query) = query.map_err(|e| {
        ErrorBody::new(
            ErrorCode::BadRequest,
            format!("bad query: {}", e.body_text()),
        )
    })?;
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok())
        .ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::BadRequest,
                "a batch is multipart/form-data with one part per file",
            )
        })?;
    let mut parts = multer::Multipart::new(body.into_data_stream(), boundary);
    let mut items = Vec::new();
    loop {
        let field = parts.next_field().await.map_err(|e| {
            ErrorBody::new(
                ErrorCode::TruncatedInput,
                format!("the batch upload is malformed or ended early ({e}); nothing was signed"),
            )
        })?;
        let Some(mut field) = field else { break };
        if items.len() == MAX_BATCH {
            return Err(ErrorBody::new(
                ErrorCode::InputTooLarge,
                format!("a batch holds at most {MAX_BATCH} files; split it"),
            ));
        }
        let spool = agent.spool()?;
        let mut q = query.clone();
        q.filename = field.file_name().map(str::to_owned);
        let mut file = tokio::fs::File::create(spool.input())
            .await
            .map_err(spool_error)?;
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) => file.write_all(&chunk).await.map_err(spool_error)?,
                Ok(None) => break,
                Err(e) => {
                    return Err(ErrorBody::new(
                        ErrorCode::TruncatedInput,
                        format!("the batch upload ended early ({e}); nothing was signed"),
                    ))
                }
            }
        }
        file.flush().await.map_err(spool_error)?;
        items.push((spool, q));
    }
    let span = tracing::info_span!("batch", files = items.len());
    let results = {
        use tracing::Instrument;
        agent.sign_batch(&items).instrument(span).await
    };
    let mut out = Vec::with_capacity(items.len());
    for ((spool, q), result) in items.iter().zip(results) {
        let filename = q.filename.clone().unwrap_or_default();
        out.push(match result {
            Ok(()) => Part {
                filename,
                headers: vec![(RESULT_HEADER.to_owned(), "signed".to_owned())],
                content_type: "application/octet-stream",
                body: PartBody::File(spool.output()),
            },
            Err(e) => Part {
                filename,
                headers: vec![(RESULT_HEADER.to_owned(), "error".to_owned())],
                content_type: "application/json",
                body: PartBody::Bytes(serde_json::to_vec(&e).unwrap_or_default().into()),
            },
        });
    }
    let boundary = batch::new_boundary();
    let ct = batch::content_type(&boundary);
    // The spools live until the answer has been streamed.
    let stream = batch::body(boundary, out).map_ok(move |chunk| {
        let _keep = &items;
        chunk
    });
    let mut resp = Body::from_stream(stream).into_response();
    if let Ok(v) = HeaderValue::from_str(&ct) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    Ok(resp)
}

fn spool_error(e: std::io::Error) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Internal,
        format!("the agent cannot write its spool: {e}"),
    )
}

/// Streams the request body into the spool, in constant memory.
async fn receive(spool: &Spool, body: Body) -> Result<u64, ErrorBody> {
    let internal = |e: std::io::Error| {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("the agent cannot write its spool: {e}"),
        )
    };
    let mut file = tokio::fs::File::create(spool.input())
        .await
        .map_err(internal)?;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    loop {
        match stream.try_next().await {
            Ok(Some(chunk)) => {
                total += chunk.len() as u64;
                file.write_all(&chunk).await.map_err(internal)?;
            }
            Ok(None) => break,
            Err(e) => {
                return Err(ErrorBody::new(
                    ErrorCode::TruncatedInput,
                    format!("the upload ended early after {total} bytes ({e}); nothing was signed"),
                ))
            }
        }
    }
    file.flush().await.map_err(internal)?;
    Ok(total)
}

/// Streams the signed file back; the spool is deleted when the stream ends.
async fn send(spool: Spool) -> Result<Response, ErrorBody> {
    let internal = |e: std::io::Error| {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("the signed file cannot be read: {e}"),
        )
    };
    let file = tokio::fs::File::open(spool.output())
        .await
        .map_err(internal)?;
    let len = file.metadata().await.map_err(internal)?.len();
    let stream = tokio_util::io::ReaderStream::new(file).map_ok(move |chunk| {
        let _keep = &spool;
        chunk
    });
    let mut resp = Body::from_stream(stream).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Ok(resp)
}
