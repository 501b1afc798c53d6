//! The native engine's PE reader on any bytes: headers, the Authenticode digest, page
//! hashes, the existing signature and nesting into it, and a whole signature written
//! to memory (what the agent does with an uploaded PE, and the client in digest mode),
//! and the same bytes signed where they are held, without a copy (what the agent does
//! with an input of up to 1 MiB): the two must make the same file.
#![no_main]

mod common;

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use signet_authenticode::{
    add_nested, nested_count, sign_pe, sign_pe_in_memory, HashAlg, PeImage, SignOptions,
};

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
    options.page_hashes = data.len().is_multiple_of(2);
    options.nested = data.len().is_multiple_of(3);
    let mut out = Cursor::new(Vec::new());
    let copied = sign_pe(&mut Cursor::new(data), &mut out, &options, common::signer());
    let held = sign_pe_in_memory(data, &options, common::signer(), None);
    assert_eq!(
        copied.is_ok(),
        held.is_ok(),
        "one way signed, the other not"
    );
    if let (Ok(_), Ok((signed, tail))) = (copied, held) {
        // The input's first bytes kept, the two fields written over, then the tail.
        let mut made = data[..signed.kept as usize].to_vec();
        let at = signed.checksum_at as usize;
        made[at..at + 4].copy_from_slice(&signed.checksum.to_le_bytes());
        let at = signed.security_dir_at as usize;
        made[at..at + 4].copy_from_slice(&signed.table_offset.to_le_bytes());
        made[at + 4..at + 8].copy_from_slice(&signed.table_size.to_le_bytes());
        made.extend_from_slice(&tail);
        assert!(made == out.into_inner(), "signed in memory, another file");
    }
});
