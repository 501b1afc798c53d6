//! The native engine against the real osslsigncode, with one SoftHSM key: for each
//! file of the corpus and each option set, sign natively (a logged-in cryptoki session
//! as the RawSigner) and with osslsigncode (its PKCS#11 engine), then parse both
//! outputs and compare them; and `osslsigncode verify` every native output.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use cms::signed_data::SignedData;
use der::{Decode, Encode};
use sha2::Digest;
use signet_authenticode::{
    asn1, attach_pe, extract_blob, extract_blob_and_rest, sign_blob, sign_pe, sign_pe_in_memory,
    sign_pe_in_place, sign_pe_in_place_digested, verify_chain, verify_signature, Error, HashAlg,
    KeyKind, PeDigester, PeImage, SignOptions, Statement,
};
use signet_test_support::{World, PIN, SOFTHSM};

use common::{
    assert_same_embedding, assert_same_signature, hex, os, pe_signature, run, sign_args,
    signed_data, Token, TokenSigner,
};

/// The token's keys: the fixture's RSA-3072 one, and EC keys on P-256 and P-384 made
/// here, each with a self-signed code-signing certificate of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Rsa,
    P256,
    P384,
}

impl Key {
    fn label(self) -> &'static str {
        match self {
            Key::Rsa => "signkey",
            Key::P256 => "ec256",
            Key::P384 => "ec384",
        }
    }
}

/// One token for the whole test process.
struct Env {
    token: Token,
    signer: TokenSigner,
    p256: TokenSigner,
    p384: TokenSigner,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let world = World::new().shared_for_the_process();
        std::fs::copy(world.path("cert.pem"), world.path("signkey.pem")).unwrap();
        make_ec_key(&world, "EC:prime256v1", "02", "ec256", "sha256");
        make_ec_key(&world, "EC:secp384r1", "03", "ec384", "sha384");
        let token = Token::open(world);
        Env {
            signer: token.signer(Key::Rsa.label(), KeyKind::Rsa),
            p256: token.signer(Key::P256.label(), KeyKind::EcdsaP256),
            p384: token.signer(Key::P384.label(), KeyKind::EcdsaP384),
            token,
        }
    })
}

/// An EC key pair on the token and a self-signed code-signing certificate made with
/// it (OpenSSL's PKCS#11 engine), the certificate also on the token and in LABEL.pem.
fn make_ec_key(world: &World, kind: &str, id: &str, label: &str, digest: &str) {
    let p11 = |args: &[&str]| {
        run(Command::new("pkcs11-tool")
            .args([
                "--module",
                SOFTHSM,
                "--token-label",
                "signet-demo",
                "--login",
                "--pin",
                PIN,
            ])
            .args(args)
            .env("SOFTHSM2_CONF", world.softhsm_conf()));
    };
    p11(&[
        "--keypairgen",
        "--key-type",
        kind,
        "--id",
        id,
        "--label",
        label,
    ]);
    let pem = world.path(&format!("{label}.pem"));
    let der = world.path(&format!("{label}.der"));
    run(Command::new("openssl")
        .args(["req", "-new", "-x509", "-days", "30", &format!("-{digest}")])
        .args(["-engine", "pkcs11", "-keyform", "engine", "-key"])
        .arg(format!(
            "pkcs11:token=signet-demo;object={label};type=private;pin-value={PIN}"
        ))
        .args(["-subj", &format!("/CN=Signet Test {label}/O=Signet")])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "keyUsage=critical,digitalSignature"])
        .args(["-addext", "extendedKeyUsage=codeSigning"])
        .arg("-out")
        .arg(&pem)
        .env("PKCS11_MODULE_PATH", SOFTHSM)
        .env("SOFTHSM2_CONF", world.softhsm_conf()));
    run(Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(&pem)
        .arg("-out")
        .arg(&der));
    p11(&[
        "--write-object",
        der.to_str().unwrap(),
        "--type",
        "cert",
        "--id",
        id,
        "--label",
        label,
    ]);
}

fn key_signer(key: Key) -> &'static TokenSigner {
    let e = env();
    match key {
        Key::Rsa => &e.signer,
        Key::P256 => &e.p256,
        Key::P384 => &e.p384,
    }
}

fn osslsigncode(args: &[&std::ffi::OsStr]) -> String {
    env().token.osslsigncode_ok(args)
}

/// `osslsigncode sign` with the token's key (as the agent's osslsigncode backend runs it).
fn ossl_sign(input: &Path, output: &Path, o: &SignOptions) {
    ossl_sign_with(Key::Rsa, input, output, o)
}

fn ossl_sign_with(key: Key, input: &Path, output: &Path, o: &SignOptions) {
    env()
        .token
        .ossl_sign(key.label(), input, output, &sign_args(o));
}

/// `osslsigncode verify` against the fixture certificate, requiring its leaf hash.
fn verify(file: &Path) {
    verify_with(Key::Rsa, file)
}

fn verify_with(key: Key, file: &Path) {
    let e = env();
    let leaf = format!(
        "sha256:{}",
        hex(&sha2::Sha256::digest(&key_signer(key).cert))
    );
    let ca = e.token.world.path(&format!("{}.pem", key.label()));
    let text = osslsigncode(&[
        os("verify"),
        os("-CAfile"),
        ca.as_os_str(),
        os("-require-leaf-hash"),
        os(&leaf),
        os("-in"),
        file.as_os_str(),
    ]);
    assert!(text.contains("Succeeded"), "{text}");
    assert!(!text.contains("MISMATCH"), "{text}");
}

/// A fixture made once per process.
fn fixture(name: &str, make: impl FnOnce(&Path)) -> PathBuf {
    env().token.fixture(name, make)
}

