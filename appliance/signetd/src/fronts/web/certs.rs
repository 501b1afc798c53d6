//! The web UI's TLS: which certificate it serves, and how it trusts the local PVE API.
//!
//! The server certificate is, in this order: the one configured (`web.cert`/`web.key`),
//! the node's custom PVE certificate (`pveproxy-ssl.pem`/`.key`, e.g. from ACME), the
//! node's PVE certificate (`pve-ssl.pem`/`.key`), or a self-signed one made at start
//! ([`choose`], pure). The browser already trusts the node's PVE certificate, so the
//! panel inside the PVE UI loads without a warning.
//!
//! The PVE API on `127.0.0.1:8006` serves one of the same node certificates; the client
//! here trusts exactly the certificates in a file ([`Pinned`]): the server's leaf must
//! be one of them, byte for byte. The file is read again for every connection, so a
//! renewed certificate is picked up.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_rustls::TlsAcceptor;

/// The node's custom PVE certificate, inside the PVE node directory.
pub const PVEPROXY_CERT: &str = "pveproxy-ssl.pem";
/// The node's PVE certificate (signed by the cluster's CA), inside the node directory.
pub const PVE_CERT: &str = "pve-ssl.pem";

/// The certificate cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read the web UI's certificate {path}: {message}; give a PEM file (web.cert)")]
    Cert { path: String, message: String },
    #[error("cannot read the web UI's private key {path}: {message}; give a PEM file (web.key)")]
    Key { path: String, message: String },
    #[error("the web UI's certificate and key do not go together: {0}")]
    Config(String),
    #[error("cannot make a self-signed certificate for the web UI: {0}")]
    Generate(String),
}

/// Where the served certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// A certificate and key in PEM files.
    Files { cert: PathBuf, key: PathBuf },
    /// A self-signed certificate made at start, for these names.
    SelfSigned { names: Vec<String> },
}

/// Picks the certificate: `configured`, else the node's PVE certificates in
/// `pve_local_dir` when both files of a pair exist, else self-signed for `names`.
pub fn choose(
    configured: Option<(&Path, &Path)>,
    pve_local_dir: &Path,
    exists: impl Fn(&Path) -> bool,
    names: Vec<String>,
) -> CertSource {
    if let Some((cert, key)) = configured {
        return CertSource::Files {
            cert: cert.to_owned(),
            key: key.to_owned(),
        };
    }
    for stem in [PVEPROXY_CERT, PVE_CERT] {
        let cert = pve_local_dir.join(stem);
        let key = pve_local_dir.join(stem.replace(".pem", ".key"));
        if exists(&cert) && exists(&key) {
            return CertSource::Files { cert, key };
        }
    }
    CertSource::SelfSigned { names }
}

/// The first of the node's PVE certificate files that exists: what pveproxy serves.
pub fn pve_api_pin(pve_local_dir: &Path, exists: impl Fn(&Path) -> bool) -> PathBuf {
    let custom = pve_local_dir.join(PVEPROXY_CERT);
    if exists(&custom) {
        custom
    } else {
        pve_local_dir.join(PVE_CERT)
    }
}

