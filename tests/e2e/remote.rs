//! Remote clients over TLS with a secret, and the Handtokening-compatible
//! `POST /api/sign`, driven with real curl as existing integrations do.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;

struct Remote {
    w: World,
    cfg: PathBuf,
    /// The CA that issued the server's certificate.
    cert: PathBuf,
    /// `https://127.0.0.1:PORT`
    base: String,
}

fn remote() -> Remote {
    let mut w = World::new();
    let (ca, cert, key) = make_tls(&w.path(""));
    let pin = w.path("pin");
    let agent = w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    let eps = w.start_daemon_config(&format!(
        r#"listen = ["unix:{sock}"]
agent = "{agent}"
state_dir = "{state}"
default_profile = "release"
[tls]
listen = ["tcp:127.0.0.1:0"]
cert = "{cert}"
key = "{key}"
[profiles.release]
description = "Signet test"
[profiles.other]
"#,
        sock = w.path("signetd.sock").display(),
        state = w.path("state").display(),
        cert = cert.display(),
        key = key.display(),
    ));
    let Endpoint::Tcp { port, .. } = &eps[1] else {
        panic!("{eps:?}")
    };
    let base = format!("https://127.0.0.1:{port}");
    let cfg = w.path("signetd.toml");
    Remote {
        w,
        cfg,
        cert: ca,
        base,
    }
}

impl Remote {
    fn signetd(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("signetd"))
            .arg("--config")
            .arg(&self.cfg)
            .args(args)
            .output()
            .unwrap()
    }

    fn add_client(&self, name: &str, profile: &str, valid: &str) -> String {
        let out = self.signetd(&[
            "client",
            "add",
            name,
            "--profile",
            profile,
            "--valid",
            valid,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// curl as a Handtokening integration calls it; answers the HTTP status and the
    /// body (the signed file is written to `out`).
    fn curl(&self, user: Option<&str>, file: &Path, path_query: &str, out: &Path) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "300", "--cacert"])
            .arg(&self.cert)
            .arg("--data-binary")
            .arg(format!("@{}", file.display()))
            .args([
                "-H",
                &format!(
                    "Content-Disposition: attachment; filename=\"{}\"",
                    file.file_name().unwrap().to_str().unwrap()
                ),
            ])
            .arg("-o")
            .arg(out)
            .args(["-w", "%{http_code}"]);
        if let Some(u) = user {
            cmd.args(["-u", u]);
        }
        let o = cmd
            .arg(format!("{}{path_query}", self.base))
            .output()
            .unwrap();
        let status = String::from_utf8_lossy(&o.stdout).parse().unwrap_or(0);
        (status, std::fs::read_to_string(out).unwrap_or_default())
    }
}

