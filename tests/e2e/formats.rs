//! Formats and profile options through the whole path: every supported format signed
//! by `signet` → `signetd` → `signet-agent` and verified with `osslsigncode verify`;
//! page hashes, nested signatures, profiles limited to some formats, and RFC 3161
//! timestamps from a real TSA on loopback, with failover.

use std::path::Path;

use signet_test_support::*;

use crate::{code, post_sign, stderr, unix_appliance};

/// Agent and daemon on unix sockets, the daemon with `profiles`.
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

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn utf16le_with_bom(text: &str) -> Vec<u8> {
    let mut v = vec![0xff, 0xfe];
    for u in text.encode_utf16() {
        v.extend(u.to_le_bytes());
    }
    v
}

fn signatures(verify_output: &str) -> usize {
    verify_output
        .lines()
        .filter(|l| l.starts_with("Signature Index: "))
        .count()
}

#[test]
fn every_supported_format_is_signed_through_the_appliance_and_verifies() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let script = "Write-Host \"Hello from Signet\"\r\n";
    let files = [
        w.pe("app.exe"),
        w.msi("setup.msi"),
        w.cab("payload.cab"),
        w.cat("drivers.cat"),
        w.file("hello.ps1", script.as_bytes()),
        w.file(
            "Module.PSM1",
            &[b"\xef\xbb\xbf".as_slice(), script.as_bytes()].concat(),
        ),
        w.file(
            "manifest.psd1",
            &utf16le_with_bom("@{ ModuleVersion = '1.0' }\r\n"),
        ),
        w.file(
            "types.ps1xml",
            b"<?xml version=\"1.0\" encoding=\"utf-8\"?>\r\n<Types></Types>\r\n",
        ),
    ];
    for f in &files {
        assert!(!verify(&w, f).0, "{} starts unsigned", f.display());
    }
    let mut args = vec!["sign", "--json"];
    args.extend(files.iter().map(|f| arg(f)));
    let out = signet(&ep, &args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let reports: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), files.len());
    for (f, r) in files.iter().zip(&reports) {
        assert_eq!(r["signed"], true, "{r}");
        let (ok, text) = verify(&w, f);
        assert!(ok, "{}: {text}", f.display());
        assert!(
            text.contains("Signet Demo Code Signing"),
            "{}: {text}",
            f.display()
        );
    }
    // The scripts carry their signature block in the comment style of their kind.
    let ps1 = std::fs::read_to_string(&files[4]).unwrap();
    assert!(
        ps1.starts_with(script) && ps1.contains("# SIG # Begin signature block"),
        "{ps1}"
    );
    let xml = std::fs::read_to_string(&files[7]).unwrap();
    assert!(
        xml.contains("<!-- SIG # Begin signature block -->"),
        "{xml}"
    );
    let psd1 = std::fs::read(&files[6]).unwrap();
    let units: Vec<u16> = psd1[2..]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let psd1 = String::from_utf16(&units).unwrap();
    assert!(
        psd1.starts_with("@{ ModuleVersion") && psd1.contains("# SIG # Begin signature block"),
        "the UTF-16 script stays UTF-16: {psd1}"
    );
    let log = w.log("signet-agent");
    for format in [
        "MSI (Windows Installer",
        "CAB (cabinet",
        "CAT (security",
        "PowerShell script",
    ] {
        assert!(log.contains(format), "the agent logs {format}: {log}");
    }
}

