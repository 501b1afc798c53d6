//! The agent's HTTP front: translates requests into [`Agent`] calls and results into
//! answers. No logic of its own.
//!
//! Every route but pairing answers only the host this agent is paired with: the TLS
//! link (`signet_protocol::link`) lets in the pinned host key, or any key while a
//! pairing window is open, and [`Gate`] checks each request's key again against the
//! pin, so a key let in for pairing reaches `POST /agent/v1/pair` and nothing else.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt, TryStreamExt};
use signet_api::wire::patch::PATCH_MEDIA_TYPE;
use signet_api::wire::SignMode;
use signet_api::wire::{
    AgentLogin, AgentSignQuery, ErrorBody, ErrorCode, AGENT_BATCH_PATH, AGENT_EVENTS_PATH,
    AGENT_HEALTH_PATH, AGENT_LOGIN_PATH, AGENT_PAIR_PATH, AGENT_REINIT_PATH, AGENT_SIGN_PATH,
    INPUT_LENGTH_HEADER, INPUT_SHA256_HEADER, JOB_HEADER,
};
use signet_authenticode::{HashAlg, PeDigested, PeDigester};
use signet_protocol::batch::{self, Part, PartBody, RESULT_HEADER};
use signet_protocol::file_body::FileBody;
use signet_protocol::limits;
use signet_protocol::link::{self, Fingerprint};
use signet_protocol::serve::PeerKey;
use signet_protocol::IO_BLOCK;
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast::error::RecvError;
use tracing::Instrument;

use crate::agent::{Agent, JobKey, Spool};

/// Who may use the agent: the host whose key is pinned in the state directory, and
/// the upload limits.
#[derive(Debug, Clone)]
pub struct Gate {
    /// The agent's state directory (`host.pin`, the pairing window).
    pub state_dir: std::path::PathBuf,
    /// The agent's own key.
    pub own: Fingerprint,
    /// The largest upload, in bytes.
    pub max_input_size: u64,
    /// How long an upload may stay silent.
    pub idle: std::time::Duration,
}

impl Gate {
    fn paired(&self, key: Option<&PeerKey>) -> bool {
        let pinned = link::read_pin(&self.state_dir.join(link::HOST_PIN_FILE))
            .ok()
            .flatten();
        matches!((key, pinned), (Some(k), Some(p)) if k.0 == p)
    }
}

/// The agent's router.
pub fn router(agent: Arc<Agent>, gate: Gate) -> Router {
    let paired_only = Router::new()
        .route(AGENT_SIGN_PATH, post(sign))
        .route(AGENT_BATCH_PATH, post(batch))
        .route(AGENT_HEALTH_PATH, get(health))
        .route(AGENT_LOGIN_PATH, post(login))
        .route(AGENT_REINIT_PATH, post(reinit))
        .route(AGENT_EVENTS_PATH, get(events))
        .fallback(|| async {
            ErrorBody::new(
                ErrorCode::BadRequest,
                "no such agent API path; see /agent/v1/health",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            gate.clone(),
            require_paired,
        ))
        .layer(axum::Extension(gate.clone()))
        .with_state(agent);
    Router::new()
        .route(AGENT_PAIR_PATH, post(pair))
        .with_state(gate)
        .merge(paired_only)
}

async fn require_paired(
    State(gate): State<Gate>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if gate.paired(req.extensions().get::<PeerKey>()) {
        next.run(req).await
    } else {
        ErrorBody::new(
            ErrorCode::Forbidden,
            format!(
                "this agent answers only the host it is paired with; {}",
                link::PAIR_FIX
            ),
        )
        .into_response()
    }
}

/// The host's half of pairing: its proof for the code of the open window, answered
/// with the agent's. The window closes with this request, whatever its outcome.
async fn pair(
    State(gate): State<Gate>,
    key: Option<axum::Extension<PeerKey>>,
    body: Bytes,
) -> Result<Json<link::PairAnswer>, ErrorBody> {
    let Some(axum::Extension(PeerKey(host))) = key else {
        return Err(ErrorBody::new(
            ErrorCode::Forbidden,
            "pairing takes the host's key: use `signetd pair CODE` on the host",
        ));
    };
    let Some(window) = link::Window::take(&gate.state_dir) else {
        tracing::warn!(host = %host, "a pairing request came while no pairing window was open");
        return Err(ErrorBody::new(
            ErrorCode::Forbidden,
            "no pairing window is open on this agent (or it expired): run `signet-agent pair` in the signing VM again and use the new code within 10 minutes",
        ));
    };
    let request: link::PairRequest = serde_json::from_slice(&body).map_err(|_| {
        ErrorBody::new(
            ErrorCode::BadRequest,
            "the body must be JSON {\"proof\": \"...\"}; the pairing window is closed: run `signet-agent pair` again",
        )
    })?;
    if !link::check_proof(
        &window.code,
        link::Side::Host,
        &host,
        &gate.own,
        &request.proof,
    ) {
        tracing::warn!(host = %host, "a pairing attempt with a wrong code; the window is closed");
        return Err(ErrorBody::new(
            ErrorCode::Forbidden,
            "the pairing code does not match; the window is closed: run `signet-agent pair` in the signing VM again and type the new code exactly",
        ));
    }
    link::write_pin(&gate.state_dir.join(link::HOST_PIN_FILE), &host).map_err(|e| {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("the agent cannot keep the host's key: {e}"),
        )
    })?;
    tracing::info!(host = %host, "paired with the host; only this host's key is taken from now on");
    Ok(Json(link::PairAnswer {
        proof: link::proof(&window.code, link::Side::Agent, &gate.own, &host),
        fingerprint: gate.own,
    }))
}