fn detail(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{body}"));
    v["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_owned()
}

#[test]
fn handtokening_clients_sign_with_curl_over_tls() {
    let r = remote();
    let secret = r.add_client("ci", "release", "4h");
    assert_eq!(secret.len(), 40, "160 bits in hex: {secret}");
    let listed = r.signetd(&["client", "list"]);
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed.starts_with("ci\trelease\texpires in 3h59m")
            || listed.starts_with("ci\trelease\texpires in 4h00m"),
        "{listed}"
    );
    assert!(!listed.contains(&secret), "the secret is never shown again");

    let file = r.w.pe("x.dll");
    let out = r.w.path("x-signed.dll");
    let ci = format!("ci:{secret}");
    let (status, _) = r.curl(
        Some(&ci),
        &file,
        "/api/sign?signing-profile=release&description=From%20CI",
        &out,
    );
    assert_eq!(status, 200, "{}", r.w.log("signetd"));
    let (ok, text) = verify(&r.w, &out);
    assert!(ok && text.contains("From CI"), "{text}");
    assert!(
        r.w.log("signetd").contains("client \"ci\""),
        "the job names the client"
    );

    // response-type=pkcs7: only the signature, which attaches to the unsigned file
    // and verifies there.
    let sig = r.w.path("x.p7");
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "300", "--cacert"])
        .arg(&r.cert)
        .args(["-u", &ci, "--data-binary"])
        .arg(format!("@{}", file.display()))
        .args(["-H", "Content-Disposition: attachment; filename=\"x.dll\""])
        .arg("-o")
        .arg(&sig)
        .args(["-w", "%{http_code} %{content_type}"])
        .arg(format!(
            "{}/api/sign?signing-profile=release&response-type=pkcs7",
            r.base
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "200 application/pkcs7-signature",
        "{}",
        r.w.log("signetd")
    );
    let attached = r.w.path("x-attached.dll");
    let out = Command::new("osslsigncode")
        .args(["attach-signature", "-CAfile"])
        .arg(r.w.path("cert.pem"))
        .arg("-sigin")
        .arg(&sig)
        .arg("-in")
        .arg(&file)
        .arg("-out")
        .arg(&attached)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let (ok, text) = verify(&r.w, &attached);
    assert!(ok && text.contains("Signet Demo Code Signing"), "{text}");

    // The /v1 API over TLS takes the same credentials.
    let out2 = r.w.path("x-signed-v1.dll");
    let (status, _) = r.curl(Some(&ci), &file, "/v1/sign?filename=x.dll", &out2);
    assert_eq!(status, 200);
    assert!(verify(&r.w, &out2).0);

    // No credentials, a wrong secret, an unknown client: 403, and the daemon does
    // not say which.
    let junk = r.w.path("junk");
    for user in [
        None,
        Some("ci:0123456789abcdef0123456789abcdef01234567"),
        Some(&*format!("cd:{secret}")),
    ] {
        let (status, body) = r.curl(user, &file, "/api/sign?signing-profile=release", &junk);
        assert_eq!(status, 403, "{user:?}: {body}");
        let d = detail(&body);
        assert!(d.contains("HTTP Basic") && !d.contains(&secret), "{d}");
    }
    // Unknown profile: 404; a profile the client was not added for: 403 naming both.
    let (status, body) = r.curl(Some(&ci), &file, "/api/sign?signing-profile=nope", &junk);
    assert_eq!(status, 404, "{body}");
    assert!(detail(&body).contains("\"nope\""), "{body}");
    let (status, body) = r.curl(Some(&ci), &file, "/api/sign?signing-profile=other", &junk);
    assert_eq!(status, 403, "{body}");
    assert!(
        detail(&body).contains("client \"ci\" may not sign with profile \"other\""),
        "{body}"
    );
    // Malformed query, unsupported input: 400 and 415 with a detail.
    let (status, body) = r.curl(Some(&ci), &file, "/api/sign?signing-profil=release", &junk);
    assert_eq!(status, 400, "{body}");
    assert!(detail(&body).contains("signing-profile"), "{body}");
    let text = r.w.file("notes.dll", b"not a program at all");
    let (status, body) = r.curl(Some(&ci), &text, "/api/sign?signing-profile=release", &junk);
    assert_eq!(status, 415, "{body}");
    assert!(!detail(&body).is_empty());

    // A job belongs to the client that sent it: over TLS, /v1/jobs/* wants the same
    // credentials, and another client does not see it. Job 1 is the first signature.
    let get_job = |user: Option<&str>| {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "60", "--cacert"])
            .arg(&r.cert)
            .args(["-w", "\n%{http_code}"]);
        if let Some(u) = user {
            cmd.args(["-u", u]);
        }
        let o = cmd.arg(format!("{}/v1/jobs/1", r.base)).output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap();
        (status.to_owned(), body.to_owned())
    };
    let (status, body) = get_job(Some(&ci));
    assert_eq!(status, "200", "{body}");
    assert!(body.contains("\"state\":\"signed\""), "{body}");
    let (status, body) = get_job(None);
    assert_eq!(status, "403", "{body}");
    let cd = format!("cd:{}", r.add_client("cd", "release", "1h"));
    let (status, body) = get_job(Some(&cd));
    assert_eq!(status, "404", "{body}");
    assert!(body.contains("unknown_job"), "{body}");

    // The audit log names the client and the transport; a refused credential is
    // recorded under the peer's address.
    let out = r.signetd(&["audit", "export"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let records: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let signed: Vec<_> = records.iter().filter(|r| r["result"] == "signed").collect();
    assert_eq!(signed.len(), 3, "{records:#?}");
    for rec in &signed {
        assert_eq!(
            (&rec["caller"], &rec["transport"]),
            (&"client:ci".into(), &"tls".into()),
            "{rec}"
        );
    }
    let refused_creds = records
        .iter()
        .filter(|r| {
            r["error"] == "forbidden" && r["caller"].as_str().unwrap().starts_with("tcp:127.0.0.1:")
        })
        .count();
    assert_eq!(refused_creds, 3, "{records:#?}");
    assert!(
        records.iter().any(|r| r["error"] == "forbidden"
            && r["caller"] == "client:ci"
            && r["profile"] == "other"),
        "{records:#?}"
    );

    // Removed: its secret stops working at once.
    assert!(r.signetd(&["client", "remove", "ci"]).status.success());
    let (status, _) = r.curl(Some(&ci), &file, "/api/sign?signing-profile=release", &junk);
    assert_eq!(status, 403);
}

#[test]
fn an_expired_secret_is_refused() {
    let r = remote();
    let secret = r.add_client("short", "release", "1s");
    // Wait until the daemon's own tool says it has expired (a condition, not a timer).
    let started = Instant::now();
    loop {
        let out = r.signetd(&["client", "list"]);
        if String::from_utf8_lossy(&out.stdout).contains("short\trelease\texpired") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(100));
    }
    let file = r.w.pe("late.exe");
    let (status, body) = r.curl(
        Some(&format!("short:{secret}")),
        &file,
        "/api/sign",
        &r.w.path("late-out"),
    );
    assert_eq!(status, 403, "{body}");
    assert!(detail(&body).contains("not valid"), "{body}");
    assert!(
        r.w.log("signetd").contains("the secret has expired"),
        "the log says why"
    );
    let bad = r.signetd(&[
        "client",
        "add",
        "x",
        "--profile",
        "release",
        "--valid",
        "forever",
    ]);
    assert_eq!(code(&bad), 2);
    assert!(stderr(&bad).contains("4h"), "{}", stderr(&bad));
}

