//! The Windows signtool backend: building signtool's command line for a token behind a
//! smart-card CSP (SafeNet's "eToken Base Cryptographic Provider" and alike), running
//! it, and classifying its real error texts into Signet's error classes.
//!
//! Platform-neutral code: it builds, runs and is tested everywhere; only Windows has a
//! signtool to run.
//!
//! ```text
//! signtool sign /f CERT.cer /csp "eToken Base Cryptographic Provider"
//!     /kc "[{{PIN}}]=CONTAINER" /fd sha256 /tr URL /td sha256 [/d DESC] [/du URL] [/ph] [/as] FILE
//! ```
//!
//! `/f` gives the token's certificate as a file, so signtool never searches a
//! certificate store (a service running as SYSTEM cannot see a user's store: "No
//! certificates were found that met all the given criteria"). `/csp` + `/kc` name the
//! key container, and SafeNet's CSP takes the PIN from the container name,
//! `[reader{{PIN}}]=container` (reader optional), so no PIN dialog is needed — a service
//! in session 0 cannot show one (`SignerSign() failed` 0x800704c7).
//!
//! **The PIN is on signtool's command line**: signtool has no other way to pass it
//! (no stdin, no file). On Windows a process's command line is visible to the same user
//! and to administrators while it runs; Signet's part is that it never logs, echoes or
//! returns it. [`SigntoolCommand`] keeps the PIN apart from the other arguments: its
//! `Debug`, `Display` and [`SigntoolCommand::redacted`] show `***` in its place, only
//! [`SigntoolCommand::args`] (for the spawn) carries it, and signtool's output is scrubbed
//! of it before it is classified or reported. signtool is started directly, not through
//! `cmd.exe`, so characters like `^`, `%` and `&` in a PIN reach the CSP unchanged.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use std::time::Duration;

use cryptoki::types::AuthPin;
use futures_util::future::BoxFuture;
use futures_util::TryFutureExt;
use secrecy::ExposeSecret;
use signet_api::wire::{DigestAlgorithm, ErrorCode, SignMode, SignResponse, SignerFeatures};
use signet_format::Format;

use crate::backend::{BackendError, BackendFailure, Made, SignError, SignSpec, Signer};
use crate::config::Config;
use crate::token::KeyRef;

/// The CSP SafeNet Authentication Client registers for eTokens.
pub use crate::config::SAFENET_CSP;

/// What the PIN is shown as wherever a command line is rendered.
pub const REDACTED: &str = "***";

/// The longest tail of signtool's output kept for an error message.
const OUTPUT_TAIL: usize = 2048;

/// signtool with a key on a smart-card token.
#[derive(Debug, Clone)]
pub struct Signtool {
    /// The signtool program, e.g. `C:\Program Files (x86)\Windows Kits\10\bin\10.0.22621.0\x64\signtool.exe`.
    pub program: PathBuf,
    /// The token's certificate exported to a file (`/f`, DER or PEM `.cer`).
    pub certificate: PathBuf,
    /// The cryptographic service provider (`/csp`), e.g. [`SAFENET_CSP`].
    pub csp: String,
    /// The key container on the token, as SafeNet Authentication Client shows it
    /// ("Container name", e.g. `te-ee307152-4ddb-460e-bbc9-c87e75365a17`).
    pub container: String,
    /// The reader, when several tokens are plugged in (SafeNet's "Reader name").
    pub reader: Option<String>,
}

/// One file to sign in place.
#[derive(Debug, Clone)]
pub struct SigntoolSpec<'a> {
    pub file: &'a Path,
    pub hash: DigestAlgorithm,
    /// RFC 3161 timestamp server (`/tr`, digest `/td` = `hash`).
    pub timestamp_url: Option<&'a str>,
    pub description: Option<&'a str>,
    pub url: Option<&'a str>,
    /// Page hashes (`/ph`).
    pub page_hashes: bool,
    /// Append the signature to existing ones (`/as`) instead of replacing them.
    pub append: bool,
}

/// One argument of a signtool command line.
#[derive(Clone)]
enum Arg {
    Plain(OsString),
    /// `[reader{{PIN}}]=container`, rendered with or without the PIN.
    KeyContainer {
        reader: String,
        container: String,
    },
}

impl Arg {
    fn plain(s: impl Into<OsString>) -> Arg {
        Arg::Plain(s.into())
    }
}

/// A complete signtool command line, PIN included, that never shows the PIN.
#[derive(Clone)]
pub struct SigntoolCommand {
    program: PathBuf,
    args: Vec<Arg>,
    pin: AuthPin,
}