async fn health(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    Json(agent.health().await)
}

/// Finalise and re-initialise the PKCS#11 module now; the health after it.
async fn reinit(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    Json(agent.reinit().await)
}

/// `{"pin": "..."}`. The body is wiped once read; the PIN lives on as a zeroizing
/// secret only.
async fn login(State(agent): State<Arc<Agent>>, body: Bytes) -> Result<Response, ErrorBody> {
    let parsed = match body.try_into_mut() {
        Ok(mut owned) => {
            let parsed = serde_json::from_slice::<AgentLogin>(&owned);
            zeroize::Zeroize::zeroize(owned.as_mut());
            parsed
        }
        Err(shared) => serde_json::from_slice::<AgentLogin>(&shared),
    };
    // serde's message could quote the input: say only where it went wrong.
    let login = parsed.map_err(|e| {
        ErrorBody::new(
            ErrorCode::BadRequest,
            format!(
                "the body must be JSON {{\"pin\": \"...\"}} (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })?;
    if secrecy::ExposeSecret::expose_secret(&login.pin).is_empty() {
        return Err(ErrorBody::new(ErrorCode::BadRequest, "the PIN is empty"));
    }
    Ok(Json(agent.login(login.pin).await?).into_response())
}

/// Server-sent events: one `AgentEvent` per message, `event:` its type, `id:` its
/// sequence number. A reader too slow to keep up is told how many it missed.
async fn events(
    State(agent): State<Arc<Agent>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = agent.subscribe();
    let stopped = agent.stopped();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = match rx.recv().await {
            Ok(e) => Event::default()
                .event(e.kind.name())
                .id(e.seq.to_string())
                .json_data(&e)
                .unwrap_or_else(|_| Event::default().comment("unencodable event")),
            Err(RecvError::Lagged(n)) => Event::default().event("lagged").data(n.to_string()),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(event), rx))
    })
    // The stream ends when the agent stops: the host follows the next agent.
    .take_until(stopped);
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn sign(
    State(agent): State<Arc<Agent>>,
    axum::Extension(gate): axum::Extension<Gate>,
    headers: HeaderMap,
    RawQuery(raw_query): RawQuery,
    query: Result<Query<AgentSignQuery>, QueryRejection>,
    body: Body,
) -> Result<Response, ErrorBody> {
    let Query(query) = query.map_err(|e| {
        ErrorBody::new(
            ErrorCode::BadRequest,
            format!("bad query: {}", e.body_text()),
        )
    })?;
    let host_job = headers.get(JOB_HEADER).and_then(|v| v.to_str().ok());
    // Every line of the job, the token's work included, carries the host's job id.
    let span = tracing::info_span!(
        "job",
        job = %agent.job_id(host_job),
        file = query.filename.as_deref().unwrap_or("-")
    );
    async move {
        let (body, limit) = limited(&gate, &headers, body)?;
        // The token's session is checked while the input arrives.
        agent.ready_ahead();
        // The input's SHA-256 keys the result kept for a job the host sends again: the
        // host declares it (it hashed the input as it spooled it), else it is made here
        // as the input is received. Without a job id nothing is kept: no hash at all.
        let host_job = headers.get(JOB_HEADER).and_then(|v| v.to_str().ok());
        let declared = declared_sha256(&headers)?;
        // A host that sends the input on before it has hashed it names the hash in
        // `Trailer` and sends it after the last byte.
        let in_trailer = declared.is_none() && announces_trailer(&headers, INPUT_SHA256_HEADER);
        let hash_input = host_job.is_some() && declared.is_none() && !in_trailer;
        // A whole file's Authenticode digest is made as it is received (when it is a PE).
        let digest_as = match query.mode {
            SignMode::Whole => query.hash.as_str().parse::<HashAlg>().ok(),
            SignMode::Digest => None,
        };
        let declared_len = declared_length(&headers);
        let (spool, made) = if agent.keeps_in_memory(query.mode, declared_len) {
            // A small input is held in memory: no job directory written and read again.
            let (data, sha, digested, trailers) =
                receive_memory(body, declared_len.unwrap_or(0), digest_as, hash_input)
                    .await
                    .map_err(|e| limit.explain(e))?;
            let mut spool = agent.memory_spool(data);
            spool.set_digested(digested);
            (spool, sha.or(trailed(in_trailer, trailers)?))
        } else {
            let mut spool = agent.spool()?;
            let (_, sha, digested, trailers) =
                receive(&spool, body, declared_len, digest_as, hash_input)
                    .await
                    .map_err(|e| limit.explain(e))?;
            spool.set_digested(digested);
            (spool, sha.or(trailed(in_trailer, trailers)?))
        };
        // A job the host sends again (it was restarted, or lost the connection, while
        // the agent signed) gets the result kept for it instead of a second signature:
        // the host's job id, bound to the exact request and input.
        let once = host_job.zip(declared.or(made)).map(|(job, input_sha256)| {
            JobKey::new(job, raw_query.as_deref().unwrap_or(""), input_sha256)
        });
        // Signing runs to its end in a task of its own, even when the host drops the
        // request: killing a signing process mid-operation can leave the token (or
        // SoftHSM's object store) half-written. A dropped request only drops the result.
        let signed = {
            let agent = agent.clone();
            tokio::spawn(
                async move { agent.sign_once(once, spool, &query).await }.in_current_span(),
            )
            .await
            .map_err(task_ended)?
        };
        // The host takes a signed file told as what signing changed in its input.
        send(
            signed?,
            signet_api::wire::patch::headers_accept_patch(&headers),
        )
        .await
    }
    .instrument(span)
    .await
}

/// A signing task that panicked or was cancelled.
fn task_ended(e: tokio::task::JoinError) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Internal,
        format!("the signing task ended before its answer: {e}"),
    )
}

