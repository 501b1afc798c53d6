//! The D-Bus front and `signetctl` against a private system-style `dbus-daemon` that
//! loads Signet's real policy file.

use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

use signet_test_support::*;

/// A private bus, stopped on drop.
pub(crate) struct Bus {
    pub(crate) address: String,
    pid: i32,
}

impl Bus {
    pub(crate) fn start(w: &World) -> Bus {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_owned();
        Bus::start_with_policy(w, &root.join("packaging/dbus/org.signet.Signet1.conf"))
    }

    /// A private bus with `policy` in place of Signet's policy file.
    pub(crate) fn start_with_policy(w: &World, policy: &std::path::Path) -> Bus {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_owned();
        let conf = std::fs::read_to_string(root.join("tests/fixtures/dbus-system.conf.in"))
            .unwrap()
            .replace("@SOCKET@", w.path("bus.sock").to_str().unwrap())
            .replace("@POLICY@", policy.to_str().unwrap());
        std::fs::write(w.path("bus.conf"), conf).unwrap();
        let out = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", w.path("bus.conf").display()))
            .args([
                "--fork",
                "--print-address=1",
                "--print-pid=1",
                "--nopidfile",
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "dbus-daemon: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        let address = lines.next().unwrap().to_owned();
        let pid = lines.next().unwrap().trim().parse().unwrap();
        Bus { address, pid }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// Signet's signals of one kind (`TokenChanged`, `RecoveryStep`, `JobFinished`), read on a thread of
/// their own; each as the JSON document it carries (its last argument).
pub(crate) struct Signals {
    rx: std::sync::mpsc::Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
}

/// How long a test waits for a signal.
const SIGNAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl Signals {
    /// Subscribes to `member`; returns once the bus has the match rule, so no later
    /// signal is missed.
    pub(crate) fn follow(address: &str, member: &'static str) -> Signals {
        let (tx, rx) = std::sync::mpsc::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let address = address.to_owned();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use futures_util::StreamExt;
                let conn = zbus::connection::Builder::address(address.as_str())
                    .build()
                    .await
                    .unwrap();
                let rule = zbus::MatchRule::builder()
                    .msg_type(zbus::message::Type::Signal)
                    .interface("org.signet.Signet1.Manager")
                    .member(member)
                    .build()
                    .unwrap();
                let mut stream = zbus::MessageStream::for_match_rule(rule, &conn, None)
                    .await
                    .unwrap();
                ready_tx.send(()).unwrap();
                while let Some(Ok(msg)) = stream.next().await {
                    let body = msg.body();
                    // `(s document)`, `(s name, s document)` or `(s id, s state,
                    // s document)`: the leading strings join the document as
                    // `signal_arg0`, `signal_arg1`.
                    let document = if let Ok((id, state, doc)) =
                        body.deserialize::<(String, String, String)>()
                    {
                        let mut v: serde_json::Value = serde_json::from_str(&doc).unwrap();
                        v["signal_arg0"] = id.into();
                        v["signal_arg1"] = state.into();
                        v
                    } else if let Ok((name, doc)) = body.deserialize::<(String, String)>() {
                        let mut v: serde_json::Value = serde_json::from_str(&doc).unwrap();
                        v["signal_arg0"] = name.into();
                        v
                    } else {
                        serde_json::from_str(&body.deserialize::<String>().unwrap()).unwrap()
                    };
                    if tx.send(document).is_err() {
                        return;
                    }
                }
            });
        });
        ready_rx
            .recv_timeout(SIGNAL_TIMEOUT)
            .expect("subscribing on the bus");
        Signals {
            rx,
            seen: Vec::new(),
        }
    }

    /// The next signal that `want` accepts; others are skipped.
    pub(crate) fn wait(
        &mut self,
        what: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + SIGNAL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(t) => {
                    self.seen.push(t.clone());
                    if want(&t) {
                        return t;
                    }
                }
                Err(_) => panic!("never signalled: {what}; signals: {:#?}", self.seen),
            }
        }
    }

    /// The next `TokenChanged` for `serial` that `want` accepts.
    pub(crate) fn wait_token(
        &mut self,
        serial: &str,
        what: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait(&format!("token {serial} {what}"), |t| {
            t["serial"] == serial && want(t)
        })
    }
}

