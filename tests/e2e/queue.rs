//! The durable queue and the audit log, end to end: many callers at once through the
//! real agent and SoftHSM, `kill -9` of the daemon mid-queue and mid-job, and a
//! tampered audit log.
//!
//! The many callers are remote clients, each with its own secret over TLS: the queue
//! and the audit log know them by name (`client:cN`).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use signet_test_support::*;

/// How long a test waits for the daemon to reach a state, before it fails.
const STATE_TIMEOUT: Duration = Duration::from_secs(120);

fn unix(w: &World, name: &str) -> String {
    format!("unix:{}", w.path(name).display())
}

#[derive(Debug)]
struct Reply {
    status: u16,
    job: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

fn addr(ep: &Endpoint) -> SocketAddr {
    match ep {
        Endpoint::Tcp { host, port } => format!("{host}:{port}").parse().unwrap(),
        other => panic!("not a TCP endpoint: {other}"),
    }
}

/// A remote client: TLS to the daemon, its name and secret in every request.
#[derive(Clone)]
struct Client {
    tls: tokio_rustls::TlsConnector,
    authorization: String,
}

impl Client {
    fn new(ca: &Path, name: &str, secret: &str) -> Client {
        use base64::Engine;
        use tokio_rustls::rustls;
        let mut roots = rustls::RootCertStore::empty();
        use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Client {
            tls: tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
            authorization: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{name}:{secret}"))
            ),
        }
    }
}