/// The most files one batch may carry.
const MAX_BATCH: usize = 1000;

async fn batch(
    State(agent): State<Arc<Agent>>,
    axum::Extension(gate): axum::Extension<Gate>,
    query: Result<Query<AgentSignQuery>, QueryRejection>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, ErrorBody> {
    let host_job = headers.get(JOB_HEADER).and_then(|v| v.to_str().ok());
    let span = tracing::info_span!(
        "batch",
        job = %agent.job_id(host_job),
        files = tracing::field::Empty
    );
    batch_in(agent, gate, query, headers, body)
        .instrument(span)
        .await
}

/// The batch call, under the job's span.
async fn batch_in(
    agent: Arc<Agent>,
    gate: Gate,
    query: Result<Query<AgentSignQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ErrorBody> {
    let (body, limit) = limited(&gate, &headers, body)?;
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
            limit.explain(ErrorBody::new(
                ErrorCode::TruncatedInput,
                format!("the batch upload is malformed or ended early ({e}); nothing was signed"),
            ))
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
        // tokio's file writes each cost a trip to the blocking pool: write big blocks.
        let mut file = tokio::io::BufWriter::with_capacity(
            IO_BLOCK,
            tokio::fs::File::create(spool.input())
                .await
                .map_err(spool_error)?,
        );
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) => file.write_all(&chunk).await.map_err(spool_error)?,
                Ok(None) => break,
                Err(e) => {
                    return Err(limit.explain(ErrorBody::new(
                        ErrorCode::TruncatedInput,
                        format!("the batch upload ended early ({e}); nothing was signed"),
                    )))
                }
            }
        }
        file.flush().await.map_err(spool_error)?;
        items.push((spool, q));
    }
    tracing::Span::current().record("files", items.len());
    // As for one file: the batch is signed to its end even when the host goes away.
    let (items, results) = {
        let agent = agent.clone();
        tokio::spawn(
            async move {
                let results = agent.sign_batch(&items).await;
                (items, results)
            }
            .in_current_span(),
        )
        .await
        .map_err(task_ended)?
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

/// The upload within the agent's limits: a declared length above the limit is refused
/// before the body is read; the body itself is cut off past the limit or when silent,
/// and [`Limit::explain`] then says which.
fn limited(gate: &Gate, headers: &HeaderMap, body: Body) -> Result<(Body, Limit), ErrorBody> {
    let declared = declared_length(headers);
    if declared.is_some_and(|n| n > gate.max_input_size) {
        return Err(limits::too_large(gate.max_input_size));
    }
    let (body, tripped) = limits::limit(body, gate.max_input_size, gate.idle);
    Ok((
        body,
        Limit {
            tripped,
            max: gate.max_input_size,
            idle: gate.idle,
        },
    ))
}

/// The upload's length as its `Content-Length` declares it, or for a chunked body
/// [`INPUT_LENGTH_HEADER`]: the body is held to it either way (by HTTP, or by
/// [`receive_memory`] and [`receive`]).
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .or_else(|| headers.get(INPUT_LENGTH_HEADER))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Whether the request's `Trailer` header names `name`: it comes after the body.
fn announces_trailer(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get_all(header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| n.trim().eq_ignore_ascii_case(name))
}

/// The input's SHA-256 the host sent as a trailer, when it announced one
/// (`in_trailer`): a trailer announced and not sent, or not a SHA-256, is refused.
fn trailed(in_trailer: bool, trailers: Option<HeaderMap>) -> Result<Option<[u8; 32]>, ErrorBody> {
    if !in_trailer {
        return Ok(None);
    }
    match declared_sha256(&trailers.unwrap_or_default())? {
        Some(sha) => Ok(Some(sha)),
        None => Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("the host announced {INPUT_SHA256_HEADER} as a trailer and sent none after the input; nothing was signed"),
        )),
    }
}

