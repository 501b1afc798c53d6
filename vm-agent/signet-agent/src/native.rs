//! The native backend: the built-in Authenticode engine (`signet-authenticode`) signs
//! on the agent's own logged-in session, so the token sees one signature operation
//! per job and nothing else (no C_Initialize, C_OpenSession or C_Login per job).
//!
//! PE files are signed natively, whole (the spooled input read once and signed where it
//! lies, in constant memory), and so
//! are security catalogs and digest mode's data. MSI, CAB, PowerShell and APPX/MSIX files go
//! through osslsigncode's token-free steps: `extract-data` makes the data, the engine
//! signs it, and `attach-signature` puts the signature in. Timestamps are the engine's
//! own: it asks the profile's RFC 3161 servers over HTTP or HTTPS ([`crate::tsa`]) right after
//! the key signed, and counter-signs the signature as osslsigncode's `-ts` does, in
//! every mode; when no server answers nothing is signed.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cryptoki::types::AuthPin;
use futures_util::future::BoxFuture;
use signet_api::wire::patch::Patch;
use signet_api::wire::{SignMode, SignResponse, SignerFeatures};
use signet_authenticode::{HashAlg, KeyKind, RawSigner, SignOptions, Timestamper};
use signet_format::Format;

use crate::backend::{InMemory, Made, SharedToken, SignError, SignSpec, Signer};
use crate::config::Config;
use crate::signer::Osslsigncode;
use crate::token::{KeyRef, TokenError};
use crate::tsa::{Trust, TsaClient};

/// The native engine, with osslsigncode for the token-free steps.
#[derive(Debug)]
pub struct Native {
    /// Runs `extract-data`, `attach-signature` and `extract-signature`.
    pub osslsigncode: Osslsigncode,
    /// Certificate file (PEM or DER; the signer's first, then its chain); `None`: the
    /// certificate on the token with the key's id.
    pub certificate: Option<PathBuf>,
    /// What `https://` timestamp servers must chain to.
    pub timestamp_trust: Trust,
    token: Option<SharedToken>,
}

impl Native {
    /// The native engine as `cfg` sets it up.
    pub fn from_config(cfg: &Config) -> Native {
        Native {
            osslsigncode: Osslsigncode::from_config(cfg),
            certificate: cfg.signer.certificate.clone(),
            timestamp_trust: Trust {
                ca_file: cfg.signer.timestamp_ca_file.clone(),
            },
            token: None,
        }
    }

    fn timeout(&self) -> Duration {
        self.osslsigncode.timeout
    }