/// The corpus: PE32+ and PE32 programs, a DLL, a larger program (several buffers), a
/// kernel driver; each also signed (`signed-NAME`) and signed twice (`nested-NAME`).
fn corpus(name: &str) -> PathBuf {
    if let Some(p) = env().token.unsigned(name) {
        return p;
    }
    match name {
        signed if signed.starts_with("signed-") => {
            let base = corpus(&signed["signed-".len()..]);
            fixture(name, |p| {
                ossl_sign(&base, p, &SignOptions::new(HashAlg::Sha256))
            })
        }
        nested if nested.starts_with("nested-") => {
            let base = corpus(&format!("signed-{}", &nested["nested-".len()..]));
            fixture(name, |p| {
                let mut o = SignOptions::new(HashAlg::Sha384);
                o.nested = true;
                ossl_sign(&base, p, &o)
            })
        }
        other => panic!("no corpus file {other}"),
    }
}

fn options(hash: HashAlg, page_hashes: bool, nested: bool) -> SignOptions {
    let mut o = SignOptions::new(hash);
    o.description = Some("Signet test".into());
    o.url = Some("https://signet.example/".into());
    o.page_hashes = page_hashes;
    o.nested = nested;
    o
}

/// The nested signatures inside `sd`'s first signer.
fn nested_of(sd: &SignedData) -> Vec<Vec<u8>> {
    let si = sd.signer_infos.0.get(0).unwrap();
    let Some(attrs) = si.unsigned_attrs.as_ref() else {
        return Vec::new();
    };
    attrs
        .iter()
        .filter(|a| a.oid == asn1::SPC_NESTED_SIGNATURE)
        .flat_map(|a| a.values.iter().map(|v| v.to_der().unwrap()))
        .collect()
}