/// The error of an upload longer (`got` bytes or more sent) or shorter (it ended after
/// `got`) than the length its request declared.
fn not_declared_length(declared: u64, got: u64) -> ErrorBody {
    let message = if got > declared {
        format!("the upload declared {declared} bytes and sent {got} or more; nothing was signed")
    } else {
        format!("the upload ended early after {got} of its {declared} bytes; nothing was signed")
    };
    ErrorBody::new(ErrorCode::TruncatedInput, message)
}

/// The input's SHA-256 as the host declares it in [`INPUT_SHA256_HEADER`] (64 hex
/// digits); a header that is not one is refused.
fn declared_sha256(headers: &HeaderMap) -> Result<Option<[u8; 32]>, ErrorBody> {
    let Some(v) = headers.get(INPUT_SHA256_HEADER) else {
        return Ok(None);
    };
    let bad = || {
        ErrorBody::new(
            ErrorCode::BadRequest,
            format!("{INPUT_SHA256_HEADER} is not a SHA-256 in hex (64 hex digits)"),
        )
    };
    let text = v.as_bytes();
    if text.len() != 64 {
        return Err(bad());
    }
    let mut sha = [0u8; 32];
    for (byte, pair) in sha.iter_mut().zip(text.chunks(2)) {
        let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
    }
    Ok(Some(sha))
}

/// What an upload left after its bytes: its trailers, if it sent any.
type Trailers = Option<HeaderMap>;

/// The body's next piece of data (`None` at its end); trailers that come go to
/// `trailers`.
async fn next_data(body: &mut Body, trailers: &mut Trailers) -> Result<Option<Bytes>, axum::Error> {
    use http_body_util::BodyExt;
    loop {
        match body.frame().await.transpose()? {
            None => return Ok(None),
            Some(frame) => match frame.into_data() {
                Ok(chunk) => return Ok(Some(chunk)),
                Err(frame) => *trailers = frame.into_trailers().ok(),
            },
        }
    }
}

/// Receives a small upload whole into memory (its length declared, `declared`, and at
/// most [`crate::agent::MEMORY_INPUT`]: a body of any other length is refused); answers
/// it and, with `hash`, its SHA-256 and, with `digest_as`, what a [`PeDigester`] made
/// of it (when it is a PE), both made as it is received, and its trailers. Hashed on
/// this thread: a megabyte at most, less than a trip to the blocking pool would hold
/// up the job.
async fn receive_memory(
    body: Body,
    declared: u64,
    digest_as: Option<HashAlg>,
    hash: bool,
) -> Result<(Bytes, Option<[u8; 32]>, Option<PeDigested>, Trailers), ErrorBody> {
    use sha2::Digest;
    let mut sha = hash.then(sha2::Sha256::new);
    let mut pe = digest_as.map(PeDigester::new);
    let cap = usize::try_from(declared.min(crate::agent::MEMORY_INPUT)).unwrap_or(0);
    let mut data = Vec::with_capacity(cap);
    let mut body = body;
    let mut trailers = None;
    loop {
        match next_data(&mut body, &mut trailers).await {
            Ok(Some(chunk)) => {
                if (data.len() + chunk.len()) as u64 > declared {
                    return Err(not_declared_length(
                        declared,
                        (data.len() + chunk.len()) as u64,
                    ));
                }
                if let Some(sha) = &mut sha {
                    sha.update(&chunk);
                }
                if let Some(pe) = &mut pe {
                    pe.update(&chunk);
                }
                data.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                return Err(ErrorBody::new(
                    ErrorCode::TruncatedInput,
                    format!(
                        "the upload ended early after {} bytes ({e}); nothing was signed",
                        data.len()
                    ),
                ))
            }
        }
    }
    if data.len() as u64 != declared {
        return Err(not_declared_length(declared, data.len() as u64));
    }
    Ok((
        Bytes::from(data),
        sha.map(|s| s.finalize().into()),
        pe.and_then(PeDigester::finish),
        trailers,
    ))
}

/// The limits an upload runs under.
struct Limit {
    tripped: Arc<limits::Tripped>,
    max: u64,
    idle: std::time::Duration,
}

