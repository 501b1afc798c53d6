//! TLS for remote clients: the server certificate and key from PEM files, as a
//! `tokio_rustls` acceptor. Callers over TLS are nobody until they send a client's
//! name and secret (HTTP Basic, see [`crate::adapters::clients`]). [`init`] makes a CA and a
//! server certificate it issued (`signetd tls init`).

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Why the TLS certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS certificate chain {path}: {message}; give a PEM file (tls.cert)")]
    Cert { path: String, message: String },
    #[error("cannot read the TLS private key {path}: {message}; give a PEM file (tls.key)")]
    Key { path: String, message: String },
    #[error("the TLS certificate and key do not go together: {0}")]
    Config(String),
    #[error("{0}")]
    Init(String),
}

/// The files [`init`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Made {
    /// The CA's certificate: what clients trust (`signet --tls-ca`, `curl --cacert`).
    pub ca: std::path::PathBuf,
    /// The CA's private key (0600): only needed to issue another server certificate.
    pub ca_key: std::path::PathBuf,
    /// The server's certificate (`[tls] cert`).
    pub cert: std::path::PathBuf,
    /// The server's private key (0600, `[tls] key`).
    pub key: std::path::PathBuf,
}

/// Makes, in `dir` (created 0700 if missing), a CA and a server certificate it
/// issued for `hosts` (DNS names or IP addresses the clients connect to): a CA
/// certificate is not accepted as a server's own by TLS clients. Private keys are
/// written 0600; existing files are never overwritten.
pub fn init(dir: &Path, hosts: &[String]) -> Result<Made, TlsError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let fail = |what: &str, e: &dyn std::fmt::Display| TlsError::Init(format!("{what}: {e}"));
    if hosts.is_empty() {
        return Err(TlsError::Init(
            "name the host clients connect to with --host (a DNS name or an IP address; repeat for more)".to_owned(),
        ));
    }
    let made = Made {
        ca: dir.join("ca.pem"),
        ca_key: dir.join("ca-key.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    for p in [&made.ca, &made.ca_key, &made.cert, &made.key] {
        if p.exists() {
            return Err(TlsError::Init(format!(
                "{} exists already and is left alone; remove it or choose another directory",
                p.display()
            )));
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| fail(&format!("creating {}", dir.display()), &e))?;

    let now = time::OffsetDateTime::now_utc();
    let ca_key = rcgen::KeyPair::generate().map_err(|e| fail("making the CA's key", &e))?;
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Signet CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ca.not_before = now - time::Duration::days(1);
    ca.not_after = now + time::Duration::days(3650);
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(|e| fail("making the CA's certificate", &e))?;

    let key = rcgen::KeyPair::generate().map_err(|e| fail("making the server's key", &e))?;
    let mut server =
        rcgen::CertificateParams::new(hosts.to_vec()).map_err(|e| fail("the host names", &e))?;
    server
        .distinguished_name
        .push(rcgen::DnType::CommonName, hosts[0].clone());
    server.is_ca = rcgen::IsCa::ExplicitNoCa;
    server.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    server.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    server.not_before = now - time::Duration::days(1);
    server.not_after = now + time::Duration::days(825);
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let cert = server
        .signed_by(&key, &issuer)
        .map_err(|e| fail("making the server's certificate", &e))?;

    let write = |path: &Path, text: &str, mode: u32| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
            .map_err(|e| fail(&format!("writing {}", path.display()), &e))
    };
    write(&made.ca_key, &issuer.key().serialize_pem(), 0o600)?;
    write(&made.key, &key.serialize_pem(), 0o600)?;
    write(&made.ca, &ca_cert.pem(), 0o644)?;
    write(&made.cert, &cert.pem(), 0o644)?;
    // What was made must serve.
    acceptor(&made.cert, &made.key)?;
    Ok(made)
}

/// An acceptor serving `cert` (PEM chain, leaf first) with `key` (PEM).
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.display().to_string(),
            message: "it holds no certificate".to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        message: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_makes_a_ca_and_a_server_certificate_that_serves_and_overwrites_nothing() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        assert!(matches!(init(&dir, &[]), Err(TlsError::Init(m)) if m.contains("--host")));
        let made = init(&dir, &["127.0.0.1".into(), "signet.example".into()]).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            (mode(&made.key), mode(&made.ca_key), mode(&dir)),
            (0o600, 0o600, 0o700)
        );
        let ca = std::fs::read_to_string(&made.ca).unwrap();
        let cert = std::fs::read_to_string(&made.cert).unwrap();
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_ne!(ca, cert, "the server's certificate is not the CA's");
        assert!(acceptor(&made.cert, &made.key).is_ok());
        let again = init(&dir, &["127.0.0.1".into()]).unwrap_err().to_string();
        assert!(again.contains("exists already"), "{again}");
        assert_eq!(std::fs::read_to_string(&made.ca).unwrap(), ca);
    }
}
