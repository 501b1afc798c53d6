//! Digest mode for PE files without osslsigncode: the Authenticode engine makes the
//! data `osslsigncode extract-data` would, and attaches the returned signature as
//! `attach-signature` would, after checking it is the file's; then the result is
//! checked again and the signer's certificate chain verified against the CA given, or
//! this machine's trusted roots. Blocking (file I/O in constant memory): run it on a
//! blocking thread.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use signet_authenticode::{self as engine, Error as EngineError, HashAlg, PeImage};

/// Where OpenSSL looks for trusted roots when `SSL_CERT_FILE` does not say, by
/// distribution.
const SYSTEM_ROOTS: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Writes the PE `file`'s Authenticode data blob to `out`, made as `hash` and
/// `page_hashes` say.
pub fn extract(file: &Path, hash: &str, page_hashes: bool, out: &Path) -> Result<(), String> {
    let hash: HashAlg = hash.parse().map_err(|e: EngineError| e.to_string())?;
    let mut input = File::open(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let blob = engine::extract_blob(&mut input, hash, page_hashes).map_err(|e| e.to_string())?;
    std::fs::write(out, blob).map_err(|e| format!("cannot write {}: {e}", out.display()))
}

/// Why attaching failed.
#[derive(Debug)]
pub enum AttachError {
    /// The signature is not the file's.
    Mismatch(String),
    /// The signature's certificate does not chain to the `--ca-file` CA: why.
    Untrusted(String),
    /// Anything else.
    Other(String),
}

/// Attaches the signature in `signature` (DER PKCS#7) to the PE `file`, writing the
/// signed copy to `output` (nested beside the file's signature with `nest`). Answers
/// `Some(why)` when the result is signed and its signature matches the file, but the
/// certificate does not chain to this machine's trusted roots (no `ca_file` given).
pub fn attach(
    file: &Path,
    signature: &Path,
    nest: bool,
    output: &Path,
    ca_file: Option<&Path>,
) -> Result<Option<String>, AttachError> {
    let other = AttachError::Other;
    let sig = std::fs::read(signature)
        .map_err(|e| other(format!("cannot read the signature received: {e}")))?;
    let anchors = match ca_file {
        Some(ca) => {
            let bytes = std::fs::read(ca).map_err(|e| {
                other(format!(
                    "cannot read --ca-file {}: {e}; give a PEM file of CA certificates",
                    ca.display()
                ))
            })?;
            engine::certificates(&bytes).map_err(|e| {
                other(format!(
                    "--ca-file {} holds no certificate: {e}",
                    ca.display()
                ))
            })?
        }
        None => system_roots(),
    };
    {
        let mut input =
            File::open(file).map_err(|e| other(format!("cannot read {}: {e}", file.display())))?;
        let mut out = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(output)
            .map_err(|e| other(format!("cannot write {}: {e}", output.display())))?;
        engine::attach_pe(&mut input, &mut out, &sig, nest).map_err(|e| match e {
            EngineError::WrongFile(_) => AttachError::Mismatch(e.to_string()),
            e => other(e.to_string()),
        })?;
        out.sync_all()
            .map_err(|e| other(format!("cannot write {}: {e}", output.display())))?;
    }
    // What was written is read back: every signature in it matches the file and was
    // made by its signer's key.
    let mut written =
        File::open(output).map_err(|e| other(format!("cannot read back the result: {e}")))?;
    PeImage::parse(&mut written)
        .and_then(|image| image.check_signatures(&mut written))
        .map_err(|e| other(format!("the signed file does not verify: {e}")))?;
    match engine::verify_chain(&sig, &anchors, SystemTime::now()) {
        Ok(()) => Ok(None),
        Err(EngineError::Untrusted(why)) if ca_file.is_some() => Err(AttachError::Untrusted(why)),
        Err(EngineError::Untrusted(why)) => Ok(Some(why)),
        Err(e) => Err(other(e.to_string())),
    }
}

/// The trusted roots OpenSSL would use: `SSL_CERT_FILE`, else the distribution's
/// bundle; none when there is none (nothing then chains).
fn system_roots() -> Vec<Vec<u8>> {
    let file = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .or_else(|| SYSTEM_ROOTS.iter().map(PathBuf::from).find(|p| p.is_file()));
    let Some(bytes) = file.and_then(|f| std::fs::read(f).ok()) else {
        return Vec::new();
    };
    // One at a time: a certificate that cannot be read costs only itself.
    let text = String::from_utf8_lossy(&bytes);
    let end = "-----END CERTIFICATE-----";
    text.split_inclusive(end)
        .filter_map(|block| {
            block
                .find("-----BEGIN CERTIFICATE-----")
                .map(|at| &block[at..])
        })
        .filter_map(|pem| engine::certificates(pem.as_bytes()).ok())
        .flatten()
        .collect()
}
