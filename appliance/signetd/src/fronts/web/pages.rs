//! The web UI's HTTP handlers. Each checks the visitor through [`authorize`] (PVE
//! login, privilege, and for POSTs the CSRF token), calls a core command or a
//! read-only query, and renders a template.
//!
//! | route | needs | what |
//! |---|---|---|
//! | `GET /` | `Sys.Audit` | overview: verdict, the host's tokens (where, which VM, in the guest, PIN, certificate), agent, queue |
//! | `GET /events` | `Sys.Audit` | the overview's live part as server-sent events (`overview`) |
//! | `POST /login` | `Sys.Audit` (the ticket sent) | keeps a PVE ticket a PVE tab of another node handed over |
//! | `GET /jobs` | `Sys.Audit` | running and waiting jobs, recent ones |
//! | `GET /jobs/events` | `Sys.Audit` | its live part as server-sent events (`jobs`) |
//! | `POST /jobs/{id}/cancel` | `Sys.Modify` + CSRF | cancels a waiting job |
//! | `GET /tokens/{serial}/{attach,detach,reattach}` | `Sys.Modify` | asks to confirm the token action |
//! | `POST /tokens/{serial}/{attach,detach,reattach}` | `Sys.Modify` + CSRF | does it |
//! | `GET /enroll` | root@pam, `Sys.Modify` | the form to enroll a signing or build VM |
//! | `POST /enroll/preview` | root@pam, `Sys.Modify` + CSRF | the dry run: the exact change, to confirm |
//! | `POST /enroll` | root@pam, `Sys.Modify` + CSRF | makes the change |
//! | `GET /timeline` | `Sys.Audit` | the recovery timeline and the 24-hour chart (SVG) |
//! | `GET /timeline/events` | `Sys.Audit` | its live part as server-sent events (`timeline`) |
//! | `GET /audit?q=&page=&verify=full` | `Sys.Audit` | the audit log, searched and paged; chain status |
//! | `GET /audit/events?q=&page=` | `Sys.Audit` | that page's live part as server-sent events (`audit`) |
//! | `GET /audit/export` | `Sys.Audit` | the audit log as JSON lines |
//! | `GET /static/*` | — | the style sheet and the script |
//!
//! Enrolling sets a VM's `args` (`qm set --args`), which Proxmox VE allows only
//! root@pam, and adds grants to `signetd.toml`: only root@pam may enroll here
//! ([`authorize_enroll`]), as only root may over D-Bus.
//!
//! Every action goes through [`crate::services::operate`] (the same audited commands as D-Bus
//! and `signetctl`), as the PVE user who asked (`pve:USER@REALM`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::extract::{Path as UrlPath, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use signet_api::wire::{ErrorBody, ErrorCode, JobState};

use super::auth::{self, AuthError, Need};
use super::model::{self, Overview};
use super::{chart, Web};
use crate::adapters::queries::AuditRow;
use crate::services::operate::{EnrollReport, EnrollRequest, Operator};
use crate::services::reads::JobLine;

/// Audit records per page.
pub const AUDIT_PER_PAGE: u32 = 50;
/// Finished jobs the queue page lists.
pub const RECENT_JOBS: u32 = 50;
/// How long one event stream lives before the browser reconnects (and its login is
/// checked again).
pub const EVENT_STREAM_LIFETIME: Duration = Duration::from_secs(300);

const CSS: &str = include_str!("../../../templates/web/signet.css");
const JS: &str = include_str!("../../../templates/web/signet.js");

/// The web UI's routes over `web`.
pub fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/events", get(events))
        .route("/login", post(login))
        .route("/jobs", get(jobs))
        .route("/jobs/events", get(jobs_events))
        .route("/jobs/{id}/cancel", post(cancel))
        .route(
            "/tokens/{serial}/{action}",
            get(confirm_token).post(token_action),
        )
        .route("/enroll", get(enroll_form).post(enroll_apply))
        .route("/enroll/preview", post(enroll_preview))
        .route("/timeline", get(timeline))
        .route("/timeline/events", get(timeline_events))
        .route("/audit", get(audit))
        .route("/audit/events", get(audit_events))
        .route("/audit/export", get(export))
        .route(
            "/static/signet.css",
            get(|| async { static_file(CSS, "text/css") }),
        )
        .route(
            "/static/signet.js",
            get(|| async { static_file(JS, "text/javascript") }),
        )
        .fallback(|| async {
            problem(
                StatusCode::NOT_FOUND,
                "Not found",
                "There is no such page.".into(),
                None,
            )
        })
        .layer(axum::middleware::map_response_with_state(
            web.clone(),
            security_headers,
        ))
        .with_state(web)
}

/// Pages may be framed by PVE's UI (port 8006, or `frame_ancestors`) and nobody else.
async fn security_headers(State(web): State<Arc<Web>>, mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, web.csp().clone());
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

fn static_file(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// The visitor, once checked.
#[derive(Debug)]
pub struct Session {
    pub user: String,
    /// The CSRF token for this visitor's forms.
    pub csrf: String,
    /// The visitor may act (`Sys.Modify`), so the page shows the buttons.
    pub can_act: bool,
}

/// The page a refused or failed request gets.
#[derive(Debug)]
pub struct Problem(Box<Response>);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        *self.0
    }
}

#[derive(Template)]
#[template(path = "web/problem.html")]
struct ProblemPage<'a> {
    title: &'a str,
    message: &'a str,
    login: Option<&'a str>,
    /// The node, on the page that asks for a login (a framing PVE tab compares it).
    node: Option<&'a str>,
}

