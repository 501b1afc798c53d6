//! The authenticated link between `signetd` and `signet-agent`.
//!
//! Each side holds a long-term key made at its first start (`link.key` with its
//! self-signed certificate `link.crt`, 0600 in its state directory) and pins the other
//! side's key by fingerprint (the SHA-256 of its certificate): the host keeps the
//! agent's in `agent.pin`, the agent the host's in `host.pin`. Every request between
//! them travels in TLS 1.3 over whatever transport joins them (vsock, a hybrid vsock's
//! unix socket, a unix socket, TCP), the agent as the server, the host as the client
//! presenting its key. Neither side trusts a CA: only the pinned key is accepted, so a
//! process that can merely reach a port (every host process is vsock CID 2) or bind
//! one (any user in the signing VM while the agent is down) gets nothing and learns
//! nothing — no PIN, no job, no event.
//!
//! **Pairing** is how the pins are set, once, by the operator:
//! 1. In the signing VM, as root, `signet-agent pair` opens a pairing window (the file
//!    `pairing` in the agent's state directory: a fresh one-time code of 80 random
//!    bits, valid for [`PAIRING_WINDOW`]) and shows the code and the agent's
//!    fingerprint.
//! 2. On the host, as root, `signetd pair CODE` connects with the host's key; while a
//!    window is open the agent accepts a host key it has not pinned, for the pairing
//!    request only. The host sends `HMAC-SHA256(code, "host" ‖ host key ‖ agent key)`;
//!    the agent closes the window whatever the outcome (one attempt per code), checks
//!    the proof, pins the host's key and answers with `HMAC-SHA256(code, "agent" ‖
//!    agent key ‖ host key)`, which the host checks before it pins the agent's key.
//!
//! Both proofs bind the code to the two keys of this very TLS connection, so a
//! listener in the middle has nothing to relay, and without the code — shown only on
//! the signing VM's console to its root — neither side can be impersonated. A wrong or
//! raced attempt costs the window, never a pin. HMAC is a keyed hash from RustCrypto,
//! TLS is rustls; no cryptography of our own.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::endpoint::Endpoint;

/// The key's file in a state directory (PKCS#8 PEM, 0600).
pub const KEY_FILE: &str = "link.key";
/// The key's self-signed certificate (PEM).
pub const CERT_FILE: &str = "link.crt";
/// Where the host keeps the paired agent's fingerprint.
pub const AGENT_PIN_FILE: &str = "agent.pin";
/// Where the agent keeps the paired host's fingerprint.
pub const HOST_PIN_FILE: &str = "host.pin";
/// Where the agent keeps an open pairing window.
pub const PAIRING_FILE: &str = "pairing";
/// How long a pairing window stays open.
pub const PAIRING_WINDOW: Duration = Duration::from_secs(600);
/// The name the host asks for in its TLS hello; not checked (the key is pinned).
const SERVER_NAME: &str = "signet-agent";

/// What went wrong with the link's keys, pins or pairing.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LinkError + '_ {
    move |source| LinkError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A key's fingerprint: the SHA-256 of its certificate, shown as `SHA256:` + base64
/// (as OpenSSH shows keys).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(cert_der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(cert_der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use base64::Engine;
        write!(
            f,
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(self.0)
        )
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = LinkError;
    fn from_str(s: &str) -> Result<Self, LinkError> {
        use base64::Engine;
        let b64 = s.trim().strip_prefix("SHA256:").ok_or_else(|| {
            LinkError::Invalid(format!("{s:?} is not a key fingerprint (SHA256:...)"))
        })?;
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(b64.trim_end_matches('='))
            .map_err(|e| LinkError::Invalid(format!("{s:?} is not a key fingerprint: {e}")))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| LinkError::Invalid(format!("{s:?} is not a SHA-256 key fingerprint")))?;
        Ok(Fingerprint(arr))
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One side's long-term key and certificate.
#[derive(Debug)]
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    /// This key's fingerprint, as the other side pins it.
    pub fingerprint: Fingerprint,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint,
        }
    }
}