/// The PE checksum of `bytes`, computed here on its own.
fn pe_checksum(bytes: &[u8]) -> u32 {
    let at = u32::from_le_bytes(bytes[60..64].try_into().unwrap()) as usize + 88;
    let mut sum: u64 = 0;
    for (i, w) in bytes.chunks(2).enumerate() {
        if i * 2 == at || i * 2 == at + 2 {
            continue;
        }
        let v = if w.len() == 2 {
            u16::from_le_bytes([w[0], w[1]])
        } else {
            u16::from(w[0])
        };
        sum += u64::from(v);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    (sum as u32).wrapping_add(bytes.len() as u32)
}

/// (security directory offset, size, checksum field) of a PE in memory.
fn layout(bytes: &[u8]) -> (u32, u32, u32) {
    let pe = u32::from_le_bytes(bytes[60..64].try_into().unwrap()) as usize;
    let plus = u16::from_le_bytes([bytes[pe + 24], bytes[pe + 25]]) == 0x20b;
    let sd = pe + 152 + if plus { 16 } else { 0 };
    let u = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    (u(sd), u(sd + 4), u(pe + 88))
}

/// Signs `input` natively and with osslsigncode and compares everything.
fn compare_pe(input_name: &str, hash: HashAlg, page_hashes: bool, nested: bool) {
    compare_pe_with(Key::Rsa, input_name, hash, page_hashes, nested)
}

fn compare_pe_with(key: Key, input_name: &str, hash: HashAlg, page_hashes: bool, nested: bool) {
    let e = env();
    let signer = key_signer(key);
    let input = corpus(input_name);
    let has_signature = input_name.starts_with("signed-") || input_name.starts_with("nested-");
    let tag = format!(
        "{}-{input_name}-{}-{}-{}",
        key.label(),
        hash.as_str(),
        if page_hashes { "ph" } else { "noph" },
        if nested { "nest" } else { "plain" }
    );
    let native = e.token.world.path(&format!("native-{tag}"));
    let reference = e.token.world.path(&format!("ossl-{tag}"));
    let o = options(hash, page_hashes, nested);
    let before = *signer.signs.lock().unwrap();
    {
        let mut i = File::open(&input).unwrap();
        let mut out = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&native)
            .unwrap();
        let signed = sign_pe(&mut i, &mut out, &o, signer).unwrap();
        assert_eq!(signed.nested, nested && has_signature);
    }
    assert!(*signer.signs.lock().unwrap() > before);
    // Signed where it lies (as the agent signs its spooled input), the file is the
    // same: byte for byte with a (deterministic) RSA signature, else up to the
    // signature's length and what follows from it. Also with the digest and checksum
    // made as the file's bytes were written (the agent's spool).
    for digested in [false, true] {
        let in_place = e.token.world.path(&format!("in-place-{digested}-{tag}"));
        std::fs::copy(&input, &in_place).unwrap();
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&in_place)
            .unwrap();
        let signed = if digested {
            let mut d = PeDigester::new(hash);
            for piece in std::fs::read(&input).unwrap().chunks(100_003) {
                d.update(piece);
            }
            let d = d
                .finish()
                .expect("the corpus's PEs are digested as written");
            let image = PeImage::parse(&mut File::open(&input).unwrap()).unwrap();
            assert!(
                d.fits(&image, hash),
                "{tag}: the digester read another layout"
            );
            sign_pe_in_place_digested(&mut f, &o, signer, Some(&d)).unwrap()
        } else {
            sign_pe_in_place(&mut f, &o, signer).unwrap()
        };
        assert_eq!(signed.nested, nested && has_signature);
        f.set_len(u64::from(signed.table_offset) + u64::from(signed.table_size))
            .unwrap();
        drop(f);
        let (copied, in_place) = (
            std::fs::read(&native).unwrap(),
            std::fs::read(&in_place).unwrap(),
        );
        // What the agent answers instead of the signed file: the input's first `kept`
        // bytes with the checksum and the security directory entry written over, then
        // the rest of the signed file.
        let original = std::fs::read(&input).unwrap();
        let kept = usize::try_from(signed.kept).unwrap();
        assert!(kept <= original.len() && kept <= in_place.len(), "{tag}");
        let mut made = original[..kept].to_vec();
        let fields = [(signed.checksum_at, 4), (signed.security_dir_at, 8)];
        for (at, n) in fields {
            let at = usize::try_from(at).unwrap();
            assert!(at + n <= kept, "{tag}: a header field after the content");
            made[at..at + n].copy_from_slice(&in_place[at..at + n]);
        }
        made.extend_from_slice(&in_place[kept..]);
        assert!(made == in_place, "{tag}: PeSigned does not tell the change");
        let field = |at: u64, n: usize| in_place[at as usize..at as usize + n].to_vec();
        assert_eq!(
            field(signed.checksum_at, 4),
            signed.checksum.to_le_bytes(),
            "{tag}"
        );
        let mut dir = signed.table_offset.to_le_bytes().to_vec();
        dir.extend_from_slice(&signed.table_size.to_le_bytes());
        assert_eq!(field(signed.security_dir_at, 8), dir, "{tag}");
        if key == Key::Rsa {
            assert!(
                copied == in_place,
                "{tag}: sign_pe_in_place wrote another file"
            );
        } else {
            let at = signed.table_offset as usize;
            let pe = u32::from_le_bytes(copied[60..64].try_into().unwrap()) as usize;
            let plus = u16::from_le_bytes([copied[pe + 24], copied[pe + 25]]) == 0x20b;
            let size_at = pe + 156 + if plus { 16 } else { 0 };
            let blank = |v: &[u8]| {
                let mut v = v[..at].to_vec();
                v[pe + 88..pe + 92].fill(0);
                v[size_at..size_at + 4].fill(0);
                v
            };
            assert!(
                blank(&copied) == blank(&in_place),
                "{tag}: sign_pe_in_place wrote another file"
            );
            assert_eq!(
                layout(&in_place).2,
                pe_checksum(&in_place),
                "{tag}: checksum wrong in place"
            );
        }
    }
    // Signed held in memory (as the agent signs an input of up to 1 MiB), without a
    // copy, digested as it arrived or not: the input's first `kept` bytes with the
    // two fields, then the tail, are the same file, byte for byte with a
    // (deterministic) RSA signature, else up to the certificate table with its
    // checksum right.
    for digested in [false, true] {
        let original = std::fs::read(&input).unwrap();
        let d = digested.then(|| {
            let mut d = PeDigester::new(hash);
            for piece in original.chunks(65_521) {
                d.update(piece);
            }
            d.finish()
                .expect("the corpus's PEs are digested as they arrive")
        });
        let (signed, tail) = sign_pe_in_memory(&original, &o, signer, d.as_ref()).unwrap();
        assert_eq!(signed.nested, nested && has_signature);
        let mut memory = original[..signed.kept as usize].to_vec();
        let at = signed.checksum_at as usize;
        memory[at..at + 4].copy_from_slice(&signed.checksum.to_le_bytes());
        let at = signed.security_dir_at as usize;
        memory[at..at + 4].copy_from_slice(&signed.table_offset.to_le_bytes());
        memory[at + 4..at + 8].copy_from_slice(&signed.table_size.to_le_bytes());
        memory.extend_from_slice(&tail);
        assert_eq!(
            memory.len(),
            (signed.table_offset + signed.table_size) as usize,
            "{tag}: the tail does not end at the table's end"
        );
        let copied = std::fs::read(&native).unwrap();
        if key == Key::Rsa {
            assert!(copied == memory, "{tag}: signed in memory, another file");
        } else {
            let at = signed.table_offset as usize;
            let pe = u32::from_le_bytes(copied[60..64].try_into().unwrap()) as usize;
            assert!(
                copied[..pe + 88] == memory[..pe + 88],
                "{tag}: signed in memory, another file"
            );
            assert_eq!(memory.len(), at + signed.table_size as usize);
            assert_eq!(
                layout(&memory).2,
                pe_checksum(&memory),
                "{tag}: checksum wrong in memory"
            );
        }
    }
    // osslsigncode refuses to nest in a file without a signature; the agent then
    // signs plainly, which is what the native engine does on its own.
    let mut reference_options = o.clone();
    reference_options.nested = nested && has_signature;
    ossl_sign_with(key, &input, &reference, &reference_options);

    let nb = std::fs::read(&native).unwrap();
    let rb = std::fs::read(&reference).unwrap();
    // The same embedding: length, security directory, padding, and everything before
    // the certificate table but the checksum.
    // (An ECDSA signature's DER length varies by a byte or two from one to the next.)
    let (n_off, n_size, n_sum) = layout(&nb);
    let (r_off, r_size, r_sum) = layout(&rb);
    assert_eq!(n_off, r_off, "{tag}: security directory differs");
    if key == Key::Rsa {
        assert_eq!(nb.len(), rb.len(), "{tag}: lengths differ");
        assert_eq!(n_size, r_size, "{tag}: security directory differs");
    }
    assert_eq!(n_off % 8, 0);
    assert_eq!(n_off as usize + n_size as usize, nb.len());
    let pe = u32::from_le_bytes(nb[60..64].try_into().unwrap()) as usize;
    let mut a = nb[..n_off as usize + 8].to_vec();
    let mut b = rb[..r_off as usize + 8].to_vec();
    a[pe + 88..pe + 92].fill(0);
    b[pe + 88..pe + 92].fill(0);
    if key != Key::Rsa {
        // The sizes that follow the ECDSA signature's length: the security
        // directory's and the certificate table's own.
        let plus = u16::from_le_bytes([nb[pe + 24], nb[pe + 25]]) == 0x20b;
        let size_at = pe + 156 + if plus { 16 } else { 0 };
        for v in [&mut a, &mut b] {
            v[size_at..size_at + 4].fill(0);
            v[n_off as usize..n_off as usize + 4].fill(0);
        }
    }
    assert!(a == b, "{tag}: the files differ before the signature");
    assert_eq!(n_sum, pe_checksum(&nb), "{tag}: native checksum wrong");
    assert_eq!(r_sum, pe_checksum(&rb), "{tag}: reference checksum wrong");

    let ns = pe_signature(&native);
    let rs = pe_signature(&reference);
    // The DER is padded with zeros to 8 in the table.
    assert_eq!(n_size as usize, 8 + ns.len().div_ceil(8) * 8);
    if nested && has_signature {
        let old = pe_signature(&input);
        let (nsd, rsd) = (signed_data(&ns), signed_data(&rs));
        let strip = |mut sd: SignedData| {
            let mut infos = sd.signer_infos.0.into_vec();
            infos[0].unsigned_attrs = None;
            sd.signer_infos = cms::signed_data::SignerInfos(infos.try_into().unwrap());
            sd.to_der().unwrap()
        };
        // The outer signature is the one the file had.
        assert_eq!(strip(nsd.clone()), strip(signed_data(&old)));
        // The nested ones it had are kept, and one is added.
        let had = nested_of(&signed_data(&old));
        let added = |sd: &SignedData| {
            let all = nested_of(sd);
            assert_eq!(all.len(), had.len() + 1, "{tag}: nested signatures");
            for h in &had {
                assert!(all.contains(h), "{tag}: a nested signature was lost");
            }
            all.into_iter().find(|n| !had.contains(n)).unwrap()
        };
        assert_same_signature(&added(&nsd), &added(&rsd));
    } else {
        assert_same_signature(&ns, &rs);
    }
    verify_with(key, &native);
    // The world outlives the tests (it is the process's): keep /tmp small.
    let _ = std::fs::remove_file(&native);
    let _ = std::fs::remove_file(&reference);
}