fn problem(status: StatusCode, title: &str, message: String, login: Option<String>) -> Problem {
    let page = ProblemPage {
        title,
        message: &message,
        login: login.as_deref(),
        node: None,
    };
    Problem(Box::new((status, render(&page)).into_response()))
}

/// The page for a visitor without a (valid) PVE login here: the link to PVE's login;
/// framed by a PVE tab, its script asks the tab for the login it has.
fn login_needed(web: &Web, headers: &HeaderMap, e: &AuthError) -> Problem {
    let login = login_url(headers);
    let message = e.to_string();
    let page = ProblemPage {
        title: "Log in to Proxmox VE",
        message: &message,
        login: Some(&login),
        node: Some(&web.node),
    };
    Problem(Box::new(
        (StatusCode::UNAUTHORIZED, render(&page)).into_response(),
    ))
}

fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering a page");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered; signetd's log says why",
            )
                .into_response()
        }
    }
}

/// Where the visitor logs in to PVE: the same host, port 8006.
fn login_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .map(|a| a.host().to_owned())
        .unwrap_or_else(|| "localhost".into());
    format!("https://{host}:8006/")
}

/// Checks the visitor: a PVE login (the `PVEAuthCookie`), the privilege `need` asks
/// for on this node, then for actions the CSRF token `csrf` sent with the form.
pub async fn authorize(
    web: &Web,
    headers: &HeaderMap,
    need: Need,
    csrf: Option<&str>,
) -> Result<Session, Problem> {
    // PVE's own cookie (a login on this host), else the one a PVE tab handed over.
    let cookies = || {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
    };
    let ticket = cookies()
        .find_map(auth::ticket_from_cookies)
        .or_else(|| cookies().find_map(|c| auth::cookie_named(c, auth::HANDED_COOKIE)));
    let Some(ticket) = ticket else {
        return Err(login_needed(web, headers, &AuthError::NotLoggedIn));
    };
    let path = auth::node_path(&web.node);
    let privileges = match web.auth.privileges(ticket, &path).await {
        Ok(p) => p,
        Err(e @ AuthError::NotLoggedIn) => return Err(login_needed(web, headers, &e)),
        Err(e @ AuthError::Unavailable(_)) => {
            return Err(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "The login cannot be checked",
                e.to_string(),
                None,
            ))
        }
    };
    let user = auth::ticket_user(ticket).unwrap_or_else(|| "(unknown user)".into());
    let Some(key) = web.csrf_key() else {
        return Err(problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Not available",
            "The web UI has no CSRF key; signetd's log says why.".into(),
            None,
        ));
    };
    if !privileges.has(need.privilege()) {
        return Err(forbidden(&user, need, &web.node));
    }
    if need == Need::Act && !csrf.is_some_and(|c| auth::csrf_ok(key, ticket, c)) {
        tracing::warn!(user, "a form without a valid CSRF token was refused");
        return Err(problem(
            StatusCode::FORBIDDEN,
            "The form has expired",
            "This form did not come from this page, or it is older than signetd's last start; reload the page and try again.".into(),
            None,
        ));
    }
    Ok(Session {
        csrf: auth::csrf_token(key, ticket),
        can_act: privileges.has(auth::ACT_PRIVILEGE),
        user,
    })
}

/// The header a hand-over must carry: a page of another origin cannot send it without
/// CORS's permission, which signetd never gives, so only signetd's own script logs in.
pub const LOGIN_HEADER: &str = "x-signet-login";

#[derive(Debug, Deserialize)]
struct LoginForm {
    #[serde(default)]
    ticket: String,
}

/// `POST /login`: a PVE ticket handed over by the "Signing" tab of a PVE UI on another
/// node (the browser has no PVE login for this node's address). The local PVE API
/// checks it as it checks the cookie; a ticket that may see this node is kept in
/// [`auth::HANDED_COOKIE`], for this origin only, partitioned under the framing page.
async fn login(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, Problem> {
    if headers.get(LOGIN_HEADER).is_none() {
        return Err(problem(
            StatusCode::FORBIDDEN,
            "Not from this page",
            "A login is handed over by this web UI's own script only.".into(),
            None,
        ));
    }
    let Some(ticket) = auth::encode_ticket(form.ticket.trim()) else {
        return Err(login_needed(&web, &headers, &AuthError::NotLoggedIn));
    };
    let path = auth::node_path(&web.node);
    match web.auth.privileges(&ticket, &path).await {
        Ok(p) if p.has(auth::READ_PRIVILEGE) => {}
        Ok(_) => {
            let user = auth::ticket_user(&ticket).unwrap_or_else(|| "(unknown user)".into());
            return Err(forbidden(&user, Need::Read, &web.node));
        }
        Err(e @ AuthError::NotLoggedIn) => return Err(login_needed(&web, &headers, &e)),
        Err(e @ AuthError::Unavailable(_)) => {
            return Err(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "The login cannot be checked",
                e.to_string(),
                None,
            ))
        }
    }
    tracing::info!(
        user = auth::ticket_user(&ticket).unwrap_or_default(),
        "a PVE login was handed over by a Signing tab"
    );
    let cookie = format!(
        "{}={ticket}; Path=/; Secure; HttpOnly; SameSite=None; Partitioned",
        auth::HANDED_COOKIE
    );
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response())
}

