//! Whether a file's own structure holds together: the headers of a PE, MSI, CAB or CAT
//! file point only inside the file. A file cut short (a copy that stopped, a download
//! that broke off) or damaged is bad input, never signed: osslsigncode signs much of
//! it anyway, and the signature then vouches for a file nobody built.
//!
//! The checks read only headers and tables through [`Source`], never the file's
//! content, so a multi-GiB file costs a few reads (an MSI's sector allocation table is
//! read sector by sector: 1/128 of the file at most). They are pure: the caller brings
//! the bytes and the file's length. [`crate::detect`] runs them once it knows
//! the format.
//!
//! What is checked:
//! - PE: the COFF and optional headers, the data directories the optional header
//!   declares, the section table, each section's raw data and the certificate table
//!   (a signature already there) lie within the file;
//! - MSI (an OLE compound file): the header's own fields (sector size, counts), the
//!   sectors it names (sector allocation table, its extension, directory, mini
//!   table), and every sector the allocation table marks as used lie within the file;
//! - CAB: the length the cabinet header declares (`cbCabinet`), its folder and file
//!   tables, and a signature appended after the cabinet lie within the file;
//! - CAT: the DER structure's outer length fits in the file;
//! - APPX/MSIX (a ZIP archive): the end of central directory record is where the
//!   packaging tools put it (the file's last 22 bytes, no comment; ZIP64's record and
//!   locator before it), the central directory lies within the file, every entry's
//!   local header is where the directory says and its data ends before the directory,
//!   and the package has the parts osslsigncode and Windows read
//!   (`[Content_Types].xml`, `AppxBlockMap.xml`, and `AppxManifest.xml` or
//!   `AppxMetadata/AppxBundleManifest.xml`). The directory is read in bounded pieces.
//!
//! Bytes after the end a header declares are not a fault (a PE overlay, an installer's
//! payload); only what a header points to and the file lacks is.

use std::io;

use crate::{Format, Source};

/// What is wrong with a file's structure, in words that name the part and the byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Damage(pub String);

/// Why a file could not be checked: damage, or the bytes could not be read.
#[derive(Debug)]
pub enum CheckError {
    Damaged(Damage),
    Io(io::Error),
}

impl From<io::Error> for CheckError {
    fn from(e: io::Error) -> Self {
        CheckError::Io(e)
    }
}

fn damaged<T>(msg: String) -> Result<T, CheckError> {
    Err(CheckError::Damaged(Damage(msg)))
}

/// Checks the structure of a file of `format`, `len` bytes long, read through `src`.
/// PowerShell scripts are text and have no structure to check.
pub fn check<S: Source + ?Sized>(src: &S, len: u64, format: Format) -> Result<(), CheckError> {
    match format {
        Format::Pe => pe(src, len),
        Format::Msi => compound_file(src, len),
        Format::Cab => cab(src, len),
        Format::Cat => der(src, len),
        Format::PowerShell => Ok(()),
        Format::Appx => appx(src, len).map(|_| ()),
    }
}

/// Reads exactly `n` bytes at `offset`, or says which part ends past the file's end.
fn need<S: Source + ?Sized>(
    src: &S,
    len: u64,
    offset: u64,
    n: usize,
    what: &str,
) -> Result<Vec<u8>, CheckError> {
    let end = offset.saturating_add(n as u64);
    if end > len {
        return damaged(past_end(what, end, len));
    }
    let mut buf = vec![0u8; n];
    let got = src.read_at(offset, &mut buf)?;
    if got < n {
        // The file is shorter than its length said: it changed while being read.
        return damaged(past_end(what, end, offset + got as u64));
    }
    Ok(buf)
}

fn past_end(what: &str, end: u64, len: u64) -> String {
    format!("{what} ends at byte {end}, past the end of the file ({len} bytes)")
}

fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_le_bytes)
}

fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// PE32 and PE32+ optional header magics, and the size of each optional header up to
/// its data directories.
const PE32: u16 = 0x10b;
const PE32_PLUS: u16 = 0x20b;
/// The data directory of the certificate table (the Authenticode signature).
const CERTIFICATE_TABLE: usize = 4;

