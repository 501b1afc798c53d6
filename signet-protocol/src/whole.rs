//! A small file read whole into memory, its pages faulted in by one call.
//!
//! A fresh process (the `signet` client runs once per file) has no memory of its own to
//! reuse: every page a buffer of a megabyte touches for the first time is a page fault,
//! 256 of them, each a trap into the kernel (costly in a virtual machine). The kernel
//! can make the pages present in one call (`madvise` with `MADV_POPULATE_WRITE`, Linux
//! 5.14), which [`read`] asks for before it reads. A hint only: where it is refused the
//! pages are faulted in one by one as before.
//!
//! A file that is only passed on — copied by the kernel to a socket or into another
//! file — needs no memory of the process's own at all: [`map`] maps it read-only, its
//! pages those of the kernel's cache (no new pages, nothing zeroed, nothing copied).

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

/// A file's bytes as they were mapped read-only by [`map`]: the pages of the kernel's
/// cache, unmapped when dropped. What it reads is the file as it is: a process that
/// writes the file meanwhile changes these bytes too (check what was made of them
/// against a hash of what they were). A process that truncates the file meanwhile
/// leaves the pages beyond its new end unreadable: the kernel's copies from them
/// (`write`, `writev` to a socket) fail with `EFAULT`, but a read in this process
/// (a copy by a TLS or non-vectored writer) would end it with `SIGBUS`.
#[cfg(target_os = "linux")]
pub struct Mapped {
    at: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and private to this value: no thread writes
// through it, and it is unmapped only when the value is dropped.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
unsafe impl Send for Mapped {}
// SAFETY: as above; shared references only read.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
unsafe impl Sync for Mapped {}

#[cfg(target_os = "linux")]
impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `at` is the start of a readable mapping of `len` bytes (or dangling
        // with `len` 0), alive as long as `self`.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.at.as_ptr(), self.len)
        }
    }
}

#[cfg(target_os = "linux")]
impl Drop for Mapped {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the range is the mapping `map` made, unmapped once, here.
            #[allow(unsafe_code)]
            let _ = unsafe { libc::munmap(self.at.as_ptr().cast(), self.len) };
        }
    }
}

#[cfg(target_os = "linux")]
impl std::fmt::Debug for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapped").field("len", &self.len).finish()
    }
}

/// The file at `path` mapped read-only, whole as long as it was when opened, its pages
/// made present at once (`MAP_POPULATE`): for bytes the kernel copies on (see
/// [`Mapped`]), where [`read`] would fill a buffer of new pages first.
#[cfg(target_os = "linux")]
pub fn map(path: &Path) -> io::Result<Mapped> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    let len = usize::try_from(file.metadata()?.len())
        .map_err(|_| io::Error::other("the file is larger than this process can map"))?;
    if len == 0 {
        return Ok(Mapped {
            at: std::ptr::NonNull::dangling(),
            len: 0,
        });
    }
    // SAFETY: a new read-only private mapping of an open file, at an address the kernel
    // chooses: no memory of the process's own is touched. The descriptor may be closed
    // once it is made.
    #[allow(unsafe_code)]
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_POPULATE,
            file.as_raw_fd(),
            0,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let at = std::ptr::NonNull::new(at.cast::<u8>())
        .ok_or_else(|| io::Error::other("the file was mapped at address 0"))?;
    Ok(Mapped { at, len })
}

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

    #[cfg(target_os = "linux")]
    #[test]
    fn a_mapped_file_is_its_bytes_and_is_copied_on_by_the_kernel() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 1, 4096, (1 << 20) + 17] {
            let path = dir.path().join(format!("f{len}"));
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            std::fs::write(&path, &bytes).unwrap();
            let mapped = map(&path).unwrap();
            assert_eq!(mapped.as_ref(), &bytes[..], "{len} bytes");
            // Copied into another file by the kernel, as the client writes it.
            let copy = dir.path().join(format!("c{len}"));
            std::fs::File::create(&copy)
                .unwrap()
                .write_all(mapped.as_ref())
                .unwrap();
            drop(mapped);
            assert_eq!(std::fs::read(&copy).unwrap(), bytes, "{len} bytes copied");
        }
        assert_eq!(
            map(&dir.path().join("none")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_mapped_file_cut_short_fails_the_kernels_copy_instead_of_ending_the_process() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let mapped = map(&path).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let mut out = std::fs::File::create(dir.path().join("out")).unwrap();
        // The pages past the new end are gone: the copy stops there (a short write,
        // then EFAULT), no signal.
        let written = out.write_all(mapped.as_ref());
        assert!(written.is_err(), "a copy past the file's end went through");
        assert!(std::fs::metadata(dir.path().join("out")).unwrap().len() < 1 << 20);
    }

    #[test]
    fn a_missing_file_is_the_open_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = read(&dir.path().join("none")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
