//! The link between signetd and signet-agent: the agent answers only the host it is
//! paired with, pairing is the operator's step with a one-time code (real
//! `signet-agent pair` and `signetd pair`), a rogue listener on the agent's port never
//! hears the PIN, and the agent's uploads are bounded like signetd's.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use signet_protocol::link::{self, HostLink};
use signet_protocol::Endpoint;
use signet_test_support::*;

fn unix(w: &World, name: &str) -> String {
    format!("unix:{}", w.path(name).display())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn pair_json(w: &World) -> serde_json::Value {
    let out = Command::new(bin("signet-agent"))
        .arg("--config")
        .arg(w.path("agent.toml"))
        .args(["pair", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A host key of another host (its own state directory), which believes `agent_key`
/// is its agent's, so only the agent's judgement of the host key is tested.
fn other_host(dir: &Path, agent_key: &str) -> HostLink {
    let other = HostLink::open(dir).unwrap();
    link::write_pin(&dir.join(link::AGENT_PIN_FILE), &agent_key.parse().unwrap()).unwrap();
    other
}

/// `method path` over `link` straight to `agent`: the status, or the error.
fn call_via(link: &HostLink, agent: &Endpoint, method: &str, path: &str) -> Result<u16, String> {
    rt().block_on(async {
        let stream = signet_protocol::transport::connect(agent)
            .await
            .map_err(|e| e.to_string())?;
        let tls = link
            .handshake(agent, stream)
            .await
            .map_err(|e| e.to_string())?;
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "signet")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"{\"pin\":\"1234\"}",
            )))
            .unwrap();
        signet_protocol::client::send_over(tls, agent, req)
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| {
                // The agent's alert, or (when the request crossed it) the link it cut.
                if link::refused_by_peer(&e) || link::closed_by_peer(&e) {
                    link::refused_error(agent).to_string()
                } else {
                    e.to_string()
                }
            })
    })
}

#[test]
fn the_agent_answers_only_the_host_it_is_paired_with() {
    let mut w = World::new();
    let agent = w.start_agent(&unix(&w, "agent.sock"), SOFTHSM, &w.path("pin"), &[]);
    // The paired host (this world's key) is answered.
    let (status, h) = call_json(&agent, "GET", "/agent/v1/health", None);
    assert_eq!(status, 200, "{h:#}");
    let key = pair_json(&w)["fingerprint"].as_str().unwrap().to_owned();
    // (That opened a window; close it again so the next checks see the agent as usual.)
    link::Window::take(&w.path("agent-state"));

    // Plain HTTP, without TLS: no answer at all.
    let plain = rt().block_on(async {
        let stream = signet_protocol::transport::connect(&agent).await.unwrap();
        let req = http::Request::get("/agent/v1/health")
            .header("host", "signet")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        signet_protocol::client::send_over(stream, &agent, req).await
    });
    assert!(plain.is_err(), "plain HTTP got an answer: {plain:?}");

    // Another host's key (another uid's, or root's without this host's key): the
    // handshake is refused, whatever it asks.
    let dir = tempfile::tempdir().unwrap();
    let other = other_host(dir.path(), &key);
    for (method, path) in [
        ("POST", "/agent/v1/sign?profile=x"),
        ("POST", "/agent/v1/login"),
        ("POST", "/agent/v1/reinit"),
        ("GET", "/agent/v1/events"),
        ("GET", "/agent/v1/health"),
    ] {
        let e = call_via(&other, &agent, method, path).unwrap_err();
        assert!(
            e.contains("refused this host's key"),
            "{method} {path}: {e}"
        );
    }
    // While a pairing window is open another key is let in for pairing only.
    pair_json(&w);
    for (method, path) in [("POST", "/agent/v1/login"), ("GET", "/agent/v1/health")] {
        assert_eq!(
            call_via(&other, &agent, method, path),
            Ok(403),
            "{method} {path}"
        );
    }
    // A wrong code closes the window: one attempt per code.
    let e = rt()
        .block_on(signet_protocol::pairing::pair(
            &other,
            &agent,
            "AAAA-BBBB-CCCC-DDDD",
        ))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not match"), "{e}");
    assert!(link::Window::current(&w.path("agent-state")).is_none());
    let e = call_via(&other, &agent, "GET", "/agent/v1/health").unwrap_err();
    assert!(e.contains("refused this host's key"), "{e}");
    // The paired host is still the one answered, and the token never saw the others.
    let (status, h) = call_json(&agent, "GET", "/agent/v1/health", None);
    assert_eq!(status, 200);
    assert_eq!(h["logged_in"], true, "{h:#}");
    let log = w.log("signet-agent");
    assert!(
        log.contains("refused a host key this agent is not paired with"),
        "{log}"
    );
    assert!(log.contains("a pairing attempt with a wrong code"), "{log}");
}

