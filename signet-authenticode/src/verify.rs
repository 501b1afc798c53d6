//! Checking an Authenticode signature without osslsigncode: that it is well formed
//! and its signer signed it ([`verify_signature`]), and that the signer's certificate
//! chains to trusted CAs ([`verify_chain`]). The file's side (its digest and page
//! hashes) is [`crate::PeImage::check_signature`]'s.

use std::time::SystemTime;

use cms::cert::CertificateChoices;
use cms::content_info::ContentInfo;
use cms::signed_data::{SignedData, SignerIdentifier, SignerInfo};
use const_oid::ObjectIdentifier;
use der::asn1::{Any, OctetString};
use der::{Decode, Encode};
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use x509_cert::Certificate;

use crate::{asn1, Error, HashAlg};

const SHA1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.14.3.2.26");
const SHA1_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.5");
const SHA256_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const SHA384_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.12");
const SHA512_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.13");
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// A signature's parts, read from its DER.
pub(crate) struct SignedContent {
    pub signed_data: SignedData,
    /// The encapsulated SpcIndirectDataContent, as it is.
    pub content: Any,
    pub indirect: asn1::SpcIndirectDataContent,
}

impl SignedContent {
    pub(crate) fn parse(signature: &[u8]) -> Result<SignedContent, Error> {
        let bad = |e: der::Error| Error::NotSignature(e.to_string());
        let ci = ContentInfo::from_der(signature).map_err(bad)?;
        if ci.content_type != asn1::SIGNED_DATA {
            return Err(Error::NotSignature(format!(
                "its content type is {}, not signedData",
                ci.content_type
            )));
        }
        let signed_data: SignedData = ci.content.decode_as().map_err(bad)?;
        let encap = &signed_data.encap_content_info;
        if encap.econtent_type != asn1::SPC_INDIRECT_DATA {
            return Err(Error::NotSignature(format!(
                "it carries {}, not SpcIndirectDataContent",
                encap.econtent_type
            )));
        }
        let Some(content) = encap.econtent.clone() else {
            return Err(Error::NotSignature("it carries no content".into()));
        };
        let indirect = content.decode_as().map_err(bad)?;
        Ok(SignedContent {
            signed_data,
            content,
            indirect,
        })
    }

