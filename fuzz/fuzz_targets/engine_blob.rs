//! The native engine's digest-mode blob reader on any bytes: what a build VM sends
//! the agent in digest mode. Also the nested-signature reader on the same bytes.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use signet_authenticode::{nested_count, sign_blob, HashAlg, SignOptions};

fuzz_target!(|data: &[u8]| {
    let _ = sign_blob(data, &SignOptions::new(HashAlg::Sha256), common::signer());
    let _ = nested_count(data);
});
