//! Digest mode for PE files without osslsigncode: the Authenticode engine makes the
//! data `osslsigncode extract-data` would, and attaches the returned signature as
//! `attach-signature` would, after checking it is the file's; then the result is
//! checked again and the signer's certificate chain verified against the CA given, or
//! this machine's trusted roots. Blocking (a small file in memory, a large one
//! streamed in constant memory): run a file above [`INLINE`] on a blocking thread.

use std::fs::File;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::{Once, OnceLock};
use std::time::SystemTime;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use signet_authenticode::{self as engine, Error as EngineError, HashAlg, PeImage};

/// Where OpenSSL looks for trusted roots when `SSL_CERT_FILE` does not say, by
/// distribution.
const SYSTEM_ROOTS: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The largest Authenticode data blob digest mode sends (and so holds in memory): a
/// blob is a few hundred bytes, or with page hashes 36 bytes per 4 KiB page of the
/// file (9 MiB for 1 GiB).
pub const MAX_BLOB: usize = 32 << 20;
/// The largest signature accepted back: the blob's content, signed, and certificates.
pub const MAX_SIGNATURE: usize = MAX_BLOB + (1 << 20);
/// Files up to this size are done on the caller's thread (a few ms at most): a trip to
/// a blocking thread costs more than it saves.
pub const INLINE: u64 = 1 << 20;
/// Files up to this size are read once into memory, signed there and checked there;
/// larger ones are streamed through a file next to the target, in constant memory.
const IN_MEMORY: u64 = 8 << 20;

/// The PE `file`'s Authenticode data blob, made as `hash` and `page_hashes` say, and
/// the SHA-256 of what the blob leaves out of the file (its checksum field, the
/// certificate table's entry and the table: an existing signature), taken in the same
/// pass.
pub fn extract(file: &Path, hash: &str, page_hashes: bool) -> Result<(Vec<u8>, [u8; 32]), String> {
    let hash: HashAlg = hash.parse().map_err(|e: EngineError| e.to_string())?;
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", file.display());
    let len = std::fs::metadata(file).map_err(cannot)?.len();
    let (blob, rest) = if len <= IN_MEMORY {
        let bytes = signet_protocol::whole::read(file).map_err(cannot)?;
        engine::extract_blob_and_rest(&mut Cursor::new(bytes), hash, page_hashes)
    } else {
        let mut input = File::open(file).map_err(cannot)?;
        engine::extract_blob_and_rest(&mut input, hash, page_hashes)
    }
    .map_err(|e| e.to_string())?;
    if blob.len() > MAX_BLOB {
        return Err(format!(
            "its Authenticode data is {} MiB, more than digest mode sends ({} MiB); sign it without --digest, or with a profile without page hashes",
            blob.len() >> 20,
            MAX_BLOB >> 20
        ));
    }
    Ok((blob, rest))
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

/// Where a signed file goes: the target, its permissions (set before the rename).
pub struct Destination<'a> {
    pub target: &'a Path,
    pub permissions: std::fs::Permissions,
}

/// Puts a signed file made by [`attach_beside`] in place of `target`.
pub fn place(out: tempfile::NamedTempFile, target: &Path) -> Result<(), AttachError> {
    out.persist(target).map_err(|e| {
        AttachError::Other(format!("cannot replace {}: {}", target.display(), e.error))
    })?;
    Ok(())
}

