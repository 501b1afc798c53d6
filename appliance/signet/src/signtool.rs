//! `signet signtool sign ...`: signtool's command line, signed by the appliance.
//!
//! A build script written for signtool switches by one word (`signtool sign` →
//! `signet signtool sign`). [`parse`] reads signtool's options (`/opt` or `-opt`,
//! case-insensitive); [`check`] holds them to the profile's options (`GET /v1/profile`)
//! and [`check_certificate`] the certificate selection (`/a`, `/n`, `/i`, `/sha1`) to the
//! certificate the profile signs with (the agent's, from `GET /v1/status`). All three
//! are pure; [`run`] asks the appliance and hands the files to `signet sign`.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use signet_api::wire::{
    exit, AgentReport, CertificateSummary, DaemonStatus, ProfileOptions, STATUS_PATH,
};
use signet_protocol::{client, Endpoint};

use crate::config::ClientConfig;
use crate::sign;

/// `signet signtool --help`: what is taken, what is refused and why.
pub const HELP: &str = "\
signet signtool sign [OPTIONS] FILE...

signtool's `sign` command line, signed by the Signet appliance with its profile: a build
script switches by one word (`signtool sign` -> `signet signtool sign`). Options are
written /opt or -opt, in any case, as signtool takes them.

Taken, and held to the profile (GET /v1/profile):
  /fd ALG       file digest: must be the profile's hash (sha256, sha384 or sha512)
  /tr URL       RFC 3161 timestamp: the profile must timestamp; its own servers are asked
                (a URL that is not among them is replaced, and said)
  /td ALG       the timestamp's digest (needs /tr): must be the profile's hash
  /d DESC       description put into the signature
  /du URL       URL put into the signature
  /as           append the signature: the profile must be nested
  /ph, /nph     page hashes or none: must be what the profile does
  /a            select the certificate automatically: the profile's certificate
  /n SUBJECT    the certificate's subject must contain SUBJECT (case-insensitive)
  /i ISSUER     the certificate's issuer must contain ISSUER (case-insensitive)
  /sha1 HASH    the certificate's SHA-1 thumbprint must be HASH
  /s STORE, /sm certificate store: ignored (the certificate is the token's)
  /v, /q, /debug  more or less output
Signet's own, written with two dashes:
  --profile NAME  the profile [default: from the config file, else the appliance's]
  --digest        digest mode: only the file's Authenticode data travels
  --              what follows are files, even when they start with / or -

Refused, with the reason: /f, /p, /csp, /kc (the key lives on the appliance's token),
/ac, /c, /r, /u, /uw (the certificate and its chain are the token's), /t (legacy
timestamps: use /tr), /p7, /p7co, /p7ce (Signet writes signed files), /dg, /ds, /di,
/dxml, /dlib, /dmdf (use --digest), /sa, /seal, /itos, /force, /nosealwarn. An option
the profile fixes otherwise is refused naming what the profile does, e.g. \"the profile
'release' signs with sha256; /fd sha1 is not allowed\".

A path that starts with / is a file unless it is one of the options above (a file named
like an option: put it after --). /n, /i and /sha1 are checked against the certificate
the signing VM's agent reports (the profile's pinned certificate when it has one), so
they need the agent reachable.

Exit codes are signet's: 0 signed (every file); 2 the command line is wrong, or asks
for what the profile does not do; 3 refused by policy; 4 bad input file; 5 signing
failed; 6 the appliance (or, to check /n, /i, /sha1, its agent) is unavailable.
signtool's own are 0 and 1: `signet signtool sign ... || exit 1` keeps a script's test
of `1` working.";

/// What `signet signtool sign ...` asks for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Request {
    /// `--profile NAME`.
    pub profile: Option<String>,
    /// `--digest`.
    pub digest: bool,
    /// `/fd ALG`, lowercased.
    pub file_digest: Option<String>,
    /// `/tr URL`.
    pub timestamp_url: Option<String>,
    /// `/td ALG`, lowercased.
    pub timestamp_digest: Option<String>,
    /// `/d DESC`.
    pub description: Option<String>,
    /// `/du URL`.
    pub url: Option<String>,
    /// `/a`.
    pub auto_select: bool,
    /// `/n SUBJECT`.
    pub subject: Option<String>,
    /// `/i ISSUER`.
    pub issuer: Option<String>,
    /// `/sha1 HASH`, lowercase hex without separators.
    pub sha1: Option<String>,
    /// `/as`.
    pub append: bool,
    /// `/ph` (true) or `/nph` (false).
    pub page_hashes: Option<bool>,
    /// `/v` or `/debug`.
    pub verbose: bool,
    /// `/q`.
    pub quiet: bool,
    pub files: Vec<PathBuf>,
}

impl Request {
    /// Whether an option selects the certificate by what it is (`/n`, `/i`, `/sha1`).
    pub fn selects_certificate(&self) -> bool {
        self.subject.is_some() || self.issuer.is_some() || self.sha1.is_some()
    }
}

/// What the command line asks.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Help,
    Sign(Box<Request>),
}

/// Why the command line cannot be taken: the message, with the fix.
#[derive(Debug, PartialEq, Eq)]
pub struct Usage(pub String);

/// An option signtool has, and what Signet does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opt {
    /// Taken: `(name, takes a value)`.
    Taken(&'static str, bool),
    /// Refused with the reason; `(name, values it takes, reason)`.
    Refused(&'static str, usize, &'static str),
}

