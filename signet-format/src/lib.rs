//! `signet-format`: recognising a file's format from its content, never from its name.
//!
//! Signet signs what osslsigncode signs, told apart by their bytes:
//! - PE (EXE, DLL, SYS, ...): `MZ`, then `PE\0\0` where the DOS header points, with a
//!   PE32 or PE32+ optional header;
//! - MSI: an OLE compound file whose root storage has the class of a Windows Installer
//!   package or patch (a Word 97 document is a compound file too);
//! - CAB: `MSCF` with the cabinet format version 1.3;
//! - CAT: a DER PKCS#7 signed-data structure whose content is a Microsoft certificate
//!   trust list (OID 1.3.6.1.4.1.311.10.1), as `makecat` writes security catalogs;
//! - APPX/MSIX packages and bundles: a ZIP archive whose central directory names
//!   `AppxManifest.xml` (a package) or `AppxMetadata/AppxBundleManifest.xml` (a
//!   bundle), read from the end record back, never whole;
//! - PowerShell scripts: text (UTF-8, UTF-8 with BOM, UTF-16LE with BOM) *and* a
//!   PowerShell extension in the file's name. Text says nothing about its language, and
//!   osslsigncode picks the comment style of the signature block from the extension,
//!   so for scripts, and only for them, the name counts.
//!
//! Detection reads the first [`HEAD_LEN`] bytes and, for PE and compound files, the
//! headers wherever the file says they are, through [`Source`]. Then it checks that
//! the file's structure holds together ([`crate::structure`]): a file cut short or
//! damaged is [`FormatError::Damaged`]. It is pure: the caller brings the bytes (a
//! file, or a slice in tests).
//!
//! The formats themselves ([`Format`]) and the digest algorithms
//! ([`DigestAlgorithm`]) are words of the wire and live in `signet-api`; this crate
//! reads files. It depends on `signet-api` only.

use std::io;

pub use signet_api::wire::{DigestAlgorithm, Format};

pub mod structure;

/// How many leading bytes [`detect`] reads first.
pub const HEAD_LEN: usize = 4096;

/// The extensions of the PowerShell files osslsigncode signs, lower case, without dot.
pub const POWERSHELL_EXTENSIONS: [&str; 6] = ["ps1", "psm1", "psd1", "ps1xml", "psc1", "cdxml"];

/// What [`detect`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detected {
    pub format: Format,
    /// The extension (lower case, no dot) to give the file when it is handed to the
    /// signer: the format's own, or for PowerShell the one of the file's name.
    pub extension: &'static str,
}

/// Why the bytes are not something Signet signs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("the file is empty")]
    Empty,
    #[error(
        "the file is not a supported format ({seen}); Signet signs {}",
        supported()
    )]
    Unsupported { seen: String },
    #[error("digest mode expects the Authenticode data made by `osslsigncode extract-data`, and this is not it")]
    NotDigestBlob,
    #[error("the file is text, and Signet signs text only as a PowerShell script, which it knows by a name ending in .{} ({}); rename it if it is one", POWERSHELL_EXTENSIONS.join(", ."), name_note(.name))]
    TextNotScript { name: Option<String> },
    #[error("this {format} file is damaged or cut short: {damage}; nothing was signed. Copy or build it again")]
    Damaged {
        format: Format,
        damage: structure::Damage,
    },
    #[error("the file cannot be read: {0}")]
    Unreadable(String),
}

fn supported() -> String {
    "Windows PE files (EXE, DLL, SYS), MSI packages, CAB archives, security catalogs (CAT), PowerShell scripts and APPX/MSIX packages and bundles".to_owned()
}

fn name_note(name: &Option<String>) -> String {
    match name {
        Some(n) => format!("this one is named {n:?}"),
        None => "no file name came with it".to_owned(),
    }
}

/// Random access to the bytes being examined.
pub trait Source {
    /// Reads into `buf` from `offset`; fewer bytes than asked only at the end of the
    /// data (none past it).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;

    /// How many bytes there are.
    fn size(&self) -> io::Result<u64>;
}

impl Source for [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        let Some(rest) = self.get(start..) else {
            return Ok(0);
        };
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        Ok(n)
    }
}

