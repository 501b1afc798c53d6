//! RFC 3161 timestamps as Authenticode counter-signs with them (osslsigncode's `-ts`):
//! the request's messageImprint is the hash of the signer's signature value, and the
//! TSA's TimeStampToken goes into the signer's unsigned attribute
//! 1.3.6.1.4.1.311.3.3.1 (szOID_RFC3161_counterSign).
//!
//! The engine builds the request and checks and embeds the reply; who carries it to a
//! server (HTTP, which servers, how long) is the caller's [`Timestamper`].

use std::sync::Arc;

use cms::content_info::ContentInfo;
use cms::signed_data::{SignedData, SignerInfo, SignerInfos};
use der::asn1::{Any, Int, OctetString, SetOfVec};
use der::{Decode, Encode};
use x509_cert::attr::Attribute;
use x509_tsp::{MessageImprint, TimeStampReq, TimeStampResp, TspVersion, TstInfo};

use crate::{asn1, Error, HashAlg};

/// szOID_RFC3161_counterSign: the unsigned attribute holding an RFC 3161 timestamp.
pub const RFC3161_COUNTER_SIGN: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.3.3.1");
/// id-ct-TSTInfo: the content type of a TimeStampToken.
pub const TST_INFO: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.16.1.4");

/// Fetches a timestamp: given the request, answers a TimeStampResp (DER) that
/// [`TimestampRequest::check`] accepts, or [`Error::Timestamp`] naming the servers
/// tried. Called once per signature made, after the key signed.
#[derive(Clone)]
pub struct Timestamper(
    #[allow(clippy::type_complexity)]
    pub  Arc<dyn Fn(&TimestampRequest) -> Result<Vec<u8>, Error> + Send + Sync>,
);

impl Timestamper {
    /// A timestamper calling `f`.
    pub fn new(
        f: impl Fn(&TimestampRequest) -> Result<Vec<u8>, Error> + Send + Sync + 'static,
    ) -> Timestamper {
        Timestamper(Arc::new(f))
    }
}

impl std::fmt::Debug for Timestamper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Timestamper")
    }
}

/// An RFC 3161 TimeStampReq for one signature: certReq set (the reply carries the
/// TSA's certificate, as Authenticode verifiers want), a random 64-bit nonce.
#[derive(Debug, Clone)]
pub struct TimestampRequest {
    hash: HashAlg,
    imprint: Vec<u8>,
    nonce: Int,
    der: Vec<u8>,
}

impl TimestampRequest {
    /// The request for the first signer of `signature` (a DER ContentInfo):
    /// messageImprint = `hash` of that signer's signature value.
    pub fn for_signature(signature: &[u8], hash: HashAlg) -> Result<TimestampRequest, Error> {
        let (_, sd) = signed_data(signature)?;
        let si = sd
            .signer_infos
            .0
            .get(0)
            .ok_or_else(|| Error::Options("the signature to timestamp has no signer".into()))?;
        TimestampRequest::over(si.signature.as_bytes(), hash)
    }

    /// The request whose messageImprint is `hash` of `signature_value`.
    pub fn over(signature_value: &[u8], hash: HashAlg) -> Result<TimestampRequest, Error> {
        let mut n = [0u8; 8];
        getrandom::fill(&mut n).map_err(|e| {
            Error::Options(format!(
                "no randomness for the timestamp nonce: {e}; check the system's random source"
            ))
        })?;
        TimestampRequest::with_nonce_bytes(signature_value, hash, n)
    }

    /// [`TimestampRequest::over`] with a nonce chosen by the caller, so that recorded
    /// replies answer it: for fuzz targets only (feature `fuzzing`), never in a
    /// shipped build, where the nonce must be unpredictable.
    #[cfg(feature = "fuzzing")]
    pub fn with_nonce(
        signature_value: &[u8],
        hash: HashAlg,
        nonce: [u8; 8],
    ) -> Result<TimestampRequest, Error> {
        TimestampRequest::with_nonce_bytes(signature_value, hash, nonce)
    }

