//! The signing backend the configuration chose (`[signer] backend`), behind the one
//! type the agent calls: [`Backend::Osslsigncode`] (every platform, the token's
//! PKCS#11 module) or [`Backend::Signtool`] (Windows, the token's CSP).
//!
//! Both take the same [`SignSpec`] and fail with the same [`SignError`], so the agent's
//! handling of a refused PIN or a lost token does not depend on the backend. What
//! signtool cannot do — digest mode, answering the signature alone — is refused
//! before the token is touched ([`Backend::refuses`]), with the fix.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use cryptoki::types::AuthPin;
use signet_protocol::format::Format;
use signet_protocol::wire::{SignMode, SignResponse, SignerFeatures};

use crate::config::{self, Config};
use crate::signer::{Osslsigncode, SignError, SignSpec};
use crate::signtool::{Signtool, SigntoolError, SigntoolSpec};
use crate::token::KeyRef;

/// The program that signs.
#[derive(Debug, Clone)]
pub enum Backend {
    Osslsigncode(Osslsigncode),
    Signtool(SigntoolBackend),
}

/// signtool and the time limit of one job's runs.
#[derive(Debug, Clone)]
pub struct SigntoolBackend {
    pub signtool: Signtool,
    pub timeout: Duration,
}

impl Backend {
    /// The backend `cfg` names, with its settings. The configuration was checked
    /// ([`config::SignerConfig::check_backend`]): signtool comes with its container and
    /// certificate.
    pub fn from_config(cfg: &Config) -> Backend {
        let s = &cfg.signer;
        let timeout = Duration::from_secs(s.timeout_seconds);
        match s.backend {
            config::Backend::Osslsigncode => Backend::Osslsigncode(Osslsigncode {
                program: s.osslsigncode.clone(),
                module: cfg.token.module.clone(),
                certificate: s.certificate.clone(),
                timeout,
            }),
            config::Backend::Signtool => Backend::Signtool(SigntoolBackend {
                signtool: Signtool {
                    program: s.signtool.clone(),
                    certificate: s.certificate.clone().unwrap_or_default(),
                    csp: s.csp.clone(),
                    container: s.container.clone().unwrap_or_default(),
                    reader: s.reader.clone(),
                },
                timeout,
            }),
        }
    }

    /// The program run to sign.
    pub fn program(&self) -> &Path {
        match self {
            Backend::Osslsigncode(o) => &o.program,
            Backend::Signtool(s) => &s.signtool.program,
        }
    }

    /// The certificate given as a file; `None`: the token's certificate is used.
    pub fn certificate_file(&self) -> Option<&Path> {
        match self {
            Backend::Osslsigncode(o) => o.certificate.as_deref(),
            Backend::Signtool(s) => Some(&s.signtool.certificate),
        }
    }

    /// The backend's version line and what it can do. Fails when the program cannot
    /// be run, which stops the agent at start with the fix.
    pub async fn version(&self) -> Result<(String, SignerFeatures), SignError> {
        match self {
            Backend::Osslsigncode(o) => o.version().await,
            Backend::Signtool(s) => {
                // signtool has no version option; started without a command it prints
                // its usage, which proves it runs.
                tokio::process::Command::new(&s.signtool.program)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .status()
                    .await
                    .map_err(|source| {
                        SignError::Signtool(SigntoolError::Spawn {
                            program: s.signtool.program.clone(),
                            source,
                        })
                    })?;
                Ok((
                    format!("signtool ({})", s.signtool.program.display()),
                    signtool_features(),
                ))
            }
        }
    }

    /// Why this backend cannot serve a request of `mode`, for a file of `format`
    /// (`None` before it is known), answered as `response`; `None` when it can.
    pub fn refuses(
        &self,
        features: &SignerFeatures,
        mode: SignMode,
        format: Option<Format>,
        response: SignResponse,
    ) -> Option<String> {
        match self {
            Backend::Osslsigncode(_) => crate::signer::unsupported(features, mode, format),
            Backend::Signtool(_) if mode == SignMode::Digest => Some(
                "this signing VM signs with signtool, which has no digest mode: send the whole file instead, or sign with osslsigncode 2.8 or later (signer.backend = \"osslsigncode\" in the agent's configuration)".to_owned(),
            ),
            Backend::Signtool(_) if response == SignResponse::Pkcs7 => Some(
                "this signing VM signs with signtool, which cannot answer the signature alone: ask for the signed file instead, or sign with osslsigncode (signer.backend = \"osslsigncode\" in the agent's configuration)".to_owned(),
            ),
            Backend::Signtool(_) => None,
        }
    }

