//! PE files: the Authenticode digest and page hashes computed as osslsigncode
//! computes them, in one pass over the file with a fixed buffer, and the signed copy
//! written with the certificate table appended and the checksum recomputed.

use std::io::{Read, Seek, SeekFrom, Write};

use der::asn1::{Any, BitString, BmpString, OctetString, SetOfVec};
use der::{Decode, Encode, Reader};

use crate::asn1::{
    self, DigestInfo, PageHashes, SpcAttributeTypeAndOptionalValue, SpcIndirectDataContent,
    SpcLink, SpcPeImageData, SpcSerializedObject, SpcString,
};
use crate::signature::sign_with_sequence;
use crate::{add_nested, nested_count, Error, HashAlg, RawSigner, SignOptions};
use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{EncapsulatedContentInfo, SignedData, SignerInfos};

/// The size of the buffer the file is read and copied with (at most).
const BUF: usize = 1 << 20;

/// The buffer a file of `len` bytes is read and copied with: no larger than the file
/// (a 15 KiB file does not have a MiB zeroed for it, three times), at most [`BUF`].
fn buffer(len: u64) -> Vec<u8> {
    vec![0u8; usize::try_from(len).unwrap_or(BUF).clamp(4096, BUF)]
}
/// WIN_CERT_REVISION_2_0.
const WIN_CERT_REVISION_2: u16 = 0x0200;
/// WIN_CERT_TYPE_PKCS_SIGNED_DATA.
const WIN_CERT_TYPE_PKCS: u16 = 0x0002;
/// The largest existing certificate table read for nesting.
const MAX_EXISTING: u64 = 64 << 20;

fn damaged(what: impl Into<String>) -> Error {
    Error::DamagedPe(what.into())
}

/// A PE file's layout, as far as Authenticode needs it (read from its headers).
#[derive(Debug, Clone)]
pub struct PeImage {
    len: u64,
    /// e_lfanew: where "PE\0\0" is.
    pe_offset: u64,
    pe32plus: bool,
    /// The certificate table (security directory): file offset and size; (0, 0): none.
    sig_pos: u64,
    sig_len: u64,
    section_alignment: u32,
    size_of_headers: u32,
    /// (SizeOfRawData, PointerToRawData) of each section, in table order.
    sections: Vec<(u32, u32)>,
}

impl PeImage {
    /// Reads and checks the headers of the PE file `r`.
    pub fn parse<R: Read + Seek>(r: &mut R) -> Result<PeImage, Error> {
        let len = r.seek(SeekFrom::End(0))?;
        if len < 64 {
            return Err(damaged(format!(
                "it is {len} bytes long, shorter than a DOS header (64): this is not a PE file; send the whole file"
            )));
        }
        let dos = read_at(r, 0, 64)?;
        if &dos[..2] != b"MZ" {
            return Err(damaged(
                "it does not start with \"MZ\": this is not a PE file; sign it as its own format",
            ));
        }
        let pe_offset = u64::from(u32_at(&dos, 60));
        if pe_offset + 26 > len {
            return Err(damaged(format!(
                "its PE header offset ({pe_offset}) points past the end of the file ({len} bytes): the file is truncated or not a PE file; rebuild it"
            )));
        }
        let coff = read_at(r, pe_offset, 24 + 2)?;
        if &coff[..4] != b"PE\0\0" {
            return Err(damaged(format!(
                "there is no \"PE\\0\\0\" signature at offset {pe_offset}: this is a DOS program or damaged; rebuild it"
            )));
        }
        let nsections = u16_at(&coff, 6);
        let opt_size = u64::from(u16_at(&coff, 20));
        let pe32plus = match u16_at(&coff, 24) {
            0x10b => false,
            0x20b => true,
            m => {
                return Err(damaged(format!(
                    "its optional header's magic is {m:#x}, neither PE32 (0x10b) nor PE32+ (0x20b); rebuild it"
                )))
            }
        };
        let extra = if pe32plus { 16 } else { 0 };
        // Up to the end of the security directory entry.
        let need = 24 + 136 + extra;
        if opt_size < 128 + extra {
            return Err(damaged(format!(
                "its optional header is {opt_size} bytes, too short to hold a certificate table entry; rebuild it"
            )));
        }
        if pe_offset + need > len {
            return Err(damaged(format!(
                "its headers end past the end of the file ({len} bytes): the file is truncated; rebuild it"
            )));
        }
        let opt = read_at(r, pe_offset, need as usize)?;
        let nrvas = u32_at(&opt, 116 + extra as usize);
        if nrvas < 5 {
            return Err(damaged(format!(
                "its optional header has {nrvas} data directories, fewer than the 5 a certificate table needs; relink it with the default directories"
            )));
        }
        let section_alignment = u32_at(&opt, 24 + 32);
        let size_of_headers = u32_at(&opt, 24 + 60);
        let sig_pos = u64::from(u32_at(&opt, 152 + extra as usize));
        let sig_len = u64::from(u32_at(&opt, 156 + extra as usize));
        if (sig_pos == 0) != (sig_len == 0) {
            return Err(damaged(format!(
                "its certificate table entry is inconsistent (offset {sig_pos}, size {sig_len}); strip the signature (osslsigncode remove-signature) and sign again"
            )));
        }
        if sig_pos != 0 && sig_pos + sig_len != len {
            return Err(damaged(format!(
                "its signature ({sig_len} bytes at {sig_pos}) is not at the end of the file ({len} bytes); strip it (osslsigncode remove-signature) or rebuild the file"
            )));
        }
        let table_at = pe_offset + 24 + opt_size;
        let table_len = u64::from(nsections) * 40;
        if table_at + table_len > len {
            return Err(damaged(format!(
                "its section table ({nsections} sections at {table_at}) runs past the end of the file; the file is truncated: rebuild it"
            )));
        }
        let table = read_at(r, table_at, table_len as usize)?;
        let sections = table
            .chunks_exact(40)
            .map(|s| (u32_at(s, 16), u32_at(s, 20)))
            .collect();
        Ok(PeImage {
            len,
            pe_offset,
            pe32plus,
            sig_pos,
            sig_len,
            section_alignment,
            size_of_headers,
            sections,
        })
    }

    /// PE32+ (64-bit) rather than PE32.
    pub fn is_pe32_plus(&self) -> bool {
        self.pe32plus
    }

    /// The certificate table's offset and size, when the file has one.
    pub fn signature_range(&self) -> Option<(u64, u64)> {
        (self.sig_pos != 0).then_some((self.sig_pos, self.sig_len))
    }

    /// Where the checksum field is.
    fn checksum_at(&self) -> u64 {
        self.pe_offset + 88
    }

    /// Where the security directory entry is.
    fn security_dir_at(&self) -> u64 {
        self.pe_offset + 152 + if self.pe32plus { 16 } else { 0 }
    }

    /// The end of what is hashed: the start of the signature, or the file's end.
    fn file_end(&self) -> u64 {
        if self.sig_pos != 0 {
            self.sig_pos
        } else {
            self.len
        }
    }

