use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;

use super::*;

#[test]
fn every_error_code_has_a_valid_dbus_name_and_back() {
    assert_eq!(
        error_name(ErrorCode::UnknownJob),
        "org.signet.Signet1.Error.UnknownJob"
    );
    for code in ErrorCode::ALL {
        let name = error_name(code);
        assert!(
            zbus::names::ErrorName::try_from(name.as_str()).is_ok(),
            "{name}"
        );
        assert_eq!(error_code(&name), Some(code));
        let e = Error::from(ErrorBody::new(code, "m"));
        assert_eq!(e.name.as_str(), name);
        assert_eq!(zbus::DBusError::description(&e), Some("m"));
    }
    assert_eq!(error_code("org.freedesktop.DBus.Error.AccessDenied"), None);
}

/// A service that answers each method with its D-Bus name and arguments, and records
/// which methods were reached.
#[derive(Debug, Default, Clone)]
struct Echo {
    reached: Arc<Mutex<BTreeSet<&'static str>>>,
}

impl Echo {
    fn answer(&self, method: &'static str, args: String) -> Result<String, Error> {
        self.reached.lock().unwrap().insert(method);
        if args.contains("refuse") {
            return Err(ErrorBody::new(ErrorCode::UnknownJob, format!("no job {args}")).into());
        }
        Ok(format!("{method}({args})"))
    }
}

impl Service for Echo {
    async fn status(&self, _: Call<'_>) -> Result<String, Error> {
        self.answer("Status", String::new())
    }
    async fn jobs(&self, recent: u32, _: Call<'_>) -> Result<String, Error> {
        self.answer("Jobs", recent.to_string())
    }
    async fn cancel(&self, id: &str, _: Call<'_>) -> Result<String, Error> {
        self.answer("Cancel", id.to_owned())
    }
    async fn audit_tail(&self, n: u32, _: Call<'_>) -> Result<String, Error> {
        self.answer("AuditTail", n.to_string())
    }
    async fn audit_export(&self, since: &str, _: Call<'_>) -> Result<String, Error> {
        self.answer("AuditExport", since.to_owned())
    }
    async fn audit_verify(&self, _: Call<'_>) -> Result<String, Error> {
        self.answer("AuditVerify", String::new())
    }
    async fn doctor(&self, _: Call<'_>) -> Result<String, Error> {
        self.answer("Doctor", String::new())
    }
    async fn tokens(&self, _: Call<'_>) -> Result<String, Error> {
        self.answer("Tokens", String::new())
    }
    async fn attach(&self, serial: &str, vmid: u32, _: Call<'_>) -> Result<String, Error> {
        self.answer("Attach", format!("{serial},{vmid}"))
    }
    async fn detach(&self, serial: &str, _: Call<'_>) -> Result<String, Error> {
        self.answer("Detach", serial.to_owned())
    }
    async fn reattach(&self, serial: &str, _: Call<'_>) -> Result<String, Error> {
        self.answer("Reattach", serial.to_owned())
    }
    async fn enroll(&self, r: Enroll, _: Call<'_>) -> Result<String, Error> {
        self.answer(
            "Enroll",
            format!(
                "{},{},{},{},{}",
                r.role,
                r.vmid,
                r.serial,
                r.profiles.join("+"),
                r.apply
            ),
        )
    }
}

/// The server on one end of a socket pair, a client connection on the other.
async fn pair(echo: Echo) -> (zbus::Connection, zbus::Connection) {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let server = zbus::connection::Builder::unix_stream(a)
        .server(zbus::Guid::generate())
        .p2p()
        .serve_at(OBJECT_PATH, Server(echo))
        .build();
    let client = zbus::connection::Builder::unix_stream(b).p2p().build();
    let (server, client) = tokio::join!(server, client);
    (server.unwrap(), client.unwrap())
}

/// The names of the members of kind `kind` (`method`, `signal`, `property`) of
/// [`INTERFACE`] in an introspection document.
fn members(xml: &str, kind: &str) -> BTreeSet<String> {
    let start = xml
        .find(&format!("<interface name=\"{INTERFACE}\">"))
        .unwrap_or_else(|| panic!("{INTERFACE} is not in {xml}"));
    let iface = &xml[start..];
    let iface = &iface[..iface.find("</interface>").unwrap()];
    let open = format!("<{kind} name=\"");
    iface
        .match_indices(&open)
        .map(|(i, _)| {
            let rest = &iface[i + open.len()..];
            rest[..rest.find('"').unwrap()].to_owned()
        })
        .collect()
}

