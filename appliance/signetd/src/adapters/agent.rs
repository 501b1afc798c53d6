//! The signing VM's agent as signetd reaches it: its health read within a bound, and a
//! job's request sent. Every call goes over the paired link ([`signet_protocol::link`],
//! registered for the agent's endpoint at start), so nothing here sees a key.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response};
use hyper::body::{Body, Incoming};
use signet_api::wire::patch::ACCEPT_PATCH;
use signet_api::wire::{
    AgentHealth, ErrorBody, AGENT_HEALTH_PATH, AGENT_SIGN_PATH, INPUT_LENGTH_HEADER,
    INPUT_SHA256_HEADER, JOB_HEADER,
};
use signet_protocol::client::{self, ClientError};
use signet_protocol::endpoint::Endpoint;

/// What a health read found.
#[derive(Debug)]
pub enum Health {
    /// The agent answered with its health.
    Answered(Box<AgentHealth>),
    /// The agent answered with an error.
    Refused(ErrorBody),
    /// The agent could not be reached.
    Unreachable(ClientError),
    /// The agent did not answer within the bound.
    Silent(Duration),
}

/// The agent's health at `agent`, within `within`.
pub async fn health(agent: &Endpoint, within: Duration) -> Health {
    match tokio::time::timeout(
        within,
        client::get_json::<AgentHealth>(agent, AGENT_HEALTH_PATH),
    )
    .await
    {
        Ok(Ok(Ok(h))) => Health::Answered(Box::new(h)),
        Ok(Ok(Err(e))) => Health::Refused(e),
        Ok(Err(e)) => Health::Unreachable(e),
        Err(_) => Health::Silent(within),
    }
}

/// What sending a job's request found.
#[derive(Debug)]
pub enum Sent {
    /// The agent's streaming answer (success).
    Answer(Response<Incoming>),
    /// The agent's error answer.
    Refused(ErrorBody),
    /// The agent could not be reached.
    Unreachable(ClientError),
}

/// How the agent learns the SHA-256 of a job's input, which keys the result it keeps
/// for a job sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputSha<'a> {
    /// Not from here: the agent hashes the input itself when it keeps a result.
    None,
    /// In [`INPUT_SHA256_HEADER`], before the input (hex).
    Header(&'a str),
    /// As a trailer after the input, which goes on while it is hashed here: the body
    /// is chunked, its length in [`INPUT_LENGTH_HEADER`] instead of `Content-Length`.
    Trailer,
}

/// Sends job `id` to the agent at `path?query` with `body` (its length, when known),
/// telling it the input's SHA-256 as `input_sha256` says.
#[allow(clippy::too_many_arguments)]
pub async fn send_job<B>(
    agent: &Endpoint,
    id: &str,
    path: &str,
    query: &str,
    content_type: &str,
    body: B,
    content_length: Option<u64>,
    input_sha256: InputSha<'_>,
) -> Result<Sent, http::Error>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut req = Request::post(format!("{path}?{query}"))
        .header(header::CONTENT_TYPE, content_type)
        .header(JOB_HEADER, id);
    match (input_sha256, content_length) {
        (InputSha::Trailer, len) => {
            req = req.header(header::TRAILER, INPUT_SHA256_HEADER);
            if let Some(len) = len {
                req = req.header(INPUT_LENGTH_HEADER, len);
            }
        }
        (sha, len) => {
            if let Some(len) = len {
                req = req.header(header::CONTENT_LENGTH, len);
            }
            if let InputSha::Header(sha) = sha {
                req = req.header(INPUT_SHA256_HEADER, sha);
            }
        }
    }
    if path == AGENT_SIGN_PATH {
        // A PE signed natively comes back as what signing changed; the worker makes the
        // signed file from the input it spooled (`services::jobs`).
        req = req.header(header::ACCEPT, ACCEPT_PATCH);
    }
    let req = req.body(body)?;
    Ok(match client::send(agent, req).await {
        Err(e) => Sent::Unreachable(e),
        Ok(resp) if resp.status().is_success() => Sent::Answer(resp),
        Ok(resp) => Sent::Refused(client::error_body(agent, resp).await),
    })
}
