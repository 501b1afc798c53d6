//! The JSON and query-string types on the wire, and the stable error codes.
//!
//! Client API (served by `signetd`):
//! - `POST /v1/sign?profile=&filename=&description=&url=` — body: the file; answer:
//!   the signed file, or an [`ErrorBody`].
//! - `GET /v1/status` — [`DaemonStatus`].
//! - `GET /v1/tokens` — [`TokensReport`].
//!
//! Agent API (served by `signet-agent`, called by `signetd` only):
//! - `POST /agent/v1/sign?profile=&filename=&description=&url=&hash=&page_hashes=&nested=&timestamp=&formats=`
//!   — body: the file ([`AgentSignQuery`]).
//! - `GET /agent/v1/health` — [`AgentHealth`].
//! - `POST /agent/v1/login` — body [`AgentLogin`]; answer [`AgentHealth`].
//! - `GET /agent/v1/events` — server-sent events, each an [`AgentEvent`].
//!
//! Every error answer is an [`ErrorBody`] whose `code` is stable across versions and
//! decides the HTTP status ([`ErrorCode::http_status`]) and the client's exit code
//! ([`ErrorCode::exit_code`]); `message` is for people and says what to do.

use serde::{Deserialize, Serialize};

pub mod patch;
mod tokens;
pub use tokens::*;

/// Client → daemon path of the signing call.
pub const SIGN_PATH: &str = "/v1/sign";
/// Client → daemon path of the status call.
pub const STATUS_PATH: &str = "/v1/status";
/// Client → daemon path of a profile's signing options (`?profile=NAME`; none: the
/// default profile), which digest mode applies on the client's side.
pub const PROFILE_PATH: &str = "/v1/profile";
/// Daemon → agent path of the signing call.
pub const AGENT_SIGN_PATH: &str = "/agent/v1/sign";
/// Client → daemon path of one job (`GET`: its state; `DELETE`: cancel), with `{id}`.
pub const JOB_PATH: &str = "/v1/jobs/{id}";
/// Client → daemon path of a finished job's result, with `{id}`.
pub const JOB_RESULT_PATH: &str = "/v1/jobs/{id}/result";
/// Request header: a key the client picks per file; a retried request with the same
/// key (from the same caller) gets the same job, never a second signature.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// Response header: the job's id.
pub const JOB_HEADER: &str = "x-signet-job";
/// Daemon → agent request header of a signing request: the SHA-256 (hex) of the input
/// as the daemon spooled it, beside [`JOB_HEADER`]. The agent keys its kept results on
/// it instead of hashing the input a second time; without it the agent hashes the input.
/// Also a response header of a job's result answered as a patch ([`patch`]): the SHA-256
/// of the input the patch changes, which the client checks against the bytes it sent.
pub const INPUT_SHA256_HEADER: &str = "x-signet-input-sha256";
/// Daemon → agent request header of a signing request sent before the daemon has
/// hashed its input: the input's length (the body is chunked, so that
/// [`INPUT_SHA256_HEADER`] can follow it as a trailer, named in `Trailer`). The agent
/// holds the body to exactly this length.
pub const INPUT_LENGTH_HEADER: &str = "x-signet-input-length";
/// Response header of a job's result that comes before its end (asked for with
/// [`EARLY_RESULT`]): the result's length in bytes, sent when signetd has the result whole
/// in memory as it answers. The body is chunked and its end still comes only once the job
/// is `signed`: a client may write (and flush) the result once it has this many bytes, and
/// keeps it only once the end comes.
pub const RESULT_LENGTH_HEADER: &str = "x-signet-result-length";
/// The preference (`Prefer: early-result`, RFC 7240) of a `POST /v1/sign` answered with
/// its result or of a `GET /v1/jobs/{id}/result`: the result's bytes as soon as signetd has
/// them, its end withheld until the job is `signed`, a small one with
/// [`RESULT_LENGTH_HEADER`]. Over HTTP/1.1 only.
pub const EARLY_RESULT: &str = "early-result";

/// Whether a request's `Prefer` headers name the preference `token` (RFC 7240: a
/// comma-separated list, each preference possibly with `=value` and parameters).
#[cfg(feature = "axum")]
pub fn prefers(headers: &http::HeaderMap, token: &str) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| {
            let name = p.split([';', '=']).next().unwrap_or("").trim();
            name.eq_ignore_ascii_case(token)
        })
}
/// Response header of `GET /v1/profile` and of a job's result: the SHA-256 (hex) of the
/// profile's `GET /v1/profile` answer body as it is now. Also a request header of a
/// signing request, a precondition as HTTP's `If-Match` is one: the SHA-256 of the
/// answer the data was made with; when the profile's answer is another one now, the
/// request is refused at intake (`profile_changed`, 412) and nothing is signed.
pub const PROFILE_HEADER: &str = "x-signet-profile";
/// Client → daemon path of the batch call (many files, one request).
pub const BATCH_PATH: &str = "/v1/batch";
/// Daemon → agent path of the batch call.
pub const AGENT_BATCH_PATH: &str = "/agent/v1/batch";
/// Daemon → agent path of the health call.
pub const AGENT_HEALTH_PATH: &str = "/agent/v1/health";
/// Daemon → agent path that hands the agent the token's PIN.
pub const AGENT_LOGIN_PATH: &str = "/agent/v1/login";
/// Daemon → agent path that makes the agent finalise and re-initialise its PKCS#11
/// module now (the first step of the recovery ladder); answers the health after.
pub const AGENT_REINIT_PATH: &str = "/agent/v1/reinit";
/// Daemon → agent path of the event stream (server-sent events).
pub const AGENT_EVENTS_PATH: &str = "/agent/v1/events";
/// `POST`: the host's pairing proof (`link::PairRequest`), the agent's in the answer
/// (`link::PairAnswer`); taken only while `signet-agent pair` holds a window open.
pub const AGENT_PAIR_PATH: &str = "/agent/v1/pair";

