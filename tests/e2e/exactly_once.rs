//! Exactly once, never wrong: idempotency keys bound to what they asked, `signet`
//! collecting its job across a daemon killed with -9 (and CI re-running what failed),
//! symbolic links signed at their target, and the HTTP edges — an unknown parameter,
//! a refused request with a short body, an upload over the limit — always answered.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// How long a raw-socket test waits for an answer before it fails.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

fn appliance(w: &mut World, profiles: &str) -> Endpoint {
    appliance_with(w, profiles, "")
}

/// [`appliance`] with `agent_extra` in the agent's configuration.
fn appliance_with(w: &mut World, profiles: &str, agent_extra: &str) -> Endpoint {
    let pin = w.path("pin");
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
        agent_extra,
    );
    w.start_daemon_with(
        &[&format!("unix:{}", w.path("signetd.sock").display())],
        &agent,
        profiles,
    )
    .remove(0)
}

/// `POST uri` with `headers` and `body`: the status, the job header and the body.
fn post(
    ep: &Endpoint,
    uri: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, Option<String>, Vec<u8>) {
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut req = http::Request::post(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let resp = signet_protocol::client::send(ep, req).await.unwrap();
        let status = resp.status().as_u16();
        let job = resp
            .headers()
            .get("x-signet-job")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, job, body.to_vec())
    })
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or(serde_json::Value::Null)
}

/// The fixture PE with `tag` written into its DOS stub's text: a valid PE of its own
/// content (its own SHA-256), signed like the original.
fn tagged_pe(w: &World, name: &str, tag: u32) -> PathBuf {
    tagged_pe_of(w, name, tag, None)
}

