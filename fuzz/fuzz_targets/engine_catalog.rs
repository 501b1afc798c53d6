//! The native engine's catalog signing on any bytes: `sign_catalog` reads the
//! uploaded security catalog (a PKCS#7 SignedData around a certificate trust list),
//! keeps the trust list and signs it — what the agent does with a `.cat` file.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use signet_authenticode::{nested_count, sign_catalog, HashAlg, SignOptions};

fuzz_target!(|data: &[u8]| {
    let mut options = SignOptions::new(if data.len().is_multiple_of(2) {
        HashAlg::Sha256
    } else {
        HashAlg::Sha384
    });
    options.description = Some("fuzz".into());
    options.url = Some("https://signet.example/".into());
    if let Ok(signed) = sign_catalog(data, &options, common::signer()) {
        // What was made is read again as a signature (the nested-signature reader).
        let _ = nested_count(&signed);
    }
});