const KEY_ON_TOKEN: &str =
    "the key lives on the Signet appliance's token, which signs with the profile's certificate: drop it";
const CHAIN_IS_TOKENS: &str =
    "the certificate and its chain are the token's, as the profile says: drop it (select with /n, /i or /sha1, which are checked)";
const DIGEST_SIGNING: &str =
    "signtool's digest signing is not taken: drop it and use --digest, Signet's digest mode (only the file's Authenticode data travels)";
const SEALING: &str = "sealing and custom authenticated attributes are not made by Signet: drop it";

const OPTIONS: &[Opt] = &[
    Opt::Taken("fd", true),
    Opt::Taken("tr", true),
    Opt::Taken("td", true),
    Opt::Taken("d", true),
    Opt::Taken("du", true),
    Opt::Taken("a", false),
    Opt::Taken("n", true),
    Opt::Taken("i", true),
    Opt::Taken("sha1", true),
    Opt::Taken("as", false),
    Opt::Taken("ph", false),
    Opt::Taken("nph", false),
    Opt::Taken("s", true),
    Opt::Taken("sm", false),
    Opt::Taken("v", false),
    Opt::Taken("q", false),
    Opt::Taken("debug", false),
    Opt::Refused("f", 1, KEY_ON_TOKEN),
    Opt::Refused("p", 1, KEY_ON_TOKEN),
    Opt::Refused("csp", 1, KEY_ON_TOKEN),
    Opt::Refused("kc", 1, KEY_ON_TOKEN),
    Opt::Refused("ac", 1, CHAIN_IS_TOKENS),
    Opt::Refused("c", 1, CHAIN_IS_TOKENS),
    Opt::Refused("r", 1, CHAIN_IS_TOKENS),
    Opt::Refused("u", 1, CHAIN_IS_TOKENS),
    Opt::Refused("uw", 0, CHAIN_IS_TOKENS),
    Opt::Refused(
        "t",
        1,
        "legacy (Authenticode) timestamps are not made: use /tr, an RFC 3161 timestamp from the profile's servers",
    ),
    Opt::Refused(
        "p7",
        1,
        "Signet writes the signed file, not a detached PKCS#7: drop /p7, /p7co and /p7ce",
    ),
    Opt::Refused(
        "p7co",
        1,
        "Signet writes the signed file, not a detached PKCS#7: drop /p7, /p7co and /p7ce",
    ),
    Opt::Refused(
        "p7ce",
        1,
        "Signet writes the signed file, not a detached PKCS#7: drop /p7, /p7co and /p7ce",
    ),
    Opt::Refused("dg", 1, DIGEST_SIGNING),
    Opt::Refused("ds", 0, DIGEST_SIGNING),
    Opt::Refused("di", 1, DIGEST_SIGNING),
    Opt::Refused("dxml", 0, DIGEST_SIGNING),
    Opt::Refused("dlib", 1, DIGEST_SIGNING),
    Opt::Refused("dmdf", 1, DIGEST_SIGNING),
    Opt::Refused("sa", 2, SEALING),
    Opt::Refused("seal", 0, SEALING),
    Opt::Refused("itos", 0, SEALING),
    Opt::Refused("force", 0, SEALING),
    Opt::Refused("nosealwarn", 0, SEALING),
];

fn lookup(name: &str) -> Option<Opt> {
    OPTIONS.iter().copied().find(|o| match o {
        Opt::Taken(n, _) | Opt::Refused(n, _, _) => n.eq_ignore_ascii_case(name),
    })
}

fn is_help(arg: &OsStr) -> bool {
    matches!(
        arg.to_str().map(str::to_ascii_lowercase).as_deref(),
        Some("/?" | "-?" | "--help" | "-h" | "/h" | "help")
    )
}

