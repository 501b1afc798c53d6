//! The PKCS#7 SignedData over an SpcIndirectDataContent, as `osslsigncode sign`
//! (OpenSSL's PKCS#7) builds it; and nesting one signature inside another.

use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{
    CertificateSet, EncapsulatedContentInfo, SignedData, SignerIdentifier, SignerInfo, SignerInfos,
};
use der::asn1::{Any, BmpString, Ia5String, OctetString, SetOfVec, UtcTime};
use der::{Decode, Encode};
use spki::AlgorithmIdentifierOwned;
use x509_cert::attr::Attribute;
use x509_cert::Certificate;

use crate::asn1::{self, EcdsaSigValue, SpcLink, SpcSpOpusInfo, SpcString};
use crate::{Error, KeyKind, RawSigner, SignOptions, Statement};

/// The DER ContentInfo (PKCS#7 SignedData) that signs `indirect`, the DER
/// SpcIndirectDataContent, with `signer` as `options` say: what `osslsigncode sign`
/// writes for it. Its messageDigest is over `indirect`'s content octets (Authenticode).
pub fn sign_indirect_data<S: RawSigner>(
    indirect: &[u8],
    options: &SignOptions,
    signer: &S,
) -> Result<Vec<u8>, Error> {
    sign_with_sequence(indirect, options, signer, None)
}

/// [`sign_indirect_data`]; `sequence`: the PKCS#9 sequenceNumber attribute osslsigncode
/// adds to a signature it nests (1 for the first nested one, then 2, …).
pub(crate) fn sign_with_sequence<S: RawSigner>(
    indirect: &[u8],
    options: &SignOptions,
    signer: &S,
    sequence: Option<u32>,
) -> Result<Vec<u8>, Error> {
    let content = Any::from_der(indirect)?;
    // Checks that it is one.
    content.decode_as::<asn1::SpcIndirectDataContent>()?;
    sign_content(content, asn1::SPC_INDIRECT_DATA, options, signer, sequence)
}

/// The DER ContentInfo (PKCS#7 SignedData) carrying `content` (of type
/// `content_type`) signed by `signer`: contentType, signingTime, statement type,
/// messageDigest over `content`'s octets (without its own tag and length, as
/// osslsigncode hashes it), the sequence number and description when given; with the
/// RFC 3161 counter-signature of `options.timestamp` when set.
pub(crate) fn sign_content<S: RawSigner>(
    content: Any,
    content_type: const_oid::ObjectIdentifier,
    options: &SignOptions,
    signer: &S,
    sequence: Option<u32>,
) -> Result<Vec<u8>, Error> {
    let hash = options.hash;
    let digest = hash.digest(content.value());
    let cert = Certificate::from_der(signer.certificate())
        .map_err(|e| Error::Certificate(e.to_string()))?;

    let mut attrs = vec![
        attribute(asn1::CONTENT_TYPE, Any::encode_from(&content_type)?)?,
        attribute(
            asn1::SIGNING_TIME,
            Any::encode_from(&UtcTime::from_system_time(options.signing_time)?)?,
        )?,
        attribute(
            asn1::SPC_STATEMENT_TYPE,
            Any::encode_from(&vec![match options.statement {
                Statement::Individual => asn1::SPC_INDIVIDUAL,
                Statement::Commercial => asn1::SPC_COMMERCIAL,
            }])?,
        )?,
        attribute(
            asn1::MESSAGE_DIGEST,
            Any::encode_from(&OctetString::new(digest)?)?,
        )?,
    ];
    if let Some(n) = sequence {
        attrs.push(attribute(asn1::SEQUENCE_NUMBER, Any::encode_from(&n)?)?);
    }
    if options.description.is_some() || options.url.is_some() {
        let opus = SpcSpOpusInfo {
            program_name: options.description.as_deref().map(spc_string).transpose()?,
            more_info: options
                .url
                .as_deref()
                .map(|u| {
                    Ia5String::new(u).map(SpcLink::Url).map_err(|_| {
                        Error::Options(format!(
                            "the URL {u:?} has characters that are not ASCII: give it percent-encoded"
                        ))
                    })
                })
                .transpose()?,
        };
        attrs.push(attribute(asn1::SPC_SP_OPUS_INFO, Any::encode_from(&opus)?)?);
    }
    let signed_attrs = SetOfVec::try_from(attrs)?;
    let to_sign = signed_attrs.to_der()?;
    let raw = signer
        .sign(hash, &to_sign)
        .map_err(|e| Error::Signer(Box::new(e)))?;
    let (signature, signature_algorithm) = match signer.key() {
        KeyKind::Rsa => (raw, alg(asn1::RSA_ENCRYPTION, true)?),
        kind @ (KeyKind::EcdsaP256 | KeyKind::EcdsaP384) => {
            let half = if kind == KeyKind::EcdsaP256 { 32 } else { 48 };
            if raw.len() != 2 * half {
                return Err(Error::BadSignature(format!(
                    "an ECDSA signature of this curve is {} bytes (r‖s), the key returned {}",
                    2 * half,
                    raw.len()
                )));
            }
            let (r, s) = raw.split_at(half);
            let der = EcdsaSigValue {
                r: der::asn1::Uint::new(r)?,
                s: der::asn1::Uint::new(s)?,
            }
            .to_der()?;
            let oid = match hash {
                crate::HashAlg::Sha256 => asn1::ECDSA_SHA256,
                crate::HashAlg::Sha384 => asn1::ECDSA_SHA384,
                crate::HashAlg::Sha512 => asn1::ECDSA_SHA512,
            };
            (der, alg(oid, false)?)
        }
    };

    let signer_info = SignerInfo {
        version: CmsVersion::V1,
        sid: SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer: cert.tbs_certificate.issuer.clone(),
            serial_number: cert.tbs_certificate.serial_number.clone(),
        }),
        digest_alg: alg(hash.oid(), true)?,
        signed_attrs: Some(signed_attrs),
        signature_algorithm,
        signature: OctetString::new(signature)?,
        unsigned_attrs: None,
    };
    let mut certs = vec![CertificateChoices::Certificate(cert)];
    for c in signer.chain() {
        let c = Certificate::from_der(c).map_err(|e| Error::Certificate(e.to_string()))?;
        if !certs
            .iter()
            .any(|have| *have == CertificateChoices::Certificate(c.clone()))
        {
            certs.push(CertificateChoices::Certificate(c));
        }
    }
    let signed_data = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::try_from(vec![alg(hash.oid(), true)?])?,
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: content_type,
            econtent: Some(content),
        },
        certificates: Some(CertificateSet(SetOfVec::try_from(certs)?)),
        crls: None,
        signer_infos: SignerInfos(SetOfVec::try_from(vec![signer_info])?),
    };
    let signed = ContentInfo {
        content_type: asn1::SIGNED_DATA,
        content: Any::encode_from(&signed_data)?,
    }
    .to_der()?;
    match &options.timestamp {
        Some(ts) => crate::timestamp::timestamp_with(&signed, hash, ts),
        None => Ok(signed),
    }
}