impl Signtool {
    /// The command line that signs `spec.file` with `pin`.
    pub fn command(
        &self,
        pin: &AuthPin,
        spec: &SigntoolSpec<'_>,
    ) -> Result<SigntoolCommand, SigntoolError> {
        check_pin(pin.expose_secret())?;
        if self.container.is_empty() || self.container.contains(['"', '\0']) {
            return Err(SigntoolError::Setup(
                "the key container name is empty or holds a quote; copy the \"Container name\" from SafeNet Authentication Client (Advanced View, the certificate)",
            ));
        }
        let reader = self.reader.clone().unwrap_or_default();
        if reader.contains(['[', ']', '{', '}', '"', '\0']) {
            return Err(SigntoolError::Setup(
                "the reader name holds a character the /kc syntax cannot carry ([ ] { } or a quote); leave the reader out",
            ));
        }
        let hash = spec.hash.as_str();
        let mut args = vec![
            Arg::plain("sign"),
            Arg::plain("/f"),
            Arg::plain(&self.certificate),
            Arg::plain("/csp"),
            Arg::plain(&self.csp),
            Arg::plain("/kc"),
            Arg::KeyContainer {
                reader,
                container: self.container.clone(),
            },
            Arg::plain("/fd"),
            Arg::plain(hash),
        ];
        if let Some(url) = spec.timestamp_url {
            args.extend(["/tr", url, "/td", hash].map(Arg::plain));
        }
        if let Some(d) = spec.description {
            args.extend(["/d", d].map(Arg::plain));
        }
        if let Some(u) = spec.url {
            args.extend(["/du", u].map(Arg::plain));
        }
        if spec.page_hashes {
            args.push(Arg::plain("/ph"));
        }
        if spec.append {
            args.push(Arg::plain("/as"));
        }
        args.push(Arg::plain(spec.file));
        Ok(SigntoolCommand {
            program: self.program.clone(),
            args,
            pin: pin.clone(),
        })
    }
}

/// The PIN goes between `{{` and `}}` with no escape: it must not hold `}}`, and no NUL.
fn check_pin(pin: &str) -> Result<(), SigntoolError> {
    if pin.is_empty() {
        return Err(SigntoolError::PinUnusable(
            "it is empty; supply the token's user PIN",
        ));
    }
    if pin.contains("}}") || pin.ends_with('}') || pin.contains('\0') {
        return Err(SigntoolError::PinUnusable(
            "it holds \"}}\" or ends in \"}\", which /kc \"[{{PIN}}]=container\" cannot carry; change the token's PIN to one without them",
        ));
    }
    Ok(())
}

impl SigntoolCommand {
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The arguments to start signtool with. **Holds the PIN**: for the spawn only,
    /// never for a log or a message (use [`SigntoolCommand::redacted`]).
    pub fn args(&self) -> Vec<OsString> {
        self.args
            .iter()
            .map(|a| match a {
                Arg::Plain(s) => s.clone(),
                Arg::KeyContainer { reader, container } => {
                    kc_value(reader, self.pin.expose_secret(), container).into()
                }
            })
            .collect()
    }

    /// The command line as text with the PIN replaced by `***`, quoted like a Windows
    /// command line, for logs and messages.
    pub fn redacted(&self) -> String {
        let mut out = quote(&self.program.to_string_lossy());
        for a in &self.args {
            out.push(' ');
            match a {
                Arg::Plain(s) => out.push_str(&quote(&s.to_string_lossy())),
                Arg::KeyContainer { reader, container } => {
                    out.push_str(&quote(&kc_value(reader, REDACTED, container)))
                }
            }
        }
        out
    }

    /// Runs signtool once and classifies a failure from its output. The output is
    /// scrubbed of the PIN before anything looks at it.
    pub async fn run(&self) -> Result<(), SigntoolError> {
        let out = tokio::process::Command::new(&self.program)
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| SigntoolError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        if out.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push('\n');
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        let text = scrub(&text, self.pin.expose_secret());
        Err(classify(&text, out.status.code()))
    }
}

impl fmt::Display for SigntoolCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for SigntoolCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigntoolCommand")
            .field("command", &self.redacted())
            .finish()
    }
}

/// SafeNet's key container syntax: `[reader{{PIN}}]=container`.
fn kc_value(reader: &str, pin: &str, container: &str) -> String {
    format!("[{reader}{{{{{pin}}}}}]={container}")
}

/// Quotes an argument for display the way a Windows command line would need it.
fn quote(s: &str) -> String {
    if !s.is_empty() && !s.contains([' ', '\t', '"']) {
        return s.to_owned();
    }
    format!("\"{}\"", s.replace('"', "\\\""))
}

/// `text` with every occurrence of `pin` replaced by `***`.
fn scrub(text: &str, pin: &str) -> String {
    if pin.is_empty() {
        text.to_owned()
    } else {
        text.replace(pin, REDACTED)
    }
}

/// How a signtool run failed.
#[derive(Debug, thiserror::Error)]
pub enum SigntoolError {
    #[error("cannot run {program}: {source}; install the Windows SDK's signtool or point the agent's configuration at it")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(&'static str),
    #[error("the PIN cannot be given to signtool: {0}")]
    PinUnusable(&'static str),
    #[error("signtool found no certificate that met its criteria ({0}); give the token's certificate exported to a file (/f) that is still valid and made for code signing — a service running as SYSTEM cannot see a user's certificate store")]
    CertificateNotFound(String),
    #[error("the token has no key container of that name ({0}); copy the \"Container name\" from SafeNet Authentication Client (Advanced View, the certificate) into the agent's configuration")]
    KeyContainerNotFound(String),
    #[error("signtool wanted to ask for the PIN in a dialog, which a service cannot show (session 0) ({0}); the PIN must reach the CSP inside /kc \"[{{{{PIN}}}}]=container\": check the CSP name and the container name, and enable SafeNet's single logon (SafeNet Authentication Client, Client Settings, Advanced, Enable single logon)")]
    PinPrompt(String),
    #[error(
        "the token refused the PIN ({0}); Signet will not try that PIN again: supply the right one"
    )]
    PinRejected(String),
    #[error("the token's PIN is blocked after too many wrong tries ({0}); unlock it with the token's administrator password or the vendor's tool")]
    PinLocked(String),
    #[error("the token was lost while signing ({0}); the job can be retried once the token is back (an RDP session with smart-card redirection takes the token away from the VM)")]
    TokenLost(String),
    #[error("the timestamp server could not be reached or answered badly ({0}); the file was not timestamped: retry, or configure another RFC 3161 server")]
    Timestamp(String),
    #[error("signtool could not sign the file: {0}")]
    Failed(String),
}