#[tokio::test]
async fn the_proxy_and_the_server_are_the_same_interface() {
    let echo = Echo::default();
    let (server, client) = pair(echo.clone()).await;

    // What the server says it serves is what this crate lists.
    let xml = zbus::fdo::IntrospectableProxy::builder(&client)
        .destination(BUS_NAME)
        .path(OBJECT_PATH)
        .build()
        .await
        .unwrap()
        .introspect()
        .await
        .unwrap();
    let names = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(members(&xml, "method"), names(&METHODS), "{xml}");
    assert_eq!(members(&xml, "signal"), names(&SIGNALS), "{xml}");
    assert_eq!(members(&xml, "property"), names(&["Version"]), "{xml}");

    // Every method, called through the proxy, reaches the service with its arguments.
    let p = ManagerProxy::new(&client).await.unwrap();
    assert_eq!(p.status().await.unwrap(), "Status()");
    assert_eq!(p.jobs(7).await.unwrap(), "Jobs(7)");
    assert_eq!(p.cancel("j1").await.unwrap(), "Cancel(j1)");
    assert_eq!(p.audit_tail(3).await.unwrap(), "AuditTail(3)");
    assert_eq!(
        p.audit_export("2026-01-01T00:00:00Z").await.unwrap(),
        "AuditExport(2026-01-01T00:00:00Z)"
    );
    assert_eq!(p.audit_verify().await.unwrap(), "AuditVerify()");
    assert_eq!(p.doctor().await.unwrap(), "Doctor()");
    assert_eq!(p.tokens().await.unwrap(), "Tokens()");
    assert_eq!(p.attach("S1", 101).await.unwrap(), "Attach(S1,101)");
    assert_eq!(p.detach("S1").await.unwrap(), "Detach(S1)");
    assert_eq!(p.reattach("S1").await.unwrap(), "Reattach(S1)");
    assert_eq!(
        p.enroll("build-vm", 120, "", vec!["a".into(), "b".into()], true)
            .await
            .unwrap(),
        "Enroll(build-vm,120,,a+b,true)"
    );
    assert_eq!(
        *echo.reached.lock().unwrap(),
        METHODS.into_iter().collect::<BTreeSet<_>>(),
        "every method is called above"
    );
    assert_eq!(p.version().await.unwrap(), signet_api::VERSION);

    // A refusal arrives as the named error, with its message.
    match p.cancel("refuse").await {
        Err(zbus::Error::MethodError(name, message, _)) => {
            assert_eq!(error_code(name.as_str()), Some(ErrorCode::UnknownJob));
            assert_eq!(message.as_deref(), Some("no job refuse"));
        }
        other => panic!("not the named error: {other:?}"),
    }

    // Every signal the server sends, the proxy receives with its arguments.
    let mut jobs = p.receive_job_finished().await.unwrap();
    let mut steps = p.receive_recovery_step().await.unwrap();
    let mut tokens = p.receive_token_changed().await.unwrap();
    let emitter = SignalEmitter::new(&server, OBJECT_PATH).unwrap();
    Server::<Echo>::job_finished(&emitter, "j1", "signed", "{}")
        .await
        .unwrap();
    Server::<Echo>::recovery_step(&emitter, "token_lost", "{\"e\":1}")
        .await
        .unwrap();
    Server::<Echo>::token_changed(&emitter, "{\"t\":1}")
        .await
        .unwrap();
    let a = jobs.next().await.unwrap();
    let a = a.args().unwrap();
    assert_eq!((a.id, a.state, a.job), ("j1", "signed", "{}"));
    let s = steps.next().await.unwrap();
    let s = s.args().unwrap();
    assert_eq!((s.event, s.entry), ("token_lost", "{\"e\":1}"));
    let t = tokens.next().await.unwrap();
    assert_eq!(t.args().unwrap().token, "{\"t\":1}");
}