/// How many signatures are nested in `outer` (a DER ContentInfo): the values of its
/// first signer's SPC_NESTED_SIGNATURE attribute.
pub fn nested_count(outer: &[u8]) -> Result<usize, Error> {
    let bad = |e: der::Error| Error::ExistingSignature(e.to_string());
    let ci = ContentInfo::from_der(outer).map_err(bad)?;
    let sd: SignedData = ci.content.decode_as().map_err(bad)?;
    Ok(sd
        .signer_infos
        .0
        .get(0)
        .and_then(|si| si.unsigned_attrs.as_ref())
        .and_then(|a| a.iter().find(|a| a.oid == asn1::SPC_NESTED_SIGNATURE))
        .map_or(0, |a| a.values.len()))
}

/// `outer` (a DER ContentInfo) with `inner` added as a nested signature: a value of
/// the SPC_NESTED_SIGNATURE unsigned attribute of its first signer, after the ones
/// it has.
pub fn add_nested(outer: &[u8], inner: &[u8]) -> Result<Vec<u8>, Error> {
    let bad = |e: der::Error| Error::ExistingSignature(e.to_string());
    let mut ci = ContentInfo::from_der(outer).map_err(bad)?;
    if ci.content_type != asn1::SIGNED_DATA {
        return Err(Error::ExistingSignature(format!(
            "its content type is {}, not signedData",
            ci.content_type
        )));
    }
    let mut sd: SignedData = ci.content.decode_as().map_err(bad)?;
    let inner = Any::from_der(inner)?;
    let mut infos: Vec<SignerInfo> = sd.signer_infos.0.into_vec();
    let Some(first) = infos.first_mut() else {
        return Err(Error::ExistingSignature("it has no signer".into()));
    };
    let mut unsigned: Vec<Attribute> = first
        .unsigned_attrs
        .take()
        .map(|a| a.into_vec())
        .unwrap_or_default();
    match unsigned
        .iter_mut()
        .find(|a| a.oid == asn1::SPC_NESTED_SIGNATURE)
    {
        Some(a) => a.values.insert(inner)?,
        None => unsigned.push(Attribute {
            oid: asn1::SPC_NESTED_SIGNATURE,
            values: SetOfVec::try_from(vec![inner])?,
        }),
    }
    first.unsigned_attrs = Some(SetOfVec::try_from(unsigned)?);
    sd.signer_infos = SignerInfos(SetOfVec::try_from(infos)?);
    ci.content = Any::encode_from(&sd)?;
    Ok(ci.to_der()?)
}

fn attribute(oid: const_oid::ObjectIdentifier, value: Any) -> Result<Attribute, Error> {
    Ok(Attribute {
        oid,
        values: SetOfVec::try_from(vec![value])?,
    })
}

/// An algorithm identifier; `null`: with NULL parameters (OpenSSL writes them for
/// digests and rsaEncryption).
fn alg(oid: const_oid::ObjectIdentifier, null: bool) -> Result<AlgorithmIdentifierOwned, Error> {
    Ok(AlgorithmIdentifierOwned {
        oid,
        parameters: if null { Some(Any::null()) } else { None },
    })
}

/// osslsigncode writes the description as an IA5String whatever it holds; one that is
/// not ASCII goes here as the BMPString the format has for it.
fn spc_string(s: &str) -> Result<SpcString, Error> {
    if s.is_ascii() {
        return Ok(SpcString::Ascii(Ia5String::new(s)?));
    }
    Ok(SpcString::Unicode(BmpString::from_utf8(s)?))
}