    fn certificates(&self) -> Vec<&Certificate> {
        self.signed_data
            .certificates
            .iter()
            .flat_map(|set| set.0.iter())
            .filter_map(|c| match c {
                CertificateChoices::Certificate(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    /// The one signer (Authenticode has exactly one) and its certificate.
    fn signer(&self) -> Result<(&SignerInfo, &Certificate), Error> {
        let infos = &self.signed_data.signer_infos.0;
        let (Some(si), 1) = (infos.get(0), infos.len()) else {
            return Err(Error::NotSignature(format!(
                "it has {} signers, Authenticode has one",
                infos.len()
            )));
        };
        let SignerIdentifier::IssuerAndSerialNumber(id) = &si.sid else {
            return Err(Error::NotSignature(
                "its signer is named by key identifier, Authenticode names it by issuer and serial number".into(),
            ));
        };
        let cert = self
            .certificates()
            .into_iter()
            .find(|c| {
                c.tbs_certificate.issuer == id.issuer
                    && c.tbs_certificate.serial_number == id.serial_number
            })
            .ok_or_else(|| {
                Error::NotSignature("it does not carry its signer's certificate".into())
            })?;
        Ok((si, cert))
    }
}

/// The signatures nested in `outer` (a DER ContentInfo), DER each, in order.
pub(crate) fn nested_signatures(outer: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
    let signed = SignedContent::parse(outer)?;
    let mut out = Vec::new();
    for si in signed.signed_data.signer_infos.0.iter() {
        for a in si.unsigned_attrs.iter().flat_map(|a| a.iter()) {
            if a.oid == asn1::SPC_NESTED_SIGNATURE {
                for v in a.values.iter() {
                    out.push(v.to_der()?);
                }
            }
        }
    }
    Ok(out)
}

/// What [`verify_signature`] found.
#[derive(Debug, Clone)]
pub struct VerifiedSignature {
    /// The file digest's algorithm.
    pub hash: HashAlg,
    /// The signer's certificate, DER.
    pub signer: Vec<u8>,
}

/// Checks that `signature` (a DER PKCS#7 SignedData over an SpcIndirectDataContent)
/// is well formed and signed by its signer: its messageDigest attribute is the
/// content's digest and the signer's certificate's key verifies the signed attributes
/// (RSA PKCS#1 v1.5, or ECDSA on P-256/P-384). Whether the file is the one signed is
/// [`crate::PeImage::check_signature`]'s; whether the certificate is trusted,
/// [`verify_chain`]'s.
pub fn verify_signature(signature: &[u8]) -> Result<VerifiedSignature, Error> {
    let signed = SignedContent::parse(signature)?;
    let oid = &signed.indirect.message_digest.digest_algorithm.oid;
    let hash = HashAlg::from_oid(oid).ok_or_else(|| {
        Error::NotSignature(format!("its file digest is {oid}, not SHA-256/384/512"))
    })?;
    let (si, cert) = signed.signer()?;
    let digest_alg = Hash::of_digest(&si.digest_alg.oid)?;
    let Some(attrs) = &si.signed_attrs else {
        return Err(Error::NotSignature(
            "its signer has no signed attributes, Authenticode's have".into(),
        ));
    };
    let md = attrs
        .iter()
        .find(|a| a.oid == asn1::MESSAGE_DIGEST)
        .and_then(|a| a.values.get(0))
        .ok_or_else(|| Error::NotSignature("its signer has no messageDigest".into()))?
        .decode_as::<OctetString>()
        .map_err(|e| Error::NotSignature(format!("its messageDigest: {e}")))?;
    if md.as_bytes() != digest_alg.digest(signed.content.value()) {
        return Err(Error::BadSignature(
            "its messageDigest is not the digest of the content it carries: the signature was altered; sign again".into(),
        ));
    }
    check_signed(
        cert,
        digest_alg,
        &attrs.to_der()?,
        si.signature.as_bytes(),
    )
    .map_err(|why| {
        Error::BadSignature(format!(
            "its signer's key does not verify it ({why}): the signature was altered or made with another key; sign again"
        ))
    })?;
    Ok(VerifiedSignature {
        hash,
        signer: cert.to_der()?,
    })
}

/// Checks that the signer's certificate of `signature` (DER PKCS#7) chains to one of
/// `anchors` (DER certificates; those that cannot be read are skipped) through the
/// certificates the signature carries, each valid at `now` and signed by the next.
/// [`Error::Untrusted`] says why not, as OpenSSL would. Only the anchors that can be
/// the one sought are parsed (a system's bundle holds a hundred or more): those whose
/// bytes hold the certificate's signature (the certificate itself) or the DER of its
/// issuer's name (its issuer), which a certificate the `der` crate reads always does,
/// its encoding being the one DER allows.
pub fn verify_chain(signature: &[u8], anchors: &[Vec<u8>], now: SystemTime) -> Result<(), Error> {
    let signed = SignedContent::parse(signature)?;
    let (_, mut cur) = signed.signer()?;
    let carried = signed.certificates();
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // The anchors holding `needle`, parsed.
    let holding = |needle: &[u8]| -> Vec<Certificate> {
        let finder = memchr::memmem::Finder::new(needle);
        anchors
            .iter()
            .filter(|a| finder.find(a).is_some())
            .filter_map(|a| Certificate::from_der(a).ok())
            .collect()
    };
    for _ in 0..16 {
        let validity = &cur.tbs_certificate.validity;
        if now < validity.not_before.to_unix_duration() {
            return Err(Error::Untrusted("certificate is not yet valid".into()));
        }
        if now > validity.not_after.to_unix_duration() {
            return Err(Error::Untrusted("certificate has expired".into()));
        }
        if holding(cur.signature.raw_bytes()).iter().any(|a| a == cur) {
            return Ok(());
        }
        let issued_by = |c: &Certificate| {
            c.tbs_certificate.subject == cur.tbs_certificate.issuer
                && c != cur
                && check_cert(cur, c).is_ok()
        };
        if holding(&cur.tbs_certificate.issuer.to_der()?)
            .iter()
            .any(issued_by)
        {
            return Ok(());
        }
        match carried.iter().find(|c| issued_by(c)) {
            Some(next) => cur = next,
            None if cur.tbs_certificate.issuer == cur.tbs_certificate.subject => {
                return Err(Error::Untrusted("self-signed certificate".into()))
            }
            None => {
                return Err(Error::Untrusted(
                    "unable to get local issuer certificate".into(),
                ))
            }
        }
    }
    Err(Error::Untrusted("certificate chain too long".into()))
}

/// A digest of a certificate's or a signer's signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hash {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn of_digest(oid: &ObjectIdentifier) -> Result<Hash, Error> {
        match HashAlg::from_oid(oid) {
            Some(HashAlg::Sha256) => Ok(Hash::Sha256),
            Some(HashAlg::Sha384) => Ok(Hash::Sha384),
            Some(HashAlg::Sha512) => Ok(Hash::Sha512),
            None if *oid == SHA1 => Ok(Hash::Sha1),
            None => Err(Error::NotSignature(format!(
                "its signer's digest is {oid}, not SHA-1/256/384/512"
            ))),
        }
    }

    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha1 => ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, data)
                .as_ref()
                .to_vec(),
            Hash::Sha256 => HashAlg::Sha256.digest(data),
            Hash::Sha384 => HashAlg::Sha384.digest(data),
            Hash::Sha512 => HashAlg::Sha512.digest(data),
        }
    }
}

