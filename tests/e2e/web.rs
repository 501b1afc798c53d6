//! The web UI in a real browser: headless Chromium against `signetd` on loopback with
//! a SoftHSM-backed agent, logged in through `StandInPveApi` as a PVE user is (the
//! login sets `PVEAuthCookie` for the host; the browser sends it to the UI's port).
//! Screenshots of each page, in each state the tests reach, go to
//! `target/web-screenshots/` for people to look at.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use signet_test_support::StandInPveApi;

use super::*;

const CHROMIUM: &str = "chromium";

pub(super) struct Ui {
    _rt: tokio::runtime::Runtime,
    pub(super) api: StandInPveApi,
    /// `https://127.0.0.1:PORT` of the web UI.
    pub(super) url: String,
}

/// Agent (SoftHSM) and daemon with `[web]` on a free loopback port, its logins checked
/// by a stand-in PVE API.
fn appliance_with_web(w: &mut World) -> Ui {
    appliance_with_web_and(w, "")
}

/// [`appliance_with_web`] with more of `signetd.toml`.
fn appliance_with_web_and(w: &mut World, extra_toml: &str) -> Ui {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(StandInPveApi::start()).unwrap();
    let pin = w.path("pin");
    let agent = w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    let web = web_section(w, &api);
    w.start_daemon_with(
        &[&format!("unix:{}", w.path("signetd.sock").display())],
        &agent,
        &format!("[profiles.release]\ndescription = \"Signet test\"\n{web}{extra_toml}"),
    );
    web_ui(w, rt, api)
}

/// The `[web]` section for a UI checking logins with `api`.
fn web_section(w: &World, api: &StandInPveApi) -> String {
    web_section_for(w, api, "pve1", "127.0.0.1")
}

/// The `[web]` section for node `node`'s UI on `host` (a free port), checking logins
/// with `api`, and framed by PVE's UI or by `api`'s pages (the stand-in PVE UI is not
/// on port 8006).
pub(super) fn web_section_for(w: &World, api: &StandInPveApi, node: &str, host: &str) -> String {
    let pin_file = w.path("pve-api.pem");
    std::fs::write(&pin_file, api.cert_pem()).unwrap();
    std::fs::create_dir_all(w.path("pve-local")).unwrap();
    format!(
        "[web]\nlisten = [\"tcp:{host}:0\"]\nnode = \"{node}\"\npve_api = \"{}\"\n\
         pve_api_cert = \"{}\"\npve_local_dir = \"{}\"\nrefresh_seconds = 1\n\
         frame_ancestors = [\"https://*:8006\", \"{}\"]\n",
        api.url(),
        pin_file.display(),
        w.path("pve-local").display(),
        api.url()
    )
}

/// The running daemon's web UI, found in its log.
pub(super) fn web_ui(w: &World, rt: tokio::runtime::Runtime, api: StandInPveApi) -> Ui {
    // signetd logs the web UI's endpoint before it says it is ready.
    let log = w.log("signetd");
    let ep = log
        .lines()
        .find_map(|l| l.split("serving the web UI with TLS endpoint=").nth(1))
        .unwrap_or_else(|| panic!("the web UI's endpoint in the log:\n{log}"))
        .trim();
    let Endpoint::Tcp { host, port } = ep.parse::<Endpoint>().unwrap() else {
        panic!("{ep}")
    };
    assert!(
        log.contains("self-signed"),
        "no PVE certificate here: {log}"
    );
    Ui {
        _rt: rt,
        api,
        url: format!("https://{host}:{port}"),
    }
}

pub(super) fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("web-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Ui {
    /// The URL that logs the browser in as `ticket` at the PVE stand-in, then opens
    /// `page` of the web UI.
    fn via_login(&self, ticket: &str, page: &str) -> String {
        let q = serde_urlencoded_pair("ticket", ticket)
            + "&"
            + &serde_urlencoded_pair("next", &format!("{}{page}", self.url));
        format!("{}/standin/login?{q}", self.api.url())
    }
}

pub(super) fn serde_urlencoded_pair(k: &str, v: &str) -> String {
    let enc: String = v
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("{k}={enc}")
}