impl Source for std::fs::File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match positioned_read(self, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

/// Reads at `offset` without using the file's cursor (unix: `pread`).
#[cfg(unix)]
fn positioned_read(file: &std::fs::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

/// Reads at `offset` (Windows: an overlapped read; it moves the file's cursor, which
/// no reader of a [`Source`] relies on).
#[cfg(windows)]
fn positioned_read(file: &std::fs::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(file, buf, offset)
}

/// Detects the format of the bytes in `src`. `filename` (a bare name) is consulted
/// only for text, to tell whether it is a PowerShell script.
pub fn detect<S: Source + ?Sized>(
    src: &S,
    filename: Option<&str>,
) -> Result<Detected, FormatError> {
    // One byte more than the head tells whether the head is the whole file.
    let mut head = read(src, 0, HEAD_LEN + 1)?;
    let whole = head.len() <= HEAD_LEN;
    head.truncate(HEAD_LEN);
    if head.is_empty() {
        return Err(FormatError::Empty);
    }
    let format = if head.starts_with(b"MZ") {
        pe(src, &head)?
    } else if head.starts_with(CFB_MAGIC) {
        compound_file(src, &head)?
    } else if head.starts_with(b"MSCF") {
        cab(&head)?
    } else if head.starts_with(ZIP_MAGIC) {
        return appx(src);
    } else if let Some(found) = pkcs7(&head) {
        found?
    } else if let Some(text) = text(&head, whole) {
        return script(text, filename);
    } else {
        return Err(unsupported(describe(&head)));
    };
    let len = src
        .size()
        .map_err(|e| FormatError::Unreadable(e.to_string()))?;
    structure::check(src, len, format).map_err(damaged_as(format))?;
    Ok(Detected {
        format,
        extension: extension(format),
    })
}

/// The extension a file of this format is given for the signer, which may rely on it.
/// PowerShell files keep their own (see [`Detected::extension`]).
fn extension(format: Format) -> &'static str {
    match format {
        Format::Pe => "exe",
        Format::Msi => "msi",
        Format::Cab => "cab",
        Format::Cat => "cat",
        Format::PowerShell => "ps1",
        Format::Appx => "appx",
    }
}

/// A ZIP archive's first local header.
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

fn damaged_as(format: Format) -> impl Fn(structure::CheckError) -> FormatError {
    move |e| match e {
        structure::CheckError::Damaged(damage) => FormatError::Damaged { format, damage },
        structure::CheckError::Io(e) => FormatError::Unreadable(e.to_string()),
    }
}

/// A ZIP archive: an APPX/MSIX package or bundle when its central directory names a
/// manifest. A ZIP whose directory cannot be read is taken for a damaged package.
fn appx<S: Source + ?Sized>(src: &S) -> Result<Detected, FormatError> {
    let len = src
        .size()
        .map_err(|e| FormatError::Unreadable(e.to_string()))?;
    let facts = structure::zip_facts(src, len).map_err(damaged_as(Format::Appx))?;
    if !facts.is_appx() {
        return Err(unsupported(format!(
            "a ZIP archive without {} or {}, so not an APPX/MSIX package or bundle (NuGet packages, JAR files and Office documents are ZIP archives too)",
            structure::APPX_MANIFEST,
            structure::BUNDLE_MANIFEST
        )));
    }
    structure::appx_parts(&facts).map_err(damaged_as(Format::Appx))?;
    Ok(Detected {
        format: Format::Appx,
        extension: if facts.bundle_manifest {
            "appxbundle"
        } else {
            "appx"
        },
    })
}

/// DER of the `SpcIndirectDataContent` OID (1.3.6.1.4.1.311.2.1.4), which every
/// Authenticode data blob from `osslsigncode extract-data` carries.
const SPC_INDIRECT_DATA_OID: &[u8] = b"\x06\x0a\x2b\x06\x01\x04\x01\x82\x37\x02\x01\x04";

/// DER of the Authenticode OIDs under 1.3.6.1.4.1.311.2.1, without the last arc.
const SPC_ARC: &[u8] = b"\x06\x0a\x2b\x06\x01\x04\x01\x82\x37\x02\x01";
/// Last arcs of the `SpcIndirectDataContent` data types.
const SPC_PE_IMAGE_DATA: u8 = 15;
const SPC_CAB_DATA: u8 = 25;
const SPC_SIPINFO: u8 = 30;
/// Subject interface packages named in `SpcSipInfo`, as stored (GUID, little-endian).
const SIP_MSI: [u8; 16] = *b"\xf1\x10\x0c\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46";
const SIP_POWERSHELL: [u8; 16] =
    *b"\x1f\xcc\x3b\x60\x59\x4b\x08\x4e\xb7\x24\xd2\xc6\x29\x7e\xf3\x51";
/// ... of APPX/MSIX packages and of bundles, as osslsigncode writes them.
const SIP_APPX: [u8; 16] = *b"\x4b\xdf\xc5\x0a\x07\xce\xe2\x4d\xb7\x6e\x23\xc8\x39\xa0\x9f\xd1";
const SIP_APPX_BUNDLE: [u8; 16] =
    *b"\xb3\x58\x5f\x0f\xde\xaa\x9a\x4b\xa4\x34\x95\x74\x2d\x92\xec\xeb";

/// Checks that `head` is an Authenticode data blob (digest mode's input): a DER
/// PKCS#7 structure carrying `SpcIndirectDataContent`. Answers the kind of file it
/// was extracted from when the blob says (`None`: a kind this does not know).
pub fn detect_digest_blob(head: &[u8]) -> Result<Option<Format>, FormatError> {
    if head.is_empty() {
        return Err(FormatError::Empty);
    }
    let at = head
        .windows(SPC_INDIRECT_DATA_OID.len())
        .position(|w| w == SPC_INDIRECT_DATA_OID);
    let (0x30, Some(at)) = (head[0], at) else {
        return Err(FormatError::NotDigestBlob);
    };
    // The data's type is the next Authenticode OID after SpcIndirectDataContent's.
    let rest = &head[at + SPC_INDIRECT_DATA_OID.len()..];
    let Some(t) = rest
        .windows(SPC_ARC.len() + 1)
        .position(|w| w.starts_with(SPC_ARC))
    else {
        return Ok(None);
    };
    let after = &rest[t + SPC_ARC.len() + 1..];
    Ok(match rest[t + SPC_ARC.len()] {
        SPC_PE_IMAGE_DATA => Some(Format::Pe),
        SPC_CAB_DATA => Some(Format::Cab),
        SPC_SIPINFO => {
            let sip = after.windows(16).take(32).find(|w| {
                [SIP_MSI, SIP_POWERSHELL, SIP_APPX, SIP_APPX_BUNDLE]
                    .iter()
                    .any(|s| w == s)
            });
            match sip {
                Some(w) if w == SIP_MSI => Some(Format::Msi),
                Some(w) if w == SIP_POWERSHELL => Some(Format::PowerShell),
                Some(_) => Some(Format::Appx),
                None => None,
            }
        }
        _ => None,
    })
}

/// How an Authenticode data blob was made: the file digest's algorithm and whether it
/// carries page hashes (PE only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobOptions {
    /// `None`: an algorithm Signet does not sign with (MD5, SHA-1).
    pub hash: Option<DigestAlgorithm>,
    pub page_hashes: bool,
}

/// The class of `SpcSerializedObject` that carries page hashes
/// (a6b586d5-b4a1-2466-ae05-a217da8e60d6), as stored.
const PAGE_HASHES_CLASS: [u8; 16] =
    *b"\xa6\xb5\x86\xd5\xb4\xa1\x24\x66\xae\x05\xa2\x17\xda\x8e\x60\xd6";

/// Reads the options of the Authenticode data blob in `src` (digest mode's input,
/// already known to be one by [`detect_digest_blob`]): the algorithm of the
/// `DigestInfo` that ends its `SpcIndirectDataContent`, and the page hashes' class
/// in its data. Reads only the DER headers on the way, wherever they are (page hashes
/// make a blob long).
pub fn digest_blob_options<S: Source + ?Sized>(src: &S) -> Result<BlobOptions, FormatError> {
    let head = read(src, 0, HEAD_LEN)?;
    // ContentInfo { OID, [0] { SignedData { INTEGER, SET, encapContentInfo { OID,
    // [0] { SpcIndirectDataContent { data, DigestInfo { AlgorithmIdentifier { OID }}}}}}}}
    let mut pos = 0u64;
    for (tag, enter) in [
        (0x30, true),
        (0x06, false),
        (0xa0, true),
        (0x30, true),
        (0x02, false),
        (0x31, false),
        (0x30, true),
        (0x06, false),
        (0xa0, true),
        (0x30, true),
        (0x30, false),
        (0x30, true),
        (0x30, true),
    ] {
        pos = der_step(src, pos, tag, enter)?;
    }
    let oid = read(src, pos, 11)?;
    let hash = match oid.get(..2) {
        Some([0x06, 9]) => match oid.get(2..11) {
            Some(b"\x60\x86\x48\x01\x65\x03\x04\x02\x01") => Some(DigestAlgorithm::Sha256),
            Some(b"\x60\x86\x48\x01\x65\x03\x04\x02\x02") => Some(DigestAlgorithm::Sha384),
            Some(b"\x60\x86\x48\x01\x65\x03\x04\x02\x03") => Some(DigestAlgorithm::Sha512),
            _ => None,
        },
        Some([0x06, _]) => None,
        _ => return Err(FormatError::NotDigestBlob),
    };
    let page_hashes = head.windows(16).any(|w| w == PAGE_HASHES_CLASS);
    Ok(BlobOptions { hash, page_hashes })
}

