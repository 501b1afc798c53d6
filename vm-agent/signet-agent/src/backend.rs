//! The signing seam: [`Signer`], the one trait the agent signs through, and what every
//! backend shares — the [`SignSpec`] of one signature and the [`SignError`] classes the
//! agent acts on.
//!
//! The backends: [`crate::signer::Osslsigncode`] (every platform, the token's PKCS#11
//! module), [`crate::native::Native`] (the built-in engine on the agent's own logged-in
//! session) and [`crate::signtool::SigntoolBackend`] (Windows, the token's CSP);
//! `[signer] backend` chooses ([`crate::agent::signer_for`]). A refused PIN and a lost
//! token are the same [`SignError`] whichever backend saw them, so the agent's handling
//! does not depend on the backend. What a backend cannot do is refused before the token
//! is touched ([`Signer::refuses`]), with the fix.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cryptoki::types::AuthPin;
use futures_util::future::BoxFuture;
use signet_api::wire::patch::Patch;
use signet_api::wire::{DigestAlgorithm, ErrorCode, SignMode, SignResponse, SignerFeatures};
use signet_format::Format;

use crate::token::{KeyRef, TokenSession};

/// The agent's token session, shared with a backend that signs on it.
pub type SharedToken = std::sync::Arc<std::sync::Mutex<Box<dyn TokenSession>>>;

/// A program (or engine) that makes Authenticode signatures with the token's key.
pub trait Signer: std::fmt::Debug + Send + Sync {
    /// The program run to sign.
    fn program(&self) -> &Path;

    /// The certificate given as a file; `None`: the token's certificate is used.
    fn certificate_file(&self) -> Option<&Path>;

    /// The backend's version line and what it can do. Fails when the program cannot
    /// be run, which stops the agent at start with the fix.
    fn version(&self) -> BoxFuture<'_, Result<(String, SignerFeatures), SignError>>;

    /// Why this backend cannot serve a request of `mode`, for a file of `format`
    /// (`None` before it is known), answered as `response`; `None` when it can.
    fn refuses(
        &self,
        features: &SignerFeatures,
        mode: SignMode,
        format: Option<Format>,
        response: SignResponse,
    ) -> Option<String>;

    /// Signs as `spec` says with the token's key `key` and `pin`; answers what it knows
    /// of the signed file besides the file.
    fn sign<'a>(
        &'a self,
        key: &'a KeyRef,
        pin: &'a AuthPin,
        spec: &'a SignSpec<'a>,
    ) -> BoxFuture<'a, Result<Made, SignError>>;

    /// Writes the signature of the signed file `signed` to `out` (DER PKCS#7).
    fn extract_signature<'a>(
        &'a self,
        signed: &'a Path,
        out: &'a Path,
    ) -> BoxFuture<'a, Result<(), SignError>>;

    /// The agent's token session, given once at start to a backend that signs on it
    /// (the native one); the others log in on their own and ignore it.
    fn use_token(&mut self, token: SharedToken) {
        let _ = token;
    }

    /// Whether [`Signer::sign_in_memory`] signs an input of `format` (`None`: digest
    /// mode's data). A backend that runs a program on files answers `false`, the
    /// default: the agent then spools a small input to a file as any other.
    fn signs_in_memory(&self, format: Option<Format>) -> bool {
        let _ = format;
        false
    }

    /// Signs `input`, held in memory, as `spec` says (its `input` and `output` paths
    /// are not used), and answers the signed file (digest mode: the signature), or,
    /// for a file signed without a copy (a PE file), what signing changed in the
    /// input. Only for the formats [`Signer::signs_in_memory`] takes.
    fn sign_in_memory<'a>(
        &'a self,
        key: &'a KeyRef,
        pin: &'a AuthPin,
        spec: &'a SignSpec<'a>,
        input: bytes::Bytes,
    ) -> BoxFuture<'a, Result<InMemory, SignError>> {
        let _ = (key, pin, spec, input);
        Box::pin(async {
            Err(SignError::Engine(
                "this signing backend signs files only".into(),
            ))
        })
    }
}