/// Runs headless Chromium with its profile in the test's `profile` directory on `url`
/// with `what` (`--dump-dom` or `--screenshot=PATH`); answers its stdout.
fn chromium(w: &World, profile: &str, url: &str, what: &str) -> String {
    let profile = w.path(profile);
    let child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-breakpad",
            "--ignore-certificate-errors",
            "--window-size=1280,900",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(what)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium is installed (scripts/install-deps.sh)");
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "chromium {what} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_overview_says_signing_works_in_a_real_browser_and_every_page_renders() {
    let mut w = World::new();
    let ui = appliance_with_web(&mut w);
    let admin = ui
        .api
        .login("root@pam", "/nodes/pve1", &["Sys.Audit", "Sys.Modify"]);

    // One signature, so the queue and audit pages have something to show.
    let file = w.pe("app.exe");
    let ep = Endpoint::Unix(w.path("signetd.sock"));
    let out = signet(&ep, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    let dom = chromium(&w, "browser", &ui.via_login(&admin, "/"), "--dump-dom");
    assert!(dom.contains("Signing works"), "{dom}");
    assert!(dom.contains("root@pam on pve1"), "{dom}");
    let serial = std::fs::read_to_string(w.path("token-serial")).unwrap();
    assert!(dom.contains(serial.trim()), "the token's serial: {dom}");
    assert!(dom.contains("CN=Signet Demo Code Signing"), "{dom}");
    assert!(dom.contains("data-events=\"/events\""), "{dom}");

    let dom = chromium(&w, "browser", &ui.via_login(&admin, "/audit"), "--dump-dom");
    assert!(dom.contains("The hash chain is intact: 1 record,"), "{dom}");
    assert!(dom.contains("app.exe"), "{dom}");
    let dom = chromium(&w, "browser", &ui.via_login(&admin, "/jobs"), "--dump-dom");
    assert!(dom.contains("<td>signed</td>"), "{dom}");

    // Without the login the browser is sent to PVE's.
    let dom = chromium(&w, "stranger", &format!("{}/", ui.url), "--dump-dom");
    assert!(dom.contains("Log in to Proxmox VE"), "{dom}");
}

/// Headless Chromium driven over the DevTools protocol on a pipe
/// (`--remote-debugging-pipe`: the browser reads commands on fd 3 and writes answers
/// and events on fd 4, each a JSON message ended by a NUL byte).
pub(super) struct Browser {
    child: std::process::Child,
    input: std::process::ChildStdin,
    output: std::sync::mpsc::Receiver<serde_json::Value>,
    pub(super) events: std::collections::VecDeque<serde_json::Value>,
    next_id: u64,
    session: String,
}

/// How long one browser step may take before the test fails (a guard, not a pace).
const BROWSER_STEP: std::time::Duration = std::time::Duration::from_secs(60);

impl Browser {
    pub(super) fn start(w: &World) -> Browser {
        use std::io::Read;
        let mut child = Command::new("sh")
            .arg("-c")
            // The pipe's ends become fds 3 and 4; Chromium's own output goes nowhere.
            .arg("exec \"$0\" \"$@\" 3<&0 4>&1 </dev/null >/dev/null")
            .arg(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-breakpad",
                "--ignore-certificate-errors",
                "--window-size=1280,900",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
            ])
            .arg(format!(
                "--user-data-dir={}",
                w.path("cdp-profile").display()
            ))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium is installed (scripts/install-deps.sh)");
        let input = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, output) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            while let Ok(n) = stdout.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.iter().position(|b| *b == 0) {
                    let msg: Vec<u8> = buf.drain(..=end).collect();
                    if let Ok(v) = serde_json::from_slice(&msg[..msg.len() - 1]) {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            input,
            output,
            events: Default::default(),
            next_id: 0,
            session: String::new(),
        };
        let target = b.call(
            "Target.createTarget",
            serde_json::json!({"url": "about:blank"}),
        );
        let attached = b.call(
            "Target.attachToTarget",
            serde_json::json!({"targetId": target["targetId"], "flatten": true}),
        );
        b.session = attached["sessionId"].as_str().unwrap().to_owned();
        b.call("Page.enable", serde_json::json!({}));
        b
    }

    /// Sends a command (to the page once attached) and answers its result.
    pub(super) fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        use std::io::Write;
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = serde_json::json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = self.session.clone().into();
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.input.write_all(&bytes).unwrap();
        loop {
            let v = self
                .output
                .recv_timeout(BROWSER_STEP)
                .unwrap_or_else(|e| panic!("{method}: no answer from chromium: {e}"));
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
            self.events.push_back(v);
        }
    }

    /// Opens `url` and waits for its page (after any HTTP redirects) to load.
    pub(super) fn open(&mut self, url: &str) {
        self.events.clear();
        self.call("Page.navigate", serde_json::json!({"url": url}));
        self.wait_event("Page.loadEventFired");
    }

    pub(super) fn wait_event(&mut self, method: &str) -> serde_json::Value {
        if let Some(i) = self.events.iter().position(|e| e["method"] == method) {
            return self.events.remove(i).unwrap();
        }
        loop {
            let v = self
                .output
                .recv_timeout(BROWSER_STEP)
                .unwrap_or_else(|e| panic!("no {method} from chromium: {e}"));
            if v["method"] == method {
                return v;
            }
            self.events.push_back(v);
        }
    }

    /// Evaluates `expr` in the page, awaiting it when it is a promise.
    pub(super) fn eval(&mut self, expr: &str) -> serde_json::Value {
        let r = self.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": expr, "awaitPromise": true, "returnByValue": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits until `cond` (a JavaScript expression) is true on the page, checking it
    /// whenever the page's content changes; answers the page's text then.
    pub(super) fn wait_until(&mut self, cond: &str) -> String {
        self.eval(&format!(
            "new Promise(resolve => {{
                const check = () => {{ if ({cond}) {{ observer.disconnect(); resolve(document.body.innerText); }} }};
                const observer = new MutationObserver(check);
                observer.observe(document.body, {{subtree: true, childList: true, characterData: true, attributes: true}});
                check();
            }})"
        ))
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// [`Browser::wait_until`] that outlives navigations (a frame that reloads): an
    /// evaluation cut short by a new document is asked again in it.
    pub(super) fn wait_until_across_loads(&mut self, cond: &str) -> String {
        let expr = format!(
            "new Promise(resolve => {{
                const start = () => {{
                    const check = () => {{ if ({cond}) {{ observer.disconnect(); resolve(document.body.innerText); }} }};
                    const observer = new MutationObserver(check);
                    observer.observe(document.documentElement, {{subtree: true, childList: true, characterData: true, attributes: true}});
                    check();
                }};
                if (document.body) {{ start(); }} else {{ document.addEventListener('DOMContentLoaded', start); }}
            }})"
        );
        let mut last = serde_json::Value::Null;
        for _ in 0..20 {
            use std::io::Write;
            self.next_id += 1;
            let id = self.next_id;
            let msg = serde_json::json!({"id": id, "method": "Runtime.evaluate", "sessionId": self.session,
                "params": {"expression": expr, "awaitPromise": true, "returnByValue": true}});
            let mut bytes = serde_json::to_vec(&msg).unwrap();
            bytes.push(0);
            self.input.write_all(&bytes).unwrap();
            let answer = loop {
                let v = self
                    .output
                    .recv_timeout(BROWSER_STEP)
                    .unwrap_or_else(|e| panic!("{cond}: no answer from chromium: {e}"));
                if v["id"] == id {
                    break v;
                }
                self.events.push_back(v);
            };
            if answer.get("error").is_none() && answer["result"].get("exceptionDetails").is_none() {
                return answer["result"]["result"]["value"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
            }
            last = answer; // the document went away while waiting: ask the next one
        }
        panic!("{cond}: {last}")
    }

    /// Sets the cookie `name` for `url`'s host (a cookie PVE's UI would have set).
    pub(super) fn set_cookie(&mut self, url: &str, name: &str, value: &str) {
        self.call(
            "Network.setCookie",
            serde_json::json!({"url": url, "name": name, "value": value, "secure": true}),
        );
    }

    /// Makes the frames of other sites (out-of-process frames) attach as they appear.
    pub(super) fn attach_frames(&mut self) {
        self.call(
            "Target.setAutoAttach",
            serde_json::json!({"autoAttach": true, "waitForDebuggerOnStart": false, "flatten": true}),
        );
    }

    /// The session of the frame whose URL starts with `prefix` (after
    /// [`Browser::attach_frames`]), waiting for it to appear.
    pub(super) fn frame_session(&mut self, prefix: &str) -> String {
        loop {
            let e = self.wait_event("Target.attachedToTarget");
            let info = &e["params"]["targetInfo"];
            // A frame may attach before it has its address.
            let url = info["url"].as_str().unwrap_or("");
            if info["type"] == "iframe"
                && (url.starts_with(prefix) || url.is_empty() || url == "about:blank")
            {
                return e["params"]["sessionId"].as_str().unwrap().to_owned();
            }
        }
    }

    /// Runs `f` with commands going to `session` (a frame's) instead of the page's.
    pub(super) fn in_session<R>(&mut self, session: &str, f: impl FnOnce(&mut Browser) -> R) -> R {
        let page = std::mem::replace(&mut self.session, session.to_owned());
        let r = f(self);
        self.session = page;
        r
    }

    /// Lets the page see the system's colour scheme as `scheme` (`light`, `dark`).
    pub(super) fn prefer_color_scheme(&mut self, scheme: &str) {
        self.call(
            "Emulation.setEmulatedMedia",
            serde_json::json!({"features": [{"name": "prefers-color-scheme", "value": scheme}]}),
        );
    }

    /// The page body's computed background colour (`rgb(R, G, B)`).
    pub(super) fn background(&mut self) -> String {
        self.eval("getComputedStyle(document.body).backgroundColor")
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub(super) fn screenshot(&mut self, name: &str) {
        use base64::Engine;
        let shot = self.call(
            "Page.captureScreenshot",
            serde_json::json!({"format": "png"}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        std::fs::write(screenshots().join(name), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn in_a_browser_an_operator_cancels_a_job_and_the_overview_follows_the_token_live() {
    let mut w = World::new();
    let ui = appliance_with_web(&mut w);
    let admin = ui
        .api
        .login("root@pam", "/nodes/pve1", &["Sys.Audit", "Sys.Modify"]);
    let agent = Endpoint::Unix(w.path("agent.sock"));
    let ep = Endpoint::Unix(w.path("signetd.sock"));
    let mut events = Events::follow(&agent);
    let tokens = TokenDir::of(&w);
    tokens.vanish();
    events.wait_for("token_lost");

    let mut b = Browser::start(&w);
    b.open(&ui.via_login(&admin, "/"));
    let text = b.wait_until("document.getElementById('verdict').innerText.includes('Token')");
    assert!(text.contains("Token lost"), "{text}");
    b.screenshot("overview-token-lost.png");

    // Two jobs while the token is away: the first goes to the agent and back, the
    // second waits behind it.
    let pe = std::fs::read(w.path("hello.exe")).unwrap();
    let send = |name: &str| {
        let (ep, pe, path) = (ep.clone(), pe.clone(), format!("/v1/sign?filename={name}"));
        std::thread::spawn(move || call(&ep, "POST", &path, pe))
    };
    let first = send("first.exe");
    b.wait_until("document.getElementById('queue').dataset.pending === '1'");
    let second = send("second.exe");
    // The overview counts it without a reload.
    b.eval("window.signetSamePage = true");
    b.wait_until("document.getElementById('queue').dataset.pending === '2'");
    assert_eq!(b.eval("window.signetSamePage === true"), true, "no reload");

    // The operator cancels the waiting one from the queue page, confirming.
    b.open(&format!("{}/jobs", ui.url));
    let row = b.eval(
        "(() => { const row = [...document.querySelectorAll('tbody tr')]
             .find(r => r.innerText.includes('second.exe'));
           return row ? row.id : null; })()",
    );
    let id = row
        .as_str()
        .expect("second.exe is listed")
        .trim_start_matches("job-")
        .to_owned();
    b.eval("window.confirm = () => true");
    b.screenshot("jobs.png");
    b.events.clear();
    b.eval(&format!(
        "document.querySelector('#job-{id} form button').click()"
    ));
    b.wait_event("Page.loadEventFired");
    let text = b.wait_until("document.body.innerText.includes('was cancelled')");
    assert!(text.contains(&format!("Job {id} was cancelled.")), "{text}");
    let (status, body) = second.join().unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("cancelled")),
        "{body}"
    );
    let audit = w.signetd(&["audit", "export"]);
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&audit.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        records
            .iter()
            .any(|r| r["job"] == id.as_str() && r["result"] == "cancelled"),
        "{records:?}"
    );
    // And the operator's own record: who cancelled it, from where.
    assert!(
        records.iter().any(|r| r["job"] == id.as_str()
            && r["result"] == "cancel"
            && r["caller"] == "pve:root@pam"
            && r["transport"] == "web"),
        "{records:?}"
    );

    // The token comes back: the overview says so by itself, and the first job is signed.
    b.open(&format!("{}/", ui.url));
    b.eval("window.signetSamePage = true");
    tokens.restore();
    let text = b.wait_until(
        "document.getElementById('verdict').innerText.includes('Signing works')
         && document.getElementById('signed-last-hour').innerText === '1'",
    );
    assert!(text.contains("Signing works"), "{text}");
    assert_eq!(b.eval("window.signetSamePage === true"), true, "no reload");
    b.screenshot("overview-live.png");
    let (status, _) = first.join().unwrap();
    assert_eq!(status, 200);
    b.open(&format!("{}/audit", ui.url));
    let text = b.wait_until("document.getElementById('chain') !== null");
    // The signature, the cancelled job and the operator's cancel.
    assert!(
        text.contains("The hash chain is intact: 3 records"),
        "{text}"
    );
    b.screenshot("audit.png");
}

