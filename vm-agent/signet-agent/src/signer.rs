//! The osslsigncode backend: building its command line, running it with the PIN on
//! stdin, and classifying how it failed.
//!
//! The PIN never appears on a command line, in the environment or in a log: it is
//! written to the child's stdin and the pipe is closed. osslsigncode reads it with
//! `-readpass /dev/stdin`, which works with every version that has `-readpass`
//! (`-readpass -` needs 2.9).
//!
//! Profile options map to osslsigncode flags that 2.5 has (README.md, "osslsigncode
//! versions"): `-h` (hash), `-ph` (page hashes, PE
//! only), `-nest` (keep an existing signature and add ours beside it), `-n`/`-i`
//! (description, URL) and one `-ts URL` per RFC 3161 server. osslsigncode itself tries
//! the `-ts` servers in the order given and stops at the first that returns a
//! timestamp; when none does, it fails with "RFC 3161 timestamping failed" and writes
//! nothing. Its HTTP client has no time limit, so a whole run has one ([`Osslsigncode::timeout`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cryptoki::types::AuthPin;
use futures_util::future::BoxFuture;
use signet_api::wire::{osslsigncode, SignMode, SignResponse, SignerFeatures};
use signet_format::Format;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::{Made, SignError, SignSpec, Signer};
use crate::config::Config;
use crate::token::KeyRef;

/// The longest tail of osslsigncode's stderr kept for an error message.
const STDERR_TAIL: usize = 2048;

/// osslsigncode with a PKCS#11 module.
#[derive(Debug, Clone)]
pub struct Osslsigncode {
    pub program: PathBuf,
    pub module: PathBuf,
    /// Certificate file; `None` takes the certificate from the token.
    pub certificate: Option<PathBuf>,
    /// The longest one run may take before it is stopped.
    pub timeout: Duration,
}

/// The default of [`Osslsigncode::timeout`].
pub use crate::config::DEFAULT_SIGN_TIMEOUT as DEFAULT_TIMEOUT;

