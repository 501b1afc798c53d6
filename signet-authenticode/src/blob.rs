//! Digest mode's blob: the data `osslsigncode extract-data` writes, a PKCS#7
//! SignedData without signers carrying the file's SpcIndirectDataContent.

use cms::content_info::ContentInfo;
use cms::signed_data::SignedData;
use der::{Decode, Encode};

use crate::{asn1, sign_indirect_data, Error, RawSigner, SignOptions};

/// Signs the blob `osslsigncode extract-data [-h HASH] [-ph] -in FILE` made: the
/// DER PKCS#7 signature to give `osslsigncode attach-signature -sigin` for FILE.
/// `options.page_hashes` and `options.nested` do not apply (the blob has its page
/// hashes or not; `attach-signature -nest` nests).
pub fn sign_blob<S: RawSigner>(
    blob: &[u8],
    options: &SignOptions,
    signer: &S,
) -> Result<Vec<u8>, Error> {
    let bad = |e: der::Error| Error::NotBlob(e.to_string());
    // osslsigncode 2.9's extract-data of a cabinet writes the blob followed by the
    // rest of the file; like osslsigncode, read the first DER object.
    let mut reader = der::SliceReader::new(blob).map_err(bad)?;
    let ci = ContentInfo::decode(&mut reader).map_err(bad)?;
    if ci.content_type != asn1::SIGNED_DATA {
        return Err(Error::NotBlob(format!(
            "its content type is {}, not signedData",
            ci.content_type
        )));
    }
    let sd: SignedData = ci.content.decode_as().map_err(bad)?;
    let encap = sd.encap_content_info;
    if encap.econtent_type != asn1::SPC_INDIRECT_DATA {
        return Err(Error::NotBlob(format!(
            "it carries {}, not SpcIndirectDataContent",
            encap.econtent_type
        )));
    }
    let Some(content) = encap.econtent else {
        return Err(Error::NotBlob("it carries no content".into()));
    };
    let indirect: asn1::SpcIndirectDataContent = content.decode_as().map_err(bad)?;
    if crate::HashAlg::from_oid(&indirect.message_digest.digest_algorithm.oid).is_none() {
        return Err(Error::NotBlob(format!(
            "its file digest is {}, not SHA-256/384/512",
            indirect.message_digest.digest_algorithm.oid
        )));
    }
    sign_indirect_data(&content.to_der()?, options, signer)
}