/// One DER step from the header at `pos`, which must have `tag`: into its content
/// (`enter`) or past it.
fn der_step<S: Source + ?Sized>(
    src: &S,
    pos: u64,
    tag: u8,
    enter: bool,
) -> Result<u64, FormatError> {
    let h = read(src, pos, 6)?;
    match der_header(&h, 0) {
        Some((t, content, Some(len))) if t == tag => {
            let content = pos + content as u64;
            Ok(if enter { content } else { content + len as u64 })
        }
        _ => Err(FormatError::NotDigestBlob),
    }
}

fn unsupported(seen: impl Into<String>) -> FormatError {
    FormatError::Unsupported { seen: seen.into() }
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn read<S: Source + ?Sized>(src: &S, offset: u64, len: usize) -> Result<Vec<u8>, FormatError> {
    let mut buf = vec![0u8; len];
    let n = src
        .read_at(offset, &mut buf)
        .map_err(|e| FormatError::Unreadable(e.to_string()))?;
    buf.truncate(n);
    Ok(buf)
}

/// `MZ` is there: the DOS header must point at a PE header with a PE32/PE32+
/// optional header.
fn pe<S: Source + ?Sized>(src: &S, head: &[u8]) -> Result<Format, FormatError> {
    let Some(lfanew) = le32(head, 0x3c) else {
        return Err(unsupported("an MZ header too short to be a PE file"));
    };
    // "PE\0\0", the 20-byte COFF header, then the optional header's magic.
    let hdr = read(src, u64::from(lfanew), 26)?;
    if hdr.len() < 4 {
        return Err(unsupported(
            "an MZ header whose PE header lies beyond the end of the file",
        ));
    }
    if &hdr[..4] != b"PE\0\0" {
        return Err(unsupported("an MZ (DOS) executable without a PE header"));
    }
    match le16(&hdr, 24) {
        Some(0x10b | 0x20b) => Ok(Format::Pe),
        Some(magic) => Err(unsupported(format!(
            "a PE file of an unknown kind (optional header magic 0x{magic:04x})"
        ))),
        // A PE cut off in its headers: the structure check says where.
        None => Ok(Format::Pe),
    }
}

const CFB_MAGIC: &[u8] = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1";
/// Root storage class of a Windows Installer package (and merge module):
/// {000C1084-0000-0000-C000-000000000046}, as stored (little-endian fields).
const CLSID_MSI_PACKAGE: [u8; 16] =
    *b"\x84\x10\x0c\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46";
/// ... of a Windows Installer patch: {000C1086-0000-0000-C000-000000000046}.
const CLSID_MSI_PATCH: [u8; 16] =
    *b"\x86\x10\x0c\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46";

/// An OLE compound file (MS-CFB): finds the root directory entry and checks its class.
fn compound_file<S: Source + ?Sized>(src: &S, head: &[u8]) -> Result<Format, FormatError> {
    let damaged = || unsupported("a damaged or truncated OLE compound file");
    let (Some(major), Some(order), Some(shift), Some(first_dir)) = (
        le16(head, 0x1a),
        le16(head, 0x1c),
        le16(head, 0x1e),
        le32(head, 0x30),
    ) else {
        return Err(damaged());
    };
    if order != 0xfffe || !matches!((major, shift), (3, 9) | (4, 12)) || first_dir >= 0xffff_fffa {
        return Err(damaged());
    }
    // Sector n starts at (n + 1) << shift: the header takes the place of sector -1.
    let entry = read(src, (u64::from(first_dir) + 1) << shift, 128)?;
    if entry.len() < 128 {
        // Cut before its directory: the compound file's own structure says where,
        // and an installer package is the compound file Signet signs.
        let len = src
            .size()
            .map_err(|e| FormatError::Unreadable(e.to_string()))?;
        if let Err(structure::CheckError::Damaged(damage)) = structure::check(src, len, Format::Msi)
        {
            return Err(FormatError::Damaged {
                format: Format::Msi,
                damage,
            });
        }
        return Err(damaged());
    }
    // Object type 5: the root storage.
    if entry[0x42] != 5 {
        return Err(damaged());
    }
    let clsid: [u8; 16] = entry[0x50..0x60].try_into().map_err(|_| damaged())?;
    if clsid == CLSID_MSI_PACKAGE || clsid == CLSID_MSI_PATCH {
        return Ok(Format::Msi);
    }
    Err(unsupported(format!(
        "an OLE compound file that is not a Windows Installer package or patch: its root storage class is {}; Office 97-2003 documents and installer transforms look like this",
        guid(&clsid)
    )))
}

fn guid(b: &[u8; 16]) -> String {
    format!(
        "{{{:08X}-{:04X}-{:04X}-{}-{}}}",
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        signet_api::hex::upper(&b[8..10]),
        signet_api::hex::upper(&b[10..16])
    )
}

/// `MSCF`: a cabinet header with reserved fields zero and format version 1.3.
fn cab(head: &[u8]) -> Result<Format, FormatError> {
    match (le32(head, 4), le32(head, 8), head.get(24..26)) {
        (Some(0), Some(size), Some([3, 1])) if size >= 36 => Ok(Format::Cab),
        (Some(0), Some(size), Some(&[minor, major])) if size >= 36 => Err(unsupported(format!(
            "a CAB archive of format version {major}.{minor}, not 1.3"
        ))),
        _ => Err(unsupported("a damaged or truncated CAB archive")),
    }
}

/// 1.2.840.113549.1.7.2, PKCS#7 signed data.
const OID_SIGNED_DATA: &[u8] = b"\x2a\x86\x48\x86\xf7\x0d\x01\x07\x02";
/// 1.3.6.1.4.1.311.10.1, Microsoft certificate trust list (szOID_CTL).
const OID_MS_CTL: &[u8] = b"\x2b\x06\x01\x04\x01\x82\x37\x0a\x01";

/// One DER/BER header at `pos`: tag, where the content starts, and its length
/// (`None`: indefinite). Only single-byte tags, as PKCS#7 uses.
fn der_header(b: &[u8], pos: usize) -> Option<(u8, usize, Option<usize>)> {
    let tag = *b.get(pos)?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let first = *b.get(pos + 1)?;
    if first < 0x80 {
        return Some((tag, pos + 2, Some(usize::from(first))));
    }
    if first == 0x80 {
        return Some((tag, pos + 2, None));
    }
    let n = usize::from(first & 0x7f);
    if n > 4 {
        return None;
    }
    let len = b
        .get(pos + 2..pos + 2 + n)?
        .iter()
        .fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
    Some((tag, pos + 2 + n, Some(len)))
}

/// A DER PKCS#7 signed-data structure: `None` when the head is not one at all, else
/// whether its content is a certificate trust list (a catalog).
fn pkcs7(head: &[u8]) -> Option<Result<Format, FormatError>> {
    // ContentInfo ::= SEQUENCE { contentType OID, content [0] EXPLICIT ANY }
    let (0x30, pos, _) = der_header(head, 0)? else {
        return None;
    };
    let (0x06, oid_at, Some(oid_len)) = der_header(head, pos)? else {
        return None;
    };
    if head.get(oid_at..oid_at + oid_len)? != OID_SIGNED_DATA {
        return None;
    }
    Some(signed_data_content(head, oid_at + oid_len))
}

fn signed_data_content(head: &[u8], pos: usize) -> Result<Format, FormatError> {
    let damaged = || unsupported("a damaged or truncated PKCS#7 signed-data file");
    let step = |pos: usize, want: u8, enter: bool| -> Result<usize, FormatError> {
        match der_header(head, pos) {
            Some((tag, content, _)) if tag == want && enter => Ok(content),
            Some((tag, content, Some(len))) if tag == want => Ok(content + len),
            _ => Err(damaged()),
        }
    };
    // [0] { SignedData ::= SEQUENCE { version INTEGER, digestAlgorithms SET,
    //       encapContentInfo SEQUENCE { eContentType OID, ... }, ... } }
    let pos = step(pos, 0xa0, true)?;
    let pos = step(pos, 0x30, true)?;
    let pos = step(pos, 0x02, false)?;
    let pos = step(pos, 0x31, false)?;
    let pos = step(pos, 0x30, true)?;
    let Some((0x06, at, Some(len))) = der_header(head, pos) else {
        return Err(damaged());
    };
    let oid = head.get(at..at + len).ok_or_else(damaged)?;
    if oid == OID_MS_CTL {
        return Ok(Format::Cat);
    }
    Err(unsupported(format!(
        "a PKCS#7 signed-data file whose content is {} rather than a certificate trust list (1.3.6.1.4.1.311.10.1), so not a security catalog",
        oid_text(oid)
    )))
}

fn oid_text(der: &[u8]) -> String {
    let Some((&first, rest)) = der.split_first() else {
        return "an empty OID".to_owned();
    };
    let mut parts = vec![(first / 40).min(2).to_string()];
    parts.push((u32::from(first) - 40 * u32::from((first / 40).min(2))).to_string());
    let mut acc: u64 = 0;
    for &b in rest {
        acc = (acc << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            parts.push(acc.to_string());
            acc = 0;
        }
    }
    parts.join(".")
}

/// Text encodings a PowerShell script may be in, as osslsigncode reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Text {
    Utf8,
    Utf16Le,
    Utf16Be,
}

