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
//! - CAT: the DER structure's outer length fits in the file.
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