macro_rules! pe_case {
    ($name:ident, $file:expr, $hash:ident, $ph:expr, $nest:expr) => {
        #[test]
        fn $name() {
            compare_pe($file, HashAlg::$hash, $ph, $nest);
        }
    };
}

pe_case!(pe32plus_sha256, "pe32plus.exe", Sha256, false, false);
pe_case!(pe32plus_sha256_ph, "pe32plus.exe", Sha256, true, false);
pe_case!(pe32plus_sha384, "pe32plus.exe", Sha384, false, false);
pe_case!(pe32plus_sha512_ph, "pe32plus.exe", Sha512, true, false);
pe_case!(pe32_sha256, "pe32.exe", Sha256, false, false);
pe_case!(pe32_sha384_ph, "pe32.exe", Sha384, true, false);
pe_case!(dll_sha256_ph, "lib.dll", Sha256, true, false);
pe_case!(dll_sha512, "lib.dll", Sha512, false, false);
pe_case!(big_sha256_ph, "big.exe", Sha256, true, false);
pe_case!(driver_sha256_ph, "driver.sys", Sha256, true, false);
pe_case!(driver_sha384, "driver.sys", Sha384, false, false);
pe_case!(
    signed_driver_nest_sha512_ph,
    "signed-driver.sys",
    Sha512,
    true,
    true
);
pe_case!(
    signed_replace_sha256,
    "signed-pe32plus.exe",
    Sha256,
    false,
    false
);
pe_case!(
    signed_nest_sha256,
    "signed-pe32plus.exe",
    Sha256,
    false,
    true
);
pe_case!(
    signed_nest_sha384_ph,
    "signed-pe32plus.exe",
    Sha384,
    true,
    true
);
pe_case!(
    signed_pe32_nest_sha512,
    "signed-pe32.exe",
    Sha512,
    false,
    true
);
pe_case!(
    signed_dll_nest_sha256_ph,
    "signed-lib.dll",
    Sha256,
    true,
    true
);
pe_case!(
    second_nest_sha256_ph,
    "nested-pe32plus.exe",
    Sha256,
    true,
    true
);
#[test]
fn ecdsa_p256_pe32plus_sha256_ph() {
    compare_pe_with(Key::P256, "pe32plus.exe", HashAlg::Sha256, true, false);
}

#[test]
fn ecdsa_p384_pe32_sha384() {
    compare_pe_with(Key::P384, "pe32.exe", HashAlg::Sha384, false, false);
}

#[test]
fn ecdsa_p256_nest_in_rsa_sha512() {
    compare_pe_with(Key::P256, "signed-lib.dll", HashAlg::Sha512, false, true);
}

pe_case!(unsigned_nest_is_plain, "pe32plus.exe", Sha256, false, true);