fn pe<S: Source + ?Sized>(src: &S, len: u64) -> Result<(), CheckError> {
    let dos = need(src, len, 0, 0x40, "the DOS header")?;
    let pe_at = u64::from(le32(&dos, 0x3c));
    // "PE\0\0" and the 20-byte COFF header.
    let coff = need(src, len, pe_at, 24, "the PE (COFF) header")?;
    let sections = le16(&coff, 6);
    let opt_size = le16(&coff, 20);
    let opt_at = pe_at + 24;
    let opt = need(
        src,
        len,
        opt_at,
        usize::from(opt_size),
        &format!("the optional header ({opt_size} bytes)"),
    )?;
    let (kind, directories_at) = match le16(&opt, 0) {
        PE32 => ("PE32", 96),
        PE32_PLUS => ("PE32+", 112),
        magic => return damaged(format!("the optional header's magic is 0x{magic:04x}, neither PE32 (0x010b) nor PE32+ (0x020b)")),
    };
    if opt.len() < directories_at {
        return damaged(format!(
            "the optional header is {opt_size} bytes, too short for a {kind} header ({directories_at} bytes before its data directories)"
        ));
    }
    let directories = le32(&opt, directories_at - 4) as usize;
    let room = (opt.len() - directories_at) / 8;
    if directories > room {
        return damaged(format!(
            "the optional header declares {directories} data directories but has room for {room}"
        ));
    }
    let table_at = opt_at + u64::from(opt_size);
    let table = need(
        src,
        len,
        table_at,
        40 * usize::from(sections),
        &format!("the section table ({sections} sections)"),
    )?;
    for entry in table.chunks_exact(40) {
        let raw_size = u64::from(le32(entry, 16));
        let raw_at = u64::from(le32(entry, 20));
        let end = raw_at + raw_size;
        if raw_size > 0 && end > len {
            return damaged(past_end(
                &format!("section {}'s data", section_name(&entry[..8])),
                end,
                len,
            ));
        }
    }
    if directories > CERTIFICATE_TABLE {
        let at = directories_at + 8 * CERTIFICATE_TABLE;
        // The certificate table's "address" is a file offset, not an RVA.
        let offset = u64::from(le32(&opt, at));
        let size = u64::from(le32(&opt, at + 4));
        if (offset != 0 || size != 0) && offset + size > len {
            return damaged(past_end(
                "the certificate table (the signature the file has)",
                offset + size,
                len,
            ));
        }
    }
    Ok(())
}