pub(crate) fn signetctl(bus: &Bus, args: &[&str], uid: Option<u32>) -> Output {
    let mut cmd = Command::new(bin("signetctl"));
    cmd.env("SIGNET_DBUS", &bus.address)
        .args(args)
        .stdin(Stdio::null());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    cmd.output().unwrap()
}

pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// signetd's object as the bus daemon's `Introspect` describes it, asked as root.
fn introspect(bus: &Bus) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(bus.address.as_str())
            .build()
            .await
            .unwrap();
        zbus::fdo::IntrospectableProxy::builder(&conn)
            .destination(signet_dbus::BUS_NAME)
            .path(signet_dbus::OBJECT_PATH)
            .build()
            .await
            .unwrap()
            .introspect()
            .await
            .unwrap()
    })
}

/// The sorted names of the members of kind `kind` (`method`, `signal`, `property`) of
/// Signet's interface in an introspection document.
fn members(xml: &str, kind: &str) -> Vec<String> {
    let start = xml
        .find(&format!("<interface name=\"{}\">", signet_dbus::INTERFACE))
        .unwrap_or_else(|| panic!("no {} in {xml}", signet_dbus::INTERFACE));
    let iface = &xml[start..];
    let iface = &iface[..iface.find("</interface>").unwrap()];
    let open = format!("<{kind} name=\"");
    let mut names: Vec<String> = iface
        .match_indices(&open)
        .map(|(i, _)| {
            let rest = &iface[i + open.len()..];
            rest[..rest.find('"').unwrap()].to_owned()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn signetctl_status_over_the_system_style_bus_with_the_real_policy() {
    let mut w = World::new();
    let bus = Bus::start(&w);
    w.dbus = Some(bus.address.clone());
    let pin = w.path("pin");
    let agent = w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    let http = w
        .start_daemon(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
        )
        .remove(0);

    // Root may call: the same document as GET /v1/status.
    let out = signetctl(&bus, &["status", "--json"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let over_dbus: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let over_http = signet(&http, &["status", "--json"]);
    let over_http: serde_json::Value = serde_json::from_slice(&over_http.stdout).unwrap();
    assert_eq!(over_dbus, over_http, "one command, two fronts, one result");
    assert_eq!(over_dbus["signing_works"], true);

    // The daemon serves the interface signet-dbus declares, the one signetctl's proxy
    // calls: the same methods, signals and property, nothing more.
    let xml = introspect(&bus);
    let names = |l: &[&str]| {
        let mut v: Vec<String> = l.iter().map(|m| m.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(
        members(&xml, "method"),
        names(&signet_dbus::METHODS),
        "{xml}"
    );
    assert_eq!(
        members(&xml, "signal"),
        names(&signet_dbus::SIGNALS),
        "{xml}"
    );
    assert_eq!(members(&xml, "property"), names(&["Version"]), "{xml}");

    let out = signetctl(&bus, &["status"], None);
    assert_eq!(out.status.code(), Some(0));
    let screen = text(&out.stdout);
    assert!(
        screen.contains("signing works") && screen.contains("token:"),
        "{screen}"
    );

    // Anyone else is refused by the bus, with the fix.
    let out = signetctl(&bus, &["status"], Some(65534));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("refused") && err.contains("signet group"),
        "{err}"
    );

    // Broken state: the agent stops; status says so and exits non-zero.
    w.stop("signet-agent");
    let out = signetctl(&bus, &["status"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("signing does NOT work"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn signetctl_says_when_signetd_is_not_on_the_bus() {
    let w = World::new();
    let bus = Bus::start(&w);
    let out = signetctl(&bus, &["status"], None);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("signetd is not running"),
        "{}",
        text(&out.stderr)
    );
    // No bus at all.
    let out = Command::new(bin("signetctl"))
        .env(
            "SIGNET_DBUS",
            format!("unix:path={}", w.path("nobus.sock").display()),
        )
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("cannot connect"),
        "{}",
        text(&out.stderr)
    );
}