/// Checks that `issuer`'s key signed `cert`.
fn check_cert(cert: &Certificate, issuer: &Certificate) -> Result<(), String> {
    let hash = match cert.signature_algorithm.oid {
        o if o == SHA1_RSA => Hash::Sha1,
        o if o == SHA256_RSA || o == asn1::ECDSA_SHA256 => Hash::Sha256,
        o if o == SHA384_RSA || o == asn1::ECDSA_SHA384 => Hash::Sha384,
        o if o == SHA512_RSA || o == asn1::ECDSA_SHA512 => Hash::Sha512,
        o => return Err(format!("unsupported certificate signature algorithm {o}")),
    };
    let tbs = cert.tbs_certificate.to_der().map_err(|e| e.to_string())?;
    let sig = cert
        .signature
        .as_bytes()
        .ok_or("the certificate's signature is not whole bytes")?;
    check_signed(issuer, hash, &tbs, sig)
}

/// Checks that `cert`'s key made `sig` over `msg` hashed with `hash`.
fn check_signed(cert: &Certificate, hash: Hash, msg: &[u8], sig: &[u8]) -> Result<(), String> {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let key = spki
        .subject_public_key
        .as_bytes()
        .ok_or("the key is not whole bytes")?;
    let alg: &dyn VerificationAlgorithm = if spki.algorithm.oid == asn1::RSA_ENCRYPTION {
        match hash {
            Hash::Sha1 => &signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
            Hash::Sha256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Hash::Sha384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            Hash::Sha512 => &signature::RSA_PKCS1_2048_8192_SHA512,
        }
    } else if spki.algorithm.oid == EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
        match (curve, hash) {
            (Some(c), Hash::Sha256) if c == P256 => &signature::ECDSA_P256_SHA256_ASN1,
            (Some(c), Hash::Sha384) if c == P256 => &signature::ECDSA_P256_SHA384_ASN1,
            (Some(c), Hash::Sha256) if c == P384 => &signature::ECDSA_P384_SHA256_ASN1,
            (Some(c), Hash::Sha384) if c == P384 => &signature::ECDSA_P384_SHA384_ASN1,
            (c, h) => return Err(format!("unsupported ECDSA key ({c:?}) with {h:?}")),
        }
    } else {
        return Err(format!("unsupported key type {}", spki.algorithm.oid));
    };
    UnparsedPublicKey::new(alg, key)
        .verify(msg, sig)
        .map_err(|_| "bad signature".to_owned())
}