#[test]
fn the_operator_pairs_a_new_host_with_the_real_commands() {
    let mut w = World::new();
    let agent = w.start_agent(&unix(&w, "agent.sock"), SOFTHSM, &w.path("pin"), &[]);
    let state = w.path("new-host");
    let config = w.path("new-host.toml");
    std::fs::write(
        &config,
        format!(
            "agent = \"{agent}\"\nstate_dir = \"{}\"\nlisten = [\"unix:{}\"]\ndbus = \"none\"\n",
            state.display(),
            w.path("new.sock").display()
        ),
    )
    .unwrap();
    let signetd_pair = |code: &str| {
        Command::new(bin("signetd"))
            .arg("--config")
            .arg(&config)
            .args(["pair", code, "--json"])
            .output()
            .unwrap()
    };
    // No window open: refused, naming the fix.
    let out = signetd_pair("ABCD-EFGH-JKMN-PQRS");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no pairing window is open"), "{err}");
    assert!(err.contains("signet-agent pair"), "{err}");
    // Not a code at all: said before anything is sent.
    let out = signetd_pair("hello");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a pairing code"));

    let shown = pair_json(&w);
    let code = shown["code"]
        .as_str()
        .unwrap()
        .to_lowercase()
        .replace('-', " ");
    let out = signetd_pair(&code);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let paired: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(paired["agent"], shown["fingerprint"]);
    assert_eq!(
        std::fs::read_to_string(state.join(link::AGENT_PIN_FILE))
            .unwrap()
            .trim(),
        shown["fingerprint"].as_str().unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(w.path("agent-state").join(link::HOST_PIN_FILE))
            .unwrap()
            .trim(),
        paired["host"].as_str().unwrap()
    );
    // The agent now answers the new host, and no longer the old one.
    let err = std::panic::catch_unwind(|| call_json(&agent, "GET", "/agent/v1/health", None));
    assert!(err.is_err(), "the old host is still answered");
    // The code worked once.
    let out = signetd_pair(shown["code"].as_str().unwrap());
    assert!(!out.status.success());
    // Every attempt is in the host's audit log under the uid that made it: the three
    // refused ones and the one that pinned the agent's key, which it names.
    let pairs: Vec<serde_json::Value> = signet_test_support::audit_export(&config)
        .into_iter()
        .filter(|r| r["result"] == "pair")
        .collect();
    let me = format!("uid:{}", nix::unistd::getuid().as_raw());
    assert_eq!(pairs.len(), 4, "{pairs:#?}");
    assert!(pairs
        .iter()
        .all(|r| r["caller"] == me.as_str() && r["transport"] == "cli"));
    let pinned: Vec<_> = pairs.iter().filter(|r| r["error"].is_null()).collect();
    assert_eq!(pinned.len(), 1, "{pairs:#?}");
    assert!(
        pinned[0]["filename"]
            .as_str()
            .unwrap()
            .ends_with(&format!("key {}", shown["fingerprint"].as_str().unwrap())),
        "{pairs:#?}"
    );
    assert!(pairs
        .iter()
        .filter(|r| !r["error"].is_null())
        .all(|r| r["error"] == "pairing_failed"));
    // `signet-agent key` names both keys.
    let out = Command::new(bin("signet-agent"))
        .arg("--config")
        .arg(w.path("agent.toml"))
        .args(["key", "--json"])
        .output()
        .unwrap();
    let key: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(key["host"], paired["host"]);
    assert_eq!(key["fingerprint"], shown["fingerprint"]);
}