#[test]
fn what_is_not_signed_is_refused_and_named_by_client_and_appliance() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let script = b"Write-Host hi\r\n";
    let notes = w.file("notes.txt", script);
    let mut doc = std::fs::read(w.msi("x.msi")).unwrap();
    // The same compound file with a Word document's root storage class.
    let shift = u16::from_le_bytes([doc[0x1e], doc[0x1f]]);
    let dir = u32::from_le_bytes([doc[0x30], doc[0x31], doc[0x32], doc[0x33]]);
    let root = ((dir as usize) + 1) << shift;
    doc[root + 0x50..root + 0x54].copy_from_slice(&[0x06, 0x09, 0x02, 0x00]);
    let doc = w.file("letter.doc", &doc);
    let zip = w.path("app.msix");
    zip_of(&zip, &[("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")]);
    for (file, want) in [
        (
            &notes,
            ".ps1, .psm1, .psd1, .ps1xml, .psc1, .cdxml (this one is named \"notes.txt\")",
        ),
        (&doc, "not a Windows Installer package"),
        (&zip, "a ZIP archive"),
    ] {
        let out = signet(&ep, &["sign", arg(file)]);
        assert_eq!(code(&out), 4, "{}", stderr(&out));
        assert!(stderr(&out).contains(want), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("Signet signs"),
            "names what is supported: {}",
            stderr(&out)
        );
    }
    assert!(
        !w.log("signetd").contains("job accepted"),
        "refused before upload"
    );

    // The appliance applies the same rules to what reaches it, the name included.
    let (status, body) = post_sign(&ep, "filename=notes.txt", script.to_vec());
    assert_eq!(
        (status, body["code"].as_str()),
        (415, Some("unsupported_format")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains(".ps1"), "{body}");
    let (status, body) = post_sign(&ep, "", script.to_vec());
    assert_eq!(status, 415, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no file name came with it"),
        "{body}"
    );
    let doc_bytes = std::fs::read(&doc).unwrap();
    let (status, body) = post_sign(&ep, "filename=setup.msi", doc_bytes);
    assert_eq!(status, 415, "the name does not make it an MSI: {body}");
}

#[test]
fn a_profile_signs_only_the_formats_it_lists() {
    let mut w = World::new();
    let ep = appliance_with(
        &mut w,
        "default_profile = \"drivers\"\n[profiles.drivers]\nformats = [\"pe\", \"cat\"]\n[profiles.any]\n",
        "",
    );
    let msi = w.msi("setup.msi");
    let exe = w.pe("driver.sys");
    let out = signet(&ep, &["sign", "--json", arg(&msi), arg(&exe)]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["code"], "unsupported_format");
    let msg = lines[0]["message"].as_str().unwrap();
    assert!(
        msg.contains("MSI (Windows Installer package or patch)")
            && msg.contains("\"drivers\"")
            && msg.contains("PE (EXE/DLL/SYS), CAT (security catalog)"),
        "{msg}"
    );
    assert_eq!(
        lines[1]["signed"], true,
        "the next file still goes: {}",
        lines[1]
    );
    assert!(!verify(&w, &msi).0 && verify(&w, &exe).0);
    let out = signet(&ep, &["sign", "--profile", "any", arg(&msi)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&w, &msi).0);
}

