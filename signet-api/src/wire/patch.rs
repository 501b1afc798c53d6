//! An agent's answer that tells a signed file as what signing changed in its input.
//!
//! Signing a PE changes little of it: two header fields (the checksum and the
//! certificate table's directory entry) and what follows its content (the certificate
//! table, over the signature it had). The daemon holds the input already, spooled, so
//! an agent that knows what it changed answers that ([`Patch`], as JSON of media type
//! [`PATCH_MEDIA_TYPE`]) instead of the whole signed file, and the daemon makes the
//! signed file from its copy of the input. The daemon asks for it with `Accept`; an
//! agent that does not know the changes, or is not asked, answers the whole file.

use serde::{Deserialize, Serialize};

/// Media type of a [`Patch`] answer (`Content-Type`), and of the daemon's `Accept`
/// beside `application/octet-stream`.
pub const PATCH_MEDIA_TYPE: &str = "application/vnd.signet.patch+json";

/// The `Accept` of a request whose answer may be a patch, or else the whole file.
pub const ACCEPT_PATCH: &str = "application/vnd.signet.patch+json, application/octet-stream";

/// Whether a media type (a `Content-Type`, or one of `Accept`'s) names a patch
/// ([`PATCH_MEDIA_TYPE`]), whatever its parameters.
pub fn is_patch_type(media_type: &str) -> bool {
    media_type.split(';').next().unwrap_or("").trim() == PATCH_MEDIA_TYPE
}

/// Whether a request's `Accept` values (each a comma-separated list) name a patch.
pub fn accepts_patch<'a>(accept: impl IntoIterator<Item = &'a str>) -> bool {
    accept
        .into_iter()
        .flat_map(|v| v.split(','))
        .any(is_patch_type)
}

/// [`accepts_patch`] of a request's headers, for the servers.
#[cfg(feature = "axum")]
pub fn headers_accept_patch(headers: &http::HeaderMap) -> bool {
    accepts_patch(
        headers
            .get_all(http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

/// The largest patch answer read: a certificate table holds one signature (with those
/// nested in it), far below this.
pub const PATCH_MAX: usize = 16 << 20;

/// The signed file, as changes to its input: the input's first [`Patch::keep`] bytes,
/// with each of [`Patch::edits`] written over them, then [`Patch::tail`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    /// How many of the input's first bytes the signed file begins with.
    pub keep: u64,
    /// Bytes written over those kept, in order of offset, none overlapping.
    pub edits: Vec<PatchEdit>,
    /// The bytes after those kept, in lower-case hex.
    pub tail: String,
}

/// Bytes written over the input's at an offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchEdit {
    pub at: u64,
    /// Lower-case hex.
    pub bytes: String,
}

/// A [`Patch`] read and checked against the input it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    keep: u64,
    edits: Vec<(u64, Vec<u8>)>,
    tail: Vec<u8>,
}

/// The longest edit: a header field.
const EDIT_MAX: usize = 64;

impl Patch {
    /// The patch of `keep` bytes, `edits` and `tail`.
    pub fn new(keep: u64, edits: &[(u64, &[u8])], tail: &[u8]) -> Patch {
        Patch {
            keep,
            edits: edits
                .iter()
                .map(|(at, bytes)| PatchEdit {
                    at: *at,
                    bytes: crate::hex::lower(bytes),
                })
                .collect(),
            tail: crate::hex::lower(tail),
        }
    }

    /// Reads the patch for an input of `input_len` bytes: every edit within the bytes
    /// kept, in order, none overlapping, none longer than a header field; the bytes
    /// kept within the input. Answers why not.
    pub fn check(&self, input_len: u64) -> Result<Checked, String> {
        if self.keep > input_len {
            return Err(format!(
                "it keeps {} bytes of an input of {input_len}",
                self.keep
            ));
        }
        let mut edits = Vec::with_capacity(self.edits.len());
        let mut free_from = 0u64;
        for e in &self.edits {
            let bytes = crate::hex::decode(&e.bytes)
                .ok_or_else(|| format!("the edit at {} is not hex", e.at))?;
            if bytes.is_empty() || bytes.len() > EDIT_MAX {
                return Err(format!(
                    "the edit at {} is {} bytes long",
                    e.at,
                    bytes.len()
                ));
            }
            let end = e.at.checked_add(bytes.len() as u64);
            if e.at < free_from || end.is_none_or(|end| end > self.keep) {
                return Err(format!(
                    "the edit at {} overlaps another or is not within the {} bytes kept",
                    e.at, self.keep
                ));
            }
            free_from = e.at + bytes.len() as u64;
            edits.push((e.at, bytes));
        }
        let tail = crate::hex::decode(&self.tail).ok_or("its tail is not hex")?;
        Ok(Checked {
            keep: self.keep,
            edits,
            tail,
        })
    }
}

impl Checked {
    /// How many of the input's bytes the signed file begins with.
    pub fn keep(&self) -> u64 {
        self.keep
    }

    /// The patch this was read from, to be kept and read again.
    pub fn to_patch(&self) -> Patch {
        let edits: Vec<(u64, &[u8])> = self
            .edits
            .iter()
            .map(|(at, b)| (*at, b.as_slice()))
            .collect();
        Patch::new(self.keep, &edits, &self.tail)
    }

    /// The edits: offset and bytes, in order.
    pub fn edits(&self) -> &[(u64, Vec<u8>)] {
        &self.edits
    }