    /// The Authenticode digest: the file without its checksum and security directory
    /// entry, up to its signature, zero-padded to a multiple of 8.
    pub fn digest<R: Read + Seek>(&self, r: &mut R, hash: HashAlg) -> Result<Vec<u8>, Error> {
        let mut h = hash.hasher();
        let mut buf = buffer(self.len);
        let cs = self.checksum_at();
        let sd = self.security_dir_at();
        let end = self.file_end();
        for (from, to) in [(0, cs), (cs + 4, sd), (sd + 8, end)] {
            hash_range(r, &mut *h, from, to, &mut buf)?;
        }
        let pad = (8 - end % 8) % 8;
        h.update(&[0u8; 8][..pad as usize]);
        Ok(h.finalize().to_vec())
    }

    /// The page hash table osslsigncode makes for `-ph`: for SHA-256 and longer file
    /// digests, SHA-256 (`PAGE_HASHES_V2`) entries of a 4-byte offset and a page's
    /// hash, the headers first, then each section's pages, then the end.
    pub fn page_hashes<R: Read + Seek>(&self, r: &mut R) -> Result<Vec<u8>, Error> {
        let page = self.section_alignment;
        let hdr = self.size_of_headers;
        let sd_end = self.security_dir_at() + 8;
        if self.sections.is_empty() {
            return Err(damaged("it has no sections; sign it without page hashes"));
        }
        if page == 0 || page > 256 << 20 {
            return Err(damaged(format!(
                "its section alignment ({page}) is not a usable page size; sign it without page hashes"
            )));
        }
        if u64::from(hdr) < sd_end || hdr > page || u64::from(hdr) > self.len {
            return Err(damaged(format!(
                "its SizeOfHeaders ({hdr}) is not between the end of the headers ({sd_end}) and the page size ({page}); sign it without page hashes or rebuild it"
            )));
        }
        let mut buf = buffer(self.len);
        let mut out = Vec::new();
        let mut h = HashAlg::Sha256.hasher();
        let cs = self.checksum_at();
        let sd = self.security_dir_at();
        for (from, to) in [(0, cs), (cs + 4, sd), (sd + 8, u64::from(hdr))] {
            hash_range(r, &mut *h, from, to, &mut buf)?;
        }
        zeros(&mut *h, u64::from(page - hdr));
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&h.finalize_reset());
        let mut last = 0u32;
        for (i, &(rs, ro)) in self.sections.iter().enumerate() {
            if rs == 0 || rs == u32::MAX {
                continue;
            }
            if u64::from(ro) + u64::from(rs) > self.len {
                return Err(damaged(format!(
                    "section {} ({rs} bytes at {ro}) runs past the end of the file; rebuild it",
                    i + 1
                )));
            }
            let mut l = 0u32;
            while l < rs {
                let n = page.min(rs - l);
                let at = u64::from(ro) + u64::from(l);
                hash_range(r, &mut *h, at, at + u64::from(n), &mut buf)?;
                zeros(&mut *h, u64::from(page - n));
                out.extend_from_slice(&(ro.wrapping_add(l)).to_le_bytes());
                out.extend_from_slice(&h.finalize_reset());
                l = match l.checked_add(page) {
                    Some(next) => next,
                    None => break,
                };
            }
            last = ro.wrapping_add(rs);
        }
        out.extend_from_slice(&last.to_le_bytes());
        out.extend_from_slice(&[0u8; 32]);
        Ok(out)
    }

    /// The DER SpcIndirectDataContent of this file (SpcPeImageData, with page hashes
    /// when asked), as osslsigncode makes it.
    pub fn indirect_data<R: Read + Seek>(
        &self,
        r: &mut R,
        hash: HashAlg,
        page_hashes: bool,
    ) -> Result<Vec<u8>, Error> {
        let pages = if page_hashes {
            Some(self.serialized_page_hashes(r)?)
        } else {
            None
        };
        let digest = self.digest(r, hash)?;
        indirect_data_of(hash, digest, pages)
    }

    /// The page hashes as SpcSerializedObject.serializedData carries them (v2, SHA-256).
    fn serialized_page_hashes<R: Read + Seek>(&self, r: &mut R) -> Result<Vec<u8>, Error> {
        let table = self.page_hashes(r)?;
        Ok(SetOfVec::try_from(vec![PageHashes {
            hash_type: asn1::PAGE_HASHES_V2,
            hashes: SetOfVec::try_from(vec![OctetString::new(table)?])?,
        }])?
        .to_der()?)
    }

    /// Checks that `signature` (a DER PKCS#7 SignedData) signs this file, as
    /// osslsigncode does before it attaches one: its SpcIndirectDataContent is a PE's,
    /// its digest is this file's (computed with the signature's algorithm), its page
    /// hashes (when it has them) are this file's, and its signer's messageDigest is
    /// that content's. [`Error::WrongFile`] says what differs;
    /// [`Error::NotSignature`]: it cannot be read. The signer's key and certificate
    /// are [`crate::verify_signature`]'s.
    pub fn check_signature<R: Read + Seek>(
        &self,
        r: &mut R,
        signature: &[u8],
    ) -> Result<(), Error> {
        let signed = crate::verify::SignedContent::parse(signature)?;
        let indirect = &signed.indirect;
        if indirect.data.value_type != asn1::SPC_PE_IMAGE_DATA {
            return Err(Error::WrongFile(format!(
                "it signs a file of another kind (data type {}), not a PE file",
                indirect.data.value_type
            )));
        }
        let oid = &indirect.message_digest.digest_algorithm.oid;
        let Some(hash) = HashAlg::from_oid(oid) else {
            return Err(Error::NotSignature(format!(
                "its file digest is {oid}, not SHA-256/384/512"
            )));
        };
        let ours = self.digest(r, hash)?;
        let theirs = indirect.message_digest.digest.as_bytes();
        if ours != theirs {
            return Err(Error::WrongFile(format!(
                "it signs the {} digest {}, and this file's is {}",
                hash.as_str(),
                hex(theirs),
                hex(&ours)
            )));
        }
        let data: Option<SpcPeImageData> = indirect
            .data
            .value
            .as_ref()
            .map(|v| v.decode_as())
            .transpose()
            .map_err(|e| Error::NotSignature(format!("its SpcPeImageData: {e}")))?;
        if let Some(SpcLink::Moniker(obj)) = data.and_then(|d| d.file) {
            if obj.class_id.as_bytes() == asn1::PAGE_HASHES_CLASS
                && obj.serialized_data.as_bytes() != self.serialized_page_hashes(r)?
            {
                return Err(Error::WrongFile(
                    "its page hashes are not this file's (its digest is)".into(),
                ));
            }
        }
        Ok(())
    }

    /// Checks every signature the file has (the first and those nested in it) with
    /// [`PeImage::check_signature`] and [`crate::verify_signature`], but those whose
    /// file digest is not SHA-256/384/512 (an older SHA-1 one a file was signed with
    /// before, kept beside the new): answers how many were checked.
    pub fn check_signatures<R: Read + Seek>(&self, r: &mut R) -> Result<usize, Error> {
        let Some(outer) = self.existing_signature(r)? else {
            return Err(Error::WrongFile("it has no signature".into()));
        };
        let mut all = vec![outer.clone()];
        all.extend(crate::verify::nested_signatures(&outer)?);
        let mut checked = 0;
        for s in &all {
            let content = crate::verify::SignedContent::parse(s)?;
            if HashAlg::from_oid(&content.indirect.message_digest.digest_algorithm.oid).is_none() {
                continue;
            }
            self.check_signature(r, s)?;
            crate::verify_signature(s)?;
            checked += 1;
        }
        Ok(checked)
    }

    /// The DER PKCS#7 of the file's signature (the first WIN_CERTIFICATE), if it has one.
    pub fn existing_signature<R: Read + Seek>(&self, r: &mut R) -> Result<Option<Vec<u8>>, Error> {
        if self.sig_pos == 0 {
            return Ok(None);
        }
        if self.sig_len < 8 || self.sig_len > MAX_EXISTING {
            return Err(Error::ExistingSignature(format!(
                "its certificate table is {} bytes",
                self.sig_len
            )));
        }
        let table = read_at(r, self.sig_pos, self.sig_len as usize)?;
        let length = u64::from(u32_at(&table, 0));
        let kind = u16_at(&table, 6);
        if kind != WIN_CERT_TYPE_PKCS || length < 8 || length > self.sig_len {
            return Err(Error::ExistingSignature(format!(
                "its first certificate entry is of type {kind} and {length} bytes, not a PKCS#7 signature within the table"
            )));
        }
        let body = &table[8..length as usize];
        let mut reader = der::SliceReader::new(body)?;
        Any::decode(&mut reader).map_err(|e| Error::ExistingSignature(e.to_string()))?;
        let used = u32::from(reader.position()) as usize;
        Ok(Some(body[..used].to_vec()))
    }
}