#[test]
fn in_a_browser_the_recovery_page_follows_a_token_loss_and_an_operator_enrolls_a_vm() {
    let mut w = World::new();
    // fake-qm (the stand-in for Proxmox's qm) keeps VM 200's configuration here.
    let pve = w.path("pve");
    std::fs::create_dir_all(&pve).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../appliance/signetd/tests");
    std::fs::copy(
        fixtures.join("data/qm-config/with-args.conf"),
        pve.join("200.conf"),
    )
    .unwrap();
    let qm = w.path("qm");
    std::fs::write(
        &qm,
        format!(
            "#!/bin/sh\nFAKE_QM_DIR='{}' exec '{}' \"$@\"\n",
            pve.display(),
            fixtures.join("fixtures/fake-qm").display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&qm, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let ui = appliance_with_web_and(&mut w, &format!("[doctor]\nqm = \"{}\"\n", qm.display()));
    let admin = ui
        .api
        .login("root@pam", "/nodes/pve1", &["Sys.Audit", "Sys.Modify"]);
    let agent = Endpoint::Unix(w.path("agent.sock"));
    let ep = Endpoint::Unix(w.path("signetd.sock"));

    // One signature before, so the chart has a latency to show.
    let file = w.pe("before.exe");
    let out = signet(&ep, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    let mut b = Browser::start(&w);
    b.open(&ui.via_login(&admin, "/timeline"));
    let text = b.wait_until("document.getElementById('jobs-signed') !== null");
    assert!(text.contains("Recovery"), "{text}");
    b.eval("window.signetSamePage = true");

    // The token goes away and comes back: the page shows both without a reload.
    let mut events = Events::follow(&agent);
    let tokens = TokenDir::of(&w);
    tokens.vanish();
    events.wait_for("token_lost");
    tokens.restore();
    events.wait_for("logged_in");
    let text = b.wait_until(
        "document.getElementById('timeline') !== null
         && document.getElementById('timeline').innerText.includes('Token back')",
    );
    assert!(text.contains("Token lost"), "{text}");
    assert_eq!(b.eval("window.signetSamePage === true"), true, "no reload");
    assert_eq!(
        b.eval("document.querySelectorAll('svg.chart rect.down.token').length"),
        1
    );
    assert_eq!(
        b.eval("document.querySelectorAll('svg.chart circle.job').length"),
        1
    );
    b.screenshot("timeline.png");

    // Enroll build VM 200: the dry run first, then the change, confirmed.
    b.open(&format!("{}/enroll", ui.url));
    b.eval("document.querySelector('input[name=vmid]').value = '200'");
    b.screenshot("enroll.png");
    b.events.clear();
    b.eval("document.querySelector('#enroll-form button[type=submit]').click()");
    b.wait_event("Page.loadEventFired");
    let text = b.wait_until("document.getElementById('preview') !== null");
    assert!(text.contains("Enroll VM 200 as build VM?"), "{text}");
    assert!(text.contains("guest-cid=200"), "{text}");
    let before = std::fs::read_to_string(pve.join("200.conf")).unwrap();
    assert!(
        !before.contains("guest-cid=200"),
        "the dry run changed nothing"
    );
    b.screenshot("enroll-preview.png");
    b.eval("window.confirm = () => true");
    b.events.clear();
    b.eval("document.querySelector('form[action=\"/enroll\"] button').click()");
    b.wait_event("Page.loadEventFired");
    let text = b.wait_until("document.getElementById('done') !== null");
    assert!(text.contains("VM 200 enrolled as build VM"), "{text}");
    b.screenshot("enroll-done.png");
    let after = std::fs::read_to_string(pve.join("200.conf")).unwrap();
    assert!(after.contains("guest-cid=200"), "{after}");
    let audit = w.signetd(&["audit", "export"]);
    let records = String::from_utf8_lossy(&audit.stdout).into_owned();
    assert!(
        records
            .lines()
            .any(|l| l.contains("\"result\":\"enroll\"")
                && l.contains("\"caller\":\"pve:root@pam\"")),
        "{records}"
    );

    // The overview with the host's tokens, as this host has them (none plugged in).
    b.open(&format!("{}/", ui.url));
    let text = b.wait_until("document.getElementById('host-tokens') !== null");
    assert!(text.contains("Tokens on this host"), "{text}");
    b.screenshot("overview-tokens.png");
}

#[test]
fn a_web_ui_that_cannot_start_does_not_stop_signing() {
    let mut w = World::new();
    let pin = w.path("pin");
    let agent = w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    let ep = w
        .start_daemon_with(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
            &format!(
                "[profiles.release]\n[web]\nlisten = [\"tcp:127.0.0.1:0\"]\ncert = \"{0}/missing.pem\"\nkey = \"{0}/missing.key\"\n",
                w.dir.path().display()
            ),
        )
        .remove(0);
    let log = w.log("signetd");
    assert!(log.contains("the web UI is not served"), "{log}");
    assert!(log.contains("web.cert"), "the log says what to fix: {log}");
    let file = w.pe("app.exe");
    let out = signet(&ep, &["sign", file.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&w, &file).0);
}

#[test]
fn in_a_browser_an_operator_detaches_and_attaches_a_token_the_host_keeps_in_its_vm() {
    use super::passthrough::Qemu;
    const SERIAL: &str = "0123ABCD";
    let mut w = World::new();
    // The signing VM's QEMU with Signet's monitor; signetd in a umockdev testbed that
    // plugs in a fake SafeNet token when asked (as in e2e/passthrough.rs).
    let monitors = w.path("monitors");
    std::fs::create_dir(&monitors).unwrap();
    let _qemu = Qemu::start(
        &signetd::adapters::proxmox::monitor_path(&monitors, 105),
        &w.path("qemu-server.qmp"),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(StandInPveApi::start()).unwrap();
    let http = w.path("signetd.sock");
    w.write_daemon_config(&format!(
        "listen = [\"unix:{}\"]\nagent = \"unix:{}\"\ndbus = \"none\"\n\
         [passthrough]\nmonitor_dir = \"{}\"\n[[tokens]]\nserial = \"{SERIAL}\"\nvm = 105\n{}",
        http.display(),
        w.path("no-agent.sock").display(),
        monitors.display(),
        web_section(&w, &api)
    ));
    let (ep, mut testbed) = Testbed::start_daemon(&mut w);
    let ui = web_ui(&w, rt, api);
    let place = || {
        let (_, r) = call(&ep, "GET", "/v1/tokens", Vec::new());
        r["tokens"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["serial"] == SERIAL).cloned())
            .unwrap_or_default()
    };
    let in_vm = |t: &serde_json::Value| t["state"] == "attaching" && t["accepted"] == true;
    testbed.ask(&format!("add 2 5 {SERIAL}"));
    wait_until("the token in VM 105", || in_vm(&place()));

    let admin = ui
        .api
        .login("root@pam", "/nodes/pve1", &["Sys.Audit", "Sys.Modify"]);
    let mut b = Browser::start(&w);
    b.open(&ui.via_login(&admin, "/"));
    let text = b.wait_until(
        "document.getElementById('token-0123ABCD') !== null
         && document.getElementById('token-0123ABCD').innerText.includes('VM 105')",
    );
    assert!(text.contains("SafeNet eToken 5110"), "{text}");
    assert!(text.contains("port 1-2"), "{text}");
    b.screenshot("overview-host-token.png");

    // Detach: the link asks first, the confirmed form does it.
    b.events.clear();
    b.eval("document.querySelector('#token-0123ABCD a[href$=\"/detach\"]').click()");
    b.wait_event("Page.loadEventFired");
    let text = b.wait_until("document.querySelector('button.primary') !== null");
    assert!(
        text.contains("Detach token 0123ABCD from VM 105?"),
        "{text}"
    );
    assert!(in_vm(&place()), "asking changed nothing");
    b.screenshot("token-confirm-detach.png");
    b.events.clear();
    b.eval("document.querySelector('button.primary').click()");
    b.wait_event("Page.loadEventFired");
    let text = b.wait_until("document.getElementById('done') !== null");
    assert!(text.contains("Token 0123ABCD detached"), "{text}");
    assert!(text.contains("Now: on host"), "{text}");
    b.screenshot("token-detached.png");
    assert_eq!(place()["state"], "on_host");

    // The overview offers to attach it again; confirmed, it goes back into VM 105.
    b.open(&format!("{}/", ui.url));
    b.wait_until("document.querySelector('#token-0123ABCD a[href$=\"/attach\"]') !== null");
    b.events.clear();
    b.eval("document.querySelector('#token-0123ABCD a[href$=\"/attach\"]').click()");
    b.wait_event("Page.loadEventFired");
    b.wait_until("document.querySelector('button.primary') !== null");
    b.events.clear();
    b.eval("document.querySelector('button.primary').click()");
    b.wait_event("Page.loadEventFired");
    let text = b.wait_until("document.getElementById('done') !== null");
    assert!(text.contains("Token 0123ABCD attached"), "{text}");
    wait_until("the token back in VM 105", || in_vm(&place()));

    // Both actions are in the audit log under the PVE user.
    let audit = w.signetd(&["audit", "export"]);
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&audit.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let actions: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["result"].as_str().unwrap_or(""),
                r["caller"].as_str().unwrap_or(""),
                r["token_serial"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("detach", "pve:root@pam", SERIAL),
            ("attach", "pve:root@pam", SERIAL)
        ]
    );
}

/// `curl -k` against the web UI with `ticket` as the PVE cookie (encoded as a browser
/// sends it): the status and the page.
fn web_curl(ui: &Ui, ticket: &str, method: &str, page: &str, form: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sk",
        "--max-time",
        "60",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ])
    .args(["-b", &serde_urlencoded_pair("PVEAuthCookie", ticket)]);
    if let Some(f) = form {
        cmd.args(["--data", f]);
    }
    let out = cmd.arg(format!("{}{page}", ui.url)).output().unwrap();
    let all = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = all.rsplit_once('\n').unwrap_or(("", "0"));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn only_root_at_pam_may_enroll_from_the_web_ui() {
    let mut w = World::new();
    let ui = appliance_with_web(&mut w);
    // A PVE administrator who is not root@pam: it may act, but PVE keeps a VM's args
    // for root@pam, so it may not enroll.
    let admin = ui
        .api
        .login("admin@pve", "/nodes/pve1", &["Sys.Audit", "Sys.Modify"]);
    let (status, page) = web_curl(&ui, &admin, "GET", "/enroll", None);
    assert_eq!(status, 403, "{page}");
    assert!(
        page.contains("admin@pve may not enroll a VM") && page.contains("root@pam"),
        "{page}"
    );
    for path in ["/enroll/preview", "/enroll"] {
        let (status, page) = web_curl(
            &ui,
            &admin,
            "POST",
            path,
            Some("csrf=x&role=build-vm&vmid=200&serial=&profiles="),
        );
        assert_eq!(status, 403, "{path}: {page}");
        assert!(page.contains("root@pam"), "{path}: {page}");
    }
    // root@pam gets the form.
    let root = ui
        .api
        .login("root@pam", "/nodes/pve1", &["Sys.Audit", "Sys.Modify"]);
    let (status, page) = web_curl(&ui, &root, "GET", "/enroll", None);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("enroll-form"), "{page}");
    // The refusal is in the audit log, under the PVE user.
    let out = w.signetd(&["audit", "export"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("\"caller\":\"pve:admin@pve\"")
                && l.contains("\"transport\":\"web\"")
                && l.contains("\"error\":\"forbidden\"")),
        "{text}"
    );
}