    /// The bytes after those kept.
    pub fn tail(&self) -> &[u8] {
        &self.tail
    }

    /// The signed file's length.
    pub fn len(&self) -> u64 {
        self.keep + self.tail.len() as u64
    }

    /// Whether the signed file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the edits that fall in `block`, the input's bytes from offset `at`.
    pub fn apply(&self, at: u64, block: &mut [u8]) {
        let end = at + block.len() as u64;
        for (e_at, bytes) in &self.edits {
            let e_end = e_at + bytes.len() as u64;
            if e_end <= at || *e_at >= end {
                continue;
            }
            let from = e_at.max(&at) - at;
            let to = e_end.min(end) - at;
            let skip = at.saturating_sub(*e_at);
            block[from as usize..to as usize]
                .copy_from_slice(&bytes[skip as usize..(skip + to - from) as usize]);
        }
    }

    /// The signed file made of the whole `input` it was checked against, in one buffer.
    pub fn signed_file(&self, input: &[u8]) -> Vec<u8> {
        let keep = usize::try_from(self.keep)
            .unwrap_or(usize::MAX)
            .min(input.len());
        let mut out = Vec::with_capacity(keep + self.tail.len());
        out.extend_from_slice(&input[..keep]);
        self.apply(0, &mut out);
        out.extend_from_slice(&self.tail);
        out
    }

    /// Whether any edit falls in the input's bytes `at..at + len`.
    pub fn touches(&self, at: u64, len: u64) -> bool {
        self.edits
            .iter()
            .any(|(e_at, bytes)| *e_at < at + len && e_at + bytes.len() as u64 > at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signed file a checked patch makes of `input`, block by block of `block`.
    fn made(p: &Checked, input: &[u8], block: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, chunk) in input[..p.keep() as usize].chunks(block).enumerate() {
            let mut b = chunk.to_vec();
            p.apply((i * block) as u64, &mut b);
            out.extend_from_slice(&b);
        }
        out.extend_from_slice(p.tail());
        out
    }

    #[test]
    fn a_patch_makes_the_same_file_whatever_the_blocks() {
        let input: Vec<u8> = (0..100u8).collect();
        let patch = Patch::new(90, &[(3, &[0xaa, 0xbb]), (9, &[1, 2, 3, 4])], b"TAIL");
        let json = serde_json::to_string(&patch).unwrap();
        let back: Patch = serde_json::from_str(&json).unwrap();
        let p = back.check(100).unwrap();
        let mut want = input[..90].to_vec();
        want[3..5].copy_from_slice(&[0xaa, 0xbb]);
        want[9..13].copy_from_slice(&[1, 2, 3, 4]);
        want.extend_from_slice(b"TAIL");
        for block in [1, 2, 3, 4, 7, 10, 64, 1000] {
            assert_eq!(made(&p, &input, block), want, "blocks of {block}");
        }
        assert_eq!(p.signed_file(&input), want);
        assert_eq!(p.len(), 94);
        assert_eq!(p.to_patch().check(100).unwrap(), p);
        assert!(is_patch_type(PATCH_MEDIA_TYPE));
        assert!(is_patch_type(" application/vnd.signet.patch+json; q=1"));
        assert!(!is_patch_type("application/octet-stream"));
        assert!(accepts_patch([ACCEPT_PATCH]));
        assert!(
            ACCEPT_PATCH.ends_with(", application/octet-stream"),
            "or else the file"
        );
        assert!(accepts_patch([
            "text/plain",
            "application/octet-stream, application/vnd.signet.patch+json"
        ]));
        assert!(!accepts_patch(["application/octet-stream"]));
        assert!(!accepts_patch([]));
        assert!(p.touches(0, 4) && p.touches(12, 1) && !p.touches(5, 4) && !p.touches(13, 50));
    }

    #[cfg(feature = "axum")]
    #[test]
    fn a_request_takes_a_patch_when_one_of_its_accept_headers_names_it() {
        let mut headers = http::HeaderMap::new();
        assert!(!headers_accept_patch(&headers));
        headers.append(http::header::ACCEPT, "text/plain".parse().unwrap());
        assert!(!headers_accept_patch(&headers));
        headers.append(http::header::ACCEPT, ACCEPT_PATCH.parse().unwrap());
        assert!(headers_accept_patch(&headers));
    }

    #[test]
    fn a_patch_that_reaches_outside_its_input_is_refused() {
        let bad = |p: Patch| p.check(100).unwrap_err();
        assert!(bad(Patch::new(101, &[], b"")).contains("keeps 101 bytes"));
        assert!(bad(Patch::new(50, &[(49, &[1, 2])], b"")).contains("not within"));
        assert!(bad(Patch::new(50, &[(u64::MAX, &[1])], b"")).contains("not within"));
        assert!(bad(Patch::new(50, &[(4, &[1, 2]), (5, &[1])], b"")).contains("overlaps"));
        assert!(bad(Patch::new(50, &[(8, &[1]), (4, &[1])], b"")).contains("overlaps"));
        assert!(bad(Patch::new(50, &[(4, &[0; 65])], b"")).contains("65 bytes"));
        assert!(bad(Patch::new(50, &[(4, &[])], b"")).contains("0 bytes"));
        let mut odd = Patch::new(50, &[], b"ok");
        odd.tail = "abc".into();
        assert!(bad(odd).contains("not hex"));
        assert!(Patch::new(100, &[(99, &[1])], b"").check(100).is_ok());
    }
}
