//! Security catalogs (.cat): a PKCS#7 SignedData whose content is a Microsoft
//! certificate trust list (1.3.6.1.4.1.311.10.1), without signers until signed.

use cms::content_info::ContentInfo;
use cms::signed_data::SignedData;
use der::{Decode, Encode};

use crate::signature::{add_nested, nested_count, sign_content};
use crate::{asn1, Error, RawSigner, SignOptions};

/// szOID_CTL: a certificate trust list, the content of a catalog.
pub const CTL: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.10.1");

/// The signed catalog (DER, the whole file) of `catalog`, a catalog file's bytes, as
/// `osslsigncode sign` writes it: the trust list signed by `signer` (contentType the
/// trust list's OID, messageDigest over its octets), with the timestamp when
/// `options.timestamp` is set. A signature the catalog had is replaced; with
/// `options.nested` the new one is nested beside it instead.
pub fn sign_catalog<S: RawSigner>(
    catalog: &[u8],
    options: &SignOptions,
    signer: &S,
) -> Result<Vec<u8>, Error> {
    let bad = |e: der::Error| Error::NotCatalog(e.to_string());
    let ci = ContentInfo::from_der(catalog).map_err(bad)?;
    if ci.content_type != asn1::SIGNED_DATA {
        return Err(Error::NotCatalog(format!(
            "its content type is {}, not signedData",
            ci.content_type
        )));
    }
    let sd: SignedData = ci.content.decode_as().map_err(bad)?;
    if sd.encap_content_info.econtent_type != CTL {
        return Err(Error::NotCatalog(format!(
            "it carries {}, not a certificate trust list",
            sd.encap_content_info.econtent_type
        )));
    }
    let Some(content) = sd.encap_content_info.econtent.clone() else {
        return Err(Error::NotCatalog("it carries no trust list".into()));
    };
    let nest = options.nested && !sd.signer_infos.0.is_empty();
    let sequence = if nest {
        Some(u32::try_from(nested_count(catalog)? + 1).unwrap_or(u32::MAX))
    } else {
        None
    };
    let ours = sign_content(content, CTL, options, signer, sequence)?;
    if nest {
        return add_nested(&ci.to_der()?, &ours);
    }
    Ok(ours)
}