/// A self-signed certificate and its key, both PEM.
pub fn self_signed(names: &[String]) -> Result<(String, String), CertError> {
    let key = rcgen::KeyPair::generate().map_err(|e| CertError::Generate(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())
        .map_err(|e| CertError::Generate(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Signet web UI (self-signed)");
    let cert = params
        .self_signed(&key)
        .map_err(|e| CertError::Generate(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The acceptor for `source`.
pub fn acceptor(source: &CertSource) -> Result<TlsAcceptor, CertError> {
    let (cert_pem, key_pem) = match source {
        CertSource::Files { cert, key } => (
            std::fs::read(cert).map_err(|e| CertError::Cert {
                path: cert.display().to_string(),
                message: e.to_string(),
            })?,
            std::fs::read(key).map_err(|e| CertError::Key {
                path: key.display().to_string(),
                message: e.to_string(),
            })?,
        ),
        CertSource::SelfSigned { names } => {
            let (c, k) = self_signed(names)?;
            (c.into_bytes(), k.into_bytes())
        }
    };
    acceptor_from_pem(&cert_pem, &key_pem)
}

/// An acceptor serving the PEM chain `cert` with the PEM key `key`.
pub fn acceptor_from_pem(cert: &[u8], key: &[u8]) -> Result<TlsAcceptor, CertError> {
    let certs = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Cert {
            path: "(PEM)".into(),
            message: e.to_string(),
        })?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| CertError::Key {
        path: "(PEM)".into(),
        message: e.to_string(),
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| CertError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| CertError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration that trusts exactly the certificates in `pins` (PEM).
pub fn pinned_client(pins: &[u8]) -> Result<rustls::ClientConfig, String> {
    let pins = CertificateDer::pem_slice_iter(pins)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if pins.is_empty() {
        return Err("the file holds no certificate".into());
    }
    let provider = provider();
    let verifier = Arc::new(Pinned {
        pins,
        provider: provider.clone(),
    });
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// Accepts a server whose leaf certificate is one of `pins`, byte for byte; the
/// handshake signatures are checked as usual.
#[derive(Debug)]
struct Pinned {
    pins: Vec<CertificateDer<'static>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.pins.iter().any(|p| p.as_ref() == end_entity.as_ref()) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_certificate_wins_then_the_nodes_then_a_self_signed_one() {
        let dir = Path::new("/etc/pve/local");
        let names = vec!["pve1".to_owned()];
        let cfg = (Path::new("/a.pem"), Path::new("/a.key"));
        assert_eq!(
            choose(Some(cfg), dir, |_| true, names.clone()),
            CertSource::Files {
                cert: "/a.pem".into(),
                key: "/a.key".into()
            }
        );
        assert_eq!(
            choose(None, dir, |_| true, names.clone()),
            CertSource::Files {
                cert: "/etc/pve/local/pveproxy-ssl.pem".into(),
                key: "/etc/pve/local/pveproxy-ssl.key".into()
            }
        );
        // A custom certificate without its key is not used.
        let only = |p: &Path| p != Path::new("/etc/pve/local/pveproxy-ssl.key");
        assert_eq!(
            choose(None, dir, only, names.clone()),
            CertSource::Files {
                cert: "/etc/pve/local/pve-ssl.pem".into(),
                key: "/etc/pve/local/pve-ssl.key".into()
            }
        );
        assert_eq!(
            choose(None, dir, |_| false, names.clone()),
            CertSource::SelfSigned { names }
        );
    }

    #[test]
    fn the_pve_api_is_pinned_to_the_certificate_pveproxy_serves() {
        let dir = Path::new("/etc/pve/local");
        assert_eq!(
            pve_api_pin(dir, |_| true),
            Path::new("/etc/pve/local/pveproxy-ssl.pem")
        );
        assert_eq!(
            pve_api_pin(dir, |_| false),
            Path::new("/etc/pve/local/pve-ssl.pem")
        );
    }

    #[test]
    fn a_self_signed_certificate_serves_and_pins() {
        let (cert, key) = self_signed(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        acceptor_from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
        pinned_client(cert.as_bytes()).unwrap();
        assert!(pinned_client(b"no pem here").is_err());
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("c.key"));
        std::fs::write(&c, &cert).unwrap();
        std::fs::write(&k, &key).unwrap();
        acceptor(&CertSource::Files { cert: c, key: k }).unwrap();
        let Err(e) = acceptor(&CertSource::Files {
            cert: dir.path().join("missing.pem"),
            key: dir.path().join("missing.key"),
        }) else {
            panic!("a missing certificate is an error")
        };
        assert!(e.to_string().contains("web.cert"), "{e}");
    }
}