impl Identity {
    /// The key in `dir` (made there, with `dir` itself 0700, when there is none yet).
    /// `name` is the certificate's subject (`signetd`, `signet-agent`). A key file that
    /// others may read is refused with the fix.
    pub fn load_or_create(dir: &Path, name: &str) -> Result<Self, LinkError> {
        let key_path = dir.join(KEY_FILE);
        if !key_path.exists() {
            make_private_dir(dir)?;
            let key = rcgen::KeyPair::generate()
                .map_err(|e| LinkError::Invalid(format!("making the link key: {e}")))?;
            let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])
                .map_err(|e| LinkError::Invalid(format!("the link certificate: {e}")))?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let cert = params
                .self_signed(&key)
                .map_err(|e| LinkError::Invalid(format!("the link certificate: {e}")))?;
            // Key and certificate in one file, made whole and then linked into place
            // only if no other process (the daemon starting beside `pair`) made one
            // first: the first key made is the one every process uses.
            let both = zeroize::Zeroizing::new(format!("{}{}", key.serialize_pem(), cert.pem()));
            let tmp = write_private_tmp(&key_path, both.as_bytes())?;
            let linked = std::fs::hard_link(&tmp, &key_path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => sync_dir(dir),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&key_path)(e)),
            }
        }
        let identity = Self::load(dir)?;
        // The certificate alone beside it, for tools (curl --cert); rewritten from the
        // key file when it differs.
        let cert_path = dir.join(CERT_FILE);
        let pem = pem_of(&identity.cert);
        if std::fs::read_to_string(&cert_path).ok().as_deref() != Some(pem.as_str()) {
            write_private(&cert_path, pem.as_bytes())?;
        }
        Ok(identity)
    }

    /// The key already in `dir` (`link.key`: the private key and its certificate).
    pub fn load(dir: &Path) -> Result<Self, LinkError> {
        let key_path = dir.join(KEY_FILE);
        check_private_file(&key_path)?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
            LinkError::Invalid(format!(
                "{}: not a private key ({e}); move it away and start again to make a new key (then pair again)",
                key_path.display()
            ))
        })?;
        let cert = CertificateDer::from_pem_file(&key_path).map_err(|e| {
            LinkError::Invalid(format!(
                "{}: holds no certificate ({e}); move it away and start again to make a new key (then pair again)",
                key_path.display()
            ))
        })?;
        let fingerprint = Fingerprint::of(&cert);
        Ok(Identity {
            cert,
            key,
            fingerprint,
        })
    }
}

/// A certificate as PEM.
fn pem_of(cert: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn make_private_dir(dir: &Path) -> Result<(), LinkError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir).map_err(io_err(dir))
    }
}

/// Writes `bytes` to a new temporary file beside `path` (a name of this process's own),
/// readable by its owner only, synced; returns its path.
fn write_private_tmp(path: &Path, bytes: &[u8]) -> Result<PathBuf, LinkError> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    Ok(tmp)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `bytes` to `path` atomically, readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), LinkError> {
    let tmp = write_private_tmp(path, bytes)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

fn check_private_file(path: &Path) -> Result<(), LinkError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(LinkError::Invalid(format!(
                "{} belongs to uid {}, not to this process (uid {me}); fix: chown {me} {}",
                path.display(),
                meta.uid(),
                path.display()
            )));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(LinkError::Invalid(format!(
                "{} may be read by others (mode {:o}); fix: chmod 600 {} (and consider the key seen: make a new one and pair again)",
                path.display(),
                meta.mode() & 0o777,
                path.display()
            )));
        }
    }
    let _ = meta;
    Ok(())
}