/// The refusal for a user without the privilege `need` asks for.
fn forbidden(user: &str, need: Need, node: &str) -> Problem {
    let path = auth::node_path(node);
    let privilege = need.privilege();
    problem(
        StatusCode::FORBIDDEN,
        "Not allowed",
        format!(
            "{user} needs the privilege {privilege} on {path} for this. An administrator grants it in Datacenter → Permissions (e.g. the role {} on {path}).",
            if need == Need::Read { "PVEAuditor" } else { "PVESysAdmin" }
        ),
        None,
    )
}

/// A page that leads to an action (a confirmation, a form): the visitor must be
/// allowed to act, though the page itself changes nothing.
async fn authorize_to_ask(web: &Web, headers: &HeaderMap) -> Result<Session, Problem> {
    let s = authorize(web, headers, Need::Read, None).await?;
    if !s.can_act {
        return Err(forbidden(&s.user, Need::Act, &web.node));
    }
    Ok(s)
}

/// The only PVE user who may enroll a VM: PVE allows `args` to root@pam alone.
pub const ENROLL_USER: &str = "root@pam";

/// [`authorize`] for enrolling: the visitor must be root@pam (checked before the form's
/// CSRF token, so the refusal says why), then as `need` asks. A refusal is audited.
async fn authorize_enroll(
    web: &Web,
    headers: &HeaderMap,
    need: Need,
    csrf: Option<&str>,
) -> Result<Session, Problem> {
    let s = authorize(web, headers, Need::Read, None).await?;
    if s.user != ENROLL_USER {
        let message = format!(
            "{} may not enroll a VM: enrolling sets the VM's args (qm set --args), which Proxmox VE allows only root@pam, and adds grants to signetd.toml. Log in to Proxmox VE as root@pam to enroll; {} may still attach, detach and cancel with Sys.Modify.",
            s.user, s.user
        );
        let e = ErrorBody::new(ErrorCode::Forbidden, message.clone());
        web.daemon
            .job_service()
            .refuse(&format!("pve:{}", s.user), "web", None, None, &e);
        return Err(problem(StatusCode::FORBIDDEN, "Not allowed", message, None));
    }
    match (need, csrf) {
        (Need::Read, _) => authorize_to_ask(web, headers).await,
        (Need::Act, csrf) => authorize(web, headers, Need::Act, csrf).await,
    }
}

/// The navigation bar's facts.
#[derive(Debug)]
struct Nav<'a> {
    active: &'a str,
    node: &'a str,
    user: &'a str,
}

#[derive(Template)]
#[template(path = "web/overview.html")]
struct OverviewPage<'a> {
    nav: Nav<'a>,
    live: &'a str,
}

#[derive(Template)]
#[template(path = "web/overview_live.html")]
struct LiveFragment<'a> {
    o: &'a Overview,
    /// The visitor may act: the token actions are offered.
    can_act: bool,
}

/// The overview's live part, as the page and the event stream carry it, for a visitor
/// who may act (`can_act`) or not.
pub fn live_fragment(o: &Overview, can_act: bool) -> String {
    LiveFragment { o, can_act }.render().unwrap_or_default()
}

async fn overview(State(web): State<Arc<Web>>, headers: HeaderMap) -> Result<Response, Problem> {
    let s = authorize(&web, &headers, Need::Read, None).await?;
    let o = web.live.refresh(&web.daemon).await;
    let live = live_fragment(&o, s.can_act);
    Ok(render(&OverviewPage {
        nav: Nav {
            active: "overview",
            node: &web.node,
            user: &s.user,
        },
        live: &live,
    }))
}

async fn events(State(web): State<Arc<Web>>, headers: HeaderMap) -> Result<Response, Problem> {
    let can_act = authorize(&web, &headers, Need::Read, None).await?.can_act;
    let rx = web.live.subscribe();
    // Read now, so the first event is current.
    web.live.refresh(&web.daemon).await;
    let deadline = tokio::time::Instant::now() + EVENT_STREAM_LIFETIME;
    let closing = web.closing();
    let stream =
        futures_util::stream::unfold((rx, closing), move |(mut rx, mut closing)| async move {
            tokio::select! {
                changed = tokio::time::timeout_at(deadline, rx.changed()) => changed.ok()?.ok()?,
                _ = closing.wait_for(|c| *c) => return None,
            }
            let o = rx.borrow_and_update().clone()?;
            let event = Event::default()
                .event("overview")
                .data(live_fragment(&o, can_act));
            Some((Ok::<_, Infallible>(event), (rx, closing)))
        });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// A job waiting or running, as the queue page lists it.
#[derive(Debug)]
struct ActiveLine {
    id: String,
    state: &'static str,
    caller: String,
    profile: String,
    file: String,
    position: String,
    age: String,
    cancellable: bool,
}

/// A job that ended.
#[derive(Debug)]
struct RecentLine {
    id: String,
    caller: String,
    profile: String,
    state: &'static str,
    file: String,
    finished: String,
    error: String,
}

#[derive(Template)]
#[template(path = "web/jobs.html")]
struct JobsPage<'a> {
    nav: Nav<'a>,
    live: &'a str,
    notice: Option<String>,
}

#[derive(Template)]
#[template(path = "web/jobs_live.html")]
struct JobsLive<'a> {
    active: Vec<ActiveLine>,
    recent: Vec<RecentLine>,
    csrf: &'a str,
    can_act: bool,
}

#[derive(Debug, Deserialize)]
struct JobsQuery {
    cancelled: Option<String>,
}