/// The DER SpcIndirectDataContent of a PE file whose Authenticode digest is `digest`
/// (made with `hash`), with its serialized page hashes when given.
fn indirect_data_of(
    hash: HashAlg,
    digest: Vec<u8>,
    page_hashes: Option<Vec<u8>>,
) -> Result<Vec<u8>, Error> {
    let file = match page_hashes {
        Some(serialized) => SpcLink::Moniker(SpcSerializedObject {
            class_id: OctetString::new(asn1::PAGE_HASHES_CLASS.to_vec())?,
            serialized_data: OctetString::new(serialized)?,
        }),
        None => SpcLink::File(SpcString::Unicode(BmpString::from_utf8("<<<Obsolete>>>")?)),
    };
    let data = SpcPeImageData {
        // includeResources, as osslsigncode writes it (03 02 07 80).
        flags: BitString::new(7, vec![0x80])?,
        file: Some(file),
    };
    Ok(SpcIndirectDataContent {
        data: SpcAttributeTypeAndOptionalValue {
            value_type: asn1::SPC_PE_IMAGE_DATA,
            value: Some(Any::encode_from(&data)?),
        },
        message_digest: DigestInfo {
            digest_algorithm: spki::AlgorithmIdentifierOwned {
                oid: hash.oid(),
                parameters: Some(Any::null()),
            },
            digest: OctetString::new(digest)?,
        },
    }
    .to_der()?)
}

/// What [`sign_pe`] wrote.
#[derive(Debug, Clone)]
pub struct PeSigned {
    /// The DER PKCS#7 in the certificate table (with the nested one inside when nested).
    pub signature: Vec<u8>,
    /// The certificate table's offset and size (the security directory's values).
    pub table_offset: u32,
    pub table_size: u32,
    /// The PE checksum written.
    pub checksum: u32,
    /// Whether the signature was nested beside one the file had.
    pub nested: bool,
    /// How many of the input's first bytes the signed file begins with (its content,
    /// up to the signature it had), unchanged but for the checksum field at
    /// `checksum_at` and the security directory entry at `security_dir_at`; the rest of
    /// the signed file follows them (padding to 8, the certificate table).
    pub kept: u64,
    pub checksum_at: u64,
    pub security_dir_at: u64,
}

/// Signs the PE file `input` as `options` say and writes the signed copy to `output`:
/// the file up to its existing signature, zero-padded to 8, then the certificate table
/// (8-aligned) holding the new signature; or, nested, the existing signature with the
/// new one inside it. The file is read once: copied to `output` while its digest and
/// checksum are computed, then signed (page hashes, when asked, take a pass of their
/// own first). On an error `output` holds an unfinished copy.
pub fn sign_pe<R: Read + Seek, W: Read + Write + Seek, S: RawSigner>(
    input: &mut R,
    output: &mut W,
    options: &SignOptions,
    signer: &S,
) -> Result<PeSigned, Error> {
    let image = PeImage::parse(input)?;
    let existing = if options.nested {
        image.existing_signature(input)?
    } else {
        None
    };
    let nested = existing.is_some();
    let sequence = match &existing {
        Some(outer) => Some(u32::try_from(nested_count(outer)? + 1).unwrap_or(u32::MAX)),
        None => None,
    };
    let pages = if options.page_hashes {
        Some(image.serialized_page_hashes(input)?)
    } else {
        None
    };
    let mut buf = buffer(image.len);
    let copied = copy(&image, input, output, Some(options.hash), &mut buf)?;
    let digest = match copied.digest.clone() {
        Some(d) => d,
        None => image.digest(input, options.hash)?,
    };
    let indirect = indirect_data_of(options.hash, digest, pages)?;
    let ours = sign_with_sequence(&indirect, options, signer, sequence)?;
    let signature = match existing {
        Some(outer) => add_nested(&outer, &ours)?,
        None => ours,
    };
    finish(&image, output, copied, signature, nested, &mut buf)
}

/// Signs the PE file `file` where it lies, as [`sign_pe`] would sign a copy of it: the
/// file is read once (its digest and checksum's sum), signed, and only then written
/// to: the certificate table at the end of its content (over its existing signature,
/// which a nested signature keeps inside the new table), the security directory and
/// the checksum. The signed file is the first `table_offset + table_size` bytes; the
/// caller cuts it there (a table shorter than the signature it replaces leaves bytes
/// after it). The bytes are those [`sign_pe`] writes. When signing fails, nothing
/// has been written.
pub fn sign_pe_in_place<F: Read + Write + Seek, S: RawSigner>(
    file: &mut F,
    options: &SignOptions,
    signer: &S,
) -> Result<PeSigned, Error> {
    sign_pe_in_place_digested(file, options, signer, None)
}

