//! A small file read whole into memory, its pages faulted in by one call.
//!
//! A fresh process (the `signet` client runs once per file) has no memory of its own to
//! reuse: every page a buffer of a megabyte touches for the first time is a page fault,
//! 256 of them, each a trap into the kernel (costly in a virtual machine). The kernel
//! can make the pages present in one call (`madvise` with `MADV_POPULATE_WRITE`, Linux
//! 5.14), which [`read`] asks for before it reads. A hint only: where it is refused the
//! pages are faulted in one by one as before.

use std::io::{self, Read};
use std::path::Path;

/// Below this the faults cost less than the call.
const PREFAULT_FROM: usize = 64 << 10;

/// The file at `path`, whole (as [`std::fs::read`]).
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = std::fs::File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).unwrap_or(0);
    // One byte more: the read that finds the end reads into it, not into a grown buffer.
    let mut buf = Vec::with_capacity(len.saturating_add(1));
    prefault(&mut buf);
    file.read_to_end(&mut buf)?;
    Ok(buf)
}

/// Asks the kernel to make the pages of `buf`'s spare capacity present and writable.
#[cfg(target_os = "linux")]
fn prefault(buf: &mut Vec<u8>) {
    // The smallest page size; with larger pages the call refuses the unaligned range
    // (a hint: nothing is lost).
    const PAGE: usize = 4096;
    let spare = buf.spare_capacity_mut();
    if spare.len() < PREFAULT_FROM {
        return;
    }
    let start = spare.as_mut_ptr() as usize;
    // Only whole pages inside the buffer: nothing outside it is touched.
    let first = start.next_multiple_of(PAGE);
    let last = (start + spare.len()) / PAGE * PAGE;
    if last <= first {
        return;
    }
    // SAFETY: the range lies within `buf`'s own allocation (rounded inwards to whole
    // pages), which this function borrows mutably; MADV_POPULATE_WRITE only makes its
    // pages present, as writing to them would, and changes no byte of the process's
    // memory. A refusal is ignored.
    #[allow(unsafe_code)]
    let _ = unsafe {
        libc::madvise(
            first as *mut libc::c_void,
            last - first,
            libc::MADV_POPULATE_WRITE,
        )
    };
}

#[cfg(not(target_os = "linux"))]
fn prefault(_buf: &mut Vec<u8>) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_read_whole_whatever_its_size() {
        let dir = tempfile::tempdir().unwrap();
        for len in [
            0usize,
            1,
            4095,
            4096,
            PREFAULT_FROM - 1,
            PREFAULT_FROM,
            (1 << 20) + 17,
        ] {
            let path = dir.path().join(format!("f{len}"));
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            std::fs::write(&path, &bytes).unwrap();
            assert_eq!(read(&path).unwrap(), bytes, "{len} bytes");
        }
    }

    #[test]
    fn a_missing_file_is_the_open_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = read(&dir.path().join("none")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
