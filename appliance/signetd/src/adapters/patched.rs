//! A signed file kept as its spooled input and what signing changed in it.
//!
//! Signing a PE changes two header fields and what follows its content; an agent that
//! signed natively answers those changes (`signet_api::wire::patch`). signetd keeps
//! them in the database, committed with `signed` and the audit record
//! ([`crate::adapters::store::Store::finish_patched`]), beside the input it spooled
//! (`<id>.in`, fsync'd before `queued`). Nothing of the input is ever written over, so
//! there is nothing to undo whatever a crash interrupts: the signed file is made as it
//! is read ([`read`]), by a waiting client as soon as the agent answered and by the
//! SHA-256 for the audit meanwhile ([`sha256`]). After the commit the file is renamed
//! to the result (`<id>.out`) without a flush: a crash may leave it `<id>.in`, which
//! the next start renames. Readers look for it under each name ([`open`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use signet_api::wire::patch::Checked;

/// The longest tail (the certificate table) of a result kept as a patch in the
/// database; a longer one is made into a file of its own.
pub const KEPT_MAX: usize = 1 << 20;

/// Whether a result is kept as `patch` (its tail is at most [`KEPT_MAX`]).
pub fn fits(patch: &Checked) -> bool {
    patch.tail().len() <= KEPT_MAX
}

/// The first of `paths` that opens: where the input is now. `paths` come in the order
/// the file is moved through them (`.in`, `.out`, `.delivered`), so that a move
/// between two tries cannot hide it.
pub fn open(paths: &[PathBuf]) -> io::Result<File> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no path to open");
    for p in paths {
        match File::open(p) {
            Ok(f) => return Ok(f),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The signed file's bytes from `at`, at most `want` of them (fewer at its end), made
/// of the input `file` and `patch`.
pub fn read(file: &File, patch: &Checked, at: u64, want: usize) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; want.min(patch.len().saturating_sub(at) as usize)];
    let n = fill(file, patch, at, &mut out)?;
    out.truncate(n);
    Ok(out)
}

/// Fills `out` with the signed file's bytes from `at` (made of the input `file` and
/// `patch`); answers how many there were (fewer than `out` at its end).
pub fn fill(file: &File, patch: &Checked, at: u64, out: &mut [u8]) -> io::Result<usize> {
    let keep = patch.keep();
    let end = at.saturating_add(out.len() as u64).min(patch.len());
    if at >= end {
        return Ok(0);
    }
    let n = (end - at) as usize;
    let kept = (end.min(keep).saturating_sub(at)) as usize;
    if kept > 0 {
        file.read_exact_at(&mut out[..kept], at).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("the spooled input cannot be read up to the {keep} bytes the signed file keeps of it: {e}"),
            )
        })?;
        patch.apply(at, &mut out[..kept]);
    }
    if kept < n {
        let from = (at + kept as u64 - keep) as usize;
        out[kept..n].copy_from_slice(&patch.tail()[from..from + (n - kept)]);
    }
    Ok(n)
}

/// The signed file's SHA-256, read in blocks of [`signet_protocol::IO_BLOCK`] into one
/// buffer.
pub fn sha256(file: &File, patch: &Checked) -> io::Result<[u8; 32]> {
    let mut sha = Sha256::new();
    let mut buf = vec![
        0u8;
        usize::try_from(patch.len()).map_or(signet_protocol::IO_BLOCK, |n| n
            .clamp(1, signet_protocol::IO_BLOCK))
    ];
    let mut at = 0u64;
    loop {
        let n = fill(file, patch, at, &mut buf)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        at += n as u64;
    }
    Ok(sha.finalize().into())
}

/// [`sha256`] of the input held in memory as `blocks` (in order, the whole input): a
/// block no edit touches is hashed where it is, without a copy.
pub fn sha256_of_blocks(blocks: &[bytes::Bytes], patch: &Checked) -> io::Result<[u8; 32]> {
    let mut sha = Sha256::new();
    let keep = patch.keep();
    let mut at = 0u64;
    for b in blocks {
        if at >= keep {
            break;
        }
        let n = usize::try_from((keep - at).min(b.len() as u64)).unwrap_or(b.len());
        let part = &b[..n];
        if patch.touches(at, n as u64) {
            let mut copy = part.to_vec();
            patch.apply(at, &mut copy);
            sha.update(&copy);
        } else {
            sha.update(part);
        }
        at += n as u64;
    }
    if at < keep {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the input held is {at} bytes, fewer than the {keep} the signed file keeps of it"
            ),
        ));
    }
    sha.update(patch.tail());
    Ok(sha.finalize().into())
}