/// [`tagged_pe`] of `size` bytes (`tests/fixtures/make-pe.sh`), or the fixture's.
fn tagged_pe_of(w: &World, name: &str, tag: u32, size: Option<u64>) -> PathBuf {
    let p = match size {
        Some(n) => {
            let p = w.path(name);
            fixture("make-pe.sh", &[&p, Path::new(&n.to_string())]);
            p
        }
        None => w.pe(name),
    };
    let mut bytes = std::fs::read(&p).unwrap();
    assert_eq!(
        &bytes[0x4e..0x52],
        b"This",
        "the fixture has the usual DOS stub"
    );
    bytes[0x4e..0x56].copy_from_slice(format!("{tag:08x}").as_bytes());
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn an_idempotency_key_is_bound_to_the_file_profile_and_options_it_was_sent_with() {
    let mut w = World::new();
    let ep = appliance(
        &mut w,
        "default_profile = \"release\"\n[profiles.release]\ndescription = \"Signet test\"\n[profiles.other]\n",
    );
    let a = std::fs::read(tagged_pe(&w, "a.exe", 1)).unwrap();
    let b = std::fs::read(tagged_pe(&w, "b.exe", 2)).unwrap();
    let key = [("idempotency-key", "build-42")];

    let (status, first, signed_a) = post(&ep, "/v1/sign?filename=a.exe", &key, a.clone());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&signed_a));
    // The same request again: the same job and result, nothing signed again.
    let (status, again, same) = post(&ep, "/v1/sign?filename=a.exe", &key, a.clone());
    assert_eq!((status, &again), (200, &first));
    assert_eq!(same, signed_a);

    // Another file, another profile, other options: refused, never a.exe's result.
    for (uri, body) in [
        ("/v1/sign?filename=a.exe", b.clone()),
        ("/v1/sign?filename=a.exe&profile=other", a.clone()),
        ("/v1/sign?filename=a.exe&description=changed", a.clone()),
        ("/v1/sign?filename=renamed.exe", a.clone()),
    ] {
        let (status, _, body) = post(&ep, uri, &key, body);
        let e = json(&body);
        assert_eq!(
            (status, e["code"].as_str()),
            (422, Some("idempotency_key_reused")),
            "{uri}: {e}"
        );
        let message = e["message"].as_str().unwrap();
        assert!(
            message.contains("build-42") && message.contains("new key"),
            "{message}"
        );
    }
    // Stopping writes the counts of refusals still coalescing (docs/SECURITY.md).
    let stopped = w.sigterm("signetd", std::time::Duration::from_secs(60));
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");
    let records = w.audit_records();
    let signed = records.iter().filter(|r| r["result"] == "signed").count();
    assert_eq!(signed, 1, "{records:#?}");
    let reused: u64 = records
        .iter()
        .filter(|r| r["error"] == "idempotency_key_reused")
        .map(|r| r["count"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(reused, 4, "every refusal is audited: {records:#?}");
    assert!(w.log("signetd").contains("idempotency_key_reused"));
}

#[test]
fn signing_a_symlink_signs_its_target_in_place_and_the_link_stays() {
    let mut w = World::new();
    let ep = appliance(&mut w, "[profiles.release]\n");
    std::fs::create_dir(w.path("real")).unwrap();
    std::fs::create_dir(w.path("links")).unwrap();
    let target = w.pe("real/app.exe");
    let link = w.path("links/app.exe");
    std::os::unix::fs::symlink("../real/app.exe", &link).unwrap();

    let out = signet(&ep, &["sign", link.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let meta = std::fs::symlink_metadata(&link).unwrap();
    assert!(meta.file_type().is_symlink(), "the link stays a link");
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        Path::new("../real/app.exe")
    );
    assert!(verify(&w, &target).0, "the target is signed");
    // No work files left next to either.
    for dir in ["real", "links"] {
        let left: Vec<_> = std::fs::read_dir(w.path(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with(".signet-"))
            .collect();
        assert!(left.is_empty(), "{dir}: {left:?}");
    }
}

/// Sends `head` (a request's headers) and `body` on a raw unix socket, then reads
/// the answer until the daemon closes.
fn raw(sock: &Path, head: &str, body: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // The answer is complete at its end; the daemon may keep the connection open.
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&answer);
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text[..end]
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.trim().parse::<usize>().ok());
                    if len.is_some_and(|n| answer.len() >= end + 4 + n) {
                        break;
                    }
                }
            }
            Err(e) => panic!(
                "no complete answer ({e}); so far: {}",
                String::from_utf8_lossy(&answer)
            ),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn http_edges_are_answered_unknown_parameters_short_bodies_and_uploads_over_the_limit() {
    let mut w = World::new();
    let ep = appliance(
        &mut w,
        "default_profile = \"release\"\n[profiles.release]\n[profiles.limited]\nmax_input_size = 100000\n",
    );
    let sock = w.path("signetd.sock");

    // A typo in a parameter is named, never ignored.
    let (status, _, body) = post(&ep, "/v1/sign?profil=nested", &[], b"MZ".to_vec());
    let e = json(&body);
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("bad_request")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("profil"), "{e}");

    // A refused request whose body is shorter than its Content-Length is answered
    // (from its headers), not left waiting for bytes that never come.
    let answer = raw(
        &sock,
        "POST /v1/sign?profile=nope HTTP/1.1\r\nHost: signet\r\nContent-Length: 100000\r\n\r\n",
        b"MZ short",
    );
    assert!(
        answer.starts_with("HTTP/1.1 404") && answer.contains("unknown_profile"),
        "{answer}"
    );

    // A declared length over the limit is refused from the headers: no body at all.
    let answer = raw(
        &sock,
        "POST /v1/sign?profile=limited HTTP/1.1\r\nHost: signet\r\nContent-Length: 209715200\r\n\r\n",
        b"",
    );
    assert!(
        answer.starts_with("HTTP/1.1 413") && answer.contains("input_too_large"),
        "{answer}"
    );

    // An upload over the limit, sent whole by `signet`: the client reads the 413
    // every time (the daemon reads and drops the rest before it closes), also when
    // the upload is larger than anything the daemon would read before answering.
    let big = w.pe("big.exe");
    let mut bytes = std::fs::read(&big).unwrap();
    bytes.resize(80 << 20, 0);
    std::fs::write(&big, &bytes).unwrap();
    for _ in 0..3 {
        let out = signet(&ep, &["sign", "-p", "limited", big.to_str().unwrap()]);
        let err = stderr(&out);
        assert_eq!(code(&out), 4, "{err}");
        assert!(
            err.contains("larger than this profile's limit") && !err.contains("cannot reach"),
            "{err}"
        );
    }
    // Without a length, refused part-way: the answer still reaches the client.
    let (status, _, body) = post_chunked(&ep, "/v1/sign?profile=limited", 80 << 20);
    assert_eq!(
        (status, json(&body)["code"].as_str()),
        (413, Some("input_too_large"))
    );
    // Each caller's refusal for each reason is logged (repeats within the interval
    // are counted into the audit log, not logged again at info).
    let log = w.log("signetd");
    for code in ["bad_request", "unknown_profile", "input_too_large"] {
        assert!(
            log.lines()
                .any(|l| l.contains("request refused") && l.contains(&format!("code={code}"))),
            "{code} is logged:\n{log}"
        );
    }
    assert!(log.contains("refused part-way"), "{log}");
}