/// What [`Signer::sign_in_memory`] made.
#[derive(Debug)]
pub enum InMemory {
    /// The signed file (digest mode: the signature).
    Signed(Vec<u8>),
    /// The signed file is the input with this patch applied: nothing of the input was
    /// copied.
    Patched(Patch),
}

/// What a signer knows of a file it signed, besides the file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Made {
    /// The signed file as what signing changed in the input
    /// ([`signet_api::wire::patch`]); `None` when the signer does not know (a program
    /// signed a copy).
    pub patch: Option<Patch>,
}

/// A backend's own failure, kept in its words, with the wire class it maps to.
pub trait BackendError: std::error::Error + Send + Sync + 'static {
    /// The wire error class of this failure.
    fn code(&self) -> ErrorCode;
}

/// A backend's own failure, boxed: shown as the backend words it, with its cause.
#[derive(Debug)]
pub struct BackendFailure(pub Box<dyn BackendError>);

impl std::fmt::Display for BackendFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BackendFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// One signature to make.
#[derive(Debug, Clone)]
pub struct SignSpec<'a> {
    /// The input, named with the extension of its format (osslsigncode tells
    /// PowerShell files apart by it).
    pub input: &'a Path,
    pub output: &'a Path,
    /// The input's format; `None` for digest mode's Authenticode data.
    pub format: Option<Format>,
    pub hash: DigestAlgorithm,
    pub description: Option<&'a str>,
    pub url: Option<&'a str>,
    /// Page hashes; applied to PE files only.
    pub page_hashes: bool,
    /// Keep an existing signature and add this one beside it.
    pub nested: bool,
    /// RFC 3161 timestamp servers, in the order to try them.
    pub timestamp: &'a [String],
    /// A PE input's digest and checksum's sum, made as it was spooled (the native
    /// engine then does not read it again); `None`: not made.
    pub digested: Option<&'a signet_authenticode::PeDigested>,
}

/// How a signing run failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("cannot run {program}: {source}; install osslsigncode or set signer.osslsigncode in the agent's configuration")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the token refused the PIN while signing")]
    PinRejected,
    #[error("the token was lost while signing: {0}")]
    TokenLost(String),
    /// `why`: what each server did, when the backend knows (the native engine's).
    #[error("no timestamp server gave a timestamp (tried in this order: {}){}; nothing was signed. Check that the signing VM reaches them, or change the profile's timestamp list", .tried.join(", "), .why.as_deref().map(|w| format!(": {w}")).unwrap_or_default())]
    Timestamp {
        tried: Vec<String>,
        why: Option<String>,
    },
    #[error("the file has no signature to keep beside a nested one")]
    NothingToNest,
    #[error("osslsigncode did not finish within {} s and was stopped; nothing was signed. A timestamp server that accepts connections but never answers does this: check the profile's timestamp servers (signer.timeout_seconds in the agent's configuration sets the limit)", .0.as_secs())]
    TimedOut(Duration),
    #[error("the signer found the file damaged or cut short, and signed nothing: {0}. Copy or build it again")]
    Damaged(String),
    #[error("osslsigncode could not sign the file: {0}")]
    Failed(String),
    /// The native engine's own failure (not osslsigncode's, not the token's loss).
    #[error("the native signing engine could not sign the file: {0}")]
    Engine(String),
    /// Another backend's own failure (signtool's), in its words and class.
    #[error(transparent)]
    Backend(BackendFailure),
}

impl SignError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SignError::Spawn { .. } => ErrorCode::Internal,
            SignError::PinRejected => ErrorCode::PinRejected,
            SignError::TokenLost(_) => ErrorCode::TokenUnavailable,
            SignError::Damaged(_) => ErrorCode::BadInput,
            SignError::Backend(e) => e.0.code(),
            SignError::Timestamp { .. }
            | SignError::NothingToNest
            | SignError::TimedOut(_)
            | SignError::Failed(_)
            | SignError::Engine(_) => ErrorCode::SigningFailed,
        }
    }
}