impl SigntoolError {
    /// The wire error class of this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            SigntoolError::Spawn { .. }
            | SigntoolError::Setup(_)
            | SigntoolError::PinUnusable(_)
            | SigntoolError::CertificateNotFound(_)
            | SigntoolError::KeyContainerNotFound(_)
            | SigntoolError::PinPrompt(_) => ErrorCode::Internal,
            SigntoolError::PinRejected(_) => ErrorCode::PinRejected,
            SigntoolError::PinLocked(_) => ErrorCode::PinLocked,
            SigntoolError::TokenLost(_) => ErrorCode::TokenUnavailable,
            SigntoolError::Timestamp(_) | SigntoolError::Failed(_) => ErrorCode::SigningFailed,
        }
    }

    /// Whether the same job may succeed when tried again without anyone fixing
    /// anything: the token came back, or the timestamp server answers again.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            SigntoolError::TokenLost(_) | SigntoolError::Timestamp(_)
        )
    }
}

/// What a failed run was, judged from signtool's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    CertificateNotFound,
    KeyContainerNotFound,
    PinPrompt,
    PinRejected,
    PinLocked,
    TokenLost,
    Timestamp,
    Other,
}

/// The HRESULTs signtool reports from a smart-card CSP, by what they mean for Signet.
/// Names and values from the Windows SDK's winerror.h.
const HRESULTS: &[(u32, &str, Failure)] = &[
    (0x8010006B, "SCARD_W_WRONG_CHV", Failure::PinRejected),
    (0x8010006C, "SCARD_W_CHV_BLOCKED", Failure::PinLocked),
    (0x80100069, "SCARD_W_REMOVED_CARD", Failure::TokenLost),
    (0x80100068, "SCARD_W_RESET_CARD", Failure::TokenLost),
    (0x80100066, "SCARD_W_UNRESPONSIVE_CARD", Failure::TokenLost),
    (0x8010000C, "SCARD_E_NO_SMARTCARD", Failure::TokenLost),
    (0x80100017, "SCARD_E_READER_UNAVAILABLE", Failure::TokenLost),
    (0x8010001D, "SCARD_E_NO_SERVICE", Failure::TokenLost),
    (
        0x8010002E,
        "SCARD_E_NO_READERS_AVAILABLE",
        Failure::TokenLost,
    ),
    (0x800704C7, "ERROR_CANCELLED", Failure::PinPrompt),
    (0x8010006E, "SCARD_W_CANCELLED_BY_USER", Failure::PinPrompt),
    (0x80090022, "NTE_SILENT_CONTEXT", Failure::PinPrompt),
    (0x80090016, "NTE_BAD_KEYSET", Failure::KeyContainerNotFound),
];

/// Phrases of signtool's and Windows' messages, lower case, whitespace collapsed.
const PHRASES: &[(&str, Failure)] = &[
    ("wrong pin was presented", Failure::PinRejected),
    ("maximum number of pin entry attempts", Failure::PinLocked),
    ("smart card has been removed", Failure::TokenLost),
    ("smart card was removed", Failure::TokenLost),
    (
        "no smart card is currently in the device",
        Failure::TokenLost,
    ),
    ("keyset does not exist", Failure::KeyContainerNotFound),
    (
        "no certificates were found that met all the given criteria",
        Failure::CertificateNotFound,
    ),
    ("the specified timestamp server", Failure::Timestamp),
    (
        "error occurred while attempting to timestamp",
        Failure::Timestamp,
    ),
    ("signertimestamp", Failure::Timestamp),
];

/// Judges signtool's output: a known HRESULT first (the most precise), then known
/// phrases; anything else is [`Failure::Other`].
pub fn judge(output: &str) -> Failure {
    for code in hresults(output) {
        if let Some((_, _, f)) = HRESULTS.iter().find(|(c, _, _)| *c == code) {
            return *f;
        }
    }
    let text = normalize(output);
    PHRASES
        .iter()
        .find(|(p, _)| text.contains(p))
        .map_or(Failure::Other, |(_, f)| *f)
}