/// One HTTP request to the daemon at `daemon`: over plain TCP, or over TLS as `client`.
async fn request(
    daemon: SocketAddr,
    client: Option<&Client>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Reply, String> {
    let stream = tokio::net::TcpStream::connect(daemon)
        .await
        .map_err(|e| e.to_string())?;
    let mut sender = match client {
        None => {
            let (sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender
        }
        Some(c) => {
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1")
                .map_err(|e| e.to_string())?;
            let stream = c
                .tls
                .connect(name, stream)
                .await
                .map_err(|e| e.to_string())?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender
        }
    };
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "signetd");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(c) = client {
        req = req.header("authorization", &c.authorization);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let job = resp
        .headers()
        .get("x-signet-job")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes()
        .to_vec();
    Ok(Reply { status, job, body })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Waits until `cond` holds for the daemon's status (polled), or fails.
fn wait_status(ep: &Endpoint, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let (_, s) = call_json(ep, "GET", "/v1/status", None);
        if cond(&s) {
            return s;
        }
        assert!(
            started.elapsed() < STATE_TIMEOUT,
            "the daemon never reached: {what}; last status: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Jobs at the daemon that are not finished: waiting plus the one at the agent.
fn pending(s: &Value) -> u64 {
    s["queue"]["waiting"].as_u64().unwrap_or(0) + u64::from(!s["queue"]["running"].is_null())
}

/// Signatures the agent made, from its log.
fn agent_signatures(w: &World) -> usize {
    w.log("signet-agent")
        .lines()
        .filter(|l| l.contains(": signed file="))
        .count()
}

fn audit_verifies(w: &World) -> Value {
    let out = w.signetd(&["audit", "verify", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "audit verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn eight_callers_fifty_jobs_each_signed_once_in_turns() {
    const CALLERS: u8 = 8;
    const JOBS: usize = 50;
    let mut w = World::new();
    let pin = w.path("pin");
    let agent = w.start_agent(&unix(&w, "agent.sock"), SOFTHSM, &pin, &[]);
    // Status over plain TCP; the callers are remote clients over TLS, each its own
    // lane, each with room for all its jobs at once.
    let (ca, cert, key) = make_tls(&w.path(""));
    let eps = w.start_daemon_config(&format!(
        "listen = [\"tcp:127.0.0.1:0\"]\nagent = \"{agent}\"\nstate_dir = \"{state}\"\ndbus = \"none\"\n\
         default_profile = \"release\"\n[tls]\nlisten = [\"tcp:127.0.0.1:0\"]\ncert = \"{cert}\"\nkey = \"{key}\"\n\
         [profiles.release]\ndescription = \"Signet test\"\n[limits]\nmax_jobs_per_caller = {JOBS}\n",
        state = w.path("state").display(),
        cert = cert.display(),
        key = key.display(),
    ));
    let (ep, daemon) = (eps[0].clone(), addr(&eps[1]));
    let clients: Vec<Client> = (0..CALLERS)
        .map(|c| {
            let name = format!("c{c}");
            let out = w.signetd(&[
                "client",
                "add",
                &name,
                "--profile",
                "release",
                "--valid",
                "1h",
            ]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Client::new(&ca, &name, String::from_utf8(out.stdout).unwrap().trim())
        })
        .collect();
    let mut events = Events::follow(&agent);
    // The token is away while the jobs arrive, so all of them are queued before the
    // first is signed and the order is the queue's alone.
    let tokens = TokenDir::of(&w);
    tokens.vanish();
    events.wait_for("token_lost");

    let pe = std::fs::read(w.path("hello.exe")).unwrap();
    let rt = runtime();
    let mut tasks = Vec::new();
    for c in 0..CALLERS {
        for i in 0..JOBS {
            let pe = pe.clone();
            let client = clients[usize::from(c)].clone();
            tasks.push((
                c,
                i,
                rt.spawn(async move {
                    let path = format!("/v1/sign?filename=c{c}-{i}.exe");
                    let key = format!("c{c}-{i}");
                    request(
                        daemon,
                        Some(&client),
                        "POST",
                        &path,
                        &[("idempotency-key", &key)],
                        pe,
                    )
                    .await
                }),
            ));
        }
    }
    let all = (usize::from(CALLERS) * JOBS) as u64;
    let s = wait_status(&ep, "every job queued", |s| pending(s) == all);
    let lanes: HashSet<&str> = s["queue"]["by_caller"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let names: Vec<String> = (0..CALLERS).map(|c| format!("client:c{c}")).collect();
    assert_eq!(
        lanes,
        names.iter().map(String::as_str).collect(),
        "one lane per client: {s:#}"
    );
    tokens.restore();

    let mut ids = HashSet::new();
    for (c, i, task) in tasks {
        let reply = rt.block_on(task).unwrap().unwrap();
        assert_eq!(reply.status, 200, "c{c}-{i}: {}", reply.json());
        assert!(
            ids.insert(reply.job.clone().unwrap()),
            "one job per request"
        );
        if i == c as usize {
            // A sample, one per caller: the answer is a signed file that verifies.
            let f = w.file(&format!("c{c}-{i}.exe"), &reply.body);
            let (ok, text) = verify(&w, &f);
            assert!(ok, "c{c}-{i}: {text}");
        }
    }
    rt.shutdown_background();

    // Signed exactly once each: the agent made one signature per job.
    assert_eq!(agent_signatures(&w), ids.len());
    let records = w.audit_records();
    assert_eq!(records.len(), ids.len(), "one audit record per job");
    let audited: HashSet<String> = records
        .iter()
        .map(|r| {
            assert_eq!(r["result"], "signed", "{r}");
            assert_eq!(r["transport"], "tls", "{r}");
            assert!(names.iter().any(|n| r["caller"] == n.as_str()), "{r}");
            assert_eq!(r["output_sha256"].as_str().unwrap().len(), 64, "{r}");
            r["job"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(audited, ids);
    // In turns: every run of eight consecutive signatures has all eight callers.
    let order: Vec<&str> = records
        .iter()
        .map(|r| r["caller"].as_str().unwrap())
        .collect();
    for (n, round) in order.chunks(usize::from(CALLERS)).enumerate() {
        let callers: HashSet<&&str> = round.iter().collect();
        assert_eq!(callers.len(), 8, "round {n}: {round:?}");
    }
    let v = audit_verifies(&w);
    assert_eq!(
        (&v["ok"], &v["records"]),
        (&Value::Bool(true), &Value::from(all))
    );
}

/// Where a job's input and result are kept: in the database (small ones) or spool files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    Inline,
    Files,
}

#[test]
fn a_daemon_killed_mid_job_and_mid_queue_loses_nothing_and_signs_once() {
    // The 15 KiB fixture: inputs and results in the database, nothing in the spool.
    killed_mid_job_and_mid_queue(Kept::Inline);
}

#[test]
fn a_daemon_killed_mid_job_and_mid_queue_with_spool_files_loses_nothing_and_signs_once() {
    // 200 KB, over signetd's bound for the database: inputs and results as spool files.
    killed_mid_job_and_mid_queue(Kept::Files);
}

/// Six jobs, one at the token and five queued, then `kill -9`: after the restart each
/// is signed once, every result is its own file's, the audit log verifies, and no
/// input is left.
fn killed_mid_job_and_mid_queue(kept: Kept) {
    let mut w = World::new();
    // osslsigncode's first run waits until the test releases it, once the daemon is dead.
    let signer = HeldSigner::new(&w);
    let pin = w.path("pin");
    let agent = w.start_agent_with(
        &unix(&w, "agent.sock"),
        SOFTHSM,
        &pin,
        &[],
        &signer.agent_config(),
    );
    let ep = w
        .start_daemon_with(
            &["tcp:127.0.0.1:0"],
            &agent,
            "[profiles.release]\ndescription = \"Signet test\"\n[limits]\nmax_jobs_per_caller = 10\n",
        )
        .remove(0);
    let mut events = Events::follow(&agent);
    let pe = match kept {
        Kept::Inline => std::fs::read(w.path("hello.exe")).unwrap(),
        Kept::Files => std::fs::read(own_pe(&w, "big.exe", 200_000)).unwrap(),
    };
    assert_eq!(
        pe.len() <= signetd::adapters::store::INLINE_MAX as usize,
        kept == Kept::Inline
    );
    let me = None;
    let rt = runtime();

    // Three jobs sent asynchronously (their ids come back at once), three that wait
    // for their result with an idempotency key.
    let daemon = addr(&ep);
    let mut async_ids = Vec::new();
    for i in 0..3 {
        let r = rt
            .block_on(request(
                daemon,
                me,
                "POST",
                &format!("/v1/sign?filename=a{i}.exe"),
                &[("prefer", "respond-async")],
                pe.clone(),
            ))
            .unwrap();
        assert_eq!(r.status, 202, "{}", r.json());
        assert_eq!(r.json()["id"].as_str(), r.job.as_deref());
        async_ids.push(r.job.unwrap());
    }
    let waiting: Vec<_> = (0..3)
        .map(|i| {
            let pe = pe.clone();
            rt.spawn(async move {
                request(
                    daemon,
                    me,
                    "POST",
                    &format!("/v1/sign?filename=k{i}.exe"),
                    &[("idempotency-key", &format!("key-{i}"))],
                    pe,
                )
                .await
            })
        })
        .collect();
    // The first job is at the agent (held before it signs), five wait in the queue
    // (the second's input goes to the agent meanwhile, all but its last byte: it is
    // queued until the first is answered). Ids count up from 1 in a fresh state
    // directory.
    events.wait_for("signing_started");
    // The status answers while a job signs, with the agent's last known state.
    let (status, s) = call_json(&ep, "GET", "/v1/status", None);
    assert_eq!(status, 200, "{s:#}");
    assert_eq!(s["agent"]["reachable"], "yes", "{s:#}");
    let started = Instant::now();
    let states = loop {
        let states: Vec<Value> = (1..=6)
            .map(|id| call_json(&ep, "GET", &format!("/v1/jobs/{id}"), None).1["state"].clone())
            .collect();
        if states[0] == "running" && states[1..].iter().all(|s| s == "queued") {
            break states;
        }
        assert!(started.elapsed() < STATE_TIMEOUT, "{states:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(states.len(), 6);
    assert_eq!(async_ids, ["1", "2", "3"]);
    let (status, view) = call_json(&ep, "GET", &format!("/v1/jobs/{}", async_ids[2]), None);
    assert_eq!(
        (status, &view["state"]),
        (200, &Value::from("queued")),
        "{view}"
    );
    assert_eq!(view["position"], 1, "{view}");

    w.kill("signetd");
    for t in waiting {
        assert!(
            rt.block_on(t).unwrap().is_err(),
            "the connection died with the daemon"
        );
    }
    // Release the first signer, if the agent did not drop the job with its caller's
    // connection (and kill the signer) already.
    signer.release();

    let ep = w.restart_daemon().remove(0);
    let daemon = addr(&ep);
    let mut results = BTreeMap::new();
    for id in &async_ids {
        let r = rt
            .block_on(request(
                daemon,
                me,
                "GET",
                &format!("/v1/jobs/{id}/result"),
                &[],
                vec![],
            ))
            .unwrap();
        assert_eq!(r.status, 200, "job {id}: {}", r.json());
        results.insert(id.clone(), r.body);
    }
    for i in 0..3 {
        let r = rt
            .block_on(request(
                daemon,
                me,
                "POST",
                &format!("/v1/sign?filename=k{i}.exe"),
                &[("idempotency-key", &format!("key-{i}"))],
                pe.clone(),
            ))
            .unwrap();
        assert_eq!(r.status, 200, "key-{i}: {}", r.json());
        let id = r.job.unwrap();
        assert!(!results.contains_key(&id), "one job per key");
        results.insert(id, r.body);
    }
    rt.shutdown_background();
    assert_eq!(results.len(), 6);
    for (id, body) in &results {
        let f = w.file(&format!("job-{id}.exe"), body);
        signed_from(&w, &f, &pe);
    }
    // Every job signed once as far as anyone can see: one audit record each. Only the
    // job that was at the token when the daemon died may have been signed twice (a
    // first signature that was never delivered); no other job was, not even the one
    // sent to the agent behind it.
    let records = w.audit_records();
    let jobs: Vec<&str> = records.iter().map(|r| r["job"].as_str().unwrap()).collect();
    assert_eq!(
        jobs.iter().copied().collect::<HashSet<_>>(),
        results.keys().map(String::as_str).collect::<HashSet<_>>()
    );
    assert_eq!(jobs.len(), 6, "{records:#?}");
    assert!(
        records.iter().all(|r| r["result"] == "signed"),
        "{records:#?}"
    );
    let made = agent_signatures(&w);
    assert!((6..=7).contains(&made), "{made} signatures for 6 jobs");
    assert_eq!(audit_verifies(&w)["ok"], true);
    // The spool holds results only (delivered or not), no inputs; small ones are
    // all in the database, and of those only the results are left.
    let spool: Vec<String> = std::fs::read_dir(w.path("state/spool"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        spool
            .iter()
            .all(|f| f.ends_with(".out") || f.ends_with(".delivered")),
        "{spool:?}"
    );
    let db = rusqlite::Connection::open_with_flags(
        w.path("state/signet.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let inline = |part: &str| -> i64 {
        db.query_row("SELECT COUNT(*) FROM blobs WHERE part = ?1", [part], |r| {
            r.get(0)
        })
        .unwrap()
    };
    match kept {
        Kept::Inline => {
            assert!(spool.is_empty(), "{spool:?}");
            assert_eq!((inline("in"), inline("out")), (0, 6));
        }
        Kept::Files => {
            assert_eq!(spool.len(), 6, "{spool:?}");
            assert_eq!((inline("in"), inline("out")), (0, 0));
        }
    }
    // Every result was delivered: none counts against the quota.
    let (_, st) = call_json(&ep, "GET", "/v1/status", None);
    assert_eq!(st["queue"]["spool_used_bytes"], 0, "{st:#}");
}

/// Copies the stopped daemon's state to `name/` and answers a configuration for it.
fn copy_state(w: &World, name: &str) -> PathBuf {
    let dir = w.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["signet.db", "signet.db-wal", "signet.db-shm"] {
        let from = w.path("state").join(f);
        if from.exists() {
            std::fs::copy(&from, dir.join(f)).unwrap();
        }
    }
    let cfg = dir.join("signetd.toml");
    std::fs::write(
        &cfg,
        format!(
            "agent = \"unix:/nonexistent\"\nstate_dir = \"{}\"\n",
            dir.display()
        ),
    )
    .unwrap();
    cfg
}

fn verify_copy(cfg: &Path) -> (i32, Value, String) {
    let run = |json: bool| {
        let mut cmd = std::process::Command::new(bin("signetd"));
        cmd.arg("--config").arg(cfg).args(["audit", "verify"]);
        if json {
            cmd.arg("--json");
        }
        cmd.output().unwrap()
    };
    let out = run(true);
    let text = run(false);
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_slice(&out.stdout).unwrap(),
        String::from_utf8_lossy(&text.stdout).into_owned(),
    )
}

fn tamper(cfg: &Path, sql: &str) {
    let db = cfg.parent().unwrap().join("signet.db");
    rusqlite::Connection::open(db)
        .unwrap()
        .execute_batch(sql)
        .unwrap();
}

#[test]
fn audit_verify_names_a_changed_a_deleted_and_swapped_records() {
    let mut w = World::new();
    let pin = w.path("pin");
    let agent = w.start_agent(&unix(&w, "agent.sock"), SOFTHSM, &pin, &[]);
    let ep = w
        .start_daemon(&[&unix(&w, "signetd.sock")], &agent)
        .remove(0);
    for i in 0..4 {
        let f = w.pe(&format!("f{i}.exe"));
        let out = signet(&ep, &["sign", f.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0));
    }
    // A refusal is recorded too.
    let f = w.pe("refused.exe");
    let out = signet(&ep, &["sign", "--profile", "nope", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    w.stop("signetd");
    let records = w.audit_records();
    assert_eq!(records.len(), 5);
    assert!(
        records[0]["token_serial"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{:#}",
        records[0]
    );
    assert_eq!(
        records[0]["cert_sha256"].as_str().map(str::len),
        Some(64),
        "{:#}",
        records[0]
    );
    assert_eq!(
        (
            &records[4]["result"],
            &records[4]["error"],
            &records[4]["profile"]
        ),
        (
            &Value::from("refused"),
            &Value::from("unknown_profile"),
            &Value::from("nope")
        )
    );

    let intact = copy_state(&w, "intact");
    let (code, v, _) = verify_copy(&intact);
    assert_eq!(
        (code, &v["ok"], &v["records"]),
        (0, &Value::Bool(true), &Value::from(5))
    );

    let changed = copy_state(&w, "changed");
    tamper(
        &changed,
        "UPDATE audit SET filename = 'other.exe' WHERE seq = 3;",
    );
    let (code, v, text) = verify_copy(&changed);
    assert_eq!(
        (code, &v["kind"], &v["record"]),
        (1, &Value::from("changed"), &Value::from(3)),
        "{v}"
    );
    assert!(text.contains("record 3"), "{text}");

    let deleted = copy_state(&w, "deleted");
    tamper(&deleted, "DELETE FROM audit WHERE seq = 2;");
    let (code, v, text) = verify_copy(&deleted);
    assert_eq!(
        (code, &v["kind"], &v["record"]),
        (1, &Value::from("deleted"), &Value::from(2)),
        "{v}"
    );
    assert!(text.contains("record 2 was deleted"), "{text}");

    let swapped = copy_state(&w, "swapped");
    tamper(
        &swapped,
        "UPDATE audit SET id = -1 WHERE seq = 2;
         UPDATE audit SET id = 2 WHERE seq = 4;
         UPDATE audit SET id = 4 WHERE seq = 2;",
    );
    let (code, v, text) = verify_copy(&swapped);
    assert_eq!(
        (code, &v["kind"], &v["record"]),
        (1, &Value::from("reordered"), &Value::from(2)),
        "{v}"
    );
    assert!(text.contains("reordered"), "{text}");
}

/// A PE of its own (about `size` bytes) under `name`: each differs from the others.
fn own_pe(w: &World, name: &str, size: usize) -> PathBuf {
    let p = w.path(name);
    fixture("make-pe.sh", &[&p, Path::new(&size.to_string())]);
    p
}

/// `signed` is `input` signed: it verifies, and without its signature it is `input`
/// byte for byte (so it is no other job's file).
fn signed_from(w: &World, signed: &Path, input: &[u8]) {
    let (ok, text) = verify(w, signed);
    assert!(ok, "{}: {text}", signed.display());
    let bare = signed.with_extension("bare");
    let out = std::process::Command::new("osslsigncode")
        .arg("remove-signature")
        .arg("-in")
        .arg(signed)
        .arg("-out")
        .arg(&bare)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&bare).unwrap() == input,
        "{} is not its own input signed",
        signed.display()
    );
}

#[test]
fn one_caller_with_more_jobs_than_its_limit_gets_them_all_signed_each_once() {
    const JOBS: usize = 8;
    let mut w = World::new();
    let pin = w.path("pin");
    let agent = w.start_agent(&unix(&w, "agent.sock"), SOFTHSM, &pin, &[]);
    let sock = unix(&w, "signetd.sock");
    let ep = w.start_daemon_config(&format!(
        "listen = [\"{sock}\"]\nagent = \"{agent}\"\ndbus = \"none\"\n\
         [profiles.release]\ndescription = \"Signet test\"\n[limits]\nmax_jobs_per_caller = 2\n\
         [[grants]]\ncallers = [\"uid:0\"]\nprofiles = [\"*\"]\n"
    ))[0]
        .clone();
    let files: Vec<(PathBuf, Vec<u8>)> = (0..JOBS)
        .map(|i| {
            let p = own_pe(&w, &format!("app{i}.exe"), 20_000 + i * 3_000);
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    // All at once from one caller (local root), four times its limit.
    let clients: Vec<_> = files
        .iter()
        .map(|(p, _)| {
            std::process::Command::new(bin("signet"))
                .env("SIGNET_ENDPOINT", ep.to_string())
                .env_remove("SIGNET_CONFIG")
                .args(["sign", p.to_str().unwrap()])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (c, (p, input)) in clients.into_iter().zip(&files) {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        signed_from(&w, p, input);
    }
    // Exactly once: one signature at the agent and one audit record per job.
    assert_eq!(agent_signatures(&w), JOBS);
    let records = w.audit_records();
    assert_eq!(records.len(), JOBS, "{records:#?}");
    for r in &records {
        assert_eq!(r["result"], "signed", "{r}");
        assert_eq!(r["caller"], "uid:0", "{r}");
    }
    assert!(!w.log("signetd").contains("too_many_jobs"));
}

#[test]
fn the_next_job_reaches_the_agent_while_one_is_at_the_token_and_both_sign_in_order() {
    let mut w = World::new();
    let pin = w.path("pin");
    let signer = HeldSigner::new(&w);
    let agent = w.start_agent_with(
        &unix(&w, "agent.sock"),
        SOFTHSM,
        &pin,
        &[],
        &signer.agent_config(),
    );
    let ep = w
        .start_daemon(&[&unix(&w, "signetd.sock")], &agent)
        .remove(0);
    let a = std::fs::read(own_pe(&w, "a.exe", 30_000)).unwrap();
    // Several blocks, so that it is sent as the first one signs.
    let b = std::fs::read(own_pe(&w, "b.exe", 3 << 20)).unwrap();
    let first = sign_async(&ep, "a.exe", &a);
    wait_until("the first job is at the token", || signer.held.exists());
    let second = sign_async(&ep, "b.exe", &b);
    // The second job's input is at the agent while the first is being signed (all of
    // it but the last byte, which waits for the first's answer, and what the agent
    // still buffers, at most one block): two jobs at the agent at once.
    let block = 256 << 10;
    let spooled_but_one = || {
        std::fs::read_dir(w.path(""))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("signet-job-"))
            .any(|e| {
                std::fs::metadata(e.path().join("input"))
                    .is_ok_and(|m| m.len() + block + 1 >= b.len() as u64)
            })
    };
    wait_until("the second job's input is at the agent", spooled_but_one);
    let (_, s) = call_json(&ep, "GET", "/v1/status", None);
    assert_eq!(s["queue"]["running"], first.as_str(), "{s:#}");
    assert_eq!(pending(&s), 2, "{s:#}");
    // Callers see it queued and next until its last byte goes.
    let (_, job) = call_json(&ep, "GET", &format!("/v1/jobs/{second}"), None);
    assert_eq!(
        (&job["state"], &job["position"]),
        (&"queued".into(), &0.into()),
        "{job:#}"
    );
    assert_eq!(agent_signatures(&w), 0, "nothing is signed yet");

    signer.release();
    for (id, input, name) in [(&first, &a, "a-signed.exe"), (&second, &b, "b-signed.exe")] {
        let (status, body) = fetch_when_done(&ep, id);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let f = w.file(name, &body);
        signed_from(&w, &f, input);
    }
    assert_eq!(agent_signatures(&w), 2);
    // Signed and audited in the queue's order.
    let records = w.audit_records();
    let order: Vec<&str> = records.iter().map(|r| r["job"].as_str().unwrap()).collect();
    assert_eq!(order, [first.as_str(), second.as_str()]);
}

/// `GET /v1/jobs/{id}/result` once job `id` has ended.
fn fetch_when_done(ep: &Endpoint, id: &str) -> (u16, Vec<u8>) {
    wait_until("the job ends", || {
        let (_, j) = call_json(ep, "GET", &format!("/v1/jobs/{id}"), None);
        matches!(j["state"].as_str(), Some("signed" | "failed" | "cancelled"))
    });
    fetch(ep, &format!("/v1/jobs/{id}/result"))
}
