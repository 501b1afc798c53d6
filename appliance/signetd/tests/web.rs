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
use signetd::config::Config;
use signetd::daemon::Daemon;
use signetd::store::{Inserted, Kind, NewJob, Store};
use signetd::web::auth::{Cached, PveApi};
use signetd::web::standin::{encode_ticket, StandInPveApi};
use signetd::web::{pages, Web};
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
    let dir = tempfile::tempdir().unwrap();
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
                })
                .unwrap()
            else {
                panic!("a new job")
            };
            store.queued(&id, "ab", 3).unwrap();
        }
    }
    let cfg = Config::parse(
        &dir.path().join("signetd.toml"),
        &format!(
            "agent = \"unix:{}/no-agent.sock\"\nstate_dir = \"{}\"\ndbus = \"none\"\nlisten = [\"unix:{}/s.sock\"]\n[profiles.release]\n[web]\nnode = \"{NODE}\"\n",
            dir.path().display(),
            state.display(),
            dir.path().display()
        ),
    )
    .unwrap();
    assert!(cfg.web.is_some());
    let daemon = Arc::new(Daemon::open(cfg).unwrap());
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

    /// The CSRF token in the queue page's forms, as a browser would send it back.
    async fn csrf(&self, ticket: &str) -> String {
        let (status, page) = self.get("/jobs", Some(ticket)).await;
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

const PAGES: [&str; 5] = ["/", "/jobs", "/audit", "/audit/export", "/events"];

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
        page.contains("The hash chain is intact: 1 record,"),
        "{page}"
    );
    let (status, export) = f.get("/audit/export", Some(&t)).await;
    assert_eq!(status, StatusCode::OK);
    let rec: serde_json::Value = serde_json::from_str(export.lines().next().unwrap()).unwrap();
    assert_eq!(
        (rec["job"].as_str(), rec["result"].as_str()),
        (Some("1"), Some("cancelled"))
    );
    assert_eq!(rec["caller"], "vm:105");

    // Cancelling an ended job again changes nothing (as DELETE /v1/jobs/{id} and
    // signetctl cancel answer it): no second record; an unknown job is not found.
    let (status, _, body) = f
        .post("/jobs/1/cancel", Some(&t), &format!("csrf={csrf}"))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
    let (_, export) = f.get("/audit/export", Some(&t)).await;
    assert_eq!(export.lines().count(), 1, "{export}");
    let (status, _, _) = f
        .post("/jobs/99/cancel", Some(&t), &format!("csrf={csrf}"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
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
    let (_, page) = f.get("/audit", Some(&t)).await;
    assert!(page.contains("55 records; page 1 of 2"), "{page}");
    assert!(page.contains("rel=\"next\""), "{page}");
    let (_, page2) = f.get("/audit?q=&page=2", Some(&t)).await;
    assert!(page2.contains("page 2 of 2") && page2.contains("rel=\"prev\""));
    assert!(
        page2.contains("<td>app0.exe</td>"),
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

    // A changed record shows as a broken chain.
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
