//! The CI kit as written: every snippet of docs/CI.md run by bash against a real
//! appliance (signetd, signet-agent, SoftHSM) with the `signet` under test on PATH,
//! and the files it signs verified with osslsigncode; `signet signtool` held to the
//! profile and its certificate; the CMake module's POST_BUILD step in a real CMake
//! build of a mingw-w64 program.
//!
//! A snippet is a fenced block right after `<!-- ci-kit: NAME -->`. Its commands:
//! a GitLab job's `before_script` and `script` lines, a GitHub Actions step's `run`
//! (YAML read with serde_yaml), a Jenkins `sh '...'` line (one line, single quotes),
//! a shell block whole.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use signet_test_support::*;

use super::{code, stderr, unix_appliance};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The marked blocks of docs/CI.md, by name.
fn snippets() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(repo().join("docs/CI.md")).unwrap();
    let mut out = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- ci-kit:")
            .and_then(|r| r.strip_suffix("-->"))
        else {
            continue;
        };
        let name = name.trim().to_owned();
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "the line after <!-- ci-kit: {name} --> opens a fenced block, not {fence:?}"
        );
        let mut body = String::new();
        for l in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        assert!(
            out.insert(name.clone(), body).is_none(),
            "one block per name: {name}"
        );
    }
    out
}

fn snippet(name: &str) -> String {
    snippets()
        .remove(name)
        .unwrap_or_else(|| panic!("docs/CI.md has no block marked <!-- ci-kit: {name} -->"))
}

/// A GitLab CI file's shell commands: every job's `before_script` and `script` lines.
fn gitlab_commands(yaml: &str) -> Vec<String> {
    let doc: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    let mut out = Vec::new();
    for (_, job) in doc.as_mapping().expect("a mapping of jobs") {
        for key in ["before_script", "script"] {
            if let Some(lines) = job.get(key) {
                for l in lines.as_sequence().expect("a list of commands") {
                    out.push(l.as_str().expect("a command").to_owned());
                }
            }
        }
    }
    out
}

/// A GitHub Actions workflow's shell commands: every job's steps' `run`.
fn github_commands(yaml: &str) -> Vec<String> {
    let doc: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    let mut out = Vec::new();
    for (_, job) in doc["jobs"].as_mapping().expect("jobs") {
        for step in job["steps"].as_sequence().expect("steps") {
            if let Some(run) = step.get("run") {
                out.push(run.as_str().expect("a script").to_owned());
            }
        }
    }
    out
}

/// A Jenkinsfile's shell steps: `sh '...'` lines.
fn jenkins_commands(groovy: &str) -> Vec<String> {
    groovy
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("sh '")
                .and_then(|r| r.strip_suffix('\''))
        })
        .map(str::to_owned)
        .collect()
}

