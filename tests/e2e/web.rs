//! The web UI in a real browser: headless Chromium against `signetd` on loopback with
//! a SoftHSM-backed agent, logged in through `StandInPveApi` as a PVE user is (the
//! login sets `PVEAuthCookie` for the host; the browser sends it to the UI's port).
//! Screenshots of each page go to `target/web-screenshots/` for people to look at.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use signetd::web::standin::StandInPveApi;

use super::*;

const CHROMIUM: &str = "chromium";

struct Ui {
    _rt: tokio::runtime::Runtime,
    api: StandInPveApi,
    /// `https://127.0.0.1:PORT` of the web UI.
    url: String,
}

/// Agent (SoftHSM) and daemon with `[web]` on a free loopback port, its logins checked
/// by a stand-in PVE API.
fn appliance_with_web(w: &mut World) -> Ui {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(StandInPveApi::start()).unwrap();
    let pin_file = w.path("pve-api.pem");
    std::fs::write(&pin_file, api.cert_pem()).unwrap();
    let pin = w.path("pin");
    let agent = w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    std::fs::create_dir_all(w.path("pve-local")).unwrap();
    w.start_daemon_with(
        &[&format!("unix:{}", w.path("signetd.sock").display())],
        &agent,
        &format!(
            "[profiles.release]\ndescription = \"Signet test\"\n\
             [web]\nlisten = [\"tcp:127.0.0.1:0\"]\nnode = \"pve1\"\npve_api = \"{}\"\n\
             pve_api_cert = \"{}\"\npve_local_dir = \"{}\"\n",
            api.url(),
            pin_file.display(),
            w.path("pve-local").display()
        ),
    );
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

fn screenshots() -> PathBuf {
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

fn serde_urlencoded_pair(k: &str, v: &str) -> String {
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

    let shots = screenshots();
    for (page, name) in [("/", "overview"), ("/jobs", "jobs"), ("/audit", "audit")] {
        let png = shots.join(format!("{name}.png"));
        let _ = std::fs::remove_file(&png);
        chromium(
            &w,
            "browser",
            &ui.via_login(&admin, page),
            &format!("--screenshot={}", png.display()),
        );
        let bytes = std::fs::read(&png).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{}", png.display());
    }

    // Without the login the browser is sent to PVE's.
    let dom = chromium(&w, "stranger", &format!("{}/", ui.url), "--dump-dom");
    assert!(dom.contains("Log in to Proxmox VE"), "{dom}");
}
