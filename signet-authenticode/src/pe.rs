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

/// The size of the buffer the file is read and copied with.
const BUF: usize = 1 << 20;
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
        let mut buf = vec![0u8; BUF];
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
        let mut buf = vec![0u8; BUF];
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
        let file = if page_hashes {
            let serialized = self.serialized_page_hashes(r)?;
            SpcLink::Moniker(SpcSerializedObject {
                class_id: OctetString::new(asn1::PAGE_HASHES_CLASS.to_vec())?,
                serialized_data: OctetString::new(serialized)?,
            })
        } else {
            SpcLink::File(SpcString::Unicode(BmpString::from_utf8("<<<Obsolete>>>")?))
        };
        let data = SpcPeImageData {
            // includeResources, as osslsigncode writes it (03 02 07 80).
            flags: BitString::new(7, vec![0x80])?,
            file: Some(file),
        };
        let digest = self.digest(r, hash)?;
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
}

/// Signs the PE file `input` as `options` say and writes the signed copy to `output`
/// (read back once for the checksum): the file up to its existing signature,
/// zero-padded to 8, then the certificate table (8-aligned) holding the new signature;
/// or, nested, the existing signature with the new one inside it.
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
    let indirect = image.indirect_data(input, options.hash, options.page_hashes)?;
    let ours = sign_with_sequence(&indirect, options, signer, sequence)?;
    let signature = match existing {
        Some(outer) => add_nested(&outer, &ours)?,
        None => ours,
    };

    embed(&image, input, output, signature, nested)
}

/// Writes `input` (laid out as `image`) to `output` with `signature` as its only
/// certificate table entry: the file up to its existing signature, zero-padded to 8,
/// then the certificate table (8-aligned), the security directory set and the checksum
/// recomputed (reading `output` back once). Constant memory: one buffer of [`BUF`].
fn embed<R: Read + Seek, W: Read + Write + Seek>(
    image: &PeImage,
    input: &mut R,
    output: &mut W,
    signature: Vec<u8>,
    nested: bool,
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

    output.seek(SeekFrom::Start(0))?;
    input.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; BUF];
    copy_exact(input, output, end, &mut buf)?;
    output.write_all(&[0u8; 8][..pad as usize])?;
    output.write_all(&table_size.to_le_bytes())?;
    output.write_all(&WIN_CERT_REVISION_2.to_le_bytes())?;
    output.write_all(&WIN_CERT_TYPE_PKCS.to_le_bytes())?;
    output.write_all(&signature)?;
    output.write_all(&[0u8; 8][..body_pad])?;
    let total = u64::from(table_offset) + u64::from(table_size);
    output.seek(SeekFrom::Start(image.security_dir_at()))?;
    output.write_all(&table_offset.to_le_bytes())?;
    output.write_all(&table_size.to_le_bytes())?;
    let checksum = checksum(output, image.checksum_at(), total, &mut buf)?;
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
    embed(&image, input, output, signature, nested)
}

/// The PE checksum of the first `len` bytes of `r`, with the field at `at` taken as 0.
pub(crate) fn checksum<R: Read + Seek>(
    r: &mut R,
    at: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<u32, Error> {
    r.seek(SeekFrom::Start(0))?;
    let mut sum: u32 = 0;
    let mut offset: u64 = 0;
    let mut left = len;
    // Reads in even-sized chunks so words never straddle two reads.
    let even = buf.len() & !1;
    while left > 0 {
        let n = (even as u64).min(left) as usize;
        r.read_exact(&mut buf[..n])?;
        for w in buf[..n].chunks(2) {
            let v = if offset == at || offset == at + 2 {
                0
            } else if w.len() == 2 {
                u32::from(u16::from_le_bytes([w[0], w[1]]))
            } else {
                u32::from(w[0])
            };
            sum += v;
            sum = 0xffff & (sum + (sum >> 16));
            offset += 2;
        }
        left -= n as u64;
    }
    sum = 0xffff & (sum + (sum >> 16));
    Ok(sum.wrapping_add(len as u32))
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

fn copy_exact<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    len: u64,
    buf: &mut [u8],
) -> Result<(), Error> {
    let mut left = len;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        r.read_exact(&mut buf[..n])?;
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
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