/// Digest mode, and the native agent path for MSI, CAB and PowerShell files:
/// `osslsigncode extract-data`, the native engine signs the blob, `osslsigncode
/// attach-signature` puts it in, `osslsigncode verify` passes; the signature is the one
/// `osslsigncode sign` makes of the whole file (but the time), and so is where it is put.
fn compare_blob(input_name: &str, hash: HashAlg, page_hashes: bool, nest: bool) {
    let e = env();
    let input = corpus(input_name);
    let tag = format!(
        "blob-{input_name}-{}-{}-{}",
        hash.as_str(),
        if page_hashes { "ph" } else { "noph" },
        if nest { "nest" } else { "plain" }
    );
    let mut o = options(hash, page_hashes, false);
    o.statement = Statement::Commercial;
    // osslsigncode goes by the name's extension too (a script's output needs .ps1).
    let ext = input_name.rsplit('.').next().unwrap();
    let attached = e.token.world.path(&format!("{tag}-attached.{ext}"));
    let mut blob = Vec::new();
    let sig = e
        .token
        .native_through_blob(&input, &attached, hash, page_hashes, nest, |b| {
            blob = b.to_vec();
            sign_blob(b, &o, &e.signer).unwrap()
        });
    verify(&attached);

    // The blob's content is signed as it is.
    let mut reader = der::SliceReader::new(&blob).unwrap();
    let blob_sd: SignedData = cms::content_info::ContentInfo::decode(&mut reader)
        .unwrap()
        .content
        .decode_as()
        .unwrap();
    assert_eq!(
        common::content_der(&blob_sd),
        common::content_der(&signed_data(&sig))
    );
    let ca = e.token.world.path("cert.pem");
    if nest {
        let text = osslsigncode(&[
            os("verify"),
            os("-CAfile"),
            ca.as_os_str(),
            os("-in"),
            attached.as_os_str(),
        ]);
        assert!(text.contains("Number of verified signatures: 2"), "{text}");
        return;
    }
    let reference = e.token.world.path(&format!("{tag}-ossl.{ext}"));
    ossl_sign(&input, &reference, &o);
    assert_same_signature(&sig, &e.token.ossl_signature(&reference));
    // What the agent answers is what osslsigncode would have written, but the
    // signature's bytes: the same file around it, the same encoding and place.
    if input_name.ends_with(".exe") || input_name.ends_with(".sys") {
        assert_same_signature(&pe_signature(&attached), &pe_signature(&reference));
    } else {
        assert_same_embedding(&attached, &reference, sig.len());
    }
    assert_eq!(
        e.token.ossl_signature(&attached),
        sig,
        "{tag}: the signature attached is the engine's, unchanged"
    );
    let _ = std::fs::remove_file(&attached);
    let _ = std::fs::remove_file(&reference);
}

macro_rules! blob_case {
    ($name:ident, $file:expr, $hash:ident, $ph:expr, $nest:expr) => {
        #[test]
        fn $name() {
            compare_blob($file, HashAlg::$hash, $ph, $nest);
        }
    };
}

blob_case!(blob_pe_sha256, "pe32plus.exe", Sha256, false, false);
blob_case!(blob_pe_sha384_ph, "pe32plus.exe", Sha384, true, false);
blob_case!(blob_pe32_sha512_ph, "pe32.exe", Sha512, true, false);
blob_case!(blob_pe_nest, "signed-pe32plus.exe", Sha256, false, true);
blob_case!(blob_driver_sha256_ph, "driver.sys", Sha256, true, false);
blob_case!(blob_msi_sha256, "a.msi", Sha256, false, false);
blob_case!(blob_msi_sha512, "a.msi", Sha512, false, false);
blob_case!(blob_cab_sha256, "a.cab", Sha256, false, false);
blob_case!(blob_cab_sha384, "a.cab", Sha384, false, false);
blob_case!(blob_ps1_utf8_sha256, "utf8.ps1", Sha256, false, false);
blob_case!(blob_ps1_utf8_sha512, "utf8.ps1", Sha512, false, false);
blob_case!(
    blob_ps1_utf8_bom_sha256,
    "utf8bom.ps1",
    Sha256,
    false,
    false
);
blob_case!(
    blob_ps1_utf8_bom_sha384,
    "utf8bom.ps1",
    Sha384,
    false,
    false
);
blob_case!(blob_ps1_utf16_sha256, "utf16.ps1", Sha256, false, false);
blob_case!(blob_ps1_utf16_sha512, "utf16.ps1", Sha512, false, false);

/// Each PowerShell encoding keeps its encoding signed: the script's bytes come first,
/// unchanged, and the signature block follows in the same encoding (UTF-16LE for a
/// UTF-16 script), as osslsigncode writes it.
#[test]
fn powershell_scripts_keep_their_encoding() {
    let e = env();
    for (name, utf16) in [
        ("utf8.ps1", false),
        ("utf8bom.ps1", false),
        ("utf16.ps1", true),
    ] {
        let input = corpus(name);
        let attached = e.token.world.path(&format!("enc-{name}"));
        e.token
            .native_through_blob(&input, &attached, HashAlg::Sha256, false, false, |b| {
                sign_blob(b, &SignOptions::new(HashAlg::Sha256), &e.signer).unwrap()
            });
        let original = std::fs::read(&input).unwrap();
        let signed = std::fs::read(&attached).unwrap();
        assert!(signed.starts_with(&original), "{name}: the script is kept");
        let block = &signed[original.len()..];
        let text = if utf16 {
            let units: Vec<u16> = block
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).unwrap()
        } else {
            String::from_utf8(block.to_vec()).unwrap()
        };
        assert!(
            text.contains("# SIG # Begin signature block")
                && text.contains("# SIG # End signature block"),
            "{name}: {text}"
        );
        verify(&attached);
        let _ = std::fs::remove_file(&attached);
    }
}

/// What is not a blob is refused with how to make one.
#[test]
fn not_a_blob() {
    let e = env();
    let err = sign_blob(
        b"\x30\x03\x02\x01\x01",
        &SignOptions::new(HashAlg::Sha256),
        &e.signer,
    )
    .unwrap_err();
    assert!(err.to_string().contains("extract-data"), "{err}");
    let pe = std::fs::read(corpus("pe32plus.exe")).unwrap();
    assert!(sign_blob(&pe, &SignOptions::new(HashAlg::Sha256), &e.signer).is_err());
}

