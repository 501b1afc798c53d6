//! The native backend (`[signer] backend = "native"`) through the whole path, as
//! `formats` does it with osslsigncode: PE, MSI, CAB, PowerShell, APPX/MSIX and catalog files, page
//! hashes, nested signatures, digest mode and RFC 3161 timestamps (the engine's own,
//! from a real TSA after a dead one, whole and in digest mode, and over https from a
//! TSA behind TLS its CA file trusts after one of an unknown CA), each verified with
//! `osslsigncode verify`; and,
//! through OpenSC's PKCS#11 logger, the token sees one signature operation per
//! signature and no
//! other login, session or initialisation of the module than the agent's own.

use std::path::Path;

use signet_test_support::*;

use crate::{code, stderr};

const NATIVE: &str = "[signer]\nbackend = \"native\"\n";

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn signatures(verify_output: &str) -> usize {
    verify_output
        .lines()
        .filter(|l| l.starts_with("Signature Index: "))
        .count()
}

/// How often the module was called with `function` (the logger's "N: C_Xxx" lines).
fn calls(spy_log: &str, function: &str) -> usize {
    spy_log
        .lines()
        .filter(|l| {
            l.split_once(": ")
                .is_some_and(|(n, f)| n.chars().all(|c| c.is_ascii_digit()) && f.trim() == function)
        })
        .count()
}

