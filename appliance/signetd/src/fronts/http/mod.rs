//! The daemon's HTTP front (`/v1/...`, and `/api/sign` for Handtokening's clients),
//! served on every configured endpoint.
//! It parses requests, calls one service (through [`Daemon`]) and renders its answer.

pub mod handtokening;
pub mod operator;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures_util::StreamExt;
use signet_api::wire::{
    ErrorBody, ErrorCode, SignQuery, BATCH_PATH, IDEMPOTENCY_HEADER, JOB_HEADER, JOB_PATH,
    JOB_RESULT_PATH, SIGN_PATH, STATUS_PATH,
};
use signet_protocol::transport::Peer;

use crate::adapters::store::Kind;
use crate::core::policy::Caller;
use crate::serve::OverTls;
use crate::services::agent::client_view;
use crate::services::daemon::Daemon;
use crate::services::errors::JobError;
use crate::services::jobs::{Delivery, Signing, SubmitRequest};
use signet_protocol::batch;

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route(SIGN_PATH, post(sign))
        .route(BATCH_PATH, post(sign_batch))
        .route(handtokening::PATH, post(api_sign))
        .route(STATUS_PATH, get(status))
        .route(signet_api::wire::PROFILE_PATH, get(profile))
        .route(signet_api::wire::TOKENS_PATH, get(tokens))
        .route(JOB_PATH, get(get_job).delete(cancel_job))
        .route(JOB_RESULT_PATH, get(job_result))
        .merge(crate::fronts::http::operator::routes())
        .fallback(|| async {
            ErrorBody::new(
                ErrorCode::BadRequest,
                "no such API path; the API is POST /v1/sign, POST /v1/batch, GET /v1/status, GET /v1/profile, GET|DELETE /v1/jobs/{id}, GET /v1/jobs/{id}/result and POST /api/sign; root on the host also has /v1/operator/...",
            )
        })
        .with_state(daemon)
}

/// Over TLS the status and the tokens are for authenticated clients only (they name
/// serials, certificates, the module and the profiles); other transports vouch for
/// their peer already. A refusal is audited (coalesced) and answered without detail.
fn tls_reader(
    daemon: &Daemon,
    peer: &Peer,
    over_tls: bool,
    headers: &HeaderMap,
) -> Result<(), Box<Response>> {
    if !over_tls {
        return Ok(());
    }
    match authenticate(daemon, peer, true, headers) {
        Ok(_) => Ok(()),
        Err(e) => {
            let who = match peer {
                Peer::Tcp { addr } => Caller::Anonymous {
                    addr: addr.to_string(),
                }
                .key(),
                other => daemon.callers().identify(other).key(),
            };
            let e = ErrorBody::from(e);
            daemon.job_service().refuse(&who, "tls", None, None, &e);
            Err(Box::new(error_response(daemon, e)))
        }
    }
}

/// An error's answer (a service's error told as the wire's [`ErrorBody`]);
/// `too_many_attempts` carries `Retry-After`.
pub fn error_response(daemon: &Daemon, e: impl Into<ErrorBody>) -> Response {
    let e: ErrorBody = e.into();
    let throttled = e.code == ErrorCode::TooManyAttempts;
    let mut resp = e.into_response();
    if throttled {
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(daemon.callers().retry_after_seconds()),
        );
    }
    resp
}

async fn status(
    State(daemon): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    tls: Option<Extension<OverTls>>,
    headers: HeaderMap,
) -> Response {
    if let Err(resp) = tls_reader(&daemon, &peer, tls.is_some(), &headers) {
        return *resp;
    }
    Json(daemon.status().await).into_response()
}

async fn tokens(
    State(daemon): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    tls: Option<Extension<OverTls>>,
    headers: HeaderMap,
) -> Response {
    if let Err(resp) = tls_reader(&daemon, &peer, tls.is_some(), &headers) {
        return *resp;
    }
    Json(daemon.tokens()).into_response()
}