    /// Runs a token-free osslsigncode step; answers its output.
    async fn tool(&self, args: Vec<OsString>) -> Result<(bool, String), SignError> {
        let program = &self.osslsigncode.program;
        let run = tokio::process::Command::new(program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(self.timeout(), run)
            .await
            .map_err(|_| SignError::TimedOut(self.timeout()))?
            .map_err(|source| SignError::Spawn {
                program: program.clone(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        Ok((out.status.success(), text))
    }

    /// The key to sign with: the token's session, the key's kind, the certificates.
    async fn key(&self) -> Result<AgentKey, SignError> {
        let Some(token) = self.token.clone() else {
            return Err(SignError::Engine(
                "the native engine was not given the agent's token session".into(),
            ));
        };
        let t = token.clone();
        let raw = tokio::task::spawn_blocking(move || {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            t.raw_key()
        })
        .await
        .map_err(|e| SignError::Engine(format!("the token task failed: {e}")))?
        .map_err(token_failure)?;
        let (certificate, chain) = match &self.certificate {
            Some(path) => {
                let bytes = tokio::fs::read(path).await.map_err(|e| {
                    SignError::Engine(format!(
                        "cannot read the certificate file {}: {e}; fix signer.certificate in the agent's configuration",
                        path.display()
                    ))
                })?;
                let mut certs = signet_authenticode::certificates(&bytes).map_err(|e| {
                    SignError::Engine(format!(
                        "the certificate file {}: {e}; fix signer.certificate in the agent's configuration",
                        path.display()
                    ))
                })?;
                let first = certs.remove(0);
                (first, certs)
            }
            None => match raw.certificate {
                Some(c) => (c, Vec::new()),
                None => {
                    return Err(SignError::Engine(
                        "the token holds no certificate with the key's id; write it to the token or set signer.certificate in the agent's configuration".into(),
                    ))
                }
            },
        };
        Ok(AgentKey {
            token,
            kind: raw.kind,
            certificate,
            chain,
        })
    }

    /// The engine's options for `spec`.
    fn options(&self, spec: &SignSpec<'_>) -> Result<SignOptions, SignError> {
        let hash: HashAlg = spec
            .hash
            .as_str()
            .parse()
            .map_err(|e: signet_authenticode::Error| SignError::Engine(e.to_string()))?;
        let mut options = SignOptions::new(hash);
        options.description = spec.description.map(str::to_owned);
        options.url = spec.url.map(str::to_owned);
        options.page_hashes = spec.page_hashes && spec.format == Some(Format::Pe);
        options.nested = spec.nested;
        if !spec.timestamp.is_empty() {
            options.timestamp = Some(self.timestamper(spec.timestamp));
        }
        Ok(options)
    }

    /// Signs `input`, held in memory: digest mode's data and a catalog (answered
    /// whole), or a PE file, signed without a copy of it
    /// ([`signet_authenticode::sign_pe_in_memory`], its digest made as it was received
    /// when it was) and answered as the patch the spooled way answers.
    async fn sign_memory(
        &self,
        spec: &SignSpec<'_>,
        input: bytes::Bytes,
    ) -> Result<InMemory, SignError> {
        let key = self.key().await?;
        let options = self.options(spec)?;
        match spec.format {
            None => blocking(move || signet_authenticode::sign_blob(&input, &options, &key))
                .await
                .map(InMemory::Signed),
            Some(Format::Cat) => {
                blocking(move || signet_authenticode::sign_catalog(&input, &options, &key))
                    .await
                    .map(InMemory::Signed)
            }
            Some(Format::Pe) => {
                let wanted_nested = spec.nested;
                let digested = spec.digested.cloned();
                let (nested, patch) = blocking(move || {
                    let (done, tail) = signet_authenticode::sign_pe_in_memory(
                        &input,
                        &options,
                        &key,
                        digested.as_ref(),
                    )?;
                    Ok((done.nested, patch_of(&done, &tail)))
                })
                .await?;
                if wanted_nested && !nested {
                    tracing::info!("the file has no signature yet; signed it without nesting");
                }
                Ok(InMemory::Patched(patch))
            }
            Some(f) => Err(SignError::Engine(format!(
                "{f} files are not signed in memory"
            ))),
        }
    }

    async fn sign_spec(&self, spec: &SignSpec<'_>) -> Result<Made, SignError> {
        let key = self.key().await?;
        let options = self.options(spec)?;
        let mut made = Made::default();
        let signed = spec.output.with_file_name("native-signed");
        let signed = match spec.input.extension() {
            Some(ext) => signed.with_extension(ext),
            None => signed,
        };
        match spec.format {
            None => {
                let (input, output) = (spec.input.to_owned(), signed.clone());
                blocking(move || {
                    let blob = std::fs::read(&input)?;
                    let sig = signet_authenticode::sign_blob(&blob, &options, &key)?;
                    std::fs::write(&output, sig)?;
                    Ok(())
                })
                .await?;
            }
            Some(Format::Pe) => {
                // The spooled input is signed where it lies, not copied: its digest
                // and checksum made as it was spooled (else read once), written to
                // only once the signature is made, cut at the table's end, and then
                // it is the signed file. Not flushed to the disk: the spool is the
                // agent's scratch (removed at start, kept results live in memory),
                // the answer is read from the page cache, and signetd makes the
                // signed file durable on its side before it commits `signed`; an
                // agent that dies before answering has the job sent again.
                // What it changed is told too (the bytes after its content, two header
                // fields): signetd, which has the input, makes the signed file of it.
                let (input, output) = (spec.input.to_owned(), signed.clone());
                let digested = spec.digested.cloned();
                let (nested, patch) = blocking(move || {
                    use std::io::{Read, Seek};
                    let mut f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&input)?;
                    let done = signet_authenticode::sign_pe_in_place_digested(
                        &mut f,
                        &options,
                        &key,
                        digested.as_ref(),
                    )?;
                    f.set_len(u64::from(done.table_offset) + u64::from(done.table_size))?;
                    let mut tail = Vec::new();
                    f.seek(std::io::SeekFrom::Start(done.kept))?;
                    f.read_to_end(&mut tail)?;
                    let patch = patch_of(&done, &tail);
                    std::fs::rename(&input, &output)?;
                    Ok((done.nested, patch))
                })
                .await?;
                if spec.nested && !nested {
                    tracing::info!("the file has no signature yet; signed it without nesting");
                }
                made.patch = Some(patch);
            }
            Some(Format::Cat) => {
                let (input, output) = (spec.input.to_owned(), signed.clone());
                blocking(move || {
                    let cat = std::fs::read(&input)?;
                    let sig = signet_authenticode::sign_catalog(&cat, &options, &key)?;
                    std::fs::write(&output, sig)?;
                    Ok(())
                })
                .await?;
            }
            Some(_) => self.sign_through_blob(spec, options, key, &signed).await?,
        }
        tokio::fs::rename(&signed, spec.output)
            .await
            .map_err(|e| SignError::Engine(format!("cannot keep the signed file: {e}")))?;
        Ok(made)
    }

    /// MSI, CAB, PowerShell, APPX/MSIX: extract-data, sign natively, attach-signature.
    async fn sign_through_blob(
        &self,
        spec: &SignSpec<'_>,
        options: SignOptions,
        key: AgentKey,
        signed: &Path,
    ) -> Result<(), SignError> {
        let blob = spec.output.with_file_name("native.blob");
        let sig = spec.output.with_file_name("native.p7");
        let (ok, text) = self
            .tool(vec![
                "extract-data".into(),
                "-h".into(),
                spec.hash.as_str().into(),
                "-in".into(),
                spec.input.into(),
                "-out".into(),
                blob.clone().into(),
            ])
            .await?;
        if !ok {
            return Err(crate::signer::classify(&text, None, &[]));
        }
        let (b, s) = (blob.clone(), sig.clone());
        blocking(move || {
            let data = std::fs::read(&b)?;
            let p7 = signet_authenticode::sign_blob(&data, &options, &key)?;
            std::fs::write(&s, p7)?;
            Ok(())
        })
        .await?;
        let attach = |nest: bool| {
            let mut a: Vec<OsString> = vec!["attach-signature".into(), "-sigin".into()];
            a.push(sig.clone().into());
            if nest {
                a.push("-nest".into());
            }
            a.extend(["-in".into(), spec.input.into(), "-out".into()]);
            a.push(signed.into());
            a
        };
        let mut run = self.tool(attach(spec.nested)).await?;
        if !run.0 && spec.nested && run.1.contains("Unable to extract existing signature") {
            tracing::info!("the file has no signature yet; signing it without nesting");
            let _ = tokio::fs::remove_file(signed).await;
            run = self.tool(attach(false)).await?;
        }
        let (ok, text) = run;
        // attach-signature verifies what it attached and fails when the certificate
        // does not chain to this machine's roots (the signing VM has none of the
        // publisher's); a signature that matches the file is kept, a mismatch is not.
        let kept = ok || (matches_file(&text) && signed.exists());
        if !kept {
            let _ = tokio::fs::remove_file(signed).await;
            return Err(crate::signer::classify(&text, None, &[]));
        }
        let _ = tokio::fs::remove_file(&blob).await;
        let _ = tokio::fs::remove_file(&sig).await;
        Ok(())
    }

    /// The engine's timestamper: the profile's servers in order, over HTTP or HTTPS, within
    /// signer.timeout_seconds all told ([`crate::tsa`]). It runs on the engine's
    /// blocking thread and waits there for the answer.
    fn timestamper(&self, servers: &[String]) -> Timestamper {
        let client = TsaClient::new(servers, self.timeout(), self.timestamp_trust.clone());
        let handle = tokio::runtime::Handle::current();
        Timestamper::new(move |request| {
            handle.block_on(client.fetch(request)).map_err(|why| {
                signet_authenticode::Error::Timestamp {
                    tried: client.servers.clone(),
                    why,
                }
            })
        })
    }
}

/// Whether attach-signature's output says the signature's digests are the file's
/// ("Current" and "Calculated" digests printed, none marked MISMATCH).
fn matches_file(output: &str) -> bool {
    let lines: Vec<&str> = output.lines().map(str::trim).collect();
    !lines.iter().any(|l| l.contains("MISMATCH"))
        && lines.iter().any(|l| l.starts_with("Current "))
        && lines.iter().any(|l| l.starts_with("Calculated "))
}

/// What signing changed in a PE file, as `done` tells it and `tail` (the signed
/// file's bytes from `done.kept` to its end): the patch signetd makes the signed file
/// of, from the input it has.
fn patch_of(done: &signet_authenticode::PeSigned, tail: &[u8]) -> Patch {
    let mut dir = done.table_offset.to_le_bytes().to_vec();
    dir.extend_from_slice(&done.table_size.to_le_bytes());
    Patch::new(
        done.kept,
        &[
            (done.checksum_at, &done.checksum.to_le_bytes()),
            (done.security_dir_at, &dir),
        ],
        tail,
    )
}

/// Runs the engine's blocking work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, signet_authenticode::Error> + Send + 'static,
) -> Result<T, SignError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SignError::Engine(format!("the signing task failed: {e}")))?
        .map_err(engine_failure)
}

