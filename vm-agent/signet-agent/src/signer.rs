//! The osslsigncode backend: building its command line, running it with the PIN on
//! stdin, and classifying how it failed.
//!
//! The PIN never appears on a command line, in the environment or in a log: it is
//! written to the child's stdin and the pipe is closed. osslsigncode reads it with
//! `-readpass /dev/stdin`, which works with every version that has `-readpass`
//! (`-readpass -` needs 2.9).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use cryptoki::types::AuthPin;
use signet_protocol::wire::{DigestAlgorithm, ErrorCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::token::KeyRef;

/// The longest tail of osslsigncode's stderr kept for an error message.
const STDERR_TAIL: usize = 2048;

/// One signature to make.
#[derive(Debug, Clone)]
pub struct SignSpec<'a> {
    pub input: &'a Path,
    pub output: &'a Path,
    pub hash: DigestAlgorithm,
    pub description: Option<&'a str>,
    pub url: Option<&'a str>,
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
    #[error("osslsigncode could not sign the file: {0}")]
    Failed(String),
}

impl SignError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SignError::Spawn { .. } => ErrorCode::Internal,
            SignError::PinRejected => ErrorCode::PinRejected,
            SignError::TokenLost(_) => ErrorCode::TokenUnavailable,
            SignError::Failed(_) => ErrorCode::SigningFailed,
        }
    }
}

/// osslsigncode with a PKCS#11 module.
#[derive(Debug, Clone)]
pub struct Osslsigncode {
    pub program: PathBuf,
    pub module: PathBuf,
    /// Certificate file; `None` takes the certificate from the token.
    pub certificate: Option<PathBuf>,
}

impl Osslsigncode {
    /// The arguments of one `osslsigncode sign` run. Contains no secret.
    pub fn args(&self, key: &KeyRef, spec: &SignSpec<'_>) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "sign".into(),
            "-pkcs11module".into(),
            self.module.clone().into(),
            "-key".into(),
            key_uri(key, "private").into(),
            "-readpass".into(),
            "/dev/stdin".into(),
        ];
        match &self.certificate {
            Some(path) => {
                a.push("-certs".into());
                a.push(path.clone().into());
            }
            None => {
                a.push("-pkcs11cert".into());
                a.push(key_uri(key, "cert").into());
            }
        }
        a.push("-h".into());
        a.push(spec.hash.as_str().into());
        if let Some(d) = spec.description {
            a.push("-n".into());
            a.push(d.into());
        }
        if let Some(u) = spec.url {
            a.push("-i".into());
            a.push(u.into());
        }
        a.push("-in".into());
        a.push(spec.input.into());
        a.push("-out".into());
        a.push(spec.output.into());
        a
    }

    /// Runs osslsigncode once; the PIN goes to its stdin.
    pub async fn sign(
        &self,
        key: &KeyRef,
        pin: &AuthPin,
        spec: &SignSpec<'_>,
    ) -> Result<(), SignError> {
        use secrecy::ExposeSecret;
        let mut child = tokio::process::Command::new(&self.program)
            .args(self.args(key, spec))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| SignError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            // A child that exits before reading its PIN closes the pipe; its exit
            // status and stderr say why, so a write error here is not the story.
            let _ = stdin.write_all(pin.expose_secret().as_bytes()).await;
            let _ = stdin.shutdown().await;
        }
        let mut stderr = Vec::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_end(&mut stderr).await;
        }
        let status = child.wait().await.map_err(|source| SignError::Spawn {
            program: self.program.clone(),
            source,
        })?;
        if status.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&stderr);
        Err(classify(&text, status.code()))
    }

    /// `osslsigncode --version`'s first line, e.g. "osslsigncode 2.9, using:".
    pub async fn version(&self) -> Result<String, SignError> {
        let out = tokio::process::Command::new(&self.program)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|source| SignError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text
            .lines()
            .next()
            .unwrap_or("osslsigncode (unknown version)");
        Ok(first
            .trim_end_matches([',', ' '])
            .trim_end_matches("using:")
            .trim_end_matches([',', ' '])
            .to_owned())
    }
}