/// The queue page's live part, read now, with the cancel buttons for a visitor who
/// may act (`can_act`, forms carrying `csrf`).
async fn jobs_fragment(web: &Web, csrf: &str, can_act: bool) -> Result<String, Problem> {
    let board = web
        .daemon
        .reads()
        .board(u64::from(RECENT_JOBS))
        .await
        .map_err(internal)?;
    let now = board.now_ms;
    // At the agent first, then waiting in the order they will run, then being sent.
    let (receiving, at_agent): (Vec<&JobLine>, Vec<&JobLine>) = board
        .running
        .iter()
        .partition(|l| l.row.state == JobState::Receiving);
    let active = at_agent
        .into_iter()
        .chain(board.queued.iter())
        .chain(receiving)
        .map(|JobLine { row, view }| ActiveLine {
            id: row.id.clone(),
            state: row.state.as_str(),
            caller: row.caller.clone(),
            profile: row.profile.clone(),
            file: row.filename.clone().unwrap_or_else(|| "—".into()),
            position: match (row.state, view.position) {
                (JobState::Running, _) => "at the agent".into(),
                (_, Some(0)) => "next".into(),
                (_, Some(p)) => format!("{p} before it"),
                (_, None) => "—".into(),
            },
            age: model::age(now, row.created_ms),
            cancellable: row.state == JobState::Queued,
        })
        .collect();
    let recent = board
        .recent
        .iter()
        .map(|JobLine { row, .. }| RecentLine {
            id: row.id.clone(),
            caller: row.caller.clone(),
            profile: row.profile.clone(),
            state: row.state.as_str(),
            file: row.filename.clone().unwrap_or_else(|| "—".into()),
            finished: row.finished_ms.map(model::time_ms).unwrap_or_default(),
            error: row
                .error
                .as_ref()
                .map(|e| e.code.as_str().to_owned())
                .unwrap_or_default(),
        })
        .collect();
    JobsLive {
        active,
        recent,
        csrf,
        can_act,
    }
    .render()
    .map_err(internal)
}

async fn jobs(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Query(q): Query<JobsQuery>,
) -> Result<Response, Problem> {
    let s = authorize(&web, &headers, Need::Read, None).await?;
    let live = jobs_fragment(&web, &s.csrf, s.can_act).await?;
    Ok(render(&JobsPage {
        nav: Nav {
            active: "jobs",
            node: &web.node,
            user: &s.user,
        },
        live: &live,
        notice: q
            .cancelled
            .filter(|id| id.chars().all(|c| c.is_ascii_digit()))
            .map(|id| format!("Job {id} was cancelled.")),
    }))
}

