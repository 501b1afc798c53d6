//! Authenticode signing with a key that stays behind a [`RawSigner`] (a token's
//! logged-in session): the token sees one signature operation per signature and
//! nothing else.
//!
//! - [`sign_blob`] signs the data `osslsigncode extract-data` makes (digest mode's
//!   blob, of any file type osslsigncode knows); `osslsigncode attach-signature` puts
//!   the result into the file.
//! - [`sign_pe`] signs a PE file whole: it hashes it in one pass in constant memory
//!   (page hashes optional), signs, and writes the signed copy with the certificate
//!   table appended and the checksum recomputed; [`sign_pe_in_place`] signs the file
//!   itself instead of a copy (read once, written only once signed), and
//!   [`sign_pe_in_memory`] a file held in memory without copying it; [`PeImage`] is
//!   the hashing alone.
//! - [`extract_blob`] and [`attach_pe`] are digest mode's two ends for a PE without
//!   osslsigncode: the blob `extract-data` writes, byte for byte, and the returned
//!   signature put into the file (replacing or nested) after checking it is the
//!   file's; [`verify_signature`] and [`verify_chain`] check a signature's signer and
//!   certificate chain.
//! - [`sign_indirect_data`] is the common core: the PKCS#7 SignedData over an
//!   `SpcIndirectDataContent`, as `osslsigncode sign` builds it.
//!
//! The ASN.1 is RustCrypto's (`cms`, `der`, `x509-cert`); [`asn1`] has Authenticode's
//! own types.

pub mod asn1;
mod blob;
mod catalog;
mod pe;
mod signature;
mod timestamp;
mod verify;

pub use blob::sign_blob;
pub use catalog::sign_catalog;
pub use pe::{
    attach_pe, extract_blob, extract_blob_and_rest, sign_pe, sign_pe_in_memory, sign_pe_in_place,
    sign_pe_in_place_digested, PeDigested, PeDigester, PeImage, PeSigned,
};
pub use signature::{add_nested, nested_count, sign_indirect_data};
pub use timestamp::{add_timestamp, tst_info, TimestampRequest, Timestamper};
pub use verify::{verify_chain, verify_signature, VerifiedSignature};

use std::time::SystemTime;

/// A digest algorithm of the file hash and of the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlg {
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlg {
    /// The name osslsigncode's `-h` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// The digest's length in bytes.
    pub fn output_len(self) -> usize {
        match self {
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// `data`'s digest.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        let mut h = self.hasher();
        h.update(data);
        h.finalize().to_vec()
    }

    pub(crate) fn hasher(self) -> Box<dyn sha2::digest::DynDigest + Send> {
        match self {
            HashAlg::Sha256 => Box::new(sha2::Sha256::default()),
            HashAlg::Sha384 => Box::new(sha2::Sha384::default()),
            HashAlg::Sha512 => Box::new(sha2::Sha512::default()),
        }
    }

    pub(crate) fn oid(self) -> const_oid::ObjectIdentifier {
        match self {
            HashAlg::Sha256 => asn1::SHA256,
            HashAlg::Sha384 => asn1::SHA384,
            HashAlg::Sha512 => asn1::SHA512,
        }
    }

    /// The algorithm of a digest OID; `None`: not SHA-256/384/512.
    pub fn from_oid(oid: &const_oid::ObjectIdentifier) -> Option<HashAlg> {
        [HashAlg::Sha256, HashAlg::Sha384, HashAlg::Sha512]
            .into_iter()
            .find(|h| h.oid() == *oid)
    }
}

impl std::str::FromStr for HashAlg {
    type Err = Error;
    fn from_str(s: &str) -> Result<HashAlg, Error> {
        match s {
            "sha256" => Ok(HashAlg::Sha256),
            "sha384" => Ok(HashAlg::Sha384),
            "sha512" => Ok(HashAlg::Sha512),
            other => Err(Error::Options(format!(
                "unknown hash {other:?}: use sha256, sha384 or sha512"
            ))),
        }
    }
}

/// The kind of the signing key, which decides the signature's encoding and algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA PKCS#1 v1.5 (e.g. CKM_SHA256_RSA_PKCS).
    Rsa,
    /// ECDSA on P-256; the signer returns r‖s (32 + 32 bytes).
    EcdsaP256,
    /// ECDSA on P-384; the signer returns r‖s (48 + 48 bytes).
    EcdsaP384,
}

