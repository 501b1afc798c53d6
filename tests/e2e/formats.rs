//! Formats through the whole path: every supported format signed by `signet` →
//! `signetd` → `signet-agent` and verified with `osslsigncode verify`, and what is not
//! signed refused by both ends.

use std::path::Path;

use signet_tests::*;

use crate::{code, post_sign, stderr, unix_appliance};

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
    let zip = w.file("app.msix", b"PK\x03\x04\x14\x00\x00\x00");
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, body) = rt.block_on(post_sign(&ep, "filename=notes.txt", script.to_vec()));
    assert_eq!(
        (status, body["code"].as_str()),
        (415, Some("unsupported_format")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains(".ps1"), "{body}");
    let (status, body) = rt.block_on(post_sign(&ep, "", script.to_vec()));
    assert_eq!(status, 415, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no file name came with it"),
        "{body}"
    );
    let doc_bytes = std::fs::read(&doc).unwrap();
    let (status, body) = rt.block_on(post_sign(&ep, "filename=setup.msi", doc_bytes));
    assert_eq!(status, 415, "the name does not make it an MSI: {body}");
}