#[test]
fn in_a_browser_the_pages_follow_pves_theme_and_else_the_systems_preference() {
    let mut w = World::new();
    let ui = appliance_with_web(&mut w);
    let admin = ui.api.login("root@pam", "/nodes/pve1", &["Sys.Audit"]);
    const DARK: &str = "rgb(27, 27, 27)";
    const LIGHT: &str = "rgb(245, 245, 245)";

    let mut b = Browser::start(&w);
    // The system prefers light; PVE shows its dark theme: the tab passes ?theme=.
    b.prefer_color_scheme("light");
    b.open(&ui.via_login(&admin, "/?theme=proxmox-dark"));
    b.wait_until("document.getElementById('verdict') !== null");
    assert_eq!(b.background(), DARK);
    b.screenshot("overview-dark.png");
    // The pages after it keep the theme for the session.
    b.open(&format!("{}/jobs", ui.url));
    b.wait_until("document.getElementById('live') !== null");
    assert_eq!(b.background(), DARK);
    // PVE's light theme, though the system prefers dark.
    b.prefer_color_scheme("dark");
    b.open(&format!("{}/?theme=crisp", ui.url));
    b.wait_until("document.getElementById('verdict') !== null");
    assert_eq!(b.background(), LIGHT);
    // PVE's "auto", like a page opened on its own, follows the system.
    b.open(&format!("{}/audit?theme=auto", ui.url));
    b.wait_until("document.getElementById('chain') !== null");
    assert_eq!(b.background(), DARK);
    b.screenshot("audit-dark.png");
    b.prefer_color_scheme("light");
    assert_eq!(b.background(), LIGHT);
    // A theme PVE does not have changes nothing.
    b.open(&format!("{}/?theme=neon", ui.url));
    b.wait_until("document.getElementById('verdict') !== null");
    assert_eq!(b.eval("document.documentElement.dataset.theme"), "auto");
}