impl Limit {
    /// The error of a failed upload: the limit it ran into, if it ran into one.
    fn explain(&self, e: ErrorBody) -> ErrorBody {
        self.tripped.error(self.max, self.idle).unwrap_or(e)
    }
}

fn spool_error(e: std::io::Error) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Internal,
        format!("the agent cannot write its spool: {e}"),
    )
}

/// Streams the request body into the spool, in constant memory; answers its length,
/// with `hash` its SHA-256 and, with `digest_as`, what a [`PeDigester`] made of it
/// (when it is a PE), and its trailers. A body of another length than `declared` (when
/// declared) is refused. The body's pieces are gathered into blocks of [`IO_BLOCK`] and handed to one
/// blocking thread that hashes and writes them, so the async thread only receives
/// (and decrypts) while the blocks before are hashed and written; at most
/// [`SPOOL_AHEAD`] blocks wait for it.
async fn receive(
    spool: &Spool,
    body: Body,
    declared: Option<u64>,
    digest_as: Option<HashAlg>,
    hash: bool,
) -> Result<(u64, Option<[u8; 32]>, Option<PeDigested>, Trailers), ErrorBody> {
    let internal = |e: std::io::Error| {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("the agent cannot write its spool: {e}"),
        )
    };
    let (tx, mut blocks) = tokio::sync::mpsc::channel::<Bytes>(SPOOL_AHEAD);
    let path = spool.input();
    type Written = (Option<[u8; 32]>, Option<PeDigested>);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<Written> {
        use sha2::Digest;
        use std::io::Write;
        let mut sha = hash.then(sha2::Sha256::new);
        let mut pe = digest_as.map(PeDigester::new);
        let mut file = std::fs::File::create(path)?;
        while let Some(block) = blocks.blocking_recv() {
            if let Some(sha) = &mut sha {
                sha.update(&block);
            }
            if let Some(pe) = &mut pe {
                pe.update(&block);
            }
            file.write_all(&block)?;
        }
        Ok((
            sha.map(|s| s.finalize().into()),
            pe.and_then(PeDigester::finish),
        ))
    });
    let mut body = body;
    let mut trailers = None;
    let mut total = 0u64;
    let mut block = bytes::BytesMut::new();
    let mut upload_error = None;
    loop {
        match next_data(&mut body, &mut trailers).await {
            Ok(Some(mut chunk)) => {
                total += chunk.len() as u64;
                if declared.is_some_and(|d| total > d) {
                    upload_error = declared.map(|d| not_declared_length(d, total));
                    break;
                }
                if block.is_empty() && chunk.len() >= IO_BLOCK {
                    if tx.send(chunk).await.is_err() {
                        // The writer stopped: its error says why.
                        break;
                    }
                    continue;
                }
                // Filled up to a block and no further: a block that grew past its
                // capacity would be copied whole into a larger one.
                let mut stopped = false;
                while !chunk.is_empty() {
                    if block.capacity() == 0 {
                        block.reserve(IO_BLOCK);
                    }
                    let take = (IO_BLOCK - block.len()).min(chunk.len());
                    block.extend_from_slice(&chunk.split_to(take));
                    if block.len() >= IO_BLOCK && tx.send(block.split().freeze()).await.is_err() {
                        stopped = true;
                        break;
                    }
                }
                if stopped {
                    // The writer stopped: its error says why.
                    break;
                }
            }
            Ok(None) => {
                if !block.is_empty() {
                    let _ = tx.send(block.split().freeze()).await;
                }
                break;
            }
            Err(e) => {
                upload_error = Some(ErrorBody::new(
                    ErrorCode::TruncatedInput,
                    format!("the upload ended early after {total} bytes ({e}); nothing was signed"),
                ));
                break;
            }
        }
    }
    drop(tx);
    let written = writer
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    if let Some(e) = upload_error {
        return Err(e);
    }
    if let Some(d) = declared.filter(|d| *d != total) {
        return Err(not_declared_length(d, total));
    }
    let (sha, digested) = written.map_err(internal)?;
    Ok((total, sha, digested, trailers))
}

/// How many blocks of [`IO_BLOCK`] an upload may be ahead of its spool's writer.
const SPOOL_AHEAD: usize = 4;