/// Classifies a failed run from its (PIN-free) output and exit code.
pub fn classify(output: &str, code: Option<i32>) -> SigntoolError {
    let mut detail = tail(output);
    for c in hresults(output) {
        if let Some((_, name, _)) = HRESULTS.iter().find(|(h, _, _)| *h == c) {
            detail = format!("{name}: {detail}");
            break;
        }
    }
    if detail.is_empty() {
        detail = format!(
            "exit status {}",
            code.map_or("unknown".to_owned(), |c| c.to_string())
        );
    }
    match judge(output) {
        Failure::CertificateNotFound => SigntoolError::CertificateNotFound(detail),
        Failure::KeyContainerNotFound => SigntoolError::KeyContainerNotFound(detail),
        Failure::PinPrompt => SigntoolError::PinPrompt(detail),
        Failure::PinRejected => SigntoolError::PinRejected(detail),
        Failure::PinLocked => SigntoolError::PinLocked(detail),
        Failure::TokenLost => SigntoolError::TokenLost(detail),
        Failure::Timestamp => SigntoolError::Timestamp(detail),
        Failure::Other => SigntoolError::Failed(detail),
    }
}

/// Every `0x` followed by eight hex digits in `text`, in order.
fn hresults(text: &str) -> impl Iterator<Item = u32> + '_ {
    let bytes = text.as_bytes();
    (0..bytes.len().saturating_sub(9)).filter_map(move |i| {
        let prefix = bytes[i] == b'0' && matches!(bytes[i + 1], b'x' | b'X');
        let digits = bytes.get(i + 2..i + 10)?;
        let bounded = !bytes.get(i + 10).is_some_and(u8::is_ascii_hexdigit);
        if prefix && bounded && digits.iter().all(u8::is_ascii_hexdigit) {
            u32::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
        } else {
            None
        }
    })
}

fn normalize(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase()
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut out = lines.join("; ");
    if out.len() > OUTPUT_TAIL {
        let cut = out.len() - OUTPUT_TAIL;
        let cut = (cut..out.len())
            .find(|&i| out.is_char_boundary(i))
            .unwrap_or(out.len());
        out = format!("…{}", &out[cut..]);
    }
    out
}

/// signtool and the time limit of one job's runs: the Windows backend behind
/// [`Signer`].
#[derive(Debug, Clone)]
pub struct SigntoolBackend {
    pub signtool: Signtool,
    pub timeout: Duration,
}

impl SigntoolBackend {
    /// signtool as `cfg` sets it up. The configuration was checked
    /// ([`crate::config::SignerConfig::check_backend`]): signtool comes with its
    /// container and certificate.
    pub fn from_config(cfg: &Config) -> SigntoolBackend {
        let s = &cfg.signer;
        SigntoolBackend {
            signtool: Signtool {
                program: s.signtool.clone(),
                certificate: s.certificate.clone().unwrap_or_default(),
                csp: s.csp.clone(),
                container: s.container.clone().unwrap_or_default(),
                reader: s.reader.clone(),
            },
            timeout: Duration::from_secs(s.timeout_seconds),
        }
    }
}

/// What the agent serves with signtool: whole files of every format Signet detects
/// (Windows signs PowerShell scripts through its own SIP); no digest mode.
pub fn signtool_features() -> SignerFeatures {
    SignerFeatures {
        version: String::new(),
        modes: vec![SignMode::Whole],
        extract_data: false,
        attach_signature: false,
        powershell: true,
    }
}

impl Signer for SigntoolBackend {
    fn program(&self) -> &Path {
        &self.signtool.program
    }

    fn certificate_file(&self) -> Option<&Path> {
        Some(&self.signtool.certificate)
    }

    fn version(&self) -> BoxFuture<'_, Result<(String, SignerFeatures), SignError>> {
        Box::pin(async move {
            // signtool has no version option; started without a command it prints
            // its usage, which proves it runs.
            tokio::process::Command::new(&self.signtool.program)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|source| {
                    SignError::from(SigntoolError::Spawn {
                        program: self.signtool.program.clone(),
                        source,
                    })
                })?;
            Ok((
                format!("signtool ({})", self.signtool.program.display()),
                signtool_features(),
            ))
        })
    }

    fn refuses(
        &self,
        _features: &SignerFeatures,
        mode: SignMode,
        _format: Option<Format>,
        response: SignResponse,
    ) -> Option<String> {
        if mode == SignMode::Digest {
            return Some(
                "this signing VM signs with signtool, which has no digest mode: send the whole file instead, or sign with osslsigncode 2.8 or later (signer.backend = \"osslsigncode\" in the agent's configuration)".to_owned(),
            );
        }
        if response == SignResponse::Pkcs7 {
            return Some(
                "this signing VM signs with signtool, which cannot answer the signature alone: ask for the signed file instead, or sign with osslsigncode (signer.backend = \"osslsigncode\" in the agent's configuration)".to_owned(),
            );
        }
        None
    }

    /// signtool signs in place: the output starts as a copy of the input. The
    /// timestamp servers are tried in order, each on a fresh copy, until one
    /// timestamps; the whole job stays within the time limit. The key is the
    /// configured container's (`/kc`), not `key`.
    fn sign<'a>(
        &'a self,
        _key: &'a KeyRef,
        pin: &'a AuthPin,
        spec: &'a SignSpec<'a>,
    ) -> BoxFuture<'a, Result<Made, SignError>> {
        Box::pin(async move {
            if spec.format.is_none() {
                return Err(SignError::Failed(
                    "signtool signs whole files only, not digest-mode data".to_owned(),
                ));
            }
            let servers: Vec<Option<&str>> = if spec.timestamp.is_empty() {
                vec![None]
            } else {
                spec.timestamp.iter().map(|u| Some(u.as_str())).collect()
            };
            let deadline = tokio::time::Instant::now() + self.timeout;
            for server in servers {
                tokio::fs::copy(spec.input, spec.output)
                    .await
                    .map_err(|e| {
                        SignError::Failed(format!("cannot copy the input to sign: {e}"))
                    })?;
                let command = self.signtool.command(
                    pin,
                    &SigntoolSpec {
                        file: spec.output,
                        hash: spec.hash,
                        timestamp_url: server,
                        description: spec.description,
                        url: spec.url,
                        page_hashes: spec.page_hashes && spec.format == Some(Format::Pe),
                        append: spec.nested,
                    },
                )?;
                tracing::debug!(command = %command, "running signtool");
                match tokio::time::timeout_at(deadline, command.run()).await {
                    Err(_elapsed) => {
                        let _ = tokio::fs::remove_file(spec.output).await;
                        return Err(SignError::TimedOut(self.timeout));
                    }
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(SigntoolError::Timestamp(detail))) if server.is_some() => {
                        tracing::warn!(server = server.unwrap_or("-"), %detail, "timestamp server failed; trying the next");
                    }
                    Ok(Err(e)) => {
                        let _ = tokio::fs::remove_file(spec.output).await;
                        return Err(e.into());
                    }
                }
            }
            let _ = tokio::fs::remove_file(spec.output).await;
            Err(SignError::Timestamp {
                tried: spec.timestamp.to_vec(),
                why: None,
            })
        }
        .map_ok(|()| Made::default()))
    }

    fn extract_signature<'a>(
        &'a self,
        _signed: &'a Path,
        _out: &'a Path,
    ) -> BoxFuture<'a, Result<(), SignError>> {
        // Refused before signing (`refuses`); this is the backstop.
        Box::pin(async {
            Err(SignError::Failed(
                "signtool cannot answer the signature alone; ask for the signed file".to_owned(),
            ))
        })
    }
}

