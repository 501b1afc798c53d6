//! The web UI's HTTP handlers. Each checks the visitor through [`authorize`] (PVE
//! login, privilege, and for POSTs the CSRF token), calls a core command or a
//! read-only query, and renders a template.
//!
//! | route | needs | what |
//! |---|---|---|
//! | `GET /` | `Sys.Audit` | overview: verdict, agent, token, PIN, certificates, queue |
//! | `GET /events` | `Sys.Audit` | the overview's live part as server-sent events (`overview`) |
//! | `GET /jobs` | `Sys.Audit` | running and waiting jobs, recent ones |
//! | `POST /jobs/{id}/cancel` | `Sys.Modify` + CSRF | cancels a waiting job |
//! | `GET /audit?q=&page=` | `Sys.Audit` | the audit log, searched and paged; chain status |
//! | `GET /audit/export` | `Sys.Audit` | the audit log as JSON lines |
//! | `GET /static/*` | — | the style sheet and the script |

use std::convert::Infallible;
use std::path::Path;
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
use signet_protocol::wire::JobState;

use super::auth::{self, AuthError, Need};
use super::model::{self, Overview};
use super::query::{self, AuditRow, FinishedJob};
use super::Web;

/// Audit records per page.
pub const AUDIT_PER_PAGE: u32 = 50;
/// Finished jobs the queue page lists.
pub const RECENT_JOBS: u32 = 50;
/// How long one event stream lives before the browser reconnects (and its login is
/// checked again).
pub const EVENT_STREAM_LIFETIME: Duration = Duration::from_secs(300);

const CSS: &str = include_str!("../../templates/web/signet.css");
const JS: &str = include_str!("../../templates/web/signet.js");

/// The web UI's routes over `web`.
pub fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/events", get(events))
        .route("/jobs", get(jobs))
        .route("/jobs/{id}/cancel", post(cancel))
        .route("/audit", get(audit))
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
pub struct Problem(Response);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        self.0
    }
}

#[derive(Template)]
#[template(path = "web/problem.html")]
struct ProblemPage<'a> {
    title: &'a str,
    message: &'a str,
    login: Option<&'a str>,
}

fn problem(status: StatusCode, title: &str, message: String, login: Option<String>) -> Problem {
    let page = ProblemPage {
        title,
        message: &message,
        login: login.as_deref(),
    };
    Problem((status, render(&page)).into_response())
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
    let ticket = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(auth::ticket_from_cookies);
    let Some(ticket) = ticket else {
        return Err(problem(
            StatusCode::UNAUTHORIZED,
            "Log in to Proxmox VE",
            AuthError::NotLoggedIn.to_string(),
            Some(login_url(headers)),
        ));
    };
    let path = auth::node_path(&web.node);
    let privileges = match web.auth.privileges(ticket, &path).await {
        Ok(p) => p,
        Err(e @ AuthError::NotLoggedIn) => {
            return Err(problem(
                StatusCode::UNAUTHORIZED,
                "Log in to Proxmox VE",
                e.to_string(),
                Some(login_url(headers)),
            ))
        }
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
    let privilege = need.privilege();
    if !privileges.has(privilege) {
        return Err(problem(
            StatusCode::FORBIDDEN,
            "Not allowed",
            format!(
                "{user} needs the privilege {privilege} on {path} for this. An administrator grants it in Datacenter → Permissions (e.g. the role {} on {path}).",
                if need == Need::Read { "PVEAuditor" } else { "PVESysAdmin" }
            ),
            None,
        ));
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
}

/// The overview's live part, as the page and the event stream carry it.
pub fn live_fragment(o: &Overview) -> String {
    LiveFragment { o }.render().unwrap_or_default()
}

async fn overview(State(web): State<Arc<Web>>, headers: HeaderMap) -> Result<Response, Problem> {
    let s = authorize(&web, &headers, Need::Read, None).await?;
    let o = web.live.refresh(&web.daemon).await;
    let live = live_fragment(&o);
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
    authorize(&web, &headers, Need::Read, None).await?;
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
            let event = Event::default().event("overview").data(live_fragment(&o));
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
    job: FinishedJob,
    file: String,
    finished: String,
    error: String,
}

#[derive(Template)]
#[template(path = "web/jobs.html")]
struct JobsPage<'a> {
    nav: Nav<'a>,
    active: Vec<ActiveLine>,
    recent: Vec<RecentLine>,
    csrf: &'a str,
    can_act: bool,
    notice: Option<String>,
}

#[derive(Debug, Deserialize)]
struct JobsQuery {
    cancelled: Option<String>,
}

async fn jobs(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Query(q): Query<JobsQuery>,
) -> Result<Response, Problem> {
    let s = authorize(&web, &headers, Need::Read, None).await?;
    let store = web.daemon.store();
    let mut rows = Vec::new();
    for state in [JobState::Running, JobState::Queued, JobState::Receiving] {
        rows.extend(store.in_state(state).map_err(internal)?);
    }
    let now = crate::store::now_ms();
    let active = rows
        .iter()
        .map(|row| {
            let view = web.daemon.view(row);
            ActiveLine {
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
            }
        })
        .collect();
    let db = web.daemon.config().state_dir.join(crate::store::DB_FILE);
    let recent = blocking(move || query::recent_jobs(&open_read_only(&db)?, RECENT_JOBS))
        .await?
        .into_iter()
        .map(|job| RecentLine {
            file: job.filename.clone().unwrap_or_else(|| "—".into()),
            finished: job.finished_ms.map(model::time_ms).unwrap_or_default(),
            error: job.error_code.clone().unwrap_or_default(),
            job,
        })
        .collect();
    Ok(render(&JobsPage {
        nav: Nav {
            active: "jobs",
            node: &web.node,
            user: &s.user,
        },
        active,
        recent,
        csrf: &s.csrf,
        can_act: s.can_act,
        notice: q
            .cancelled
            .filter(|id| id.chars().all(|c| c.is_ascii_digit()))
            .map(|id| format!("Job {id} was cancelled.")),
    }))
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
    match web.daemon.cancel_any(&id) {
        Ok(_) => {
            tracing::info!(job = %id, by = %s.user, "cancelled from the web UI");
            // Watchers of the overview see the shorter queue now; the answer does not
            // wait for the agent's health.
            let w = web.clone();
            tokio::spawn(async move { w.live.refresh(&w.daemon).await });
            Ok(Redirect::to(&format!("/jobs?cancelled={id}")).into_response())
        }
        Err(e) => Err(problem(
            StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
            "The job was not cancelled",
            e.message,
            None,
        )),
    }
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    page: Option<u64>,
}

#[derive(Template)]
#[template(path = "web/audit.html")]
struct AuditPageT<'a> {
    nav: Nav<'a>,
    q: &'a str,
    rows: Vec<AuditRow>,
    total: u64,
    page: u64,
    pages: u64,
    prev: Option<String>,
    next: Option<String>,
    chain_ok: bool,
    chain: String,
    /// "N records", for the count line.
    records: String,
}