/// Exit codes of `signet`, one per outcome a build script acts on differently.
pub mod exit {
    /// The file was signed.
    pub const SIGNED: i32 = 0;
    /// The command line was wrong.
    pub const USAGE: i32 = 2;
    /// The appliance refused: unknown profile or caller not permitted.
    pub const REFUSED: i32 = 3;
    /// The input file cannot be signed: missing, empty, not a supported format.
    pub const BAD_INPUT: i32 = 4;
    /// The signer tried and failed on this file.
    pub const SIGNING_FAILED: i32 = 5;
    /// The appliance cannot sign now: daemon, agent or token unavailable, PIN problem.
    pub const UNAVAILABLE: i32 = 6;
}

/// What the request body is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignMode {
    /// The whole file; the answer is the signed file.
    #[default]
    Whole,
    /// Only the file's Authenticode data (`osslsigncode extract-data`, a few hundred
    /// bytes); the answer is the PKCS#7 signature to attach (`attach-signature`).
    Digest,
}

impl SignMode {
    fn is_whole(&self) -> bool {
        *self == SignMode::Whole
    }
}

/// What a whole-file job answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignResponse {
    /// The signed file.
    #[default]
    Complete,
    /// Only the file's new PKCS#7 signature (DER), as `osslsigncode extract-signature`
    /// takes it from the signed file.
    Pkcs7,
}

impl SignResponse {
    fn is_complete(&self) -> bool {
        *self == SignResponse::Complete
    }
}

/// Query of `GET /v1/profile`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileQuery {
    /// The profile; absent: the daemon's default profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

/// Answer of `GET /v1/profile`: how the profile signs, as far as the client takes part
/// in it. Digest mode extracts the file's data with `hash` and `page_hashes` and
/// attaches the signature with `nested`, so that it signs as the whole file would be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileOptions {
    /// The profile's name (the default profile's, when none was asked for).
    pub name: String,
    pub hash: DigestAlgorithm,
    /// Page hashes in PE signatures.
    #[serde(default)]
    pub page_hashes: bool,
    /// Keep a signature the file has and add this one beside it.
    #[serde(default)]
    pub nested: bool,
    /// The formats the profile signs; empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub formats: Vec<Format>,
    /// The RFC 3161 timestamp servers the profile's signatures are timestamped by, in
    /// order (empty: no timestamp); absent from daemons that do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<Vec<String>>,
    /// The SHA-256 fingerprint of the only certificate the profile signs with, as
    /// configured (colons optional); absent: the token's certificate, whichever it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

/// Query of `POST /v1/sign`. An unknown parameter (a typo such as `profil=`) is an
/// error, never ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignQuery {
    /// Signing profile; the daemon's default profile when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// The file's name, for the audit log and the signature's description default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// Description put into the signature (`-n`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// URL put into the signature (`-i`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Whole file (default) or digest mode.
    #[serde(default, skip_serializing_if = "SignMode::is_whole")]
    pub mode: SignMode,
    /// The signed file (default) or only its signature.
    #[serde(default, skip_serializing_if = "SignResponse::is_complete")]
    pub response: SignResponse,
}

/// Message digest used for the signature.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DigestAlgorithm {
    #[default]
    Sha256,
    Sha384,
    Sha512,
}

impl DigestAlgorithm {
    /// The name osslsigncode and signtool use.
    pub fn as_str(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "sha256",
            DigestAlgorithm::Sha384 => "sha384",
            DigestAlgorithm::Sha512 => "sha512",
        }
    }
}

/// The most RFC 3161 timestamp servers one profile may list.
pub const MAX_TIMESTAMP_SERVERS: usize = 8;

/// Query of `POST /agent/v1/sign`: the profile already resolved by the daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSignQuery {
    /// The profile's name, for messages and the agent's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// The file's bare name; it tells PowerShell scripts apart (see the `signet-format` crate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default)]
    pub hash: DigestAlgorithm,
    #[serde(default, skip_serializing_if = "SignMode::is_whole")]
    pub mode: SignMode,
    #[serde(default, skip_serializing_if = "SignResponse::is_complete")]
    pub response: SignResponse,
    /// Add page hashes (PE files only; other formats are signed without).
    #[serde(default, skip_serializing_if = "is_false")]
    pub page_hashes: bool,
    /// Keep a signature the file already has and add this one beside it, instead of
    /// replacing it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub nested: bool,
    /// RFC 3161 timestamp servers, tried in this order until one answers; none: no
    /// timestamp. On the wire: the URLs separated by spaces.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "space_separated"
    )]
    pub timestamp: Vec<String>,
    /// The formats the profile signs; empty: all. On the wire: names separated by
    /// commas (`pe,msi`).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "comma_separated"
    )]
    pub formats: Vec<Format>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A URL usable as an RFC 3161 timestamp server: `http://` or `https://`, a host,