impl BackendError for SigntoolError {
    fn code(&self) -> ErrorCode {
        SigntoolError::code(self)
    }
}

impl From<SigntoolError> for SignError {
    /// A refused PIN and a lost token become the backend-neutral classes the agent
    /// acts on; the rest keep signtool's words and class.
    fn from(e: SigntoolError) -> SignError {
        match e {
            SigntoolError::PinRejected(_) => SignError::PinRejected,
            SigntoolError::TokenLost(detail) => SignError::TokenLost(detail),
            other => SignError::Backend(BackendFailure(Box::new(other))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "s3cr^t P%N&\"1";

    fn pin() -> AuthPin {
        AuthPin::new(PIN.into())
    }

    fn signtool() -> Signtool {
        Signtool {
            program: PathBuf::from(r"C:\Program Files (x86)\Windows Kits\10\bin\x64\signtool.exe"),
            certificate: PathBuf::from(r"C:\signet\codesign.cer"),
            csp: SAFENET_CSP.to_owned(),
            container: "te-ee307152-4ddb-460e-bbc9-c87e75365a17".to_owned(),
            reader: None,
        }
    }

    fn spec(file: &Path) -> SigntoolSpec<'_> {
        SigntoolSpec {
            file,
            hash: DigestAlgorithm::Sha256,
            timestamp_url: Some("http://timestamp.digicert.com"),
            description: Some("My App"),
            url: Some("https://example.com/app"),
            page_hashes: true,
            append: true,
        }
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter()
            .map(|a| a.into_string().unwrap_or_default())
            .collect()
    }

    #[test]
    fn command_line_has_every_option_in_signtool_order_and_the_pin_in_kc() {
        let file = Path::new(r"C:\spool\job\app.exe");
        let cmd = signtool().command(&pin(), &spec(file)).unwrap();
        assert_eq!(
            strings(cmd.args()),
            vec![
                "sign",
                "/f",
                r"C:\signet\codesign.cer",
                "/csp",
                "eToken Base Cryptographic Provider",
                "/kc",
                &format!("[{{{{{PIN}}}}}]=te-ee307152-4ddb-460e-bbc9-c87e75365a17"),
                "/fd",
                "sha256",
                "/tr",
                "http://timestamp.digicert.com",
                "/td",
                "sha256",
                "/d",
                "My App",
                "/du",
                "https://example.com/app",
                "/ph",
                "/as",
                r"C:\spool\job\app.exe",
            ]
        );
    }

    #[test]
    fn optional_parts_are_left_out_and_the_reader_goes_before_the_pin() {
        let file = Path::new("app.msi");
        let bare = SigntoolSpec {
            file,
            hash: DigestAlgorithm::Sha384,
            timestamp_url: None,
            description: None,
            url: None,
            page_hashes: false,
            append: false,
        };
        let st = Signtool {
            reader: Some("SafeNet Token JC 0".into()),
            ..signtool()
        };
        let args = strings(st.command(&pin(), &bare).unwrap().args());
        assert_eq!(
            &args[6],
            &format!("[SafeNet Token JC 0{{{{{PIN}}}}}]=te-ee307152-4ddb-460e-bbc9-c87e75365a17")
        );
        assert_eq!(&args[7..], ["/fd", "sha384", "app.msi"]);
    }

    #[test]
    fn the_pin_never_shows_in_debug_display_or_redacted() {
        let cmd = signtool()
            .command(&pin(), &spec(Path::new("a.exe")))
            .unwrap();
        for shown in [format!("{cmd}"), format!("{cmd:?}"), cmd.redacted()] {
            assert!(!shown.contains(PIN), "{shown}");
            assert!(!shown.contains("s3cr"), "{shown}");
            assert!(
                shown.contains("/kc [{{***}}]=te-ee307152-4ddb-460e-bbc9-c87e75365a17 /fd"),
                "{shown}"
            );
        }
        assert!(
            cmd.redacted().starts_with(
                r#""C:\Program Files (x86)\Windows Kits\10\bin\x64\signtool.exe" sign /f C:\signet\codesign.cer /csp "eToken Base Cryptographic Provider" /kc"#
            ),
            "{}",
            cmd.redacted()
        );
    }

    #[test]
    fn pins_and_names_the_kc_syntax_cannot_carry_are_refused() {
        let s = spec(Path::new("a.exe"));
        for bad in ["", "12}}34", "1234}", "12\u{0}34"] {
            let e = signtool()
                .command(&AuthPin::new(bad.into()), &s)
                .unwrap_err();
            assert!(matches!(e, SigntoolError::PinUnusable(_)), "{bad:?}: {e}");
            assert!(!e.to_string().contains("34"), "the PIN is not echoed: {e}");
        }
        assert!(signtool()
            .command(&AuthPin::new("12{3}4".into()), &s)
            .is_ok());
        let no_container = Signtool {
            container: String::new(),
            ..signtool()
        };
        assert!(matches!(
            no_container.command(&pin(), &s),
            Err(SigntoolError::Setup(_))
        ));
        let odd_reader = Signtool {
            reader: Some("Reader [1]".into()),
            ..signtool()
        };
        assert!(matches!(
            odd_reader.command(&pin(), &s),
            Err(SigntoolError::Setup(_))
        ));
    }

    /// A recorded output without its `#` comment header (source and circumstances).
    fn recorded(text: &str) -> &str {
        let mut rest = text;
        while let Some(line) = rest.strip_prefix('#') {
            rest = line.split_once('\n').map_or("", |(_, r)| r);
        }
        rest
    }

    macro_rules! data {
        ($name:literal) => {
            recorded(include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/signtool/",
                $name
            )))
        };
    }