fn is_text_char(c: char) -> bool {
    !c.is_control() || matches!(c, '\t' | '\n' | '\r' | '\x0c' | '\x1b')
}

/// Whether the head is text, and in which encoding. `whole`: the head is the whole
/// file, so a character cut off at its end is an error rather than the cut.
fn text(head: &[u8], whole: bool) -> Option<Text> {
    if let Some(body) = head.strip_prefix(b"\xff\xfe") {
        return utf16(body, whole, u16::from_le_bytes).then_some(Text::Utf16Le);
    }
    if let Some(body) = head.strip_prefix(b"\xfe\xff") {
        return utf16(body, whole, u16::from_be_bytes).then_some(Text::Utf16Be);
    }
    let body = head.strip_prefix(b"\xef\xbb\xbf").unwrap_or(head);
    let valid = match std::str::from_utf8(body) {
        Ok(s) => s,
        Err(e) if e.error_len().is_none() && !whole => {
            std::str::from_utf8(&body[..e.valid_up_to()]).ok()?
        }
        Err(_) => return None,
    };
    valid.chars().all(is_text_char).then_some(Text::Utf8)
}

fn utf16(body: &[u8], whole: bool, unit: fn([u8; 2]) -> u16) -> bool {
    let chunks = body.chunks_exact(2);
    if whole && !chunks.remainder().is_empty() {
        return false;
    }
    let units: Vec<u16> = chunks.map(|c| unit([c[0], c[1]])).collect();
    let n = units.len();
    char::decode_utf16(units).enumerate().all(|(i, c)| match c {
        Ok(c) => is_text_char(c),
        // A surrogate pair cut by the end of the head.
        Err(_) => !whole && i + 1 == n,
    })
}

fn script(text: Text, filename: Option<&str>) -> Result<Detected, FormatError> {
    if text == Text::Utf16Be {
        return Err(unsupported(
            "UTF-16 big-endian text, which osslsigncode cannot sign; save it as UTF-8 or UTF-16 little-endian",
        ));
    }
    let ext = filename
        .and_then(|n| std::path::Path::new(n).extension())
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match POWERSHELL_EXTENSIONS
        .iter()
        .find(|known| Some(**known) == ext.as_deref())
    {
        Some(extension) => Ok(Detected {
            format: Format::PowerShell,
            extension,
        }),
        None => Err(FormatError::TextNotScript {
            name: filename.map(str::to_owned),
        }),
    }
}