#[test]
fn signet_signs_as_a_remote_client_over_tls() {
    let r = remote();
    let secret = r.add_client("ci", "release", "1d");
    let endpoint = format!("tls:127.0.0.1:{}", r.base.rsplit(':').next().unwrap());
    let signet_tls = |secret: Option<&str>, file: &Path| {
        let mut cmd = Command::new(bin("signet"));
        cmd.args(["--endpoint", &endpoint, "--client", "ci", "--tls-ca"])
            .arg(&r.cert)
            .env_remove("SIGNET_CONFIG")
            .arg("sign")
            .arg(file)
            .env_remove("SIGNET_SECRET");
        if let Some(s) = secret {
            cmd.env("SIGNET_SECRET", s);
        }
        cmd.output().unwrap()
    };
    let file = r.w.pe("remote.exe");
    let out = signet_tls(Some(&secret), &file);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&r.w, &file).0);

    let other = r.w.pe("other.exe");
    let out = signet_tls(None, &other);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("SIGNET_SECRET"), "{}", stderr(&out));
    let out = signet_tls(Some("0000000000000000000000000000000000000000"), &other);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("not valid"), "{}", stderr(&out));
    assert!(!verify(&r.w, &other).0, "nothing was signed");
}

#[test]
fn signetd_tls_init_makes_a_ca_and_server_certificate_and_signet_explains_a_ca_used_as_one() {
    use std::os::unix::fs::PermissionsExt;
    let mut w = World::new();
    let dir = w.path("tls");
    let out = Command::new(bin("signetd"))
        .args(["tls", "init"])
        .arg(&dir)
        .args(["--host", "127.0.0.1", "--listen", "tcp:127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in [
        "[tls]",
        "listen = [\"tcp:127.0.0.1:0\"]",
        &format!("cert = \"{}\"", dir.join("server.pem").display()),
        &format!("key = \"{}\"", dir.join("server-key.pem").display()),
        "--tls-ca ca.pem",
    ] {
        assert!(printed.contains(line), "{line:?} in:\n{printed}");
    }
    let mode = |name: &str| {
        std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!((mode("server-key.pem"), mode("ca-key.pem")), (0o600, 0o600));
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // Run again, it leaves what it made alone.
    let again = Command::new(bin("signetd"))
        .args(["tls", "init"])
        .arg(&dir)
        .args(["--host", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("exists already"),
        "{}",
        stderr(&again)
    );

    // The printed lines are the configuration; signet trusts the CA and signs.
    let pin = w.path("pin");
    let agent = w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    let sock = w.path("signetd.sock");
    let config = |tls: &str| {
        format!(
            "listen = [\"unix:{}\"]\nagent = \"{agent}\"\ndefault_profile = \"release\"\n[profiles.release]\n{tls}",
            sock.display()
        )
    };
    let eps = w.start_daemon_config(&config(&printed));
    let endpoint = eps[1].to_string().replace("tcp:", "tls:");
    let add = w.signetd(&[
        "client",
        "add",
        "ci",
        "--profile",
        "release",
        "--valid",
        "1d",
    ]);
    assert!(add.status.success(), "{}", stderr(&add));
    let secret = String::from_utf8(add.stdout).unwrap().trim().to_owned();
    let sign = |ca: &Path, file: &Path| {
        Command::new(bin("signet"))
            .args(["--endpoint", &endpoint, "--client", "ci", "--tls-ca"])
            .arg(ca)
            .env_remove("SIGNET_CONFIG")
            .env("SIGNET_SECRET", &secret)
            .arg("sign")
            .arg(file)
            .output()
            .unwrap()
    };
    let file = w.pe("remote.exe");
    let out = sign(&dir.join("ca.pem"), &file);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&w, &file).0);

    // A self-signed CA certificate served as the server's own: said, with the fix.
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(w.path("ca-as-server-key.pem"))
        .arg("-out")
        .arg(w.path("ca-as-server.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    w.stop("signetd");
    let eps = w.start_daemon_config(&config(&format!(
        "[tls]\nlisten = [\"tcp:127.0.0.1:0\"]\ncert = \"{}\"\nkey = \"{}\"\n",
        w.path("ca-as-server.pem").display(),
        w.path("ca-as-server-key.pem").display()
    )));
    let endpoint_now = eps[1].to_string().replace("tcp:", "tls:");
    let out = Command::new(bin("signet"))
        .args(["--endpoint", &endpoint_now, "--client", "ci", "--tls-ca"])
        .arg(w.path("ca-as-server.pem"))
        .env_remove("SIGNET_CONFIG")
        .env("SIGNET_SECRET", &secret)
        .arg("sign")
        .arg(w.pe("other.exe"))
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(code(&out), 6, "{err}");
    assert!(
        err.contains("CA certificate (CA:TRUE)")
            && err.contains("signetd tls init")
            && !err.contains("is signetd running"),
        "{err}"
    );
}