/// Classifies a failed run from osslsigncode's stderr.
pub fn classify(stderr: &str, code: Option<i32>) -> SignError {
    let lower = stderr.to_ascii_lowercase();
    if lower.contains("pin_incorrect") || lower.contains("pin incorrect") {
        return SignError::PinRejected;
    }
    for marker in [
        "token_not_present",
        "device_removed",
        "no matching initialized token",
        "failed to enumerate slots",
        "device_error",
    ] {
        if lower.contains(marker) {
            return SignError::TokenLost(tail(stderr));
        }
    }
    let mut msg = tail(stderr);
    if msg.is_empty() {
        msg = format!(
            "exit status {}",
            code.map_or("signal".to_owned(), |c| c.to_string())
        );
    }
    SignError::Failed(msg)
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut out = lines.join("; ");
    if out.len() > STDERR_TAIL {
        let cut = out.len() - STDERR_TAIL;
        let cut = (cut..out.len())
            .find(|&i| out.is_char_boundary(i))
            .unwrap_or(out.len());
        out = format!("…{}", &out[cut..]);
    }
    out
}

/// An RFC 7512 PKCS#11 URI naming the token by label and serial and the object by id.
pub fn key_uri(key: &KeyRef, object_type: &str) -> String {
    let mut uri = format!(
        "pkcs11:token={};serial={}",
        pct(key.token_label.as_bytes()),
        pct(key.token_serial.as_bytes())
    );
    if key.id.is_empty() {
        uri.push_str(&format!(";object={}", pct(key.label.as_bytes())));
    } else {
        uri.push_str(";id=");
        for b in &key.id {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push_str(";type=");
    uri.push_str(object_type);
    uri
}

fn pct(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> KeyRef {
        KeyRef {
            token_label: "My Token;1".into(),
            token_serial: "a1b2c3".into(),
            id: vec![0x01, 0xab],
            label: "signkey".into(),
            cert_on_token: true,
        }
    }

    #[test]
    fn uri_selects_by_label_serial_and_id_and_escapes() {
        assert_eq!(
            key_uri(&key(), "private"),
            "pkcs11:token=My%20Token%3B1;serial=a1b2c3;id=%01%AB;type=private"
        );
        let k = KeyRef {
            id: vec![],
            ..key()
        };
        assert_eq!(
            key_uri(&k, "cert"),
            "pkcs11:token=My%20Token%3B1;serial=a1b2c3;object=signkey;type=cert"
        );
    }

    #[test]
    fn args_carry_no_pin_and_choose_the_certificate_source() {
        let s = Osslsigncode {
            program: "osslsigncode".into(),
            module: "/m.so".into(),
            certificate: None,
        };
        let spec = SignSpec {
            input: Path::new("/s/in"),
            output: Path::new("/s/out"),
            hash: DigestAlgorithm::Sha256,
            description: Some("App"),
            url: None,
        };
        let args: Vec<String> = s
            .args(&key(), &spec)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        assert!(
            joined.starts_with("sign -pkcs11module /m.so -key pkcs11:"),
            "{joined}"
        );
        assert!(joined.contains("-readpass /dev/stdin"), "{joined}");
        assert!(
            joined.contains(
                "-pkcs11cert pkcs11:token=My%20Token%3B1;serial=a1b2c3;id=%01%AB;type=cert"
            ),
            "{joined}"
        );
        assert!(
            joined.ends_with("-h sha256 -n App -in /s/in -out /s/out"),
            "{joined}"
        );
        assert!(
            !joined.contains("-pass ") && !joined.contains("pin-value"),
            "{joined}"
        );

        let with_file = Osslsigncode {
            certificate: Some("/c.pem".into()),
            ..s
        };
        let joined = with_file
            .args(&key(), &spec)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            joined.contains("-certs /c.pem") && !joined.contains("-pkcs11cert"),
            "{joined}"
        );
    }
}