/// The signed file's bytes from `at`, at most `want` of them (fewer at the end of a
/// block of the input, and at the file's end, where there are none), made of the input
/// held in memory as `blocks` (in order, the whole input) and `patch`: a part of a block
/// no edit touches is answered where it is, without a copy.
pub fn slice_of_blocks(
    blocks: &[bytes::Bytes],
    patch: &Checked,
    at: u64,
    want: usize,
) -> io::Result<bytes::Bytes> {
    let keep = patch.keep();
    let end = at.saturating_add(want as u64).min(patch.len());
    if at >= end {
        return Ok(bytes::Bytes::new());
    }
    if at >= keep {
        let from = (at - keep) as usize;
        let to = (end - keep) as usize;
        return Ok(bytes::Bytes::copy_from_slice(&patch.tail()[from..to]));
    }
    let mut start = 0u64;
    for b in blocks {
        let b_end = start + b.len() as u64;
        if at < b_end {
            let to = end.min(keep).min(b_end);
            let part = b.slice((at - start) as usize..(to - start) as usize);
            if !patch.touches(at, to - at) {
                return Ok(part);
            }
            let mut edited = bytes::BytesMut::from(&part[..]);
            patch.apply(at, &mut edited);
            return Ok(edited.freeze());
        }
        start = b_end;
    }
    Err(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!(
            "the input held is {start} bytes, fewer than the {keep} the signed file keeps of it"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use signet_api::wire::patch::Patch;

    #[test]
    fn the_signed_file_is_read_of_the_input_and_the_patch_from_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.in");
        let input: Vec<u8> = (0..700_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &input).unwrap();
        // An old signature replaced: the content ends at 600 000, before the old table.
        let patch = Patch::new(600_000, &[(88, &[1, 2, 3, 4]), (152, &[9; 8])], &[7; 3000])
            .check(700_000)
            .unwrap();
        let mut want = input[..600_000].to_vec();
        want[88..92].copy_from_slice(&[1, 2, 3, 4]);
        want[152..160].copy_from_slice(&[9; 8]);
        want.extend_from_slice(&[7; 3000]);
        let file = open(&[dir.path().join("1.out"), path.clone()]).unwrap();
        for step in [1usize, 7, 90, 4096, 599_999, 1 << 20] {
            let mut made = Vec::new();
            let mut at = 0;
            while at < patch.len() {
                let b = read(&file, &patch, at, step.min(5000)).unwrap();
                assert!(!b.is_empty());
                at += b.len() as u64;
                made.extend_from_slice(&b);
            }
            assert_eq!(made, want, "reads of {step}");
        }
        assert!(read(&file, &patch, patch.len(), 10).unwrap().is_empty());
        let sha: [u8; 32] = Sha256::digest(&want).into();
        assert_eq!(sha256(&file, &patch).unwrap(), sha);
        // The same of the input held in blocks of any size, an edit across two.
        for step in [1usize, 89, 90, 4096, 599_999, 1 << 20] {
            let blocks: Vec<bytes::Bytes> = input
                .chunks(step)
                .map(bytes::Bytes::copy_from_slice)
                .collect();
            assert_eq!(
                sha256_of_blocks(&blocks, &patch).unwrap(),
                sha,
                "blocks of {step}"
            );
        }
        // Read in slices of any size of blocks of any size: the same file, and the
        // parts no edit touches are the blocks' own bytes, not copies.
        for (step, wants) in [
            (89usize, &[4096usize, 1 << 20][..]),
            (90, &[1 << 20]),
            (4096, &[7, 4096, 1 << 20]),
            (599_999, &[7, 4096]),
            (1 << 20, &[4096, 1 << 20]),
        ] {
            let blocks: Vec<bytes::Bytes> = input
                .chunks(step)
                .map(bytes::Bytes::copy_from_slice)
                .collect();
            for &want_n in wants {
                let mut made = Vec::new();
                let mut at = 0;
                while at < patch.len() {
                    let b = slice_of_blocks(&blocks, &patch, at, want_n).unwrap();
                    assert!(!b.is_empty() && b.len() <= want_n);
                    if at >= 4096 && at + (b.len() as u64) < 600_000 {
                        let within = blocks
                            .iter()
                            .any(|blk| blk.as_ptr_range().contains(&b.as_ptr()));
                        assert!(within, "a copy at {at} (blocks of {step})");
                    }
                    at += b.len() as u64;
                    made.extend_from_slice(&b);
                }
                assert_eq!(made, want, "blocks of {step}, slices of {want_n}");
                assert!(slice_of_blocks(&blocks, &patch, at, 10).unwrap().is_empty());
            }
        }
        let short = [bytes::Bytes::copy_from_slice(&input[..500_000])];
        let e = sha256_of_blocks(&short, &patch).unwrap_err();
        assert!(e.to_string().contains("600000"), "{e}");
        let e = slice_of_blocks(&short, &patch, 550_000, 10).unwrap_err();
        assert!(e.to_string().contains("600000"), "{e}");
        // The input is left as it was.
        assert_eq!(std::fs::read(&path).unwrap(), input);
        // An input cut shorter than what the patch keeps is an error, not a short file.
        std::fs::write(&path, &input[..500_000]).unwrap();
        let e = sha256(&File::open(&path).unwrap(), &patch).unwrap_err();
        assert!(e.to_string().contains("600000 bytes"), "{e}");
        assert!(open(&[dir.path().join("none")]).is_err());
        assert!(fits(&patch));
        let big = Patch::new(10, &[], &vec![0; KEPT_MAX + 1])
            .check(10)
            .unwrap();
        assert!(!fits(&big));
    }
}