/// The queue page's live part again whenever it changes: jobs queued, started, ended.
async fn jobs_events(State(web): State<Arc<Web>>, headers: HeaderMap) -> Result<Response, Problem> {
    let s = authorize(&web, &headers, Need::Read, None).await?;
    let (csrf, can_act) = (Arc::<str>::from(s.csrf), s.can_act);
    let stream = super::live::polled(web, "jobs", EVENT_STREAM_LIFETIME, move |web| {
        let csrf = csrf.clone();
        async move { jobs_fragment(&web, &csrf, can_act).await.ok() }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[derive(Debug, Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn cancel(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Problem> {
    let s = authorize(&web, &headers, Need::Act, Some(&form.csrf)).await?;
    match web.daemon.cancel_by(&Operator::pve(&s.user), &id) {
        Ok(_) => {
            tracing::info!(job = %id, by = %s.user, "cancelled from the web UI");
            // Watchers of the overview see the shorter queue now; the answer does not
            // wait for the agent's health.
            let w = web.clone();
            tokio::spawn(async move { w.live.refresh(&w.daemon).await });
            Ok(Redirect::to(&format!("/jobs?cancelled={id}")).into_response())
        }
        Err(e) => Err(refused("The job was not cancelled", e)),
    }
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    page: Option<u64>,
    /// `full`: walk every record now.
    #[serde(default)]
    verify: Option<String>,
}

#[derive(Template)]
#[template(path = "web/audit.html")]
struct AuditPageT<'a> {
    nav: Nav<'a>,
    q: &'a str,
    /// The live part's event stream, for the same search and page.
    events: String,
    live: &'a str,
}

#[derive(Template)]
#[template(path = "web/audit_live.html")]
struct AuditLive<'a> {
    q: &'a str,
    rows: Vec<AuditRow>,
    total: u64,
    page: u64,
    pages: u64,
    prev: Option<String>,
    next: Option<String>,
    chain_ok: bool,
    chain: String,
    /// How the chain was walked for this page.
    chain_walk: String,
    /// Only the records added since the last whole walk were checked.
    chain_partial: bool,
    /// "N records", for the count line.
    records: String,
}

/// How often the audit page walks the whole chain although nothing was changed or
/// deleted since the last walk (it walks only the records appended in between).
pub const WHOLE_WALK_EVERY: Duration = Duration::from_secs(600);

/// The audit page's last walk of the chain.
#[derive(Debug, Clone)]
pub struct ChainCache {
    pub mark: crate::adapters::audit::Mark,
    /// When the whole chain was last walked (ms since the epoch).
    pub whole_at_ms: u64,
    /// How many records it had then.
    pub whole_records: u64,
}

/// Checks the chain for the audit page: on from the last walk's mark, or whole when
/// there is none, it is older than [`WHOLE_WALK_EVERY`], or `whole` is asked for.
async fn check_chain(
    web: &Web,
    whole: bool,
) -> Result<
    Result<(crate::adapters::audit::Verified, String, bool), crate::adapters::audit::AuditError>,
    Problem,
> {
    let now = crate::adapters::store::now_ms();
    let fresh = web
        .chain
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .filter(|c| {
            !whole && now.saturating_sub(c.whole_at_ms) < WHOLE_WALK_EVERY.as_millis() as u64
        });
    let walked = web
        .daemon
        .reads()
        .audit_verify_after(fresh.as_ref().map(|c| c.mark.clone()))
        .await
        .map_err(internal)?;
    let mut cache = web.chain.lock().unwrap_or_else(|p| p.into_inner());
    Ok(match walked {
        Ok((v, mark, walk)) => {
            let (whole_at_ms, whole_records, words, partial) = match (walk, fresh) {
                (crate::adapters::audit::Walk::Appended(_), Some(c)) => {
                    // Counted from the whole walk, not from the last look: the page
                    // (live, it looks every few seconds) says what that walk left out.
                    let n = v.records.saturating_sub(c.whole_records);
                    let since = if n == 0 {
                        "none was added since".to_owned()
                    } else {
                        format!(
                            "the {} added since then {} checked too",
                            model::count(n, "record"),
                            if n == 1 { "was" } else { "were" }
                        )
                    };
                    (
                        c.whole_at_ms,
                        c.whole_records,
                        format!(
                            "Every record was checked at {} UTC; {since}.",
                            model::time_ms(c.whole_at_ms)
                        ),
                        true,
                    )
                }
                _ => (
                    now,
                    v.records,
                    "Every record was checked now.".to_owned(),
                    false,
                ),
            };
            *cache = Some(ChainCache {
                mark,
                whole_at_ms,
                whole_records,
            });
            Ok((v, words, partial))
        }
        Err(e) => {
            *cache = None;
            Err(e)
        }
    })
}

/// The audit page's live part for the search `q` and `page` (from 1), its chain
/// walked on from the last walk, or whole when `whole`.
async fn audit_fragment(web: &Web, q: &str, page: u64, whole: bool) -> Result<String, Problem> {
    let page = page.max(1);
    let found = web
        .daemon
        .reads()
        .audit_page(q, (page - 1) * u64::from(AUDIT_PER_PAGE), AUDIT_PER_PAGE)
        .await
        .map_err(internal)?;
    let verified = check_chain(web, whole).await?;
    let pages = found.total.div_ceil(u64::from(AUDIT_PER_PAGE)).max(1);
    let link = |p: u64| format!("/audit?{}", audit_query(q, p));
    let (chain_ok, chain, chain_walk, chain_partial) = match verified {
        Ok((v, walk, partial)) => (
            true,
            format!(
                "The hash chain is intact: {}, head {}.",
                model::count(v.records, "record"),
                v.head
            ),
            walk,
            partial,
        ),
        Err(e) => (
            false,
            format!("The hash chain is broken: {e}."),
            "Every record was checked now.".to_owned(),
            false,
        ),
    };
    AuditLive {
        q,
        total: found.total,
        rows: found.rows,
        page,
        pages,
        prev: (page > 1).then(|| link(page - 1)),
        next: (page < pages).then(|| link(page + 1)),
        chain_ok,
        chain,
        chain_partial,
        chain_walk,
        records: model::count(found.total, "record"),
    }
    .render()
    .map_err(internal)
}

/// `q=…&page=…`, encoded.
fn audit_query(q: &str, page: u64) -> String {
    serde_urlencoded::to_string([("q", q), ("page", &page.to_string())]).unwrap_or_default()
}

async fn audit(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Result<Response, Problem> {
    let s = authorize(&web, &headers, Need::Read, None).await?;
    let page = q.page.unwrap_or(1).max(1);
    let whole = q.verify.as_deref() == Some("full");
    let live = audit_fragment(&web, &q.q, page, whole).await?;
    Ok(render(&AuditPageT {
        nav: Nav {
            active: "audit",
            node: &web.node,
            user: &s.user,
        },
        q: &q.q,
        events: format!("/audit/events?{}", audit_query(&q.q, page)),
        live: &live,
    }))
}

/// The audit page's live part again whenever it changes (new records, for the same
/// search and page): the search field and the reader's place stay.
async fn audit_events(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Result<Response, Problem> {
    authorize(&web, &headers, Need::Read, None).await?;
    let (search, page) = (Arc::<str>::from(q.q), q.page.unwrap_or(1).max(1));
    let stream = super::live::polled(web, "audit", EVENT_STREAM_LIFETIME, move |web| {
        let search = search.clone();
        async move { audit_fragment(&web, &search, page, false).await.ok() }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn export(State(web): State<Arc<Web>>, headers: HeaderMap) -> Result<Response, Problem> {
    authorize(&web, &headers, Need::Read, None).await?;
    let body = web.daemon.reads().audit_export().await.map_err(internal)?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"signet-audit.jsonl\"",
            ),
        ],
        body,
    )
        .into_response())
}

fn internal(e: impl std::fmt::Display) -> Problem {
    tracing::error!(error = %e, "the web UI could not read the job database");
    problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something failed",
        "The job database could not be read; signetd's log says why.".into(),
        None,
    )
}

/// A token action an operator may take from the overview.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenAction {
    Attach,
    Detach,
    Reattach,
}

impl TokenAction {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "attach" => TokenAction::Attach,
            "detach" => TokenAction::Detach,
            "reattach" => TokenAction::Reattach,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            TokenAction::Attach => "attach",
            TokenAction::Detach => "detach",
            TokenAction::Reattach => "reattach",
        }
    }

    /// The question and what will happen, for the confirmation.
    fn ask(self, t: &signet_api::wire::HostToken) -> (String, String, &'static str) {
        let serial = &t.serial;
        let vm = t
            .assigned_vm
            .map_or_else(|| "its signing VM".to_owned(), |v| format!("VM {v}"));
        match self {
            TokenAction::Attach => (
                format!("Attach token {serial} to {vm}?"),
                format!("Signet passes the token from the host into {vm}, its signing VM; the agent there logs in with the PIN from the host."),
                "Attach",
            ),
            TokenAction::Detach => (
                format!("Detach token {serial} from {vm}?"),
                format!("The token leaves {vm} and stays on the host until you attach it again. Jobs wait in the queue meanwhile; nothing is signed."),
                "Detach",
            ),
            TokenAction::Reattach => (
                format!("Re-attach token {serial}?"),
                format!("Signet takes the token out of {vm} and passes it in again, as after a hang in the guest; a job at the agent is tried again."),
                "Re-attach",
            ),
        }
    }

    fn done(self) -> &'static str {
        match self {
            TokenAction::Attach => "attached",
            TokenAction::Detach => "detached",
            TokenAction::Reattach => "re-attached",
        }
    }
}

