//! The web UI's handlers through `Router::oneshot`, logins checked over HTTPS by the
//! real `PveApi` adapter against `StandInPveApi` on loopback: every page and the
//! cancel action, for visitors who are not logged in, whose login expired, who lack
//! the privilege, who send no or a wrong CSRF token, and who may.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use signet_test_support::{encode_ticket, StandInPveApi};
use signetd::adapters::store::{Inserted, Kind, NewJob, Store};
use signetd::config::Config;
use signetd::fronts::web::auth::{Cached, PveApi};
use signetd::fronts::web::{pages, Web};
use signetd::services::daemon::Daemon;
use tower::ServiceExt;

const NODE: &str = "pve1";
const NODE_PATH: &str = "/nodes/pve1";

struct Fixture {
    dir: tempfile::TempDir,
    api: StandInPveApi,
    app: Router,
    daemon: Arc<Daemon>,
}

/// A daemon with `queued` jobs waiting (no agent, no worker: they stay queued), its
/// web UI, and the stand-in PVE API it asks.
async fn fixture(queued: usize) -> Fixture {
    fixture_with(queued, "", None, tempfile::tempdir().unwrap()).await
}

/// [`fixture`] with more of `signetd.toml` and the token service behind `tokens`.
async fn fixture_with(
    queued: usize,
    extra_toml: &str,
    tokens: Option<signetd::services::tokens::Handle>,
    dir: tempfile::TempDir,
) -> Fixture {
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    {
        let store = Store::open(&state, 1 << 20).unwrap();
        for i in 0..queued {
            let Inserted::New(id) = store
                .insert(&NewJob {
                    caller: format!("vm:{}", 105 + i % 2),
                    transport: "vsock".into(),
                    idempotency_key: None,
                    kind: Kind::Sign,
                    profile: "release".into(),
                    filename: Some(format!("app{i}.exe")),
                    agent_query: "profile=release".into(),
                    content_type: "application/octet-stream".into(),
                    request_sha256: None,
                })
                .unwrap()
            else {
                panic!("a new job")
            };
            store.queued(&id, "ab", 3).unwrap();
        }
    }
    // Written too: enrolling reads the file as it is and adds to it.
    let text = format!(
        "agent = \"unix:{}/no-agent.sock\"\nstate_dir = \"{}\"\ndbus = \"none\"\nlisten = [\"unix:{}/s.sock\"]\n[profiles.release]\n[web]\nnode = \"{NODE}\"\n{extra_toml}",
        dir.path().display(),
        state.display(),
        dir.path().display()
    );
    let toml = dir.path().join("signetd.toml");
    std::fs::write(&toml, &text).unwrap();
    let cfg = Config::parse(&toml, &text).unwrap();
    assert!(cfg.web.is_some());
    let mut daemon = Daemon::open(cfg).unwrap();
    if let Some(handle) = tokens {
        daemon = daemon.with_tokens(handle);
    }
    let daemon = Arc::new(daemon);
    let api = StandInPveApi::start().await.unwrap();
    let pin = dir.path().join("pve-ssl.pem");
    std::fs::write(&pin, api.cert_pem()).unwrap();
    let auth = PveApi {
        base: api.url().parse().unwrap(),
        pin_file: pin,
        timeout: Duration::from_secs(10),
    };
    let web = Web::new(daemon.clone(), Arc::new(auth), NODE.into());
    Fixture {
        app: pages::router(web),
        dir,
        api,
        daemon,
    }
}

impl Fixture {
    fn admin(&self) -> String {
        self.api.login(
            "root@pam",
            NODE_PATH,
            &["Sys.Audit", "Sys.Modify", "VM.Audit"],
        )
    }
    fn auditor(&self) -> String {
        self.api.login("alice@pve", NODE_PATH, &["Sys.Audit"])
    }
    fn elsewhere(&self) -> String {
        self.api
            .login("bob@pve", "/nodes/pve2", &["Sys.Audit", "Sys.Modify"])
    }