/// Runs `script` with `bash -e` in `dir`, `signet` on PATH and pointed at `ep`.
fn run_script(dir: &Path, ep: &Endpoint, script: &str, env: &[(&str, &str)]) -> Output {
    let bin_dir = bin("signet").parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .arg("-e")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("PATH", path)
        .env("SIGNET_ENDPOINT", ep.to_string())
        .env_remove("SIGNET_CONFIG")
        // As a CI job's runner would: the profile cache in the job's own directory.
        .env("XDG_CACHE_HOME", dir.join(".cache"))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn run_all(dir: &Path, ep: &Endpoint, commands: &[String]) {
    assert!(!commands.is_empty(), "the snippet has commands");
    for c in commands {
        let out = run_script(dir, ep, c, &[]);
        assert_eq!(
            code(&out),
            0,
            "{c}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
    }
}

/// A build's output: `dist/` in a directory of its own, with copies of the fixture PE.
fn dist(w: &World, files: &[&str]) -> PathBuf {
    let dir = w.path("ci");
    std::fs::create_dir_all(dir.join("dist")).unwrap();
    for f in files {
        std::fs::copy(w.path("hello.exe"), dir.join("dist").join(f)).unwrap();
    }
    dir
}

fn assert_signed(w: &World, file: &Path) -> String {
    let (ok, text) = verify(w, file);
    assert!(ok, "{}: {text}", file.display());
    assert!(
        text.contains("Signet Demo Code Signing"),
        "{}: signed with the token's certificate: {text}",
        file.display()
    );
    text
}

#[test]
fn ci_kit_every_snippet_in_ci_md_is_marked_and_known() {
    let names: Vec<String> = snippets().into_keys().collect();
    assert_eq!(
        names,
        [
            "cmake-build",
            "cmake-lists",
            "cmake-toolchain",
            "github",
            "gitlab",
            "jenkins",
            "signtool"
        ],
        "each has a test here"
    );
    // No runnable block goes untested: every fenced block with a language is marked.
    let text = std::fs::read_to_string(repo().join("docs/CI.md")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut inside = false;
    for (i, l) in lines.iter().enumerate() {
        if !l.starts_with("```") {
            continue;
        }
        if !inside && l.len() > 3 {
            assert!(
                i > 0 && lines[i - 1].starts_with("<!-- ci-kit:"),
                "docs/CI.md line {}: a {} block without its <!-- ci-kit: NAME --> mark",
                i + 1,
                &l[3..]
            );
        }
        inside = !inside;
    }
}

#[test]
fn ci_kit_extracts_commands_as_documented() {
    assert_eq!(
        gitlab_commands(
            "stages: [a]\nj:\n  before_script: [\"echo 1\"]\n  script:\n    - echo 2\n    - echo 3\n"
        ),
        ["echo 1", "echo 2", "echo 3"]
    );
    assert_eq!(
        github_commands(
            "jobs:\n  a:\n    steps:\n      - uses: x@v1\n      - run: |\n          echo 1\n          echo 2\n"
        ),
        ["echo 1\necho 2\n"]
    );
    assert_eq!(
        jenkins_commands("steps {\n  sh 'echo 1'\n  unstash 'x'\n    sh 'echo 2'\n}\n"),
        ["echo 1", "echo 2"]
    );
}

#[test]
fn ci_kit_gitlab_job_signs_the_build_artifacts() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let dir = dist(&w, &["app.exe", "lib.dll"]);
    let commands = gitlab_commands(&snippet("gitlab"));
    assert!(commands.iter().any(|c| c.starts_with("signet sign")));
    run_all(&dir, &ep, &commands);
    for f in ["app.exe", "lib.dll"] {
        assert_signed(&w, &dir.join("dist").join(f));
    }
}

#[test]
fn ci_kit_github_step_signs_in_digest_mode() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let dir = dist(&w, &["app.exe", "lib.dll"]);
    let commands = github_commands(&snippet("github"));
    assert!(commands.iter().any(|c| c.contains("--digest")));
    run_all(&dir, &ep, &commands);
    for f in ["app.exe", "lib.dll"] {
        assert_signed(&w, &dir.join("dist").join(f));
    }
    let report = std::fs::read_to_string(dir.join("signed.json")).unwrap();
    let lines: Vec<serde_json::Value> = report
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{report}");
    assert!(lines.iter().all(|l| l["signed"] == true), "{report}");
}

#[test]
fn ci_kit_jenkins_stage_signs_a_program_and_a_package() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let dir = dist(&w, &["app.exe"]);
    let msi = w.msi("setup.msi");
    std::fs::rename(&msi, dir.join("dist/setup.msi")).unwrap();
    let commands = jenkins_commands(&snippet("jenkins"));
    assert_eq!(commands.len(), 2, "{commands:?}");
    run_all(&dir, &ep, &commands);
    for f in ["app.exe", "setup.msi"] {
        assert_signed(&w, &dir.join("dist").join(f));
    }
}

/// An appliance whose "release" profile timestamps with a loopback TSA.
fn timestamping_appliance(w: &mut World, tsa: &Tsa) -> Endpoint {
    let pin = w.path("pin");
    let agent = w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    w.start_daemon_with(
        &[&format!("unix:{}", w.path("signetd.sock").display())],
        &agent,
        &format!(
            "[profiles.release]\ntimestamp = [\"{}\"]\ndescription = \"Signet test\"\n",
            tsa.url
        ),
    )
    .remove(0)
}