/// [`sign_pe_in_place`] with what a [`PeDigester`] made of the file's bytes as they were
/// written: when it read the layout the file has, for the file's length and the
/// options' hash, the file is not read again for its digest and checksum.
pub fn sign_pe_in_place_digested<F: Read + Write + Seek, S: RawSigner>(
    file: &mut F,
    options: &SignOptions,
    signer: &S,
    digested: Option<&PeDigested>,
) -> Result<PeSigned, Error> {
    let image = PeImage::parse(file)?;
    let existing = if options.nested {
        image.existing_signature(file)?
    } else {
        None
    };
    let nested = existing.is_some();
    let sequence = match &existing {
        Some(outer) => Some(u32::try_from(nested_count(outer)? + 1).unwrap_or(u32::MAX)),
        None => None,
    };
    let pages = if options.page_hashes {
        Some(image.serialized_page_hashes(file)?)
    } else {
        None
    };
    // A buffer only when the file is read: what was digested as it arrived is not.
    let mut buf = Vec::new();
    let scanned = match digested.and_then(|d| d.for_image(&image, options.hash)) {
        Some(known) => known,
        None => {
            buf = buffer(image.len);
            scan(&image, file, Some(options.hash), &mut buf, |_| Ok(()))?
        }
    };
    let digest = match scanned.digest.clone() {
        Some(d) => d,
        None => image.digest(file, options.hash)?,
    };
    let indirect = indirect_data_of(options.hash, digest, pages)?;
    let ours = sign_with_sequence(&indirect, options, signer, sequence)?;
    let signature = match existing {
        Some(outer) => add_nested(&outer, &ours)?,
        None => ours,
    };
    finish(&image, file, scanned, signature, nested, &mut buf)
}

/// A PE file held in memory (`input`) signed as [`sign_pe_in_place_digested`] signs a
/// file, without a copy of it: the signed file is the input's first [`PeSigned::kept`]
/// bytes with its checksum and security directory entry written over (the values in
/// [`PeSigned`]), then the answered tail (padding to 8 and the certificate table).
/// The same bytes as signing a copy where it lies.
pub fn sign_pe_in_memory<S: RawSigner>(
    input: &[u8],
    options: &SignOptions,
    signer: &S,
    digested: Option<&PeDigested>,
) -> Result<(PeSigned, Vec<u8>), Error> {
    let mut file = Overlay::new(input);
    let done = sign_pe_in_place_digested(&mut file, options, signer, digested)?;
    let end = u64::from(done.table_offset) + u64::from(done.table_size);
    let mut tail = vec![0u8; usize::try_from(end.saturating_sub(done.kept)).unwrap_or(0)];
    file.seek(SeekFrom::Start(done.kept))?;
    file.read_exact(&mut tail)?;
    Ok((done, tail))
}

/// Bytes read as `base` with the writes made since over them, as a file would read
/// them (grown by writes past its end, zeros in a gap): signing in place without a
/// copy of the input. The writes are few and small (a certificate table, two header
/// fields); a read applies them over what it copies from `base`.
struct Overlay<'a> {
    base: &'a [u8],
    /// Each write's offset and bytes, in the order made (a later one wins).
    writes: Vec<(u64, Vec<u8>)>,
    len: u64,
    pos: u64,
}

impl<'a> Overlay<'a> {
    fn new(base: &'a [u8]) -> Overlay<'a> {
        Overlay {
            base,
            writes: Vec::new(),
            len: base.len() as u64,
            pos: 0,
        }
    }
}

impl Read for Overlay<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = usize::try_from(self.len.saturating_sub(self.pos))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let (at, out) = (self.pos, &mut buf[..n]);
        let from_base = usize::try_from(at)
            .ok()
            .and_then(|at| self.base.get(at..))
            .unwrap_or_default();
        let m = from_base.len().min(n);
        out[..m].copy_from_slice(&from_base[..m]);
        out[m..].fill(0);
        let end = at + n as u64;
        for (w_at, bytes) in &self.writes {
            let w_end = w_at + bytes.len() as u64;
            if w_end <= at || *w_at >= end {
                continue;
            }
            let from = (w_at.max(&at) - at) as usize;
            let to = (w_end.min(end) - at) as usize;
            let skip = at.saturating_sub(*w_at) as usize;
            out[from..to].copy_from_slice(&bytes[skip..skip + to - from]);
        }
        self.pos = end;
        Ok(n)
    }
}

impl Write for Overlay<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !buf.is_empty() {
            self.writes.push((self.pos, buf.to_vec()));
            self.pos += buf.len() as u64;
            self.len = self.len.max(self.pos);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Seek for Overlay<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a seek before the start of the file",
            )
        })?;
        Ok(self.pos)
    }
}

/// A PE file's Authenticode digest and checksum's sum, computed from its bytes as they
/// arrive, in order (as a spool is written), so that [`sign_pe_in_place_digested`]
/// need not read the file again. Its layout (where the checksum field, the security
/// directory entry and the signature are) is read from the first bytes; bytes that are
/// not a PE's, or whose headers do not fit in the first 64 KiB, make it give up
/// (`finish` answers `None`) and cost nothing more. Constant memory.
pub struct PeDigester {
    hash: HashAlg,
    /// The first bytes, until the layout is known.
    head: Vec<u8>,
    layout: Option<HeadLayout>,
    given_up: bool,
    h: Box<dyn sha2::digest::DynDigest + Send>,
    sum: WordSum,
    /// How many bytes were given.
    at: u64,
}

impl std::fmt::Debug for PeDigester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeDigester")
            .field("hash", &self.hash)
            .field("layout", &self.layout)
            .field("given_up", &self.given_up)
            .field("at", &self.at)
            .finish_non_exhaustive()
    }
}

/// What the first bytes of a PE file say of its layout.
#[derive(Debug, Clone)]
struct HeadLayout {
    /// The checksum field's offset and its bytes.
    cs: u64,
    checksum_field: [u8; 4],
    /// The security directory entry's offset and its bytes.
    sd: u64,
    security_dir: [u8; 8],
    /// Where the existing signature starts (the end of what is hashed); 0: none.
    sig_pos: u64,
}

/// The most of a file's start kept to read its layout.
const DIGEST_HEAD_MAX: usize = 64 << 10;

/// What a [`PeDigester`] made of a whole file.
#[derive(Debug, Clone)]
pub struct PeDigested {
    hash: HashAlg,
    len: u64,
    cs: u64,
    sd: u64,
    end: u64,
    digest: Vec<u8>,
    sum: WordSum,
}

impl PeDigester {
    /// A digester for the digest made with `hash`.
    pub fn new(hash: HashAlg) -> PeDigester {
        PeDigester {
            hash,
            head: Vec::new(),
            layout: None,
            given_up: false,
            h: hash.hasher(),
            sum: WordSum::default(),
            at: 0,
        }
    }