fn engine_failure(e: signet_authenticode::Error) -> SignError {
    match e {
        signet_authenticode::Error::DamagedPe(what) => SignError::Damaged(what),
        signet_authenticode::Error::Signer(inner) => match inner.downcast::<TokenError>() {
            Ok(t) => token_failure(*t),
            Err(other) => SignError::Engine(format!("the key cannot sign: {other}")),
        },
        signet_authenticode::Error::Timestamp { tried, why } => {
            tracing::warn!("no timestamp server gave a timestamp: {why}");
            SignError::Timestamp {
                tried,
                why: Some(why),
            }
        }
        other => SignError::Engine(other.to_string()),
    }
}

fn token_failure(e: TokenError) -> SignError {
    match e {
        TokenError::Lost(detail) => SignError::TokenLost(detail),
        other => SignError::Engine(other.to_string()),
    }
}

/// The token's key as the engine's [`RawSigner`]: one C_Sign on the agent's session.
struct AgentKey {
    token: SharedToken,
    kind: KeyKind,
    certificate: Vec<u8>,
    chain: Vec<Vec<u8>>,
}

impl RawSigner for AgentKey {
    type Error = TokenError;
    fn key(&self) -> KeyKind {
        self.kind
    }
    fn sign(&self, hash: HashAlg, data: &[u8]) -> Result<Vec<u8>, TokenError> {
        let mut t = self.token.lock().unwrap_or_else(|p| p.into_inner());
        t.sign_raw(hash, data)
    }
    fn certificate(&self) -> &[u8] {
        &self.certificate
    }
    fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }
}