/// no whitespace. Returns what is wrong with it.
pub fn check_timestamp_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{url:?} names no host"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{url:?} contains whitespace"));
    }
    Ok(())
}

/// `Vec<String>` as one space-separated string (URLs hold no spaces).
mod space_separated {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.join(" "))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        let s = String::deserialize(d)?;
        Ok(s.split_whitespace().map(str::to_owned).collect())
    }
}

/// `Vec<Format>` as one comma-separated string of format names.
mod comma_separated {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Format;

    pub fn serialize<S: Serializer>(v: &[Format], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.iter().map(|f| f.name()).collect::<Vec<_>>().join(","))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Format>, D::Error> {
        let s = String::deserialize(d)?;
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| p.parse().map_err(serde::de::Error::custom))
            .collect()
    }
}

/// A format Signet signs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Windows Portable Executable: EXE, DLL, SYS, OCX...
    Pe,
    /// Windows Installer package or patch (MSI, MSM, MSP).
    Msi,
    /// Cabinet archive.
    Cab,
    /// Security catalog.
    Cat,
    /// PowerShell script, module, manifest or XML file.
    PowerShell,
    /// APPX/MSIX package or bundle (.appx, .msix, .appxbundle, .msixbundle).
    Appx,
}

impl Format {
    /// Every format, in the order they are listed to people.
    pub const ALL: [Format; 6] = [
        Format::Pe,
        Format::Msi,
        Format::Cab,
        Format::Cat,
        Format::PowerShell,
        Format::Appx,
    ];

    /// The name used in configuration files and on the wire (`pe`, `msi`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Format::Pe => "pe",
            Format::Msi => "msi",
            Format::Cab => "cab",
            Format::Cat => "cat",
            Format::PowerShell => "powershell",
            Format::Appx => "appx",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Pe => "PE (EXE/DLL/SYS)",
            Format::Msi => "MSI (Windows Installer package or patch)",
            Format::Cab => "CAB (cabinet archive)",
            Format::Cat => "CAT (security catalog)",
            Format::PowerShell => "PowerShell script",
            Format::Appx => "APPX/MSIX (package or bundle)",
        })
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                format!(
                    "unknown format {s:?}; the formats are {}",
                    Format::ALL.map(Format::name).join(", ")
                )
            })
    }
}

/// Stable machine-readable error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request itself is malformed (query, method, headers).
    BadRequest,
    /// The named profile does not exist.
    UnknownProfile,
    /// The caller may not use this profile.
    Forbidden,
    /// The input is empty.
    EmptyInput,
    /// The input is not a format Signet signs.
    UnsupportedFormat,
    /// The input is in a format Signet signs, but damaged or cut short: its headers
    /// point past its end or contradict themselves.
    BadInput,
    /// The input is larger than allowed.
    InputTooLarge,
    /// The upload ended before the announced length, or stalled.
    TruncatedInput,
    /// The caller already has as many jobs running as it may; retry when one ends.
    TooManyJobs,
    /// The signer ran and failed on this input.
    SigningFailed,
    /// The token refused the configured PIN; it will not be tried again.
    PinRejected,
    /// The agent has no PIN yet: none was sent by the host and no PIN file is set.
    PinNeeded,
    /// The token is locked or one wrong PIN away from locking; Signet will not log in.
    PinLocked,
    /// The token is not present or was lost.
    TokenUnavailable,
    /// The signing agent cannot be reached.
    AgentUnavailable,
    /// A fault inside Signet; the message says where to look.
    Internal,
    /// The daemon's spool has no room for the upload now; try again later.
    SpoolFull,
    /// No job with this id (or not the caller's).
    UnknownJob,
    /// The job's result was kept for the configured time and is gone.
    ResultExpired,
    /// The job was cancelled before it was signed.
    Cancelled,
    /// The host is shutting down or rebooting; the daemon takes jobs again after it.
    ShuttingDown,
    /// No token with this serial is plugged in or configured.
    UnknownToken,
    /// The `Idempotency-Key` was used before for a different request (another file,
    /// profile or options); a key names one request.
    IdempotencyKeyReused,
    /// Too many wrong client secrets came from this address; the next is not checked
    /// before `Retry-After` seconds.
    TooManyAttempts,
    /// The request's `x-signet-profile` is not the profile's answer as it is now: the
    /// profile changed since the client asked how it signs. Nothing was signed; ask
    /// again (`GET /v1/profile`) and make the data as it says.
    ProfileChanged,
}