/// Streams the signed file back, read ahead on a blocking thread
/// ([`signet_protocol::file_body`]); the spool is deleted there once the file has been
/// read and no kept result holds it any more. A host that takes it (`patch`) is told
/// what signing changed instead, when the signer told it: a few KiB for a PE of any
/// size, made into the signed file from the host's own copy of the input.
async fn send(spool: Arc<Spool>, patch: bool) -> Result<Response, ErrorBody> {
    if let Some(p) = spool.patch().filter(|_| patch) {
        let body = serde_json::to_vec(p).map_err(|e| {
            ErrorBody::new(
                ErrorCode::Internal,
                format!("the signed file's changes cannot be written: {e}"),
            )
        })?;
        let len = body.len();
        let mut resp = Body::from(body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PATCH_MEDIA_TYPE),
        );
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        // Its files go with the spool, off this thread.
        crate::agent::drop_elsewhere(vec![spool]);
        return Ok(resp);
    }
    if let Some(signed) = spool.signed() {
        // Made in memory: answered from there.
        let len = signed.len();
        let mut resp = Body::from(signed).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        return Ok(resp);
    }
    let internal = |e: std::io::Error| {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("the signed file cannot be read: {e}"),
        )
    };
    let path = spool.output();
    let (file, len) = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        Ok::<_, std::io::Error>((file, len))
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    .map_err(internal)?;
    let mut resp = Body::new(FileBody::new(file, len, spool)).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stand_in;
    use http_body_util::BodyExt;
    use std::sync::Mutex;
    use tower::ServiceExt;

    /// Log lines as the agent writes them, kept for the test to read.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Lines {
        fn take(&self) -> String {
            String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
        }
    }

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Lines {
            self.clone()
        }
    }

    /// Logs at debug level to a sink no one reads, for as long as the guard lives: a
    /// callsite first met with no subscriber at all may be cached as of no interest
    /// while another test reads its lines.
    fn logging_to_nowhere() -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(Lines::default())
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    const HOST: Fingerprint = Fingerprint([7; 32]);

    /// The agent's router around a stand-in agent, paired with `HOST`.
    async fn app(dir: &std::path::Path) -> Router {
        app_with_desks(dir).await.0
    }

    /// [`app`], and the stand-in token's and signer's desks.
    async fn app_with_desks(
        dir: &std::path::Path,
    ) -> (Router, stand_in::Desk, Arc<Mutex<stand_in::SignerDesk>>) {
        let spool = dir.join("spool");
        std::fs::create_dir(&spool).unwrap();
        let (agent, token, signer) = stand_in::agent(&spool).await;
        link::write_pin(&dir.join(link::HOST_PIN_FILE), &HOST).unwrap();
        let gate = Gate {
            state_dir: dir.to_owned(),
            own: Fingerprint([9; 32]),
            max_input_size: 1 << 20,
            idle: std::time::Duration::from_secs(30),
        };
        (router(Arc::new(agent), gate), token, signer)
    }

    fn request(
        path: &str,
        job: Option<&str>,
        content_type: &str,
        body: &'static [u8],
    ) -> axum::http::Request<Body> {
        let mut b = axum::http::Request::post(path).header(header::CONTENT_TYPE, content_type);
        if let Some(job) = job {
            b = b.header(JOB_HEADER, job);
        }
        let mut req = b.body(Body::from(body)).unwrap();
        req.extensions_mut().insert(PeerKey(HOST));
        req
    }

    fn sign(job: Option<&str>) -> axum::http::Request<Body> {
        request(
            &format!("{AGENT_SIGN_PATH}?filename=a.ps1"),
            job,
            "application/octet-stream",
            b"Write-Host 'hello'\r\n",
        )
    }

    /// Every line logged, each under the job span with `job`; answers them.
    fn all_under(text: &str, job: &str) -> Vec<String> {
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        assert!(!lines.is_empty(), "nothing was logged");
        for l in &lines {
            assert!(
                l.contains(&format!("job{{job={job} "))
                    || l.contains(&format!("batch{{job={job} ")),
                "a line outside job {job}'s span: {l}\nall:\n{text}"
            );
        }
        lines
    }

    #[tokio::test]
    async fn every_line_of_a_job_carries_the_job_id_the_host_sent() {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path()).await;
        lines.take();

        let resp = app.clone().oneshot(sign(Some("42"))).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"Write-Host 'hello'\r\n+signed");
        let text = lines.take();
        let logged = all_under(&text, "42").join("\n");
        // The job's checks, the token's work (on the blocking pool), the signer, the
        // events and the outcome.
        for what in [
            "input accepted",
            "stand-in token: ensure_ready",
            "event=\"logged_in\"",
            "stand-in signer",
            "signing_started",
            "signed",
        ] {
            assert!(logged.contains(what), "no {what:?} in:\n{logged}");
        }

        // Without the header, or with one that cannot name a job: the agent's own
        // numbering, one number per request.
        let resp = app.clone().oneshot(sign(None)).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(all_under(&lines.take(), "agent-1")
            .iter()
            .any(|l| l.contains("stand-in signer")));
        let resp = app.clone().oneshot(sign(Some("7 OR 1=1"))).await.unwrap();
        assert_eq!(resp.status(), 200);
        all_under(&lines.take(), "agent-2");

        // A batch likewise, all its files under the one id.
        let batch = request(
            AGENT_BATCH_PATH,
            Some("43"),
            "multipart/form-data; boundary=XyZ",
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"one.ps1\"\r\n\r\n# one\r\n\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"two.ps1\"\r\n\r\n# two\r\n\r\n--XyZ--\r\n",
        );
        let resp = app.clone().oneshot(batch).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            String::from_utf8_lossy(&body).matches("+signed").count(),
            2,
            "{}",
            String::from_utf8_lossy(&body)
        );
        let text = lines.take();
        let signed = all_under(&text, "43")
            .iter()
            .filter(|l| l.contains("stand-in signer"))
            .count();
        assert_eq!(signed, 2, "{text}");
        assert!(text.contains("batch{job=43 files=2}"), "{text}");
    }

    #[tokio::test]
    async fn a_small_upload_with_its_length_declared_is_signed_in_memory() {
        let _guard = logging_to_nowhere();
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let (app, _token, signer) = app_with_desks(dir.path()).await;
        signer.lock().unwrap().in_memory =
            vec![signet_format::Format::Pe, signet_format::Format::PowerShell];
        let script: &'static [u8] = b"Write-Host 'hello'\r\n";
        for (declared, job) in [(true, "9"), (false, "10")] {
            let mut req = sign(Some(job));
            if declared {
                req.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(script.len()));
            }
            let resp = app.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(
                resp.headers().get(header::CONTENT_LENGTH).unwrap(),
                &HeaderValue::from(script.len() + 7)
            );
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"Write-Host 'hello'\r\n+signed");
        }
        // Held in memory when its length was declared; else spooled to a file.
        assert_eq!(signer.lock().unwrap().signed, ["<memory>", "input.ps1"]);
        // Only the spooled job's directory is left, its result kept for a host that
        // asks again; the job held in memory never had one.
        assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn a_job_sent_again_is_known_by_the_input_sha256_the_host_declares() {
        let _guard = logging_to_nowhere();
        let dir = tempfile::tempdir().unwrap();
        let (app, _token, signer) = app_with_desks(dir.path()).await;
        let hello: &'static [u8] = b"Write-Host 'hello'\r\n";
        let other: &'static [u8] = b"Write-Host 'other'\r\n";
        let send = |job: &str, sha: Option<&str>, body: &'static [u8]| {
            let mut req = request(
                &format!("{AGENT_SIGN_PATH}?filename=a.ps1"),
                Some(job),
                "application/octet-stream",
                body,
            );
            if let Some(sha) = sha {
                req.headers_mut()
                    .insert(INPUT_SHA256_HEADER, HeaderValue::from_str(sha).unwrap());
            }
            let app = app.clone();
            async move {
                let resp = app.oneshot(req).await.unwrap();
                let status = resp.status();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                (status.as_u16(), body)
            }
        };
        let signed = || signer.lock().unwrap().signed.len();
        let one = "ab".repeat(32);
        let two = "CD".repeat(32);

        assert_eq!(
            send("50", Some(&one), hello).await,
            (200, Bytes::from_static(b"Write-Host 'hello'\r\n+signed"))
        );
        assert_eq!(signed(), 1);
        // The same job id and declared hash: the kept result, on the host's word (the
        // body is not hashed again, so even another body gets it).
        assert_eq!(
            send("50", Some(&one), other).await,
            (200, Bytes::from_static(b"Write-Host 'hello'\r\n+signed"))
        );
        assert_eq!(signed(), 1, "not signed again");
        // The same job id with another declared hash (a host whose state was reset
        // numbering its jobs again): signed anew.
        assert_eq!(
            send("50", Some(&two), other).await,
            (200, Bytes::from_static(b"Write-Host 'other'\r\n+signed"))
        );
        assert_eq!(signed(), 2);

        // Without the header the agent hashes the input itself: the same input again
        // gets the kept result, another input is signed anew.
        assert_eq!(send("51", None, hello).await.0, 200);
        assert_eq!(signed(), 3);
        assert_eq!(send("51", None, hello).await.0, 200);
        assert_eq!(signed(), 3, "not signed again");
        assert_eq!(
            send("51", None, other).await,
            (200, Bytes::from_static(b"Write-Host 'other'\r\n+signed"))
        );
        assert_eq!(signed(), 4);

        // A header that is no SHA-256 is refused, nothing signed.
        for bad in ["ab", "zz".repeat(32).as_str(), &"ab".repeat(33)] {
            let (status, body) = send("52", Some(bad), hello).await;
            assert_eq!(status, 400, "{bad}");
            assert!(
                String::from_utf8_lossy(&body).contains(INPUT_SHA256_HEADER),
                "{body:?}"
            );
        }
        assert_eq!(signed(), 4);
    }

    /// A signing request for job `job` whose body is `pieces` and then `trailers`, its
    /// length declared as `declared` in [`INPUT_LENGTH_HEADER`] (chunked, as a host
    /// sends an input it has not hashed yet), its SHA-256 announced as a trailer.
    fn sign_with_trailer(
        job: &str,
        declared: usize,
        pieces: &[&'static [u8]],
        trailers: Option<HeaderMap>,
    ) -> axum::http::Request<Body> {
        let mut frames: Vec<Result<hyper::body::Frame<Bytes>, std::io::Error>> = pieces
            .iter()
            .map(|p| Ok(hyper::body::Frame::data(Bytes::from_static(p))))
            .collect();
        frames.extend(trailers.map(|t| Ok(hyper::body::Frame::trailers(t))));
        let body = Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )));
        let mut req = axum::http::Request::post(format!("{AGENT_SIGN_PATH}?filename=a.ps1"))
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(JOB_HEADER, job)
            .header(INPUT_LENGTH_HEADER, declared)
            .header(header::TRAILER, INPUT_SHA256_HEADER)
            .body(body)
            .unwrap();
        req.extensions_mut().insert(PeerKey(HOST));
        req
    }

    #[tokio::test]
    async fn a_job_sent_again_is_known_by_the_input_sha256_the_host_sends_after_the_input() {
        let _guard = logging_to_nowhere();
        let dir = tempfile::tempdir().unwrap();
        let (app, _token, signer) = app_with_desks(dir.path()).await;
        let hello: &'static [u8] = b"Write-Host 'hello'\r\n";
        let sha = |hex: &str| {
            let mut t = HeaderMap::new();
            t.insert(INPUT_SHA256_HEADER, HeaderValue::from_str(hex).unwrap());
            Some(t)
        };
        let one = "ab".repeat(32);
        let send = |req: axum::http::Request<Body>| {
            let app = app.clone();
            async move {
                let resp = app.oneshot(req).await.unwrap();
                let status = resp.status().as_u16();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
        };
        let signed = || signer.lock().unwrap().signed.clone();
        // Held in memory (its length declared in the header) and spooled to a file
        // (a format not signed in memory), in pieces: the trailer keys the result.
        for (in_memory, job) in [(true, "60"), (false, "61")] {
            signer.lock().unwrap().in_memory = if in_memory {
                vec![signet_format::Format::Pe, signet_format::Format::PowerShell]
            } else {
                Vec::new()
            };
            let before = signed().len();
            let first = sign_with_trailer(job, hello.len(), &[&hello[..5], &hello[5..]], sha(&one));
            let answer = send(first).await;
            assert_eq!(answer, (200, "Write-Host 'hello'\r\n+signed".to_owned()));
            assert_eq!(signed().len(), before + 1);
            // The same job and the same hash after the input: its kept result, not a
            // second signature.
            let again = sign_with_trailer(job, hello.len(), &[hello], sha(&one));
            assert_eq!(send(again).await, answer);
            assert_eq!(signed().len(), before + 1, "not signed again");
        }
        assert_eq!(signed()[signed().len() - 2..], ["<memory>", "input.ps1"]);

        let before = signed().len();
        for in_memory in [true, false] {
            signer.lock().unwrap().in_memory = if in_memory {
                vec![signet_format::Format::Pe, signet_format::Format::PowerShell]
            } else {
                Vec::new()
            };
            // Announced and not sent, or not a SHA-256: refused, nothing signed.
            let (status, body) = send(sign_with_trailer("62", hello.len(), &[hello], None)).await;
            assert_eq!(status, 400, "{body}");
            assert!(body.contains("as a trailer and sent none"), "{body}");
            let (status, body) =
                send(sign_with_trailer("63", hello.len(), &[hello], sha("ab"))).await;
            assert_eq!(status, 400, "{body}");
            assert!(body.contains(INPUT_SHA256_HEADER), "{body}");
            // A body longer or shorter than it declared: refused, nothing signed.
            for declared in [hello.len() - 1, hello.len() + 1] {
                let (status, body) =
                    send(sign_with_trailer("64", declared, &[hello], sha(&one))).await;
                assert_ne!(status, 200, "{declared}: {body}");
                assert!(
                    body.contains(&format!("{declared} bytes")),
                    "{declared}: {body}"
                );
            }
        }
        assert_eq!(signed().len(), before, "nothing signed");
    }

    #[test]
    fn a_job_id_from_the_host_is_taken_only_when_it_can_name_a_job() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (agent, _, _) = rt.block_on(stand_in::agent(dir.path()));
        assert_eq!(agent.job_id(Some("1234")), "1234");
        assert_eq!(agent.job_id(Some("job-7.a_b:c")), "job-7.a_b:c");
        assert_eq!(agent.job_id(None), "agent-1");
        assert_eq!(agent.job_id(Some("")), "agent-2");
        assert_eq!(agent.job_id(Some("a b")), "agent-3");
        assert_eq!(agent.job_id(Some("x\u{7f}")), "agent-4");
        assert_eq!(agent.job_id(Some(&"9".repeat(64))), "9".repeat(64));
        assert_eq!(agent.job_id(Some(&"9".repeat(65))), "agent-5");
    }
}