/// `GET /v1/profile?profile=NAME`: how a profile the caller may use signs.
async fn profile(
    State(daemon): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    tls: Option<Extension<OverTls>>,
    query: Result<Query<signet_api::wire::ProfileQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let query = query.map(|Query(q)| q).map_err(|e| {
        ErrorBody::new(
            ErrorCode::BadRequest,
            format!("bad query: {}", e.body_text()),
        )
    });
    let options = query.map_err(JobError::Request).and_then(|q| {
        authenticate(&daemon, &peer, tls.is_some(), &headers).and_then(|caller| {
            daemon
                .job_service()
                .profile_options(q.profile.as_deref(), &caller)
        })
    });
    match options {
        Ok(o) => {
            let (body, sha) = crate::services::jobs::profile_answer(&o);
            let mut r = Body::from(body).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Ok(v) = HeaderValue::from_str(&sha) {
                r.headers_mut().insert(signet_api::wire::PROFILE_HEADER, v);
            }
            r
        }
        Err(e) => error_response(&daemon, e),
    }
}

async fn sign(
    State(daemon): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    tls: Option<Extension<OverTls>>,
    version: http::Version,
    query: Result<Query<SignQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let query = v1_query(query);
    v1_answer(
        &daemon,
        job(
            &daemon,
            peer,
            (tls.is_some(), version),
            query,
            headers,
            body,
            Kind::Sign,
        )
        .await,
    )
}

async fn sign_batch(
    State(daemon): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    tls: Option<Extension<OverTls>>,
    version: http::Version,
    query: Result<Query<SignQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let query = v1_query(query);
    v1_answer(
        &daemon,
        job(
            &daemon,
            peer,
            (tls.is_some(), version),
            query,
            headers,
            body,
            Kind::Batch,
        )
        .await,
    )
}

/// The client API's answer: the job's, or its error (with the job's id when there is a
/// job; `Retry-After` when throttled).
fn v1_answer(daemon: &Daemon, answer: Result<Response, (ErrorBody, Option<String>)>) -> Response {
    match answer {
        Ok(resp) => resp,
        Err((e, id)) => {
            let mut resp = error_response(daemon, e);
            if let Some(v) = id.and_then(|id| HeaderValue::from_str(&id).ok()) {
                resp.headers_mut().insert(JOB_HEADER, v);
            }
            resp
        }
    }
}

/// `POST /api/sign`, the Handtokening-compatible front: the same job, its query
/// names and its `{"detail"}` errors.
async fn api_sign(
    State(daemon): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    tls: Option<Extension<OverTls>>,
    version: http::Version,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let disposition = headers
        .get(header::CONTENT_DISPOSITION)
        .and_then(|v| v.to_str().ok());
    let query = handtokening::sign_query(query.as_deref().unwrap_or(""), disposition);
    let e = match job(
        &daemon,
        peer,
        (tls.is_some(), version),
        query,
        headers,
        body,
        Kind::Sign,
    )
    .await
    {
        Ok(resp) => return resp,
        Err((e, _)) => e,
    };
    let (status, body) = handtokening::detail(&e);
    let mut resp = (
        axum::http::StatusCode::from_u16(status)
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR),
        Json(body),
    )
        .into_response();
    if e.code == ErrorCode::TooManyAttempts {
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(daemon.callers().retry_after_seconds()),
        );
    }
    resp
}

fn authenticate(
    daemon: &Daemon,
    peer: &Peer,
    over_tls: bool,
    headers: &HeaderMap,
) -> Result<Caller, JobError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    Ok(daemon
        .callers()
        .authenticate(peer, over_tls, authorization)?)
}

fn v1_query(query: Result<Query<SignQuery>, QueryRejection>) -> Result<SignQuery, ErrorBody> {
    query.map(|Query(q)| q).map_err(|e| {
        ErrorBody::new(
            ErrorCode::BadRequest,
            format!(
                "bad query: {}; the parameters are profile, filename, description, url, mode (whole|digest) and response (complete|pkcs7)",
                e.body_text()
            ),
        )
    })
}