impl ErrorCode {
    /// The HTTP status that carries this error.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Forbidden => 403,
            ErrorCode::UnknownProfile => 404,
            ErrorCode::InputTooLarge => 413,
            ErrorCode::UnsupportedFormat => 415,
            ErrorCode::EmptyInput
            | ErrorCode::TruncatedInput
            | ErrorCode::BadInput
            | ErrorCode::IdempotencyKeyReused => 422,
            ErrorCode::TooManyJobs | ErrorCode::TooManyAttempts => 429,
            ErrorCode::SigningFailed | ErrorCode::Internal => 500,
            ErrorCode::AgentUnavailable => 502,
            ErrorCode::PinRejected
            | ErrorCode::PinNeeded
            | ErrorCode::PinLocked
            | ErrorCode::TokenUnavailable => 503,
            ErrorCode::SpoolFull => 507,
            ErrorCode::ShuttingDown => 503,
            ErrorCode::UnknownJob => 404,
            ErrorCode::ResultExpired => 410,
            ErrorCode::Cancelled => 409,
            ErrorCode::UnknownToken => 404,
            ErrorCode::ProfileChanged => 412,
        }
    }

    /// The exit code `signet` ends with for this error.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorCode::BadRequest => exit::USAGE,
            ErrorCode::UnknownProfile | ErrorCode::Forbidden => exit::REFUSED,
            ErrorCode::EmptyInput
            | ErrorCode::UnsupportedFormat
            | ErrorCode::BadInput
            | ErrorCode::InputTooLarge
            | ErrorCode::TruncatedInput => exit::BAD_INPUT,
            ErrorCode::SigningFailed | ErrorCode::Internal => exit::SIGNING_FAILED,
            ErrorCode::PinRejected
            | ErrorCode::PinNeeded
            | ErrorCode::PinLocked
            | ErrorCode::TokenUnavailable
            | ErrorCode::AgentUnavailable
            | ErrorCode::TooManyJobs
            | ErrorCode::TooManyAttempts
            | ErrorCode::SpoolFull
            | ErrorCode::ShuttingDown => exit::UNAVAILABLE,
            ErrorCode::UnknownJob
            | ErrorCode::ResultExpired
            | ErrorCode::Cancelled
            | ErrorCode::UnknownToken
            | ErrorCode::IdempotencyKeyReused
            | ErrorCode::ProfileChanged => exit::REFUSED,
        }
    }

    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownProfile => "unknown_profile",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::EmptyInput => "empty_input",
            ErrorCode::UnsupportedFormat => "unsupported_format",
            ErrorCode::BadInput => "bad_input",
            ErrorCode::InputTooLarge => "input_too_large",
            ErrorCode::TruncatedInput => "truncated_input",
            ErrorCode::TooManyJobs => "too_many_jobs",
            ErrorCode::SigningFailed => "signing_failed",
            ErrorCode::PinRejected => "pin_rejected",
            ErrorCode::PinNeeded => "pin_needed",
            ErrorCode::PinLocked => "pin_locked",
            ErrorCode::TokenUnavailable => "token_unavailable",
            ErrorCode::AgentUnavailable => "agent_unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::SpoolFull => "spool_full",
            ErrorCode::UnknownJob => "unknown_job",
            ErrorCode::ResultExpired => "result_expired",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::UnknownToken => "unknown_token",
            ErrorCode::IdempotencyKeyReused => "idempotency_key_reused",
            ErrorCode::TooManyAttempts => "too_many_attempts",
            ErrorCode::ProfileChanged => "profile_changed",
        }
    }

    /// Every code, for tests and documentation.
    pub const ALL: [ErrorCode; 25] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownProfile,
        ErrorCode::Forbidden,
        ErrorCode::EmptyInput,
        ErrorCode::UnsupportedFormat,
        ErrorCode::BadInput,
        ErrorCode::InputTooLarge,
        ErrorCode::TruncatedInput,
        ErrorCode::TooManyJobs,
        ErrorCode::SigningFailed,
        ErrorCode::PinRejected,
        ErrorCode::PinNeeded,
        ErrorCode::PinLocked,
        ErrorCode::TokenUnavailable,
        ErrorCode::AgentUnavailable,
        ErrorCode::Internal,
        ErrorCode::SpoolFull,
        ErrorCode::UnknownJob,
        ErrorCode::ResultExpired,
        ErrorCode::Cancelled,
        ErrorCode::ShuttingDown,
        ErrorCode::UnknownToken,
        ErrorCode::IdempotencyKeyReused,
        ErrorCode::TooManyAttempts,
        ErrorCode::ProfileChanged,
    ];
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// Nothing was signed and the same request may succeed later unchanged (e.g. the
    /// token was lost mid-job and is being recovered). Absent means false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retryable: bool,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
            retryable: false,
        }
    }

    /// Marks the error as retryable: nothing was signed, try again later.
    pub fn retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ErrorBody {}

/// The servers' error answer: the code's HTTP status and the body as JSON (feature
/// `axum`, which the servers' crates turn on; the CLIs do without).
#[cfg(feature = "axum")]
impl axum_core::response::IntoResponse for ErrorBody {
    fn into_response(self) -> axum_core::response::Response {
        use http::header::{HeaderValue, CONTENT_TYPE};
        let status = http::StatusCode::from_u16(self.code.http_status())
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        match serde_json::to_vec(&self) {
            Ok(body) => (
                status,
                [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
                body,
            )
                .into_response(),
            Err(e) => (http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        }
    }
}

/// What the agent's token and session look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Logged in to the token; jobs are signed.
    Ready,
    /// No token matching the configuration is present.
    TokenMissing,
    /// The token was in use and vanished; the agent re-initialises the module and logs
    /// in again by itself when it returns.
    TokenLost,
    /// The token is present but the agent has no PIN: the host sends it with
    /// `POST /agent/v1/login`, or `token.pin_file` names a file.
    PinNeeded,
    /// The token refused the configured PIN; no further login is tried with it.
    PinRejected,
    /// The token is locked or on its final PIN try; no login is tried.
    PinLocked,
    /// The PKCS#11 module could not be loaded or initialised.
    ModuleError,
}

/// A token as the agent sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSummary {
    pub label: String,
    pub serial: String,
    pub model: String,
    pub manufacturer: String,
    /// Firmware version, e.g. "2.6".
    #[serde(default)]
    pub firmware: String,
}