/// Damaged PE files are refused with what is wrong and what to do.
#[test]
fn damaged_pe_is_refused() {
    let e = env();
    let good = std::fs::read(corpus("pe32plus.exe")).unwrap();
    let signed = std::fs::read(corpus("signed-pe32plus.exe")).unwrap();
    let pe = u32::from_le_bytes(good[60..64].try_into().unwrap()) as usize;
    let mut bad_magic = good.clone();
    bad_magic[pe + 24] = 0x07;
    let mut no_pe = good.clone();
    no_pe[pe] = b'X';
    let mut trailing = signed.clone();
    trailing.extend_from_slice(b"appended");
    for (bytes, says) in [
        (good[..40].to_vec(), "shorter than a DOS header"),
        (b"ZM".repeat(64), "does not start with \"MZ\""),
        (good[..pe + 100].to_vec(), "truncated"),
        (bad_magic, "neither PE32"),
        (no_pe, "no \"PE\\0\\0\""),
        (trailing, "not at the end of the file"),
    ] {
        let mut out = std::io::Cursor::new(Vec::new());
        let err = sign_pe(
            &mut std::io::Cursor::new(bytes),
            &mut out,
            &SignOptions::new(HashAlg::Sha256),
            &e.signer,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains(says), "{text}");
        assert!(text.contains("damaged"), "{text}");
        assert!(
            out.get_ref().is_empty(),
            "nothing is written for a damaged file"
        );
    }
}

/// A certificate file is PEM (one or more, the signer's first) or one DER certificate.
#[test]
fn certificate_files_are_pem_or_der() {
    let e = env();
    let pem = std::fs::read(e.token.world.path("cert.pem")).unwrap();
    let ec = std::fs::read(e.token.world.path("ec256.pem")).unwrap();
    assert_eq!(
        signet_authenticode::certificates(&pem).unwrap(),
        vec![e.signer.cert.clone()]
    );
    assert_eq!(
        signet_authenticode::certificates(&[pem, ec].concat()).unwrap(),
        vec![e.signer.cert.clone(), e.p256.cert.clone()]
    );
    assert_eq!(
        signet_authenticode::certificates(&e.signer.cert).unwrap(),
        vec![e.signer.cert.clone()]
    );
    let err = signet_authenticode::certificates(b"not a certificate").unwrap_err();
    assert!(
        err.to_string().contains("give the signer's certificate"),
        "{err}"
    );
}

/// `extract_blob` writes what `osslsigncode extract-data` writes, byte for byte: PE32
/// and PE32+, a DLL, a file of several buffers, signed and nested-signed files, each
/// hash, with and without page hashes.
#[test]
fn extract_blob_is_osslsigncodes() {
    let e = env();
    for name in [
        "pe32plus.exe",
        "pe32.exe",
        "lib.dll",
        "driver.sys",
        "big.exe",
        "signed-pe32.exe",
        "nested-pe32plus.exe",
    ] {
        let input = corpus(name);
        for hash in [HashAlg::Sha256, HashAlg::Sha384, HashAlg::Sha512] {
            for ph in [false, true] {
                let tag = format!("extract-{name}-{}-{ph}", hash.as_str());
                let reference = e.token.world.path(&format!("{tag}.p7"));
                let mut a = vec![os("extract-data"), os("-h"), os(hash.as_str())];
                if ph {
                    a.push(os("-ph"));
                }
                a.extend([
                    os("-in"),
                    input.as_os_str(),
                    os("-out"),
                    reference.as_os_str(),
                ]);
                osslsigncode(&a);
                let native = extract_blob(&mut File::open(&input).unwrap(), hash, ph).unwrap();
                assert!(
                    native == std::fs::read(&reference).unwrap(),
                    "{tag}: the blobs differ"
                );
                let _ = std::fs::remove_file(&reference);
            }
        }
    }
}

/// Digest mode without osslsigncode: the native blob signed, then `attach_pe` writes
/// the very bytes `osslsigncode attach-signature [-nest]` writes with that signature;
/// `osslsigncode verify` passes, and so do the engine's own checks.
fn compare_attach(key: Key, input_name: &str, hash: HashAlg, page_hashes: bool, nest: bool) {
    let e = env();
    let signer = key_signer(key);
    let input = corpus(input_name);
    let has_signature = input_name.starts_with("signed-") || input_name.starts_with("nested-");
    let tag = format!(
        "attach-{}-{input_name}-{}-{page_hashes}-{nest}",
        key.label(),
        hash.as_str()
    );
    let blob = extract_blob(&mut File::open(&input).unwrap(), hash, page_hashes).unwrap();
    let sig = sign_blob(&blob, &options(hash, page_hashes, false), signer).unwrap();
    let sig_path = e.token.world.path(&format!("{tag}.p7"));
    std::fs::write(&sig_path, &sig).unwrap();

    let native = e.token.world.path(&format!("{tag}-native.exe"));
    let signed = {
        let mut out = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&native)
            .unwrap();
        attach_pe(&mut File::open(&input).unwrap(), &mut out, &sig, nest).unwrap()
    };
    assert_eq!(signed.nested, nest && has_signature, "{tag}");

    let reference = e.token.world.path(&format!("{tag}-ossl.exe"));
    let ca = e.token.world.path(&format!("{}.pem", key.label()));
    let mut a = vec![
        os("attach-signature"),
        os("-sigin"),
        sig_path.as_os_str(),
        os("-CAfile"),
        ca.as_os_str(),
    ];
    // osslsigncode refuses to nest in a file without a signature; the client then
    // attaches plainly, which is what attach_pe does on its own.
    if nest && has_signature {
        a.push(os("-nest"));
    }
    a.extend([
        os("-in"),
        input.as_os_str(),
        os("-out"),
        reference.as_os_str(),
    ]);
    osslsigncode(&a);
    assert!(
        std::fs::read(&native).unwrap() == std::fs::read(&reference).unwrap(),
        "{tag}: attach_pe and osslsigncode attach-signature wrote different files"
    );
    verify_with(key, &native);
    let mut f = File::open(&native).unwrap();
    let image = PeImage::parse(&mut f).unwrap();
    let expected = if nest && has_signature {
        1 + nested_of(&signed_data(&pe_signature(&input))).len() + 1
    } else {
        1
    };
    assert_eq!(image.check_signatures(&mut f).unwrap(), expected, "{tag}");
    for p in [&native, &reference, &sig_path] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn attach_pe32plus_sha256() {
    compare_attach(Key::Rsa, "pe32plus.exe", HashAlg::Sha256, false, false);
}

