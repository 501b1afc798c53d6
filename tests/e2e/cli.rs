//! What every binary does with its stdout: a pipe whose reader has gone ends it
//! quietly with 141 (never a panic), and the `man` and `completions` subcommands are
//! listed in its `--help`.

use std::process::{Command, Output, Stdio};

use signet_test_support::*;

/// The exit status of a program whose stdout's reader has gone (128 + SIGPIPE).
pub(crate) const BROKEN_PIPE: i32 = 141;

/// Runs `cmd` with stdout a pipe whose read end is closed before it starts, so its
/// first write fails with EPIPE (as in `cmd | head -1` once head has exited, but
/// every time).
pub(crate) fn with_closed_stdout(cmd: &mut Command) -> Output {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

/// The program ended with 141 and said nothing, or fails naming what it did.
pub(crate) fn assert_quiet_broken_pipe(what: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(BROKEN_PIPE),
        "{what}: {:?}, stderr: {stderr}",
        out.status
    );
    assert!(stderr.is_empty(), "{what} said: {stderr}");
}

#[test]
fn every_binary_ends_quietly_when_its_reader_has_gone() {
    let w = World::new();
    for binary in ["signetd", "signetctl", "signet", "signet-agent"] {
        for args in [&["completions", "bash"][..], &["man"]] {
            let out = with_closed_stdout(Command::new(bin(binary)).args(args));
            assert_quiet_broken_pipe(&format!("{binary} {args:?}"), &out);
        }
    }
    // A command that prints its result: `signet status --json` prints a document also
    // when nothing answers (exit 6 otherwise), here into the closed pipe.
    let nowhere = format!("unix:{}", w.path("nobody.sock").display());
    let config = w.path("signet.toml");
    std::fs::write(&config, "").unwrap();
    let mut status = Command::new(bin("signet"));
    status
        .args(["--endpoint", &nowhere, "--config", config.to_str().unwrap()])
        .args(["status", "--json"]);
    assert_quiet_broken_pipe("signet status --json", &with_closed_stdout(&mut status));
    let out = status.stdout(Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(6), "{out:?}");

    // A full disk is not a closed pipe: it is said, with 74.
    let full = std::fs::File::create("/dev/full").unwrap();
    let out = Command::new(bin("signet"))
        .args(["completions", "bash"])
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(74), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "signet: cannot write to stdout: No space left on device (os error 28)\n"
    );
}

#[test]
fn every_binary_lists_man_and_completions_in_its_help() {
    for binary in ["signetd", "signetctl", "signet", "signet-agent"] {
        let help = Command::new(bin(binary)).arg("--help").output().unwrap();
        assert_eq!(help.status.code(), Some(0), "{binary}");
        let text = String::from_utf8_lossy(&help.stdout);
        for sub in ["  man ", "  completions "] {
            assert!(text.contains(sub), "{binary} --help lacks{sub}: {text}");
        }
        assert!(text.contains("141 stdout was closed"), "{binary}: {text}");
    }
}