/// The token's user-PIN counter flags (`CKF_USER_PIN_*`), as it reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinFlags {
    /// `CKF_USER_PIN_COUNT_LOW`: a wrong PIN was entered since the last good login.
    pub count_low: bool,
    /// `CKF_USER_PIN_FINAL_TRY`: one more wrong PIN locks the token.
    pub final_try: bool,
    /// `CKF_USER_PIN_LOCKED`.
    pub locked: bool,
    /// `CKF_USER_PIN_TO_BE_CHANGED`.
    pub to_be_changed: bool,
}

/// A certificate stored on the token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateSummary {
    /// `CKA_LABEL`.
    pub label: String,
    /// `CKA_ID`, hex.
    pub id: String,
    /// Subject, RFC 4514 style ("CN=..., O=...").
    pub subject: String,
    pub issuer: String,
    /// SHA-256 of the DER encoding, lowercase hex.
    pub sha256: String,
    /// SHA-1 of the DER encoding (the "thumbprint" Windows shows and signtool's `/sha1`
    /// takes), lowercase hex; empty from agents that do not say.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha1: String,
    /// notBefore, RFC 3339.
    pub not_before: String,
    /// notAfter, RFC 3339.
    pub not_after: String,
    /// Whole days from now until notAfter (negative once expired).
    pub days_left: i64,
}

/// `GET /agent/v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHealth {
    pub version: String,
    /// Names this agent process (new at every start): the host tells a restarted
    /// agent, or a reset signing VM, from a silent one by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub state: AgentState,
    /// What the state means and, when it is not `ready`, what to do.
    pub detail: String,
    /// Path of the PKCS#11 module.
    pub module: String,
    /// The module is loaded and initialised.
    #[serde(default)]
    pub module_loaded: bool,
    /// The PKCS#11 slot the token was last seen in (informational: tokens are selected
    /// by label and serial, never by slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u64>,
    /// The configured token is present now.
    #[serde(default)]
    pub token_present: bool,
    /// The token, as last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenSummary>,
    /// The agent's session is logged in.
    #[serde(default)]
    pub logged_in: bool,
    /// The PIN counter flags, read now (absent when the token is not present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<PinFlags>,
    /// Certificates on the token (public objects: read without logging in).
    #[serde(default)]
    pub certificates: Vec<CertificateSummary>,
    /// The signing backend, e.g. "osslsigncode 2.9".
    pub signer: String,
    /// What that backend can do, detected at the agent's start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer_features: Option<SignerFeatures>,
    /// On a Windows signing VM: Remote Desktop and smart-card redirection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<WindowsSessions>,
}

/// The osslsigncode each mode needs, stated once; README.md's "osslsigncode
/// versions" says the same (a test holds the two together), and every message that
/// names a version takes it from here.
pub mod osslsigncode {
    /// `(major, minor)`.
    pub type Version = (u32, u32);

    /// Whole files (PE, MSI, CAB, CAT) in the signing VM: a PKCS#11 module, the PIN
    /// from `-readpass /dev/stdin`, `-nest`, several `-ts`. Debian 12's osslsigncode.
    pub const WHOLE_FILE: Version = (2, 5);
    /// PowerShell scripts in the signing VM: 2.8 added signing them.
    pub const POWERSHELL: Version = (2, 8);
    /// APPX/MSIX packages and bundles in the signing VM: 2.7 added signing them.
    pub const APPX: Version = (2, 7);
    /// Digest mode: `extract-data` in the build VM (2.8 added it, and `sign` of its
    /// blob, which the signing VM then runs), `attach-signature` there too.
    pub const DIGEST: Version = (2, 8);

    /// `2.8`.
    pub fn shown(v: Version) -> String {
        format!("{}.{}", v.0, v.1)
    }
}

/// What the signing VM's osslsigncode can do, detected when the agent starts
/// (`osslsigncode --version` and `--help`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignerFeatures {
    /// `MAJOR.MINOR`, e.g. "2.9"; empty when the version could not be read.
    pub version: String,
    /// The modes the agent serves with it: `whole` always, `digest` when osslsigncode
    /// signs the data blob of `extract-data` ([`osslsigncode::DIGEST`]).
    pub modes: Vec<SignMode>,
    /// It has `extract-data` (make a digest-mode blob).
    pub extract_data: bool,
    /// It has `attach-signature` (put a detached signature into a file).
    pub attach_signature: bool,
    /// It signs PowerShell files ([`osslsigncode::POWERSHELL`]).
    pub powershell: bool,
}

/// Remote Desktop on a Windows signing VM. When someone connects with Remote Desktop
/// and smart-card redirection is allowed, Windows gives the session the client's smart
/// cards and hides the VM's own token from the agent: the token "vanishes".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowsSessions {
    /// A Remote Desktop session is connected now.
    pub remote_desktop_active: bool,
    /// The policy `fEnableSmartCard` = 0 (Group Policy "Do not allow smart card device
    /// redirection") is set; `None` when it could not be read.
    pub smart_card_redirection_disabled: Option<bool>,
}