/// `POST uri` with `len` bytes streamed without a Content-Length (chunked).
fn post_chunked(ep: &Endpoint, uri: &str, len: usize) -> (u16, Option<String>, Vec<u8>) {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let chunk = bytes::Bytes::from(vec![b'M'; 64 << 10]);
        let chunks = futures_util::stream::iter(
            (0..len / chunk.len()).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
        )
        .map(|c| c.map(hyper::body::Frame::data));
        let req = http::Request::post(uri)
            .body(http_body_util::StreamBody::new(chunks))
            .unwrap();
        let resp = signet_protocol::client::send(ep, req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, None, body.to_vec())
    })
}

#[test]
fn signet_reads_the_daemons_refusal_of_an_upload_instead_of_a_broken_pipe() {
    let mut w = World::new();
    let ep = appliance(&mut w, "[profiles.release]\n[queue]\nspool_quota_mb = 1\n");
    let big = w.pe("big.exe");
    let mut bytes = std::fs::read(&big).unwrap();
    bytes.resize(16 << 20, 0);
    std::fs::write(&big, &bytes).unwrap();
    let out = signet(&ep, &["sign", big.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(code(&out), 6, "{err}");
    assert!(
        err.contains("spool")
            && err.contains("send it again later")
            && !err.contains("cannot reach"),
        "{err}"
    );
    assert!(
        w.log("signetd").contains("code=spool_full"),
        "{}",
        w.log("signetd")
    );
}

/// Runs `signet sign FILE` as a CI job would: again after each failure, once the
/// daemon answers again. Answers how many runs it took.
fn sign_as_ci(ep: &Endpoint, sock: &Path, file: &Path) -> usize {
    const RUNS: usize = 20;
    for run in 1..=RUNS {
        let out = signet(ep, &["sign", file.to_str().unwrap()]);
        if out.status.success() {
            return run;
        }
        assert_eq!(
            code(&out),
            6,
            "only an unreachable daemon fails a run: {}",
            stderr(&out)
        );
        wait_until("signetd answers again", || {
            UnixStream::connect(sock).is_ok()
        });
    }
    panic!("{} not signed in {RUNS} runs", file.display());
}

#[test]
fn signet_survives_signetd_killed_9_five_times_nothing_lost_nothing_signed_twice() {
    survives_kills("", None);
}

/// The same with the native engine and files of 256 KiB: their signed files come
/// back to `signet` as patches to the input it holds, sent before `signed` is
/// committed, its end only after; a kill between the two leaves no file made of them.
#[test]
fn signet_takes_patches_across_signetd_killed_9_nothing_lost_nothing_signed_twice() {
    survives_kills("[signer]\nbackend = \"native\"\n", Some(256 << 10));
}

/// Three callers sign eight files each as CI jobs would while signetd is killed with
/// -9 five times: every file is signed, each input once.
fn survives_kills(agent_extra: &str, size: Option<u64>) {
    const CALLERS: u32 = 3;
    const FILES: u32 = 8;
    const KILLS: usize = 5;
    let mut w = World::new();
    let ep = appliance_with(
        &mut w,
        "[profiles.release]\ndescription = \"Signet test\"\n[limits]\nmax_jobs_per_caller = 16\n",
        agent_extra,
    );
    let sock = w.path("signetd.sock");
    let files: Vec<Vec<PathBuf>> = (0..CALLERS)
        .map(|c| {
            (0..FILES)
                .map(|f| tagged_pe_of(&w, &format!("c{c}-f{f}.exe"), c * 100 + f, size))
                .collect()
        })
        .collect();
    let hashes: std::collections::HashSet<String> = files
        .iter()
        .flatten()
        .map(|f| sha256_hex(&std::fs::read(f).unwrap()))
        .collect();
    assert_eq!(
        hashes.len(),
        (CALLERS * FILES) as usize,
        "every input differs"
    );

    let done = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let callers: Vec<_> = files
        .iter()
        .cloned()
        .map(|files| {
            let ep = ep.clone();
            let sock = sock.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let runs = files
                    .iter()
                    .map(|f| sign_as_ci(&ep, &sock, f))
                    .sum::<usize>();
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                runs
            })
        })
        .collect();

    // Kill -9 as soon as the restarted daemon has accepted a job, and start it again
    // at once, until it was killed KILLS times.
    let mut kills = 0;
    while kills < KILLS {
        let all_done = || done.load(std::sync::atomic::Ordering::SeqCst) == CALLERS;
        wait_until("a job accepted since the last start", || {
            all_done() || w.log("signetd").contains("job accepted")
        });
        if all_done() {
            break;
        }
        w.kill("signetd");
        kills += 1;
        w.restart_daemon();
    }
    let runs: usize = callers.into_iter().map(|c| c.join().unwrap()).sum();
    assert_eq!(
        kills, KILLS,
        "the callers were done before the daemon was killed {KILLS} times"
    );

    // Nothing lost: every file is signed in place.
    for f in files.iter().flatten() {
        assert!(verify(&w, f).0, "{} is signed", f.display());
    }
    // Nothing signed twice: one signature per input, and the chain is whole.
    let records = w.audit_records();
    let mut per_input = std::collections::HashMap::<String, usize>::new();
    for r in records.iter().filter(|r| r["result"] == "signed") {
        *per_input
            .entry(r["input_sha256"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let twice: Vec<_> = per_input.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "signed twice: {twice:?}");
    let signed: std::collections::HashSet<String> = per_input.into_keys().collect();
    assert_eq!(signed, hashes, "one signature for each input, none else");
    if size.is_some() {
        let log = w.log("signetd");
        assert!(log.contains("answer=\"patch kept\""), "{log}");
    }
    // Each file in place is the signed file its audit record names, whether it came
    // whole or was made here of the input and a patch.
    let outputs: std::collections::HashSet<&str> = records
        .iter()
        .filter(|r| r["result"] == "signed")
        .filter_map(|r| r["output_sha256"].as_str())
        .collect();
    for f in files.iter().flatten() {
        let sha = sha256_hex(&std::fs::read(f).unwrap());
        assert!(
            outputs.contains(sha.as_str()),
            "{} is no signed file the audit names",
            f.display()
        );
    }
    let out = w.signetd(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}{}",
        stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );
    // And the token signed each input once: a job signetd sent again after a kill got
    // the result the agent kept for it, not a second signature.
    let agent_log = w.log("signet-agent");
    for f in files.iter().flatten() {
        let name = f.file_name().unwrap().to_str().unwrap();
        let n = agent_log
            .matches(&format!(": signed file=\"{name}\""))
            .count();
        assert_eq!(n, 1, "the agent signed {name} {n} times:\n{agent_log}");
    }
    eprintln!(
        "{kills} kills, {runs} runs of signet for {} files, {} results the agent kept sent again",
        hashes.len(),
        agent_log.matches("its kept result goes back").count()
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn on_a_terminal_signet_says_its_job_stays_queued_while_signetd_restarts() {
    let mut w = World::new();
    let ep = appliance(&mut w, "[profiles.release]\n");
    // The job waits in the queue: the agent is away.
    w.stop("signet-agent");
    let file = w.pe("app.exe");
    let mut client = OnTerminal::sign(&w, &ep, &file);
    wait_until("the job queued and waiting", || {
        client.screen().contains("waiting:")
    });
    w.kill("signetd");
    wait_until("the restart said on the progress line", || {
        client
            .screen()
            .contains("appliance restarting; job 1 stays queued")
    });
    w.restart_daemon();
    let pin = w.path("pin");
    w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    assert!(client.success(), "{}", client.screen());
    assert!(client.screen().contains("job 1"), "{}", client.screen());
    assert!(verify(&w, &file).0);
    let signed = w
        .audit_records()
        .iter()
        .filter(|r| r["result"] == "signed")
        .count();
    assert_eq!(signed, 1);
}

/// Digest mode's key names the whole file, not only the data it sends: that data is
/// the same before and after a file is signed (the signature is not hashed), so a key
/// made of it alone would hand a nesting re-run the first run's signature back, and
/// the file would carry the same signature twice instead of a second one.
#[test]
fn digest_mode_signs_an_already_signed_file_again_under_a_new_key() {
    let mut w = World::new();
    let ep = appliance(
        &mut w,
        "default_profile = \"nested\"\n[profiles.nested]\nnested = true\n",
    );
    let file = w.pe("app.exe");
    let ca = w.path("cert.pem");
    let sign = || {
        let out = signet(
            &ep,
            &[
                "sign",
                "--json",
                "--digest",
                "--ca-file",
                ca.to_str().unwrap(),
                "-d",
                "the same description",
                file.to_str().unwrap(),
            ],
        );
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let report = json(&out.stdout);
        report["job"].as_str().unwrap().to_owned()
    };
    let first = sign();
    let once = std::fs::read(&file).unwrap();
    let second = sign();
    assert_ne!(
        first, second,
        "the signed file is another request: a new job"
    );
    let twice = std::fs::read(&file).unwrap();
    assert_ne!(once, twice);
    let (ok, text) = verify(&w, &file);
    assert!(ok, "{text}");
    assert_eq!(
        text.matches("Signature Index: ").count(),
        2,
        "the first signature and one nested: {text}"
    );
    let stopped = w.sigterm("signetd", std::time::Duration::from_secs(60));
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");
    let signed = w
        .audit_records()
        .iter()
        .filter(|r| r["result"] == "signed")
        .count();
    assert_eq!(signed, 2, "two jobs signed, one per run");
}

/// A whole file's key names its identity (device, inode, size, modification and
/// change times), which costs no read before the upload. Where that identity named
/// other content before — a file rewritten at the same size within one tick of the
/// file system's clock — the appliance refuses the key for the new body
/// (`idempotency_key_reused`), and `signet` sends the file once more keyed by its
/// content's SHA-256: signed, and never the other content's result. The collision is
/// made here by sending another file first under the key `signet` makes of this file's
/// identity (collect::idempotency_key over collect::file_identity).
#[test]
fn a_whole_file_whose_identity_key_names_other_content_is_sent_again_keyed_by_its_content() {
    use std::os::unix::fs::MetadataExt;
    let mut w = World::new();
    let ep = appliance(
        &mut w,
        "default_profile = \"release\"\n[profiles.release]\n",
    );
    let a = tagged_pe(&w, "a.exe", 1);
    let other = std::fs::read(tagged_pe(&w, "b.exe", 2)).unwrap();
    let m = std::fs::metadata(&a).unwrap();
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    let identity = format!(
        "id:{}:{}:{}:{}:{}",
        m.dev(),
        m.ino(),
        m.size(),
        ns(m.mtime(), m.mtime_nsec()),
        ns(m.ctime(), m.ctime_nsec())
    );
    let key = format!(
        "signet1-{}",
        sha256_hex(format!("sign\nfilename=a.exe\na.exe\0{identity}").as_bytes())
    );
    let (status, taken, _) = post(
        &ep,
        "/v1/sign?filename=a.exe",
        &[("idempotency-key", key.as_str())],
        other,
    );
    assert_eq!(status, 200);
    let taken = taken.unwrap();

    let out_path = w.path("signed.exe");
    let out = signet(
        &ep,
        &[
            "sign",
            "--json",
            "-o",
            out_path.to_str().unwrap(),
            a.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("sending it again keyed by its content"),
        "the identity key was refused and the content's taken: {}",
        stderr(&out)
    );
    let report = json(&out.stdout);
    assert_ne!(report["job"].as_str(), Some(taken.as_str()), "{report}");
    let (ok, text) = verify(&w, &out_path);
    assert!(ok, "{text}");
    let signed = std::fs::read(&out_path).unwrap();
    assert_eq!(&signed[0x4e..0x56], b"00000001", "a.exe's content, signed");
}

/// `signet sign` interrupted (SIGINT) while its job waits at the appliance: it says so
/// and how to collect the job, exits 130, and leaves nothing beside the target — not
/// even the held input it wrote there for the patch it waited for.
#[test]
fn interrupted_while_its_job_waits_signet_leaves_nothing_behind_and_says_how_to_collect() {
    let mut w = World::new();
    let ep = appliance_with(
        &mut w,
        "[profiles.release]\n",
        "[signer]\nbackend = \"native\"\n",
    );
    // The job waits in the queue: the agent is away.
    w.stop("signet-agent");
    let file = tagged_pe_of(&w, "big.exe", 1, Some(256 << 10));
    let before = std::fs::read(&file).unwrap();
    let dir = w.path("out");
    std::fs::create_dir(&dir).unwrap();
    let target = dir.join("big-signed.exe");
    let child = std::process::Command::new(bin("signet"))
        .env("SIGNET_ENDPOINT", ep.to_string())
        .env_remove("SIGNET_CONFIG")
        .env("SIGNET_PROFILE_CACHE", "off")
        .args([
            "sign",
            "-o",
            target.to_str().unwrap(),
            file.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let beside = || {
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    };
    wait_until("the held input written beside the target", || {
        beside().iter().any(|n| n.starts_with(".signet-"))
    });
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("interrupted")
            && stderr(&out).contains("run the command again for the files not yet written"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        beside(),
        Vec::<String>::new(),
        "nothing left beside the target"
    );
    assert_eq!(std::fs::read(&file).unwrap(), before, "the input untouched");
}