/// A job from any front: the request handed to the signing use case
/// ([`JobService::sign`](crate::services::jobs::JobService::sign)), its outcome rendered:
/// the result streamed, or the error with the job's id when there is a job.
async fn job(
    daemon: &Arc<Daemon>,
    peer: Peer,
    (over_tls, version): (bool, http::Version),
    query: Result<SignQuery, ErrorBody>,
    headers: HeaderMap,
    body: Body,
    kind: Kind,
) -> Result<Response, (ErrorBody, Option<String>)> {
    let header_str = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let req = SubmitRequest {
        peer,
        over_tls,
        authorization: header_str(header::AUTHORIZATION.as_str()),
        query,
        kind,
        content_type: header_str(header::CONTENT_TYPE.as_str()),
        content_length: header_str(header::CONTENT_LENGTH.as_str()).and_then(|v| v.parse().ok()),
        idempotency_key: header_str(IDEMPOTENCY_HEADER),
        if_profile: header_str(signet_api::wire::PROFILE_HEADER),
        respond_async: signet_api::wire::prefers(&headers, "respond-async"),
        // An HTTP/1.0 answer without a length ends with the connection: a break would
        // look like the end.
        early_result: version >= http::Version::HTTP_11
            && signet_api::wire::prefers(&headers, signet_api::wire::EARLY_RESULT),
        body,
    };
    // A refusal is answered at once, from the headers: the body is not read first. The
    // connection then reads and drops what the client still sends before it closes
    // (`serve`), so the client reads this answer, not a reset.
    match daemon.job_service().sign(req).await {
        Signing::Refused(e) | Signing::Failed(e) => Err((e.into(), None)),
        Signing::Queued { id, job } => {
            // RFC 7240: answer now with the job; the result is fetched later.
            let view = job.map_err(|e| (e.into(), Some(id.clone())))?;
            let mut resp = (http::StatusCode::ACCEPTED, Json(view)).into_response();
            if let Ok(v) = HeaderValue::from_str(&id) {
                resp.headers_mut().insert(JOB_HEADER, v);
            }
            Ok(resp)
        }
        Signing::Ended {
            id,
            caller: _,
            result,
            pkcs7,
        } => {
            let mut resp = render_result(daemon, &id, result).map_err(|e| (e, Some(id.clone())))?;
            if pkcs7 {
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/pkcs7-signature"),
                );
            }
            Ok(resp)
        }
    }
}

/// The result of job `id` as an answer: the signed file (a batch's parts re-framed),
/// or the job's error; both carry the job id.
async fn deliver(
    daemon: &Arc<Daemon>,
    id: &str,
    caller: &Caller,
    (patch_ok, early): (bool, bool),
) -> Response {
    let result = daemon
        .job_service()
        .result_as(id, caller, patch_ok)
        .await
        .map(|d| d.asked_early(early));
    v1_answer(
        daemon,
        render_result(daemon, id, result).map_err(|e| (e, Some(id.to_owned()))),
    )
}