/// A section's name as people know it (`.text`); an unprintable one in hex.
fn section_name(raw: &[u8]) -> String {
    let name = raw.split(|&b| b == 0).next().unwrap_or_default();
    if !name.is_empty() && name.iter().all(|b| b.is_ascii_graphic()) {
        String::from_utf8_lossy(name).into_owned()
    } else {
        format!(
            "0x{}",
            raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    }
}

/// Sector numbers at and above this are markers (free, end of chain, ...).
const MAX_REGULAR_SECTOR: u32 = 0xffff_fffa;
const FREE_SECTOR: u32 = 0xffff_ffff;
/// FAT sector numbers kept in the header itself.
const HEADER_DIFAT: usize = 109;

/// An OLE compound file (MS-CFB), as MSI packages are.
fn compound_file<S: Source + ?Sized>(src: &S, len: u64) -> Result<(), CheckError> {
    let header = need(src, len, 0, 512, "the compound file header")?;
    let shift = le16(&header, 0x1e);
    if !matches!((le16(&header, 0x1a), shift), (3, 9) | (4, 12)) {
        return damaged(format!(
            "the compound file header names version {} with {}-byte sectors; version 3 has 512-byte sectors and version 4 4096-byte ones",
            le16(&header, 0x1a),
            1u64.checked_shl(u32::from(shift)).unwrap_or(0)
        ));
    }
    let size = 1u64 << shift;
    if len < size {
        return damaged(past_end("the compound file header's sector", size, len));
    }
    // The header takes the place of sector -1; sector n starts at (n + 1) * size.
    let sectors = (len - size) / size;
    let fat_sectors = le32(&header, 0x2c);
    let first_dir = le32(&header, 0x30);
    let first_mini = le32(&header, 0x3c);
    let first_difat = le32(&header, 0x44);
    let difat_sectors = le32(&header, 0x48);
    let per_sector = (size / 4) as usize;
    let listed = HEADER_DIFAT as u64 + u64::from(difat_sectors) * (per_sector as u64 - 1);
    if u64::from(fat_sectors) > listed {
        return damaged(format!(
            "the compound file header declares {fat_sectors} allocation table sectors but lists room for {listed}"
        ));
    }
    if u64::from(difat_sectors) > sectors || u64::from(fat_sectors) > sectors {
        return damaged(format!(
            "the compound file header declares {fat_sectors} allocation table sectors and {difat_sectors} extension sectors, and the file holds only {sectors} sectors of {size} bytes"
        ));
    }
    let in_file = |what: &str, sector: u32| -> Result<(), CheckError> {
        let end = (u64::from(sector) + 2) * size;
        if end > len {
            return damaged(past_end(
                &format!("{what} (sector {sector} of {size} bytes)"),
                end,
                len,
            ));
        }
        Ok(())
    };
    in_file("the directory", first_dir)?;
    for (what, sector) in [
        ("the mini allocation table", first_mini),
        ("the allocation table's extension", first_difat),
    ] {
        if sector < MAX_REGULAR_SECTOR {
            in_file(what, sector)?;
        }
    }

    // Where the allocation table's sectors are: in the header, then in a chain of
    // extension sectors.
    let mut fat: Vec<u32> = (0..HEADER_DIFAT)
        .map(|i| le32(&header, 0x4c + 4 * i))
        .collect();
    let mut next = first_difat;
    for _ in 0..difat_sectors {
        if next >= MAX_REGULAR_SECTOR || fat.len() >= fat_sectors as usize {
            break;
        }
        in_file("the allocation table's extension", next)?;
        let s = need(
            src,
            len,
            (u64::from(next) + 1) * size,
            size as usize,
            "an extension sector",
        )?;
        fat.extend((0..per_sector - 1).map(|i| le32(&s, 4 * i)));
        next = le32(&s, 4 * (per_sector - 1));
    }
    fat.truncate(fat_sectors as usize);
    if fat.len() < fat_sectors as usize {
        return damaged(format!(
            "the compound file header declares {fat_sectors} allocation table sectors and names only {}",
            fat.len()
        ));
    }

    // Every sector the table marks as used, and every sector a chain goes on to, must
    // be in the file.
    let mut first_beyond = None;
    let mut bad_link = None;
    for (n, &at) in fat.iter().enumerate() {
        if at >= MAX_REGULAR_SECTOR {
            return damaged(format!(
                "allocation table sector {n} is marked 0x{at:08x}, not a sector number"
            ));
        }
        in_file("the allocation table", at)?;
        let s = need(
            src,
            len,
            (u64::from(at) + 1) * size,
            size as usize,
            "the allocation table",
        )?;
        for i in 0..per_sector {
            let entry = le32(&s, 4 * i);
            let sector = (n * per_sector + i) as u64;
            if entry == FREE_SECTOR {
                continue;
            }
            if sector >= sectors {
                first_beyond.get_or_insert(sector);
            } else if entry < MAX_REGULAR_SECTOR && u64::from(entry) >= sectors {
                bad_link.get_or_insert((sector, entry));
            }
        }
    }
    if let Some(sector) = first_beyond {
        return damaged(format!(
            "the compound file uses sector {sector}, which ends at byte {}, past the end of the file ({len} bytes): it holds {sectors} sectors of {size} bytes",
            (sector + 2) * size
        ));
    }
    if let Some((sector, entry)) = bad_link {
        return damaged(format!(
            "the compound file's sector {sector} continues in sector {entry}, which ends at byte {}, past the end of the file ({len} bytes)",
            (u64::from(entry) + 2) * size
        ));
    }
    Ok(())
}

/// The cabinet header's flag: a reserved area follows the header.
const CAB_RESERVE_PRESENT: u16 = 0x0004;
/// The first four bytes of a cabinet's reserved area when it holds a signature.
const CAB_SIGNATURE_MARK: [u8; 4] = [0x00, 0x00, 0x10, 0x00];

/// A cabinet: `cbCabinet`, the folder and file tables, an appended signature.
fn cab<S: Source + ?Sized>(src: &S, len: u64) -> Result<(), CheckError> {
    let header = need(src, len, 0, 36, "the cabinet header")?;
    let declared = u64::from(le32(&header, 8));
    if declared > len {
        return damaged(format!(
            "the cabinet header says the cabinet is {declared} bytes (cbCabinet), and the file has only {len}"
        ));
    }
    let files_at = u64::from(le32(&header, 16));
    if files_at > declared {
        return damaged(format!(
            "the cabinet's file table starts at byte {files_at}, past the cabinet's end ({declared} bytes)"
        ));
    }
    let folders = u64::from(le16(&header, 26));
    let flags = le16(&header, 30);
    let mut folders_at = 36;
    let mut folder_reserve = 0;
    if flags & CAB_RESERVE_PRESENT != 0 {
        let r = need(src, len, 36, 4, "the cabinet header's reserve sizes")?;
        let header_reserve = u64::from(le16(&r, 0));
        folder_reserve = u64::from(r[2]);
        let reserve = need(
            src,
            len,
            40,
            header_reserve as usize,
            "the cabinet header's reserved area",
        )?;
        folders_at = 40 + header_reserve;
        if reserve.len() >= 12 && reserve[..4] == CAB_SIGNATURE_MARK {
            let at = u64::from(le32(&reserve, 4));
            let size = u64::from(le32(&reserve, 8));
            if at + size > len {
                return damaged(past_end("the signature the cabinet has", at + size, len));
            }
        }
    }
    let entry = 8 + folder_reserve;
    let table = need(
        src,
        len,
        folders_at,
        (folders * entry) as usize,
        &format!("the cabinet's folder table ({folders} folders)"),
    )?;
    for (i, f) in table.chunks_exact(entry as usize).enumerate() {
        let data_at = u64::from(le32(f, 0));
        if data_at > declared {
            return damaged(format!(
                "the cabinet's folder {i} starts at byte {data_at}, past the cabinet's end ({declared} bytes)"
            ));
        }
    }
    Ok(())
}

/// A DER structure (a catalog): its outer length fits in the file.
fn der<S: Source + ?Sized>(src: &S, len: u64) -> Result<(), CheckError> {
    let head = need(src, len, 0, 2, "the DER header")?;
    let first = head[1];
    let (content_at, content_len) = if first < 0x80 {
        (2, u64::from(first))
    } else if first == 0x80 {
        // Indefinite length (BER): the end is a marker, not a declared length.
        return Ok(());
    } else {
        let n = usize::from(first & 0x7f);
        if n > 8 {
            return damaged(format!(
                "the DER header's length takes {n} bytes, more than any file has"
            ));
        }
        let bytes = need(src, len, 2, n, "the DER header")?;
        let value = bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        (2 + n as u64, value)
    };
    let end = content_at.saturating_add(content_len);
    if end > len {
        return damaged(format!(
            "the catalog's DER structure declares {end} bytes, and the file has only {len}"
        ));
    }
    Ok(())
}

/// What an APPX/MSIX package must hold, and says what it is.
const CONTENT_TYPES: &str = "[Content_Types].xml";
const BLOCK_MAP: &str = "AppxBlockMap.xml";
/// A package's manifest.
pub const APPX_MANIFEST: &str = "AppxManifest.xml";
/// A bundle's manifest.
pub const BUNDLE_MANIFEST: &str = "AppxMetadata/AppxBundleManifest.xml";

/// The end of central directory record, its ZIP64 locator and ZIP64 record.
const EOCD: &[u8; 4] = b"PK\x05\x06";
const EOCD_LEN: u64 = 22;
const ZIP64_LOCATOR: &[u8; 4] = b"PK\x06\x07";
const ZIP64_LOCATOR_LEN: u64 = 20;
const ZIP64_EOCD: &[u8; 4] = b"PK\x06\x06";
const CENTRAL_ENTRY: &[u8; 4] = b"PK\x01\x02";
const LOCAL_HEADER: &[u8; 4] = b"PK\x03\x04";
/// How much of the central directory is read at once.
const DIRECTORY_PIECE: usize = 64 * 1024;
/// The fix for a package that is not whole.
const REMAKE: &str = "make the package again (MakeAppx pack, or the build that made it)";

/// What the central directory of a ZIP archive names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZipFacts {
    /// How many entries the directory holds.
    pub entries: u64,
    /// It has `AppxManifest.xml` (a package).
    pub manifest: bool,
    /// It has `AppxMetadata/AppxBundleManifest.xml` (a bundle).
    pub bundle_manifest: bool,
    pub block_map: bool,
    pub content_types: bool,
}

