//! The agent's TOML configuration, and errors that name the file, the key and the fix.
//!
//! Owns its types, defaults and constants; imports nothing of the rest of the agent
//! (the signers and the token session import it).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use signet_protocol::endpoint::{Endpoint, DEFAULT_AGENT_PORT, VSOCK_CID_ANY};

/// Where the agent looks when `--config` is not given.
#[cfg(not(windows))]
pub const DEFAULT_PATH: &str = "/etc/signet/agent.toml";
/// Where the agent looks when `--config` is not given.
#[cfg(windows)]
pub const DEFAULT_PATH: &str = r"C:\ProgramData\Signet\agent.toml";

/// `agent.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the host daemon reaches the agent. Default: `vsock:any:7711`.
    #[serde(default = "default_listen")]
    pub listen: Endpoint,
    /// Where uploads wait while they are signed. Default: the system temp dir.
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    /// The agent's own state, 0700: its link key (`link.key`, `link.crt`, made at the
    /// first start), the paired host's key (`host.pin`) and an open pairing window.
    /// Default: `/var/lib/signet-agent`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    pub token: TokenConfig,
    #[serde(default)]
    pub signer: SignerConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// `[limits]`: what one connection from the host may cost the agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// The largest upload (one file, or a whole batch), in bytes. Default: 4 GiB.
    #[serde(default = "default_max_input_size")]
    pub max_input_size: u64,
    /// How long an upload may send nothing before it is abandoned. Default: 60.
    #[serde(default = "default_idle_seconds")]
    pub idle_seconds: u64,
    /// How long a connection may take for its TLS handshake and then for each
    /// request's headers. Default: 10.
    #[serde(default = "default_header_timeout_seconds")]
    pub header_timeout_seconds: u64,
    /// Connections served at once; the next waits in the kernel's backlog. Default: 64.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_input_size: default_max_input_size(),
            idle_seconds: default_idle_seconds(),
            header_timeout_seconds: default_header_timeout_seconds(),
            max_connections: default_max_connections(),
        }
    }
}

fn default_max_input_size() -> u64 {
    4 << 30
}
fn default_idle_seconds() -> u64 {
    60
}
fn default_header_timeout_seconds() -> u64 {
    10
}
fn default_max_connections() -> usize {
    64
}

/// Where the agent keeps its state when the configuration does not say.
#[cfg(not(windows))]
pub const DEFAULT_STATE_DIR: &str = "/var/lib/signet-agent";
/// Where the agent keeps its state when the configuration does not say.
#[cfg(windows)]
pub const DEFAULT_STATE_DIR: &str = r"C:\ProgramData\Signet\agent-state";

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

/// `[token]`: which PKCS#11 token holds the key, and how to log in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Path of the PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// Token label; at least one of `label` and `serial` is required.
    #[serde(default)]
    pub label: Option<String>,
    /// Token serial number.
    #[serde(default)]
    pub serial: Option<String>,
    /// Label of the private key; when absent the token must hold exactly one.
    #[serde(default)]
    pub key_label: Option<String>,
    /// A file holding the user PIN, readable by the agent's user only. Optional: the
    /// host may send the PIN instead (`POST /agent/v1/login`); a PIN sent that way and
    /// accepted by the token is used first.
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// A command (program and arguments) the agent runs when the host asks it to
    /// re-initialise PKCS#11 (the first step of the host's recovery ladder), before it
    /// does: restart what stands between the module and the token, e.g.
    /// `["systemctl", "restart", "pcscd"]` on Linux or
    /// `["powershell", "-Command", "Restart-Service SCardSvr"]` on Windows. Optional.
    #[serde(default)]
    pub reinit_command: Option<Vec<String>>,
}

/// Which program signs: `backend = "native"` (the default, every platform: the built-in
/// engine on the agent's own token session), `"osslsigncode"` or `"signtool"` (Windows
/// only, never the default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// osslsigncode with the token's PKCS#11 module (`token.module`), which logs in to
    /// the token itself for every job (the PIN on its stdin).
    Osslsigncode,
    /// The built-in Authenticode engine (signet-authenticode): one signature operation
    /// on the agent's logged-in session per job. PE files and digest-mode data are
    /// signed natively; MSI, CAB, PowerShell and APPX/MSIX files through osslsigncode's
    /// token-free `extract-data` and `attach-signature`. The default.
    #[default]
    Native,
    /// The Windows SDK's signtool with the token's CSP (`signer.csp`, `signer.container`)
    /// and the certificate exported to a file (`signer.certificate`).
    Signtool,
}