/// A job's result as an answer that tells the job service once it was streamed out
/// whole; an error stays an error for the front to render.
fn render_result(
    daemon: &Arc<Daemon>,
    id: &str,
    result: Result<Delivery, JobError>,
) -> Result<Response, ErrorBody> {
    let d = result?;
    let profile = d.profile_sha256;
    let mut resp = match d.kind {
        Kind::Batch => {
            let Ok(boundary) = multer::parse_boundary(&d.content_type) else {
                return Err(ErrorBody::new(
                    ErrorCode::Internal,
                    "the agent answered a batch without parts",
                ));
            };
            let out = batch::new_boundary();
            let mut r = Body::from_stream(reframe(d.body, boundary, out.clone(), d.id.clone()))
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&batch::content_type(&out)) {
                r.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            r
        }
        Kind::Sign => {
            let mut r = d.body.into_response();
            if let Ok(v) = HeaderValue::from_str(&d.content_type) {
                r.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            if let Some(len) = d.len {
                r.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            }
            if let Some(len) = d.whole_len {
                r.headers_mut().insert(
                    signet_api::wire::RESULT_LENGTH_HEADER,
                    HeaderValue::from(len),
                );
            }
            r
        }
    };
    let len = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    resp = resp.map(|b| Body::from_stream(when_streamed(b.into_data_stream(), len, daemon, id)));
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(JOB_HEADER, v);
    }
    if let Some(v) = profile.and_then(|p| HeaderValue::from_str(&p).ok()) {
        resp.headers_mut()
            .insert(signet_api::wire::PROFILE_HEADER, v);
    }
    if let Some(v) = d.input_sha256.and_then(|s| HeaderValue::from_str(&s).ok()) {
        resp.headers_mut()
            .insert(signet_api::wire::INPUT_SHA256_HEADER, v);
    }
    Ok(resp)
}

async fn get_job(
    State(daemon): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    tls: Option<Extension<OverTls>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let view = authenticate(&daemon, &peer, tls.is_some(), &headers)
        .and_then(|caller| daemon.job_service().job(&id, &caller));
    match view {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(&daemon, e),
    }
}

async fn cancel_job(
    State(daemon): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    tls: Option<Extension<OverTls>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let view = authenticate(&daemon, &peer, tls.is_some(), &headers)
        .and_then(|caller| daemon.job_service().cancel(&id, &caller));
    match view {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(&daemon, e),
    }
}

async fn job_result(
    State(daemon): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    tls: Option<Extension<OverTls>>,
    version: http::Version,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let caller = match authenticate(&daemon, &peer, tls.is_some(), &headers) {
        Ok(c) => c,
        Err(e) => return error_response(&daemon, e),
    };
    // Known to the caller: wait for it to end, then answer as POST /v1/sign would have.
    if let Err(e) = daemon.job_service().job(&id, &caller) {
        return ErrorBody::from(e).into_response();
    }
    // An HTTP/1.0 answer without a length ends with the connection: a break would look
    // like the end. Such a client gets the result once the job has ended.
    // A caller that holds the input it sent may take a signed file kept as its input
    // and a patch as that patch (`signet` does, for a file it read whole).
    let patch_ok = signet_api::wire::patch::headers_accept_patch(&headers);
    if version < http::Version::HTTP_11 {
        daemon.job_service().wait(&id).await;
        return deliver(&daemon, &id, &caller, (patch_ok, false)).await;
    }
    // Its signed file is streamed as it lands from the agent, its end withheld until
    // the job is signed; or, once it ended, answered from where it is kept. A patch
    // likewise: at once, its end once the job is signed.
    // With `Prefer: early-result`, a small one too, once signetd has it whole.
    let early = signet_api::wire::prefers(&headers, signet_api::wire::EARLY_RESULT);
    if let Some(live) = daemon.job_service().wait_result(&id, early).await {
        let result = daemon
            .job_service()
            .live_result(&id, &caller, live, patch_ok);
        return v1_answer(
            &daemon,
            render_result(&daemon, &id, result).map_err(|e| (e, Some(id.clone()))),
        );
    }
    deliver(&daemon, &id, &caller, (patch_ok, early)).await
}