/// The fingerprint pinned in `path`; `None` when nothing is pinned yet.
pub fn read_pin(path: &Path) -> Result<Option<Fingerprint>, LinkError> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().map(Some).map_err(|e| {
            LinkError::Invalid(format!(
                "{}: {e}; pair again to write it anew",
                path.display()
            ))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LinkError::Io {
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Pins `fp` in `path` (0600, atomically).
pub fn write_pin(path: &Path, fp: &Fingerprint) -> Result<(), LinkError> {
    write_private(path, format!("{fp}\n").as_bytes())
}

// ---------------------------------------------------------------------------------
// Pairing codes and proofs.

/// The letters of a pairing code: no 0/O or 1/I/L to mix up (31 of them).
pub(crate) const CODE_ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";

/// A fresh one-time code: 16 letters and digits (79 bits), shown in groups of four.
pub fn new_code() -> Result<String, LinkError> {
    let mut letters = Vec::with_capacity(16);
    while letters.len() < 16 {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)
            .map_err(|e| LinkError::Invalid(format!("no randomness for the pairing code: {e}")))?;
        // Five bits a draw; the one value past the alphabet is drawn again (no bias).
        letters.extend(
            bytes
                .iter()
                .map(|b| (b & 0x1f) as usize)
                .filter(|v| *v < CODE_ALPHABET.len())
                .map(|v| CODE_ALPHABET[v] as char),
        );
    }
    letters.truncate(16);
    Ok(letters
        .chunks(4)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join("-"))
}

/// A code as typed: case, spaces and dashes do not matter.
pub fn normalize_code(code: &str) -> String {
    code.chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// Which side a proof comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Host,
    Agent,
}

fn mac(code: &str, side: Side, own: &Fingerprint, other: &Fingerprint) -> Hmac<Sha256> {
    #[allow(clippy::expect_used)]
    let mut m = Hmac::<Sha256>::new_from_slice(normalize_code(code).as_bytes())
        .expect("HMAC takes a key of any length");
    m.update(match side {
        Side::Host => b"signet-pair-v1 host\0",
        Side::Agent => b"signet-pair-v1 agent",
    });
    m.update(&own.0);
    m.update(&other.0);
    m
}

/// The proof `side` (holding `own`) gives for a connection with `other`, hex.
pub fn proof(code: &str, side: Side, own: &Fingerprint, other: &Fingerprint) -> String {
    mac(code, side, own, other)
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `proof_hex` is the proof `side` (holding `own`) gives for `other`; compared
/// in constant time.
pub fn check_proof(
    code: &str,
    side: Side,
    own: &Fingerprint,
    other: &Fingerprint,
    proof_hex: &str,
) -> bool {
    let Some(bytes) = decode_hex(proof_hex) else {
        return false;
    };
    mac(code, side, own, other).verify_slice(&bytes).is_ok()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// An open pairing window, as `signet-agent pair` writes it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Window {
    pub code: String,
    pub expires_unix: u64,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Window {
    /// Opens a window in `dir` with a fresh code (replacing one still open).
    pub fn open(dir: &Path) -> Result<Window, LinkError> {
        let w = Window {
            code: new_code()?,
            expires_unix: now_unix() + PAIRING_WINDOW.as_secs(),
        };
        let text = serde_json::to_vec(&w).map_err(|e| LinkError::Invalid(e.to_string()))?;
        write_private(&dir.join(PAIRING_FILE), &text)?;
        Ok(w)
    }

    /// The window open in `dir`, if one is and it has not expired.
    pub fn current(dir: &Path) -> Option<Window> {
        let text = std::fs::read(dir.join(PAIRING_FILE)).ok()?;
        let w: Window = serde_json::from_slice(&text).ok()?;
        (w.expires_unix > now_unix()).then_some(w)
    }

    /// Takes the window in `dir` (it is closed whatever happens next): the one attempt
    /// its code allows.
    pub fn take(dir: &Path) -> Option<Window> {
        let w = Self::current(dir);
        let _ = std::fs::remove_file(dir.join(PAIRING_FILE));
        w
    }
}

/// The body of `POST /agent/v1/pair`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PairRequest {
    /// [`proof`] of the host.
    pub proof: String,
}

/// The agent's answer to a pairing that succeeded.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PairAnswer {
    /// [`proof`] of the agent.
    pub proof: String,
    /// The agent's key (the host checks it is the TLS peer's).
    pub fingerprint: Fingerprint,
}

// ---------------------------------------------------------------------------------
// TLS with pinned keys.

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The agent's key as seen in the last handshake, and what the host expected.
#[derive(Debug, Default)]
pub(crate) struct Seen(pub(crate) Mutex<Option<Fingerprint>>);

#[derive(Debug)]
struct PinnedServer {
    /// `None` while pairing: any key is taken (and the pairing proofs decide).
    expect: Option<Fingerprint>,
    seen: Arc<Seen>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = Fingerprint::of(end_entity);
        if let Ok(mut s) = self.seen.0.lock() {
            *s = Some(fp);
        }
        match self.expect {
            Some(e) if e != fp => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Which host keys the agent takes in a handshake: the pinned one, or, while a pairing
/// window is open, any (for the pairing request only).
#[derive(Debug)]
struct HostKeys {
    state_dir: PathBuf,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for HostKeys {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let fp = Fingerprint::of(end_entity);
        let pinned = read_pin(&self.state_dir.join(HOST_PIN_FILE)).ok().flatten();
        if pinned == Some(fp) || Window::current(&self.state_dir).is_some() {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(key = %fp, "refused a host key this agent is not paired with");
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The agent's TLS acceptor: its own key, TLS 1.3 only, a host key required — the
/// pinned one, or any while a pairing window is open in `state_dir`.
pub fn acceptor(
    identity: &Identity,
    state_dir: &Path,
) -> Result<tokio_rustls::TlsAcceptor, LinkError> {
    let provider = provider();
    let verifier = Arc::new(HostKeys {
        state_dir: state_dir.to_owned(),
        provider: provider.clone(),
    });
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Invalid(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .map_err(|e| LinkError::Invalid(format!("the link key: {e}")))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

pub(crate) fn connector(
    identity: &Identity,
    expect: Option<Fingerprint>,
) -> Result<(tokio_rustls::TlsConnector, Arc<Seen>), LinkError> {
    let provider = provider();
    let seen = Arc::new(Seen::default());
    let verifier = Arc::new(PinnedServer {
        expect,
        seen: seen.clone(),
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Invalid(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .map_err(|e| LinkError::Invalid(format!("the link key: {e}")))?;
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), seen))
}

/// The fix for a host that is not paired, in one sentence.
pub const PAIR_FIX: &str = "pair them: in the signing VM, as root, run `signet-agent pair`; on this host, as root, run `signetd pair CODE` with the code it shows";

/// The host's side of the link to one agent: its key, where it pins the agent's, and
/// the connections to the agent that are open and idle ([`HostLink::take_idle`]).
#[derive(Debug)]
pub struct HostLink {
    identity: Identity,
    pin_path: PathBuf,
    idle: Mutex<Vec<Idle>>,
}

/// A request body as the kept connections carry it (any body, boxed).
pub(crate) type LinkBody = http_body_util::combinators::UnsyncBoxBody<
    bytes::Bytes,
    Box<dyn std::error::Error + Send + Sync>,
>;

/// An open, authenticated connection to the agent, kept for the next request: the
/// agent's key it was made with (it is used again only while that key is still the
/// pinned one) and when it was last handed back.
#[derive(Debug)]
pub(crate) struct Idle {
    pub(crate) sender: hyper::client::conn::http1::SendRequest<LinkBody>,
    pub(crate) pinned: Fingerprint,
    pub(crate) since: std::time::Instant,
}

/// How long a kept connection may stay unused and still be used again: well inside
/// the agent's `limits.header_timeout_seconds` (10 by default), after which it closes
/// a connection that sends nothing.
pub(crate) const IDLE_MAX: Duration = Duration::from_secs(4);
/// The most connections kept at once (a job at the token, the next one's upload, a
/// result still being read, the health reads and the event stream).
const IDLE_KEPT: usize = 8;

impl HostLink {
    /// The host's key in `state_dir` (made when there is none) and the agent's pin there.
    pub fn open(state_dir: &Path) -> Result<HostLink, LinkError> {
        Ok(HostLink {
            identity: Identity::load_or_create(state_dir, "signetd")?,
            pin_path: state_dir.join(AGENT_PIN_FILE),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// This host's key.
    pub fn fingerprint(&self) -> Fingerprint {
        self.identity.fingerprint
    }

    /// The agent key this host is paired with, if any.
    pub fn pinned(&self) -> Result<Option<Fingerprint>, LinkError> {
        read_pin(&self.pin_path)
    }

    /// Wraps `stream` (connected to `endpoint`) in TLS with the paired agent.
    pub async fn handshake<S>(
        &self,
        endpoint: &Endpoint,
        stream: S,
    ) -> io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        self.handshake_pinned(endpoint, stream)
            .await
            .map(|(s, _)| s)
    }

    /// [`Self::handshake`], and the agent key it was made with.
    pub(crate) async fn handshake_pinned<S>(
        &self,
        endpoint: &Endpoint,
        stream: S,
    ) -> io::Result<(tokio_rustls::client::TlsStream<S>, Fingerprint)>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let pinned = self.pinned().map_err(io::Error::other)?;
        let Some(pinned) = pinned else {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "this host is not paired with the agent at {endpoint} yet (no {}); {PAIR_FIX}",
                    self.pin_path.display()
                ),
            ));
        };
        let (tls, seen) = connector(&self.identity, Some(pinned)).map_err(io::Error::other)?;
        let mut stream = tls
            .connect(server_name(), stream)
            .await
            .map_err(|e| explain(e, endpoint, Some(pinned), &seen))?;
        // TLS 1.3: the agent judges the host's key after the host's last handshake
        // message; a refusal arrives with the first read. Flush so it comes now.
        use tokio::io::AsyncWriteExt;
        stream
            .flush()
            .await
            .map_err(|e| explain(e, endpoint, Some(pinned), &seen))?;
        Ok((stream, pinned))
    }

    /// A kept connection that is ready for a request: made with the agent key that is
    /// pinned now, unused for less than [`IDLE_MAX`], its last answer read whole.
    /// Connections that are closed, too old or made with another key are dropped;
    /// those still busy with an answer stay. None when there is none: connect anew.
    pub(crate) fn take_idle(&self) -> Option<Idle> {
        let pinned = self.pinned().ok().flatten();
        let mut idle = self.idle.lock().ok()?;
        idle.retain(|c| {
            !c.sender.is_closed()
                && Some(c.pinned) == pinned
                && (!c.sender.is_ready() || c.since.elapsed() < IDLE_MAX)
        });
        let at = idle.iter().rposition(|c| c.sender.is_ready())?;
        Some(idle.swap_remove(at))
    }

    /// Keeps `conn` for a later request (when there is room).
    pub(crate) fn keep(&self, mut conn: Idle) {
        if conn.sender.is_closed() {
            return;
        }
        conn.since = std::time::Instant::now();
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain(|c| !c.sender.is_closed());
            if idle.len() < IDLE_KEPT {
                idle.push(conn);
            }
        }
    }

    /// Closes every kept connection (each one's next request connects anew).
    pub fn forget_connections(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    /// This host's key, for pairing.
    pub(crate) fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Where the agent's key is pinned.
    pub(crate) fn pin_path(&self) -> &Path {
        &self.pin_path
    }
}

pub(crate) fn server_name() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from(SERVER_NAME).unwrap_or_else(|_| unreachable_name()),
    )
}

#[allow(clippy::expect_used)]
fn unreachable_name() -> rustls::pki_types::DnsName<'static> {
    rustls::pki_types::DnsName::try_from("signet").expect("a valid DNS name")
}

/// A handshake error in the operator's terms.
pub(crate) fn explain(
    e: io::Error,
    endpoint: &Endpoint,
    pinned: Option<Fingerprint>,
    seen: &Seen,
) -> io::Error {
    let seen = seen.0.lock().ok().and_then(|s| *s);
    let inner = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .cloned();
    let msg = match (inner, pinned, seen) {
        (Some(rustls::Error::InvalidCertificate(_)), Some(p), Some(s)) if p != s => format!(
            "the agent at {endpoint} shows key {s}, but this host is paired with {p}: it is not the agent this host was paired with (a reinstalled signing VM has a new key; then {PAIR_FIX})"
        ),
        (Some(rustls::Error::AlertReceived(_)), _, _) => format!(
            "the agent at {endpoint} refused this host's key: it is paired with another host or not at all; {PAIR_FIX}"
        ),
        (Some(other), _, _) => format!(
            "the TLS handshake with the agent at {endpoint} failed: {other} (is it a signet-agent of this version?)"
        ),
        (None, _, _) => format!("the link to the agent at {endpoint} broke in its handshake: {e}"),
    };
    io::Error::new(io::ErrorKind::PermissionDenied, msg)
}

/// Whether `e` (or what caused it) is the agent's TLS alert refusing this host's key.
/// In TLS 1.3 the agent judges the host's key after the host's last handshake message,
/// so the refusal arrives with the first answer the host reads.
pub fn refused_by_peer(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(rustls::Error::AlertReceived(_)) = err.downcast_ref::<rustls::Error>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(rustls::Error::AlertReceived(_)) = inner.downcast_ref::<rustls::Error>()
                {
                    return true;
                }
            }
        }
        cur = err.source();
    }
    false
}

/// Whether `e` says the peer closed the connection under the request (a reset, a
/// broken pipe, a connection cut before the answer): how a refused key can also show,
/// when the host's request crossed the agent's alert.
pub fn closed_by_peer(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if matches!(
                io.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            ) {
                return true;
            }
        }
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_canceled() || h.is_incomplete_message() || h.is_closed() {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// The error for an agent that refused this host's key.
pub fn refused_error(endpoint: &Endpoint) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "the agent at {endpoint} refused this host's key: it is paired with another host or not at all; {PAIR_FIX}"
        ),
    )
}