async fn audit(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Result<Response, Problem> {
    let s = authorize(&web, &headers, Need::Read, None).await?;
    let page = q.page.unwrap_or(1).max(1);
    let db = web.daemon.config().state_dir.join(crate::store::DB_FILE);
    let search = q.q.clone();
    let (found, verified) = blocking(move || {
        let conn = open_read_only(&db)?;
        let found = query::audit_page(
            &conn,
            &search,
            (page - 1) * u64::from(AUDIT_PER_PAGE),
            AUDIT_PER_PAGE,
        )?;
        Ok((found, crate::audit::verify(&conn)))
    })
    .await?;
    let pages = found.total.div_ceil(u64::from(AUDIT_PER_PAGE)).max(1);
    let link = |p: u64| {
        format!(
            "/audit?{}",
            serde_urlencoded::to_string([("q", q.q.as_str()), ("page", &p.to_string())])
                .unwrap_or_default()
        )
    };
    let (chain_ok, chain) = match &verified {
        Ok(v) => (
            true,
            format!(
                "The hash chain is intact: {}, head {}.",
                model::count(v.records, "record"),
                v.head
            ),
        ),
        Err(e) => (false, format!("The hash chain is broken: {e}.")),
    };
    Ok(render(&AuditPageT {
        nav: Nav {
            active: "audit",
            node: &web.node,
            user: &s.user,
        },
        q: &q.q,
        total: found.total,
        rows: found.rows,
        page,
        pages,
        prev: (page > 1).then(|| link(page - 1)),
        next: (page < pages).then(|| link(page + 1)),
        chain_ok,
        chain,
        records: model::count(found.total, "record"),
    }))
}

async fn export(State(web): State<Arc<Web>>, headers: HeaderMap) -> Result<Response, Problem> {
    authorize(&web, &headers, Need::Read, None).await?;
    let db = web.daemon.config().state_dir.join(crate::store::DB_FILE);
    let body = blocking(move || {
        let conn = open_read_only(&db)?;
        let mut out = Vec::new();
        crate::audit::export(&conn, None, &mut out).map_err(|e| match e {
            crate::audit::AuditError::Db(e) => e,
            other => rusqlite::Error::ToSqlConversionFailure(Box::new(std::io::Error::other(
                other.to_string(),
            ))),
        })?;
        Ok(out)
    })
    .await?;
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

/// A read-only connection to `signet.db`: pages read beside the daemon's writer (WAL)
/// without taking its lock.
pub fn open_read_only(db: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> rusqlite::Result<T> + Send + 'static,
) -> Result<T, Problem> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(internal(e)),
        Err(e) => Err(internal(e)),
    }
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