/// `[signer]`: the signing backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignerConfig {
    /// The program that signs. Default: the native engine.
    #[serde(default)]
    pub backend: Backend,
    /// The osslsigncode program (the osslsigncode backend's signer; the native
    /// engine's `extract-data` and `attach-signature` for MSI, CAB, PowerShell and
    /// APPX/MSIX). Default: `osslsigncode` from `PATH`.
    #[serde(default = "default_osslsigncode")]
    pub osslsigncode: PathBuf,
    /// The signing certificate (PEM or DER) when it is not on the token. When absent,
    /// the certificate on the token with the key's id is used.
    #[serde(default)]
    pub certificate: Option<PathBuf>,
    /// The longest one signing run may take, timestamping included, before it is
    /// stopped and the job fails. Default: 600.
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u64,
    /// A PEM file of CA certificates trusted for `https://` timestamp servers besides
    /// the system's roots: a private TSA's CA. The native engine's only. Optional.
    #[serde(default)]
    pub timestamp_ca_file: Option<PathBuf>,
    /// signtool: the program. Default: `signtool.exe` from `PATH`.
    #[serde(default = "default_signtool")]
    pub signtool: PathBuf,
    /// signtool: the token's cryptographic service provider. Default: SafeNet's
    /// "eToken Base Cryptographic Provider".
    #[serde(default = "default_csp")]
    pub csp: String,
    /// signtool: the key container on the token ("Container name" in SafeNet
    /// Authentication Client). Required with signtool.
    #[serde(default)]
    pub container: Option<String>,
    /// signtool: the reader, when several tokens are plugged in. Optional.
    #[serde(default)]
    pub reader: Option<String>,
}

impl Default for SignerConfig {
    fn default() -> Self {
        SignerConfig {
            backend: Backend::default(),
            osslsigncode: default_osslsigncode(),
            certificate: None,
            timeout_seconds: default_timeout_seconds(),
            timestamp_ca_file: None,
            signtool: default_signtool(),
            csp: default_csp(),
            container: None,
            reader: None,
        }
    }
}

fn default_signtool() -> PathBuf {
    PathBuf::from("signtool.exe")
}

/// The CSP SafeNet Authentication Client registers for eTokens (`signer.csp`'s default).
pub const SAFENET_CSP: &str = "eToken Base Cryptographic Provider";

fn default_csp() -> String {
    SAFENET_CSP.to_owned()
}