impl Osslsigncode {
    /// osslsigncode as `cfg` sets it up: its program, the token's module, the
    /// certificate file if one is given, the time limit of a run.
    pub fn from_config(cfg: &Config) -> Osslsigncode {
        Osslsigncode {
            program: cfg.signer.osslsigncode.clone(),
            module: cfg.token.module.clone(),
            certificate: cfg.signer.certificate.clone(),
            timeout: Duration::from_secs(cfg.signer.timeout_seconds),
        }
    }

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
        if spec.page_hashes && spec.format == Some(Format::Pe) {
            a.push("-ph".into());
        }
        // osslsigncode 2.9 cannot nest in a catalog or an APPX package: it warns and
        // replaces the signature. (Nor does `-h` apply to APPX: the package's
        // AppxBlockMap.xml names its hash, and osslsigncode signs with that.)
        if spec.nested
            && spec
                .format
                .is_some_and(|f| !matches!(f, Format::Cat | Format::Appx))
        {
            a.push("-nest".into());
        }
        for url in spec.timestamp {
            a.push("-ts".into());
            a.push(url.into());
        }
        a.push("-in".into());
        a.push(spec.input.into());
        a.push("-out".into());
        a.push(spec.output.into());
        a
    }

    /// Signs as `spec` says; the PIN goes to osslsigncode's stdin. A nested signature
    /// asked for on a file that has none becomes a plain one.
    pub async fn sign(
        &self,
        key: &KeyRef,
        pin: &AuthPin,
        spec: &SignSpec<'_>,
    ) -> Result<(), SignError> {
        match self.run(self.args(key, spec), pin, spec.timestamp).await {
            Err(SignError::NothingToNest) if spec.nested => {
                tracing::info!("the file has no signature yet; signing it without nesting");
                let _ = tokio::fs::remove_file(spec.output).await;
                let plain = SignSpec {
                    nested: false,
                    ..spec.clone()
                };
                self.run(self.args(key, &plain), pin, spec.timestamp).await
            }
            other => other,
        }
    }

    /// Writes the signature of the signed file `signed` to `out` (DER PKCS#7), with
    /// `osslsigncode extract-signature`. Needs no token and no PIN.
    pub async fn extract_signature(&self, signed: &Path, out: &Path) -> Result<(), SignError> {
        let run = tokio::process::Command::new(&self.program)
            .arg("extract-signature")
            .arg("-in")
            .arg(signed)
            .arg("-out")
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| SignError::TimedOut(self.timeout))?
            .map_err(|source| SignError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        if out.status.success() {
            return Ok(());
        }
        Err(SignError::Failed(format!(
            "extract-signature: {}",
            tail(&String::from_utf8_lossy(&out.stderr))
        )))
    }

    /// Runs osslsigncode once with `args`, the PIN on its stdin, within the time limit.
    async fn run(
        &self,
        args: Vec<OsString>,
        pin: &AuthPin,
        timestamp: &[String],
    ) -> Result<(), SignError> {
        use secrecy::ExposeSecret;
        let spawn_error = |source| SignError::Spawn {
            program: self.program.clone(),
            source,
        };
        let mut child = tokio::process::Command::new(&self.program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        let stdin = child.stdin.take();
        let stderr_pipe = child.stderr.take();
        let finished = tokio::time::timeout(self.timeout, async {
            if let Some(mut stdin) = stdin {
                // A child that exits before reading its PIN closes the pipe; its exit
                // status and stderr say why, so a write error here is not the story.
                let _ = stdin.write_all(pin.expose_secret().as_bytes()).await;
                let _ = stdin.shutdown().await;
            }
            let mut stderr = Vec::new();
            if let Some(mut err) = stderr_pipe {
                let _ = err.read_to_end(&mut stderr).await;
            }
            child.wait().await.map(|status| (status, stderr))
        })
        .await;
        let (status, stderr) = match finished {
            Ok(done) => done.map_err(spawn_error)?,
            Err(_elapsed) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(SignError::TimedOut(self.timeout));
            }
        };
        if status.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&stderr);
        Err(classify(&text, status.code(), timestamp))
    }

    /// `osslsigncode --version`'s first line, e.g. "osslsigncode 2.9, using:", and
    /// what this osslsigncode can do ([`features`], from `--version` and `--help`).
    pub async fn version(&self) -> Result<(String, SignerFeatures), SignError> {
        let run = |arg: &'static str| {
            tokio::process::Command::new(&self.program)
                .arg(arg)
                .stdin(Stdio::null())
                .output()
        };
        let spawn = |source| SignError::Spawn {
            program: self.program.clone(),
            source,
        };
        let out = run("--version").await.map_err(spawn)?;
        let help = run("--help").await.map_err(spawn)?;
        // 2.9 prints to stdout, older ones partly to stderr: read both.
        let help_text = format!(
            "{}{}",
            String::from_utf8_lossy(&help.stdout),
            String::from_utf8_lossy(&help.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let features = features(&text, &help_text);
        let first = text
            .lines()
            .next()
            .unwrap_or("osslsigncode (unknown version)");
        let first = first
            .trim_end_matches([',', ' '])
            .trim_end_matches("using:")
            .trim_end_matches([',', ' '])
            .to_owned();
        Ok((first, features))
    }
}

impl Signer for Osslsigncode {
    fn program(&self) -> &Path {
        &self.program
    }

    fn certificate_file(&self) -> Option<&Path> {
        self.certificate.as_deref()
    }

    fn version(&self) -> BoxFuture<'_, Result<(String, SignerFeatures), SignError>> {
        Box::pin(Osslsigncode::version(self))
    }

    /// osslsigncode goes by what its version can do ([`unsupported`]).
    fn refuses(
        &self,
        features: &SignerFeatures,
        mode: SignMode,
        format: Option<Format>,
        _response: SignResponse,
    ) -> Option<String> {
        unsupported(features, mode, format)
    }

    fn sign<'a>(
        &'a self,
        key: &'a KeyRef,
        pin: &'a AuthPin,
        spec: &'a SignSpec<'a>,
    ) -> BoxFuture<'a, Result<Made, SignError>> {
        Box::pin(async move {
            Osslsigncode::sign(self, key, pin, spec).await?;
            Ok(Made::default())
        })
    }

    fn extract_signature<'a>(
        &'a self,
        signed: &'a Path,
        out: &'a Path,
    ) -> BoxFuture<'a, Result<(), SignError>> {
        Box::pin(Osslsigncode::extract_signature(self, signed, out))
    }
}

/// What an osslsigncode can do, from its `--version` and `--help` outputs (pure).
///
/// Debian 12's osslsigncode is 2.5: it signs PE, MSI, CAB and CAT files and has
/// `attach-signature`, but no `extract-data` and no PowerShell. 2.8 added both, and
/// `sign` of the `extract-data` blob, which is what digest mode needs
/// (`signet_api::wire::osslsigncode`).
pub fn features(version_output: &str, help_output: &str) -> SignerFeatures {
    let version = parse_version(version_output);
    let at_least = |want: (u32, u32)| version.is_some_and(|v| v >= want);
    let has_command = |name: &str| {
        help_output.lines().any(|l| {
            let l = l.trim_start();
            l.split_whitespace().next() == Some(name)
        })
    };
    let extract_data = has_command("extract-data");
    let mut modes = vec![SignMode::Whole];
    if extract_data {
        modes.push(SignMode::Digest);
    }
    SignerFeatures {
        version: version.map_or_else(String::new, |(a, b)| format!("{a}.{b}")),
        modes,
        extract_data,
        attach_signature: has_command("attach-signature"),
        powershell: at_least(osslsigncode::POWERSHELL),
    }
}