    #[test]
    fn recorded_outputs_are_classified_as_what_they_are() {
        let cases: &[(&str, &str, Failure, ErrorCode)] = &[
            (
                "no-certificates.txt",
                data!("no-certificates.txt"),
                Failure::CertificateNotFound,
                ErrorCode::Internal,
            ),
            (
                "no-certificates-verbose.txt",
                data!("no-certificates-verbose.txt"),
                Failure::CertificateNotFound,
                ErrorCode::Internal,
            ),
            (
                "pin-dialog-session0.txt",
                data!("pin-dialog-session0.txt"),
                Failure::PinPrompt,
                ErrorCode::Internal,
            ),
            (
                "wrong-pin.txt",
                data!("wrong-pin.txt"),
                Failure::PinRejected,
                ErrorCode::PinRejected,
            ),
            (
                "wrong-pin-signersignex.txt",
                data!("wrong-pin-signersignex.txt"),
                Failure::PinRejected,
                ErrorCode::PinRejected,
            ),
            (
                "card-removed.txt",
                data!("card-removed.txt"),
                Failure::TokenLost,
                ErrorCode::TokenUnavailable,
            ),
            (
                "no-readers.txt",
                data!("no-readers.txt"),
                Failure::TokenLost,
                ErrorCode::TokenUnavailable,
            ),
            (
                "timestamp-unreachable.txt",
                data!("timestamp-unreachable.txt"),
                Failure::Timestamp,
                ErrorCode::SigningFailed,
            ),
            (
                "other-failure.txt",
                data!("other-failure.txt"),
                Failure::Other,
                ErrorCode::SigningFailed,
            ),
        ];
        for (name, text, failure, code) in cases {
            assert!(!text.starts_with('#') && !text.trim().is_empty(), "{name}");
            assert_eq!(judge(text), *failure, "{name}");
            let e = classify(text, Some(1));
            assert_eq!(e.code(), *code, "{name}: {e}");
            assert_eq!(
                e.retryable(),
                matches!(failure, Failure::TokenLost | Failure::Timestamp),
                "{name}"
            );
        }
    }

    #[test]
    fn messages_name_the_cause_and_the_fix() {
        let e = classify(data!("pin-dialog-session0.txt"), Some(1)).to_string();
        assert!(
            e.contains("ERROR_CANCELLED") && e.contains("0x800704c7"),
            "{e}"
        );
        assert!(e.contains("session 0") && e.contains("single logon"), "{e}");
        assert!(e.contains("/kc \"[{{PIN}}]=container\""), "{e}");

        let e = classify(data!("no-certificates.txt"), Some(1)).to_string();
        assert!(e.contains("SYSTEM") && e.contains("/f"), "{e}");

        let e = classify(data!("wrong-pin.txt"), Some(1)).to_string();
        assert!(
            e.contains("SCARD_W_WRONG_CHV") && e.contains("not try that PIN again"),
            "{e}"
        );

        let e = classify(data!("card-removed.txt"), Some(1)).to_string();
        assert!(
            e.contains("SCARD_W_REMOVED_CARD") && e.contains("RDP"),
            "{e}"
        );

        let e = classify(data!("timestamp-unreachable.txt"), Some(1)).to_string();
        assert!(
            e.contains("not timestamped") && e.contains("RFC 3161"),
            "{e}"
        );

        let e = classify("", Some(1)).to_string();
        assert!(e.ends_with("exit status 1"), "{e}");
    }