#[derive(Template)]
#[template(path = "web/confirm.html")]
struct ConfirmPage<'a> {
    nav: Nav<'a>,
    question: &'a str,
    explain: &'a str,
    /// Where things stand now.
    now: &'a str,
    action: &'a str,
    button: &'a str,
    csrf: &'a str,
    /// Hidden fields carried to the action.
    fields: Vec<(&'static str, String)>,
    back: &'a str,
}

#[derive(Template)]
#[template(path = "web/done.html")]
struct DonePage<'a> {
    nav: Nav<'a>,
    title: &'a str,
    lines: Vec<String>,
    /// A block shown as written (what was added to a file), with its title.
    block: Option<(String, String)>,
    back: &'a str,
    back_label: &'a str,
}

fn no_such_page() -> Problem {
    problem(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page.".into(),
        None,
    )
}

/// The page of a refused or failed action: its error, told as the wire's [`ErrorBody`].
fn refused(title: &str, e: impl Into<ErrorBody>) -> Problem {
    let e: ErrorBody = e.into();
    problem(
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
        title,
        e.message,
        None,
    )
}

/// The token `serial` as the daemon knows it, or the refusal naming the known ones.
fn find_token(web: &Web, serial: &str) -> Result<signet_api::wire::HostToken, Problem> {
    let report = web.daemon.tokens();
    report
        .tokens
        .iter()
        .find(|t| t.serial == serial)
        .cloned()
        .ok_or_else(|| {
            let known: Vec<&str> = report.tokens.iter().map(|t| t.serial.as_str()).collect();
            problem(
                StatusCode::NOT_FOUND,
                "No such token",
                format!(
                    "No token with serial {serial} is plugged into this host or assigned in signetd.toml (tokens known: {}).{}",
                    if known.is_empty() { "none".to_owned() } else { known.join(", ") },
                    report.detail.map(|d| format!(" {d}")).unwrap_or_default()
                ),
                None,
            )
        })
}

async fn confirm_token(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    UrlPath((serial, action)): UrlPath<(String, String)>,
) -> Result<Response, Problem> {
    let action = TokenAction::parse(&action).ok_or_else(no_such_page)?;
    let s = authorize_to_ask(&web, &headers).await?;
    let t = find_token(&web, &serial)?;
    let (question, explain, button) = action.ask(&t);
    let path = format!("/tokens/{}/{}", urlencode(&serial), action.name());
    Ok(render(&ConfirmPage {
        nav: Nav {
            active: "overview",
            node: &web.node,
            user: &s.user,
        },
        question: &question,
        explain: &explain,
        now: &format!("Now: {} — {}", t.place.words(), t.last_change.reason),
        action: &path,
        button,
        csrf: &s.csrf,
        fields: Vec::new(),
        back: "/",
    }))
}

async fn token_action(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    UrlPath((serial, action)): UrlPath<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Problem> {
    let action = TokenAction::parse(&action).ok_or_else(no_such_page)?;
    let s = authorize(&web, &headers, Need::Act, Some(&form.csrf)).await?;
    let op = Operator::pve(&s.user);
    let r = match action {
        TokenAction::Attach => web.daemon.attach_by(&op, &serial, None).await,
        TokenAction::Detach => web.daemon.detach_by(&op, &serial).await,
        TokenAction::Reattach => web.daemon.reattach_by(&op, &serial).await,
    };
    let w = web.clone();
    tokio::spawn(async move { w.live.refresh(&w.daemon).await });
    let t = r.map_err(|e| refused(&format!("Token {serial} was not {}", action.done()), e))?;
    Ok(render(&DonePage {
        nav: Nav {
            active: "overview",
            node: &web.node,
            user: &s.user,
        },
        title: &format!("Token {serial} {}", action.done()),
        lines: vec![
            format!("Now: {} — {}", t.place.words(), t.last_change.reason),
            format!("The action is in the audit log under pve:{}.", s.user),
        ],
        block: None,
        back: "/",
        back_label: "Back to the overview",
    }))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The enroll form's fields.
#[derive(Debug, Default, Deserialize)]
struct EnrollForm {
    #[serde(default)]
    csrf: String,
    /// `signing-vm` or `build-vm`.
    #[serde(default)]
    role: String,
    #[serde(default)]
    vmid: String,
    #[serde(default)]
    serial: String,
    /// Profiles for a build VM, separated by commas or spaces; empty: the default.
    #[serde(default)]
    profiles: String,
}

impl EnrollForm {
    fn request(&self) -> Result<EnrollRequest, Problem> {
        let bad = |m: &str| {
            problem(
                StatusCode::BAD_REQUEST,
                "The form is not complete",
                m.to_owned(),
                None,
            )
        };
        let vmid: u32 = self
            .vmid
            .trim()
            .parse()
            .ok()
            .filter(|v| *v >= 100)
            .ok_or_else(|| bad("Give the VM's id, a number from 100 (qm list shows them)."))?;
        match self.role.as_str() {
            "signing-vm" => {
                let serial = self.serial.trim();
                if serial.is_empty() {
                    return Err(bad("Choose the token the signing VM holds."));
                }
                Ok(EnrollRequest::SigningVm {
                    vmid,
                    serial: serial.to_owned(),
                })
            }
            "build-vm" => Ok(EnrollRequest::BuildVm {
                vmid,
                profiles: self
                    .profiles
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect(),
            }),
            _ => Err(bad(
                "Choose whether the VM signs (signing VM) or asks for signatures (build VM).",
            )),
        }
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("role", self.role.clone()),
            ("vmid", self.vmid.trim().to_owned()),
            ("serial", self.serial.trim().to_owned()),
            ("profiles", self.profiles.trim().to_owned()),
        ]
    }
}

#[derive(Template)]
#[template(path = "web/enroll.html")]
struct EnrollPage<'a> {
    nav: Nav<'a>,
    csrf: &'a str,
    /// Tokens plugged in: serial and what it is.
    tokens: Vec<(String, String)>,
    profiles: String,
    default_profile: &'a str,
}