/// Attaches `signature` (DER PKCS#7) to the PE `file` (nested beside the file's
/// signature with `nest`) and writes the signed file next to `dest.target`, to be put
/// in its place ([`place`]) only once it is checked — every signature in it matches it
/// and was made by its signer's key, and the signer's chain verifies (against
/// `ca_file`, else this machine's roots) — and written, with the target's permissions,
/// and fsync'd: what is left is its rename. A file up to [`IN_MEMORY`] is read once and
/// signed and checked in memory, the bytes checked being the bytes written; a larger one
/// is written next to the target and read back from there. Answers `Some(why)` with it
/// when the signature matches the file but its certificate does not chain to this
/// machine's trusted roots (no `ca_file` given). Blocking.
pub fn attach_beside(
    file: &Path,
    signature: &[u8],
    nest: bool,
    dest: Destination<'_>,
    ca_file: Option<&Path>,
) -> Result<(tempfile::NamedTempFile, Option<String>), AttachError> {
    let other = AttachError::Other;
    let engine_error = |e: EngineError| match e {
        EngineError::WrongFile(_) => AttachError::Mismatch(e.to_string()),
        e => other(e.to_string()),
    };
    let does_not_verify = |e: EngineError| other(format!("the signed file does not verify: {e}"));
    let cannot_read = |e: std::io::Error| other(format!("cannot read {}: {e}", file.display()));
    let dir = match dest.target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let cannot_write = |e: std::io::Error| {
        other(format!(
            "cannot write next to {}: {e}",
            dest.target.display()
        ))
    };
    let len = std::fs::metadata(file).map_err(cannot_read)?.len();
    let (out, untrusted) = if len <= IN_MEMORY {
        let bytes = signet_protocol::whole::read(file).map_err(cannot_read)?;
        let mut signed = Cursor::new(Vec::with_capacity(bytes.len() + signature.len() + 4096));
        engine::attach_pe(&mut Cursor::new(bytes), &mut signed, signature, nest)
            .map_err(engine_error)?;
        PeImage::parse(&mut signed)
            .and_then(|image| image.check_signatures(&mut signed))
            .map_err(does_not_verify)?;
        let untrusted = chain(signature, ca_file)?;
        let mut out = tempfile::Builder::new()
            .prefix(".signet-")
            .tempfile_in(dir)
            .map_err(cannot_write)?;
        out.write_all(signed.get_ref()).map_err(cannot_write)?;
        (out, untrusted)
    } else {
        let mut input = File::open(file).map_err(cannot_read)?;
        let mut out = tempfile::Builder::new()
            .prefix(".signet-")
            .tempfile_in(dir)
            .map_err(cannot_write)?;
        engine::attach_pe(&mut input, out.as_file_mut(), signature, nest).map_err(engine_error)?;
        // Read back from what was written.
        let written = out.as_file_mut();
        PeImage::parse(written)
            .and_then(|image| image.check_signatures(written))
            .map_err(does_not_verify)?;
        (out, chain(signature, ca_file)?)
    };
    out.as_file()
        .set_permissions(dest.permissions)
        .and_then(|()| out.as_file().sync_all())
        .map_err(cannot_write)?;
    Ok((out, untrusted))
}

/// Verifies the signer's chain of `signature` against `ca_file`'s CAs, else this
/// machine's trusted roots: `Some(why)` for a chain those roots do not take.
fn chain(signature: &[u8], ca_file: Option<&Path>) -> Result<Option<String>, AttachError> {
    let other = AttachError::Other;
    let given;
    let anchors: &[Vec<u8>] = match ca_file {
        Some(ca) => {
            let bytes = std::fs::read(ca).map_err(|e| {
                other(format!(
                    "cannot read --ca-file {}: {e}; give a PEM file of CA certificates",
                    ca.display()
                ))
            })?;
            given = engine::certificates(&bytes).map_err(|e| {
                other(format!(
                    "--ca-file {} holds no certificate: {e}",
                    ca.display()
                ))
            })?;
            &given
        }
        None => system_roots(),
    };
    match engine::verify_chain(signature, anchors, SystemTime::now()) {
        Ok(()) => Ok(None),
        Err(EngineError::Untrusted(why)) if ca_file.is_some() => Err(AttachError::Untrusted(why)),
        Err(EngineError::Untrusted(why)) => Ok(Some(why)),
        Err(e) => Err(other(e.to_string())),
    }
}

/// The trusted roots OpenSSL would use: `SSL_CERT_FILE`, else the distribution's
/// bundle; none when there is none (nothing then chains). Read once per process: the
/// first caller reads them, or waits for [`preload_roots`]'s thread to.
fn system_roots() -> &'static [Vec<u8>] {
    static ROOTS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let file = std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .or_else(|| SYSTEM_ROOTS.iter().map(PathBuf::from).find(|p| p.is_file()));
        let Some(bytes) = file.and_then(|f| std::fs::read(f).ok()) else {
            return Vec::new();
        };
        // Decoded, not parsed: the chain's check parses the few it may need. A block
        // that cannot be decoded costs only itself.
        CertificateDer::pem_slice_iter(&bytes)
            .filter_map(Result::ok)
            .map(|c| c.to_vec())
            .collect()
    })
}

/// Starts reading this machine's trusted roots on a thread of their own (a bundle of
/// a hundred or more takes a millisecond or so), while the signature is made: a PE
/// signed in digest mode without `--ca-file` is checked against them.
pub fn preload_roots() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        let _ = std::thread::Builder::new().name("roots".into()).spawn(|| {
            system_roots();
        });
    });
}