impl ZipFacts {
    /// An APPX/MSIX package or bundle, by the manifest it holds.
    pub fn is_appx(&self) -> bool {
        self.manifest || self.bundle_manifest
    }
}

fn u64le(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// Reads a ZIP archive's central directory, `len` bytes long, through `src`: where
/// it is, that it and every entry's local header and data lie within the file, and
/// the names that matter to APPX. Reads the directory in [`DIRECTORY_PIECE`] pieces
/// and one local header per entry; no length is trusted before it is checked.
pub fn zip_facts<S: Source + ?Sized>(src: &S, len: u64) -> Result<ZipFacts, CheckError> {
    if len < EOCD_LEN {
        return damaged(format!(
            "the file is {len} bytes, shorter than a ZIP archive's end record (22 bytes): it was cut short"
        ));
    }
    let end = need(
        src,
        len,
        len - EOCD_LEN,
        EOCD_LEN as usize,
        "the ZIP end record",
    )?;
    if &end[..4] != EOCD {
        return damaged(no_end_record(src, len)?);
    }
    let mut count = u64::from(le16(&end, 10));
    let mut cd_size = u64::from(le32(&end, 12));
    let mut cd_at = u64::from(le32(&end, 16));
    let mut cd_end_limit = len - EOCD_LEN;
    if count == 0xffff || cd_size == 0xffff_ffff || cd_at == 0xffff_ffff {
        // ZIP64: a locator just before the end record points at the ZIP64 record.
        if len < EOCD_LEN + ZIP64_LOCATOR_LEN {
            return damaged(format!(
                "the ZIP end record says the archive is ZIP64, and the file ({len} bytes) has no room for the ZIP64 locator before it"
            ));
        }
        let loc_at = len - EOCD_LEN - ZIP64_LOCATOR_LEN;
        let loc = need(
            src,
            len,
            loc_at,
            ZIP64_LOCATOR_LEN as usize,
            "the ZIP64 locator",
        )?;
        if &loc[..4] != ZIP64_LOCATOR {
            return damaged(format!(
                "the ZIP end record says the archive is ZIP64, and there is no ZIP64 locator at byte {loc_at}"
            ));
        }
        let rec_at = u64le(&loc, 8);
        let rec = need(src, len, rec_at, 56, "the ZIP64 end record")?;
        if &rec[..4] != ZIP64_EOCD || rec_at + 56 > loc_at {
            return damaged(format!(
                "the ZIP64 locator points at byte {rec_at}, where there is no ZIP64 end record"
            ));
        }
        if u64le(&rec, 24) != u64le(&rec, 32) || le32(&rec, 16) != le32(&rec, 20) {
            return damaged("the ZIP64 end record describes an archive split over several disks, which APPX packages never are".to_owned());
        }
        count = u64le(&rec, 32);
        cd_size = u64le(&rec, 40);
        cd_at = u64le(&rec, 48);
        cd_end_limit = rec_at;
    } else if le16(&end, 4) != 0 || le16(&end, 6) != 0 || le16(&end, 8) != le16(&end, 10) {
        return damaged("the ZIP end record describes an archive split over several disks, which APPX packages never are".to_owned());
    }
    let cd_end = cd_at.saturating_add(cd_size);
    if cd_end > cd_end_limit {
        return damaged(format!(
            "the ZIP central directory ({cd_size} bytes from byte {cd_at}) ends at byte {cd_end}, past where the end record starts (byte {cd_end_limit}): the file was cut short or its start is missing"
        ));
    }
    // Each entry takes at least 46 bytes: a count the directory cannot hold is a lie.
    if count.saturating_mul(46) > cd_size {
        return damaged(format!(
            "the ZIP end record counts {count} entries, and its central directory of {cd_size} bytes has room for {} at most",
            cd_size / 46
        ));
    }

    let mut facts = ZipFacts {
        entries: count,
        ..ZipFacts::default()
    };
    let mut piece: Vec<u8> = Vec::new();
    let mut piece_at = cd_at;
    let mut at = cd_at;
    for n in 0..count {
        // The fixed part of the entry, then its variable part, from the piece in hand.
        let fixed = directory_bytes(src, len, &mut piece, &mut piece_at, at, 46, cd_end, n)?;
        if &fixed[..4] != CENTRAL_ENTRY {
            return damaged(format!(
                "the ZIP central directory's entry {n} at byte {at} does not start with its signature"
            ));
        }
        let method = le16(&fixed, 10);
        let mut csize = u64::from(le32(&fixed, 20));
        let name_len = usize::from(le16(&fixed, 28));
        let extra_len = usize::from(le16(&fixed, 30));
        let comment_len = usize::from(le16(&fixed, 32));
        let mut local_at = u64::from(le32(&fixed, 42));
        let usize_ = u64::from(le32(&fixed, 24));
        let var = directory_bytes(
            src,
            len,
            &mut piece,
            &mut piece_at,
            at + 46,
            name_len + extra_len,
            cd_end,
            n,
        )?;
        let name = String::from_utf8_lossy(&var[..name_len]).into_owned();
        // ZIP64 sizes and offset, in the order the standard gives, for the fields
        // that are 0xffffffff.
        let mut extra = &var[name_len..];
        while extra.len() >= 4 {
            let id = le16(extra, 0);
            let size = usize::from(le16(extra, 2));
            let body = extra.get(4..4 + size).unwrap_or(&[]);
            if id == 1 {
                let mut pos = 0;
                let mut take = |field: &mut u64| {
                    if *field == 0xffff_ffff {
                        *field = u64le(body, pos);
                        pos += 8;
                    }
                };
                let mut uncompressed = usize_;
                take(&mut uncompressed);
                take(&mut csize);
                take(&mut local_at);
            }
            extra = extra.get(4 + size..).unwrap_or(&[]);
        }
        let local = need(
            src,
            len,
            local_at,
            30,
            &format!("the local header of {name:?}"),
        )?;
        if &local[..4] != LOCAL_HEADER {
            return damaged(format!(
                "the ZIP central directory puts {name:?} at byte {local_at}, where there is no local header"
            ));
        }
        let data_at = local_at + 30 + u64::from(le16(&local, 26)) + u64::from(le16(&local, 28));
        let data_end = data_at.saturating_add(csize);
        if data_end > cd_at {
            return damaged(format!(
                "the data of {name:?} ({csize} bytes from byte {data_at}) ends at byte {data_end}, past the start of the central directory (byte {cd_at})"
            ));
        }
        if !matches!(method, 0 | 8) {
            return damaged(format!(
                "{name:?} is compressed with ZIP method {method}; APPX packages use only stored (0) and deflated (8) entries"
            ));
        }
        match name.as_str() {
            APPX_MANIFEST => facts.manifest = true,
            BUNDLE_MANIFEST => facts.bundle_manifest = true,
            BLOCK_MAP => facts.block_map = true,
            CONTENT_TYPES => facts.content_types = true,
            _ => {}
        }
        at += 46 + (name_len + extra_len + comment_len) as u64;
    }
    Ok(facts)
}

/// `n` bytes of the central directory at `at` (entry `entry`), from the piece in hand
/// or a new piece read there; refuses bytes past the directory's end.
#[allow(clippy::too_many_arguments)]
fn directory_bytes<S: Source + ?Sized>(
    src: &S,
    len: u64,
    piece: &mut Vec<u8>,
    piece_at: &mut u64,
    at: u64,
    n: usize,
    cd_end: u64,
    entry: u64,
) -> Result<Vec<u8>, CheckError> {
    if at.saturating_add(n as u64) > cd_end {
        return damaged(format!(
            "the ZIP central directory's entry {entry} runs past the directory's end (byte {cd_end})"
        ));
    }
    let start = at.checked_sub(*piece_at).map(|s| s as usize);
    if let Some(s) = start {
        if let Some(bytes) = piece.get(s..s + n) {
            return Ok(bytes.to_vec());
        }
    }
    let want = (cd_end - at).min(DIRECTORY_PIECE.max(n) as u64) as usize;
    *piece = need(src, len, at, want, "the ZIP central directory")?;
    *piece_at = at;
    Ok(piece[..n].to_vec())
}

/// Why the last 22 bytes are not the end record: a comment after it (which APPX
/// packages never have, and osslsigncode cannot read), or no end record at all.
fn no_end_record<S: Source + ?Sized>(src: &S, len: u64) -> Result<String, CheckError> {
    // A comment is at most 65535 bytes: the record can only be that far back.
    let back = len.min(EOCD_LEN + 0xffff);
    let tail = need(src, len, len - back, back as usize, "the ZIP end record")?;
    let found = (0..tail.len().saturating_sub(EOCD_LEN as usize - 1))
        .rev()
        .find(|&i| {
            &tail[i..i + 4] == EOCD && i + 22 + usize::from(le16(&tail, i + 20)) == tail.len()
        });
    Ok(match found {
        Some(i) => format!(
            "the ZIP archive ends in a {}-byte comment after its end record, which APPX packages never have and osslsigncode cannot read: {REMAKE} without the comment",
            le16(&tail, i + 20)
        ),
        None => "the ZIP archive has no end of central directory record in its last bytes: it was cut short".to_owned(),
    })
}

/// An APPX/MSIX package or bundle: a whole ZIP archive with the parts signing reads.
fn appx<S: Source + ?Sized>(src: &S, len: u64) -> Result<ZipFacts, CheckError> {
    let facts = zip_facts(src, len)?;
    appx_parts(&facts)?;
    Ok(facts)
}

/// The parts every APPX/MSIX package or bundle has and signing reads.
pub fn appx_parts(facts: &ZipFacts) -> Result<(), CheckError> {
    let kind = if facts.bundle_manifest {
        "bundle"
    } else {
        "package"
    };
    for (has, part) in [
        (
            facts.is_appx(),
            "AppxManifest.xml (or, in a bundle, AppxMetadata/AppxBundleManifest.xml)",
        ),
        (facts.block_map, BLOCK_MAP),
        (facts.content_types, CONTENT_TYPES),
    ] {
        if !has {
            return damaged(format!(
                "the {kind} has no {part}, which every APPX/MSIX {kind} has and signing reads; {REMAKE}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const END_OF_CHAIN: u32 = 0xffff_fffe;

    fn msg(r: Result<(), CheckError>) -> String {
        match r {
            Err(CheckError::Damaged(d)) => d.0,
            Err(CheckError::Io(e)) => panic!("io: {e}"),
            Ok(()) => panic!("accepted"),
        }
    }

    fn checks(bytes: &[u8], format: Format) -> Result<(), CheckError> {
        check(bytes, bytes.len() as u64, format)
    }

    fn put16(v: &mut [u8], at: usize, x: u16) {
        v[at..at + 2].copy_from_slice(&x.to_le_bytes());
    }

    fn put32(v: &mut [u8], at: usize, x: u32) {
        v[at..at + 4].copy_from_slice(&x.to_le_bytes());
    }

    /// A PE32+ image as a linker lays it out: headers in the first 0x400 bytes, then
    /// `.text` (0x400 bytes) and `.data` (0x200), 16 data directories.
    fn pe() -> Vec<u8> {
        let mut v = vec![0u8; 0xa00];
        v[..2].copy_from_slice(b"MZ");
        put32(&mut v, 0x3c, 0x80);
        v[0x80..0x84].copy_from_slice(b"PE\0\0");
        put16(&mut v, 0x84, 0x8664);
        put16(&mut v, 0x86, 2);
        put16(&mut v, 0x94, 240);
        let opt = 0x98;
        put16(&mut v, opt, PE32_PLUS);
        put32(&mut v, opt + 60, 0x400);
        put32(&mut v, opt + 108, 16);
        let table = opt + 240;
        for (i, (name, at, size)) in [(b".text", 0x400u32, 0x400u32), (b".data", 0x800, 0x200)]
            .into_iter()
            .enumerate()
        {
            let e = table + 40 * i;
            v[e..e + 5].copy_from_slice(name);
            put32(&mut v, e + 16, size);
            put32(&mut v, e + 20, at);
        }
        v
    }

    const PE_OPT: usize = 0x98;

    #[test]
    fn a_whole_pe_passes_and_a_cut_one_is_named_by_its_part() {
        let v = pe();
        assert!(checks(&v, Format::Pe).is_ok());
        // An overlay after the last section is no fault.
        let mut overlay = v.clone();
        overlay.extend([7u8; 100]);
        assert!(checks(&overlay, Format::Pe).is_ok());

        let cut = |n: usize| msg(checks(&v[..n], Format::Pe));
        assert_eq!(
            cut(0x900),
            "section .data's data ends at byte 2560, past the end of the file (2304 bytes)"
        );
        assert_eq!(
            cut(0x500),
            "section .text's data ends at byte 2048, past the end of the file (1280 bytes)"
        );
        assert!(cut(0x1a0).starts_with("the section table (2 sections) ends at byte 472"));
        assert!(cut(0xa0).starts_with("the optional header (240 bytes) ends at byte 392"));
        assert!(cut(0x90).starts_with("the PE (COFF) header ends at byte 152"));
        assert!(cut(0x30).starts_with("the DOS header ends at byte 64"));
    }

    #[test]
    fn pe_headers_that_contradict_themselves_are_damage() {
        let mut v = pe();
        put16(&mut v, PE_OPT, 0x107);
        assert!(msg(checks(&v, Format::Pe)).contains("magic is 0x0107"));

        let mut v = pe();
        put16(&mut v, 0x94, 64);
        let m = msg(checks(&v, Format::Pe));
        assert!(m.contains("64 bytes, too short for a PE32+ header"), "{m}");

        let mut v = pe();
        put32(&mut v, PE_OPT + 108, 40);
        let m = msg(checks(&v, Format::Pe));
        assert!(
            m.contains("declares 40 data directories but has room for 16"),
            "{m}"
        );

        // A signature that the file lacks the end of.
        let mut v = pe();
        put32(&mut v, PE_OPT + 112 + 8 * 4, 0x9f0);
        put32(&mut v, PE_OPT + 112 + 8 * 4 + 4, 0x100);
        let m = msg(checks(&v, Format::Pe));
        assert_eq!(
            m,
            "the certificate table (the signature the file has) ends at byte 2800, past the end of the file (2560 bytes)"
        );
        v.resize(0xaf0, 0);
        assert!(checks(&v, Format::Pe).is_ok());

        // Sections without data in the file (.bss) point nowhere.
        let mut v = pe();
        put32(&mut v, PE_OPT + 240 + 40 + 16, 0);
        put32(&mut v, PE_OPT + 240 + 40 + 20, 0xffff_0000);
        assert!(checks(&v, Format::Pe).is_ok());

        // A header far away is read where it is, and an absurd offset is past the end.
        let mut v = pe();
        put32(&mut v, 0x3c, 0xffff_fff0);
        assert!(
            msg(checks(&v, Format::Pe)).contains("the PE (COFF) header ends at byte 4294967304")
        );
    }

    #[test]
    fn section_names_are_shown_as_written_or_in_hex() {
        assert_eq!(section_name(b".text\0\0\0"), ".text");
        assert_eq!(section_name(b".reloc\0\0"), ".reloc");
        assert_eq!(section_name(b"\x01\0\0\0\0\0\0\0"), "0x0100000000000000");
    }

    /// A version 3 compound file of `sectors` 512-byte sectors after the header: the
    /// allocation table in sector 0, the directory in sector 1, the rest one chain.
    fn cfb(sectors: u32) -> Vec<u8> {
        let mut v = vec![0u8; 512 * (sectors as usize + 1)];
        v[..8].copy_from_slice(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1");
        put16(&mut v, 0x1a, 3);
        put16(&mut v, 0x1c, 0xfffe);
        put16(&mut v, 0x1e, 9);
        put32(&mut v, 0x2c, 1);
        put32(&mut v, 0x30, 1);
        put32(&mut v, 0x3c, END_OF_CHAIN);
        put32(&mut v, 0x44, END_OF_CHAIN);
        for i in 0..HEADER_DIFAT {
            put32(&mut v, 0x4c + 4 * i, FREE_SECTOR);
        }
        put32(&mut v, 0x4c, 0);
        let fat = 512;
        for i in 0..128 {
            put32(&mut v, fat + 4 * i, FREE_SECTOR);
        }
        put32(&mut v, fat, 0xffff_fffd); // the table's own sector
        put32(&mut v, fat + 4, END_OF_CHAIN); // the directory
        for s in 2..sectors {
            let next = if s + 1 < sectors { s + 1 } else { END_OF_CHAIN };
            put32(&mut v, fat + 4 * s as usize, next);
        }
        v
    }

    #[test]
    fn a_compound_file_holds_every_sector_its_table_uses() {
        let v = cfb(10);
        assert!(checks(&v, Format::Msi).is_ok());
        let m = msg(checks(&v[..512 * 8], Format::Msi));
        assert_eq!(
            m,
            "the compound file uses sector 7, which ends at byte 4608, past the end of the file (4096 bytes): it holds 7 sectors of 512 bytes"
        );
        // Cut inside a sector: that sector is not in the file.
        let m = msg(checks(&v[..512 * 10 + 100], Format::Msi));
        assert!(m.contains("uses sector 9"), "{m}");
        let m = msg(checks(&v[..300], Format::Msi));
        assert!(
            m.starts_with("the compound file header ends at byte 512"),
            "{m}"
        );
        let m = msg(checks(&v[..1024], Format::Msi));
        assert!(
            m.starts_with("the directory (sector 1 of 512 bytes) ends at byte 1536"),
            "{m}"
        );
    }

    #[test]
    fn compound_file_header_fields_are_checked() {
        let mut v = cfb(4);
        put32(&mut v, 0x2c, 200);
        let m = msg(checks(&v, Format::Msi));
        assert!(
            m.contains("declares 200 allocation table sectors but lists room for 109"),
            "{m}"
        );

        let mut v = cfb(4);
        put32(&mut v, 0x2c, 2);
        let m = msg(checks(&v, Format::Msi));
        assert!(
            m.contains("allocation table sector 1 is marked 0xffffffff"),
            "{m}"
        );

        let mut v = cfb(4);
        put32(&mut v, 0x4c, 40);
        let m = msg(checks(&v, Format::Msi));
        assert!(
            m.starts_with("the allocation table (sector 40 of 512 bytes)"),
            "{m}"
        );

        let mut v = cfb(4);
        put32(&mut v, 512 + 8, 99);
        let m = msg(checks(&v, Format::Msi));
        assert!(m.contains("sector 2 continues in sector 99"), "{m}");

        let mut v = cfb(4);
        put16(&mut v, 0x1e, 12);
        let m = msg(checks(&v, Format::Msi));
        assert!(m.contains("version 3 with 4096-byte sectors"), "{m}");

        let mut v = cfb(4);
        put32(&mut v, 0x3c, 30);
        let m = msg(checks(&v, Format::Msi));
        assert!(m.starts_with("the mini allocation table (sector 30"), "{m}");
    }

    #[test]
    fn a_large_compound_file_lists_its_table_in_extension_sectors() {
        // 110 allocation table sectors: 109 in the header, one in an extension sector.
        let table = 110u32;
        let total = table + 2; // + the extension sector + a directory sector
        let mut v = vec![0u8; 512 * (total as usize + 1)];
        v[..8].copy_from_slice(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1");
        put16(&mut v, 0x1a, 3);
        put16(&mut v, 0x1c, 0xfffe);
        put16(&mut v, 0x1e, 9);
        put32(&mut v, 0x2c, table);
        put32(&mut v, 0x30, table + 1);
        put32(&mut v, 0x3c, END_OF_CHAIN);
        put32(&mut v, 0x44, table);
        put32(&mut v, 0x48, 1);
        for i in 0..HEADER_DIFAT {
            put32(&mut v, 0x4c + 4 * i, i as u32);
        }
        let ext = 512 * (table as usize + 1);
        for i in 0..127 {
            put32(&mut v, ext + 4 * i, FREE_SECTOR);
        }
        put32(&mut v, ext, 109);
        put32(&mut v, ext + 4 * 127, END_OF_CHAIN);
        // Table entries: all free except the table, extension and directory sectors.
        for s in 0..(table as usize * 128) {
            let at = 512 * (s / 128 + 1) + 4 * (s % 128);
            let value = match s as u32 {
                s if s < table => 0xffff_fffd,
                s if s == table => 0xffff_fffc,
                s if s == table + 1 => END_OF_CHAIN,
                _ => FREE_SECTOR,
            };
            put32(&mut v, at, value);
        }
        assert!(checks(&v, Format::Msi).is_ok());
        let m = msg(checks(&v[..v.len() - 512], Format::Msi));
        assert!(m.starts_with("the directory (sector 111"), "{m}");
        put32(&mut v, 0x48, 0);
        let m = msg(checks(&v, Format::Msi));
        assert!(
            m.contains("declares 110 allocation table sectors but lists room for 109"),
            "{m}"
        );
    }

    /// A cabinet of `len` bytes with one folder; `signature`: (offset, size) of an
    /// appended signature in the reserved area.
    fn cabinet(len: u32, signature: Option<(u32, u32)>) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        v[..4].copy_from_slice(b"MSCF");
        put32(&mut v, 8, len);
        v[24] = 3;
        v[25] = 1;
        put16(&mut v, 26, 1);
        put16(&mut v, 28, 1);
        let folders = match signature {
            Some((at, size)) => {
                put32(&mut v, 8, at);
                put16(&mut v, 30, CAB_RESERVE_PRESENT);
                put16(&mut v, 36, 20);
                v[40..44].copy_from_slice(&CAB_SIGNATURE_MARK);
                put32(&mut v, 44, at);
                put32(&mut v, 48, size);
                60
            }
            None => 36,
        };
        put32(&mut v, 16, folders as u32 + 8);
        put32(&mut v, folders, folders as u32 + 40);
        v
    }

    #[test]
    fn a_cabinet_is_as_long_as_its_header_says() {
        let v = cabinet(300, None);
        assert!(checks(&v, Format::Cab).is_ok());
        let m = msg(checks(&v[..200], Format::Cab));
        assert_eq!(
            m,
            "the cabinet header says the cabinet is 300 bytes (cbCabinet), and the file has only 200"
        );
        let signed = cabinet(400, Some((300, 100)));
        assert!(checks(&signed, Format::Cab).is_ok());
        let m = msg(checks(&signed[..350], Format::Cab));
        assert_eq!(
            m,
            "the signature the cabinet has ends at byte 400, past the end of the file (350 bytes)"
        );
        let mut v = cabinet(300, None);
        put32(&mut v, 36, 5000);
        let m = msg(checks(&v, Format::Cab));
        assert!(m.contains("folder 0 starts at byte 5000"), "{m}");
        let mut v = cabinet(300, None);
        put32(&mut v, 16, 301);
        let m = msg(checks(&v, Format::Cab));
        assert!(m.contains("file table starts at byte 301"), "{m}");
        let mut v = cabinet(300, None);
        put16(&mut v, 26, 60);
        let m = msg(checks(&v, Format::Cab));
        assert!(
            m.starts_with("the cabinet's folder table (60 folders) ends at byte 516"),
            "{m}"
        );
    }

    #[test]
    fn a_catalog_holds_its_whole_der_structure() {
        let mut short = vec![0x30, 0x05, 1, 2, 3, 4, 5];
        assert!(checks(&short, Format::Cat).is_ok());
        short.pop();
        assert_eq!(
            msg(checks(&short, Format::Cat)),
            "the catalog's DER structure declares 7 bytes, and the file has only 6"
        );
        let mut long = vec![0x30, 0x82, 0x01, 0x00];
        long.resize(4 + 0x100, 0);
        assert!(checks(&long, Format::Cat).is_ok());
        assert!(msg(checks(&long[..100], Format::Cat)).contains("declares 260 bytes"));
        assert!(checks(&[0x30, 0x80, 0, 0], Format::Cat).is_ok());
        assert!(msg(checks(&[0x30, 0x89, 0], Format::Cat)).contains("takes 9 bytes"));
        let huge = [0x30, 0x88, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(msg(checks(&huge, Format::Cat)).contains("declares 18446744073709551615 bytes"));
    }

    #[test]
    fn scripts_have_no_structure_to_check() {
        assert!(checks(b"Write-Host hi", Format::PowerShell).is_ok());
    }

    #[test]
    fn a_file_shorter_than_its_length_said_is_damage_not_a_panic() {
        // The caller's length is stale: the file shrank while being checked.
        let v = pe();
        let m = msg(check(&v[..0x90], 0x1000, Format::Pe));
        assert!(m.contains("past the end of the file (144 bytes)"), "{m}");
    }
}