async fn enroll_form(State(web): State<Arc<Web>>, headers: HeaderMap) -> Result<Response, Problem> {
    let s = authorize_enroll(&web, &headers, Need::Read, None).await?;
    let tokens = web
        .daemon
        .tokens()
        .tokens
        .into_iter()
        .filter_map(|t| {
            let port = t.host_port.clone()?;
            Some((
                t.serial.clone(),
                format!(
                    "{} ({}, port {port})",
                    t.serial,
                    t.model
                        .clone()
                        .unwrap_or_else(|| "smart-card device".into())
                ),
            ))
        })
        .collect();
    let cfg = web.daemon.config();
    Ok(render(&EnrollPage {
        nav: Nav {
            active: "enroll",
            node: &web.node,
            user: &s.user,
        },
        csrf: &s.csrf,
        tokens,
        profiles: cfg.profiles.keys().cloned().collect::<Vec<_>>().join(", "),
        default_profile: &cfg.default_profile,
    }))
}

#[derive(Template)]
#[template(path = "web/enroll_preview.html")]
struct EnrollPreviewPage<'a> {
    nav: Nav<'a>,
    r: &'a EnrollReport,
    csrf: &'a str,
    fields: Vec<(&'static str, String)>,
}

async fn enroll_preview(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Form(form): Form<EnrollForm>,
) -> Result<Response, Problem> {
    let s = authorize_enroll(&web, &headers, Need::Act, Some(&form.csrf)).await?;
    let req = form.request()?;
    let report = web
        .daemon
        .enroll(&Operator::pve(&s.user), &req, false)
        .await
        .map_err(|e| refused(&format!("VM {} cannot be enrolled", req.vmid()), e))?;
    Ok(render(&EnrollPreviewPage {
        nav: Nav {
            active: "enroll",
            node: &web.node,
            user: &s.user,
        },
        r: &report,
        csrf: &s.csrf,
        fields: form.fields(),
    }))
}

async fn enroll_apply(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Form(form): Form<EnrollForm>,
) -> Result<Response, Problem> {
    let s = authorize_enroll(&web, &headers, Need::Act, Some(&form.csrf)).await?;
    let req = form.request()?;
    let r = web
        .daemon
        .enroll(&Operator::pve(&s.user), &req, true)
        .await
        .map_err(|e| refused(&format!("VM {} was not enrolled", req.vmid()), e))?;
    let mut lines = Vec::new();
    match &r.qm_command {
        Some(c) => lines.push(format!("Ran: {c}")),
        None => lines.push(format!("VM {} had Signet's settings already.", r.vmid)),
    }
    lines.extend(r.notes.iter().cloned());
    lines.push(format!(
        "The action is in the audit log under pve:{}.",
        s.user
    ));
    Ok(render(&DonePage {
        nav: Nav {
            active: "enroll",
            node: &web.node,
            user: &s.user,
        },
        title: &format!("VM {} enrolled as {}", r.vmid, r.role),
        lines,
        block: r
            .config_stanza
            .as_ref()
            .map(|s| (format!("Added to {}:", r.config_path), s.clone())),
        back: "/enroll",
        back_label: "Enroll another VM",
    }))
}

/// How far back the timeline's table reaches (the chart shows the last 24 hours).
pub const TIMELINE_TABLE_MS: u64 = 7 * 24 * 3_600_000;
/// The most entries the table lists.
pub const TIMELINE_ROWS: usize = 200;

/// One timeline entry as the table shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineLine {
    pub time: String,
    /// `seen` or `done`.
    pub kind: &'static str,
    pub event: String,
    pub detail: String,
    pub duration: String,
}