#[test]
fn ci_kit_signtool_line_signs_and_timestamps_as_the_profile_says() {
    let mut w = World::new();
    let tsa = Tsa::start(&w.path("tsa"));
    let ep = timestamping_appliance(&mut w, &tsa);
    let dir = dist(&w, &["app.exe", "lib.dll"]);
    let script = snippet("signtool");
    assert!(script.starts_with("signet signtool sign "), "{script}");
    let out = run_script(&dir, &ep, &script, &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // The script's TSA is not the profile's: the profile's is asked, and that is said.
    assert!(
        stderr(&out).contains(&format!(
            "the timestamp comes from the profile 'release''s servers ({}), not http://timestamp.digicert.com",
            tsa.url
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(tsa.replies(), 2, "one timestamp per file");
    for f in ["app.exe", "lib.dll"] {
        let file = dir.join("dist").join(f);
        assert_signed(&w, &file);
        let (ok, text) = verify_with(&w, &file, &["-TSA-CAfile", tsa.cert.to_str().unwrap()]);
        assert!(
            ok && text.contains("Timestamp Server Signature verification: ok"),
            "{text}"
        );
        // /d and /du made it into the signature, over the profile's description.
        assert!(text.contains("Example App"), "{text}");
        assert!(text.contains("https://example.com/"), "{text}");
    }
}

/// The SHA-1 thumbprint of the fixture certificate, as openssl prints it.
fn thumbprint(w: &World) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha1", "-in"])
        .arg(w.path("cert.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    text.trim().rsplit('=').next().unwrap().to_owned()
}

#[test]
fn ci_kit_signtool_holds_options_and_certificate_to_the_profile() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let file = w.pe("app.exe");
    let before = std::fs::read(&file).unwrap();
    let f = file.to_str().unwrap();

    // What the profile does not do is refused before anything is sent, saying what it does.
    let out = signet(&ep, &["signtool", "sign", "/fd", "sha1", f]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "the profile 'release' signs with sha256; /fd sha1 is not allowed — drop /fd or ask the operator for a profile that allows it"
        ),
        "{}",
        stderr(&out)
    );
    let out = signet(&ep, &["signtool", "sign", "/tr", "http://ts.example", f]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the profile 'release' does not timestamp"),
        "{}",
        stderr(&out)
    );
    let out = signet(&ep, &["signtool", "sign", "/f", "code.pfx", "/p", "x", f]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the key lives on the Signet appliance's token"),
        "{}",
        stderr(&out)
    );
    let out = signet(&ep, &["signtool", "sign", "/n", "Contoso", f]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "the profile 'release' signs with the certificate of CN=Signet Demo Code Signing"
        ) && stderr(&out).contains("/n \"Contoso\" does not match it"),
        "{}",
        stderr(&out)
    );
    let wrong = "00".repeat(20);
    let out = signet(&ep, &["signtool", "sign", "/sha1", &wrong, f]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not match it"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&file).unwrap(), before, "nothing was signed");

    // The right certificate, by subject and by thumbprint (the agent reports it), in
    // signtool's other spelling and case: signed.
    let thumb = thumbprint(&w);
    let out = signet(
        &ep,
        &[
            "signtool",
            "sign",
            "-FD",
            "SHA256",
            "-N",
            "signet demo",
            "/SHA1",
            &thumb,
            "/v",
            f,
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("with the profile 'release' (sha256)"),
        "{}",
        stderr(&out)
    );
    let text = assert_signed(&w, &file);
    assert!(
        text.contains("Signet test"),
        "the profile's description: {text}"
    );

    // --help teaches, without an appliance.
    let out = signet(&ep, &["signtool", "/?"]);
    assert_eq!(code(&out), 0);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("/fd ALG") && help.contains("/sha1 HASH"),
        "{help}"
    );
}

#[test]
fn ci_kit_cmake_post_build_signs_a_mingw_program() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let dir = w.path("project");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("mingw-w64.cmake"), snippet("cmake-toolchain")).unwrap();
    std::fs::write(dir.join("CMakeLists.txt"), snippet("cmake-lists")).unwrap();
    std::fs::write(
        dir.join("hello.c"),
        "#include <stdio.h>\nint main(void) { puts(\"Hello from Signet\"); return 0; }\n",
    )
    .unwrap();
    // The module from this tree, as the package's /usr/share/cmake/Signet would be found.
    let prefix = repo().join("packaging");
    let prefix = prefix.to_str().unwrap();
    let build = snippet("cmake-build");
    let out = run_script(&dir, &ep, &build, &[("CMAKE_PREFIX_PATH", prefix)]);
    assert_eq!(
        code(&out),
        0,
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Signing hello with Signet"), "{stdout}");
    let exe = dir.join("build/hello.exe");
    let text = assert_signed(&w, &exe);
    assert!(text.contains("Hello from Signet"), "DESCRIPTION: {text}");
    assert!(text.contains("https://example.com/"), "URL: {text}");

    // A file that is not signed fails the build: the appliance gone, a relink fails.
    std::fs::write(dir.join("hello.c"), "int main(void) { return 1; }\n").unwrap();
    let gone = Endpoint::Unix(w.path("gone.sock"));
    let out = run_script(
        &dir,
        &gone,
        "cmake --build build",
        &[("CMAKE_PREFIX_PATH", prefix)],
    );
    assert_ne!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(said.contains("cannot reach the Signet daemon"), "{said}");

    // SIGNET_SIGN=OFF: a developer's build without the appliance, unsigned.
    let out = run_script(
        &dir,
        &gone,
        "cmake -S . -B plain -DCMAKE_TOOLCHAIN_FILE=mingw-w64.cmake -DSIGNET_SIGN=OFF && cmake --build plain",
        &[("CMAKE_PREFIX_PATH", prefix)],
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(code(&out), 0, "{said}{}", stderr(&out));
    assert!(
        said.contains("Signet: not signing hello (SIGNET_SIGN is OFF)"),
        "{said}"
    );
    let (signed, _) = verify(&w, &dir.join("plain/hello.exe"));
    assert!(!signed, "built unsigned");
}