/// The key: signs data, hashing it itself (the token does hash and signature in one
/// operation, e.g. CKM_SHA256_RSA_PKCS; for ECDSA a signer may hash with
/// [`HashAlg::digest`] and sign the digest with CKM_ECDSA, which more tokens have).
pub trait RawSigner {
    /// What the signer's errors are.
    type Error: std::error::Error + Send + Sync + 'static;
    /// The key's kind.
    fn key(&self) -> KeyKind;
    /// The signature of `data_to_sign` hashed with `hash`: RSA PKCS#1 v1.5 bytes, or
    /// ECDSA's raw r‖s (converted to DER here).
    fn sign(&self, hash: HashAlg, data_to_sign: &[u8]) -> Result<Vec<u8>, Self::Error>;
    /// The signer's certificate, DER.
    fn certificate(&self) -> &[u8];
    /// Further certificates to include (the chain, without the root if you like), DER.
    fn chain(&self) -> &[Vec<u8>];
}

/// osslsigncode's statement type (`-comm` makes it commercial).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Statement {
    #[default]
    Individual,
    Commercial,
}

/// What to put into a signature, as osslsigncode's options say it.
#[derive(Debug, Clone)]
pub struct SignOptions {
    /// `-h`: the file hash's and the signature's digest.
    pub hash: HashAlg,
    /// `-n`: the description (SpcSpOpusInfo.programName).
    pub description: Option<String>,
    /// `-i`: the URL (SpcSpOpusInfo.moreInfo).
    pub url: Option<String>,
    /// `-comm`: commercial rather than individual.
    pub statement: Statement,
    /// The signingTime attribute (OpenSSL always adds one).
    pub signing_time: SystemTime,
    /// `-ph`: page hashes (PE only).
    pub page_hashes: bool,
    /// `-nest`: keep the file's signature and add this one beside it (PE here; other
    /// formats nest at `attach-signature -nest`). A file without a signature is
    /// signed plainly.
    pub nested: bool,
    /// `-ts`: who fetches the RFC 3161 timestamp of each signature made (the
    /// signature is counter-signed as osslsigncode's `-ts` does); `None`: none.
    pub timestamp: Option<Timestamper>,
}

impl SignOptions {
    /// `hash`, no description or URL, individual, signed now, no page hashes, not
    /// nested, no timestamp.
    pub fn new(hash: HashAlg) -> SignOptions {
        SignOptions {
            hash,
            description: None,
            url: None,
            statement: Statement::Individual,
            signing_time: SystemTime::now(),
            page_hashes: false,
            nested: false,
            timestamp: None,
        }
    }
}

/// Why signing failed; each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading or writing the file failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the PE file is damaged: {0}")]
    DamagedPe(String),
    #[error("not an Authenticode data blob: {0}; make it with `osslsigncode extract-data -h HASH -in FILE -out BLOB`")]
    NotBlob(String),
    #[error(
        "the file's existing signature cannot be read: {0}; sign without nesting to replace it"
    )]
    ExistingSignature(String),
    #[error("the signing certificate cannot be read: {0}; give the signer's certificate as DER")]
    Certificate(String),
    #[error("the key cannot sign: {0}")]
    Signer(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the key returned a signature of the wrong shape: {0}; check that the key kind matches the key")]
    BadSignature(String),
    #[error("{0}")]
    Options(String),
    #[error("no timestamp server gave a timestamp (tried in this order: {}): {why}; nothing was signed. Check that the signing host reaches them, or change the timestamp list", .tried.join(", "))]
    Timestamp { tried: Vec<String>, why: String },
    #[error("not a security catalog: {0}; give a catalog made by makecat (a PKCS#7 certificate trust list)")]
    NotCatalog(String),
    #[error("the signature is not this file's: {0}; sign the file again (it changed since its data was extracted, or the signature is another file's)")]
    WrongFile(String),
    #[error(
        "not an Authenticode signature: {0}; give the DER PKCS#7 SignedData the appliance returned"
    )]
    NotSignature(String),
    #[error("{0}")]
    Untrusted(String),
    #[error("encoding the signature failed: {0}")]
    Encoding(#[from] der::Error),
}

/// The certificates in a file's bytes, DER each: one DER certificate, or PEM with one
/// or more (the signer's first, then its chain, as osslsigncode's `-certs` takes them).
pub fn certificates(bytes: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
    use der::{Decode, Encode};
    use x509_cert::Certificate;
    if bytes.starts_with(b"-----BEGIN") || bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        let certs = Certificate::load_pem_chain(bytes)
            .map_err(|e| Error::Certificate(format!("not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(Error::Certificate("the PEM holds no certificate".into()));
        }
        return certs.iter().map(|c| Ok(c.to_der()?)).collect();
    }
    let c = Certificate::from_der(bytes)
        .map_err(|e| Error::Certificate(format!("neither PEM nor one DER certificate: {e}")))?;
    Ok(vec![c.to_der()?])
}
