//! The native engine's PE reader on any bytes: headers, the Authenticode digest, page
//! hashes, the existing signature and nesting into it, and a whole signature written
//! to memory (what the agent does with an uploaded PE, and the client in digest mode).
#![no_main]

mod common;

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use signet_authenticode::{add_nested, nested_count, sign_pe, HashAlg, PeImage, SignOptions};

fuzz_target!(|data: &[u8]| {
    let mut input = Cursor::new(data);
    let Ok(pe) = PeImage::parse(&mut input) else {
        return;
    };
    let _ = pe.digest(&mut input, HashAlg::Sha256);
    let _ = pe.page_hashes(&mut input);
    let _ = pe.indirect_data(&mut input, HashAlg::Sha384, true);
    if let Ok(Some(existing)) = pe.existing_signature(&mut input) {
        let _ = nested_count(&existing);
        let _ = add_nested(&existing, &existing);
    }
    let mut options = SignOptions::new(HashAlg::Sha256);
    options.page_hashes = data.len() % 2 == 0;
    options.nested = data.len() % 3 == 0;
    let mut out = Cursor::new(Vec::new());
    let _ = sign_pe(&mut Cursor::new(data), &mut out, &options, common::signer());
});