#[test]
fn a_rogue_listener_on_the_agents_port_never_hears_the_pin() {
    let mut w = World::new();
    let sock = unix(&w, "agent.sock");
    // The agent waits for the PIN from the host.
    let agent = w.start_agent_config(&sock, SOFTHSM, None, &[], "");
    std::fs::copy(w.path("pin"), w.path("host-pin")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(w.path("host-pin"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
    }
    let mut cfg = format!(
        "listen = [\"unix:{}\"]\nagent = \"{agent}\"\ndbus = \"none\"\npin_file = \"{}\"\n[profiles.release]\n",
        w.path("signetd.sock").display(),
        w.path("host-pin").display()
    );
    cfg.push_str("[[grants]]\ncallers = [\"uid:0\"]\nprofiles = [\"*\"]\n");
    w.start_daemon_config(&cfg);
    wait_until("the host gave the agent its PIN", || {
        call_json(&agent, "GET", "/agent/v1/health", None).1["logged_in"] == true
    });
    // The agent goes away; a rogue takes its socket with a key of its own and accepts
    // any host (as a stolen port would), recording every request it hears.
    w.kill("signet-agent");
    std::fs::remove_file(w.path("agent.sock")).unwrap();
    let heard: Arc<Mutex<Vec<String>>> = Arc::default();
    let rogue_dir = tempfile::tempdir().unwrap();
    let rogue_key = link::Identity::load_or_create(rogue_dir.path(), "signet-agent").unwrap();
    link::Window::open(rogue_dir.path()).unwrap();
    let acceptor = link::acceptor(&rogue_key, rogue_dir.path()).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = {
        let heard = heard.clone();
        let agent = agent.clone();
        std::thread::spawn(move || {
            rt().block_on(async move {
                let listener = signet_protocol::transport::Listener::bind(&agent)
                    .await
                    .unwrap();
                let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
                    let heard = heard.clone();
                    async move {
                        use http_body_util::BodyExt;
                        let uri = req.uri().to_string();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        heard.lock().unwrap().push(format!(
                            "{uri} {}",
                            String::from_utf8_lossy(&body.unwrap_or_default())
                        ));
                        "{}"
                    }
                });
                signet_protocol::serve::serve(
                    listener,
                    app,
                    Duration::from_secs(10),
                    16,
                    Some(acceptor),
                    stop_rx,
                )
                .await;
            })
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !w
        .log("signetd")
        .contains("is not the agent this host was paired with")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "signetd never said it refused the rogue's key; its log:\n{}",
            w.log("signetd")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop_tx.send_replace(true);
    server.join().unwrap();
    let heard = heard.lock().unwrap();
    assert!(heard.is_empty(), "the rogue heard: {heard:?}");
    let pin = std::fs::read_to_string(w.path("pin")).unwrap();
    assert!(!heard.iter().any(|h| h.contains(pin.trim())));
}

#[test]
fn agent_uploads_have_size_and_header_limits() {
    let mut w = World::new();
    let agent = w.start_agent_with(
        &unix(&w, "agent.sock"),
        SOFTHSM,
        &w.path("pin"),
        &[],
        "[limits]\nmax_input_size = 1000\nheader_timeout_seconds = 1\n",
    );
    // A declared length above the limit is refused from the headers.
    let (status, body) = call(
        &agent,
        "POST",
        "/agent/v1/sign?profile=release",
        vec![0u8; 4000],
    );
    assert_eq!(status, 413, "{body:#}");
    assert_eq!(body["code"], "input_too_large");
    // A connection that sends no request is closed after the header time limit.
    let link = HostLink::open(&w.path("state")).unwrap();
    let closed = rt().block_on(async {
        use tokio::io::AsyncReadExt;
        let stream = signet_protocol::transport::connect(&agent).await.unwrap();
        let mut tls = link.handshake(&agent, stream).await.unwrap();
        let mut buf = [0u8; 64];
        tokio::time::timeout(Duration::from_secs(60), tls.read(&mut buf)).await
    });
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the silent connection stayed open: {closed:?}"
    );
}