    /// The file's next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        if self.given_up {
            return;
        }
        if self.layout.is_some() {
            self.feed(bytes);
            return;
        }
        self.head.extend_from_slice(bytes);
        match head_layout(&self.head) {
            Some(Some(layout)) => {
                self.layout = Some(layout);
                let head = std::mem::take(&mut self.head);
                self.feed(&head);
            }
            Some(None) => self.give_up(),
            None if self.head.len() > DIGEST_HEAD_MAX => self.give_up(),
            None => {}
        }
    }

    fn give_up(&mut self) {
        self.given_up = true;
        self.head = Vec::new();
    }

    /// Hashes and sums `bytes`, the next ones after `self.at`, as far as they are
    /// before the signature.
    fn feed(&mut self, bytes: &[u8]) {
        let Some(l) = &self.layout else { return };
        let at = self.at;
        self.at += bytes.len() as u64;
        let end = if l.sig_pos != 0 { l.sig_pos } else { u64::MAX };
        let upto = (end.min(self.at) - at.min(end)) as usize;
        let bytes = &bytes[..upto];
        for (from, to) in [(0, l.cs), (l.cs + 4, l.sd), (l.sd + 8, end)] {
            let (from, to) = (from.max(at), to.min(at + bytes.len() as u64));
            if from < to {
                self.h
                    .update(&bytes[(from - at) as usize..(to - at) as usize]);
            }
        }
        self.sum.add(at, bytes);
    }

    /// The file's digest and sum, once all its bytes were given; `None` when it gave
    /// up or the layout is one [`sign_pe_in_place`] reads for itself.
    pub fn finish(mut self) -> Option<PeDigested> {
        let l = self.layout.take()?;
        if self.given_up {
            return None;
        }
        let len = self.at;
        let end = if l.sig_pos != 0 { l.sig_pos } else { len };
        if l.sd + 8 > end || end > len {
            return None;
        }
        let pad = (8 - end % 8) % 8;
        self.h.update(&[0u8; 8][..pad as usize]);
        let mut sum = self.sum;
        if l.cs % 2 == 0 {
            sum.sub(l.cs, &l.checksum_field);
        }
        sum.sub(l.sd, &l.security_dir);
        Some(PeDigested {
            hash: self.hash,
            len,
            cs: l.cs,
            sd: l.sd,
            end,
            digest: self.h.finalize().to_vec(),
            sum,
        })
    }
}

impl PeDigested {
    /// Whether [`sign_pe_in_place_digested`] takes this for the file laid out as
    /// `image`, signed with `hash`: the same layout, length and hash.
    pub fn fits(&self, image: &PeImage, hash: HashAlg) -> bool {
        self.hash == hash
            && self.len == image.len
            && self.cs == image.checksum_at()
            && self.sd == image.security_dir_at()
            && self.end == image.file_end()
    }

    /// What [`scan`] would answer for `image` with `hash`, if this is that file's.
    fn for_image(&self, image: &PeImage, hash: HashAlg) -> Option<Copied> {
        self.fits(image, hash).then(|| Copied {
            digest: Some(self.digest.clone()),
            sum: Some(self.sum),
        })
    }
}

/// The layout the first bytes `head` of a file give: `None` when more bytes are
/// needed, `Some(None)` when they are not a PE's start.
fn head_layout(head: &[u8]) -> Option<Option<HeadLayout>> {
    if head.len() < 64 {
        return None;
    }
    if &head[..2] != b"MZ" {
        return Some(None);
    }
    let pe = u64::from(u32_at(head, 60));
    let magic_end = pe + 26;
    if (head.len() as u64) < magic_end {
        return None;
    }
    let pe = pe as usize;
    let extra = match u16_at(head, pe + 24) {
        0x10b => 0,
        0x20b => 16,
        _ => return Some(None),
    };
    let sd = pe + 152 + extra;
    if head.len() < sd + 8 {
        return None;
    }
    let cs = pe + 88;
    let mut checksum_field = [0u8; 4];
    checksum_field.copy_from_slice(&head[cs..cs + 4]);
    let mut security_dir = [0u8; 8];
    security_dir.copy_from_slice(&head[sd..sd + 8]);
    Some(Some(HeadLayout {
        cs: cs as u64,
        checksum_field,
        sd: sd as u64,
        security_dir,
        sig_pos: u64::from(u32_at(head, sd)),
    }))
}

/// What [`copy`] did: the file's digest (when asked and its layout allows it in the
/// same pass) and its checksum's sum so far.
#[derive(Debug, Clone)]
struct Copied {
    digest: Option<Vec<u8>>,
    /// The words written, the checksum field and the security directory entry left
    /// out; `None` when the layout keeps them from being left out (the security
    /// directory entry past the copied part): the checksum is then read back.
    sum: Option<WordSum>,
}

/// Copies `input` (laid out as `image`) up to its existing signature to the start of
/// `output`, in constant memory (`buf`), computing in the same pass its Authenticode
/// digest with `hash` and the checksum's sum of what was written.
fn copy<R: Read + Seek, W: Write + Seek>(
    image: &PeImage,
    input: &mut R,
    output: &mut W,
    hash: Option<HashAlg>,
    buf: &mut [u8],
) -> Result<Copied, Error> {
    output.seek(SeekFrom::Start(0))?;
    scan(image, input, hash, buf, |block| output.write_all(block))
}