#[test]
fn attach_pe32_sha384_ph() {
    compare_attach(Key::Rsa, "pe32.exe", HashAlg::Sha384, true, false);
}

#[test]
fn attach_big_sha512_ph() {
    compare_attach(Key::Rsa, "big.exe", HashAlg::Sha512, true, false);
}

#[test]
fn attach_driver_sha256_ph() {
    compare_attach(Key::Rsa, "driver.sys", HashAlg::Sha256, true, false);
}

#[test]
fn attach_ecdsa_p256_driver_nested() {
    compare_attach(Key::P256, "signed-driver.sys", HashAlg::Sha256, false, true);
}

#[test]
fn attach_replaces_a_signature() {
    compare_attach(
        Key::Rsa,
        "signed-pe32plus.exe",
        HashAlg::Sha256,
        true,
        false,
    );
}

#[test]
fn attach_nests_beside_a_signature() {
    compare_attach(Key::Rsa, "signed-lib.dll", HashAlg::Sha384, false, true);
}

#[test]
fn attach_nests_a_second_time() {
    compare_attach(Key::Rsa, "nested-pe32plus.exe", HashAlg::Sha256, true, true);
}

#[test]
fn attach_nest_in_unsigned_is_plain() {
    compare_attach(Key::Rsa, "pe32.exe", HashAlg::Sha256, false, true);
}

#[test]
fn attach_ecdsa_p256_sha256_ph() {
    compare_attach(Key::P256, "pe32plus.exe", HashAlg::Sha256, true, false);
}

#[test]
fn attach_ecdsa_p384_nested_sha384() {
    compare_attach(Key::P384, "signed-pe32.exe", HashAlg::Sha384, false, true);
}

/// Nested beside a SHA-1 signature (a file signed long ago): attached as osslsigncode
/// attaches it; the SHA-1 one is kept and not checked.
#[test]
fn attach_nests_beside_a_sha1_signature() {
    let e = env();
    // Made before: fixture() holds the corpus lock while it makes one.
    let base = corpus("pe32.exe");
    let old = fixture("sha1-pe32.exe", |p| {
        e.token
            .ossl_sign("signkey", &base, p, &["-h".to_owned(), "sha1".to_owned()])
    });
    let blob = extract_blob(&mut File::open(&old).unwrap(), HashAlg::Sha256, false).unwrap();
    let sig = sign_blob(&blob, &options(HashAlg::Sha256, false, false), &e.signer).unwrap();
    let out_path = e.token.world.path("sha1-nested.exe");
    let mut out = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&out_path)
        .unwrap();
    let signed = attach_pe(&mut File::open(&old).unwrap(), &mut out, &sig, true).unwrap();
    assert!(signed.nested);
    let mut f = File::open(&out_path).unwrap();
    let image = PeImage::parse(&mut f).unwrap();
    assert_eq!(image.check_signatures(&mut f).unwrap(), 1);
    let text = osslsigncode(&[
        os("verify"),
        os("-CAfile"),
        e.token.world.path("cert.pem").as_os_str(),
        os("-in"),
        out_path.as_os_str(),
    ]);
    assert!(text.contains("Number of verified signatures: 2"), "{text}");
    let _ = std::fs::remove_file(&out_path);
}

/// The blob leaves out a file's signature and the header fields Authenticode skips;
/// the rest's SHA-256 names exactly those: a signed file and its unsigned self share
/// a blob and differ in the rest, as does a file whose checksum alone changed.
#[test]
fn the_rest_names_what_the_blob_leaves_out() {
    let e = env();
    let base = corpus("pe32.exe");
    let signed = fixture("sha1-pe32.exe", |p| {
        e.token
            .ossl_sign("signkey", &base, p, &["-h".to_owned(), "sha1".to_owned()])
    });
    let of = |bytes: Vec<u8>| {
        extract_blob_and_rest(&mut std::io::Cursor::new(bytes), HashAlg::Sha256, false).unwrap()
    };
    let plain = std::fs::read(&base).unwrap();
    let (blob, rest) = of(plain.clone());
    assert_eq!(
        blob,
        extract_blob(&mut File::open(&base).unwrap(), HashAlg::Sha256, false).unwrap(),
        "the same blob as extract_blob"
    );
    assert_eq!(
        (blob.clone(), rest),
        of(plain.clone()),
        "the same file: the same"
    );
    let (signed_blob, signed_rest) = of(std::fs::read(&signed).unwrap());
    assert_eq!(signed_blob, blob, "the signature is not in the blob");
    assert_ne!(signed_rest, rest, "and it is in the rest");
    let mut checksum = plain;
    let pe = u32::from_le_bytes(checksum[60..64].try_into().unwrap()) as usize;
    checksum[pe + 88] ^= 0x5a;
    let (changed_blob, changed_rest) = of(checksum);
    assert_eq!(changed_blob, blob);
    assert_ne!(changed_rest, rest);
}