/// Reads `signtool`'s command line (the words after `signet signtool`). Pure.
pub fn parse(args: &[OsString]) -> Result<Parsed, Usage> {
    let Some(command) = args.first() else {
        return Err(Usage(
            "signet signtool needs a command: signet signtool sign [OPTIONS] FILE... (signet signtool --help)"
                .to_owned(),
        ));
    };
    if is_help(command) {
        return Ok(Parsed::Help);
    }
    let command = command.to_string_lossy();
    if !command.eq_ignore_ascii_case("sign") {
        return Err(Usage(format!(
            "signet signtool takes signtool's `sign` command only, not `{command}`: verify a signature with `osslsigncode verify -in FILE` (signet signtool --help)"
        )));
    }
    let mut r = Request::default();
    let mut words = args[1..].iter();
    let mut files_only = false;
    while let Some(word) = words.next() {
        if files_only {
            r.files.push(PathBuf::from(word));
            continue;
        }
        if is_help(word) {
            return Ok(Parsed::Help);
        }
        let Some(text) = word.to_str() else {
            // Not UTF-8: no option is; a file.
            r.files.push(PathBuf::from(word));
            continue;
        };
        if text == "--" {
            files_only = true;
            continue;
        }
        if let Some(own) = text.strip_prefix("--") {
            let (name, inline) = match own.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (own, None),
            };
            match name {
                "profile" => {
                    let value = match inline {
                        Some(v) => v,
                        None => value_of(&mut words, "--profile", "--profile release")?,
                    };
                    if value.is_empty() {
                        return Err(Usage("--profile needs a profile's name".to_owned()));
                    }
                    r.profile = Some(value);
                }
                "digest" if inline.is_none() => r.digest = true,
                _ => {
                    return Err(Usage(format!(
                        "unknown option {text}: signet signtool takes --profile NAME, --digest and signtool's own options (signet signtool --help)"
                    )))
                }
            }
            continue;
        }
        let (prefix, name) = match text.chars().next() {
            Some(p @ ('/' | '-')) => (p, &text[1..]),
            _ => {
                r.files.push(PathBuf::from(word));
                continue;
            }
        };
        let Some(opt) = lookup(name) else {
            if prefix == '/' && (name.contains(['/', '\\', '.']) || name.is_empty()) {
                // An absolute path, not an option.
                r.files.push(PathBuf::from(word));
                continue;
            }
            return Err(Usage(format!(
                "unknown option {text}: signet signtool takes signtool's sign options /fd /tr /td /d /du /as /ph /nph /a /n /i /sha1 /s /sm /v /q /debug (signet signtool --help); a file whose name looks like an option goes after --"
            )));
        };
        let shown = format!("{prefix}{}", name.to_ascii_lowercase());
        match opt {
            Opt::Refused(_, _, reason) => {
                return Err(Usage(format!("{shown} is not taken by Signet: {reason}")));
            }
            Opt::Taken(n, false) => match n {
                "a" => r.auto_select = true,
                "as" => r.append = true,
                "ph" => r.page_hashes = Some(true),
                "nph" => r.page_hashes = Some(false),
                "sm" => {}
                "v" | "debug" => r.verbose = true,
                "q" => r.quiet = true,
                _ => unreachable!("every flag is handled"),
            },
            Opt::Taken(n, true) => {
                let example = match n {
                    "fd" | "td" => format!("{shown} sha256"),
                    "tr" => format!("{shown} http://timestamp.example"),
                    "sha1" => format!("{shown} THUMBPRINT"),
                    _ => format!("{shown} VALUE"),
                };
                let value = value_of(&mut words, &shown, &example)?;
                match n {
                    "fd" => r.file_digest = Some(value.to_ascii_lowercase()),
                    "tr" => r.timestamp_url = Some(value),
                    "td" => r.timestamp_digest = Some(value.to_ascii_lowercase()),
                    "d" => r.description = Some(value),
                    "du" => r.url = Some(value),
                    "n" => r.subject = Some(value),
                    "i" => r.issuer = Some(value),
                    "sha1" => {
                        let hex: String = value
                            .chars()
                            .filter(|c| !c.is_whitespace() && *c != ':')
                            .collect::<String>()
                            .to_ascii_lowercase();
                        if hex.len() != 40 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                            return Err(Usage(format!(
                                "{shown} {value}: a SHA-1 thumbprint is 40 hexadecimal digits (spaces and colons allowed), as Windows' certificate dialog shows it"
                            )));
                        }
                        r.sha1 = Some(hex);
                    }
                    "s" => {}
                    _ => unreachable!("every option with a value is handled"),
                }
            }
        }
    }
    if r.timestamp_digest.is_some() && r.timestamp_url.is_none() {
        return Err(Usage(
            "/td says the timestamp's digest and needs /tr URL, as in signtool: add /tr or drop /td"
                .to_owned(),
        ));
    }
    if r.files.is_empty() {
        return Err(Usage(
            "signet signtool sign needs at least one file to sign (signet signtool --help)"
                .to_owned(),
        ));
    }
    Ok(Parsed::Sign(Box::new(r)))
}

fn value_of<'a>(
    words: &mut impl Iterator<Item = &'a OsString>,
    shown: &str,
    example: &str,
) -> Result<String, Usage> {
    match words.next() {
        Some(v) => v.to_str().map(str::to_owned).ok_or_else(|| {
            Usage(format!(
                "the value of {shown} is not valid UTF-8: give it as text, e.g. {example}"
            ))
        }),
        None => Err(Usage(format!("{shown} needs a value, e.g. {example}"))),
    }
}

fn ask_the_operator(what: &str) -> String {
    format!("drop {what} or ask the operator for a profile that allows it")
}