    fn with_nonce_bytes(
        signature_value: &[u8],
        hash: HashAlg,
        mut n: [u8; 8],
    ) -> Result<TimestampRequest, Error> {
        let imprint = hash.digest(signature_value);
        // Positive, and minimal (the first byte is neither 0 nor ≥ 0x80).
        n[0] = (n[0] & 0x7f) | 0x40;
        let nonce = Int::new(&n)?;
        let req = TimeStampReq {
            version: TspVersion::V1,
            message_imprint: MessageImprint {
                hash_algorithm: spki::AlgorithmIdentifier {
                    oid: hash.oid(),
                    parameters: Some(Any::null()),
                },
                hashed_message: OctetString::new(imprint.clone())?,
            },
            req_policy: None,
            nonce: Some(nonce.clone()),
            cert_req: true,
            extensions: None,
        };
        Ok(TimestampRequest {
            hash,
            imprint,
            nonce,
            der: req.to_der()?,
        })
    }

    /// The DER TimeStampReq, the body of an `application/timestamp-query` POST.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The hash of the signature value the request asks to timestamp.
    pub fn imprint(&self) -> &[u8] {
        &self.imprint
    }

    /// The TimeStampToken (DER ContentInfo) of `response`, a DER TimeStampResp, when
    /// it answers this request: status granted (with or without modifications), a
    /// SignedData token over a TSTInfo whose messageImprint is ours and whose nonce is
    /// ours, signed by one signer. The error says what is wrong.
    pub fn check(&self, response: &[u8]) -> Result<Vec<u8>, String> {
        use cmpv2::status::PkiStatus;
        let resp =
            TimeStampResp::from_der(response).map_err(|e| format!("not a TimeStampResp: {e}"))?;
        if !matches!(
            resp.status.status,
            PkiStatus::Accepted | PkiStatus::GrantedWithMods
        ) {
            let text = resp
                .status
                .status_string
                .as_ref()
                .map(|s| {
                    s.iter()
                        .map(|t| t.as_str().to_owned())
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default();
            return Err(format!(
                "the server refused: status {:?} {text}",
                resp.status.status
            ));
        }
        let token = resp
            .time_stamp_token
            .ok_or("the reply is granted but carries no timestamp token")?;
        let token = token
            .to_der()
            .map_err(|e| format!("the token cannot be encoded: {e}"))?;
        let (tst, signers) = read_token(&token)?;
        let mi = &tst.message_imprint;
        if HashAlg::from_oid(&mi.hash_algorithm.oid) != Some(self.hash)
            || mi.hashed_message.as_bytes() != self.imprint.as_slice()
        {
            return Err("the timestamp is of another message imprint than the signature's".into());
        }
        if tst.nonce.as_ref() != Some(&self.nonce) {
            return Err("the timestamp's nonce is not the request's".into());
        }
        let [si] = signers.as_slice() else {
            return Err(format!("the token has {} signers, not one", signers.len()));
        };
        if si.signature.as_bytes().is_empty() || si.signed_attrs.is_none() {
            return Err("the token's signature over its TSTInfo is missing".into());
        }
        Ok(token)
    }
}

/// The TSTInfo of a TimeStampToken (DER ContentInfo), and its signers.
///
/// Read field by field rather than as a `cms` SignedData: TSAs (OpenSSL's among them)
/// put their certificate into the token's certificate SET twice when it is both the
/// signer's and in the chain, which a strict DER SET OF refuses; the certificates are
/// not needed here.
fn read_token(token: &[u8]) -> Result<(TstInfo, Vec<SignerInfo>), String> {
    use der::{Reader, Tag, Tagged};
    let bad = |e: der::Error| format!("the token cannot be read: {e}");
    let ci = ContentInfo::from_der(token).map_err(bad)?;
    if ci.content_type != asn1::SIGNED_DATA {
        return Err(format!(
            "the token's content type is {}, not signedData",
            ci.content_type
        ));
    }
    if ci.content.tag() != Tag::Sequence {
        return Err("the token's signedData is not a SEQUENCE".into());
    }
    let mut r = der::SliceReader::new(ci.content.value()).map_err(bad)?;
    let _version = Any::decode(&mut r).map_err(bad)?;
    let _digest_algorithms = Any::decode(&mut r).map_err(bad)?;
    let encap = cms::signed_data::EncapsulatedContentInfo::decode(&mut r).map_err(bad)?;
    // certificates [0] and crls [1], skipped.
    while r.peek_tag().map_err(bad)?.is_context_specific() {
        Any::decode(&mut r).map_err(bad)?;
    }
    let infos = Any::decode(&mut r).map_err(bad)?;
    if infos.tag() != Tag::Set {
        return Err("the token's signerInfos is not a SET".into());
    }
    let mut ir = der::SliceReader::new(infos.value()).map_err(bad)?;
    let mut signers = Vec::new();
    while !ir.is_finished() {
        signers.push(SignerInfo::decode(&mut ir).map_err(bad)?);
    }
    if encap.econtent_type != TST_INFO {
        return Err(format!(
            "the token carries {}, not a TSTInfo",
            encap.econtent_type
        ));
    }
    let tst = encap.econtent.ok_or("the token carries no TSTInfo")?;
    let tst = tst
        .decode_as::<OctetString>()
        .map_err(|e| format!("the token's content is not an OCTET STRING: {e}"))?;
    let tst = TstInfo::from_der(tst.as_bytes())
        .map_err(|e| format!("the token's TSTInfo cannot be read: {e}"))?;
    Ok((tst, signers))
}

/// The TSTInfo of `token`, a TimeStampToken (DER ContentInfo): what a timestamp says
/// (time, message imprint, serial number, …).
pub fn tst_info(token: &[u8]) -> Result<TstInfo, Error> {
    read_token(token).map(|(t, _)| t).map_err(Error::Options)
}

/// `signature` (a DER ContentInfo) with the TimeStampToken of `response` (a DER
/// TimeStampResp answering `request`) as its first signer's
/// szOID_RFC3161_counterSign unsigned attribute, replacing one it had.
pub fn add_timestamp(
    signature: &[u8],
    request: &TimestampRequest,
    response: &[u8],
) -> Result<Vec<u8>, Error> {
    let (mut ci, sd) = signed_data(signature)?;
    let mut infos: Vec<SignerInfo> = sd.signer_infos.0.clone().into_vec();
    let first = infos
        .first_mut()
        .ok_or_else(|| Error::Options("the signature to timestamp has no signer".into()))?;
    if request.imprint != request.hash.digest(first.signature.as_bytes()) {
        return Err(Error::Options(
            "the timestamp request is not for this signature".into(),
        ));
    }
    let token = request.check(response).map_err(|why| Error::Timestamp {
        tried: Vec::new(),
        why,
    })?;
    let mut unsigned: Vec<Attribute> = first
        .unsigned_attrs
        .take()
        .map(|a| a.into_vec())
        .unwrap_or_default();
    unsigned.retain(|a| a.oid != RFC3161_COUNTER_SIGN);
    unsigned.push(Attribute {
        oid: RFC3161_COUNTER_SIGN,
        values: SetOfVec::try_from(vec![Any::from_der(&token)?])?,
    });
    first.unsigned_attrs = Some(SetOfVec::try_from(unsigned)?);
    let mut sd = sd;
    sd.signer_infos = SignerInfos(SetOfVec::try_from(infos)?);
    ci.content = Any::encode_from(&sd)?;
    Ok(ci.to_der()?)
}

/// `signature` timestamped by `ts`.
pub(crate) fn timestamp_with(
    signature: &[u8],
    hash: HashAlg,
    ts: &Timestamper,
) -> Result<Vec<u8>, Error> {
    let request = TimestampRequest::for_signature(signature, hash)?;
    let response = (ts.0)(&request)?;
    add_timestamp(signature, &request, &response)
}

fn signed_data(der: &[u8]) -> Result<(ContentInfo, SignedData), Error> {
    let bad = |e: der::Error| Error::Options(format!("not a PKCS#7 signature: {e}"));
    let ci = ContentInfo::from_der(der).map_err(bad)?;
    if ci.content_type != asn1::SIGNED_DATA {
        return Err(Error::Options(format!(
            "its content type is {}, not signedData",
            ci.content_type
        )));
    }
    let sd: SignedData = ci.content.decode_as().map_err(bad)?;
    Ok((ci, sd))
}