/// A signature made for another file, or one whose bytes were altered, is refused
/// before anything is written.
#[test]
fn attach_refuses_what_is_not_the_files() {
    let e = env();
    let a = corpus("pe32plus.exe");
    let b = corpus("pe32.exe");
    let blob = extract_blob(&mut File::open(&a).unwrap(), HashAlg::Sha256, true).unwrap();
    let sig = sign_blob(&blob, &options(HashAlg::Sha256, true, false), &e.signer).unwrap();
    let mut out = std::io::Cursor::new(Vec::new());
    let err = attach_pe(&mut File::open(&b).unwrap(), &mut out, &sig, false).unwrap_err();
    assert!(matches!(err, Error::WrongFile(_)), "{err}");
    assert!(err.to_string().contains("not this file's"), "{err}");
    assert!(out.get_ref().is_empty(), "nothing is written");

    // The same file changed in one byte of a section: its digest differs.
    let mut changed = std::fs::read(&a).unwrap();
    let at = changed.len() / 2;
    changed[at] ^= 0xff;
    let err = attach_pe(&mut std::io::Cursor::new(changed), &mut out, &sig, false).unwrap_err();
    assert!(matches!(err, Error::WrongFile(_)), "{err}");
    assert!(out.get_ref().is_empty(), "nothing is written");

    // Not a signature at all.
    let err = attach_pe(&mut File::open(&a).unwrap(), &mut out, &blob[..40], false).unwrap_err();
    assert!(matches!(err, Error::NotSignature(_)), "{err}");

    // A signature whose signed attributes were altered: its signer's key does not
    // verify it (the file's digest is still the file's).
    let mut altered = sig.clone();
    let needle = b"Signet test";
    let at = altered
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    altered[at] = b's';
    attach_pe(&mut File::open(&a).unwrap(), &mut out, &altered, false).unwrap();
    let err = verify_signature(&altered).unwrap_err();
    assert!(matches!(err, Error::BadSignature(_)), "{err}");
    assert!(verify_signature(&sig).is_ok());
}

/// The signer's certificate chains to the CA given, and not to another.
#[test]
fn verify_chain_to_the_ca_given() {
    let e = env();
    let a = corpus("pe32plus.exe");
    let blob = extract_blob(&mut File::open(&a).unwrap(), HashAlg::Sha256, false).unwrap();
    let now = std::time::SystemTime::now();
    for key in [Key::Rsa, Key::P256, Key::P384] {
        let signer = key_signer(key);
        let sig = sign_blob(&blob, &SignOptions::new(HashAlg::Sha256), signer).unwrap();
        let v = verify_signature(&sig).unwrap();
        assert_eq!(v.signer, signer.cert);
        assert_eq!(v.hash, HashAlg::Sha256);
        verify_chain(&sig, std::slice::from_ref(&signer.cert), now).unwrap();
        let other = if key == Key::Rsa { &e.p256 } else { &e.signer };
        let err = verify_chain(&sig, std::slice::from_ref(&other.cert), now).unwrap_err();
        assert!(
            matches!(&err, Error::Untrusted(why) if why == "self-signed certificate"),
            "{err}"
        );
        let err = verify_chain(&sig, &[], now).unwrap_err();
        assert!(matches!(err, Error::Untrusted(_)), "{err}");
        // Long after the certificate expired.
        let later = now + std::time::Duration::from_secs(200 * 365 * 24 * 3600);
        let err = verify_chain(&sig, std::slice::from_ref(&signer.cert), later).unwrap_err();
        assert!(
            matches!(&err, Error::Untrusted(why) if why.contains("expired")),
            "{err}"
        );
    }
}

/// Nested beside a signature that no longer verifies (a byte of its value altered):
/// attached as `osslsigncode attach-signature -nest` attaches it, the same bytes, the
/// old signature kept as it was; the check of the whole file then names the bad one.
/// (The attach_pe fuzz target found that its own check assumed otherwise.)
#[test]
fn attach_nests_beside_an_altered_signature_as_osslsigncode_does() {
    let e = env();
    let good = corpus("signed-pe32plus.exe");
    let mut bytes = std::fs::read(&good).unwrap();
    let (off, _, _) = layout(&bytes);
    let old = pe_signature(&good);
    // The last bytes of the DER are the signer's signature value.
    let at = off as usize + 8 + old.len() - 10;
    bytes[at] ^= 0x55;
    let input = e.token.world.path("altered-signature.exe");
    std::fs::write(&input, &bytes).unwrap();
    assert!(verify_signature(&pe_signature(&input)).is_err());

    let blob = extract_blob(&mut File::open(&input).unwrap(), HashAlg::Sha256, false).unwrap();
    let sig = sign_blob(&blob, &options(HashAlg::Sha256, false, false), &e.signer).unwrap();
    let sig_path = e.token.world.path("altered-signature.p7");
    std::fs::write(&sig_path, &sig).unwrap();
    let native = e.token.world.path("altered-nested-native.exe");
    let done = {
        let mut out = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&native)
            .unwrap();
        attach_pe(&mut File::open(&input).unwrap(), &mut out, &sig, true).unwrap()
    };
    assert!(done.nested);
    let reference = e.token.world.path("altered-nested-ossl.exe");
    // osslsigncode verifies what it attached and says the old signature is bad; the
    // file it wrote is kept all the same.
    let _ = e.token.osslsigncode(&[
        os("attach-signature"),
        os("-sigin"),
        sig_path.as_os_str(),
        os("-nest"),
        os("-in"),
        input.as_os_str(),
        os("-out"),
        reference.as_os_str(),
    ]);
    assert!(
        std::fs::read(&native).unwrap() == std::fs::read(&reference).unwrap(),
        "attach_pe and osslsigncode attach-signature -nest wrote different files"
    );
    let mut f = File::open(&native).unwrap();
    let image = PeImage::parse(&mut f).unwrap();
    let err = image.check_signatures(&mut f).unwrap_err();
    assert!(matches!(err, Error::BadSignature(_)), "{err}");
    // The nested one is the new signature, unchanged.
    let outer = pe_signature(&native);
    assert_eq!(nested_of(&signed_data(&outer)).last().unwrap(), &sig);
}