/// Holds what the command line asks to what the profile does. `Ok`: what to tell the
/// user (a timestamp server replaced). Pure.
pub fn check(r: &Request, p: &ProfileOptions) -> Result<Vec<String>, Usage> {
    let name = &p.name;
    let hash = p.hash.as_str();
    let mut notes = Vec::new();
    if let Some(fd) = &r.file_digest {
        if fd != hash {
            return Err(Usage(format!(
                "the profile '{name}' signs with {hash}; /fd {fd} is not allowed — {}",
                ask_the_operator("/fd")
            )));
        }
    }
    if let Some(url) = &r.timestamp_url {
        match &p.timestamp {
            None => {
                return Err(Usage(format!(
                    "the appliance does not say whether the profile '{name}' timestamps (a signetd older than this client): update signetd, or drop /tr and /td"
                )))
            }
            Some(servers) if servers.is_empty() => {
                return Err(Usage(format!(
                    "the profile '{name}' does not timestamp; /tr {url} is not allowed — {}",
                    ask_the_operator("/tr and /td")
                )))
            }
            Some(servers) if !servers.iter().any(|s| same_url(s, url)) => notes.push(format!(
                "the timestamp comes from the profile '{name}''s servers ({}), not {url}",
                servers.join(", ")
            )),
            Some(_) => {}
        }
    }
    if let Some(td) = &r.timestamp_digest {
        if td != hash {
            return Err(Usage(format!(
                "the profile '{name}' timestamps with {hash}; /td {td} is not allowed — {}",
                ask_the_operator("/td")
            )));
        }
    }
    if r.append && !p.nested {
        return Err(Usage(format!(
            "the profile '{name}' replaces a signature the file has; /as is not allowed — {}",
            ask_the_operator("/as")
        )));
    }
    match r.page_hashes {
        Some(true) if !p.page_hashes => {
            return Err(Usage(format!(
                "the profile '{name}' signs without page hashes; /ph is not allowed — {}",
                ask_the_operator("/ph")
            )))
        }
        Some(false) if p.page_hashes => {
            return Err(Usage(format!(
                "the profile '{name}' signs PE files with page hashes; /nph is not allowed — {}",
                ask_the_operator("/nph")
            )))
        }
        _ => {}
    }
    if r.verbose {
        if r.timestamp_url.is_none() && matches!(&p.timestamp, Some(s) if !s.is_empty()) {
            notes.push(format!(
                "the profile '{name}' timestamps its signatures, /tr or not"
            ));
        }
        if !r.append && p.nested {
            notes.push(format!(
                "the profile '{name}' is nested: a signature the file has is kept, /as or not"
            ));
        }
    }
    Ok(notes)
}

fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/')
        .eq_ignore_ascii_case(b.trim_end_matches('/'))
}

