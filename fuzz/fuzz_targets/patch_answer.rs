//! A signed file answered as a patch to its input (`signet_api::wire::patch`): the JSON
//! an agent answers signetd and signetd answers the client, checked against the input,
//! and every way signetd makes the signed file of it (read from the spooled input
//! at any offset, hashed from the file or from the blocks held in memory, sliced from
//! those blocks), which must all make the file `Checked::signed_file` makes.
//!
//! Bytes: the first chooses the blocks' and reads' sizes; bit 0 of the second says
//! whether the patch is the JSON that follows (two bytes of length, little-endian, then
//! the JSON) or is made of the bytes that follow (the keep, edits and tail drawn from
//! them); the rest is the input.
#![no_main]

use std::os::unix::fs::FileExt;

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use signet_api::wire::patch::{Checked, Patch};
use signetd::adapters::patched;

/// A patch drawn from `bytes` (keep, then edits of 1 to 64 bytes), and what is left.
fn drawn(bytes: &[u8]) -> Option<(Patch, &[u8])> {
    let (&[k0, k1, n, t], mut rest) = bytes.split_first_chunk::<4>()?;
    let keep = u64::from(u16::from_le_bytes([k0, k1]));
    let mut edits = Vec::new();
    for _ in 0..n % 5 {
        let (&[a0, a1, len], r) = rest.split_first_chunk::<3>()?;
        let len = usize::from(len % 64) + 1;
        let b = r.get(..len)?;
        edits.push((u64::from(u16::from_le_bytes([a0, a1])), b));
        rest = &r[len..];
    }
    let tail = rest.get(..usize::from(t))?;
    let patch = Patch::new(keep, &edits, tail);
    Some((patch, &rest[usize::from(t)..]))
}

fn read(data: &[u8]) -> Option<(Patch, &[u8])> {
    let (&way, rest) = data.split_first()?;
    if way & 1 == 0 {
        let (&[l0, l1], rest) = rest.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_le_bytes([l0, l1]));
        let json = rest.get(..len)?;
        let patch = serde_json::from_slice::<Patch>(json).ok()?;
        return Some((patch, &rest[len..]));
    }
    let (patch, rest) = drawn(rest)?;
    // Made, then read back as the answer it becomes.
    let json = serde_json::to_vec(&patch).expect("a patch is JSON");
    let back = serde_json::from_slice::<Patch>(&json).expect("a patch made is read back");
    assert_eq!(back, patch, "a patch read back is another");
    Some((back, rest))
}

/// The spooled input's file, one for the process, rewritten for each input.
fn spooled(input: &[u8]) -> std::fs::File {
    thread_local! {
        static FILE: std::fs::File = tempfile::tempfile().expect("a temporary file");
    }
    FILE.with(|f| {
        let f = f.try_clone().expect("the file again");
        f.set_len(0).expect("emptied");
        f.write_all_at(input, 0).expect("written");
        f
    })
}

fn check_ways(p: &Checked, input: &[u8], step: usize) {
    let want = p.signed_file(input);
    assert_eq!(
        want.len() as u64,
        p.len(),
        "the signed file is not as long as said"
    );
    assert_eq!(p.to_patch().check(input.len() as u64).as_ref(), Ok(p));
    let sha: [u8; 32] = Sha256::digest(&want).into();

    // The input in blocks of `step`, as signetd holds a small one.
    let blocks: Vec<bytes::Bytes> = input
        .chunks(step)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let mut made = Vec::new();
    for (i, chunk) in input[..p.keep() as usize].chunks(step).enumerate() {
        let mut b = chunk.to_vec();
        p.apply((i * step) as u64, &mut b);
        assert!(
            b == chunk || p.touches((i * step) as u64, b.len() as u64),
            "a block said to be left alone was edited"
        );
        made.extend_from_slice(&b);
    }
    made.extend_from_slice(p.tail());
    assert!(made == want, "applied block by block, another file");
    assert_eq!(patched::sha256_of_blocks(&blocks, p).ok(), Some(sha));
    let mut sliced = Vec::new();
    while (sliced.len() as u64) < p.len() {
        let part = patched::slice_of_blocks(&blocks, p, sliced.len() as u64, step + 3)
            .expect("the blocks hold the input");
        assert!(!part.is_empty(), "a slice before the end is empty");
        sliced.extend_from_slice(&part);
    }
    assert!(sliced == want, "sliced from the blocks, another file");

    // The input spooled to a file.
    let file = spooled(input);
    assert_eq!(patched::sha256(&file, p).ok(), Some(sha));
    let mut out = vec![0u8; step + 5];
    let mut read = Vec::new();
    loop {
        let n = patched::fill(&file, p, read.len() as u64, &mut out).expect("the file is read");
        if n == 0 {
            break;
        }
        read.extend_from_slice(&out[..n]);
    }
    assert!(read == want, "read from the file, another file");
    let mut at_end = [0u8; 8];
    assert_eq!(patched::fill(&file, p, p.len(), &mut at_end).ok(), Some(0));
    let mut x = [0u8; 1];
    assert_eq!(file.read_at(&mut x, input.len() as u64).ok(), Some(0));
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let Some((patch, input)) = read(rest) else {
        return;
    };
    let Ok(checked) = patch.check(input.len() as u64) else {
        return;
    };
    check_ways(&checked, input, usize::from(choice) * 37 % 4096 + 1);
});