    /// Signs as `spec` says with the token's key `key` and `pin`.
    pub async fn sign(
        &self,
        key: &KeyRef,
        pin: &AuthPin,
        spec: &SignSpec<'_>,
    ) -> Result<(), SignError> {
        match self {
            Backend::Osslsigncode(o) => o.sign(key, pin, spec).await,
            Backend::Signtool(s) => s.sign(pin, spec).await,
        }
    }

    /// Writes the signature of the signed file `signed` to `out` (DER PKCS#7).
    pub async fn extract_signature(&self, signed: &Path, out: &Path) -> Result<(), SignError> {
        match self {
            Backend::Osslsigncode(o) => o.extract_signature(signed, out).await,
            // Refused before signing (`refuses`); this is the backstop.
            Backend::Signtool(_) => Err(SignError::Failed(
                "signtool cannot answer the signature alone; ask for the signed file".to_owned(),
            )),
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

impl SigntoolBackend {
    /// signtool signs in place: the output starts as a copy of the input. The
    /// timestamp servers are tried in order, each on a fresh copy, until one
    /// timestamps; the whole job stays within the time limit.
    pub async fn sign(&self, pin: &AuthPin, spec: &SignSpec<'_>) -> Result<(), SignError> {
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
                .map_err(|e| SignError::Failed(format!("cannot copy the input to sign: {e}")))?;
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
        })
    }
}

impl From<SigntoolError> for SignError {
    /// A refused PIN and a lost token become the backend-neutral classes the agent
    /// acts on; the rest keep signtool's words and class.
    fn from(e: SigntoolError) -> SignError {
        match e {
            SigntoolError::PinRejected(_) => SignError::PinRejected,
            SigntoolError::TokenLost(detail) => SignError::TokenLost(detail),
            other => SignError::Signtool(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signet_protocol::wire::{DigestAlgorithm, ErrorCode};
    use std::path::PathBuf;

    const MINIMAL: &str = "[token]\nmodule = \"C:/SoftHSM2/lib/softhsm2-x64.dll\"\nlabel = \"t\"\n";

    fn cfg(extra: &str) -> Config {
        toml::from_str(&format!("{MINIMAL}{extra}")).unwrap()
    }

    fn signtool_backend(program: PathBuf) -> Backend {
        Backend::Signtool(SigntoolBackend {
            signtool: Signtool {
                program,
                certificate: PathBuf::from("codesign.cer"),
                csp: crate::signtool::SAFENET_CSP.to_owned(),
                container: "te-1".to_owned(),
                reader: None,
            },
            timeout: Duration::from_secs(30),
        })
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
        }
    }

    #[test]
    fn the_configuration_chooses_the_backend_and_its_settings() {
        let o = Backend::from_config(&cfg(""));
        assert!(matches!(&o, Backend::Osslsigncode(_)), "{o:?}");
        assert_eq!(o.program(), Path::new("osslsigncode"));
        assert_eq!(o.certificate_file(), None);

        let s = Backend::from_config(&cfg(
            "[signer]\nbackend = \"signtool\"\nsigntool = \"C:/sdk/signtool.exe\"\ncertificate = \"C:/signet/cs.cer\"\ncontainer = \"te-1\"\nreader = \"AKS ifdh 0\"\ntimeout_seconds = 42\n",
        ));
        let Backend::Signtool(st) = &s else {
            panic!("{s:?}")
        };
        assert_eq!(s.program(), Path::new("C:/sdk/signtool.exe"));
        assert_eq!(s.certificate_file(), Some(Path::new("C:/signet/cs.cer")));
        assert_eq!(st.signtool.container, "te-1");
        assert_eq!(st.signtool.reader.as_deref(), Some("AKS ifdh 0"));
        assert_eq!(st.signtool.csp, crate::signtool::SAFENET_CSP);
        assert_eq!(st.timeout, Duration::from_secs(42));
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
        let o = Backend::from_config(&cfg(""));
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
            matches!(&e, SignError::Timestamp { tried } if tried == &dead),
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
