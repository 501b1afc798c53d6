//! The agent's digest of an uploaded PE made as its bytes arrive (`PeDigester`, fed in
//! pieces of any sizes, as the link delivers them): when signing takes it for the file,
//! the signed file must be the one signing makes by reading the file again.
//!
//! The first byte chooses: bits 0-1 the hash, bit 2 page hashes, bit 3 nesting, and it
//! seeds the pieces' sizes; the rest is the file.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use signet_authenticode::{sign_pe_in_memory, HashAlg, PeDigester, SignOptions};

fuzz_target!(|data: &[u8]| {
    let Some((&choice, file)) = data.split_first() else {
        return;
    };
    let hash = [HashAlg::Sha256, HashAlg::Sha384, HashAlg::Sha512][usize::from(choice & 3) % 3];
    let mut digester = PeDigester::new(hash);
    // Pieces of 1 to 4099 bytes, from a xorshift seeded by the choice.
    let mut x = (u32::from(choice) << 8) | 0x9e37_0001;
    let mut at = 0;
    while at < file.len() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let end = (at + 1 + x as usize % 4099).min(file.len());
        digester.update(&file[at..end]);
        at = end;
    }
    let Some(digested) = digester.finish() else {
        return;
    };
    let mut options = SignOptions::new(hash);
    options.page_hashes = choice & 4 != 0;
    options.nested = choice & 8 != 0;
    let streamed = sign_pe_in_memory(file, &options, common::signer(), Some(&digested));
    let read = sign_pe_in_memory(file, &options, common::signer(), None);
    match (streamed, read) {
        (Ok((a, a_tail)), Ok((b, b_tail))) => {
            assert_eq!(
                (a.kept, a.checksum_at, a.checksum, a.security_dir_at),
                (b.kept, b.checksum_at, b.checksum, b.security_dir_at),
                "the digest made as the bytes arrived gave another checksum or layout"
            );
            assert_eq!(
                (a.table_offset, a.table_size, a.nested),
                (b.table_offset, b.table_size, b.nested)
            );
            assert!(
                a.signature == b.signature && a_tail == b_tail,
                "the digest made as the bytes arrived gave another signature"
            );
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!(
            "signed one way and not the other: as it arrived {:?}, read again {:?}",
            a.err(),
            b.err()
        ),
    }
});