/// The registry key of the Remote Desktop policies.
pub const TERMINAL_SERVICES_POLICY_KEY: &str =
    r"HKLM\SOFTWARE\Policies\Microsoft\Windows NT\Terminal Services";

impl WindowsSessions {
    /// What is wrong, and the fix; `None` when the token is safe from Remote Desktop.
    pub fn problem(&self) -> Option<(String, String)> {
        if self.smart_card_redirection_disabled == Some(true) {
            return None;
        }
        let fix = format!(
            "in the signing VM, turn smart-card redirection off: Group Policy \"Do not allow smart card device redirection\" = Enabled, or `reg add \"{TERMINAL_SERVICES_POLICY_KEY}\" /v fEnableSmartCard /t REG_DWORD /d 0 /f`, then `gpupdate /force`; until then, do not use Remote Desktop on it"
        );
        let why = if self.remote_desktop_active {
            "a Remote Desktop session is connected and smart-card redirection is allowed: Windows hides the token from the signing agent now"
        } else {
            "smart-card redirection is allowed: the token will vanish from the signing agent whenever someone connects with Remote Desktop"
        };
        Some((why.to_owned(), fix))
    }
}

/// Body of `POST /agent/v1/login`: the token's user PIN. Its `Debug` shows no secret.
#[derive(Debug, Serialize, Deserialize)]
pub struct AgentLogin {
    #[serde(serialize_with = "expose_pin", deserialize_with = "secret_pin")]
    pub pin: secrecy::SecretString,
}

fn expose_pin<S: serde::Serializer>(pin: &secrecy::SecretString, s: S) -> Result<S::Ok, S::Error> {
    use secrecy::ExposeSecret;
    s.serialize_str(pin.expose_secret())
}

fn secret_pin<'de, D: serde::Deserializer<'de>>(d: D) -> Result<secrecy::SecretString, D::Error> {
    let plain = zeroize::Zeroizing::new(String::deserialize(d)?);
    Ok(secrecy::SecretString::from(plain.as_str()))
}

/// One event of `GET /agent/v1/events`: `{"seq", "time", "type", "details"}`.
/// The SSE `event:` field carries the type too, and `id:` the sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEvent {
    /// Increases by one per event since the agent started; a gap means missed events.
    pub seq: u64,
    /// RFC 3339, UTC.
    pub time: String,
    #[serde(flatten)]
    pub kind: AgentEventKind,
}

/// What happened. Details never carry a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "details", rename_all = "snake_case")]
pub enum AgentEventKind {
    /// The configured token was found (at start, or after it was lost).
    TokenAppeared { label: String, serial: String },
    /// The token vanished; the agent recovers by itself.
    TokenLost { serial: String, detail: String },
    /// The agent's session logged in to the token.
    LoggedIn { label: String, serial: String },
    /// A PIN problem: refused, locked, final try, or no PIN at all.
    PinProblem { state: AgentState, detail: String },
    /// A job reached the signer.
    SigningStarted {
        job: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filename: Option<String>,
    },
    /// A job ended; `code` is set when it failed.
    SigningFinished {
        job: u64,
        ok: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<ErrorCode>,
        #[serde(default)]
        retryable: bool,
        ms: u64,
    },
}

impl AgentEventKind {
    /// The `type` name, also the SSE `event:` field.
    pub fn name(&self) -> &'static str {
        match self {
            AgentEventKind::TokenAppeared { .. } => "token_appeared",
            AgentEventKind::TokenLost { .. } => "token_lost",
            AgentEventKind::LoggedIn { .. } => "logged_in",
            AgentEventKind::PinProblem { .. } => "pin_problem",
            AgentEventKind::SigningStarted { .. } => "signing_started",
            AgentEventKind::SigningFinished { .. } => "signing_finished",
        }
    }
}

/// The agent as the daemon sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reachable")]
pub enum AgentReport {
    #[serde(rename = "yes")]
    Reachable {
        endpoint: String,
        health: Box<AgentHealth>,
    },
    #[serde(rename = "no")]
    Unreachable { endpoint: String, error: ErrorBody },
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub version: String,
    /// True when a job sent now would be signed.
    pub signing_works: bool,
    pub default_profile: Option<String>,
    pub profiles: Vec<String>,
    pub agent: AgentReport,
    /// The job queue (absent from daemons before the queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,
    /// The newest entries of the recovery timeline, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recovery: Vec<TimelineEntry>,
    /// The host's tokens and where each one is (absent from daemons before the token
    /// service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokensReport>,
    /// What is wrong with the appliance itself — its state database, its audit log —
    /// each with the fix (empty when nothing is).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<String>,
}

/// One entry of the recovery timeline: what was seen or done about the agent and the
/// token, and for a return how long signing was unavailable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// RFC 3339, UTC.
    pub time: String,
    /// `agent_unreachable`, `agent_back`, `token_lost`, `token_back`, `logged_in`,
    /// `pin_delivered`, `pin_rejected`, `first_job_signed`, `shutdown_drain`,
    /// `shutdown_released`.
    pub event: String,
    pub detail: String,
    /// For `agent_back` / `token_back`: how long it was away; for `first_job_signed`:
    /// how long after the return the first job was signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Recorded; its input is being uploaded.
    Receiving,
    /// Spooled; waiting for its turn.
    Queued,
    /// At the agent.
    Running,
    /// Done; the result can be fetched until it expires.
    Signed,
    /// Ended with an error; nothing was signed.
    Failed,
    /// Cancelled before it ran.
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Receiving => "receiving",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Signed => "signed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        [
            JobState::Receiving,
            JobState::Queued,
            JobState::Running,
            JobState::Signed,
            JobState::Failed,
            JobState::Cancelled,
        ]
        .into_iter()
        .find(|j| j.as_str() == s)
    }

    /// The job has ended and will not change again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Signed | JobState::Failed | JobState::Cancelled
        )
    }
}

