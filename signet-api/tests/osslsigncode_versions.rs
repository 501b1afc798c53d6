//! The osslsigncode each mode needs is stated once in the docs (README.md,
//! "osslsigncode versions") and once in code (`signet_api::wire::osslsigncode`); these
//! tests hold the two together, and every "2.N or later" the docs and the binaries'
//! help say to one of those numbers.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use signet_api::wire::osslsigncode::{shown, APPX, DIGEST, POWERSHELL, WHOLE_FILE};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

#[test]
fn the_readme_table_states_the_versions_the_code_holds() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("### osslsigncode versions")
        .nth(1)
        .expect("README.md has the section \"osslsigncode versions\"");
    let section = section.split("\n### ").next().unwrap();
    for (mode, version) in [
        ("| whole files: PE, MSI, CAB, CAT |", WHOLE_FILE),
        ("| PowerShell scripts |", POWERSHELL),
        ("| APPX/MSIX packages and bundles |", APPX),
        ("| digest mode (`signet sign --digest`) |", DIGEST),
    ] {
        let row = section
            .lines()
            .find(|l| l.starts_with(mode))
            .unwrap_or_else(|| panic!("no row {mode} in README.md's osslsigncode versions"));
        assert!(
            row.ends_with(&format!("| {} or later |", shown(version))),
            "README.md says {row}, the code {}",
            shown(version)
        );
    }
}

/// Every "osslsigncode ... N.M or later" and "(N.M or later" in the docs and in the
/// agent's and client's sources names a version the code holds.
#[test]
fn every_stated_requirement_is_one_the_code_holds() {
    let known = [
        shown(WHOLE_FILE),
        shown(POWERSHELL),
        shown(APPX),
        shown(DIGEST),
    ];
    let mut files = vec![
        root().join("README.md"),
        root().join("ARCHITECTURE.md"),
        root().join("packaging/README.md"),
    ];
    for dir in [
        "docs",
        "vm-agent/signet-agent/src",
        "appliance/signet/src",
        "appliance/signetd/src",
    ] {
        collect(&root().join(dir), &mut files);
    }
    let mut seen = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        // Sentences may wrap: look at the words, not the lines.
        let words: Vec<&str> = text.split_whitespace().collect();
        for (i, pair) in words.windows(3).enumerate() {
            if pair[1] != "or" || !pair[2].starts_with("later") {
                continue;
            }
            let version = pair[0].trim_start_matches(['(', '`']);
            if !version.starts_with("2.") {
                continue;
            }
            let before = words[i.saturating_sub(12)..i].join(" ");
            assert!(
                known.iter().any(|k| k == version),
                "{}: \"{before} {version} or later\" names osslsigncode {version}; the code holds {known:?} (signet_api::wire::osslsigncode)",
                file.display()
            );
            seen += 1;
        }
    }
    assert!(seen >= 5, "found only {seen} stated requirements");
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs" || e == "md") {
            files.push(path);
        }
    }
}