/// Reads `input` (laid out as `image`) up to its existing signature once, in constant
/// memory (`buf`), computing its Authenticode digest with `hash` and the checksum's
/// sum, and hands each block read to `sink`.
fn scan<R: Read + Seek>(
    image: &PeImage,
    input: &mut R,
    hash: Option<HashAlg>,
    buf: &mut [u8],
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<Copied, Error> {
    let end = image.file_end();
    let cs = image.checksum_at();
    let sd = image.security_dir_at();
    // The usual layout: the checksum field and the security directory entry inside
    // what is copied. Otherwise the digest (which hashes the headers even past a
    // signature) and the checksum are made the way that holds for any layout.
    let usual = sd + 8 <= end;
    let mut h = hash.filter(|_| usual).map(HashAlg::hasher);
    let mut sum = WordSum::default();
    let (checksum_field, security_dir) = if usual {
        (read_at(input, cs, 4)?, read_at(input, sd, 8)?)
    } else {
        (Vec::new(), Vec::new())
    };
    input.seek(SeekFrom::Start(0))?;
    let even = buf.len() & !1;
    let mut at = 0u64;
    while at < end {
        let n = (even as u64).min(end - at) as usize;
        let chunk = &mut buf[..n];
        input.read_exact(chunk)?;
        if let Some(h) = h.as_deref_mut() {
            // The checksum field and the security directory entry are not hashed.
            for (from, to) in [(0, cs), (cs + 4, sd), (sd + 8, end)] {
                let (from, to) = (from.max(at), to.min(at + n as u64));
                if from < to {
                    h.update(&chunk[(from - at) as usize..(to - at) as usize]);
                }
            }
        }
        if usual {
            sum.add(at, chunk);
        }
        sink(chunk)?;
        at += n as u64;
    }
    let digest = h.map(|mut h| {
        let pad = (8 - end % 8) % 8;
        h.update(&[0u8; 8][..pad as usize]);
        h.finalize().to_vec()
    });
    let sum = usual.then(|| {
        // The checksum field counts as 0 (as osslsigncode counts it: the two words
        // at its offset when that is even), the security directory entry as what
        // [`finish`] writes there.
        if cs % 2 == 0 {
            sum.sub(cs, &checksum_field);
        }
        sum.sub(sd, &security_dir);
        sum
    });
    Ok(Copied { digest, sum })
}

/// Ends the signed copy [`copy`] began: the padding to 8, the certificate table
/// (8-aligned) with `signature` as its only entry, the security directory set and
/// the checksum written.
fn finish<W: Read + Write + Seek>(
    image: &PeImage,
    output: &mut W,
    copied: Copied,
    signature: Vec<u8>,
    nested: bool,
    buf: &mut Vec<u8>,
) -> Result<PeSigned, Error> {
    let end = image.file_end();
    let pad = (8 - end % 8) % 8;
    let table_offset = end + pad;
    let body_pad = (8 - signature.len() % 8) % 8;
    let table_size = 8 + signature.len() + body_pad;
    let (Ok(table_offset), Ok(table_size)) =
        (u32::try_from(table_offset), u32::try_from(table_size))
    else {
        return Err(damaged(
            "it would be larger than 4 GiB with its signature, more than a PE file can address; split it",
        ));
    };
    let mut table = Vec::with_capacity(pad as usize + table_size as usize);
    table.extend_from_slice(&[0u8; 8][..pad as usize]);
    table.extend_from_slice(&table_size.to_le_bytes());
    table.extend_from_slice(&WIN_CERT_REVISION_2.to_le_bytes());
    table.extend_from_slice(&WIN_CERT_TYPE_PKCS.to_le_bytes());
    table.extend_from_slice(&signature);
    table.extend_from_slice(&[0u8; 8][..body_pad]);
    output.seek(SeekFrom::Start(end))?;
    output.write_all(&table)?;
    let total = u64::from(table_offset) + u64::from(table_size);
    let mut security_dir = [0u8; 8];
    security_dir[..4].copy_from_slice(&table_offset.to_le_bytes());
    security_dir[4..].copy_from_slice(&table_size.to_le_bytes());
    output.seek(SeekFrom::Start(image.security_dir_at()))?;
    output.write_all(&security_dir)?;
    let checksum = match copied.sum {
        Some(mut sum) => {
            sum.add(end, &table);
            sum.add(image.security_dir_at(), &security_dir);
            sum.checksum(total)
        }
        None => {
            if buf.is_empty() {
                *buf = buffer(total);
            }
            checksum(output, image.checksum_at(), total, buf)?
        }
    };
    output.seek(SeekFrom::Start(image.checksum_at()))?;
    output.write_all(&checksum.to_le_bytes())?;
    output.seek(SeekFrom::Start(total))?;
    output.flush()?;
    Ok(PeSigned {
        signature,
        table_offset,
        table_size,
        checksum,
        nested,
        kept: end,
        checksum_at: image.checksum_at(),
        security_dir_at: image.security_dir_at(),
    })
}

/// The Authenticode data blob of the PE file `input`: byte for byte what
/// `osslsigncode extract-data -h HASH [-ph] -in FILE` writes for it (a PKCS#7
/// SignedData without signers carrying the file's SpcIndirectDataContent), made in
/// one pass (two with page hashes) with a fixed buffer. A signed file's blob is its
/// unsigned self's: the signature is not hashed.
pub fn extract_blob<R: Read + Seek>(
    input: &mut R,
    hash: HashAlg,
    page_hashes: bool,
) -> Result<Vec<u8>, Error> {
    let image = PeImage::parse(input)?;
    blob_of(&image, input, hash, page_hashes)
}

/// [`extract_blob`]'s blob, and the SHA-256 of all the blob leaves out of the file:
/// the checksum field, the certificate table's directory entry and the certificate
/// table itself (a signed file's signature), each as it is in the file, taken in the
/// same pass. Two files with the same blob and the same rest are the same file.
pub fn extract_blob_and_rest<R: Read + Seek>(
    input: &mut R,
    hash: HashAlg,
    page_hashes: bool,
) -> Result<(Vec<u8>, [u8; 32]), Error> {
    let image = PeImage::parse(input)?;
    let blob = blob_of(&image, input, hash, page_hashes)?;
    let mut h = HashAlg::Sha256.hasher();
    let mut buf = buffer(image.len);
    let (cs, sd) = (image.checksum_at(), image.security_dir_at());
    for (from, to) in [(cs, cs + 4), (sd, sd + 8), (image.file_end(), image.len)] {
        // Each part's length first: the parts cannot run into each other.
        h.update(&(to - from).to_le_bytes());
        hash_range(input, &mut *h, from, to, &mut buf)?;
    }
    let mut rest = [0u8; 32];
    rest.copy_from_slice(&h.finalize());
    Ok((blob, rest))
}

fn blob_of<R: Read + Seek>(
    image: &PeImage,
    input: &mut R,
    hash: HashAlg,
    page_hashes: bool,
) -> Result<Vec<u8>, Error> {
    let indirect = image.indirect_data(input, hash, page_hashes)?;
    let signed_data = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::new(),
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: asn1::SPC_INDIRECT_DATA,
            econtent: Some(Any::from_der(&indirect)?),
        },
        certificates: None,
        crls: None,
        signer_infos: SignerInfos(SetOfVec::new()),
    };
    Ok(ContentInfo {
        content_type: asn1::SIGNED_DATA,
        content: Any::encode_from(&signed_data)?,
    }
    .to_der()?)
}

/// Puts `signature` (a DER PKCS#7 SignedData over a PE's SpcIndirectDataContent, as
/// [`crate::sign_blob`] makes it of [`extract_blob`]'s blob) into the PE file `input`
/// and writes the signed copy to `output`, in constant memory, as `osslsigncode
/// attach-signature [-nest]` does: replacing the file's signature, or with `nested`
/// beside it (inside the existing one; a file without one is signed plainly).
///
/// First checks that the signature is this file's ([`PeImage::check_signature`]):
/// one made for another file, or another version of it, is refused with
/// [`Error::WrongFile`] and nothing is written.
pub fn attach_pe<R: Read + Seek, W: Read + Write + Seek>(
    input: &mut R,
    output: &mut W,
    signature: &[u8],
    nested: bool,
) -> Result<PeSigned, Error> {
    let image = PeImage::parse(input)?;
    image.check_signature(input, signature)?;
    let existing = if nested {
        image.existing_signature(input)?
    } else {
        None
    };
    let nested = existing.is_some();
    let signature = match existing {
        Some(outer) => add_nested(&outer, signature)?,
        None => signature.to_vec(),
    };
    let mut buf = buffer(image.len);
    let copied = copy(&image, input, output, None, &mut buf)?;
    finish(&image, output, copied, signature, nested, &mut buf)
}

