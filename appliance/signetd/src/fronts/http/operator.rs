//! The operator's HTTP routes (`/v1/operator/...`), for root on the host's unix
//! socket. Thin: each authenticates the caller, checks it is an operator
//! ([`crate::services::ops::check_operator`]) and calls one [`Daemon`] command.

use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Deserialize;
use signet_api::operator::{AUDIT_PATH, AUDIT_VERIFY_PATH, CANCEL_PATH, DOCTOR_PATH, JOBS_PATH};
use signet_api::wire::ErrorBody;
use signet_protocol::transport::Peer;

use crate::serve::OverTls;
use crate::services::daemon::Daemon;
use crate::services::ops::{self, check_operator};

pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route(JOBS_PATH, get(jobs))
        .route(CANCEL_PATH, axum::routing::delete(cancel))
        .route(AUDIT_PATH, get(audit))
        .route(AUDIT_VERIFY_PATH, get(audit_verify))
        .route(DOCTOR_PATH, get(doctor))
}

fn operator(
    daemon: &Daemon,
    peer: &Peer,
    tls: Option<Extension<OverTls>>,
    headers: &HeaderMap,
) -> Result<crate::services::operate::Operator, ErrorBody> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let caller = daemon
        .callers()
        .authenticate(peer, tls.is_some(), authorization)?;
    check_operator(&caller)?;
    Ok(crate::services::operate::Operator::local(&caller))
}

/// The answer: `r`'s value as JSON, or its error told as the wire's [`ErrorBody`].
fn answer<T: serde::Serialize, E: Into<ErrorBody>>(r: Result<T, E>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into().into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct JobsQuery {
    recent: Option<u64>,
}

async fn jobs(
    State(daemon): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    tls: Option<Extension<OverTls>>,
    headers: HeaderMap,
    Query(q): Query<JobsQuery>,
) -> Response {
    let r = match operator(&daemon, &peer, tls, &headers) {
        Ok(_) => daemon
            .reads()
            .jobs(q.recent.unwrap_or(ops::RECENT_JOBS))
            .await
            .map_err(ErrorBody::from),
        Err(e) => Err(e),
    };
    answer(r)
}

async fn cancel(
    State(daemon): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    tls: Option<Extension<OverTls>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(
        operator(&daemon, &peer, tls, &headers)
            .and_then(|op| daemon.cancel_by(&op, &id).map_err(ErrorBody::from)),
    )
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    n: Option<u64>,
    since: Option<String>,
}

async fn audit(
    State(daemon): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    tls: Option<Extension<OverTls>>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Response {
    let r = match operator(&daemon, &peer, tls, &headers) {
        Ok(_) => match (&q.since, q.n) {
            (Some(since), _) => daemon.reads().audit_since(Some(since)).await,
            (None, n) => {
                daemon
                    .reads()
                    .audit_tail(n.unwrap_or(ops::AUDIT_TAIL))
                    .await
            }
        }
        .map_err(ErrorBody::from),
        Err(e) => Err(e),
    };
    answer(r)
}

async fn audit_verify(
    State(daemon): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    tls: Option<Extension<OverTls>>,
    headers: HeaderMap,
) -> Response {
    let r = match operator(&daemon, &peer, tls, &headers) {
        Ok(_) => daemon.reads().audit_verify().await.map_err(ErrorBody::from),
        Err(e) => Err(e),
    };
    answer(r)
}

async fn doctor(
    State(daemon): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    tls: Option<Extension<OverTls>>,
    headers: HeaderMap,
) -> Response {
    match operator(&daemon, &peer, tls, &headers) {
        Ok(_) => Json(daemon.doctor().await).into_response(),
        Err(e) => e.into_response(),
    }
}