fn normalise_fingerprint(fp: &str) -> String {
    fp.chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Holds `/n`, `/i` and `/sha1` to the certificate the profile signs with: the one its
/// `certificate` pin names among those the agent reports, else the token's (each of
/// them, when it holds several). Pure.
pub fn check_certificate(
    r: &Request,
    p: &ProfileOptions,
    certs: &[CertificateSummary],
) -> Result<(), Usage> {
    let name = &p.name;
    let candidates: Vec<&CertificateSummary> = match &p.certificate {
        Some(pin) => {
            let pin = normalise_fingerprint(pin);
            let found: Vec<_> = certs
                .iter()
                .filter(|c| normalise_fingerprint(&c.sha256) == pin)
                .collect();
            if found.is_empty() {
                return Err(Usage(format!(
                    "the profile '{name}' signs with the certificate of SHA-256 fingerprint {pin}, which the token in the signing VM does not hold now, so /n, /i and /sha1 cannot be checked: ask the operator (signet status), or drop them"
                )));
            }
            found
        }
        None => certs.iter().collect(),
    };
    if candidates.is_empty() {
        return Err(Usage(
            "the signing VM's agent reports no certificate on the token, so /n, /i and /sha1 cannot be checked: ask the operator (signet status), or drop them".to_owned(),
        ));
    }
    let several = candidates.len() > 1;
    for c in candidates {
        let which = if several {
            format!(
                "the token holds {} certificates and the profile '{name}' is not pinned to one; one of them is",
                certs.len()
            )
        } else {
            format!("the profile '{name}' signs with the certificate")
        };
        let fix = if several {
            "ask the operator to pin the profile's certificate, or drop it".to_owned()
        } else {
            ask_the_operator("it")
        };
        if let Some(n) = &r.subject {
            if !contains_ignoring_case(&c.subject, n) {
                return Err(Usage(format!(
                    "{which} of {}; /n \"{n}\" does not match it — {fix}",
                    c.subject
                )));
            }
        }
        if let Some(i) = &r.issuer {
            if !contains_ignoring_case(&c.issuer, i) {
                return Err(Usage(format!(
                    "{which} issued by {}; /i \"{i}\" does not match it — {fix}",
                    c.issuer
                )));
            }
        }
        if let Some(t) = &r.sha1 {
            if c.sha1.is_empty() {
                return Err(Usage(
                    "the signing VM's agent does not report SHA-1 thumbprints (it is older than this client): update signet-agent, or select the certificate with /n instead of /sha1".to_owned(),
                ));
            }
            if !c.sha1.eq_ignore_ascii_case(t) {
                return Err(Usage(format!(
                    "{which} of thumbprint {} ({}); /sha1 {t} does not match it — {fix}",
                    c.sha1, c.subject
                )));
            }
        }
    }
    Ok(())
}

fn contains_ignoring_case(haystack: &str, needle: &str) -> bool {
    haystack.to_lowercase().contains(&needle.to_lowercase())
}

/// `signet signtool ...`: parses, holds the options to the profile, signs.
pub async fn run(endpoint: &Endpoint, args: &[OsString], cfg: &ClientConfig) -> i32 {
    let r = match parse(args) {
        Ok(Parsed::Help) => {
            signet_api::outln!("{HELP}");
            return exit::SIGNED;
        }
        Ok(Parsed::Sign(r)) => *r,
        Err(Usage(m)) => {
            eprintln!("signet signtool: {m}");
            return exit::USAGE;
        }
    };
    let profile_name = r.profile.clone().or_else(|| cfg.profile.clone());
    let profile = match sign::profile_options(endpoint, profile_name.as_deref()).await {
        Ok(p) => p,
        Err(f) => {
            eprintln!("signet signtool: {}", f.message);
            return f.exit_code;
        }
    };
    let notes = match check(&r, &profile) {
        Ok(n) => n,
        Err(Usage(m)) => {
            eprintln!("signet signtool: {m}");
            return exit::USAGE;
        }
    };
    if r.selects_certificate() {
        let certs = match certificates(endpoint).await {
            Ok(c) => c,
            Err(m) => {
                eprintln!("signet signtool: {m}");
                return exit::UNAVAILABLE;
            }
        };
        if let Err(Usage(m)) = check_certificate(&r, &profile, &certs) {
            eprintln!("signet signtool: {m}");
            return exit::USAGE;
        }
    }
    if !r.quiet {
        for n in &notes {
            eprintln!("signet signtool: {n}");
        }
    }
    if r.verbose {
        eprintln!(
            "signet signtool: signing {} file(s) with the profile '{}' ({}{}{})",
            r.files.len(),
            profile.name,
            profile.hash.as_str(),
            if profile.page_hashes {
                ", page hashes"
            } else {
                ""
            },
            if profile.nested { ", nested" } else { "" },
        );
    }
    let args =
        sign::SignArgs::from_signtool(r.files, Some(profile.name), r.description, r.url, r.digest);
    sign::run(endpoint, args, cfg).await
}

/// The certificates the signing VM's agent reports (`GET /v1/status`).
async fn certificates(endpoint: &Endpoint) -> Result<Vec<CertificateSummary>, String> {
    let status: DaemonStatus = match client::get_json(endpoint, STATUS_PATH).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e.message),
        Err(e) => return Err(sign::unreachable_message(endpoint, &e)),
    };
    match status.agent {
        AgentReport::Reachable { health, .. } => Ok(health.certificates),
        AgentReport::Unreachable { error, .. } => Err(format!(
            "/n, /i and /sha1 are checked against the certificate the signing VM's agent reports, and the agent cannot be reached now ({}): try again when `signet status` says signing works, or drop them",
            error.message
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signet_api::wire::DigestAlgorithm;

    fn words(line: &str) -> Vec<OsString> {
        line.split_whitespace().map(OsString::from).collect()
    }

    fn sign(line: &str) -> Request {
        match parse(&words(line)) {
            Ok(Parsed::Sign(r)) => *r,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn refused(line: &str) -> String {
        match parse(&words(line)) {
            Err(Usage(m)) => m,
            other => panic!("{line} was taken: {other:?}"),
        }
    }

    fn profile() -> ProfileOptions {
        ProfileOptions {
            name: "release".into(),
            hash: DigestAlgorithm::Sha256,
            page_hashes: false,
            nested: false,
            formats: vec![],
            timestamp: Some(vec!["http://tsa.example/".into()]),
            certificate: None,
        }
    }

    fn cert(subject: &str, sha256: &str, sha1: &str) -> CertificateSummary {
        CertificateSummary {
            subject: subject.into(),
            issuer: "CN=Example Issuing CA, O=Example".into(),
            sha256: sha256.into(),
            sha1: sha1.into(),
            ..CertificateSummary::default()
        }
    }

    const THUMB: &str = "3c1f0e5d2a4b6c8d9e0f1a2b3c4d5e6f70819203";

    #[test]
    fn the_common_line_maps_onto_a_request() {
        let r = sign(
            "sign /fd SHA256 /tr http://tsa.example /td sha256 /d Example /du https://example.com /a /v app.exe lib.dll",
        );
        assert_eq!(
            r,
            Request {
                file_digest: Some("sha256".into()),
                timestamp_url: Some("http://tsa.example".into()),
                timestamp_digest: Some("sha256".into()),
                description: Some("Example".into()),
                url: Some("https://example.com".into()),
                auto_select: true,
                verbose: true,
                files: vec!["app.exe".into(), "lib.dll".into()],
                ..Request::default()
            }
        );
    }

    #[test]
    fn dash_and_slash_spellings_in_any_case_are_the_same() {
        let slash = sign("sign /fd sha256 /n Example /sha1 3C1F0E5D2A4B6C8D9E0F1A2B3C4D5E6F70819203 /as /ph /q a.exe");
        for line in [
            "SIGN -fd sha256 -n Example -sha1 3C1F0E5D2A4B6C8D9E0F1A2B3C4D5E6F70819203 -as -ph -q a.exe",
            "Sign /FD sha256 /N Example /SHA1 3c1f0e5d2a4b6c8d9e0f1a2b3c4d5e6f70819203 /AS /PH /Q a.exe",
            "sign -Fd SHA256 /n Example -Sha1 3c:1f:0e:5d:2a:4b:6c:8d:9e:0f:1a:2b:3c:4d:5e:6f:70:81:92:03 /As -pH /q a.exe",
        ] {
            assert_eq!(sign(line), slash, "{line}");
        }
        assert_eq!(slash.sha1.as_deref(), Some(THUMB));
        assert_eq!(slash.page_hashes, Some(true));
        assert!(slash.append && slash.quiet);
        assert_eq!(sign("sign /nph a.exe").page_hashes, Some(false));
        assert!(sign("sign /debug a.exe").verbose);
    }

    #[test]
    fn a_thumbprint_with_spaces_as_windows_shows_it_is_taken() {
        let mut args = words("sign /sha1");
        args.push("3c 1f 0e 5d 2a 4b 6c 8d 9e 0f 1a 2b 3c 4d 5e 6f 70 81 92 03".into());
        args.push("a.exe".into());
        match parse(&args) {
            Ok(Parsed::Sign(r)) => assert_eq!(r.sha1.as_deref(), Some(THUMB)),
            other => panic!("{other:?}"),
        }
        let m = refused("sign /sha1 1234 a.exe");
        assert!(m.contains("40 hexadecimal digits"), "{m}");
        let m = refused("sign /sha1 zz1f0e5d2a4b6c8d9e0f1a2b3c4d5e6f70819203 a.exe");
        assert!(m.contains("40 hexadecimal digits"), "{m}");
    }

    #[test]
    fn a_description_with_spaces_is_one_value() {
        let args: Vec<OsString> = [
            "sign",
            "/d",
            "Example App 1.0",
            "-du",
            "https://e.x/",
            "a.exe",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        match parse(&args) {
            Ok(Parsed::Sign(r)) => {
                assert_eq!(r.description.as_deref(), Some("Example App 1.0"));
                assert_eq!(r.url.as_deref(), Some("https://e.x/"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn signets_own_options_take_two_dashes() {
        let r = sign("sign --profile nightly --digest /fd sha256 a.exe");
        assert_eq!(r.profile.as_deref(), Some("nightly"));
        assert!(r.digest);
        assert_eq!(
            sign("sign --profile=nightly a.exe").profile.as_deref(),
            Some("nightly")
        );
        assert!(refused("sign --profile").contains("--profile needs a value"));
        assert!(refused("sign --profile= a.exe").contains("profile's name"));
        let m = refused("sign --output x a.exe");
        assert!(
            m.contains("unknown option --output") && m.contains("--profile NAME"),
            "{m}"
        );
        assert!(refused("sign --digest=yes a.exe").contains("unknown option"));
    }

    #[test]
    fn absolute_paths_are_files_and_double_dash_ends_options() {
        let r = sign("sign /fd sha256 /tmp/build/app.exe /srv/out/lib.dll");
        assert_eq!(
            r.files,
            [
                PathBuf::from("/tmp/build/app.exe"),
                PathBuf::from("/srv/out/lib.dll")
            ]
        );
        // A file in / whose name has a dot is a file, not an unknown option.
        assert_eq!(sign("sign /app.exe").files, [PathBuf::from("/app.exe")]);
        // Options may follow files, as signtool's parser allows.
        let r = sign("sign a.exe /fd sha256");
        assert_eq!(
            (r.files.len(), r.file_digest.as_deref()),
            (1, Some("sha256"))
        );
        let r = sign("sign /v -- /a -q");
        assert!(r.verbose && !r.auto_select && !r.quiet);
        assert_eq!(r.files, [PathBuf::from("/a"), PathBuf::from("-q")]);
    }

    #[test]
    fn unknown_options_are_refused_naming_the_known_ones() {
        for line in [
            "sign /xyz a.exe",
            "sign -xyz a.exe",
            "sign /fdd sha256 a.exe",
        ] {
            let m = refused(line);
            assert!(m.starts_with("unknown option"), "{line}: {m}");
            assert!(m.contains("/fd /tr /td /d /du"), "{m}");
            assert!(m.contains("after --"), "{m}");
        }
    }

    #[test]
    fn options_signet_cannot_honour_are_refused_with_the_reason() {
        for (line, shown, says) in [
            ("sign /f cert.pfx /p secret a.exe", "/f", "the key lives on"),
            ("sign -p secret a.exe", "-p", "the key lives on"),
            ("sign /CSP \"eToken\" a.exe", "/csp", "the key lives on"),
            ("sign /kc container a.exe", "/kc", "the key lives on"),
            ("sign /ac cross.cer a.exe", "/ac", "chain are the token's"),
            ("sign /c template a.exe", "/c", "chain are the token's"),
            ("sign /r Root a.exe", "/r", "chain are the token's"),
            (
                "sign /u 1.3.6.1.5.5.7.3.3 a.exe",
                "/u",
                "chain are the token's",
            ),
            ("sign /uw a.exe", "/uw", "chain are the token's"),
            ("sign /t http://ts a.exe", "/t", "use /tr"),
            ("sign /p7 out a.exe", "/p7", "detached PKCS#7"),
            ("sign /p7co 1.2 a.exe", "/p7co", "detached PKCS#7"),
            ("sign /p7ce Embedded a.exe", "/p7ce", "detached PKCS#7"),
            ("sign /dg dir a.exe", "/dg", "--digest"),
            ("sign /ds a.exe", "/ds", "--digest"),
            ("sign /di dir a.exe", "/di", "--digest"),
            ("sign /dxml a.exe", "/dxml", "--digest"),
            ("sign /dlib x.dll a.exe", "/dlib", "--digest"),
            ("sign /dmdf f a.exe", "/dmdf", "--digest"),
            ("sign /sa 1.2 v a.exe", "/sa", "sealing"),
            ("sign /seal a.exe", "/seal", "sealing"),
            ("sign /itos a.exe", "/itos", "sealing"),
            ("sign /force a.exe", "/force", "sealing"),
            ("sign /nosealwarn a.exe", "/nosealwarn", "sealing"),
        ] {
            let m = refused(line);
            assert!(
                m.starts_with(&format!("{shown} is not taken by Signet")),
                "{line}: {m}"
            );
            assert!(m.contains(says), "{line}: {m}");
        }
        // Every refused option in the table has a test line above.
        let refused_names = OPTIONS
            .iter()
            .filter(|o| matches!(o, Opt::Refused(..)))
            .count();
        assert_eq!(refused_names, 24);
    }

    #[test]
    fn the_store_options_are_taken_and_ignored() {
        let r = sign("sign /s My /sm /a a.exe");
        assert_eq!(
            r,
            Request {
                auto_select: true,
                files: vec!["a.exe".into()],
                ..Request::default()
            }
        );
    }

    #[test]
    fn missing_values_commands_and_files_are_usage_errors() {
        for (line, says) in [
            ("sign /fd", "/fd needs a value, e.g. /fd sha256"),
            ("sign /tr", "/tr needs a value, e.g. /tr http://"),
            ("sign -d", "-d needs a value"),
            ("sign /sha1", "/sha1 needs a value, e.g. /sha1 THUMBPRINT"),
            ("sign /fd sha256", "at least one file"),
            ("sign", "at least one file"),
            ("", "needs a command"),
            ("verify /pa a.exe", "sign` command only, not `verify`"),
            ("timestamp /tr x a.exe", "not `timestamp`"),
            (
                "sign /td sha256 a.exe",
                "/td says the timestamp's digest and needs /tr",
            ),
        ] {
            let m = refused(line);
            assert!(m.contains(says), "{line}: {m}");
        }
    }

    #[test]
    fn help_in_every_spelling() {
        for line in [
            "/?",
            "-?",
            "--help",
            "-h",
            "help",
            "sign /?",
            "sign --help",
            "SIGN -?",
            "sign /fd sha256 /?",
        ] {
            assert_eq!(parse(&words(line)), Ok(Parsed::Help), "{line}");
        }
        for option in [
            "/fd",
            "/tr",
            "/td",
            "/d",
            "/du",
            "/a",
            "/n",
            "/sha1",
            "/v",
            "/f",
            "--profile",
            "--digest",
        ] {
            assert!(HELP.contains(option), "the help names {option}");
        }
    }

    #[test]
    fn the_help_names_every_option_taken_or_refused() {
        for o in OPTIONS {
            let (Opt::Taken(n, _) | Opt::Refused(n, _, _)) = o;
            let shown = format!("/{n}");
            let named = HELP
                .split(|c: char| c.is_whitespace() || matches!(c, ',' | '(' | ')' | '.'))
                .any(|w| w == shown || (n.starts_with("p7") && w == "/p7"));
            assert!(named, "signet signtool --help names {shown}");
        }
    }

    #[test]
    fn every_value_an_option_takes_is_consumed() {
        // An option's values never become files, whatever they look like.
        for o in OPTIONS {
            if let Opt::Taken(n, true) = o {
                let value = if *n == "sha1" { THUMB } else { "sha256" };
                let r = sign(&format!("sign /tr http://ts /{n} {value} a.exe"));
                assert_eq!(r.files, [PathBuf::from("a.exe")], "/{n}");
            }
        }
    }

    #[test]
    fn a_non_utf8_word_is_a_file() {
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let odd = OsString::from_vec(vec![b'/', 0xff, b'.', b'e']);
            let r = match parse(&[OsString::from("sign"), odd.clone()]) {
                Ok(Parsed::Sign(r)) => *r,
                other => panic!("{other:?}"),
            };
            assert_eq!(r.files, [PathBuf::from(odd)]);
        }
    }

    #[test]
    fn what_the_profile_fixes_must_match() {
        let p = profile();
        assert_eq!(
            check(
                &sign("sign /fd sha256 /td SHA256 /tr http://tsa.example a.exe"),
                &p
            ),
            Ok(vec![])
        );
        assert_eq!(
            check(&sign("sign /fd sha1 a.exe"), &p),
            Err(Usage("the profile 'release' signs with sha256; /fd sha1 is not allowed — drop /fd or ask the operator for a profile that allows it".into()))
        );
        let m = check(&sign("sign /fd sha384 a.exe"), &p).unwrap_err().0;
        assert!(
            m.contains("signs with sha256; /fd sha384 is not allowed"),
            "{m}"
        );
        let mut p512 = profile();
        p512.hash = DigestAlgorithm::Sha512;
        assert!(check(&sign("sign /fd SHA512 a.exe"), &p512).is_ok());
        let m = check(&sign("sign /tr http://tsa.example /td sha1 a.exe"), &p)
            .unwrap_err()
            .0;
        assert!(
            m.contains("timestamps with sha256; /td sha1 is not allowed — drop /td"),
            "{m}"
        );
        let m = check(&sign("sign /as a.exe"), &p).unwrap_err().0;
        assert!(
            m.contains("replaces a signature the file has; /as is not allowed"),
            "{m}"
        );
        let mut nested = profile();
        nested.nested = true;
        assert!(check(&sign("sign /as a.exe"), &nested).is_ok());
        let m = check(&sign("sign /ph a.exe"), &p).unwrap_err().0;
        assert!(m.contains("without page hashes; /ph is not allowed"), "{m}");
        assert!(check(&sign("sign /nph a.exe"), &p).is_ok());
        let mut ph = profile();
        ph.page_hashes = true;
        assert!(check(&sign("sign /ph a.exe"), &ph).is_ok());
        let m = check(&sign("sign /nph a.exe"), &ph).unwrap_err().0;
        assert!(m.contains("with page hashes; /nph is not allowed"), "{m}");
        // Nothing asked, nothing to hold.
        assert_eq!(check(&sign("sign a.exe"), &p), Ok(vec![]));
    }

    #[test]
    fn a_timestamp_needs_a_profile_that_timestamps() {
        let mut p = profile();
        // Its own server (a trailing slash or case aside): nothing to say.
        assert_eq!(
            check(&sign("sign /tr HTTP://tsa.example a.exe"), &p),
            Ok(vec![])
        );
        // Another server: the profile's are asked, and that is said.
        let notes = check(&sign("sign /tr http://timestamp.digicert.com a.exe"), &p).unwrap();
        assert_eq!(
            notes,
            ["the timestamp comes from the profile 'release''s servers (http://tsa.example/), not http://timestamp.digicert.com"]
        );
        p.timestamp = Some(vec![]);
        let m = check(&sign("sign /tr http://tsa.example a.exe"), &p)
            .unwrap_err()
            .0;
        assert!(m.contains("'release' does not timestamp; /tr http://tsa.example is not allowed — drop /tr and /td"), "{m}");
        p.timestamp = None;
        let m = check(&sign("sign /tr http://tsa.example a.exe"), &p)
            .unwrap_err()
            .0;
        assert!(m.contains("update signetd"), "{m}");
        // Without /tr, a profile that does not say is fine.
        assert!(check(&sign("sign a.exe"), &p).is_ok());
    }

    #[test]
    fn verbose_says_what_the_profile_adds() {
        let mut p = profile();
        p.nested = true;
        let notes = check(&sign("sign /v a.exe"), &p).unwrap();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("timestamps its signatures"));
        assert!(notes[1].contains("is nested"));
        assert_eq!(check(&sign("sign a.exe"), &p), Ok(vec![]));
    }

    #[test]
    fn the_certificate_is_checked_by_subject_issuer_and_thumbprint() {
        let p = profile();
        let one = [cert(
            "CN=Signet Demo Code Signing, O=Signet",
            "ab:cd",
            THUMB,
        )];
        for line in [
            "sign /a a.exe",
            "sign /n Signet a.exe",
            "sign /n signet a.exe",
            "sign /n O=Signet a.exe",
            "sign /i example a.exe",
        ] {
            assert_eq!(check_certificate(&sign(line), &p, &one), Ok(()), "{line}");
        }
        assert_eq!(
            check_certificate(
                &sign(&format!("sign /sha1 {} a.exe", THUMB.to_uppercase())),
                &p,
                &one
            ),
            Ok(())
        );
        let m = check_certificate(&sign("sign /n Contoso a.exe"), &p, &one)
            .unwrap_err()
            .0;
        assert_eq!(m, "the profile 'release' signs with the certificate of CN=Signet Demo Code Signing, O=Signet; /n \"Contoso\" does not match it — drop it or ask the operator for a profile that allows it");
        let m = check_certificate(&sign("sign /i Contoso a.exe"), &p, &one)
            .unwrap_err()
            .0;
        assert!(m.contains("issued by CN=Example Issuing CA"), "{m}");
        let other = "0000000000000000000000000000000000000000";
        let m = check_certificate(&sign(&format!("sign /sha1 {other} a.exe")), &p, &one)
            .unwrap_err()
            .0;
        assert!(
            m.contains(&format!("of thumbprint {THUMB}"))
                && m.contains(&format!("/sha1 {other} does not match")),
            "{m}"
        );
        // An agent that does not report thumbprints cannot be checked: refused, not passed.
        let old = [cert("CN=Signet", "ab", "")];
        let m = check_certificate(&sign(&format!("sign /sha1 {THUMB} a.exe")), &p, &old)
            .unwrap_err()
            .0;
        assert!(m.contains("update signet-agent"), "{m}");
        let m = check_certificate(&sign("sign /n Signet a.exe"), &p, &[])
            .unwrap_err()
            .0;
        assert!(m.contains("reports no certificate"), "{m}");
    }

    #[test]
    fn a_pinned_profile_is_checked_against_its_own_certificate() {
        let certs = [
            cert(
                "CN=Old Signing, O=Example",
                "11:22",
                "1111111111111111111111111111111111111111",
            ),
            cert("CN=New Signing, O=Example", "33:44", THUMB),
        ];
        let mut p = profile();
        p.certificate = Some("33:44".into());
        assert!(check_certificate(&sign("sign /n New a.exe"), &p, &certs).is_ok());
        assert!(check_certificate(&sign(&format!("sign /sha1 {THUMB} a.exe")), &p, &certs).is_ok());
        let m = check_certificate(&sign("sign /n Old a.exe"), &p, &certs)
            .unwrap_err()
            .0;
        assert!(
            m.contains("signs with the certificate of CN=New Signing"),
            "{m}"
        );
        p.certificate = Some("3344".into());
        assert!(
            check_certificate(&sign("sign /n new a.exe"), &p, &certs).is_ok(),
            "colons are optional"
        );
        p.certificate = Some("55:66".into());
        let m = check_certificate(&sign("sign /n New a.exe"), &p, &certs)
            .unwrap_err()
            .0;
        assert!(m.contains("does not hold now"), "{m}");
        // Not pinned, several on the token: each must match, since either may sign.
        p.certificate = None;
        assert!(check_certificate(&sign("sign /n O=Example a.exe"), &p, &certs).is_ok());
        let m = check_certificate(&sign("sign /n New a.exe"), &p, &certs)
            .unwrap_err()
            .0;
        assert!(
            m.contains("holds 2 certificates") && m.contains("pin the profile's certificate"),
            "{m}"
        );
    }
}