/// Names what the bytes look like, for the refusal message.
fn describe(head: &[u8]) -> &'static str {
    const KNOWN: &[(&[u8], &str)] = &[
        (b"PK\x05\x06", "an empty ZIP archive"),
        (b"\x7fELF", "a Linux ELF binary"),
        (b"\xcf\xfa\xed\xfe", "a macOS Mach-O binary"),
        (
            b"\xca\xfe\xba\xbe",
            "a macOS universal binary or Java class",
        ),
        (b"%PDF", "a PDF document"),
        (b"\x1f\x8b", "a gzip archive"),
        (b"-----BEGIN", "a PEM file"),
    ];
    KNOWN
        .iter()
        .find(|(magic, _)| head.starts_with(magic))
        .map_or("unrecognised binary data", |(_, name)| name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn detect_bytes(bytes: &[u8], name: Option<&str>) -> Result<Format, FormatError> {
        detect(bytes, name).map(|d| d.format)
    }

    /// A PE without sections: its headers, as long as the magic's kind has them
    /// (16 data directories), where `lfanew` says, in `len` bytes.
    fn pe(lfanew: u32, len: usize, magic: u16) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[..2].copy_from_slice(b"MZ");
        v[0x3c..0x40].copy_from_slice(&lfanew.to_le_bytes());
        let at = lfanew as usize;
        let (opt_size, directories): (u16, usize) = if magic == 0x20b {
            (240, 108)
        } else {
            (224, 92)
        };
        let mut put = |off: usize, bytes: &[u8]| {
            if let Some(dst) = v.get_mut(at + off..at + off + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        };
        put(0, b"PE\0\0");
        put(20, &opt_size.to_le_bytes());
        put(24, &magic.to_le_bytes());
        put(24 + directories, &16u32.to_le_bytes());
        v
    }

    /// A compound file: header, then the first directory sector holding the root
    /// entry with `clsid`, at sector `dir` (512-byte sectors, version 3).
    fn cfb(clsid: [u8; 16], dir: u32) -> Vec<u8> {
        let mut v = vec![0u8; 512 * (dir as usize + 2)];
        v[..8].copy_from_slice(CFB_MAGIC);
        v[0x18..0x1a].copy_from_slice(&0x3eu16.to_le_bytes());
        v[0x1a..0x1c].copy_from_slice(&3u16.to_le_bytes());
        v[0x1c..0x1e].copy_from_slice(&0xfffeu16.to_le_bytes());
        v[0x1e..0x20].copy_from_slice(&9u16.to_le_bytes());
        v[0x20..0x22].copy_from_slice(&6u16.to_le_bytes());
        v[0x30..0x34].copy_from_slice(&dir.to_le_bytes());
        let e = 512 * (dir as usize + 1);
        for (i, u) in "Root Entry".encode_utf16().enumerate() {
            v[e + 2 * i..e + 2 * i + 2].copy_from_slice(&u.to_le_bytes());
        }
        v[e + 0x40] = 22;
        v[e + 0x42] = 5;
        v[e + 0x50..e + 0x60].copy_from_slice(&clsid);
        v
    }

    fn cab_header(major: u8, minor: u8) -> Vec<u8> {
        let mut v = vec![0u8; 64];
        v[..4].copy_from_slice(b"MSCF");
        v[8..12].copy_from_slice(&64u32.to_le_bytes());
        v[24] = minor;
        v[25] = major;
        v
    }

    /// DER of `tag` around `content` (short or long length form).
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        match content.len() {
            n if n < 0x80 => v.push(n as u8),
            n if n < 0x100 => v.extend([0x81, n as u8]),
            n => v.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        v.extend_from_slice(content);
        v
    }

    /// A PKCS#7 signed-data ContentInfo with `content_type` and a dummy content.
    fn signed_data(content_type: &[u8], digest_algs: &[u8]) -> Vec<u8> {
        let encap = [
            tlv(0x06, content_type),
            tlv(0xa0, &tlv(0x30, &tlv(0x04, b"list"))),
        ]
        .concat();
        let sd = [
            tlv(0x02, &[1]),
            tlv(0x31, digest_algs),
            tlv(0x30, &encap),
            tlv(0x31, &[]),
        ]
        .concat();
        tlv(
            0x30,
            &[tlv(0x06, OID_SIGNED_DATA), tlv(0xa0, &tlv(0x30, &sd))].concat(),
        )
    }

    #[test]
    fn digest_blobs_say_which_kind_of_file_they_came_from() {
        // Heads of real `osslsigncode extract-data` outputs (up to the data's type).
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let indirect = "300906052b0e03021a0500060a2b060104018237020104";
        let pe = hex(&format!(
            "3081930609{indirect}a06b3069060a2b06010401823702010fa05b"
        ));
        assert_eq!(detect_digest_blob(&pe), Ok(Some(Format::Pe)));
        let cab = hex(&format!(
            "3081930609{indirect}a06b3069060a2b060104018237020119a05b"
        ));
        assert_eq!(detect_digest_blob(&cab), Ok(Some(Format::Cab)));
        let msi = hex(&format!(
            "3081930609{indirect}3064060a2b06010401823702011e3056020101 0410f1100c0000000000c000000000000046"
        ).replace(' ', ""));
        assert_eq!(detect_digest_blob(&msi), Ok(Some(Format::Msi)));
        let ps1 = hex(&format!(
            "3081930609{indirect}3064060a2b06010401823702011e30560201020410 1fcc3b60594b084eb724d2c6297ef351"
        ).replace(' ', ""));
        assert_eq!(detect_digest_blob(&ps1), Ok(Some(Format::PowerShell)));
        let other_sip = hex(&format!(
            "3081930609{indirect}3064060a2b06010401823702011e305602010204100000000000000000000000000000000000"
        ));
        assert_eq!(detect_digest_blob(&other_sip), Ok(None));
    }

    /// A digest blob as `osslsigncode extract-data` lays it out, with `alg` (the DER
    /// OID's content) and, for page hashes, the class and `pages` bytes of hashes.
    fn blob(alg: &[u8], pages: Option<usize>) -> Vec<u8> {
        let mut file = tlv(0x03, &[0]);
        if let Some(n) = pages {
            let moniker = [tlv(0x04, &PAGE_HASHES_CLASS), tlv(0x04, &vec![0x5a; n])].concat();
            file.extend(tlv(0xa0, &tlv(0xa1, &moniker)));
        }
        let data = tlv(
            0x30,
            &[
                tlv(0x06, b"\x2b\x06\x01\x04\x01\x82\x37\x02\x01\x0f"),
                tlv(0x30, &file),
            ]
            .concat(),
        );
        let digest = tlv(
            0x30,
            &[
                tlv(0x30, &[tlv(0x06, alg), vec![5, 0]].concat()),
                tlv(0x04, &[1; 32]),
            ]
            .concat(),
        );
        let indirect = tlv(0x30, &[data, digest].concat());
        let encap = tlv(
            0x30,
            &[tlv(0x06, &SPC_INDIRECT_DATA_OID[2..]), tlv(0xa0, &indirect)].concat(),
        );
        let sd = tlv(0x30, &[tlv(0x02, &[1]), tlv(0x31, &[]), encap].concat());
        tlv(0x30, &[tlv(0x06, OID_SIGNED_DATA), tlv(0xa0, &sd)].concat())
    }

    #[test]
    fn digest_blobs_say_how_they_were_made() {
        use DigestAlgorithm::*;
        let sha = |last: u8| [b"\x60\x86\x48\x01\x65\x03\x04\x02".as_slice(), &[last]].concat();
        for (alg, want) in [(1, Sha256), (2, Sha384), (3, Sha512)] {
            let b = blob(&sha(alg), None);
            assert_eq!(detect_digest_blob(&b), Ok(Some(Format::Pe)));
            assert_eq!(
                digest_blob_options(&b[..]),
                Ok(BlobOptions {
                    hash: Some(want),
                    page_hashes: false
                })
            );
        }
        // Page hashes make a blob longer than the head; its digest comes after them.
        let paged = blob(&sha(3), Some(40_000));
        assert!(paged.len() > HEAD_LEN * 9);
        assert_eq!(
            digest_blob_options(&paged[..]),
            Ok(BlobOptions {
                hash: Some(Sha512),
                page_hashes: true
            })
        );
        // SHA-1 is not one Signet signs with.
        let sha1 = blob(b"\x2b\x0e\x03\x02\x1a", None);
        assert_eq!(digest_blob_options(&sha1[..]).unwrap().hash, None);
        let cut = &paged[..paged.len() / 2];
        assert_eq!(digest_blob_options(cut), Err(FormatError::NotDigestBlob));
    }

    #[test]
    fn digest_blobs_are_recognised() {
        let mut blob = vec![0x30, 0x81, 0x93, 0x06, 0x09];
        blob.extend_from_slice(SPC_INDIRECT_DATA_OID);
        assert_eq!(
            detect_digest_blob(&blob),
            Ok(None),
            "no data type: unknown kind"
        );
        assert_eq!(detect_digest_blob(&[]), Err(FormatError::Empty));
        assert_eq!(
            detect_digest_blob(&pe(0x80, 512, 0x10b)),
            Err(FormatError::NotDigestBlob)
        );
        assert_eq!(
            detect_digest_blob(&[0x30, 0x03, 0x02, 0x01, 0x01]),
            Err(FormatError::NotDigestBlob)
        );
    }

    #[test]
    fn pe_is_recognised_wherever_its_header_is() {
        assert_eq!(detect_bytes(&pe(0x80, 512, 0x10b), None), Ok(Format::Pe));
        assert_eq!(detect_bytes(&pe(0x80, 512, 0x20b), None), Ok(Format::Pe));
        assert_eq!(detect_bytes(&pe(0x40, 0x200, 0x20b), None), Ok(Format::Pe));
        // The PE header may lie beyond the first read.
        assert_eq!(
            detect_bytes(&pe(0x2000, 0x2200, 0x20b), None),
            Ok(Format::Pe)
        );
        // The name never matters for binaries.
        let d = detect(&pe(0x80, 512, 0x10b)[..], Some("setup.ps1")).unwrap();
        assert_eq!((d.format, d.extension), (Format::Pe, "exe"));
    }

    #[test]
    fn msi_is_a_compound_file_with_the_installer_class() {
        for dir in [0, 3, 20] {
            let d = detect(&cfb(CLSID_MSI_PACKAGE, dir)[..], Some("x.doc")).unwrap();
            assert_eq!((d.format, d.extension), (Format::Msi, "msi"), "dir {dir}");
        }
        assert_eq!(
            detect_bytes(&cfb(CLSID_MSI_PATCH, 1), None),
            Ok(Format::Msi)
        );
        // Word 97: {00020906-0000-0000-C000-000000000046}
        let word = *b"\x06\x09\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00\x46";
        let err = detect_bytes(&cfb(word, 0), None).unwrap_err().to_string();
        assert!(
            err.contains("not a Windows Installer package")
                && err.contains("{00020906-0000-0000-C000-000000000046}"),
            "{err}"
        );
        let mut cut = cfb(CLSID_MSI_PACKAGE, 5);
        cut.truncate(512 * 6 + 64);
        let err = detect_bytes(&cut, None).unwrap_err().to_string();
        assert!(
            err.contains("MSI (Windows Installer package or patch) file is damaged or cut short: the directory (sector 5 of 512 bytes) ends at byte 3584, past the end of the file (3136 bytes)"),
            "{err}"
        );
        let mut not_root = cfb(CLSID_MSI_PACKAGE, 1);
        not_root[512 * 2 + 0x42] = 1;
        let err = detect_bytes(&not_root, None).unwrap_err().to_string();
        assert!(err.contains("damaged or truncated OLE"), "{err}");
        let mut v4 = cfb(CLSID_MSI_PACKAGE, 0);
        v4[0x1a] = 4; // version 4 wants 4096-byte sectors
        assert!(detect_bytes(&v4, None).is_err());
    }

    #[test]
    fn cab_needs_its_header_and_version() {
        assert_eq!(detect_bytes(&cab_header(1, 3), None), Ok(Format::Cab));
        let err = detect_bytes(&cab_header(2, 0), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("version 2.0"), "{err}");
        let err = detect_bytes(b"MSCF\0\0\0\0", None).unwrap_err().to_string();
        assert!(err.contains("damaged or truncated CAB"), "{err}");
    }

    #[test]
    fn cat_is_signed_data_around_a_trust_list() {
        let cat = signed_data(OID_MS_CTL, &[]);
        assert_eq!(detect_bytes(&cat, None), Ok(Format::Cat));
        // A signed catalog has digest algorithms, and a long one long lengths.
        let sha256 = tlv(
            0x30,
            &[
                tlv(0x06, b"\x60\x86\x48\x01\x65\x03\x04\x02\x01"),
                vec![5, 0],
            ]
            .concat(),
        );
        let mut big = signed_data(OID_MS_CTL, &sha256);
        assert_eq!(detect_bytes(&big, None), Ok(Format::Cat));
        big.extend(vec![0u8; 70_000]);
        assert_eq!(detect_bytes(&big, None), Ok(Format::Cat));

        // PKCS#7 data (1.2.840.113549.1.7.1) is not a catalog.
        let other = signed_data(b"\x2a\x86\x48\x86\xf7\x0d\x01\x07\x01", &[]);
        let err = detect_bytes(&other, None).unwrap_err().to_string();
        assert!(
            err.contains("1.2.840.113549.1.7.1") && err.contains("not a security catalog"),
            "{err}"
        );
        let err = detect_bytes(&cat[..cat.len() / 2], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("damaged or truncated PKCS#7"), "{err}");
        // DER that is not PKCS#7 at all: a certificate.
        let cert = tlv(0x30, &tlv(0x30, &tlv(0x02, &[1])));
        let err = detect_bytes(&cert, None).unwrap_err().to_string();
        assert!(err.contains("unrecognised binary data"), "{err}");
    }

    #[test]
    fn text_is_a_powershell_script_only_by_its_name() {
        let utf8 = "Write-Host \"hi\"\r\n# é ü\n".as_bytes().to_vec();
        let bom8 = [b"\xef\xbb\xbf".as_slice(), &utf8].concat();
        let mut bom16 = b"\xff\xfe".to_vec();
        for u in "Write-Host \"hi\" – ✓\r\n".encode_utf16() {
            bom16.extend(u.to_le_bytes());
        }
        for bytes in [&utf8, &bom8, &bom16] {
            for name in [
                "a.ps1", "A.PS1", "m.psm1", "d.psd1", "t.ps1xml", "c.psc1", "x.cdxml",
            ] {
                let d = detect(&bytes[..], Some(name)).unwrap();
                assert_eq!(d.format, Format::PowerShell, "{name}");
                assert_eq!(
                    d.extension,
                    name.rsplit('.').next().unwrap().to_ascii_lowercase()
                );
            }
            for name in [Some("notes.txt"), Some("ps1"), Some("a.ps1.txt"), None] {
                let err = detect_bytes(bytes, name).unwrap_err();
                assert!(matches!(err, FormatError::TextNotScript { .. }), "{err}");
                let msg = err.to_string();
                assert!(
                    msg.contains(".ps1, .psm1") && msg.contains("Signet signs"),
                    "{msg}"
                );
                match name {
                    Some(n) => assert!(msg.contains(&format!("{n:?}")), "{msg}"),
                    None => assert!(msg.contains("no file name"), "{msg}"),
                }
            }
        }
        let mut be = b"\xfe\xff".to_vec();
        for u in "Write-Host".encode_utf16() {
            be.extend(u.to_be_bytes());
        }
        let err = detect_bytes(&be, Some("a.ps1")).unwrap_err().to_string();
        assert!(err.contains("big-endian"), "{err}");
    }

    #[test]
    fn text_cut_by_the_head_is_still_text_but_a_cut_file_is_not() {
        // A long script whose 4096th byte falls inside a two-byte character.
        let mut long = vec![b'#'; HEAD_LEN - 1];
        long.extend("é\n".as_bytes());
        assert_eq!(detect_bytes(&long, Some("a.ps1")), Ok(Format::PowerShell));
        let cut = &long[..HEAD_LEN];
        assert!(detect_bytes(cut, Some("a.ps1")).is_err());
        let mut nul = b"Write-Host".to_vec();
        nul.push(0);
        let err = detect_bytes(&nul, Some("a.ps1")).unwrap_err().to_string();
        assert!(err.contains("unrecognised binary data"), "{err}");
    }

    #[test]
    fn everything_else_is_refused_and_described() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "empty"),
            (b"MZ".to_vec(), "too short"),
            (pe(0x1000, 0x200, 0x10b), "beyond"),
            (pe(0xffff_fff0, 0x200, 0x10b), "beyond"),
            (
                {
                    let mut v = pe(0x80, 512, 0x10b);
                    v[0x80] = b'N';
                    v
                },
                "without a PE header",
            ),
            (pe(0x80, 512, 0x107), "magic 0x0107"),
            (b"\x7fELF\x02\x01\x01".to_vec(), "ELF"),
            (b"PK\x05\x06".to_vec(), "empty ZIP"),
            (vec![0xff, 0xfe, 0x00, 0xd8], "unrecognised"),
            (vec![0x00, 0x01, 0x02], "unrecognised"),
        ];
        for (bytes, want) in cases {
            let err = detect_bytes(&bytes, Some("x.exe")).expect_err(want);
            assert!(err.to_string().contains(want), "{want}: {err}");
            if !bytes.is_empty() {
                assert!(err.to_string().contains("Signet signs Windows PE"), "{err}");
            }
        }
    }

    #[test]
    fn damaged_files_are_named_as_damaged_with_what_is_wrong() {
        // Cut in its COFF header, in its optional header: a PE all the same, damaged.
        for (bytes, want) in [
            (pe(0x80, 0x90, 0x10b), "the PE (COFF) header ends at byte 152, past the end of the file (144 bytes)"),
            (pe(0x80, 0x100, 0x20b), "the optional header (240 bytes) ends at byte 392, past the end of the file (256 bytes)"),
        ] {
            let err = detect_bytes(&bytes, Some("x.exe")).unwrap_err();
            assert!(
                matches!(err, FormatError::Damaged { format: Format::Pe, .. }),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.starts_with("this PE (EXE/DLL/SYS) file is damaged or cut short: ")
                    && msg.contains(want)
                    && msg.ends_with("Copy or build it again"),
                "{msg}"
            );
        }
        let mut cut = cab_header(1, 3);
        cut.truncate(40);
        let err = detect_bytes(&cut, None).unwrap_err();
        assert!(err.to_string().contains("cbCabinet"), "{err}");
    }

    /// A ZIP archive of stored `entries` as the packaging tools write one; `zip64`
    /// adds the ZIP64 record and locator and marks the end record's fields.
    fn zip(entries: &[(&str, &[u8])], zip64: bool) -> Vec<u8> {
        let mut v = Vec::new();
        let mut cd = Vec::new();
        for (name, data) in entries {
            let at = v.len() as u32;
            v.extend(b"PK\x03\x04");
            v.extend([20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            v.extend((data.len() as u32).to_le_bytes());
            v.extend((data.len() as u32).to_le_bytes());
            v.extend((name.len() as u16).to_le_bytes());
            v.extend([0, 0]);
            v.extend(name.as_bytes());
            v.extend(*data);
            cd.extend(b"PK\x01\x02");
            cd.extend([20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            cd.extend((data.len() as u32).to_le_bytes());
            cd.extend((data.len() as u32).to_le_bytes());
            cd.extend((name.len() as u16).to_le_bytes());
            cd.extend([0u8; 12]);
            cd.extend(at.to_le_bytes());
            cd.extend(name.as_bytes());
        }
        let (cd_at, cd_len, n) = (v.len() as u64, cd.len() as u64, entries.len() as u64);
        v.extend(cd);
        if zip64 {
            let rec_at = v.len() as u64;
            v.extend(b"PK\x06\x06");
            v.extend(44u64.to_le_bytes());
            v.extend([45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            for x in [n, n, cd_len, cd_at] {
                v.extend(x.to_le_bytes());
            }
            v.extend(b"PK\x06\x07");
            v.extend(0u32.to_le_bytes());
            v.extend(rec_at.to_le_bytes());
            v.extend(1u32.to_le_bytes());
        }
        v.extend(b"PK\x05\x06");
        v.extend([0, 0, 0, 0]);
        let (n16, size32, at32) = if zip64 {
            (0xffff, 0xffff_ffff, 0xffff_ffff)
        } else {
            (n as u16, cd_len as u32, cd_at as u32)
        };
        v.extend(n16.to_le_bytes());
        v.extend(n16.to_le_bytes());
        v.extend(size32.to_le_bytes());
        v.extend(at32.to_le_bytes());
        v.extend([0, 0]);
        v
    }

    const PAYLOAD: &[u8] = b"MZ payload of the package";

    fn package(manifest: &str) -> Vec<u8> {
        zip(
            &[
                ("app.exe", PAYLOAD),
                (manifest, b"<Package/>"),
                ("AppxBlockMap.xml", b"<BlockMap/>"),
                ("[Content_Types].xml", b"<Types></Types>"),
            ],
            false,
        )
    }

    fn damage(bytes: &[u8]) -> String {
        match detect(bytes, Some("x.appx")) {
            Err(FormatError::Damaged {
                format: Format::Appx,
                damage,
            }) => damage.0,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn appx_packages_and_bundles_are_zips_with_a_manifest() {
        let p = package("AppxManifest.xml");
        let d = detect(&p[..], Some("setup.exe")).unwrap();
        assert_eq!((d.format, d.extension), (Format::Appx, "appx"));
        let b = package("AppxMetadata/AppxBundleManifest.xml");
        let d = detect(&b[..], None).unwrap();
        assert_eq!((d.format, d.extension), (Format::Appx, "appxbundle"));
        let big = zip(
            &[
                ("AppxManifest.xml", b"<Package/>"),
                ("AppxBlockMap.xml", b"<BlockMap/>"),
                ("[Content_Types].xml", b"<Types></Types>"),
            ],
            true,
        );
        assert_eq!(detect_bytes(&big, None), Ok(Format::Appx), "ZIP64");
        // Many entries: the directory is read in pieces.
        let names: Vec<String> = (0..3000)
            .map(|i| format!("Assets/file{i:05}.png"))
            .collect();
        let mut entries: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), PAYLOAD)).collect();
        entries.extend([
            ("AppxManifest.xml", b"<Package/>".as_slice()),
            ("AppxBlockMap.xml", b"<BlockMap/>"),
            ("[Content_Types].xml", b"<Types></Types>"),
        ]);
        assert_eq!(detect_bytes(&zip(&entries, false), None), Ok(Format::Appx));
    }

    #[test]
    fn a_zip_without_a_manifest_is_not_an_appx() {
        let jar = zip(
            &[("META-INF/MANIFEST.MF", b"Manifest-Version: 1.0\n")],
            false,
        );
        let err = detect_bytes(&jar, Some("a.appx")).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FormatError::Unsupported { .. }), "{err:?}");
        assert!(
            msg.contains(
                "a ZIP archive without AppxManifest.xml or AppxMetadata/AppxBundleManifest.xml"
            ) && msg.contains("Signet signs")
                && msg.contains("APPX/MSIX"),
            "{msg}"
        );
        // A manifest in a folder is not the package's manifest.
        let nested = package("sub/AppxManifest.xml");
        assert!(matches!(
            detect_bytes(&nested, None),
            Err(FormatError::Unsupported { .. })
        ));
    }

    #[test]
    fn damaged_appx_packages_say_what_is_wrong() {
        let p = package("AppxManifest.xml");
        for cut in [p.len() - 1, p.len() - 30, p.len() / 2, 25] {
            let m = damage(&p[..cut]);
            assert!(
                m.contains("no end of central directory record"),
                "{cut}: {m}"
            );
        }
        let msg = detect(&p[..10], None).unwrap_err().to_string();
        assert!(
            msg.starts_with("this APPX/MSIX (package or bundle) file is damaged or cut short: the file is 10 bytes, shorter than a ZIP archive's end record"),
            "{msg}"
        );
        // A directory said to lie past where the end record starts.
        let mut far = p.clone();
        let n = far.len();
        far[n - 6..n - 2].copy_from_slice(&(n as u32).to_le_bytes());
        let m = damage(&far);
        assert!(
            m.contains("ends at byte") && m.contains("past where the end record starts"),
            "{m}"
        );
        // A comment after the end record.
        let mut commented = p.clone();
        let n = commented.len();
        commented[n - 2..].copy_from_slice(&5u16.to_le_bytes());
        commented.extend(b"hello");
        let m = damage(&commented);
        assert!(m.contains("ends in a 5-byte comment"), "{m}");
        // An entry whose local header is not where the directory says.
        let mut moved = p.clone();
        let cd = moved.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
        moved[cd + 42..cd + 46].copy_from_slice(&5u32.to_le_bytes());
        let m = damage(&moved);
        assert!(
            m.contains("puts \"app.exe\" at byte 5, where there is no local header"),
            "{m}"
        );
        // An entry whose data runs into the directory.
        let mut long = p.clone();
        let cd = long.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
        long[cd + 20..cd + 24].copy_from_slice(&100_000u32.to_le_bytes());
        let m = damage(&long);
        assert!(m.contains("the data of \"app.exe\" (100000 bytes"), "{m}");
        // More entries than the directory has room for.
        let mut many = p.clone();
        let n = many.len();
        many[n - 12..n - 10].copy_from_slice(&900u16.to_le_bytes());
        many[n - 14..n - 12].copy_from_slice(&900u16.to_le_bytes());
        let m = damage(&many);
        assert!(m.contains("counts 900 entries"), "{m}");
        // ZIP64 marks without the ZIP64 records.
        let mut marked = p.clone();
        let n = marked.len();
        marked[n - 6..n - 2].copy_from_slice(&u32::MAX.to_le_bytes());
        let m = damage(&marked);
        assert!(
            m.contains("the archive is ZIP64, and there is no ZIP64 locator at byte"),
            "{m}"
        );
        // The structure check reads the same.
        let len = p.len() as u64;
        assert!(structure::check(&p[..], len, Format::Appx).is_ok());
        assert!(structure::check(&marked[..], len, Format::Appx).is_err());
        // Parts signing needs.
        let no_map = zip(
            &[
                ("AppxManifest.xml", b"<Package/>"),
                ("[Content_Types].xml", b"<Types></Types>"),
            ],
            false,
        );
        let m = damage(&no_map);
        assert!(m.contains("the package has no AppxBlockMap.xml"), "{m}");
    }

    #[test]
    fn appx_digest_blobs_are_known() {
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let indirect = "300906052b0e03021a0500060a2b060104018237020104";
        let appx = hex(&format!(
            "3081930609{indirect}3038060a2b06010401823702011e302a0204010100000410{}",
            "4bdfc50a07cee24db76e23c839a09fd1"
        ));
        assert_eq!(detect_digest_blob(&appx), Ok(Some(Format::Appx)));
        let bundle = hex(&format!(
            "3081930609{indirect}3038060a2b06010401823702011e302a0204010100000410{}",
            "b3585f0fdeaa9a4ba43495742d92eceb"
        ));
        assert_eq!(detect_digest_blob(&bundle), Ok(Some(Format::Appx)));
    }

    #[test]
    fn format_names_round_trip() {
        for f in Format::ALL {
            assert_eq!(f.name().parse::<Format>(), Ok(f));
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.name()));
        }
        let err = "exe".parse::<Format>().unwrap_err();
        assert!(err.contains("pe, msi, cab, cat, powershell, appx"), "{err}");
    }

    #[test]
    fn files_are_read_through_the_same_source() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, cfb(CLSID_MSI_PACKAGE, 9)).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        assert_eq!(detect(&f, None).map(|d| d.format), Ok(Format::Msi));
    }
}
