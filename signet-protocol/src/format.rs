//! Recognising a file's format from its first bytes, never from its name.

/// How many leading bytes [`detect`] wants to see.
pub const HEAD_LEN: usize = 4096;

/// A format Signet signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Windows Portable Executable: EXE, DLL, SYS, OCX...
    Pe,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Pe => "PE (EXE/DLL/SYS)",
        })
    }
}

/// Why the bytes are not something Signet signs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("the file is empty")]
    Empty,
    #[error("the file is not a supported format ({seen}); Signet signs Windows PE files (EXE, DLL, SYS)")]
    Unsupported { seen: String },
    #[error("digest mode expects the Authenticode data made by `osslsigncode extract-data`, and this is not it")]
    NotDigestBlob,
}

/// Detects the format from the file's first bytes (at least [`HEAD_LEN`] of them, or
/// the whole file when it is shorter).
pub fn detect(head: &[u8]) -> Result<Format, FormatError> {
    if head.is_empty() {
        return Err(FormatError::Empty);
    }
    if head.starts_with(b"MZ") {
        let Some(lfanew) = head.get(0x3c..0x40) else {
            return Err(unsupported("an MZ header too short to be a PE file"));
        };
        let lfanew = u32::from_le_bytes([lfanew[0], lfanew[1], lfanew[2], lfanew[3]]) as usize;
        return match head.get(lfanew..lfanew.saturating_add(4)) {
            Some(b"PE\0\0") => Ok(Format::Pe),
            Some(_) => Err(unsupported("an MZ (DOS) executable without a PE header")),
            None => Err(unsupported(
                "an MZ header whose PE header lies beyond the first 4 KiB or the end of the file",
            )),
        };
    }
    Err(unsupported(describe(head)))
}

/// DER of the `SpcIndirectDataContent` OID (1.3.6.1.4.1.311.2.1.4), which every
/// Authenticode data blob from `osslsigncode extract-data` carries.
const SPC_INDIRECT_DATA_OID: &[u8] = b"\x06\x0a\x2b\x06\x01\x04\x01\x82\x37\x02\x01\x04";

/// Checks that `head` is an Authenticode data blob (digest mode's input): a DER
/// PKCS#7 structure carrying `SpcIndirectDataContent`.
pub fn detect_digest_blob(head: &[u8]) -> Result<(), FormatError> {
    if head.is_empty() {
        return Err(FormatError::Empty);
    }
    if head[0] == 0x30
        && head
            .windows(SPC_INDIRECT_DATA_OID.len())
            .any(|w| w == SPC_INDIRECT_DATA_OID)
    {
        return Ok(());
    }
    Err(FormatError::NotDigestBlob)
}

fn unsupported(seen: &str) -> FormatError {
    FormatError::Unsupported {
        seen: seen.to_owned(),
    }
}

fn describe(head: &[u8]) -> &'static str {
    const KNOWN: &[(&[u8], &str)] = &[
        (
            b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",
            "an OLE compound file such as MSI",
        ),
        (b"MSCF", "a CAB archive"),
        (b"PK\x03\x04", "a ZIP archive"),
        (b"\x7fELF", "a Linux ELF binary"),
        (b"\xcf\xfa\xed\xfe", "a macOS Mach-O binary"),
        (b"%PDF", "a PDF document"),
        (b"\x1f\x8b", "a gzip archive"),
    ];
    for (magic, name) in KNOWN {
        if head.starts_with(magic) {
            return name;
        }
    }
    if std::str::from_utf8(head).is_ok() {
        "text"
    } else {
        "unrecognised binary data"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pe(lfanew: u32, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[..2].copy_from_slice(b"MZ");
        v[0x3c..0x40].copy_from_slice(&lfanew.to_le_bytes());
        if (lfanew as usize) + 4 <= len {
            v[lfanew as usize..lfanew as usize + 4].copy_from_slice(b"PE\0\0");
        }
        v
    }

    #[test]
    fn digest_blobs_are_recognised() {
        let mut blob = vec![0x30, 0x81, 0x93, 0x06, 0x09];
        blob.extend_from_slice(SPC_INDIRECT_DATA_OID);
        assert_eq!(detect_digest_blob(&blob), Ok(()));
        assert_eq!(detect_digest_blob(&[]), Err(FormatError::Empty));
        assert_eq!(
            detect_digest_blob(&pe(0x80, 512)),
            Err(FormatError::NotDigestBlob)
        );
        assert_eq!(
            detect_digest_blob(&[0x30, 0x03, 0x02, 0x01, 0x01]),
            Err(FormatError::NotDigestBlob)
        );
    }

    #[test]
    fn pe_is_recognised() {
        assert_eq!(detect(&pe(0x80, 512)), Ok(Format::Pe));
        assert_eq!(detect(&pe(0x40, 0x44)), Ok(Format::Pe));
    }

    #[test]
    fn everything_else_is_refused_and_described() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "empty"),
            (b"MZ".to_vec(), "too short"),
            (pe(0x1000, 0x200), "beyond"),
            (pe(0xffff_fff0, 0x200), "beyond"),
            (
                {
                    let mut v = pe(0x80, 512);
                    v[0x80] = b'N';
                    v
                },
                "without a PE header",
            ),
            (b"\x7fELF\x02\x01\x01".to_vec(), "ELF"),
            (b"MSCF\0\0\0\0".to_vec(), "CAB"),
            (b"#!/bin/sh\necho hi\n".to_vec(), "text"),
            (vec![0xff, 0xfe, 0x00, 0x80], "unrecognised"),
        ];
        for (bytes, want) in cases {
            let err = detect(&bytes).expect_err(want);
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
    }
}
