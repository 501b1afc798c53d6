//! Authenticode's ASN.1 types (Microsoft's "Windows Authenticode Portable Executable
//! Signature Format"), derived with `der`; and the object identifiers this crate uses.

use const_oid::ObjectIdentifier;
use der::asn1::{Any, BitString, BmpString, Ia5String, OctetString, SetOfVec};
use der::{Choice, Sequence};
use spki::AlgorithmIdentifierOwned;

/// SPC_INDIRECT_DATA_OBJID: the content type of an Authenticode SignedData.
pub const SPC_INDIRECT_DATA: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.1.4");
/// SPC_PE_IMAGE_DATAOBJ: the data of a PE file's SpcIndirectDataContent.
pub const SPC_PE_IMAGE_DATA: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.1.15");
/// SPC_SP_OPUS_INFO_OBJID: the description and URL attribute.
pub const SPC_SP_OPUS_INFO: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.1.12");
/// SPC_STATEMENT_TYPE_OBJID: the statement type attribute.
pub const SPC_STATEMENT_TYPE: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.1.11");
/// SPC_INDIVIDUAL_SP_KEY_PURPOSE_OBJID.
pub const SPC_INDIVIDUAL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.1.21");
/// SPC_COMMERCIAL_SP_KEY_PURPOSE_OBJID.
pub const SPC_COMMERCIAL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.1.22");
/// SPC_NESTED_SIGNATURE_OBJID: an unsigned attribute holding further signatures.
pub const SPC_NESTED_SIGNATURE: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.4.1");
/// SPC_PE_IMAGE_PAGE_HASHES_V1 (SHA-1 page hashes).
pub const PAGE_HASHES_V1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.3.1");
/// SPC_PE_IMAGE_PAGE_HASHES_V2 (SHA-256 page hashes).
pub const PAGE_HASHES_V2: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.3.2");
/// The class id of the serialized page hashes object (SpcSerializedObject.classId).
pub const PAGE_HASHES_CLASS: [u8; 16] = [
    0xa6, 0xb5, 0x86, 0xd5, 0xb4, 0xa1, 0x24, 0x66, 0xae, 0x05, 0xa2, 0x17, 0xda, 0x8e, 0x60, 0xd6,
];

/// PKCS#7 signedData.
pub const SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
/// PKCS#9 contentType.
pub const CONTENT_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.3");
/// PKCS#9 messageDigest.
pub const MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
/// PKCS#9 signingTime.
pub const SIGNING_TIME: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.5");
/// PKCS#9 sequenceNumber (osslsigncode numbers the signatures it nests with it).
pub const SEQUENCE_NUMBER: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.25.4");
/// rsaEncryption (what OpenSSL's PKCS#7 puts as the signature algorithm of an RSA key).
pub const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
pub const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
pub const SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
pub const SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.3");
pub const ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
pub const ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
pub const ECDSA_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.4");

/// SpcIndirectDataContent ::= SEQUENCE { data SpcAttributeTypeAndOptionalValue,
/// messageDigest DigestInfo }
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct SpcIndirectDataContent {
    pub data: SpcAttributeTypeAndOptionalValue,
    pub message_digest: DigestInfo,
}

/// SpcAttributeTypeAndOptionalValue ::= SEQUENCE { type OBJECT IDENTIFIER,
/// value ANY DEFINED BY type OPTIONAL }
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct SpcAttributeTypeAndOptionalValue {
    pub value_type: ObjectIdentifier,
    pub value: Option<Any>,
}

/// DigestInfo ::= SEQUENCE { digestAlgorithm AlgorithmIdentifier, digest OCTET STRING }
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct DigestInfo {
    pub digest_algorithm: AlgorithmIdentifierOwned,
    pub digest: OctetString,
}

/// SpcPeImageData ::= SEQUENCE { flags SpcPeImageFlags (BIT STRING),
/// file [0] EXPLICIT SpcLink OPTIONAL }
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct SpcPeImageData {
    pub flags: BitString,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    pub file: Option<SpcLink>,
}

/// SpcLink ::= CHOICE { url [0] IMPLICIT IA5String, moniker [1] IMPLICIT
/// SpcSerializedObject, file [2] EXPLICIT SpcString }
#[derive(Clone, Debug, Eq, PartialEq, Choice)]
pub enum SpcLink {
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT")]
    Url(Ia5String),
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT", constructed = "true")]
    Moniker(SpcSerializedObject),
    #[asn1(context_specific = "2", tag_mode = "EXPLICIT", constructed = "true")]
    File(SpcString),
}

/// SpcString ::= CHOICE { unicode [0] IMPLICIT BMPString, ascii [1] IMPLICIT IA5String }
#[derive(Clone, Debug, Eq, PartialEq, Choice)]
pub enum SpcString {
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT")]
    Unicode(BmpString),
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT")]
    Ascii(Ia5String),
}

/// SpcSerializedObject ::= SEQUENCE { classId OCTET STRING (16), serializedData OCTET STRING }
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct SpcSerializedObject {
    pub class_id: OctetString,
    pub serialized_data: OctetString,
}

/// The page hashes inside SpcSerializedObject.serializedData:
/// SET OF SEQUENCE { OBJECT IDENTIFIER (v1 or v2), SET OF OCTET STRING }.
#[derive(Clone, Debug, Eq, PartialEq, Sequence, der::ValueOrd)]
pub struct PageHashes {
    pub hash_type: ObjectIdentifier,
    pub hashes: SetOfVec<OctetString>,
}

/// SpcSpOpusInfo ::= SEQUENCE { programName [0] EXPLICIT SpcString OPTIONAL,
/// moreInfo [1] EXPLICIT SpcLink OPTIONAL }
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct SpcSpOpusInfo {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    pub program_name: Option<SpcString>,
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT", optional = "true")]
    pub more_info: Option<SpcLink>,
}

/// SpcStatementType ::= SEQUENCE OF OBJECT IDENTIFIER
pub type SpcStatementType = Vec<ObjectIdentifier>;

/// Ecdsa-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
pub struct EcdsaSigValue {
    pub r: der::asn1::Uint,
    pub s: der::asn1::Uint,
}