    async fn get(&self, uri: &str, ticket: Option<&str>) -> (StatusCode, String) {
        let mut req = Request::get(uri).header(header::HOST, "pve1.example:7720");
        if let Some(t) = ticket {
            req = req.header(
                header::COOKIE,
                format!("PVELangCookie=en; PVEAuthCookie={}", encode_ticket(t)),
            );
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn post(
        &self,
        uri: &str,
        ticket: Option<&str>,
        form: &str,
    ) -> (StatusCode, Option<String>, String) {
        let mut req = Request::post(uri)
            .header(header::HOST, "pve1.example:7720")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(t) = ticket {
            req = req.header(
                header::COOKIE,
                format!("PVEAuthCookie={}", encode_ticket(t)),
            );
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(Body::from(form.to_owned())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let location = resp
            .headers()
            .get(header::LOCATION)
            .map(|l| l.to_str().unwrap().to_owned());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            location,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    /// The CSRF token in the enroll page's form, as a browser would send it back.
    async fn csrf(&self, ticket: &str) -> String {
        let (status, page) = self.get("/enroll", Some(ticket)).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let at = page.find("name=\"csrf\" value=\"").expect("a form") + 19;
        page[at..at + 64].to_owned()
    }

    fn job_state(&self, id: &str) -> String {
        self.daemon
            .store()
            .get(id)
            .unwrap()
            .unwrap()
            .state
            .as_str()
            .to_owned()
    }
}

const PAGES: [&str; 7] = [
    "/",
    "/jobs",
    "/audit",
    "/audit/export",
    "/events",
    "/jobs/events",
    "/audit/events?q=&page=1",
];

#[tokio::test]
async fn a_visitor_without_a_pve_login_is_sent_to_the_pve_login() {
    let f = fixture(1).await;
    for page in PAGES {
        let (status, body) = f.get(page, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{page}");
        assert!(
            body.contains("not logged in to Proxmox VE"),
            "{page}: {body}"
        );
        assert!(
            body.contains("https://pve1.example:8006/"),
            "{page}: {body}"
        );
    }
    let (status, _, body) = f.post("/jobs/1/cancel", None, "csrf=x").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // Nothing reached PVE without a cookie.
    assert!(f.api.calls().is_empty());
    assert_eq!(f.job_state("1"), "queued");
}

#[tokio::test]
async fn an_expired_or_forged_ticket_is_not_logged_in() {
    let f = fixture(1).await;
    let t = f.admin();
    assert_eq!(f.get("/", Some(&t)).await.0, StatusCode::OK);
    f.api.expire(&t);
    for page in PAGES {
        let (status, body) = f.get(page, Some(&t)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{page}: {body}");
    }
    let (status, _) = f.get("/", Some("PVE:root@pam:6571A1B2::forged")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The cookie went to PVE as the browser sent it, with the node's path.
    let calls = f.api.calls();
    assert!(calls
        .iter()
        .all(|c| c.path.as_deref() == Some(NODE_PATH) && c.cookie.is_some()));
    assert_eq!(calls[0].cookie.as_deref(), Some(encode_ticket(&t).as_str()));
}

#[tokio::test]
async fn a_user_without_sys_audit_on_this_node_sees_nothing() {
    let f = fixture(1).await;
    let t = f.elsewhere();
    for page in PAGES {
        let (status, body) = f.get(page, Some(&t)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{page}");
        assert!(
            body.contains("bob@pve needs the privilege Sys.Audit on /nodes/pve1"),
            "{page}: {body}"
        );
        assert!(!body.contains("app0.exe"), "{page}");
    }
}

#[tokio::test]
async fn an_auditor_reads_every_page_but_cannot_cancel() {
    let f = fixture(2).await;
    let t = f.auditor();
    let (status, page) = f.get("/", Some(&t)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains("The signing VM&#39;s agent is not reachable"),
        "{page}"
    );
    assert!(page.contains("alice@pve on pve1"), "{page}");
    assert!(page.contains("<dd id=\"waiting\">2</dd>"), "{page}");

    let (status, page) = f.get("/jobs", Some(&t)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("app0.exe") && page.contains("app1.exe"),
        "{page}"
    );
    assert!(page.contains("vm:105") && page.contains("next"), "{page}");
    assert!(
        !page.contains("name=\"csrf\""),
        "no cancel form for an auditor"
    );
    assert!(page.contains("needs the privilege Sys.Modify"));

    let (status, page) = f.get("/audit", Some(&t)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("The hash chain is intact: 0 records,"),
        "{page}"
    );

    // A valid token does not help without Sys.Modify: take the admin's.
    let csrf = f.csrf(&f.admin()).await;
    let (status, _, body) = f
        .post("/jobs/1/cancel", Some(&t), &format!("csrf={csrf}"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("alice@pve needs the privilege Sys.Modify on /nodes/pve1"),
        "{body}"
    );
    assert_eq!(f.job_state("1"), "queued");
}

#[tokio::test]
async fn cancel_needs_the_forms_csrf_token() {
    let f = fixture(2).await;
    let t = f.admin();
    for form in ["", "csrf=", &format!("csrf={}", "0".repeat(64)), "other=1"] {
        let (status, _, body) = f.post("/jobs/1/cancel", Some(&t), form).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{form:?}: {body}");
        assert!(body.contains("form has expired"), "{body}");
    }
    // Another user's token is not this user's.
    let other = f.csrf(&f.admin()).await;
    let (status, _, _) = f
        .post("/jobs/1/cancel", Some(&t), &format!("csrf={other}"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(f.job_state("1"), "queued");
}

#[tokio::test]
async fn an_operator_cancels_a_waiting_job_and_it_is_audited() {
    let f = fixture(2).await;
    let t = f.admin();
    let csrf = f.csrf(&t).await;
    let (status, location, body) = f
        .post("/jobs/1/cancel", Some(&t), &format!("csrf={csrf}"))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
    assert_eq!(location.as_deref(), Some("/jobs?cancelled=1"));
    assert_eq!(f.job_state("1"), "cancelled");
    assert_eq!(f.job_state("2"), "queued");

    let (_, page) = f.get("/jobs?cancelled=1", Some(&t)).await;
    assert!(page.contains("Job 1 was cancelled."), "{page}");
    assert!(page.contains("<td>cancelled</td>"), "{page}");

    let (_, page) = f.get("/audit?q=cancelled", Some(&t)).await;
    assert!(page.contains("1 record matches"), "{page}");
    assert!(
        page.contains("The hash chain is intact: 2 records,"),
        "{page}"
    );
    let (status, export) = f.get("/audit/export", Some(&t)).await;
    assert_eq!(status, StatusCode::OK);
    let records = |export: &str| -> Vec<serde_json::Value> {
        export
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let recs = records(&export);
    // The job's own record names its caller; the operator's names the PVE user.
    assert_eq!(
        (recs[0]["job"].as_str(), recs[0]["result"].as_str()),
        (Some("1"), Some("cancelled"))
    );
    assert_eq!(recs[0]["caller"], "vm:105");
    assert_eq!(
        (
            recs[1]["job"].as_str(),
            recs[1]["result"].as_str(),
            recs[1]["caller"].as_str(),
            recs[1]["transport"].as_str()
        ),
        (Some("1"), Some("cancel"), Some("pve:root@pam"), Some("web"))
    );
    assert!(recs[1]["error"].is_null());

    // Cancelling an ended job again changes nothing (as DELETE /v1/jobs/{id} and
    // signetctl cancel answer it): no second `cancelled`, though the operator's try is
    // recorded; an unknown job is not found, and the refusal recorded with its code.
    let (status, _, body) = f
        .post("/jobs/1/cancel", Some(&t), &format!("csrf={csrf}"))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
    let (status, _, _) = f
        .post("/jobs/99/cancel", Some(&t), &format!("csrf={csrf}"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, export) = f.get("/audit/export", Some(&t)).await;
    let recs = records(&export);
    assert_eq!(recs.len(), 4, "{export}");
    assert_eq!(
        recs.iter().filter(|r| r["result"] == "cancelled").count(),
        1
    );
    assert_eq!(
        (recs[3]["job"].as_str(), recs[3]["error"].as_str()),
        (Some("99"), Some("unknown_job"))
    );
}

#[tokio::test]
async fn the_audit_page_searches_and_pages() {
    let f = fixture(60).await;
    let t = f.admin();
    let csrf = f.csrf(&t).await;
    for id in 1..=55 {
        let (status, _, body) = f
            .post(
                &format!("/jobs/{id}/cancel"),
                Some(&t),
                &format!("csrf={csrf}"),
            )
            .await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{id}: {body}");
    }
    // Each cancel is two records: the job's and the operator's.
    let (_, page) = f.get("/audit", Some(&t)).await;
    assert!(page.contains("110 records; page 1 of 3"), "{page}");
    assert!(page.contains("rel=\"next\""), "{page}");
    let (_, page3) = f.get("/audit?q=&page=3", Some(&t)).await;
    assert!(page3.contains("page 3 of 3") && page3.contains("rel=\"prev\""));
    assert!(
        page3.contains("<td>app0.exe</td>"),
        "the oldest is on the last page"
    );
    let (_, found) = f.get("/audit?q=app7.exe", Some(&t)).await;
    assert!(found.contains("1 record matches"), "{found}");
    // The search is shown back escaped.
    let (_, xss) = f.get("/audit?q=%3Cscript%3E", Some(&t)).await;
    assert!(
        !xss.contains("<script>") && xss.contains("&#60;script&#62;"),
        "{xss}"
    );

    // The chain was walked whole for the first page; after that only what was added.
    assert!(page.contains("Every record was checked now."), "{page}");
    let (status, _, _) = f
        .post("/jobs/56/cancel", Some(&t), &format!("csrf={csrf}"))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, page) = f.get("/audit", Some(&t)).await;
    assert!(
        page.contains("The hash chain is intact: 112 records,"),
        "{page}"
    );
    assert!(
        page.contains("the 2 records added since then were checked too."),
        "{page}"
    );
    // Looked at again with nothing new: still counted from the whole walk.
    let (_, page) = f.get("/audit", Some(&t)).await;
    assert!(
        page.contains("the 2 records added since then were checked too."),
        "{page}"
    );
    let (_, page) = f.get("/audit?verify=full", Some(&t)).await;
    assert!(page.contains("Every record was checked now."), "{page}");
    let (_, page) = f.get("/audit", Some(&t)).await;
    assert!(page.contains("; none was added since."), "{page}");

    // A changed record shows as a broken chain, though it is older than the last walk.
    let db = f.dir.path().join("state/signet.db");
    rusqlite::Connection::open(db)
        .unwrap()
        .execute("UPDATE audit SET filename = 'evil.exe' WHERE seq = 3", [])
        .unwrap();
    let (_, page) = f.get("/audit", Some(&t)).await;
    assert!(
        page.contains("The hash chain is broken: audit record 3"),
        "{page}"
    );
}

#[tokio::test]
async fn the_overview_streams_its_state_and_a_cancel_arrives_live() {
    let f = fixture(2).await;
    let t = f.admin();
    let req = Request::get("/events")
        .header(
            header::COOKIE,
            format!("PVEAuthCookie={}", encode_ticket(&t)),
        )
        .body(Body::empty())
        .unwrap();
    let resp = f.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = resp.into_body();
    let first = next_event(&mut body).await;
    assert!(first.starts_with("event: overview\n"), "{first}");
    assert!(first.contains("<dd id=\"waiting\">2</dd>"), "{first}");
    assert!(first.contains("not reachable"), "{first}");

    let csrf = f.csrf(&t).await;
    let (status, _, _) = f
        .post("/jobs/2/cancel", Some(&t), &format!("csrf={csrf}"))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let second = next_event(&mut body).await;
    assert!(second.contains("<dd id=\"waiting\">1</dd>"), "{second}");
}

#[tokio::test]
async fn a_pve_tab_of_another_node_hands_over_its_login_and_only_signetds_own_script_can() {
    let f = fixture(0).await;
    // The browser has no PVE login for this node's address: the page says so, names
    // the node, and asks a framing PVE tab for the login.
    let (status, page) = f.get("/", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        page.contains("data-node=\"pve1\" data-login=\"needed\""),
        "{page}"
    );
    let hand_over = |ticket: String, header: bool| {
        let app = f.app.clone();
        async move {
            let mut req = Request::post("/login")
                .header(header::HOST, "192.0.2.1:7720")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
            if header {
                req = req.header("x-signet-login", "1");
            }
            let form = format!("ticket={}", encode_ticket(&ticket));
            app.oneshot(req.body(Body::from(form)).unwrap())
                .await
                .unwrap()
        }
    };
    let t = f.admin();
    // A form of another page (no header: a cross-origin page cannot send one) is refused.
    let resp = hand_over(t.clone(), false).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(resp.headers().get(header::SET_COOKIE).is_none());
    // A forged ticket, or one that may not see this node, sets nothing.
    let resp = hand_over("PVE:root@pam:00000000::forged".into(), true).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers().get(header::SET_COOKIE).is_none());
    let resp = hand_over(f.elsewhere(), true).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(resp.headers().get(header::SET_COOKIE).is_none());
    let resp = hand_over("not a ticket".into(), true).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // The tab's ticket, checked by PVE: kept in a cookie of this origin, partitioned.
    let resp = hand_over(t.clone(), true).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let cookie = resp.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(cookie.starts_with("SignetPVEAuth="), "{cookie}");
    for attr in [
        "Secure",
        "HttpOnly",
        "SameSite=None",
        "Partitioned",
        "Path=/",
    ] {
        assert!(cookie.contains(attr), "{attr}: {cookie}");
    }
    // With it, the pages are the user's, as with PVE's own cookie.
    let value = cookie.split(';').next().unwrap();
    let req = Request::get("/")
        .header(header::COOKIE, value)
        .body(Body::empty())
        .unwrap();
    let resp = f.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let page = String::from_utf8_lossy(&body);
    assert!(page.contains("root@pam on pve1"), "{page}");
    assert!(page.contains("Node pve1"), "{page}");
    // It is checked as PVE's cookie is: once expired, it lets nobody in.
    f.api.expire(&t);
    let req = Request::get("/jobs")
        .header(header::COOKIE, value)
        .body(Body::empty())
        .unwrap();
    let resp = f.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

/// An event stream of the UI, opened as `ticket`.
async fn stream(f: &Fixture, uri: &str, ticket: &str) -> Body {
    let req = Request::get(uri)
        .header(
            header::COOKIE,
            format!("PVEAuthCookie={}", encode_ticket(ticket)),
        )
        .body(Body::empty())
        .unwrap();
    let resp = f.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{uri}");
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    resp.into_body()
}

/// The events on `body` until one contains `what` (each a whole page part; a stream
/// also sends again when only a job's age changed).
async fn event_with(body: &mut Body, what: &str) -> String {
    loop {
        let e = next_event(body).await;
        if e.contains(what) {
            return e;
        }
    }
}

#[tokio::test]
async fn the_queue_and_the_audit_pages_stream_their_parts_for_the_same_search() {
    let f = fixture(3).await;
    let t = f.admin();
    // The pages carry their streams; the audit page's for the same search and page,
    // the search field outside the part that is replaced.
    let (_, jobs) = f.get("/jobs", Some(&t)).await;
    assert!(
        jobs.contains("data-events=\"/jobs/events\" data-event=\"jobs\""),
        "{jobs}"
    );
    let (_, audit) = f.get("/audit?q=app2&page=1", Some(&t)).await;
    assert!(
        audit.contains("data-events=\"/audit/events?q=app2&#38;page=1\""),
        "{audit}"
    );
    let live_at = audit.find("id=\"live\"").unwrap();
    assert!(audit.find("type=\"search\"").unwrap() < live_at);

    let mut jobs = stream(&f, "/jobs/events", &t).await;
    let first = next_event(&mut jobs).await;
    assert!(first.starts_with("event: jobs\n"), "{first}");
    assert!(
        first.contains("id=\"job-2\"") && first.contains("app1.exe"),
        "{first}"
    );
    let mut audit = stream(&f, "/audit/events?q=app2&page=1", &t).await;
    let first = next_event(&mut audit).await;
    assert!(first.starts_with("event: audit\n"), "{first}");
    assert!(first.contains("0 records match"), "{first}");

    // Job 3 (app2.exe) is cancelled: both streams bring it without a reload.
    let csrf = f.csrf(&t).await;
    let (status, _, _) = f
        .post("/jobs/3/cancel", Some(&t), &format!("csrf={csrf}"))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let e = event_with(&mut jobs, "id=\"ended-3\"").await;
    assert!(!e.contains("id=\"job-3\""), "no longer waiting: {e}");
    let e = event_with(&mut audit, "app2.exe").await;
    assert!(e.contains("1 record matches"), "{e}");
    assert!(!e.contains("app1.exe"), "the search holds: {e}");
}

/// The next whole event on a server-sent event stream (keep-alive comments skipped).
async fn next_event(body: &mut Body) -> String {
    let mut buf = String::new();
    loop {
        let frame = body.frame().await.expect("the stream goes on").unwrap();
        if let Ok(data) = frame.into_data() {
            buf.push_str(&String::from_utf8_lossy(&data));
        }
        if let Some(end) = buf.find("\n\n") {
            let event = buf[..end + 1].to_owned();
            if !event.starts_with(':') {
                return event;
            }
            buf.drain(..end + 2);
        }
    }
}

#[tokio::test]
async fn static_files_need_no_login_and_pages_may_be_framed_only_by_pve() {
    let f = fixture(0).await;
    let (status, css) = f.get("/static/signet.css", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(css.contains(".verdict"));
    let (status, js) = f.get("/static/signet.js", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(js.contains("EventSource"));
    let resp = f
        .app
        .clone()
        .oneshot(Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let csp = resp.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap();
    assert!(
        csp.contains("frame-ancestors 'self' https://*:8006"),
        "{csp}"
    );
    assert_eq!(f.get("/nope", None).await.0, StatusCode::NOT_FOUND);
    // Behind a reverse proxy, its origin is added.
    let proxied = Web::framed_by(
        f.daemon.clone(),
        Arc::new(PveApi {
            base: f.api.url().parse().unwrap(),
            pin_file: f.dir.path().join("pve-ssl.pem"),
            timeout: Duration::from_secs(10),
        }),
        NODE.into(),
        &["https://pve.example.com".to_owned()],
    );
    let resp = pages::router(proxied)
        .oneshot(
            Request::get("/static/signet.css")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        resp.headers()[header::CONTENT_SECURITY_POLICY],
        "default-src 'self'; frame-ancestors 'self' https://pve.example.com; form-action 'self'"
    );
}

#[tokio::test]
async fn a_pve_api_that_does_not_answer_or_shows_another_certificate_is_unavailable() {
    let f = fixture(0).await;
    let t = f.admin();
    // A PVE API presenting a certificate other than the pinned one.
    let other = StandInPveApi::start().await.unwrap();
    let pin = f.dir.path().join("pve-ssl.pem");
    let wrong = Web::new(
        f.daemon.clone(),
        Arc::new(PveApi {
            base: other.url().parse().unwrap(),
            pin_file: pin.clone(),
            timeout: Duration::from_secs(10),
        }),
        NODE.into(),
    );
    let req = |t: &str| {
        Request::get("/")
            .header(
                header::COOKIE,
                format!("PVEAuthCookie={}", encode_ticket(t)),
            )
            .body(Body::empty())
            .unwrap()
    };
    let resp = pages::router(wrong).oneshot(req(&t)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("did not answer the login check"));
    assert!(other.calls().is_empty(), "the ticket never reached it");
    // Nobody listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("https://127.0.0.1:{port}");
    let gone = Web::new(
        f.daemon.clone(),
        Arc::new(PveApi {
            base: url.parse().unwrap(),
            pin_file: pin,
            timeout: Duration::from_secs(10),
        }),
        NODE.into(),
    );
    let resp = pages::router(gone).oneshot(req(&t)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn pves_answers_are_remembered_briefly_and_refusals_not_at_all() {
    let f = fixture(0).await;
    let cached = |ttl| {
        let web = Web::new(
            f.daemon.clone(),
            Arc::new(Cached::new(
                PveApi {
                    base: f.api.url().parse().unwrap(),
                    pin_file: f.dir.path().join("pve-ssl.pem"),
                    timeout: Duration::from_secs(10),
                },
                ttl,
            )),
            NODE.into(),
        );
        pages::router(web)
    };
    let get = |app: Router, uri: &str, ticket: &str| {
        let req = Request::get(uri)
            .header(
                header::COOKIE,
                format!("PVEAuthCookie={}", encode_ticket(ticket)),
            )
            .body(Body::empty())
            .unwrap();
        async move { app.oneshot(req).await.unwrap().status() }
    };
    let t = f.auditor();
    let app = cached(Duration::from_secs(3600));
    for page in ["/", "/jobs", "/audit"] {
        assert_eq!(get(app.clone(), page, &t).await, StatusCode::OK, "{page}");
    }
    assert_eq!(f.api.calls().len(), 1, "one call to PVE for three pages");
    // A refusal is asked again each time.
    let stranger = "PVE:eve@pve:6571A1B2::forged";
    for _ in 0..2 {
        assert_eq!(
            get(app.clone(), "/", stranger).await,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(f.api.calls().len(), 3);
    // Without a time to live nothing is remembered.
    let app = cached(Duration::ZERO);
    for _ in 0..2 {
        assert_eq!(get(app.clone(), "/", &t).await, StatusCode::OK);
    }
    assert_eq!(f.api.calls().len(), 5);
}

#[tokio::test]
async fn event_streams_end_when_signetd_stops() {
    let f = fixture(0).await;
    let web = Web::new(
        f.daemon.clone(),
        Arc::new(PveApi {
            base: f.api.url().parse().unwrap(),
            pin_file: f.dir.path().join("pve-ssl.pem"),
            timeout: Duration::from_secs(10),
        }),
        NODE.into(),
    );
    let t = f.admin();
    let req = Request::get("/events")
        .header(
            header::COOKIE,
            format!("PVEAuthCookie={}", encode_ticket(&t)),
        )
        .body(Body::empty())
        .unwrap();
    let resp = pages::router(web.clone()).oneshot(req).await.unwrap();
    let mut body = resp.into_body();
    assert!(next_event(&mut body).await.starts_with("event: overview"));
    web.close();
    // The stream ends (a keep-alive comment may come first), so a graceful shutdown
    // does not wait for the browser.
    loop {
        match body.frame().await {
            None => break,
            Some(frame) => {
                let data = frame.unwrap().into_data().unwrap_or_default();
                assert!(data.starts_with(b":"), "{data:?}");
            }
        }
    }
}

/// The token watcher standing in for udev here: one SafeNet eToken 5110 (serial
/// 0123ABCD) plugged in at 1-2 from the start, never unplugged.
struct StandInWatcher(Option<signetd::adapters::usb::UsbDevice>);

impl signetd::adapters::usb::TokenWatcher for StandInWatcher {
    fn enumerate(
        &mut self,
    ) -> Result<Vec<signetd::adapters::usb::UsbDevice>, signetd::adapters::usb::WatchError> {
        Ok(self.0.take().into_iter().collect())
    }
    fn next_event(
        &mut self,
    ) -> impl std::future::Future<Output = Option<signetd::adapters::usb::UsbEvent>> + Send + '_
    {
        std::future::pending()
    }
}

const SERIAL: &str = "0123ABCD";

/// The token service with [`StandInWatcher`]'s token assigned to VM 105, whose QEMU is
/// not running (no monitor socket); answers once the token is seen on the host.
async fn token_service(dir: &std::path::Path) -> signetd::services::tokens::Handle {
    use signetd::adapters::usb::{Catalog, UsbDevice};
    use signetd::config::VidPid;
    let device = UsbDevice {
        syspath: "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2".into(),
        id: VidPid {
            vendor: 0x0529,
            product: 0x0620,
        },
        bus: 1,
        devnum: 5,
        port: "2".into(),
        serial: Some(SERIAL.into()),
        manufacturer: Some("SafeNet".into()),
        product: Some("eToken".into()),
        interfaces: vec![],
    };
    let setup = signetd::services::tokens::Setup {
        catalog: Catalog::new(vec![]),
        assignments: [(SERIAL.to_owned(), 105)].into(),
        devices: Default::default(),
        monitors: vec![(105, dir.join("vm-105.qmp"))],
        usb_bus: "xhci.0".into(),
        qmp_timeout: Duration::from_secs(2),
        sysfs: "/sys".into(),
    };
    let (service, mut status) =
        signetd::services::tokens::TokenService::new(StandInWatcher(Some(device)), setup);
    let handle = service.handle();
    tokio::spawn(service.run());
    tokio::time::timeout(
        Duration::from_secs(30),
        status.wait_for(|s| s.get(SERIAL).is_some_and(|t| t.host_port.is_some())),
    )
    .await
    .expect("the token is seen on the host")
    .unwrap();
    handle
}

/// The pages and actions added for operators, for each kind of visitor.
const ACTION_PAGES: [&str; 3] = [
    "/enroll",
    "/tokens/0123ABCD/detach",
    "/tokens/0123ABCD/attach",
];
const ACTION_POSTS: [&str; 4] = [
    "/tokens/0123ABCD/detach",
    "/tokens/0123ABCD/reattach",
    "/enroll/preview",
    "/enroll",
];

#[tokio::test]
async fn actions_and_the_timeline_need_a_login_the_privilege_and_the_forms_token() {
    let f = fixture(0).await;
    for page in ACTION_PAGES
        .iter()
        .chain(&["/timeline", "/timeline/events"])
    {
        let (status, body) = f.get(page, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{page}: {body}");
    }
    for post in ACTION_POSTS {
        let (status, _, body) = f.post(post, None, "csrf=x&role=build-vm&vmid=200").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{post}: {body}");
    }
    // Elsewhere: nothing here.
    let (status, _) = f.get("/timeline", Some(&f.elsewhere())).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // An auditor reads the timeline but is not even asked to confirm an action.
    let auditor = f.auditor();
    let (status, page) = f.get("/timeline", Some(&auditor)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    for page in ACTION_PAGES {
        let (status, body) = f.get(page, Some(&auditor)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{page}");
        // Enrolling is for root@pam alone, whatever the privileges.
        let why = if page.starts_with("/enroll") {
            "alice@pve may not enroll a VM"
        } else {
            "alice@pve needs the privilege Sys.Modify on /nodes/pve1"
        };
        assert!(body.contains(why), "{page}: {body}");
    }
    let admin = f.admin();
    let csrf = f.csrf(&admin).await;
    for post in ACTION_POSTS {
        let form = format!("csrf={csrf}&role=build-vm&vmid=200");
        let (status, _, body) = f.post(post, Some(&auditor), &form).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{post}: {body}");
        let why = if post.starts_with("/enroll") {
            "may not enroll a VM"
        } else {
            "needs the privilege Sys.Modify"
        };
        assert!(body.contains(why), "{body}");
        // The admin without the form's token, or with another user's.
        for bad in ["", "csrf=", &format!("csrf={}", "0".repeat(64))] {
            let form = format!("{bad}&role=build-vm&vmid=200");
            let (status, _, body) = f.post(post, Some(&admin), &form).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{post} {bad:?}: {body}");
            assert!(body.contains("form has expired"), "{body}");
        }
    }
    // Another session's form token (root@pam logged in elsewhere: only root@pam sees
    // the enroll form that carries one).
    let other = f
        .csrf(
            &f.api
                .login("root@pam", NODE_PATH, &["Sys.Audit", "Sys.Modify"]),
        )
        .await;
    assert_ne!(other, csrf, "each session has its own form token");
    let (status, _, _) = f
        .post(
            "/tokens/0123ABCD/detach",
            Some(&admin),
            &format!("csrf={other}"),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Nothing was done: the audit holds only the refusal of alice's enroll (one record,
    // coalesced), no action.
    let (_, export) = f.get("/audit/export", Some(&admin)).await;
    let records: Vec<serde_json::Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        !records.is_empty()
            && records.iter().all(|r| r["result"] == "refused"
                && r["error"] == "forbidden"
                && r["caller"] == "pve:alice@pve"),
        "{export}"
    );
    // Without the token service a token action is refused, saying why, and audited.
    let (status, page) = f.get("/tokens/0123ABCD/detach", Some(&admin)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(page.contains("without the token service"), "{page}");
    let (status, _, page) = f
        .post(
            "/tokens/0123ABCD/detach",
            Some(&admin),
            &format!("csrf={csrf}"),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{page}");
    assert!(
        page.contains("does not follow the host&#39;s tokens"),
        "{page}"
    );
    let (_, export) = f.get("/audit/export", Some(&admin)).await;
    let rec: serde_json::Value =
        serde_json::from_str(export.trim().lines().last().unwrap()).unwrap();
    assert_eq!(
        (
            rec["result"].as_str(),
            rec["error"].as_str(),
            rec["caller"].as_str()
        ),
        (
            Some("detach"),
            Some("token_unavailable"),
            Some("pve:root@pam")
        )
    );
    assert_eq!(
        f.get("/tokens/0123ABCD/eject", Some(&admin)).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn the_overview_shows_where_the_token_is_and_an_operator_detaches_it_after_confirming() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = token_service(dir.path()).await;
    let f = fixture_with(0, "", Some(tokens), dir).await;
    let admin = f.admin();
    let (status, page) = f.get("/", Some(&admin)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("id=\"token-0123ABCD\""), "{page}");
    assert!(page.contains("SafeNet eToken 5110"), "{page}");
    assert!(page.contains("port 1-2 (0529:0620)"), "{page}");
    assert!(page.contains("in no VM (belongs to VM 105)"), "{page}");
    assert!(page.contains("href=\"/tokens/0123ABCD/attach\""), "{page}");
    assert!(
        !page.contains("/tokens/0123ABCD/detach"),
        "not in a VM: {page}"
    );
    // An auditor sees the token but no actions.
    let (_, page) = f.get("/", Some(&f.auditor())).await;
    assert!(
        page.contains("port 1-2") && !page.contains("/tokens/0123ABCD/"),
        "{page}"
    );

    // The confirmation says what will happen and carries the form's token.
    let (status, page) = f.get("/tokens/0123ABCD/detach", Some(&admin)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains("Detach token 0123ABCD from VM 105?"),
        "{page}"
    );
    assert!(
        page.contains("action=\"/tokens/0123ABCD/detach\""),
        "{page}"
    );
    let csrf = f.csrf(&admin).await;
    assert!(page.contains(&csrf));
    let (status, _, page) = f
        .post(
            "/tokens/0123ABCD/detach",
            Some(&admin),
            &format!("csrf={csrf}"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("Token 0123ABCD detached"), "{page}");
    assert!(page.contains("Now: on host"), "{page}");
    // Attaching needs VM 105 running: refused with the fix, and audited as refused.
    let (status, _, page) = f
        .post(
            "/tokens/0123ABCD/attach",
            Some(&admin),
            &format!("csrf={csrf}"),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{page}");
    assert!(page.contains("VM 105 is not running"), "{page}");
    let (_, export) = f.get("/audit/export", Some(&admin)).await;
    let recs: Vec<serde_json::Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 2, "{export}");
    for (r, (action, error)) in recs
        .iter()
        .zip([("detach", None), ("attach", Some("token_unavailable"))])
    {
        assert_eq!(r["result"].as_str(), Some(action));
        assert_eq!(r["error"].as_str(), error);
        assert_eq!(r["token_serial"], SERIAL);
        assert_eq!(r["caller"], "pve:root@pam");
        assert_eq!(r["transport"], "web");
    }
    // A token nobody knows.
    let (status, page) = f.get("/tokens/FFFF0000/reattach", Some(&admin)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(page.contains("tokens known: 0123ABCD"), "{page}");
}

#[tokio::test]
async fn an_operator_enrolls_a_build_vm_after_seeing_the_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    let pve = dir.path().join("pve");
    std::fs::create_dir_all(&pve).unwrap();
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(
        manifest.join("tests/data/qm-config/with-args.conf"),
        pve.join("200.conf"),
    )
    .unwrap();
    // fake-qm keeps its VMs in FAKE_QM_DIR: a wrapper gives it this test's.
    let qm = dir.path().join("qm");
    std::fs::write(
        &qm,
        format!(
            "#!/bin/sh\nFAKE_QM_DIR='{}' exec '{}' \"$@\"\n",
            pve.display(),
            manifest.join("tests/fixtures/fake-qm").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&qm, std::fs::Permissions::from_mode(0o755)).unwrap();
    let f = fixture_with(
        0,
        &format!("[doctor]\nqm = \"{}\"\n", qm.display()),
        None,
        dir,
    )
    .await;
    let admin = f.admin();
    let (status, page) = f.get("/enroll", Some(&admin)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains("No token is plugged into this host now"),
        "{page}"
    );
    let csrf = f.csrf(&admin).await;
    let before = std::fs::read_to_string(pve.join("200.conf")).unwrap();
    let toml = f.dir.path().join("signetd.toml");
    let toml_before = std::fs::read_to_string(&toml).unwrap();

    let form = format!("csrf={csrf}&role=build-vm&vmid=200&profiles=release");
    let (status, _, page) = f.post("/enroll/preview", Some(&admin), &form).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("Enroll VM 200 as build VM?"), "{page}");
    assert!(
        page.contains(
            "-cpu host,+aes -smbios type=0,vendor=ACME -device vhost-vsock-pci,guest-cid=200"
        ),
        "{page}"
    );
    assert!(page.contains("Signet would run: <code>"), "{page}");
    assert!(page.contains("callers = [&#34;vm:200&#34;]"), "{page}");
    assert!(page.contains("name=\"vmid\" value=\"200\""), "{page}");
    // The dry run changed nothing and is no action to audit.
    assert_eq!(
        std::fs::read_to_string(pve.join("200.conf")).unwrap(),
        before
    );
    assert_eq!(std::fs::read_to_string(&toml).unwrap(), toml_before);
    assert!(!std::fs::read_to_string(pve.join("calls"))
        .unwrap()
        .contains("set"));
    assert!(f.get("/audit/export", Some(&admin)).await.1.is_empty());

    let vm200 = signetd::core::policy::Caller::of_vsock(&Default::default(), 200);
    assert!(f.daemon.config().policy.decide(&vm200, "release").is_err());

    let (status, _, page) = f.post("/enroll", Some(&admin), &form).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("VM 200 enrolled as build VM"), "{page}");
    assert!(
        page.contains("takes effect when VM 200 next starts"),
        "{page}"
    );
    // The grant is in force at once: no restart of signetd.
    assert!(page.contains("changed and applied at once"), "{page}");
    assert!(f.daemon.config().policy.decide(&vm200, "release").is_ok());
    let after = std::fs::read_to_string(pve.join("200.conf")).unwrap();
    assert!(after.contains("guest-cid=200"), "{after}");
    let toml_after = std::fs::read_to_string(&toml).unwrap();
    assert!(
        toml_after.starts_with(&toml_before) && toml_after.contains("callers = [\"vm:200\"]"),
        "{toml_after}"
    );
    let (_, export) = f.get("/audit/export", Some(&admin)).await;
    let rec: serde_json::Value =
        serde_json::from_str(export.trim().lines().last().unwrap()).unwrap();
    assert_eq!(
        (
            rec["result"].as_str(),
            rec["filename"].as_str(),
            rec["caller"].as_str()
        ),
        (
            Some("enroll"),
            Some("VM 200 as build VM"),
            Some("pve:root@pam")
        )
    );
    // Enrolled: a second preview has nothing left to change.
    let (_, _, page) = f.post("/enroll/preview", Some(&admin), &form).await;
    assert!(page.contains("has Signet's settings already"), "{page}");
    assert!(page.contains("Nothing to add."), "{page}");
    // Refusals say why: a signing VM needs its token plugged in; a VM qm does not know.
    let (status, _, page) = f
        .post(
            "/enroll/preview",
            Some(&admin),
            &format!("csrf={csrf}&role=signing-vm&vmid=105&serial=0123ABCD"),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{page}");
    assert!(
        page.contains("token 0123ABCD is not plugged into this host"),
        "{page}"
    );
    let (status, _, page) = f
        .post(
            "/enroll/preview",
            Some(&admin),
            &format!("csrf={csrf}&role=build-vm&vmid=999"),
        )
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{page}");
    assert!(page.contains("999.conf&#39; does not exist"), "{page}");
    let (status, _, _) = f
        .post(
            "/enroll/preview",
            Some(&admin),
            &format!("csrf={csrf}&role=build-vm&vmid=abc"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_timeline_page_charts_the_last_day_and_follows_new_entries() {
    use signetd::core::timeline::Seen;
    let f = fixture(0).await;
    let t = f.auditor();
    let (status, page) = f.get("/timeline", Some(&t)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("<svg"), "{page}");
    assert!(page.contains("No job signed in these 24 hours"), "{page}");
    assert!(
        page.contains("<dd id=\"token-available\">100.0 %</dd>"),
        "{page}"
    );
    assert!(page.contains("id=\"timeline-empty\""), "{page}");

    f.daemon
        .timeline()
        .saw(Seen::TokenLost("CKR_DEVICE_REMOVED".into()));
    f.daemon.timeline().saw(Seen::TokenBack);
    f.daemon.timeline().saw(Seen::PinDelivered);
    let (_, page) = f.get("/timeline", Some(&t)).await;
    assert!(
        page.contains("<td>Token lost</td><td>CKR_DEVICE_REMOVED</td>"),
        "{page}"
    );
    assert!(page.contains("<td>Token back</td>"), "{page}");
    assert!(page.contains("<td>away "), "{page}");
    assert!(page.contains("<tr class=\"done\">"), "{page}");
    assert!(page.contains("class=\"down token\""), "{page}");

    // Live: a new entry arrives on the event stream.
    let req = Request::get("/timeline/events")
        .header(
            header::COOKIE,
            format!("PVEAuthCookie={}", encode_ticket(&t)),
        )
        .body(Body::empty())
        .unwrap();
    let resp = f.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    f.daemon
        .timeline()
        .saw(Seen::AgentDown("connection refused".into()));
    let event = next_event(&mut body).await;
    assert!(event.starts_with("event: timeline\n"), "{event}");
    assert!(event.contains("Agent unreachable"), "{event}");
    assert!(event.contains("class=\"down agent\""), "{event}");
}