/// The timeline's event in words, and whether it was seen or done.
pub fn event_words(event: &str) -> (&'static str, String) {
    let (kind, words) = match event {
        "agent_unreachable" => ("seen", "Agent unreachable"),
        "agent_back" => ("seen", "Agent back"),
        "token_lost" => ("seen", "Token lost"),
        "token_back" => ("seen", "Token back"),
        "pin_rejected" => ("seen", "PIN rejected"),
        "first_job_signed" => ("seen", "First job signed"),
        "logged_in" => ("done", "Logged in"),
        "pin_delivered" => ("done", "PIN given to the agent"),
        "shutdown_drain" => ("done", "Host shutting down: draining"),
        "shutdown_released" => ("done", "Shutdown let go"),
        "recovery_started" => ("seen", "Recovery started"),
        "recovery_step" => ("done", "Recovery step"),
        "recovery_step_skipped" => ("done", "Recovery step skipped"),
        "recovery_step_failed" => ("seen", "Recovery step failed"),
        "recovery_exhausted" => ("seen", "Every step tried: operator action needed"),
        "recovery_stopped" => ("seen", "Recovery stopped"),
        "recovered" => ("seen", "Recovered"),
        "vm_reset" => ("seen", "Signing VM reset"),
        "vm_down" => ("seen", "Signing VM down"),
        other => return ("done", other.replace('_', " ")),
    };
    (kind, words.to_owned())
}

#[derive(Template)]
#[template(path = "web/timeline_live.html")]
struct TimelineLive {
    svg: String,
    token_available: String,
    agent_available: String,
    signed: usize,
    median: String,
    rows: Vec<TimelineLine>,
}

#[derive(Template)]
#[template(path = "web/timeline.html")]
struct TimelinePage<'a> {
    nav: Nav<'a>,
    live: &'a str,
}

/// The timeline's live part, read from the database now.
async fn timeline_fragment(web: &Web) -> Result<String, Problem> {
    let now = crate::adapters::store::now_ms();
    let reads = web.daemon.reads();
    let entries = reads
        .timeline_since(now.saturating_sub(TIMELINE_TABLE_MS))
        .await
        .map_err(internal)?;
    let signed = reads
        .signed_since_ms(now.saturating_sub(chart::WINDOW_MS))
        .await
        .map_err(internal)?;
    let points: Vec<chart::Point> = entries
        .iter()
        .map(|e| chart::Point {
            time_ms: e.time_ms,
            event: e.event.clone(),
            duration_ms: e.duration_ms,
        })
        .collect();
    let data = chart::Data {
        to_ms: now,
        outages: chart::outages(&points),
        signed: signed
            .into_iter()
            .map(|(job, finished_ms, latency_ms)| chart::Signed {
                job,
                finished_ms,
                latency_ms,
            })
            .collect(),
    };
    let mut latencies: Vec<u64> = data.signed.iter().map(|j| j.latency_ms).collect();
    latencies.sort_unstable();
    let rows = entries
        .iter()
        .rev()
        .take(TIMELINE_ROWS)
        .map(|e| {
            let (kind, event) = event_words(&e.event);
            TimelineLine {
                time: model::time_ms(e.time_ms),
                kind,
                event,
                detail: e.detail.clone(),
                duration: match (e.event.as_str(), e.duration_ms) {
                    ("first_job_signed", Some(d)) => {
                        format!("{} after the return", chart::duration(d))
                    }
                    (_, Some(d)) => format!("away {}", chart::duration(d)),
                    (_, None) => String::new(),
                },
            }
        })
        .collect();
    let pct = |kinds: &[chart::Kind]| format!("{:.1} %", chart::availability(&data, kinds));
    Ok(TimelineLive {
        svg: chart::svg(&data),
        token_available: pct(&[chart::Kind::Token]),
        agent_available: pct(&[chart::Kind::Agent]),
        signed: latencies.len(),
        median: latencies
            .get(latencies.len() / 2)
            .map_or_else(|| "—".to_owned(), |m| chart::duration(*m)),
        rows,
    }
    .render()
    .unwrap_or_default())
}

async fn timeline(State(web): State<Arc<Web>>, headers: HeaderMap) -> Result<Response, Problem> {
    let s = authorize(&web, &headers, Need::Read, None).await?;
    let live = timeline_fragment(&web).await?;
    Ok(render(&TimelinePage {
        nav: Nav {
            active: "timeline",
            node: &web.node,
            user: &s.user,
        },
        live: &live,
    }))
}

/// The timeline's live part again whenever a timeline entry is written or a job ends.
async fn timeline_events(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    authorize(&web, &headers, Need::Read, None).await?;
    let steps = web.daemon.timeline().subscribe();
    let finished = web.daemon.job_finished();
    let deadline = tokio::time::Instant::now() + EVENT_STREAM_LIFETIME;
    let closing = web.closing();
    let stream = futures_util::stream::unfold(
        (web, steps, finished, closing),
        move |(web, mut steps, mut finished, mut closing)| async move {
            use tokio::sync::broadcast::error::RecvError;
            tokio::select! {
                r = tokio::time::timeout_at(deadline, steps.recv()) => {
                    if matches!(r, Err(_) | Ok(Err(RecvError::Closed))) { return None; }
                }
                r = tokio::time::timeout_at(deadline, finished.recv()) => {
                    if matches!(r, Err(_) | Ok(Err(RecvError::Closed))) { return None; }
                }
                _ = closing.wait_for(|c| *c) => return None,
            }
            // One page for a burst of entries and ended jobs.
            while steps.try_recv().is_ok() || finished.try_recv().is_ok() {}
            let html = timeline_fragment(&web).await.ok()?;
            let event = Event::default().event("timeline").data(html);
            Some((Ok::<_, Infallible>(event), (web, steps, finished, closing)))
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