// ---------------------------------------------------------------------------------
// Which endpoints are reached through the link.

type Registry = RwLock<HashMap<Endpoint, Arc<HostLink>>>;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// From now on every request of this process to `endpoint` ([`crate::client`]) goes
/// through `link`: TLS with the host's key, to the paired agent only.
pub fn register(endpoint: Endpoint, link: Arc<HostLink>) {
    if let Ok(mut r) = registry().write() {
        r.insert(endpoint, link);
    }
}

/// The link registered for `endpoint`, if any.
pub fn registered(endpoint: &Endpoint) -> Option<Arc<HostLink>> {
    registry().read().ok()?.get(endpoint).cloned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fingerprints_round_trip_and_reject_garbage() {
        let fp = Fingerprint::of(b"a certificate");
        let text = fp.to_string();
        assert!(text.starts_with("SHA256:"), "{text}");
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
        assert!("SHA256:abc".parse::<Fingerprint>().is_err());
        assert!("md5:xyz".parse::<Fingerprint>().is_err());
    }

    #[test]
    fn codes_are_16_unambiguous_letters_in_groups() {
        let a = new_code().unwrap();
        let b = new_code().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 19, "{a}");
        assert_eq!(a.matches('-').count(), 3, "{a}");
        let n = normalize_code(&a);
        assert_eq!(n.len(), 16);
        assert!(n.bytes().all(|c| CODE_ALPHABET.contains(&c)), "{n}");
        assert!(!n.contains(['0', 'O', '1', 'I', 'L']), "{n}");
        assert_eq!(normalize_code(&a.to_lowercase().replace('-', " ")), n);
    }

    #[test]
    fn proofs_bind_the_code_the_side_and_both_keys() {
        let host = Fingerprint::of(b"host");
        let agent = Fingerprint::of(b"agent");
        let rogue = Fingerprint::of(b"rogue");
        let code = "ABCD-EFGH-JKMN-PQRS";
        let p = proof(code, Side::Host, &host, &agent);
        assert!(check_proof(
            "abcd efgh jkmn pqrs",
            Side::Host,
            &host,
            &agent,
            &p
        ));
        assert!(!check_proof(
            "ABCD-EFGH-JKMN-PQRT",
            Side::Host,
            &host,
            &agent,
            &p
        ));
        assert!(!check_proof(code, Side::Agent, &host, &agent, &p));
        assert!(!check_proof(code, Side::Host, &host, &rogue, &p));
        assert!(!check_proof(code, Side::Host, &rogue, &agent, &p));
        assert!(!check_proof(code, Side::Host, &host, &agent, "zz"));
        assert!(!check_proof(code, Side::Host, &host, &agent, ""));
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_made_once_private_and_refused_when_others_can_read_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let a = Identity::load_or_create(&state, "signetd").unwrap();
        let b = Identity::load_or_create(&state, "signetd").unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join(KEY_FILE)), 0o600);
        std::fs::set_permissions(state.join(KEY_FILE), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let e = Identity::load(&state).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn processes_making_the_key_at_once_all_get_the_first_one() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let made: Vec<Fingerprint> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| Identity::load_or_create(&state, "x").unwrap().fingerprint))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(made.iter().all(|f| *f == made[0]), "{made:?}");
        assert_eq!(Identity::load(&state).unwrap().fingerprint, made[0]);
        let crt = std::fs::read(state.join(CERT_FILE)).unwrap();
        let cert = CertificateDer::from_pem_slice(&crt).unwrap();
        assert_eq!(Fingerprint::of(&cert), made[0]);
        let leftovers: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_window_is_taken_once_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Window::current(dir.path()).is_none());
        let w = Window::open(dir.path()).unwrap();
        assert_eq!(Window::current(dir.path()).unwrap().code, w.code);
        assert_eq!(Window::take(dir.path()).unwrap().code, w.code);
        assert!(Window::take(dir.path()).is_none());
        let old = Window {
            code: w.code,
            expires_unix: now_unix() - 1,
        };
        write_private(
            &dir.path().join(PAIRING_FILE),
            &serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        assert!(Window::current(dir.path()).is_none());
    }

    #[test]
    fn pins_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(AGENT_PIN_FILE);
        assert_eq!(read_pin(&p).unwrap(), None);
        let fp = Fingerprint::of(b"x");
        write_pin(&p, &fp).unwrap();
        assert_eq!(read_pin(&p).unwrap(), Some(fp));
        std::fs::write(&p, "garbage").unwrap();
        assert!(read_pin(&p).unwrap_err().to_string().contains("pair again"));
    }
}