#[test]
fn the_native_backend_signs_every_format_on_the_agents_session_one_c_sign_each() {
    let mut w = World::new();
    let tsa = Tsa::start(&w.path("tsa"));
    let dead = refused_url();
    let spy_log = w.path("spy.log");
    let pin = w.path("pin");
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        PKCS11_SPY,
        &pin,
        &[
            ("PKCS11SPY", SOFTHSM),
            ("PKCS11SPY_OUTPUT", spy_log.to_str().unwrap()),
        ],
        NATIVE,
    );
    let ep = w
        .start_daemon_with(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
            &format!(
                "default_profile = \"first\"\n[profiles.first]\nhash = \"sha256\"\n\
                 [profiles.second]\nhash = \"sha512\"\nnested = true\n\
                 [profiles.paged]\nhash = \"sha384\"\npage_hashes = true\n\
                 [profiles.stamped]\nhash = \"sha256\"\ntimestamp = [\"{dead}\", \"{}\"]\n",
                tsa.url
            ),
        )
        .remove(0);

    let exe = w.pe("app.exe");
    let msi = w.msi("setup.msi");
    let cab = w.cab("payload.cab");
    let ps1 = w.file("run.ps1", b"Write-Host \"Hello from Signet\"\r\n");
    let files = [&exe, &msi, &cab, &ps1];
    let mut args = vec!["sign"];
    args.extend(files.iter().map(|f| arg(f)));
    let out = signet(&ep, &args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for f in files {
        let (ok, text) = verify(&w, f);
        assert!(ok, "{}: {text}", f.display());
        assert!(text.contains("Signet Demo Code Signing"), "{text}");
    }

    // Nested with another hash: the first signature stays.
    let out = signet(&ep, &["sign", "-p", "second", arg(&exe), arg(&ps1)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for f in [&exe, &ps1] {
        let (ok, text) = verify(&w, f);
        assert!(ok, "{text}");
        assert_eq!(signatures(&text), 2, "{}: {text}", f.display());
        assert!(
            text.contains("SHA256") && text.contains("SHA512"),
            "both digests: {text}"
        );
    }

    // Page hashes, whole and in digest mode.
    let paged = w.pe("paged.exe");
    let digest = w.pe("digest.exe");
    let out = signet(&ep, &["sign", "-p", "paged", arg(&paged)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let ca = w.path("cert.pem");
    let out = signet(
        &ep,
        &[
            "sign",
            "--digest",
            "--ca-file",
            arg(&ca),
            "-p",
            "paged",
            arg(&digest),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for f in [&paged, &digest] {
        let (ok, text) = verify(&w, f);
        assert!(ok, "{text}");
        assert!(
            text.contains("Message digest algorithm  : SHA384")
                && text.contains("Page hash algorithm  : SHA256")
                && text.contains("Calculated page hash"),
            "{}: {text}",
            f.display()
        );
    }

    // A catalog, signed natively.
    let cat = w.cat("drivers.cat");
    let out = signet(&ep, &["sign", arg(&cat)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (ok, text) = verify(&w, &cat);
    assert!(ok && signatures(&text) == 1, "{text}");

    // Timestamps from the TSA after the dead server: whole files (PE, MSI through
    // attach-signature, a catalog) and digest mode, one timestamp per signature.
    let stamped = [
        w.pe("stamped.exe"),
        w.msi("stamped.msi"),
        w.cat("stamped.cat"),
    ];
    let mut args = vec!["sign", "-p", "stamped"];
    args.extend(stamped.iter().map(|f| arg(f)));
    let out = signet(&ep, &args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let digest_stamped = w.pe("digest-stamped.exe");
    let out = signet(
        &ep,
        &[
            "sign",
            "--digest",
            "--ca-file",
            arg(&ca),
            "-p",
            "stamped",
            arg(&digest_stamped),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(tsa.replies(), 4, "one timestamp per signature");
    let tsa_ca = tsa.cert.to_str().unwrap();
    for f in stamped.iter().chain([&digest_stamped]) {
        let (ok, text) = verify_with(&w, f, &["-TSA-CAfile", tsa_ca]);
        assert!(
            ok && text.contains("Timestamp Server Signature verification: ok")
                && text.contains("Timestamp time:"),
            "{}: {text}",
            f.display()
        );
    }

    // Thirteen signatures, one signature operation each (C_SignInit, then C_Sign asked
    // for the length and then for the signature); one login, one session, one
    // C_Initialize: the agent's own.
    let log = std::fs::read_to_string(&spy_log).unwrap();
    assert_eq!(calls(&log, "C_SignInit"), 13, "{log}");
    assert_eq!(calls(&log, "C_Sign"), 26, "{log}");
    assert_eq!(calls(&log, "C_Login"), 1, "{log}");
    assert_eq!(calls(&log, "C_Initialize"), 1, "{log}");
    assert_eq!(calls(&log, "C_OpenSession"), 1, "{log}");
    let health = w.log("signet-agent");
    assert!(health.contains("signet-authenticode"), "{health}");
}

/// Agent (native backend, SoftHSM) and daemon on unix sockets, `profiles` the
/// daemon's profile tables.
fn native_appliance(w: &mut World, profiles: &str) -> Endpoint {
    let pin = w.path("pin");
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
        NATIVE,
    );
    w.start_daemon_with(
        &[&format!("unix:{}", w.path("signetd.sock").display())],
        &agent,
        profiles,
    )
    .remove(0)
}

#[test]
fn the_native_backend_signs_appx_packages_and_bundles_through_osslsigncodes_data() {
    let mut w = World::new();
    let ep = native_appliance(
        &mut w,
        "default_profile = \"first\"\n[profiles.first]\nhash = \"sha256\"\n",
    );
    let package = w.appx("app.msix", false);
    let bundle = w.appx("app.msixbundle", true);
    let out = signet(&ep, &["sign", arg(&package), arg(&bundle)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for f in [&package, &bundle] {
        let (ok, text) = verify(&w, f);
        assert!(ok, "{}: {text}", f.display());
        assert!(text.contains("Signet Demo Code Signing"), "{text}");
        assert_eq!(signatures(&text), 1, "{text}");
    }
}

#[test]
fn the_native_backend_timestamps_from_an_https_tsa_its_ca_file_trusts() {
    let mut w = World::new();
    let tsa = Tsa::start(&w.path("tsa"));
    // The same TSA behind two TLS listeners: one with a certificate of the CA the agent
    // is given, one of a CA it does not know.
    let (ours, stranger) = (w.path("tls-ours"), w.path("tls-stranger"));
    std::fs::create_dir_all(&ours).unwrap();
    std::fs::create_dir_all(&stranger).unwrap();
    let (tls_ca, cert, key) = make_tls(&ours);
    let (_, other_cert, other_key) = make_tls(&stranger);
    let front = TlsFront::start(&tsa.url, &cert, &key);
    let unknown = TlsFront::start(&tsa.url, &other_cert, &other_key);
    let pin = w.path("pin");
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
        &format!("{NATIVE}timestamp_ca_file = \"{}\"\n", tls_ca.display()),
    );
    let ep = w
        .start_daemon_with(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
            &format!(
                "default_profile = \"stamped\"\n[profiles.stamped]\nhash = \"sha256\"\n\
                 timestamp = [\"{}\", \"{}\"]\n\
                 [profiles.unknown]\nhash = \"sha256\"\ntimestamp = [\"{}\"]\n",
                unknown.url, front.url, unknown.url
            ),
        )
        .remove(0);

    let exe = w.pe("https.exe");
    let out = signet(&ep, &["sign", arg(&exe)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let digest = w.pe("https-digest.exe");
    let ca = w.path("cert.pem");
    let out = signet(
        &ep,
        &["sign", "--digest", "--ca-file", arg(&ca), arg(&digest)],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // Each signature: the unknown CA's listener refused once, the TSA asked through ours.
    assert_eq!(
        (unknown.connections(), front.connections(), tsa.replies()),
        (2, 2, 2)
    );
    let log = w.log("signet-agent");
    assert!(
        log.contains("does not chain to the system's roots or signer.timestamp_ca_file"),
        "{log}"
    );
    // Only the unknown CA's: nothing is signed, and the caller is told why and the fix.
    let refused = w.pe("refused.exe");
    let before = std::fs::read(&refused).unwrap();
    let out = signet(&ep, &["sign", "-p", "unknown", arg(&refused)]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not chain to the system's roots")
            && stderr(&out).contains("set signer.timestamp_ca_file"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&refused).unwrap(), before);
    assert_eq!((unknown.connections(), tsa.replies()), (3, 2));
    let tsa_ca = tsa.cert.to_str().unwrap();
    for f in [&exe, &digest] {
        let (ok, text) = verify_with(&w, f, &["-TSA-CAfile", tsa_ca]);
        assert!(
            ok && text.contains("Timestamp Server Signature verification: ok")
                && text.contains("Timestamp time:"),
            "{}: {text}",
            f.display()
        );
    }
}

#[test]
fn the_native_backend_trusts_an_https_tsa_through_the_systems_roots() {
    let mut w = World::new();
    let tsa = Tsa::start(&w.path("tsa"));
    let tls = w.path("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let (tls_ca, cert, key) = make_tls(&tls);
    let front = TlsFront::start(&tsa.url, &cert, &key);
    // The system's roots are OpenSSL's: SSL_CERT_FILE naming a bundle that holds the
    // test CA, and no timestamp_ca_file.
    let pin = w.path("pin");
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[("SSL_CERT_FILE", arg(&tls_ca))],
        NATIVE,
    );
    let ep = w
        .start_daemon_with(
            &[&format!("unix:{}", w.path("signetd.sock").display())],
            &agent,
            &format!(
                "default_profile = \"stamped\"\n[profiles.stamped]\nhash = \"sha256\"\n\
                 timestamp = [\"{}\"]\n",
                front.url
            ),
        )
        .remove(0);
    let exe = w.pe("https.exe");
    let out = signet(&ep, &["sign", arg(&exe)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!((front.connections(), tsa.replies()), (1, 1));
    let (ok, text) = verify_with(&w, &exe, &["-TSA-CAfile", tsa.cert.to_str().unwrap()]);
    assert!(
        ok && text.contains("Timestamp Server Signature verification: ok"),
        "{text}"
    );
}

/// A PE comes back from the agent as what signing changed, whether the agent held it
/// in memory (up to 1 MiB) or spooled it, and signetd makes the signed file of the
/// input it has: for a small one, held in its database, as the result's bytes; for a
/// larger one, spooled, as that file and the patch (kept). Signed plainly, nested
/// beside that signature, and that pair replaced by a new one: each verifies, checksum
/// included.
#[test]
fn a_signed_pe_comes_back_as_its_changes_and_signetd_makes_the_signed_file() {
    let mut w = World::new();
    let ep = native_appliance(
        &mut w,
        "default_profile = \"first\"\n[profiles.first]\nhash = \"sha256\"\n\
         [profiles.second]\nhash = \"sha512\"\nnested = true\n",
    );
    // Held in memory on both sides; in memory at the agent and spooled by signetd;
    // spooled on both sides. `signet` holds a file of at most 1 MiB it sends, and
    // makes the signed file of it and the patch when signetd keeps the result so (a
    // small one is kept whole in its database); a larger one comes whole.
    for (name, size, answer, as_patch) in [
        ("small.exe", None, "answer=\"patch\"", false),
        (
            "medium.exe",
            Some(512u64 << 10),
            "answer=\"patch kept\"",
            true,
        ),
        ("large.exe", Some(2 << 20), "answer=\"patch kept\"", false),
    ] {
        let exe = w.path(name);
        match size {
            Some(n) => fixture("make-pe.sh", &[&exe, Path::new(&n.to_string())]),
            None => fixture("make-pe.sh", &[exe.as_path()]),
        }
        let made_here = |log: &str| {
            log.lines()
                .filter(|l| l.contains(" signed ") && l.contains(answer))
                .count()
        };
        let before = made_here(&w.log("signetd"));
        let mut sizes = Vec::new();
        for (profile, want) in [("first", 1), ("second", 2), ("first", 1)] {
            let out = signet(&ep, &["sign", "--json", "-p", profile, arg(&exe)]);
            assert_eq!(code(&out), 0, "{name} {profile}: {}", stderr(&out));
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let received = report["bytes_received"].as_u64().unwrap();
            let signed_len = std::fs::metadata(&exe).unwrap().len();
            assert_eq!(
                report["output_bytes"], signed_len,
                "{name} {profile}: {report}"
            );
            if as_patch {
                assert!(
                    received < 64 << 10 && received < signed_len,
                    "{name} {profile}: the patch alone crossed: {report}"
                );
            } else {
                assert_eq!(received, signed_len, "{name} {profile}: {report}");
            }
            let (ok, text) = verify(&w, &exe);
            assert!(ok, "{name} {profile}: {text}");
            assert!(!text.contains("MISMATCH"), "{name} {profile}: {text}");
            assert_eq!(signatures(&text), want, "{name} {profile}: {text}");
            sizes.push(std::fs::metadata(&exe).unwrap().len());
            // The audit record names the signed file delivered, made here of the
            // input (held in memory or read from its file) and the patch.
            let signed = std::fs::read(&exe).unwrap();
            let sha = signet_api::hex::lower(&<sha2::Sha256 as sha2::Digest>::digest(&signed));
            let records = w.audit_records();
            let last = records.last().unwrap();
            assert_eq!(
                last["output_sha256"],
                sha.as_str(),
                "{name} {profile}: {last}"
            );
            assert_eq!(
                last["output_bytes"],
                signed.len() as u64,
                "{name} {profile}: {last}"
            );
        }
        assert!(
            sizes[1] > sizes[0] && sizes[2] < sizes[1],
            "{name}: {sizes:?}"
        );
        let log = w.log("signetd");
        assert_eq!(made_here(&log) - before, 3, "{name}: {log}");
    }
}

/// A native agent on its unix socket, and the fixture PE (`make-pe.sh` with `args`)
/// as `app.exe`: the agent's endpoint, the PE's bytes and their SHA-256 (hex).
fn native_agent_and_pe(w: &mut World, args: &[&str]) -> (Endpoint, Vec<u8>, String) {
    let agent = w.start_agent_with(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &w.path("pin"),
        &[],
        NATIVE,
    );
    let exe = w.path("app.exe");
    let mut fixture_args = vec![exe.as_path()];
    fixture_args.extend(args.iter().map(Path::new));
    fixture("make-pe.sh", &fixture_args);
    let input = std::fs::read(&exe).unwrap();
    let sha = signet_api::hex::lower(&<sha2::Sha256 as sha2::Digest>::digest(&input));
    (agent, input, sha)
}

/// The agent answers a PE it signed held in memory (kept as the input and what
/// signing changed, not copied) as the signed file to a host that does not take the
/// patch, as the patch to one that does, and as the same bytes to a job sent again:
/// each the file osslsigncode verifies, the token signing once.
#[test]
fn an_agent_answers_a_pe_signed_in_memory_whole_or_as_its_changes_the_same_file() {
    use http_body_util::{BodyExt, Full};
    use signet_api::wire::{patch, INPUT_SHA256_HEADER, JOB_HEADER};
    let mut w = World::new();
    let (agent, input, sha) = native_agent_and_pe(&mut w, &[]);
    let ask = |job: &str, accept_patch: bool| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut req = http::Request::post("/agent/v1/sign?profile=release&filename=app.exe")
                .header(JOB_HEADER, job)
                .header(INPUT_SHA256_HEADER, &sha);
            if accept_patch {
                req = req.header(http::header::ACCEPT, patch::PATCH_MEDIA_TYPE);
            }
            let req = req
                .body(Full::new(bytes::Bytes::from(input.clone())))
                .unwrap();
            let resp = signet_protocol::client::send(&agent, req).await.unwrap();
            let status = resp.status().as_u16();
            let ct = resp
                .headers()
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            (ct, body.to_vec())
        })
    };
    let signs = || {
        w.log("signet-agent")
            .matches(": signed file=\"app.exe\"")
            .count()
    };
    let (ct, whole) = ask("job-1", false);
    assert_eq!(ct, "application/octet-stream");
    let out = w.path("whole.exe");
    std::fs::write(&out, &whole).unwrap();
    let (ok, text) = verify(&w, &out);
    assert!(ok && !text.contains("MISMATCH"), "{text}");
    // The same job again: its kept result, the same bytes; the token signs nothing.
    assert_eq!(ask("job-1", false).1, whole, "the kept result differs");
    let (ct, made) = ask("job-1", true);
    assert!(patch::is_patch_type(&ct), "{ct}");
    let p: patch::Patch = serde_json::from_slice(&made).unwrap();
    let p = p.check(input.len() as u64).unwrap();
    assert!(
        p.signed_file(&input) == whole,
        "the patch makes another file"
    );
    assert_eq!(signs(), 1, "{}", w.log("signet-agent"));
}

/// A host that sends an input on before it has hashed it (signetd does, for an input
/// of at most 1 MiB, while it hashes and flushes its spool file) sends the input's
/// SHA-256 as a trailer, announced in `Trailer`, the body chunked and its length in
/// `x-signet-input-length`: the real agent keys the result it keeps on it as on the
/// header, so the same job sent again is answered without a second signature, and a
/// trailer announced and never sent signs nothing.
#[test]
fn an_agent_keys_a_job_on_the_input_sha256_sent_after_the_input() {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use signet_api::wire::{INPUT_LENGTH_HEADER, INPUT_SHA256_HEADER, JOB_HEADER};
    let mut w = World::new();
    let (agent, input, sha) = native_agent_and_pe(&mut w, &["300000"]);
    let ask = |job: &str, trailer: Option<&str>| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // In pieces, as the spool's blocks go, the trailer last.
            let mut frames: Vec<Result<Frame<bytes::Bytes>, std::io::Error>> = input
                .chunks(100_000)
                .map(|c| Ok(Frame::data(bytes::Bytes::copy_from_slice(c))))
                .collect();
            if let Some(t) = trailer {
                let mut map = http::HeaderMap::new();
                map.insert(INPUT_SHA256_HEADER, http::HeaderValue::from_str(t).unwrap());
                frames.push(Ok(Frame::trailers(map)));
            }
            let req = http::Request::post("/agent/v1/sign?profile=release&filename=app.exe")
                .header(JOB_HEADER, job)
                .header(http::header::TRAILER, INPUT_SHA256_HEADER)
                .header(INPUT_LENGTH_HEADER, input.len())
                .body(StreamBody::new(futures_util::stream::iter(frames)))
                .unwrap();
            let resp = signet_protocol::client::send(&agent, req).await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, body.to_vec())
        })
    };
    let signs = || {
        w.log("signet-agent")
            .matches(": signed file=\"app.exe\"")
            .count()
    };
    let (status, signed) = ask("job-1", Some(&sha));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&signed));
    let out = w.path("signed.exe");
    std::fs::write(&out, &signed).unwrap();
    let (ok, text) = verify(&w, &out);
    assert!(ok && !text.contains("MISMATCH"), "{text}");
    assert_eq!(signs(), 1);
    // The same job and trailer again: the kept result, the token signs nothing.
    assert_eq!(ask("job-1", Some(&sha)), (200, signed.clone()));
    assert_eq!(signs(), 1, "{}", w.log("signet-agent"));
    // Announced and never sent: refused, nothing signed.
    let (status, body) = ask("job-2", None);
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("as a trailer and sent none"), "{body}");
    assert_eq!(signs(), 1, "{}", w.log("signet-agent"));
}

/// A small result (kept in signetd's database) asked for with `Prefer: early-result`
/// comes with its length in `x-signet-result-length` (chunked, when it comes before the
/// job is committed), from the upload's own answer and from the result's `GET`; without
/// the preference it comes once the job has ended, with its `Content-Length`. Each is the
/// signed file, and verifies.
#[test]
fn a_small_result_asked_for_early_comes_with_its_length_and_otherwise_as_before() {
    use http_body_util::{BodyExt, Full};
    use signet_api::wire::{EARLY_RESULT, JOB_HEADER, RESULT_LENGTH_HEADER};
    let mut w = World::new();
    let ep = native_appliance(&mut w, "");
    let exe = w.path("small.exe");
    fixture("make-pe.sh", &[exe.as_path()]);
    let input = std::fs::read(&exe).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // (the upload's `Prefer`, whether the result is fetched with a `GET`, early)
    for (n, (prefer, fetch, early)) in [
        (None, false, false),
        (Some(EARLY_RESULT), false, true),
        (Some("respond-async"), true, false),
        (Some("respond-async"), true, true),
    ]
    .into_iter()
    .enumerate()
    {
        let (length, result_length, body) = rt.block_on(async {
            let mut conn = signet_protocol::client::Connection::new(&ep);
            let mut req =
                http::Request::post(format!("/v1/sign?filename=small.exe&description=run-{n}"));
            if let Some(p) = prefer {
                req = req.header("prefer", p);
            }
            let req = req
                .body(Full::new(bytes::Bytes::from(input.clone())))
                .unwrap();
            let mut resp = conn.send(req).await.unwrap();
            if fetch {
                assert_eq!(resp.status().as_u16(), 202);
                let id = resp.headers()[JOB_HEADER].to_str().unwrap().to_owned();
                resp.into_body().collect().await.unwrap();
                let mut get = http::Request::get(format!("/v1/jobs/{id}/result"));
                if early {
                    get = get.header("prefer", EARLY_RESULT);
                }
                let get = get.body(Full::new(bytes::Bytes::new())).unwrap();
                resp = conn.send(get).await.unwrap();
            }
            assert_eq!(resp.status().as_u16(), 200);
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().parse::<u64>().unwrap())
            };
            let (length, result_length) = (header("content-length"), header(RESULT_LENGTH_HEADER));
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (length, result_length, body.to_vec())
        });
        let case = format!("prefer {prefer:?}, fetched {fetch}, early {early}");
        if early {
            // Chunked when it came before the job was committed signed; with its
            // `Content-Length` too when the job ended first.
            assert!(length.is_none_or(|n| n == body.len() as u64), "{case}");
            assert_eq!(result_length, Some(body.len() as u64), "{case}");
        } else {
            assert_eq!(length, Some(body.len() as u64), "{case}");
            assert_eq!(result_length, None, "{case}");
        }
        let out = w.path(&format!("signed-{n}.exe"));
        std::fs::write(&out, &body).unwrap();
        let (ok, text) = verify(&w, &out);
        assert!(ok && !text.contains("MISMATCH"), "{case}: {text}");
    }
}