#[test]
fn page_hashes_are_in_pe_signatures_when_the_profile_asks() {
    let mut w = World::new();
    let ep = appliance_with(
        &mut w,
        "default_profile = \"plain\"\n[profiles.plain]\n[profiles.paged]\npage_hashes = true\n",
        "",
    );
    let plain = w.pe("plain.exe");
    let paged = w.pe("paged.exe");
    let msi = w.msi("setup.msi");
    assert_eq!(code(&signet(&ep, &["sign", arg(&plain)])), 0);
    let out = signet(&ep, &["sign", "-p", "paged", arg(&paged), arg(&msi)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (ok, text) = verify(&w, &paged);
    assert!(ok, "{text}");
    assert!(
        text.contains("Page hash algorithm  : SHA256") && text.contains("Calculated page hash"),
        "{text}"
    );
    let (ok, text) = verify(&w, &plain);
    assert!(ok && !text.contains("Page hash"), "{text}");
    // Other formats have no pages; they are signed all the same.
    let (ok, text) = verify(&w, &msi);
    assert!(ok && !text.contains("Page hash"), "{text}");
}

#[test]
fn a_nested_profile_keeps_the_signature_already_there() {
    let mut w = World::new();
    let ep = appliance_with(
        &mut w,
        "default_profile = \"first\"\n[profiles.first]\nhash = \"sha256\"\n\
         [profiles.second]\nhash = \"sha512\"\nnested = true\n",
        "",
    );
    let exe = w.pe("app.exe");
    let ps1 = w.file("run.ps1", b"Write-Host hi\r\n");
    let out = signet(&ep, &["sign", arg(&exe), arg(&ps1)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = signet(&ep, &["sign", "-p", "second", arg(&exe), arg(&ps1)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for f in [&exe, &ps1] {
        let (ok, text) = verify(&w, f);
        assert!(ok, "{text}");
        assert_eq!(signatures(&text), 2, "{}: {text}", f.display());
        assert!(text.contains("Number of verified signatures: 2"), "{text}");
        assert!(
            text.contains("SHA256") && text.contains("SHA512"),
            "both digests: {text}"
        );
    }

    // Without nesting an existing signature is replaced.
    let out = signet(&ep, &["sign", arg(&exe)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (ok, text) = verify(&w, &exe);
    assert!(ok && signatures(&text) == 1, "{text}");

    // A file with no signature yet gets a plain one from the nested profile.
    let fresh = w.pe("fresh.exe");
    let out = signet(&ep, &["sign", "-p", "second", arg(&fresh)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (ok, text) = verify(&w, &fresh);
    assert!(
        ok && signatures(&text) == 1 && text.contains("SHA512"),
        "{text}"
    );
}

#[test]
fn timestamps_come_from_the_first_server_that_answers() {
    let mut w = World::new();
    let tsa = Tsa::start(&w.path("tsa"));
    let dead = refused_url();
    let ep = appliance_with(
        &mut w,
        &format!(
            "[profiles.release]\ntimestamp = [\"{dead}\", \"{}\"]\n",
            tsa.url
        ),
        "",
    );
    let exe = w.pe("app.exe");
    let msi = w.msi("setup.msi");
    let out = signet(&ep, &["sign", arg(&exe), arg(&msi)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        tsa.replies(),
        2,
        "one timestamp per file, after the dead server"
    );
    let tsa_ca = tsa.cert.to_str().unwrap();
    for f in [&exe, &msi] {
        let (ok, text) = verify_with(&w, f, &["-TSA-CAfile", tsa_ca]);
        assert!(ok, "{text}");
        assert!(
            text.contains("Timestamp Server Signature verification: ok")
                && text.contains("Timestamp time:"),
            "{}: {text}",
            f.display()
        );
    }
    // Without the TSA's certificate as trust anchor its signature does not verify: the
    // timestamp really is that TSA's.
    let (_, text) = verify(&w, &exe);
    assert!(
        text.contains("Timestamp Server Signature verification: failed"),
        "{text}"
    );
}

#[test]
fn when_no_timestamp_server_answers_nothing_is_signed_and_the_message_names_them() {
    let mut w = World::new();
    let (dead1, dead2) = (refused_url(), refused_url());
    let ep = appliance_with(
        &mut w,
        &format!(
            "default_profile = \"stamped\"\n[profiles.stamped]\ntimestamp = [\"{dead1}\", \"{dead2}\"]\n[profiles.plain]\n"
        ),
        "",
    );
    let exe = w.pe("app.exe");
    let before = std::fs::read(&exe).unwrap();
    let out = signet(&ep, &["sign", "--json", arg(&exe)]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["code"], "signing_failed", "{report}");
    let msg = report["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("tried in this order: {dead1}, {dead2}"))
            && msg.contains("nothing was signed"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(&exe).unwrap(),
        before,
        "the file is untouched"
    );
    // The token is fine and the agent free: a profile without timestamps signs.
    let out = signet(&ep, &["sign", "-p", "plain", arg(&exe)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&w, &exe).0);
}

#[test]
fn a_timestamp_server_that_never_answers_cannot_hold_the_agent() {
    // osslsigncode is stopped at signer.timeout_seconds; the native engine gives each
    // server a share of it and then says none gave a timestamp.
    for (backend, said) in [
        ("native", "no timestamp server gave a timestamp"),
        ("osslsigncode", "did not finish within 3 s"),
    ] {
        let mut w = World::new();
        let silent = SilentServer::start();
        let ep = appliance_with(
            &mut w,
            &format!(
                "default_profile = \"stamped\"\n[profiles.stamped]\ntimestamp = [\"{}\"]\n[profiles.plain]\n",
                silent.url
            ),
            &format!("[signer]\nbackend = \"{backend}\"\ntimeout_seconds = 3\n"),
        );
        let exe = w.pe("app.exe");
        let out = signet(&ep, &["sign", arg(&exe)]);
        assert_eq!(code(&out), 5, "{backend}: {}", stderr(&out));
        assert!(stderr(&out).contains(said), "{backend}: {}", stderr(&out));
        assert!(!verify(&w, &exe).0, "{backend}");
        let out = signet(&ep, &["sign", "-p", "plain", arg(&exe)]);
        assert_eq!(
            code(&out),
            0,
            "{backend}: the job lock was released: {}",
            stderr(&out)
        );
    }
}

/// The fixture PE's section table: (name, end of its raw data).
fn pe_sections(pe: &[u8]) -> Vec<(String, usize)> {
    let le16 = |at: usize| u16::from_le_bytes([pe[at], pe[at + 1]]) as usize;
    let le32 = |at: usize| u32::from_le_bytes(pe[at..at + 4].try_into().unwrap()) as usize;
    let at = le32(0x3c);
    let table = at + 24 + le16(at + 20);
    (0..le16(at + 6))
        .map(|i| {
            let e = table + 40 * i;
            let name = String::from_utf8_lossy(&pe[e..e + 8])
                .trim_end_matches('\0')
                .to_owned();
            (name, le32(e + 20) + le32(e + 16))
        })
        .filter(|(_, end)| *end > 0)
        .collect()
}

#[test]
fn damaged_files_are_refused_as_bad_input_naming_what_is_wrong() {
    let mut w = World::new();
    let ep = unix_appliance(&mut w);
    let whole = std::fs::read(w.pe("whole.exe")).unwrap();
    let sections = pe_sections(&whole);
    // The first section whose data a cut at 7000 bytes leaves incomplete.
    let (name, end) = sections
        .iter()
        .find(|(_, end)| *end > 7000)
        .unwrap()
        .clone();
    let cut_7000 = w.file("cut7000.exe", &whole[..7000]);
    let half = whole.len() / 2;
    let cut_half = w.file("half.exe", &whole[..half]);
    let headers = w.file("headers.exe", &whole[..300]);
    let msi = std::fs::read(w.msi("setup.msi")).unwrap();
    let cut_msi = w.file("cut.msi", &msi[..msi.len() - 512]);
    let half_msi = w.file("half.msi", &msi[..msi.len() / 2]);
    let cab = std::fs::read(w.cab("payload.cab")).unwrap();
    let cut_cab = w.file("cut.cab", &cab[..cab.len() - 100]);
    let cat = std::fs::read(w.cat("drivers.cat")).unwrap();
    let cut_cat = w.file("cut.cat", &cat[..cat.len() - 10]);

    let expect = [
        (
            &cut_7000,
            format!(
                "section {name}'s data ends at byte {end}, past the end of the file (7000 bytes)"
            ),
        ),
        (
            &cut_half,
            format!("past the end of the file ({half} bytes)"),
        ),
        (
            &headers,
            "the optional header (240 bytes) ends at byte".to_owned(),
        ),
        (
            &cut_msi,
            format!("past the end of the file ({} bytes)", msi.len() - 512),
        ),
        (
            &half_msi,
            format!("past the end of the file ({} bytes)", msi.len() / 2),
        ),
        (
            &cut_cab,
            format!(
                "the cabinet is {} bytes (cbCabinet), and the file has only {}",
                cab.len(),
                cab.len() - 100
            ),
        ),
        (
            &cut_cat,
            format!(
                "declares {} bytes, and the file has only {}",
                cat.len(),
                cat.len() - 10
            ),
        ),
    ];
    for (file, want) in &expect {
        let before = std::fs::read(file).unwrap();
        for digest in [false, true] {
            let mut args = vec!["sign", "--json"];
            if digest {
                args.push("--digest");
            }
            args.push(arg(file));
            let out = signet(&ep, &args);
            assert_eq!(code(&out), 4, "{}: {}", file.display(), stderr(&out));
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let msg = report["message"].as_str().unwrap();
            assert!(
                msg.contains("damaged or cut short") && msg.contains(want.as_str()),
                "{}: {msg}",
                file.display()
            );
            assert_eq!(&std::fs::read(file).unwrap(), &before, "untouched");
        }
    }
    assert!(
        !w.log("signetd").contains("job accepted"),
        "refused before any upload"
    );

    // A client that does not check: the agent refuses it as bad input, naming it.
    let (status, body) = post_sign(&ep, "filename=cut7000.exe", whole[..7000].to_vec());
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("bad_input")),
        "{body}"
    );
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("section {name}'s data ends at byte {end}")),
        "{msg}"
    );
    let agent_log = w.log("signet-agent");
    assert!(
        !agent_log
            .lines()
            .any(|l| l.contains("cut7000.exe") && l.contains(" signed ")),
        "nothing signed: {agent_log}"
    );

    // In a batch the damaged file fails as bad input and the others are signed.
    let a = w.pe("a.exe");
    let b = w.msi("b.msi");
    let out = signet(&ep, &["sign", "--json", arg(&a), arg(&cut_7000), arg(&b)]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[1]["signed"], false, "{}", lines[1]);
    assert_eq!(lines[1]["exit_code"], 4, "{}", lines[1]);
    assert!(
        lines[0]["signed"] == true && lines[2]["signed"] == true,
        "{lines:?}"
    );
    assert!(verify(&w, &a).0 && verify(&w, &b).0);

    // Told from the file alone: the same answer with the appliance away.
    w.stop("signetd");
    for digest in [false, true] {
        let mut args = vec!["sign"];
        if digest {
            args.push("--digest");
        }
        args.push(arg(&cut_7000));
        let out = signet(&ep, &args);
        assert_eq!(code(&out), 4, "{}", stderr(&out));
        assert!(
            stderr(&out).contains("damaged or cut short"),
            "{}",
            stderr(&out)
        );
    }
}

/// Digest mode keeps the profile's answer between runs, privately, and a stale one
/// never makes a signature thrown away: the upload names the answer its data was made
/// with, signetd refuses it at intake when the profile changed since (a reload), and the
/// client asks again, makes the data as the profile says now and has it signed once.
#[test]
fn digest_mode_keeps_the_profile_between_runs_and_a_changed_one_is_signed_once() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut w = World::new();
    let ep = appliance_with(&mut w, "[profiles.release]\nhash = \"sha256\"\n", "");
    let (ca, cache) = (w.path("cert.pem"), w.path("cache"));
    let digest = |file: &Path| {
        let out = std::process::Command::new(bin("signet"))
            .env("SIGNET_ENDPOINT", ep.to_string())
            .env("XDG_CACHE_HOME", &cache)
            .env_remove("SIGNET_CONFIG")
            .env_remove("SIGNET_PROFILE_CACHE")
            .args(["sign", "--digest", "--ca-file", arg(&ca), arg(file)])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let (ok, text) = verify(&w, file);
        assert!(ok, "{text}");
        text
    };
    let kept = || {
        let dir = cache.join("signet").join("profiles");
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&dir), mode(&cache.join("signet"))), (0o700, 0o700));
        assert_eq!(mode(&files[0]), 0o600);
        let text = std::fs::read_to_string(&files[0]).unwrap();
        (std::fs::metadata(&files[0]).unwrap().ino(), text)
    };
    // What the audit log says: signatures made, and refusals for a changed profile.
    let audited = |w: &World| {
        let out = w.signetd(&["audit", "export"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let records: Vec<serde_json::Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let signed = records.iter().filter(|r| r["result"] == "signed").count();
        let changed: u64 = records
            .iter()
            .filter(|r| r["error"] == "profile_changed")
            .map(|r| r["count"].as_u64().unwrap_or(1))
            .sum();
        (signed, changed)
    };

    // The first run asks and keeps the answer; the second signs with it.
    let a = w.pe("a.exe");
    assert!(signatures(&digest(&a)) == 1);
    let (first, text) = kept();
    assert!(text.contains("sha256"), "{text}");
    let b = w.pe("b.exe");
    digest(&b);
    assert_eq!(
        kept().0,
        first,
        "the kept answer was used, not asked for again"
    );
    // c.exe is signed once in whole mode: the digest run below is a new request (a
    // file whose data was sent in digest mode before is that job again, by its key).
    let c = w.pe("c.exe");
    let out = signet(&ep, &["sign", arg(&c)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(audited(&w), (3, 0));

    // A reload: the profile now nests and signs with SHA-512. The next run's data,
    // made with the kept answer (SHA-256), is refused at intake; the client asks again
    // and the token signs once, with SHA-512, attached beside c.exe's signature.
    let cfg = w.path("signetd.toml");
    let toml = std::fs::read_to_string(&cfg).unwrap();
    assert!(toml.contains("hash = \"sha256\""), "{toml}");
    std::fs::write(
        &cfg,
        toml.replace("hash = \"sha256\"", "hash = \"sha512\"\nnested = true"),
    )
    .unwrap();
    w.hangup("signetd");
    wait_until("the reload is logged", || {
        w.log("signetd").contains("configuration reloaded")
    });
    let text = digest(&c);
    assert!(
        signatures(&text) == 2 && text.contains("SHA512") && text.contains("SHA256"),
        "{text}"
    );
    assert_eq!(
        audited(&w),
        (4, 1),
        "one refusal at intake, then exactly one signature"
    );
    assert!(w.log("signetd").contains("profile_changed"));
    // Asked again and kept anew (forgotten first, so the inode may be the old one's).
    let (_, kept_text) = kept();
    assert!(
        kept_text.contains("sha512") && kept_text.contains("\"nested\":true"),
        "{kept_text}"
    );
}

#[test]
fn digest_mode_signs_as_the_profile_says_like_the_whole_file() {
    let mut w = World::new();
    let ep = appliance_with(
        &mut w,
        "default_profile = \"first\"\n[profiles.first]\nhash = \"sha256\"\n\
         [profiles.second]\nhash = \"sha512\"\nnested = true\n\
         [profiles.paged]\nhash = \"sha384\"\npage_hashes = true\n",
        "",
    );
    let ca = w.path("cert.pem");
    let digest = |profile: &str, file: &Path| {
        signet(
            &ep,
            &[
                "sign",
                "--digest",
                "--ca-file",
                arg(&ca),
                "-p",
                profile,
                arg(file),
            ],
        )
    };

    // A signed PE and script, signed again in digest mode by a nested SHA-512 profile:
    // the old signature stays and the new one is SHA-512, as in whole mode.
    let exe = w.pe("app.exe");
    let ps1 = w.file("run.ps1", b"Write-Host hi\r\n");
    let out = signet(&ep, &["sign", arg(&exe), arg(&ps1)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for f in [&exe, &ps1] {
        let out = digest("second", f);
        assert_eq!(code(&out), 0, "{}: {}", f.display(), stderr(&out));
        let (ok, text) = verify(&w, f);
        assert!(ok, "{text}");
        assert_eq!(signatures(&text), 2, "{}: {text}", f.display());
        assert!(
            text.contains("Message digest algorithm  : SHA256")
                && text.contains("Message digest algorithm  : SHA512"),
            "both digests: {text}"
        );
    }
    let script = std::fs::read_to_string(&ps1).unwrap();
    assert!(
        script.starts_with("Write-Host hi\r\n") && script.contains("# SIG # Begin signature block"),
        "{script}"
    );

    // A file without a signature gets a plain SHA-512 one from the nested profile.
    let fresh = w.pe("fresh.exe");
    let out = digest("second", &fresh);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (ok, text) = verify(&w, &fresh);
    assert!(
        ok && signatures(&text) == 1 && text.contains("Message digest algorithm  : SHA512"),
        "{text}"
    );

    // Page hashes, with the profile's hash, in both modes alike.
    let paged = w.pe("paged.exe");
    let whole = w.pe("whole.exe");
    let out = digest("paged", &paged);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = signet(&ep, &["sign", "-p", "paged", arg(&whole)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for f in [&paged, &whole] {
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

    // A digest-mode script without --ca-file is signed too (its name keeps its kind).
    let plain = w.file("plain.ps1", b"Write-Host plain\r\n");
    let out = signet(&ep, &["sign", "--digest", arg(&plain)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(verify(&w, &plain).0);

    // Data made otherwise than the profile signs is refused by the agent, with the fix.
    let blob = w.path("data.p7");
    let made = std::process::Command::new("osslsigncode")
        .args(["extract-data", "-h", "sha256", "-in"])
        .arg(w.pe("raw.exe"))
        .arg("-out")
        .arg(&blob)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let (status, body) = post_sign(
        &ep,
        "mode=digest&profile=second",
        std::fs::read(&blob).unwrap(),
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("-h sha512"),
        "{body}"
    );
    let (status, body) = post_sign(
        &ep,
        "mode=digest&profile=paged",
        std::fs::read(&blob).unwrap(),
    );
    assert_eq!(status, 400, "{body}");
    let (status, _) = post_sign(&ep, "mode=digest", std::fs::read(&blob).unwrap());
    assert_eq!(status, 200, "data made as the profile signs is signed");

    // Catalogs have no Authenticode data to extract: said, with the fix.
    let cat = w.cat("drivers.cat");
    let out = digest("first", &cat);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("without --digest"),
        "{}",
        stderr(&out)
    );

    // What the client asks: the profile's options, the default when none is named.
    let (status, body) = call(&ep, "GET", "/v1/profile?profile=second", vec![]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"name": "second", "hash": "sha512", "page_hashes": false, "nested": true, "timestamp": []})
    );
    let (_, body) = call(&ep, "GET", "/v1/profile", vec![]);
    assert_eq!(
        (body["name"].as_str(), body["hash"].as_str()),
        (Some("first"), Some("sha256")),
        "{body}"
    );
    let (status, body) = call(&ep, "GET", "/v1/profile?profil=second", vec![]);
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );

    // The profile is checked before anything is extracted.
    let out = digest("nightly", &fresh);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("\"nightly\""), "{}", stderr(&out));
}

#[test]
fn appx_packages_and_bundles_are_signed_whole_and_in_digest_mode() {
    let mut w = World::new();
    let ep = appliance_with(
        &mut w,
        "default_profile = \"first\"\n[profiles.first]\nhash = \"sha256\"\n\
         [profiles.nested]\nhash = \"sha256\"\nnested = true\n\
         [profiles.pe_only]\nformats = [\"pe\"]\n",
        "",
    );
    let package = w.appx("app.msix", false);
    let bundle = w.appx("app.appxbundle", true);
    for f in [&package, &bundle] {
        assert!(!verify(&w, f).0, "{} starts unsigned", f.display());
    }
    let out = signet(&ep, &["sign", "--json", arg(&package), arg(&bundle)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for f in [&package, &bundle] {
        let (ok, text) = verify(&w, f);
        assert!(ok, "{}: {text}", f.display());
        assert!(text.contains("Signet Demo Code Signing"), "{text}");
        assert_eq!(signatures(&text), 1, "{text}");
        let names: Vec<String> = zip_names(f);
        assert_eq!(
            names.last().map(String::as_str),
            Some("AppxSignature.p7x"),
            "{names:?}"
        );
    }
    let log = w.log("signet-agent");
    assert!(
        log.contains("APPX/MSIX"),
        "the agent logs the format: {log}"
    );

    // A package holds one signature: a nested profile signs it again in its place.
    let out = signet(&ep, &["sign", "-p", "nested", arg(&package)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (ok, text) = verify(&w, &package);
    assert!(ok && signatures(&text) == 1, "{text}");

    // Digest mode: osslsigncode extracts the package's data and attaches the signature.
    let fresh = w.appx("fresh.appx", false);
    let fresh_bundle = w.appx("fresh.msixbundle", true);
    for f in [&fresh, &fresh_bundle] {
        let ca = w.path("cert.pem");
        let out = signet(&ep, &["sign", "--digest", "--ca-file", arg(&ca), arg(f)]);
        assert_eq!(code(&out), 0, "{}: {}", f.display(), stderr(&out));
        let (ok, text) = verify(&w, f);
        assert!(ok, "{}: {text}", f.display());
    }

    // A profile without APPX in its formats refuses it.
    let other = w.appx("other.appx", false);
    let out = signet(&ep, &["sign", "-p", "pe_only", arg(&other)]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("APPX/MSIX"), "{}", stderr(&out));

    // A ZIP that is not a package, and a package cut short, are refused by the client
    // and the appliance alike, nothing signed.
    let jar = w.path("lib.zip");
    zip_of(&jar, &[("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")]);
    let bytes = std::fs::read(&other).unwrap();
    let cut = w.file("cut.appx", &bytes[..bytes.len() - 40]);
    for (f, want, http) in [
        (&jar, "not an APPX/MSIX package", 415),
        (&cut, "no end of central directory record", 422),
    ] {
        let before = std::fs::read(f).unwrap();
        let out = signet(&ep, &["sign", arg(f)]);
        assert_eq!(code(&out), 4, "{}", stderr(&out));
        assert!(stderr(&out).contains(want), "{}", stderr(&out));
        assert_eq!(std::fs::read(f).unwrap(), before, "untouched");
        let (status, body) = post_sign(&ep, "profile=first", before);
        assert_eq!(status, http, "{body}");
        assert!(body["message"].as_str().unwrap().contains(want), "{body}");
    }
}

/// The names in a ZIP archive's central directory, in order (`python3 -m zipfile -l`).
fn zip_names(f: &Path) -> Vec<String> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys,zipfile\nfor n in zipfile.ZipFile(sys.argv[1]).namelist(): print(n)",
        ])
        .arg(f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A ZIP archive of `entries` (name, text), made with python3's zipfile.
fn zip_of(f: &Path, entries: &[(&str, &str)]) {
    let mut script = String::from("import sys,zipfile\nz=zipfile.ZipFile(sys.argv[1],'w')\n");
    for (name, text) in entries {
        script.push_str(&format!("z.writestr({name:?},{text:?})\n"));
    }
    script.push_str("z.close()\n");
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .arg(f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn digest_mode_signs_pe_files_without_osslsigncode() {
    let mut w = World::new();
    let ep = appliance_with(
        &mut w,
        "default_profile = \"first\"\n[profiles.first]\nhash = \"sha256\"\n\
         [profiles.second]\nhash = \"sha384\"\nnested = true\npage_hashes = true\n",
        "",
    );
    let ca = w.path("cert.pem");
    // No osslsigncode for the client: PE files are extracted and attached natively.
    let none = w.path("no-osslsigncode");
    let digest = |profile: &str, file: &Path| {
        signet(
            &ep,
            &[
                "sign",
                "--digest",
                "--osslsigncode",
                arg(&none),
                "--ca-file",
                arg(&ca),
                "-p",
                profile,
                arg(file),
            ],
        )
    };
    let exe = w.pe("app.exe");
    let out = digest("first", &exe);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (ok, text) = verify(&w, &exe);
    assert!(ok && signatures(&text) == 1, "{text}");
    // Nested beside it, with page hashes.
    let out = digest("second", &exe);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (ok, text) = verify(&w, &exe);
    assert!(
        ok && signatures(&text) == 2
            && text.contains("Message digest algorithm  : SHA384")
            && text.contains("Calculated page hash"),
        "{text}"
    );
    // Without --ca-file: signed, with the warning that the chain was not verified here.
    let fresh = w.pe("fresh.exe");
    let out = signet(
        &ep,
        &[
            "sign",
            "--json",
            "--digest",
            "--osslsigncode",
            arg(&none),
            arg(&fresh),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["warning"]
            .as_str()
            .is_some_and(|w| w.contains("not verified here") && w.contains("--ca-file")),
        "{report}"
    );
    assert!(verify(&w, &fresh).0);
    // The system's roots are OpenSSL's: SSL_CERT_FILE naming a bundle (text around the
    // certificates) that holds the CA, and the chain is verified without --ca-file.
    let bundle = w.path("bundle.pem");
    let mut text = b"# the system's roots\n".to_vec();
    text.extend(std::fs::read(&ca).unwrap());
    text.extend(b"\nnot a certificate\n");
    std::fs::write(&bundle, text).unwrap();
    let trusted = w.pe("trusted.exe");
    let out = std::process::Command::new(bin("signet"))
        .env("SIGNET_ENDPOINT", ep.to_string())
        .env_remove("SIGNET_CONFIG")
        .env("SSL_CERT_FILE", &bundle)
        .args(["sign", "--json", "--digest", "--osslsigncode", arg(&none)])
        .arg(&trusted)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["signed"] == true && report.get("warning").is_none(),
        "{report}"
    );

    // Other formats still need osslsigncode, and say so.
    let msi = w.msi("setup.msi");
    let out = digest("first", &msi);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("needs osslsigncode 2.8 or later"),
        "{}",
        stderr(&out)
    );
}

/// The client's memory in digest mode does not grow with the file: a PE twice the
/// 64 MiB bound is extracted, attached and checked (each a pass over the file) in
/// under 64 MiB of peak RSS, measured by `/usr/bin/time` (GNU time, as `make bench`;
/// which measures 1 GiB with release builds).
#[test]
fn digest_mode_of_a_large_pe_stays_under_64_mib() {
    let mut w = World::new();
    let ep = appliance_with(
        &mut w,
        "default_profile = \"paged\"\n[profiles.paged]\nhash = \"sha256\"\npage_hashes = true\n",
        "",
    );
    let big = w.path("big.exe");
    let made = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/make-pe.sh"))
        .arg(&big)
        .arg((128u64 << 20).to_string())
        .status()
        .unwrap();
    assert!(made.success());
    let size = std::fs::metadata(&big).unwrap().len();
    assert!(size >= 128 << 20, "{size}");
    let rss = w.path("client.rss");
    let ca = w.path("cert.pem");
    let out = std::process::Command::new("/usr/bin/time")
        .args(["-f", "%M", "-o"])
        .arg(&rss)
        .arg(bin("signet"))
        .env("SIGNET_ENDPOINT", ep.to_string())
        .env_remove("SIGNET_CONFIG")
        .args([
            "sign",
            "--digest",
            "--osslsigncode",
            "/nonexistent/osslsigncode",
        ])
        .arg("--ca-file")
        .arg(&ca)
        .arg(&big)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let kib: u64 = std::fs::read_to_string(&rss)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eprintln!("signet sign --digest of a {size}-byte PE: peak RSS {kib} KiB");
    assert!(kib < 64 * 1024, "the client peaked at {kib} KiB");
    let (ok, text) = verify(&w, &big);
    assert!(ok && text.contains("Calculated page hash"), "{text}");
    std::fs::remove_file(&big).unwrap();
}
