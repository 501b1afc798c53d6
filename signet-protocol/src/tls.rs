//! The client side of TLS endpoints (`tls:HOST:PORT`): which certificate authorities
//! are trusted, and the client's name and secret sent with HTTP Basic
//! authentication. Set once per process with [`configure`]; without it the system's
//! CA bundle is trusted and no credentials are sent.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use secrecy::{ExposeSecret, SecretString};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::TlsConnector;

/// The CA bundle trusted when none is configured (Debian's).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug)]
struct Settings {
    ca: Option<PathBuf>,
    credentials: Option<(String, SecretString)>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();
static CONNECTOR: OnceLock<Result<TlsConnector, String>> = OnceLock::new();

/// Trust `ca` (PEM; the system bundle when `None`) and send `credentials` (client
/// name and secret) on TLS endpoints. The first call wins.
pub fn configure(ca: Option<PathBuf>, credentials: Option<(String, SecretString)>) {
    let _ = SETTINGS.set(Settings { ca, credentials });
}

/// The `Authorization` header value for TLS endpoints, when credentials are set.
pub fn basic_authorization() -> Option<String> {
    use base64::Engine;
    let (name, secret) = SETTINGS.get()?.credentials.as_ref()?;
    let token = base64::engine::general_purpose::STANDARD
        .encode(format!("{name}:{}", secret.expose_secret()));
    Some(format!("Basic {token}"))
}

/// The connector for TLS endpoints, or why there is none (an unreadable CA file).
pub fn connector() -> Result<TlsConnector, String> {
    CONNECTOR
        .get_or_init(|| {
            let ca = SETTINGS
                .get()
                .and_then(|s| s.ca.clone())
                .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE));
            build(&ca)
        })
        .clone()
}

fn build(ca: &Path) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read the CA certificates in {}: {e}", ca.display()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "{} holds no usable CA certificate; name the one that issued the server's certificate with --tls-ca or SIGNET_TLS_CA",
            ca.display()
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
