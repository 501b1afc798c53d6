//! The client's digest-mode end for a PE on any bytes: `attach_pe` reads the PKCS#7
//! signature the daemon returns (checking it is the file's: digest, page hashes, the
//! signer) and puts it into the file, replacing or nested; `verify_chain` reads the
//! signer's chain from it, as the client then checks it against its trusted roots.
//! The input is a PE and a signature together: one byte of flags (bit 0: nested;
//! bit 1: the roots are the self-signed certificates the signature carries, else
//! none), the PE's length (4 bytes, little-endian), the PE, then the signature; the
//! seeds (scripts/fuzz.sh) are the fixture PE with the signature osslsigncode made for
//! it.
#![no_main]

use std::io::Cursor;
use std::time::SystemTime;

use cms::cert::CertificateChoices;
use cms::content_info::ContentInfo;
use cms::signed_data::SignedData;
use der::{Decode, Encode};
use libfuzzer_sys::fuzz_target;
use signet_authenticode::{attach_pe, nested_count, verify_chain, verify_signature, PeImage};

/// The self-signed certificates `signature` carries, DER (read here with the RustCrypto
/// crates the engine reads it with): roots as a trust store holds them, which make
/// `verify_chain` walk the chain the signature carries up to one.
fn carried_roots(signature: &[u8]) -> Vec<Vec<u8>> {
    let Ok(info) = ContentInfo::from_der(signature) else {
        return Vec::new();
    };
    let Ok(signed) = info.content.decode_as::<SignedData>() else {
        return Vec::new();
    };
    signed
        .certificates
        .iter()
        .flat_map(|set| set.0.iter())
        .filter_map(|c| match c {
            CertificateChoices::Certificate(c)
                if c.tbs_certificate.issuer == c.tbs_certificate.subject =>
            {
                c.to_der().ok()
            }
            _ => None,
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let [flags, a, b, c, d, rest @ ..] = data else {
        return;
    };
    let len = u32::from_le_bytes([*a, *b, *c, *d]) as usize;
    if len > rest.len() {
        return;
    }
    let (pe, signature) = rest.split_at(len);
    let verifies = verify_signature(signature).is_ok();
    // The seeds' certificates are valid for a year from when scripts/fuzz.sh made
    // them: now is within.
    let roots = if flags & 2 == 2 {
        carried_roots(signature)
    } else {
        Vec::new()
    };
    let _ = verify_chain(signature, &roots, SystemTime::now());
    let alone = nested_count(signature).is_ok_and(|n| n == 0);
    let mut out = Cursor::new(Vec::new());
    let nested = flags & 1 == 1;
    if let Ok(done) = attach_pe(&mut Cursor::new(pe), &mut out, signature, nested) {
        // What was written reads back as a PE holding that signature. attach_pe checks
        // that the signature is the file's (digest, page hashes); whether its signer's
        // key verifies it is the caller's next check (verify_signature), as it is with
        // `osslsigncode attach-signature`. So: replaced by a signature that verifies
        // (and holds no nested ones), the file's whole check passes; nested, the
        // signature the file had is kept as it was, whether it verifies or not.
        let signed = out.into_inner();
        let mut r = Cursor::new(signed.as_slice());
        let image = PeImage::parse(&mut r).expect("attach_pe wrote a PE");
        if done.nested {
            let outer = image
                .existing_signature(&mut r)
                .expect("the signature table reads")
                .expect("a signature");
            assert!(nested_count(&outer).expect("the outer signature reads") >= 1);
        } else if verifies && alone {
            image
                .check_signatures(&mut r)
                .expect("attach_pe wrote a signature that is the file's");
        }
    }
});