#[test]
fn in_a_browser_the_queue_and_audit_pages_show_new_jobs_and_records_without_a_reload() {
    let mut w = World::new();
    let ui = appliance_with_web(&mut w);
    let admin = ui.api.login("root@pam", "/nodes/pve1", &["Sys.Audit"]);
    let ep = Endpoint::Unix(w.path("signetd.sock"));
    let sign = |w: &World, name: &str| {
        let file = w.pe(name);
        let out = signet(&ep, &["sign", file.to_str().unwrap()]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    };

    // The queue page is open; a job is signed: it is listed as ended, no reload.
    let mut b = Browser::start(&w);
    b.open(&ui.via_login(&admin, "/jobs"));
    let text = b.wait_until("document.getElementById('live') !== null");
    assert!(text.contains("No job has ended yet."), "{text}");
    b.eval("window.signetSamePage = true");
    sign(&w, "queued.exe");
    let text = b.wait_until(
        "[...document.querySelectorAll('tr[id^=ended-]')]
             .some(r => r.innerText.includes('queued.exe') && r.innerText.includes('signed'))",
    );
    assert!(!text.contains("No job has ended yet."), "{text}");
    assert_eq!(b.eval("window.signetSamePage === true"), true, "no reload");
    b.screenshot("jobs-live.png");

    // The audit page, searched for "wanted", with more typed in the search field and
    // not sent yet: a matching record appears, one that does not match does not, and
    // the field keeps what was typed.
    b.open(&format!("{}/audit?q=wanted", ui.url));
    let text = b.wait_until("document.getElementById('chain') !== null");
    assert!(text.contains("0 records match"), "{text}");
    b.eval("window.signetSamePage = true");
    b.eval("document.querySelector('input[name=q]').value = 'wanted.exe and more'");
    sign(&w, "other.exe");
    sign(&w, "wanted.exe");
    let text = b.wait_until("document.getElementById('live').innerText.includes('wanted.exe')");
    assert!(text.contains("1 record matches"), "{text}");
    assert!(!text.contains("other.exe"), "the search holds: {text}");
    assert!(
        text.contains("The hash chain is intact: 3 records"),
        "{text}"
    );
    assert_eq!(
        b.eval("document.querySelector('input[name=q]').value"),
        "wanted.exe and more"
    );
    assert_eq!(b.eval("window.signetSamePage === true"), true, "no reload");
    b.screenshot("audit-live.png");
}