impl Signer for Native {
    fn program(&self) -> &Path {
        &self.osslsigncode.program
    }

    fn certificate_file(&self) -> Option<&Path> {
        self.certificate.as_deref()
    }

    /// The engine signs PE files, catalogs and digest-mode data whatever osslsigncode
    /// can do, and without it; osslsigncode's version decides the other formats (none
    /// when it is not installed: [`Signer::refuses`] names the fix).
    fn version(&self) -> BoxFuture<'_, Result<(String, SignerFeatures), SignError>> {
        Box::pin(async move {
            let engine = format!("signet-authenticode {} (native", env!("CARGO_PKG_VERSION"));
            let (line, mut features) = match self.osslsigncode.version().await {
                Ok((line, features)) => (format!("{engine}; {line})"), features),
                Err(SignError::Spawn { program, source }) => {
                    tracing::warn!(
                        "cannot run {} ({source}): PE files, catalogs and digest mode are signed, other formats refused; install osslsigncode 2.8 or later or set signer.osslsigncode to sign them",
                        program.display()
                    );
                    (
                        format!("{engine}; no osslsigncode)"),
                        SignerFeatures::default(),
                    )
                }
                Err(other) => return Err(other),
            };
            features.modes = vec![SignMode::Whole, SignMode::Digest];
            Ok((line, features))
        })
    }

    fn refuses(
        &self,
        features: &SignerFeatures,
        mode: SignMode,
        format: Option<Format>,
        _response: SignResponse,
    ) -> Option<String> {
        let version = if features.version.is_empty() {
            "of unknown version".to_owned()
        } else {
            features.version.clone()
        };
        match (mode, format) {
            (SignMode::Digest, _) | (_, None) | (_, Some(Format::Pe | Format::Cat)) => None,
            (_, Some(f)) if !features.extract_data && !features.attach_signature => Some(format!(
                "the native engine signs {f} files through osslsigncode's extract-data and attach-signature, and this signing VM has no osslsigncode it can run ({}): install osslsigncode 2.8 or later in the signing VM, or set signer.osslsigncode",
                self.osslsigncode.program.display()
            )),
            (_, Some(f)) if !(features.extract_data && features.attach_signature) => Some(format!(
                "the native engine signs {f} files through osslsigncode's extract-data and attach-signature, which this signing VM's osslsigncode {version} lacks: install osslsigncode 2.8 or later in the signing VM"
            )),
            (_, Some(Format::PowerShell)) if !features.powershell => Some(format!(
                "this signing VM's osslsigncode {version} cannot handle PowerShell files (2.8 or later can): install osslsigncode 2.8 or later in the signing VM"
            )),
            _ => None,
        }
    }

    /// The PIN is the session's: the engine never logs in.
    fn sign<'a>(
        &'a self,
        _key: &'a KeyRef,
        _pin: &'a AuthPin,
        spec: &'a SignSpec<'a>,
    ) -> BoxFuture<'a, Result<Made, SignError>> {
        Box::pin(self.sign_spec(spec))
    }

    fn extract_signature<'a>(
        &'a self,
        signed: &'a Path,
        out: &'a Path,
    ) -> BoxFuture<'a, Result<(), SignError>> {
        Box::pin(self.osslsigncode.extract_signature(signed, out))
    }

    fn use_token(&mut self, token: SharedToken) {
        self.token = Some(token);
    }

    /// Digest mode's data, PE files and catalogs: the engine's own formats.
    fn signs_in_memory(&self, format: Option<Format>) -> bool {
        matches!(format, None | Some(Format::Pe | Format::Cat))
    }

    fn sign_in_memory<'a>(
        &'a self,
        _key: &'a KeyRef,
        _pin: &'a AuthPin,
        spec: &'a SignSpec<'a>,
        input: bytes::Bytes,
    ) -> BoxFuture<'a, Result<InMemory, SignError>> {
        Box::pin(self.sign_memory(spec, input))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_that_matches_the_file_is_kept_whatever_its_chain() {
        let untrusted = "Current message digest    : C8\nCalculated message digest : C8\n\tError: self-signed certificate\nPKCS7_verify error\nSignature mismatch\nFailed\n";
        assert!(matches_file(untrusted));
        let mismatch = "Current message digest    : C8\nCalculated message digest : C9    MISMATCH!!!\nFailed\n";
        assert!(!matches_file(mismatch));
        assert!(!matches_file(
            "Unable to extract existing signature\nFailed\n"
        ));
    }

    /// A native backend with no token session, for what is refused before the token.
    fn without_token() -> Native {
        Native {
            osslsigncode: Osslsigncode {
                program: "osslsigncode".into(),
                module: "m.so".into(),
                certificate: None,
                timeout: Duration::from_secs(1),
            },
            certificate: None,
            timestamp_trust: Trust::default(),
            token: None,
        }
    }

    #[tokio::test]
    async fn without_osslsigncode_pe_catalogs_and_digest_mode_are_served_and_the_rest_refused() {
        let mut n = without_token();
        n.osslsigncode.program = "/nonexistent/osslsigncode".into();
        let (line, features) = n.version().await.unwrap();
        assert!(line.contains("no osslsigncode"), "{line}");
        assert_eq!(features.modes, vec![SignMode::Whole, SignMode::Digest]);
        let file = SignResponse::Complete;
        for f in [Format::Pe, Format::Cat] {
            assert_eq!(n.refuses(&features, SignMode::Whole, Some(f), file), None);
        }
        assert_eq!(n.refuses(&features, SignMode::Digest, None, file), None);
        for f in [Format::Msi, Format::Cab, Format::PowerShell] {
            let why = n
                .refuses(&features, SignMode::Whole, Some(f), file)
                .unwrap();
            assert!(
                why.contains("/nonexistent/osslsigncode") && why.contains("2.8 or later"),
                "{why}"
            );
        }
    }

    #[test]
    fn catalogs_are_signed_and_old_osslsigncode_is_refused_with_the_fix() {
        let n = without_token();
        let new = SignerFeatures {
            version: "2.9".into(),
            modes: vec![SignMode::Whole, SignMode::Digest],
            extract_data: true,
            attach_signature: true,
            powershell: true,
        };
        let old = SignerFeatures {
            version: "2.5".into(),
            modes: vec![SignMode::Whole],
            extract_data: false,
            attach_signature: true,
            powershell: false,
        };
        let file = SignResponse::Complete;
        for f in [Format::Pe, Format::Msi, Format::Cab, Format::PowerShell] {
            assert_eq!(n.refuses(&new, SignMode::Whole, Some(f), file), None);
        }
        assert_eq!(
            n.refuses(&old, SignMode::Whole, Some(Format::Pe), file),
            None
        );
        assert_eq!(n.refuses(&old, SignMode::Digest, None, file), None);
        for features in [&new, &old] {
            assert_eq!(
                n.refuses(features, SignMode::Whole, Some(Format::Cat), file),
                None
            );
        }
        let msi = n
            .refuses(&old, SignMode::Whole, Some(Format::Msi), file)
            .unwrap();
        assert!(msi.contains("2.8 or later"), "{msi}");
    }
}