/// The PE checksum of the first `len` bytes of `r`, with the field at `at` taken as 0
/// (the two words at `at` when it is even, as osslsigncode takes it), read back.
pub(crate) fn checksum<R: Read + Seek>(
    r: &mut R,
    at: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<u32, Error> {
    r.seek(SeekFrom::Start(0))?;
    let mut sum = WordSum::default();
    let mut offset: u64 = 0;
    // Reads in even-sized chunks so words never straddle two reads.
    let even = buf.len() & !1;
    while offset < len {
        let n = (even as u64).min(len - offset) as usize;
        r.read_exact(&mut buf[..n])?;
        if at % 2 == 0 && at < offset + n as u64 && offset < at + 4 {
            // The field's bytes within this chunk count as 0.
            let from = at.max(offset);
            let to = (at + 4).min(offset + n as u64);
            buf[(from - offset) as usize..(to - offset) as usize].fill(0);
        }
        sum.add(offset, &buf[..n]);
        offset += n as u64;
    }
    Ok(sum.checksum(len))
}

/// The PE checksum's running sum: the file's 16-bit little-endian words added up, a
/// byte at an odd offset being a word's high byte. Kept whole (a PE file of 4 GiB has
/// 2^31 words, each below 2^16) and folded once at the end, which gives what the
/// word-by-word fold of osslsigncode and the PE specification gives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct WordSum(u64);

impl WordSum {
    /// Adds `bytes`, found at offset `at` of the file.
    fn add(&mut self, at: u64, bytes: &[u8]) {
        self.0 += word_sum(at, bytes);
    }

    /// Takes back `bytes` at `at`, added before.
    fn sub(&mut self, at: u64, bytes: &[u8]) {
        self.0 -= word_sum(at, bytes);
    }

    /// The checksum of a file of `len` bytes whose words these are.
    fn checksum(self, len: u64) -> u32 {
        // The fold after every word keeps the sum in 1..=0xffff once it is not 0,
        // congruent to the whole sum modulo 0xffff.
        let folded = if self.0 == 0 {
            0
        } else {
            ((self.0 - 1) % 0xffff + 1) as u32
        };
        folded.wrapping_add(len as u32)
    }
}

/// The words of `bytes` at offset `at` of a file, added up.
fn word_sum(at: u64, mut bytes: &[u8]) -> u64 {
    let mut total = 0u64;
    if at % 2 == 1 {
        if let Some((first, rest)) = bytes.split_first() {
            total += u64::from(*first) << 8;
            bytes = rest;
        }
    }
    // Blocks of 64 KiB sum in 32 bits (32768 words below 2^16 each), which the
    // compiler turns into vector additions.
    for block in bytes.chunks(64 << 10) {
        let mut words = block.chunks_exact(2);
        let s: u32 = words
            .by_ref()
            .map(|w| u32::from(u16::from_le_bytes([w[0], w[1]])))
            .sum();
        total += u64::from(s);
        if let [last] = words.remainder() {
            total += u64::from(*last);
        }
    }
    total
}

fn hash_range<R: Read + Seek>(
    r: &mut R,
    h: &mut dyn sha2::digest::DynDigest,
    from: u64,
    to: u64,
    buf: &mut [u8],
) -> Result<(), Error> {
    if to <= from {
        return Ok(());
    }
    r.seek(SeekFrom::Start(from))?;
    let mut left = to - from;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        r.read_exact(&mut buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}

fn zeros(h: &mut dyn sha2::digest::DynDigest, mut n: u64) {
    let z = [0u8; 4096];
    while n > 0 {
        let k = n.min(z.len() as u64) as usize;
        h.update(&z[..k]);
        n -= k as u64;
    }
}

fn read_at<R: Read + Seek>(r: &mut R, at: u64, n: usize) -> Result<Vec<u8>, Error> {
    r.seek(SeekFrom::Start(at))?;
    let mut v = vec![0u8; n];
    r.read_exact(&mut v).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            damaged(format!(
                "it ends before byte {} of its headers: the file is truncated; send the whole file",
                at + n as u64
            ))
        } else {
            Error::Io(e)
        }
    })?;
    Ok(v)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// The checksum as osslsigncode (and this crate before) computes it: folded after
    /// every word, the two words at `at` (when even) counted as 0.
    fn word_by_word(bytes: &[u8], at: u64) -> u32 {
        let mut sum: u32 = 0;
        for (i, w) in bytes.chunks(2).enumerate() {
            let offset = 2 * i as u64;
            let v = if offset == at || offset == at + 2 {
                0
            } else if w.len() == 2 {
                u32::from(u16::from_le_bytes([w[0], w[1]]))
            } else {
                u32::from(w[0])
            };
            sum += v;
            sum = 0xffff & (sum + (sum >> 16));
        }
        sum = 0xffff & (sum + (sum >> 16));
        sum.wrapping_add(bytes.len() as u32)
    }

    /// Bytes that look random enough, the same on every run.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn the_whole_sum_folded_once_is_the_word_by_word_checksum() {
        let mut cases: Vec<Vec<u8>> = vec![Vec::new(), vec![0; 7], vec![0xff; 300_001]];
        for (i, len) in [1usize, 2, 3, 64, 65, 4095, 70_000, 200_003]
            .iter()
            .enumerate()
        {
            cases.push(noise(*len, i as u64));
        }
        for bytes in &cases {
            for at in [0u64, 1, 6, 7, 88, 89, 65_534, 65_535, 1 << 40] {
                let mut buf = vec![0u8; 4096 + 2];
                let ours =
                    checksum(&mut Cursor::new(bytes), at, bytes.len() as u64, &mut buf).unwrap();
                assert_eq!(ours, word_by_word(bytes, at), "len {} at {at}", bytes.len());
            }
        }
    }

    /// A PE32 file that parses: `e_lfanew` where asked, one section, `body` bytes
    /// after the headers, and a certificate table of `sig` bytes at its end when given.
    fn pe(e_lfanew: u32, body: usize, sig: Option<usize>) -> Vec<u8> {
        let headers = 0x400usize;
        let mut f = noise(headers + body, u64::from(e_lfanew) + body as u64);
        f[..2].copy_from_slice(b"MZ");
        f[60..64].copy_from_slice(&e_lfanew.to_le_bytes());
        let pe = e_lfanew as usize;
        f[pe..pe + 4].copy_from_slice(b"PE\0\0");
        f[pe + 6..pe + 8].copy_from_slice(&1u16.to_le_bytes());
        f[pe + 20..pe + 22].copy_from_slice(&224u16.to_le_bytes());
        f[pe + 24..pe + 26].copy_from_slice(&0x10bu16.to_le_bytes());
        f[pe + 24 + 32..pe + 24 + 36].copy_from_slice(&0x1000u32.to_le_bytes());
        f[pe + 24 + 60..pe + 24 + 64].copy_from_slice(&(headers as u32).to_le_bytes());
        f[pe + 116..pe + 120].copy_from_slice(&16u32.to_le_bytes());
        let table = pe + 24 + 224;
        f[table + 16..table + 20].copy_from_slice(&(body as u32).to_le_bytes());
        f[table + 20..table + 24].copy_from_slice(&(headers as u32).to_le_bytes());
        let (pos, len) = match sig {
            Some(n) => {
                let pos = f.len();
                f.extend(noise(n, 99));
                (pos as u32, n as u32)
            }
            None => (0, 0),
        };
        f[pe + 152..pe + 156].copy_from_slice(&pos.to_le_bytes());
        f[pe + 156..pe + 160].copy_from_slice(&len.to_le_bytes());
        f
    }

    #[test]
    fn a_digester_fed_the_bytes_in_any_pieces_finds_what_the_scan_of_the_file_finds() {
        for (e_lfanew, body, sig) in [
            (0x80, 2 * BUF + 3, None),
            (0x81, 1001, None),
            (0x80, 4096, Some(123)),
            (0xf9, 17, Some(8)),
        ] {
            let file = pe(e_lfanew, body, sig);
            let image = PeImage::parse(&mut Cursor::new(&file)).unwrap();
            let mut buf = buffer(image.len);
            let scanned = scan(
                &image,
                &mut Cursor::new(&file),
                Some(HashAlg::Sha384),
                &mut buf,
                |_| Ok(()),
            )
            .unwrap();
            for piece in [1usize, 7, 4096, 65_537, file.len()] {
                let mut d = PeDigester::new(HashAlg::Sha384);
                for p in file.chunks(piece) {
                    d.update(p);
                }
                let done = d.finish().expect("a PE is digested");
                let known = done.for_image(&image, HashAlg::Sha384).unwrap();
                assert_eq!(known.digest, scanned.digest, "{e_lfanew:#x} in {piece}");
                assert_eq!(known.sum, scanned.sum, "{e_lfanew:#x} in {piece}");
                // Not for another hash, nor another file.
                assert!(done.for_image(&image, HashAlg::Sha256).is_none());
                let other = PeImage::parse(&mut Cursor::new(pe(e_lfanew, body + 8, sig))).unwrap();
                assert!(done.for_image(&other, HashAlg::Sha384).is_none());
            }
        }
        // What is not a PE, or whose headers are past 64 KiB, is given up.
        let mut d = PeDigester::new(HashAlg::Sha256);
        d.update(&noise(100_000, 1));
        assert!(d.finish().is_none());
        let mut far = noise(100_000, 2);
        far[..2].copy_from_slice(b"MZ");
        far[60..64].copy_from_slice(&0x2_0000u32.to_le_bytes());
        let mut d = PeDigester::new(HashAlg::Sha256);
        d.update(&far);
        assert!(d.finish().is_none());
    }

    #[test]
    fn the_one_pass_copy_writes_the_bytes_digest_and_checksum_of_the_reading_back() {
        for (e_lfanew, body, sig) in [
            (0x80, 3 * BUF + 5, None),
            (0x81, 1001, None),
            (0x80, 4096, Some(123)),
            (0xf9, 17, Some(8)),
            (0x80, 5000, Some(4000)),
        ] {
            let file = pe(e_lfanew, body, sig);
            let image = PeImage::parse(&mut Cursor::new(&file)).unwrap();
            let signature = noise(777, 5);
            let mut buf = buffer(image.len);
            let mut one_pass = Cursor::new(Vec::new());
            let copied = copy(
                &image,
                &mut Cursor::new(&file),
                &mut one_pass,
                Some(HashAlg::Sha256),
                &mut buf,
            )
            .unwrap();
            assert!(copied.sum.is_some());
            assert_eq!(
                copied.digest.as_deref(),
                Some(
                    &image
                        .digest(&mut Cursor::new(&file), HashAlg::Sha256)
                        .unwrap()[..]
                )
            );
            // The same copy, ended with the checksum read back.
            let mut read_back = one_pass.clone();
            let a = finish(
                &image,
                &mut one_pass,
                copied.clone(),
                signature.clone(),
                false,
                &mut buf,
            )
            .unwrap();
            let unsummed = Copied {
                sum: None,
                ..copied
            };
            let b = finish(&image, &mut read_back, unsummed, signature, false, &mut buf).unwrap();
            assert_eq!(a.checksum, b.checksum, "e_lfanew {e_lfanew:#x}");
            assert_eq!(
                one_pass.get_ref(),
                read_back.get_ref(),
                "e_lfanew {e_lfanew:#x}"
            );
            // The file itself read once and ended where it lies, then cut at the
            // table's end: the same bytes (over an old signature longer or shorter).
            let mut in_place = Cursor::new(file.clone());
            let scanned = scan(
                &image,
                &mut in_place,
                Some(HashAlg::Sha256),
                &mut buf,
                |_| Ok(()),
            )
            .unwrap();
            let c = finish(
                &image,
                &mut in_place,
                scanned,
                noise(777, 5),
                false,
                &mut buf,
            )
            .unwrap();
            let mut cut = in_place.into_inner();
            cut.truncate((u64::from(c.table_offset) + u64::from(c.table_size)) as usize);
            assert_eq!(&cut, one_pass.get_ref(), "e_lfanew {e_lfanew:#x}");
            // The checksum is that of the file before the field was written: at an
            // odd offset (no field osslsigncode leaves out) its bytes then were the
            // input's.
            let at = image.checksum_at() as usize;
            let mut before = one_pass.get_ref().clone();
            before[at..at + 4].copy_from_slice(&file[at..at + 4]);
            assert_eq!(
                a.checksum,
                word_by_word(&before, at as u64),
                "e_lfanew {e_lfanew:#x}"
            );
        }
    }

    /// An overlay reads as a file written the same way: over its bytes, past its end,
    /// with a gap, read back across the writes in pieces of any size.
    #[test]
    fn an_overlay_reads_as_a_file_written_the_same_way() {
        let base = noise(5000, 9);
        let mut file = Cursor::new(base.clone());
        let mut overlay = Overlay::new(&base);
        let writes: [(u64, Vec<u8>); 5] = [
            (100, noise(8, 1)),
            (4990, noise(40, 2)),
            (5100, noise(30, 3)),
            (104, noise(12, 4)),
            (0, noise(3, 5)),
        ];
        for (at, bytes) in &writes {
            for f in [&mut file as &mut dyn SeekWrite, &mut overlay] {
                f.seek(SeekFrom::Start(*at)).unwrap();
                f.write_all(bytes).unwrap();
            }
        }
        let want = file.into_inner();
        assert_eq!(overlay.seek(SeekFrom::End(0)).unwrap(), want.len() as u64);
        for piece in [1usize, 7, 100, 4096, 10_000] {
            overlay.seek(SeekFrom::Start(0)).unwrap();
            let mut got = Vec::new();
            let mut buf = vec![0xaa; piece];
            loop {
                let n = overlay.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert!(got == want, "read in pieces of {piece}");
        }
        assert!(overlay.seek(SeekFrom::Current(-1_000_000)).is_err());
    }

    trait SeekWrite: Seek + Write {}
    impl<T: Seek + Write> SeekWrite for T {}
}