impl SignerConfig {
    /// Checks the backend's keys for a system that is Windows or not; the error names
    /// the key and the fix. `windows` is a parameter so both cases are tested anywhere.
    pub fn check_backend(&self, windows: bool) -> Result<(), (&'static str, String)> {
        match self.backend {
            Backend::Osslsigncode | Backend::Native => {
                for (key, set) in [
                    ("signer.container", self.container.is_some()),
                    ("signer.reader", self.reader.is_some()),
                ] {
                    if set {
                        return Err((
                            key,
                            "only the signtool backend uses it: set backend = \"signtool\" (Windows), or remove it".to_owned(),
                        ));
                    }
                }
                Ok(())
            }
            Backend::Signtool if !windows => Err((
                "signer.backend",
                "signtool runs on Windows only (it is part of the Windows SDK); on this system sign with backend = \"native\" (the default) or \"osslsigncode\", or run the agent in a Windows signing VM".to_owned(),
            )),
            Backend::Signtool => {
                if self.container.as_deref().unwrap_or("").is_empty() {
                    return Err((
                        "signer.container",
                        "signtool needs the token's key container: copy the \"Container name\" from SafeNet Authentication Client (Advanced View, the certificate) into container = \"...\"".to_owned(),
                    ));
                }
                if self.certificate.is_none() {
                    return Err((
                        "signer.certificate",
                        "signtool needs the token's certificate exported to a file (/f): export it from SafeNet Authentication Client and give its path".to_owned(),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// The longest one signing run may take when `signer.timeout_seconds` is not set.
pub const DEFAULT_SIGN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

fn default_timeout_seconds() -> u64 {
    DEFAULT_SIGN_TIMEOUT.as_secs()
}

fn default_listen() -> Endpoint {
    Endpoint::Vsock {
        cid: VSOCK_CID_ANY,
        port: DEFAULT_AGENT_PORT,
    }
}

fn default_osslsigncode() -> PathBuf {
    PathBuf::from("osslsigncode")
}

/// A configuration that cannot be used.
/// How to give the configuration, when it cannot be read.
const HINT: &str =
    "pass the agent's configuration with --config PATH (see packaging/agent.toml for an example)";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] signet_protocol::bootstrap::FileError),
    #[error("{path}: key {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

impl Config {
    /// Reads and checks the configuration at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = signet_protocol::bootstrap::read(path, HINT)?;
        Self::parse(path, &text)
    }

    /// Parses and checks configuration text; `path` is used in messages and to
    /// resolve relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut cfg: Config = signet_protocol::bootstrap::parse_toml(path, text)?;
        let invalid = |key, message: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message: message.to_owned(),
        };
        if cfg.token.label.as_deref().unwrap_or("").is_empty()
            && cfg.token.serial.as_deref().unwrap_or("").is_empty()
        {
            return Err(invalid(
                "token.label",
                "name the token by label or serial (token.label = \"...\" or token.serial = \"...\"); `signet-agent tokens` lists them",
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            Some(&mut cfg.token.module),
            cfg.token.pin_file.as_mut(),
            cfg.signer.certificate.as_mut(),
            cfg.signer.timestamp_ca_file.as_mut(),
            cfg.spool_dir.as_mut(),
            Some(&mut cfg.state_dir),
        ]
        .into_iter()
        .flatten()
        {
            // A root-relative Windows path (`\dir\file`) is not resolved here either.
            if p.is_relative() && !p.has_root() && p.components().count() > 1 {
                *p = base.join(&*p);
            }
        }
        for (key, v) in [
            ("limits.max_input_size", cfg.limits.max_input_size),
            ("limits.idle_seconds", cfg.limits.idle_seconds),
            (
                "limits.header_timeout_seconds",
                cfg.limits.header_timeout_seconds,
            ),
            ("limits.max_connections", cfg.limits.max_connections as u64),
        ] {
            if v == 0 {
                return Err(invalid(
                    key,
                    "must be at least 1; leave it out for the default",
                ));
            }
        }
        if cfg.signer.timeout_seconds == 0 {
            return Err(invalid(
                "signer.timeout_seconds",
                "give the time limit of one signing run in seconds, at least 1 (default 600)",
            ));
        }
        if let Some(ca) = &cfg.signer.timestamp_ca_file {
            check_ca_file(ca).map_err(|message| invalid("signer.timestamp_ca_file", &message))?;
        }
        if let Err((key, message)) = cfg.signer.check_backend(cfg!(windows)) {
            return Err(invalid(key, &message));
        }
        if cfg
            .token
            .reinit_command
            .as_ref()
            .is_some_and(|c| c.first().is_none_or(|p| p.is_empty()))
        {
            return Err(invalid(
                "token.reinit_command",
                "give the program and its arguments, e.g. reinit_command = [\"systemctl\", \"restart\", \"pcscd\"], or leave it out",
            ));
        }
        if !cfg.token.module.is_absolute() {
            return Err(invalid(
                "token.module",
                "give the PKCS#11 module as an absolute path, e.g. /usr/lib/softhsm/libsofthsm2.so",
            ));
        }
        Ok(cfg)
    }
}

/// That `path` is a PEM file holding at least one certificate; or why not, with the fix.
fn check_ca_file(path: &Path) -> Result<(), String> {
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "cannot read the CA certificates in {}: {e}; give a PEM file of the CA certificates that issued your https:// timestamp servers' certificates, or leave it out",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----); give the CA certificates that issued your https:// timestamp servers' certificates, or leave it out",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [token]
        module = "/usr/lib/softhsm/libsofthsm2.so"
        label = "signet-demo"
        pin_file = "pin"
    "#;

    /// `text` with the tests' module path made absolute on this platform (a path
    /// without a drive letter is not absolute on Windows).
    fn native(text: &str) -> String {
        if cfg!(windows) {
            text.replace(
                "/usr/lib/softhsm/libsofthsm2.so",
                "C:/SoftHSM2/lib/softhsm2-x64.dll",
            )
        } else {
            text.to_owned()
        }
    }

    fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::parse(path, &native(text))
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolves_relative_paths() {
        let cfg = parse(Path::new("/etc/signet/agent.toml"), MINIMAL).unwrap();
        assert_eq!(cfg.listen.to_string(), "vsock:any:7711");
        assert_eq!(cfg.signer.osslsigncode, PathBuf::from("osslsigncode"));
        assert_eq!(cfg.signer.timeout_seconds, 600);
        assert_eq!(
            cfg.token.pin_file,
            Some(PathBuf::from("pin")),
            "a bare name stays as written"
        );
        let cfg = parse(
            Path::new("/etc/signet/agent.toml"),
            &MINIMAL.replace("\"pin\"", "\"secrets/pin\""),
        )
        .unwrap();
        assert_eq!(
            cfg.token.pin_file,
            Some(PathBuf::from("/etc/signet/secrets/pin"))
        );
        let no_file = parse(
            Path::new("/etc/signet/agent.toml"),
            &MINIMAL.replace("pin_file = \"pin\"", ""),
        )
        .unwrap();
        assert_eq!(
            no_file.token.pin_file, None,
            "the PIN may come from the host"
        );
    }

    #[test]
    fn errors_name_file_key_and_fix() {
        let p = Path::new("/x/agent.toml");
        let no_token = parse(p, "listen = \"unix:/a\"").unwrap_err().to_string();
        assert!(no_token.starts_with("/x/agent.toml: "), "{no_token}");
        assert!(no_token.contains("token"), "{no_token}");

        let bad_ep = parse(p, &format!("listen = \"vsock:2\"\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(
            bad_ep.contains("listen") && bad_ep.contains("vsock:CID:PORT"),
            "{bad_ep}"
        );

        let typo = parse(p, &MINIMAL.replace("label =", "lable ="))
            .unwrap_err()
            .to_string();
        assert!(typo.contains("lable"), "{typo}");

        let neither = parse(p, &MINIMAL.replace("label = \"signet-demo\"", ""))
            .unwrap_err()
            .to_string();
        assert!(
            neither.contains("key token.label") && neither.contains("serial"),
            "{neither}"
        );

        let rel = parse(
            p,
            &MINIMAL.replace("/usr/lib/softhsm/libsofthsm2.so", "libsofthsm2.so"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            rel.contains("token.module") && rel.contains("absolute"),
            "{rel}"
        );

        let zero = parse(p, &format!("{MINIMAL}\n[signer]\ntimeout_seconds = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(zero.contains("key signer.timeout_seconds"), "{zero}");

        let missing = Config::load(Path::new("/nonexistent/agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("/nonexistent/agent.toml") && missing.contains("--config"),
            "{missing}"
        );
    }

    #[test]
    fn a_reinit_command_names_a_program() {
        let cfg = parse(
            Path::new("/etc/signet/agent.toml"),
            &format!("{MINIMAL}reinit_command = [\"pcscd\", \"--hotplug\"]\n"),
        )
        .unwrap();
        assert_eq!(
            cfg.token.reinit_command.as_deref(),
            Some(&["pcscd".to_owned(), "--hotplug".to_owned()][..])
        );
        let e = parse(
            Path::new("/etc/signet/agent.toml"),
            &format!("{MINIMAL}reinit_command = []\n"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("token.reinit_command"), "{e}");
    }

    #[test]
    fn the_native_backend_is_chosen_by_name_on_every_system() {
        let p = Path::new("/etc/signet/agent.toml");
        let cfg = parse(p, &format!("{MINIMAL}\n[signer]\nbackend = \"native\"\n")).unwrap();
        assert_eq!(cfg.signer.backend, Backend::Native);
        assert_eq!(cfg.signer.check_backend(false), Ok(()));
        assert_eq!(cfg.signer.check_backend(true), Ok(()));
        let e = parse(
            p,
            &format!("{MINIMAL}\n[signer]\nbackend = \"native\"\ncontainer = \"te-1\"\n"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("signer.container"), "{e}");
    }

    #[test]
    fn the_backend_is_native_unless_another_is_chosen_and_signtool_only_on_windows() {
        let p = Path::new("/etc/signet/agent.toml");
        let cfg = parse(p, MINIMAL).unwrap();
        assert_eq!(cfg.signer.backend, Backend::Native);
        assert_eq!(SignerConfig::default().backend, Backend::Native);
        let explicit = parse(
            p,
            &format!("{MINIMAL}\n[signer]\nbackend = \"osslsigncode\"\n"),
        )
        .unwrap();
        assert_eq!(explicit.signer.backend, Backend::Osslsigncode);

        let signtool = format!(
            "{MINIMAL}\n[signer]\nbackend = \"signtool\"\ncertificate = \"codesign.cer\"\ncontainer = \"te-ee307152\"\n"
        );
        let chosen: Config = toml::from_str(&native(&signtool)).unwrap();
        assert_eq!(chosen.signer.backend, Backend::Signtool);
        assert_eq!(chosen.signer.signtool, PathBuf::from("signtool.exe"));
        assert_eq!(chosen.signer.csp, SAFENET_CSP);
        assert_eq!(chosen.signer.check_backend(true), Ok(()));
        let (key, fix) = chosen.signer.check_backend(false).unwrap_err();
        assert_eq!(key, "signer.backend");
        assert!(
            fix.contains("Windows only")
                && fix.contains("backend = \"native\" (the default)")
                && fix.contains("\"osslsigncode\""),
            "{fix}"
        );
        // What this system says, through the whole parse.
        let whole = parse(p, &signtool);
        assert_eq!(whole.is_ok(), cfg!(windows), "{:?}", whole.as_ref().err());
        if let Err(e) = whole {
            assert!(e.to_string().contains("key signer.backend"), "{e}");
        }

        let mut no_container = chosen.signer.clone();
        no_container.container = None;
        let (key, fix) = no_container.check_backend(true).unwrap_err();
        assert_eq!(key, "signer.container");
        assert!(fix.contains("Container name"), "{fix}");
        let mut no_cert = chosen.signer.clone();
        no_cert.certificate = None;
        assert_eq!(
            no_cert.check_backend(true).unwrap_err().0,
            "signer.certificate"
        );

        let stray = parse(p, &format!("{MINIMAL}\n[signer]\ncontainer = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            stray.contains("key signer.container") && stray.contains("signtool"),
            "{stray}"
        );
        let typo = parse(p, &format!("{MINIMAL}\n[signer]\nbackend = \"signtol\"\n"))
            .unwrap_err()
            .to_string();
        assert!(typo.contains("signtol"), "{typo}");
    }

    #[test]
    fn the_timestamp_ca_file_is_resolved_and_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        let with = |file: &str| format!("{MINIMAL}\n[signer]\ntimestamp_ca_file = \"{file}\"\n");
        let missing = parse(&p, &with("tsa/ca.pem")).unwrap_err().to_string();
        assert!(
            missing.contains("key signer.timestamp_ca_file")
                && missing.contains(&dir.path().join("tsa/ca.pem").display().to_string())
                && missing.contains("give a PEM file"),
            "{missing}"
        );
        std::fs::create_dir(dir.path().join("tsa")).unwrap();
        std::fs::write(dir.path().join("tsa/ca.pem"), "not a certificate\n").unwrap();
        let empty = parse(&p, &with("tsa/ca.pem")).unwrap_err().to_string();
        assert!(
            empty.contains("key signer.timestamp_ca_file") && empty.contains("no PEM certificate"),
            "{empty}"
        );
        // A CA certificate (whether it is the server's, TLS tells when one is asked).
        let (ca, _, _) = signet_test_support::make_tls(&dir.path().join("tsa"));
        std::fs::rename(ca, dir.path().join("tsa/ca.pem")).unwrap();
        let cfg = parse(&p, &with("tsa/ca.pem")).unwrap();
        assert_eq!(
            cfg.signer.timestamp_ca_file,
            Some(dir.path().join("tsa/ca.pem"))
        );
        assert_eq!(parse(&p, MINIMAL).unwrap().signer.timestamp_ca_file, None);
    }
}