/// `GET /v1/jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub id: String,
    pub state: JobState,
    pub profile: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// RFC 3339, UTC.
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    /// Jobs that run before this one (0: next); only while queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// Seconds until it is likely done, from recent jobs; only while queued or running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate_seconds: Option<u64>,
    /// How many times it went to the agent.
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// A signed job's result can still be fetched (`GET /v1/jobs/{id}/result`).
    #[serde(default)]
    pub result_available: bool,
}

/// The queue in `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStatus {
    /// The job at the agent now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    /// Jobs waiting.
    pub waiting: u64,
    /// Jobs waiting per caller.
    #[serde(default)]
    pub by_caller: std::collections::BTreeMap<String, u64>,
    /// Mean duration of recent jobs, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recent_job_ms: Option<u64>,
    pub spool_used_bytes: u64,
    pub spool_quota_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "axum")]
    #[test]
    fn a_preference_is_found_among_others_whatever_its_case_value_or_parameters() {
        let headers = |values: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append("prefer", http::HeaderValue::from_str(v).unwrap());
            }
            h
        };
        assert!(prefers(&headers(&["early-result"]), EARLY_RESULT));
        assert!(prefers(
            &headers(&["respond-async, Early-Result"]),
            EARLY_RESULT
        ));
        assert!(prefers(
            &headers(&["wait=10", "early-result; x=1"]),
            EARLY_RESULT
        ));
        assert!(prefers(&headers(&["respond-async"]), "respond-async"));
        assert!(!prefers(&headers(&["respond-async"]), EARLY_RESULT));
        assert!(!prefers(
            &headers(&["early-results", "x=early-result"]),
            EARLY_RESULT
        ));
        assert!(!prefers(&headers(&[]), EARLY_RESULT));
    }

    #[test]
    fn codes_have_stable_names_statuses_and_exit_codes() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, code);
            let status = code.http_status();
            assert!((400..600).contains(&status), "{code}: {status}");
            // Client-side faults are 4xx and never "unavailable" (429 "busy, retry" or
            // "wait, then retry" is the one 4xx that is); 5xx never "bad input".
            if matches!(code, ErrorCode::TooManyJobs | ErrorCode::TooManyAttempts) {
                assert_eq!((status, code.exit_code()), (429, exit::UNAVAILABLE));
            } else if status < 500 {
                assert_ne!(code.exit_code(), exit::UNAVAILABLE, "{code}");
            } else {
                assert_ne!(code.exit_code(), exit::BAD_INPUT, "{code}");
            }
        }
        assert_eq!(ErrorCode::Forbidden.exit_code(), 3);
        assert_eq!(ErrorCode::UnknownProfile.exit_code(), 3);
        assert_eq!(ErrorCode::UnsupportedFormat.exit_code(), 4);
        assert_eq!(ErrorCode::EmptyInput.exit_code(), 4);
        assert_eq!(ErrorCode::SigningFailed.exit_code(), 5);
        assert_eq!(ErrorCode::AgentUnavailable.exit_code(), 6);
        assert_eq!(ErrorCode::PinRejected.exit_code(), 6);
        assert_eq!(ErrorCode::SpoolFull.http_status(), 507);
        assert_eq!(ErrorCode::SpoolFull.exit_code(), 6);
        for s in [
            "receiving",
            "queued",
            "running",
            "signed",
            "failed",
            "cancelled",
        ] {
            assert_eq!(JobState::parse(s).unwrap().as_str(), s);
        }
    }

    #[test]
    fn sign_query_round_trips_through_a_query_string() {
        let q = SignQuery {
            profile: Some("release".into()),
            filename: Some("my app & co.exe".into()),
            description: None,
            url: Some("https://example.invalid/?a=b".into()),
            mode: SignMode::Whole,
            response: SignResponse::Pkcs7,
        };
        let s = serde_urlencoded::to_string(&q).unwrap();
        assert!(!s.contains("description"), "{s}");
        assert!(s.contains("response=pkcs7"), "{s}");
        let back: SignQuery = serde_urlencoded::from_str(&s).unwrap();
        assert_eq!(back, q);
        let empty: SignQuery = serde_urlencoded::from_str("").unwrap();
        assert_eq!(empty, SignQuery::default());
        let a: AgentSignQuery = serde_urlencoded::from_str("hash=sha384").unwrap();
        assert_eq!(a.hash, DigestAlgorithm::Sha384);
        assert!(serde_urlencoded::from_str::<AgentSignQuery>("hash=md5").is_err());
        let typo = serde_urlencoded::from_str::<SignQuery>("profil=nested").unwrap_err();
        assert!(typo.to_string().contains("profil"), "{typo}");
        let d: SignQuery = serde_urlencoded::from_str("mode=digest").unwrap();
        assert_eq!(d.mode, SignMode::Digest);
        assert_eq!(serde_urlencoded::to_string(&d).unwrap(), "mode=digest");
        assert!(serde_urlencoded::from_str::<SignQuery>("mode=half").is_err());
        assert!(serde_urlencoded::from_str::<SignQuery>("response=zip").is_err());
    }

    #[test]
    fn agent_query_carries_the_profile_options() {
        let q = AgentSignQuery {
            profile: Some("release".into()),
            filename: Some("setup.ps1".into()),
            description: Some("App".into()),
            url: None,
            hash: DigestAlgorithm::Sha512,
            page_hashes: true,
            nested: true,
            timestamp: vec![
                "http://tsa.example/?a=1&b=2".into(),
                "https://tsa2.example:8443/ts".into(),
            ],
            formats: vec![Format::Pe, Format::PowerShell],
            mode: SignMode::Digest,
            response: SignResponse::Complete,
        };
        let s = serde_urlencoded::to_string(&q).unwrap();
        assert!(s.contains("mode=digest"), "{s}");
        assert!(s.contains("formats=pe%2Cpowershell"), "{s}");
        let back: AgentSignQuery = serde_urlencoded::from_str(&s).unwrap();
        assert_eq!(back, q);

        // Defaults stay off the wire and come back as defaults.
        let plain = AgentSignQuery::default();
        let s = serde_urlencoded::to_string(&plain).unwrap();
        assert_eq!(s, "hash=sha256");
        assert_eq!(
            serde_urlencoded::from_str::<AgentSignQuery>(&s).unwrap(),
            plain
        );
        let err = serde_urlencoded::from_str::<AgentSignQuery>("formats=pe,exe").unwrap_err();
        assert!(err.to_string().contains("unknown format \"exe\""), "{err}");
    }

    #[test]
    fn timestamp_urls_are_checked() {
        assert!(check_timestamp_url("http://timestamp.digicert.com").is_ok());
        assert!(check_timestamp_url("https://127.0.0.1:8080/tsa").is_ok());
        for bad in [
            "ftp://x",
            "timestamp.digicert.com",
            "http://",
            "http:///x",
            "http://a b",
        ] {
            assert!(check_timestamp_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_body_retryable_is_optional_on_the_wire() {
        let old: ErrorBody =
            serde_json::from_str(r#"{"code":"token_unavailable","message":"gone"}"#).unwrap();
        assert!(!old.retryable, "absent means not retryable");
        let plain = serde_json::to_value(ErrorBody::new(ErrorCode::SigningFailed, "x")).unwrap();
        assert_eq!(
            plain,
            serde_json::json!({"code": "signing_failed", "message": "x"})
        );
        let retry = ErrorBody::new(ErrorCode::TokenUnavailable, "x").retryable(true);
        let json = serde_json::to_value(&retry).unwrap();
        assert_eq!(json["retryable"], true);
        assert_eq!(serde_json::from_value::<ErrorBody>(json).unwrap(), retry);
    }

    #[test]
    fn events_are_type_time_and_details() {
        let e = AgentEvent {
            seq: 7,
            time: "2026-01-02T03:04:05Z".into(),
            kind: AgentEventKind::SigningFinished {
                job: 3,
                ok: false,
                code: Some(ErrorCode::TokenUnavailable),
                retryable: true,
                ms: 12,
            },
        };
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"seq": 7, "time": "2026-01-02T03:04:05Z", "type": "signing_finished",
                "details": {"job": 3, "ok": false, "code": "token_unavailable", "retryable": true, "ms": 12}})
        );
        assert_eq!(serde_json::from_value::<AgentEvent>(json).unwrap(), e);
        assert_eq!(e.kind.name(), "signing_finished");
    }

    #[test]
    fn login_body_reads_the_pin_and_hides_it_from_debug() {
        use secrecy::ExposeSecret;
        let l: AgentLogin = serde_json::from_str(r#"{"pin":"123456"}"#).unwrap();
        assert_eq!(l.pin.expose_secret(), "123456");
        assert!(!format!("{l:?}").contains("123456"));
        assert_eq!(serde_json::to_string(&l).unwrap(), r#"{"pin":"123456"}"#);
        let old: AgentHealth = serde_json::from_str(
            r#"{"version":"0.1.0","state":"ready","detail":"d","module":"/m.so","signer":"s"}"#,
        )
        .unwrap();
        assert!(old.certificates.is_empty() && old.pin.is_none() && !old.logged_in);
    }

    #[test]
    fn remote_desktop_is_a_problem_until_redirection_is_off() {
        let safe = WindowsSessions {
            remote_desktop_active: true,
            smart_card_redirection_disabled: Some(true),
        };
        assert_eq!(safe.problem(), None);
        let (why, fix) = WindowsSessions {
            remote_desktop_active: true,
            smart_card_redirection_disabled: Some(false),
        }
        .problem()
        .unwrap();
        assert!(
            why.contains("hides the token") && why.contains("now"),
            "{why}"
        );
        assert!(
            fix.contains("/v fEnableSmartCard /t REG_DWORD /d 0"),
            "{fix}"
        );
        assert!(
            fix.contains(r"HKLM\SOFTWARE\Policies\Microsoft\Windows NT\Terminal Services"),
            "{fix}"
        );
        let (why, _) = WindowsSessions::default().problem().unwrap();
        assert!(why.contains("whenever someone connects"), "{why}");
    }
}