/// `MAJOR.MINOR` from "osslsigncode 2.9, using:" (the first line of `--version`).
fn parse_version(output: &str) -> Option<(u32, u32)> {
    let first = output.lines().next()?;
    let rest = first.trim().strip_prefix("osslsigncode")?.trim_start();
    let number: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = number.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

/// Why a signing request cannot be served by this osslsigncode; `None` when it can.
pub fn unsupported(
    features: &SignerFeatures,
    mode: SignMode,
    format: Option<Format>,
) -> Option<String> {
    let version = if features.version.is_empty() {
        "of unknown version".to_owned()
    } else {
        features.version.clone()
    };
    if !features.modes.contains(&mode) {
        let digest = osslsigncode::shown(osslsigncode::DIGEST);
        return Some(format!(
            "this signing VM's osslsigncode {version} cannot sign digest-mode data (it has no extract-data; {digest} or later does): send the whole file instead, or install osslsigncode {digest} or later in the signing VM"
        ));
    }
    if format == Some(Format::PowerShell) && !features.powershell {
        let powershell = osslsigncode::shown(osslsigncode::POWERSHELL);
        return Some(format!(
            "this signing VM's osslsigncode {version} cannot sign PowerShell files ({powershell} or later can): install osslsigncode {powershell} or later in the signing VM"
        ));
    }
    if format == Some(Format::Appx) && !at_least(features, osslsigncode::APPX) {
        let appx = osslsigncode::shown(osslsigncode::APPX);
        return Some(format!(
            "this signing VM's osslsigncode {version} cannot sign APPX/MSIX packages ({appx} or later can): install osslsigncode {appx} or later in the signing VM"
        ));
    }
    None
}

/// Whether the osslsigncode `features` describe is `want` or later.
fn at_least(features: &SignerFeatures, want: osslsigncode::Version) -> bool {
    parse_version(&format!("osslsigncode {}", features.version)).is_some_and(|v| v >= want)
}

/// Classifies a failed run from osslsigncode's stderr; `timestamp` are the servers
/// the run was given.
pub fn classify(stderr: &str, code: Option<i32>, timestamp: &[String]) -> SignError {
    let lower = stderr.to_ascii_lowercase();
    if lower.contains("pin_incorrect") || lower.contains("pin incorrect") {
        return SignError::PinRejected;
    }
    if lower.contains("rfc 3161 timestamping failed") {
        return SignError::Timestamp {
            tried: timestamp.to_vec(),
            why: None,
        };
    }
    if lower.contains("unable to extract existing signature") {
        return SignError::NothingToNest;
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
    // What osslsigncode says of a file whose structure is broken, past what
    // `structure::check` looks at (warnings about timestamps aside).
    let damaged = stderr.lines().map(str::trim).find(|l| {
        let l = l.to_ascii_lowercase();
        !l.starts_with("warning")
            && (l.starts_with("corrupt")
                || l.contains("file is too short")
                || l.contains("unsupported input file type"))
    });
    if let Some(line) = damaged {
        return SignError::Damaged(line.to_owned());
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
    use signet_api::wire::{DigestAlgorithm, ErrorCode};

    macro_rules! recorded {
        ($name:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/osslsigncode/",
                $name
            ))
        };
    }

    #[test]
    fn features_of_recorded_osslsigncode_2_5_and_2_9() {
        let old = features(recorded!("2.5-version.txt"), recorded!("2.5-help.txt"));
        assert_eq!(
            old,
            SignerFeatures {
                version: "2.5".into(),
                modes: vec![SignMode::Whole],
                extract_data: false,
                attach_signature: true,
                powershell: false,
            }
        );
        let new = features(recorded!("2.9-version.txt"), recorded!("2.9-help.txt"));
        assert_eq!(
            new,
            SignerFeatures {
                version: "2.9".into(),
                modes: vec![SignMode::Whole, SignMode::Digest],
                extract_data: true,
                attach_signature: true,
                powershell: true,
            }
        );
        // Words in descriptions are not commands.
        let none = features(
            "osslsigncode 2.10\n",
            "  sign  = digitally sign\nuse extract-data later\n",
        );
        assert_eq!(none.version, "2.10");
        assert!(!none.extract_data && !none.attach_signature);
        assert!(none.powershell, "2.10 is after 2.8");
        let unknown = features("something else\n", "");
        assert_eq!(unknown.version, "");
        assert_eq!(unknown.modes, vec![SignMode::Whole]);
    }

    #[test]
    fn requests_an_osslsigncode_cannot_serve_are_refused_with_the_fix() {
        let old = features(recorded!("2.5-version.txt"), recorded!("2.5-help.txt"));
        let new = features(recorded!("2.9-version.txt"), recorded!("2.9-help.txt"));
        let msg = unsupported(&old, SignMode::Digest, None).unwrap();
        assert!(
            msg.contains("osslsigncode 2.5 cannot sign digest-mode data"),
            "{msg}"
        );
        assert!(msg.contains("send the whole file"), "{msg}");
        let msg = unsupported(&old, SignMode::Whole, Some(Format::PowerShell)).unwrap();
        assert!(
            msg.contains("PowerShell") && msg.contains("2.8 or later"),
            "{msg}"
        );
        assert_eq!(unsupported(&old, SignMode::Whole, Some(Format::Pe)), None);
        assert_eq!(unsupported(&new, SignMode::Digest, None), None);
        assert_eq!(
            unsupported(&new, SignMode::Whole, Some(Format::PowerShell)),
            None
        );
        let msg = unsupported(&old, SignMode::Whole, Some(Format::Appx)).unwrap();
        assert!(
            msg.contains("osslsigncode 2.5 cannot sign APPX/MSIX") && msg.contains("2.7 or later"),
            "{msg}"
        );
        assert_eq!(unsupported(&new, SignMode::Whole, Some(Format::Appx)), None);
    }
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

    fn signer(certificate: Option<&str>) -> Osslsigncode {
        Osslsigncode {
            program: "osslsigncode".into(),
            module: "/m.so".into(),
            certificate: certificate.map(PathBuf::from),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    fn spec(format: Format) -> SignSpec<'static> {
        SignSpec {
            input: Path::new("/s/in.exe"),
            output: Path::new("/s/out"),
            format: Some(format),
            hash: DigestAlgorithm::Sha256,
            description: Some("App"),
            url: None,
            page_hashes: false,
            nested: false,
            timestamp: &[],
            digested: None,
        }
    }

    fn joined(s: &Osslsigncode, spec: &SignSpec<'_>) -> String {
        s.args(&key(), spec)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn args_carry_no_pin_and_choose_the_certificate_source() {
        let joined = joined(&signer(None), &spec(Format::Pe));
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
            joined.ends_with("-h sha256 -n App -in /s/in.exe -out /s/out"),
            "{joined}"
        );
        assert!(
            !joined.contains("-pass ") && !joined.contains("pin-value"),
            "{joined}"
        );

        let joined = self::joined(&signer(Some("/c.pem")), &spec(Format::Pe));
        assert!(
            joined.contains("-certs /c.pem") && !joined.contains("-pkcs11cert"),
            "{joined}"
        );
    }

    #[test]
    fn profile_options_become_flags() {
        let servers = [
            "http://tsa1.example/".to_owned(),
            "http://tsa2.example/ts".to_owned(),
        ];
        let full = SignSpec {
            hash: DigestAlgorithm::Sha384,
            url: Some("https://example.com/"),
            page_hashes: true,
            nested: true,
            timestamp: &servers,
            digested: None,
            ..spec(Format::Pe)
        };
        let j = joined(&signer(None), &full);
        assert!(
            j.ends_with(
                "-h sha384 -n App -i https://example.com/ -ph -nest \
                 -ts http://tsa1.example/ -ts http://tsa2.example/ts -in /s/in.exe -out /s/out"
            ),
            "the servers in the profile's order: {j}"
        );
        // Page hashes exist for PE files only; the rest apply to every format.
        for format in [Format::Msi, Format::Cab, Format::PowerShell] {
            let j = joined(
                &signer(None),
                &SignSpec {
                    format: Some(format),
                    ..full.clone()
                },
            );
            assert!(!j.contains("-ph"), "{format}: {j}");
            assert!(
                j.contains("-nest -ts http://tsa1.example/ -ts"),
                "{format}: {j}"
            );
        }
        // Catalogs and APPX packages hold one signature.
        for format in [Format::Cat, Format::Appx] {
            let j = joined(
                &signer(None),
                &SignSpec {
                    format: Some(format),
                    ..full.clone()
                },
            );
            assert!(!j.contains("-ph") && !j.contains("-nest"), "{j}");
            assert!(j.contains("-ts http://tsa1.example/ -ts"), "{j}");
        }
        let j = joined(&signer(None), &spec(Format::Pe));
        assert!(
            !j.contains("-ph") && !j.contains("-nest") && !j.contains("-ts"),
            "{j}"
        );
    }

    #[test]
    fn failures_are_classified_from_what_osslsigncode_prints() {
        let servers = [
            "http://127.0.0.1:9/".to_owned(),
            "http://tsa.example/".to_owned(),
        ];
        // osslsigncode 2.9, every -ts server refusing the connection.
        let ts = "HTTP failure: Failed to get data from http://127.0.0.1:9/\n\n\
            HTTP failure: Failed to get data from http://tsa.example/\n\
            RFC 3161 timestamping failed\n\
            Use the \"-t\" option to add the Authenticode Time-Stamp Authority or choose another one RFC3161 Time-Stamp Authority\n\
            Unable to set unauthenticated attributes\n\
            4060D29CCA7F0000:error:8000006F:system library:BIO_connect:Connection refused:../crypto/bio/bio_sock2.c:117:calling connect()\n";
        let e = classify(ts, Some(255), &servers);
        assert!(
            matches!(&e, SignError::Timestamp { tried, .. } if tried == &servers),
            "{e:?}"
        );
        assert_eq!(e.code(), ErrorCode::SigningFailed);
        let msg = e.to_string();
        assert!(
            msg.contains("tried in this order: http://127.0.0.1:9/, http://tsa.example/")
                && msg.contains("nothing was signed"),
            "{msg}"
        );
        // -nest on a file without a signature.
        let nest = "No signature found\nUnable to extract existing signature\n40500A8B5F7F0000:error:1E08010C:DECODER routines::unsupported\n";
        assert!(matches!(
            classify(nest, Some(255), &[]),
            SignError::NothingToNest
        ));
        let pin = "PKCS11_login:pin incorrect\nFailed to load private key\n";
        assert!(matches!(
            classify(pin, Some(255), &[]),
            SignError::PinRejected
        ));
        let gone = "PKCS11_enumerate_slots:Failed to enumerate slots\n";
        assert!(matches!(
            classify(gone, Some(255), &[]),
            SignError::TokenLost(_)
        ));
        // A file osslsigncode finds broken is bad input, not a failed signature.
        let corrupt = classify(
            "Corrupt PE file - found unknown magic 0107\nFailed\n",
            Some(255),
            &[],
        );
        assert!(
            matches!(&corrupt, SignError::Damaged(m) if m == "Corrupt PE file - found unknown magic 0107"),
            "{corrupt:?}"
        );
        assert_eq!(corrupt.code(), ErrorCode::BadInput);
        assert!(corrupt.to_string().contains("damaged or cut short"));
        let short = classify(
            "Unrecognized file type - file is too short: x.exe\nInitialization error or unsupported input file type.\n",
            Some(1),
            &[],
        );
        assert!(matches!(short, SignError::Damaged(_)), "{short:?}");
        let warned = classify(
            "Warning: Corrupt RFC3161 Timestamp embedded content\nsomething else failed\n",
            Some(1),
            &[],
        );
        assert!(
            matches!(&warned, SignError::Failed(m) if m.contains("something else")),
            "{warned:?}"
        );
        assert!(
            matches!(classify("", None, &[]), SignError::Failed(m) if m == "exit status signal")
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_run_that_does_not_finish_in_time_is_stopped() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // A signer that never finishes, as osslsigncode does waiting on a silent
        // timestamp server; it records its pid so the test can see it is gone.
        let prog = dir.path().join("hang");
        let pidfile = dir.path().join("pid");
        std::fs::write(
            &prog,
            format!(
                "#!/bin/sh\necho $$ > {}\nexec sleep 600\n",
                pidfile.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = Osslsigncode {
            program: prog,
            timeout: Duration::from_millis(300),
            ..signer(None)
        };
        let pin = AuthPin::new("123456".into());
        let err = s.sign(&key(), &pin, &spec(Format::Pe)).await.unwrap_err();
        assert!(matches!(err, SignError::TimedOut(_)), "{err:?}");
        assert_eq!(err.code(), ErrorCode::SigningFailed);
        assert!(err.to_string().contains("timestamp server"), "{err}");
        // Stopped and reaped: no such process any more, not even a zombie. (A loaded
        // machine may stop it before it wrote its pid; then there is nothing to see.)
        if let Ok(pid) = std::fs::read_to_string(&pidfile) {
            let pid = pid.trim();
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "pid {pid} still there"
            );
        }
    }
}