/// Re-frames the agent's batch answer for the caller, part by part as it streams:
/// signed files pass through untouched, error parts go through [`client_view`].
fn reframe(
    incoming: Body,
    boundary: String,
    out_boundary: String,
    job: String,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send {
    use futures_util::stream;
    let mp = multer::Multipart::new(incoming.into_data_stream(), boundary);

    // State: the parser, the part being copied (if any), whether a part was written.
    stream::unfold(
        (mp, None::<multer::Field<'static>>, false, false),
        move |(mut mp, mut current, mut wrote, done)| {
            let out_boundary = out_boundary.clone();
            let job = job.clone();
            async move {
                if done {
                    return None;
                }
                if let Some(field) = current.as_mut() {
                    match field.chunk().await {
                        Ok(Some(chunk)) => return Some((Ok(chunk), (mp, current, wrote, false))),
                        // multer hands out the next part only once this one is dropped.
                        Ok(None) => drop(current.take()),
                        Err(e) => {
                            return Some((
                                Err({
                                    tracing::warn!(error = ?e, "batch answer from the agent broke off");
                                    std::io::Error::other(e)
                                }),
                                (mp, None, wrote, true),
                            ))
                        }
                    }
                }
                match mp.next_field().await {
                    Ok(Some(field)) => {
                        let filename = field.file_name().unwrap_or_default().to_owned();
                        let is_error = field
                            .headers()
                            .get(batch::RESULT_HEADER)
                            .is_some_and(|v| v.as_bytes() == b"error");
                        let first = !wrote;
                        wrote = true;
                        if is_error {
                            let bytes = match field.bytes().await {
                                Ok(b) => b,
                                Err(e) => {
                                    return Some((
                                        Err({
                                            tracing::warn!(error = ?e, "batch answer from the agent broke off");
                                            std::io::Error::other(e)
                                        }),
                                        (mp, None, wrote, true),
                                    ))
                                }
                            };
                            let e =
                                serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| {
                                    ErrorBody::new(
                                        ErrorCode::Internal,
                                        "the agent sent an unreadable error",
                                    )
                                });
                            let e = client_view(&job, e);
                            let json = serde_json::to_string(&e).unwrap_or_default();
                            let mut part = batch::part_head(
                                &out_boundary,
                                &filename,
                                "application/json",
                                &[(batch::RESULT_HEADER.to_owned(), "error".to_owned())],
                                first,
                            )
                            .to_vec();
                            part.extend_from_slice(json.as_bytes());
                            Some((Ok(bytes::Bytes::from(part)), (mp, None, wrote, false)))
                        } else {
                            let head = batch::part_head(
                                &out_boundary,
                                &filename,
                                "application/octet-stream",
                                &[(batch::RESULT_HEADER.to_owned(), "signed".to_owned())],
                                first,
                            );
                            Some((Ok(head), (mp, Some(field), wrote, false)))
                        }
                    }
                    Ok(None) => Some((
                        Ok(batch::closing(&out_boundary, !wrote)),
                        (mp, None, wrote, true),
                    )),
                    Err(e) => Some((
                        Err({
                            tracing::warn!(error = ?e, "batch answer from the agent broke off");
                            std::io::Error::other(e)
                        }),
                        (mp, None, wrote, true),
                    )),
                }
            }
        },
    )
}

/// `stream`, telling the daemon once it has been read to its end without an error
/// ([`JobService::delivered`](crate::services::jobs::JobService::delivered)); a stream dropped before (the client went away) tells nothing.
fn when_streamed<S, E>(
    stream: S,
    len: Option<u64>,
    daemon: &Arc<Daemon>,
    id: &str,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, E>> + Send + 'static
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Send + Unpin + 'static,
    E: Send + 'static,
{
    let done = Some((daemon.clone(), id.to_owned()));
    futures_util::stream::unfold(
        (stream, done, 0u64),
        move |(mut stream, mut done, mut sent)| async move {
            let told = |done: &mut Option<(Arc<Daemon>, String)>| {
                if let Some((daemon, id)) = done.take() {
                    daemon.job_service().delivered(&id);
                }
            };
            match stream.next().await {
                Some(Ok(b)) => {
                    sent += b.len() as u64;
                    // hyper stops polling once a known length is sent: the last byte
                    // is the end.
                    if len.is_some_and(|l| sent >= l) {
                        told(&mut done);
                    }
                    Some((Ok(b), (stream, done, sent)))
                }
                Some(Err(e)) => Some((Err(e), (stream, None, sent))),
                None => {
                    told(&mut done);
                    None
                }
            }
        },
    )
}