    #[test]
    fn hresults_are_found_anywhere_and_only_whole() {
        let found: Vec<u32> =
            hresults("(-2147023673/0x800704c7) and 0X8010006B, not 0x8010006BC or 0x1234")
                .collect();
        assert_eq!(found, vec![0x800704C7, 0x8010006B]);
        assert_eq!(judge("blocked: 0x8010006c"), Failure::PinLocked);
        assert_eq!(
            judge("The card cannot be accessed because the maximum number of PIN entry attempts has been reached."),
            Failure::PinLocked
        );
        assert_eq!(
            judge("Keyset does not exist"),
            Failure::KeyContainerNotFound
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn run_passes_the_pin_to_the_program_and_scrubs_it_from_what_comes_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let argv = dir.path().join("argv");
        let fake = dir.path().join("signtool");
        // A stand-in signtool: records its arguments, echoes them (as a verbose signtool
        // might) and fails the way a wrong PIN does.
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{}'\nprintf 'args: %s\\n' \"$*\"\necho 'Error information: \"Error: SignerSign() failed.\" (-2146434965/0x8010006b)' >&2\necho 'SignTool Error: An unexpected internal error has occurred.' >&2\nexit 1\n",
                argv.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o700)).unwrap();
        let st = Signtool {
            program: fake,
            ..signtool()
        };
        let file = dir.path().join("a.exe");
        let err = st
            .command(&pin(), &spec(&file))
            .unwrap()
            .run()
            .await
            .unwrap_err();
        let seen = std::fs::read_to_string(&argv).unwrap();
        assert!(
            seen.lines()
                .any(|l| l == format!("[{{{{{PIN}}}}}]=te-ee307152-4ddb-460e-bbc9-c87e75365a17")),
            "the PIN reaches signtool intact: {seen}"
        );
        assert!(matches!(err, SigntoolError::PinRejected(_)), "{err}");
        let msg = err.to_string();
        assert!(!msg.contains("s3cr"), "{msg}");
        assert!(
            msg.contains("[{{***}}]"),
            "the echo was scrubbed, not dropped: {msg}"
        );
    }

    #[tokio::test]
    async fn a_missing_signtool_is_a_spawn_error_naming_it() {
        let st = Signtool {
            program: PathBuf::from("/nonexistent/signtool.exe"),
            ..signtool()
        };
        let err = st
            .command(&pin(), &spec(Path::new("a.exe")))
            .unwrap()
            .run()
            .await
            .unwrap_err();
        assert!(matches!(err, SigntoolError::Spawn { .. }), "{err}");
        assert_eq!(err.code(), ErrorCode::Internal);
        assert!(
            err.to_string().contains("/nonexistent/signtool.exe"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod backend_tests {
    use super::*;
    use crate::signer::Osslsigncode;
    use signet_api::wire::{DigestAlgorithm, ErrorCode};

    const MINIMAL: &str = "[token]\nmodule = \"C:/SoftHSM2/lib/softhsm2-x64.dll\"\nlabel = \"t\"\n";

    fn cfg(extra: &str) -> Config {
        toml::from_str(&format!("{MINIMAL}{extra}")).unwrap()
    }

    fn signtool_backend(program: PathBuf) -> SigntoolBackend {
        SigntoolBackend {
            signtool: Signtool {
                program,
                certificate: PathBuf::from("codesign.cer"),
                csp: SAFENET_CSP.to_owned(),
                container: "te-1".to_owned(),
                reader: None,
            },
            timeout: Duration::from_secs(30),
        }
    }

    fn spec<'a>(
        input: &'a Path,
        output: &'a Path,
        format: Option<Format>,
        timestamp: &'a [String],
    ) -> SignSpec<'a> {
        SignSpec {
            input,
            output,
            format,
            hash: DigestAlgorithm::Sha256,
            description: None,
            url: None,
            page_hashes: true,
            nested: false,
            timestamp,
            digested: None,
        }
    }

    #[test]
    fn signtool_refuses_digest_mode_and_the_signature_alone_with_the_fix() {
        let s = signtool_backend(PathBuf::from("signtool.exe"));
        let f = signtool_features();
        assert_eq!(
            s.refuses(
                &f,
                SignMode::Whole,
                Some(Format::PowerShell),
                SignResponse::Complete
            ),
            None
        );
        let digest = s
            .refuses(&f, SignMode::Digest, None, SignResponse::Complete)
            .unwrap();
        assert!(
            digest.contains("no digest mode") && digest.contains("backend = \"osslsigncode\""),
            "{digest}"
        );
        let pkcs7 = s
            .refuses(&f, SignMode::Whole, Some(Format::Pe), SignResponse::Pkcs7)
            .unwrap();
        assert!(pkcs7.contains("signed file instead"), "{pkcs7}");
        // osslsigncode goes by what its version can do, as before.
        let o = Osslsigncode::from_config(&cfg(""));
        let old = SignerFeatures {
            version: "2.5".into(),
            modes: vec![SignMode::Whole],
            ..signtool_features()
        };
        assert!(o
            .refuses(&old, SignMode::Digest, None, SignResponse::Complete)
            .is_some_and(|w| w.contains("osslsigncode 2.5")));
        assert_eq!(
            o.refuses(&old, SignMode::Whole, Some(Format::Pe), SignResponse::Pkcs7),
            None
        );
    }

    #[test]
    fn signtool_failures_map_to_the_classes_the_agent_acts_on() {
        let e: SignError = SigntoolError::PinRejected("SCARD_W_WRONG_CHV".into()).into();
        assert!(matches!(e, SignError::PinRejected), "{e:?}");
        let e: SignError = SigntoolError::TokenLost("SCARD_W_REMOVED_CARD".into()).into();
        assert!(matches!(&e, SignError::TokenLost(d) if d == "SCARD_W_REMOVED_CARD"));
        let e: SignError = SigntoolError::PinLocked("SCARD_W_CHV_BLOCKED".into()).into();
        assert_eq!(e.code(), ErrorCode::PinLocked);
        assert!(e.to_string().contains("blocked"), "{e}");
        let e: SignError = SigntoolError::Spawn {
            program: "signtool.exe".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }
        .into();
        assert_eq!(e.code(), ErrorCode::Internal);
        assert!(
            e.to_string().contains("signtool") && !e.to_string().contains("osslsigncode"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_missing_signtool_stops_the_agent_at_start_naming_it() {
        let s = signtool_backend(PathBuf::from("/nonexistent/signtool.exe"));
        let e = s.version().await.unwrap_err();
        assert!(e.to_string().contains("/nonexistent/signtool.exe"), "{e}");
        assert!(e.to_string().contains("Windows SDK"), "{e}");
        let cause = std::error::Error::source(&e).map(|c| c.to_string());
        assert!(
            cause.is_some(),
            "the spawn error is kept as the cause: {e:?}"
        );
    }

    /// A stand-in signtool: records each run's arguments, fails the way a dead
    /// timestamp server does for `http://dead`, the way a wrong PIN does for `/d
    /// wrongpin`, and otherwise "signs" by appending to the file (its last argument).
    #[cfg(unix)]
    fn fake_signtool(dir: &Path) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let log = dir.join("runs");
        let fake = dir.join("signtool");
        std::fs::write(
            &fake,
            format!(
                r#"#!/bin/sh
echo "$*" >> '{log}'
for last; do :; done
case "$*" in
  *http://dead*) echo 'SignTool Error: The specified timestamp server either could not be reached or returned an invalid response.' >&2; exit 1 ;;
  *"/d wrongpin"*) echo 'Error information: "Error: SignerSign() failed." (-2146434965/0x8010006b)' >&2; exit 1 ;;
esac
printf signed >> "$last"
"#,
                log = log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o700)).unwrap();
        (fake, log)
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn signtool_signs_a_copy_trying_the_timestamp_servers_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (fake, log) = fake_signtool(dir.path());
        let backend = signtool_backend(fake);
        let input = dir.path().join("in.exe");
        let output = dir.path().join("out.exe");
        std::fs::write(&input, "MZ").unwrap();
        let servers = ["http://dead".to_owned(), "http://ts.example".to_owned()];
        let key = KeyRef {
            token_label: "t".into(),
            token_serial: "1".into(),
            id: vec![1],
            label: "k".into(),
            cert_on_token: false,
        };
        let pin = AuthPin::new("123456".into());
        backend
            .sign(
                &key,
                &pin,
                &spec(&input, &output, Some(Format::Pe), &servers),
            )
            .await
            .unwrap();
        assert_eq!(std::fs::read_to_string(&output).unwrap(), "MZsigned");
        assert_eq!(
            std::fs::read_to_string(&input).unwrap(),
            "MZ",
            "input untouched"
        );
        let runs = std::fs::read_to_string(&log).unwrap();
        let runs: Vec<&str> = runs.lines().collect();
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert!(runs[0].contains("/tr http://dead") && runs[1].contains("/tr http://ts.example"));
        assert!(runs[1].contains("/ph") && runs[1].contains("[{{123456}}]=te-1"));

        // Every server failing is Signet's timestamp failure, nothing left behind.
        let dead = ["http://dead".to_owned()];
        let e = backend
            .sign(&key, &pin, &spec(&input, &output, Some(Format::Msi), &dead))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SignError::Timestamp { tried, .. } if tried == &dead),
            "{e:?}"
        );
        assert!(!output.exists());

        // A refused PIN is the agent's PinRejected, whatever the backend.
        let mut wrong = spec(&input, &output, Some(Format::Pe), &[]);
        wrong.description = Some("wrongpin");
        let e = backend.sign(&key, &pin, &wrong).await.unwrap_err();
        assert!(matches!(e, SignError::PinRejected), "{e:?}");

        // Digest-mode data never reaches signtool.
        let e = backend
            .sign(&key, &pin, &spec(&input, &output, None, &[]))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("whole files only"), "{e}");
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 4);
    }
}
