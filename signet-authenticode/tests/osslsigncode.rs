//! The native engine against the real osslsigncode, with one SoftHSM key: for each
//! file of the corpus and each option set, sign natively (a logged-in cryptoki session
//! as the RawSigner) and with osslsigncode (its PKCS#11 engine), then parse both
//! outputs and compare them; and `osslsigncode verify` every native output.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use cms::content_info::ContentInfo;
use cms::signed_data::SignedData;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use der::{Decode, Encode};
use sha2::Digest;
use signet_authenticode::{
    asn1, attach_pe, extract_blob, sign_blob, sign_pe, verify_chain, verify_signature, Error,
    HashAlg, KeyKind, PeImage, RawSigner, SignOptions, Statement,
};
use signet_test_support::{World, PIN, SOFTHSM};

/// A key of the token on the test's one logged-in session.
struct TokenSigner {
    session: Arc<Mutex<Session>>,
    key: ObjectHandle,
    kind: KeyKind,
    cert: Vec<u8>,
    chain: Vec<Vec<u8>>,
    signs: Mutex<usize>,
}

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

impl RawSigner for TokenSigner {
    type Error = cryptoki::error::Error;
    fn key(&self) -> KeyKind {
        self.kind
    }
    fn sign(&self, hash: HashAlg, data: &[u8]) -> Result<Vec<u8>, Self::Error> {
        let mech = match (self.kind, hash) {
            (KeyKind::Rsa, HashAlg::Sha256) => Mechanism::Sha256RsaPkcs,
            (KeyKind::Rsa, HashAlg::Sha384) => Mechanism::Sha384RsaPkcs,
            (KeyKind::Rsa, HashAlg::Sha512) => Mechanism::Sha512RsaPkcs,
            // SoftHSM (like many tokens) has CKM_ECDSA only: hash here, as libp11
            // does for osslsigncode.
            _ => {
                *self.signs.lock().unwrap() += 1;
                let digest = hash.digest(data);
                return self
                    .session
                    .lock()
                    .unwrap()
                    .sign(&Mechanism::Ecdsa, self.key, &digest);
            }
        };
        *self.signs.lock().unwrap() += 1;
        self.session.lock().unwrap().sign(&mech, self.key, data)
    }
    fn certificate(&self) -> &[u8] {
        &self.cert
    }
    fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }
}

/// One token for the whole test process (SoftHSM's configuration is per process).
struct Env {
    world: World,
    signer: TokenSigner,
    p256: TokenSigner,
    p384: TokenSigner,
    _ctx: Pkcs11,
    /// Fixture files made once: name -> path.
    files: Mutex<BTreeMap<String, PathBuf>>,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let world = World::new();
        std::env::set_var("SOFTHSM2_CONF", world.softhsm_conf());
        std::fs::copy(world.path("cert.pem"), world.path("signkey.pem")).unwrap();
        make_ec_key(&world, "EC:prime256v1", "02", "ec256", "sha256");
        make_ec_key(&world, "EC:secp384r1", "03", "ec384", "sha384");
        let ctx = Pkcs11::new(SOFTHSM).unwrap();
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .unwrap();
        let slot = ctx.get_slots_with_token().unwrap()[0];
        let session = ctx.open_ro_session(slot).unwrap();
        session
            .login(UserType::User, Some(&AuthPin::new(PIN.into())))
            .unwrap();
        let session = Arc::new(Mutex::new(session));
        let signer = |key: Key, kind: KeyKind| {
            let s = session.lock().unwrap();
            let label = key.label().as_bytes().to_vec();
            let handle = s
                .find_objects(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Label(label.clone()),
                ])
                .unwrap()[0];
            let cert_obj = s
                .find_objects(&[
                    Attribute::Class(ObjectClass::CERTIFICATE),
                    Attribute::Label(label),
                ])
                .unwrap()[0];
            let cert = match s
                .get_attributes(cert_obj, &[AttributeType::Value])
                .unwrap()
                .remove(0)
            {
                Attribute::Value(v) => v,
                other => panic!("certificate value: {other:?}"),
            };
            TokenSigner {
                session: session.clone(),
                key: handle,
                kind,
                cert,
                chain: Vec::new(),
                signs: Mutex::new(0),
            }
        };
        std::fs::write(world.path("pin"), PIN).unwrap();
        Env {
            signer: signer(Key::Rsa, KeyKind::Rsa),
            p256: signer(Key::P256, KeyKind::EcdsaP256),
            p384: signer(Key::P384, KeyKind::EcdsaP384),
            _ctx: ctx,
            world,
            files: Mutex::new(BTreeMap::new()),
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
    let e = env();
    let out = Command::new("osslsigncode")
        .args(args)
        .env("SOFTHSM2_CONF", e.world.softhsm_conf())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "osslsigncode {args:?} failed: {text}");
    text
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

/// `osslsigncode sign` with the token's key (as the agent's osslsigncode backend runs it).
fn ossl_sign(input: &Path, output: &Path, o: &SignOptions) {
    ossl_sign_with(Key::Rsa, input, output, o)
}

fn ossl_sign_with(key: Key, input: &Path, output: &Path, o: &SignOptions) {
    let e = env();
    let pin = e.world.path("pin");
    let uri = |kind: &str| {
        format!(
            "pkcs11:token=signet-demo;object={};type={kind}",
            key.label()
        )
    };
    let (private, cert) = (uri("private"), uri("cert"));
    let mut a: Vec<&std::ffi::OsStr> = vec![
        os("sign"),
        os("-pkcs11module"),
        os(SOFTHSM),
        os("-key"),
        os(&private),
        os("-readpass"),
        pin.as_os_str(),
        os("-pkcs11cert"),
        os(&cert),
        os("-h"),
        os(o.hash.as_str()),
    ];
    if let Some(d) = &o.description {
        a.extend([os("-n"), os(d)]);
    }
    if let Some(u) = &o.url {
        a.extend([os("-i"), os(u)]);
    }
    if o.statement == Statement::Commercial {
        a.push(os("-comm"));
    }
    if o.page_hashes {
        a.push(os("-ph"));
    }
    if o.nested {
        a.push(os("-nest"));
    }
    a.extend([os("-in"), input.as_os_str(), os("-out"), output.as_os_str()]);
    // SoftHSM's file store is not for processes using it at once: one at a time,
    // this process's session included.
    let _token = e.signer.session.lock().unwrap();
    let _ = key;
    osslsigncode(&a);
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
    let ca = e.world.path(&format!("{}.pem", key.label()));
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

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A fixture made once per process.
fn fixture(name: &str, make: impl FnOnce(&Path)) -> PathBuf {
    let e = env();
    let mut files = e.files.lock().unwrap();
    if let Some(p) = files.get(name) {
        return p.clone();
    }
    let p = e.world.path(name);
    make(&p);
    files.insert(name.into(), p.clone());
    p
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_pe(out: &Path, cc: &str, size: Option<u64>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/make-pe.sh");
    let mut c = Command::new("bash");
    c.arg(script).arg(out).env("CC_MINGW", cc);
    if let Some(s) = size {
        c.arg(s.to_string());
    }
    run(&mut c);
}

/// The corpus: PE32+ and PE32 programs, a DLL, a larger program (several buffers).
fn corpus(name: &str) -> PathBuf {
    match name {
        "pe32plus.exe" => fixture(name, |p| make_pe(p, "x86_64-w64-mingw32-gcc", None)),
        "pe32.exe" => fixture(name, |p| make_pe(p, "i686-w64-mingw32-gcc", None)),
        "big.exe" => fixture(name, |p| {
            make_pe(p, "x86_64-w64-mingw32-gcc", Some(3 * 1024 * 1024 + 4321))
        }),
        "lib.dll" => fixture(name, |p| {
            let src = env().world.path("lib.c");
            std::fs::write(
                &src,
                "__declspec(dllexport) int add(int a, int b) { return a + b; }\n",
            )
            .unwrap();
            run(Command::new("x86_64-w64-mingw32-gcc")
                .args(["-shared", "-O2", "-s", "-o"])
                .arg(p)
                .arg(&src));
        }),
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

/// The signature in a signed PE file (its certificate table's PKCS#7).
fn pe_signature(file: &Path) -> Vec<u8> {
    let mut f = File::open(file).unwrap();
    let image = PeImage::parse(&mut f).unwrap();
    image.existing_signature(&mut f).unwrap().unwrap()
}

fn signed_data(der: &[u8]) -> SignedData {
    let ci = ContentInfo::from_der(der).unwrap();
    assert_eq!(ci.content_type, asn1::SIGNED_DATA);
    ci.content.decode_as().unwrap()
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

/// Asserts that two signatures are the same but for the signing time and the signature.
fn assert_same_signature(native: &[u8], reference: &[u8]) {
    let (n, r) = (signed_data(native), signed_data(reference));
    let nc = n
        .encap_content_info
        .econtent
        .as_ref()
        .unwrap()
        .to_der()
        .unwrap();
    let rc = r
        .encap_content_info
        .econtent
        .as_ref()
        .unwrap()
        .to_der()
        .unwrap();
    // The same SpcIndirectDataContent, so the same file digest (and page hashes).
    assert_eq!(hex(&nc), hex(&rc), "SpcIndirectDataContent differs");
    assert_eq!(
        n.encap_content_info.econtent_type,
        r.encap_content_info.econtent_type
    );
    assert_eq!(n.version, r.version);
    assert_eq!(n.digest_algorithms, r.digest_algorithms);
    assert_eq!(n.certificates, r.certificates);
    assert_eq!(n.crls, r.crls);
    let (ns, rs) = (
        n.signer_infos.0.get(0).unwrap(),
        r.signer_infos.0.get(0).unwrap(),
    );
    assert_eq!(n.signer_infos.0.len(), 1);
    assert_eq!(ns.version, rs.version);
    assert_eq!(ns.sid, rs.sid);
    assert_eq!(ns.digest_alg, rs.digest_alg);
    assert_eq!(ns.signature_algorithm, rs.signature_algorithm);
    if ns.signature_algorithm.oid == asn1::RSA_ENCRYPTION {
        assert_eq!(ns.signature.as_bytes().len(), rs.signature.as_bytes().len());
    }
    let attrs = |si: &cms::signed_data::SignerInfo| {
        si.signed_attrs
            .as_ref()
            .unwrap()
            .iter()
            .map(|a| {
                let v = if a.oid == asn1::SIGNING_TIME {
                    Vec::new()
                } else {
                    a.values.to_der().unwrap()
                };
                (a.oid.to_string(), hex(&v))
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(attrs(ns), attrs(rs), "authenticated attributes differ");
    assert!(attrs(ns)
        .iter()
        .any(|(o, _)| *o == asn1::SIGNING_TIME.to_string()));
    // The messageDigest is over the SpcIndirectDataContent's content octets.
    let content = n.encap_content_info.econtent.as_ref().unwrap();
    let md = ns
        .signed_attrs
        .as_ref()
        .unwrap()
        .iter()
        .find(|a| a.oid == asn1::MESSAGE_DIGEST)
        .unwrap()
        .values
        .get(0)
        .unwrap()
        .decode_as::<der::asn1::OctetString>()
        .unwrap();
    let alg = HashAlg::from_oid(&ns.digest_alg.oid).unwrap();
    assert_eq!(md.as_bytes(), alg.digest(content.value()));
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
    let native = e.world.path(&format!("native-{tag}"));
    let reference = e.world.path(&format!("ossl-{tag}"));
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

/// The blob formats' fixtures: an MSI, a cabinet, a PowerShell script.
fn blob_corpus(name: &str) -> PathBuf {
    let e = env();
    match name {
        "a.msi" => fixture(name, |_| {
            e.world.msi(name);
        }),
        "a.cab" => fixture(name, |_| {
            e.world.cab(name);
        }),
        "a.ps1" => fixture(name, |_| {
            e.world.file(
                name,
                b"param([string]$Name = 'World')\r\nWrite-Host \"Hello, $Name\"\r\n",
            );
        }),
        pe => corpus(pe),
    }
}

/// Digest mode: `osslsigncode extract-data`, the native engine signs the blob,
/// `osslsigncode attach-signature` puts it in, `osslsigncode verify` passes; and the
/// signature is the one `osslsigncode sign` makes of the whole file (but the time).
fn compare_blob(input_name: &str, hash: HashAlg, page_hashes: bool, nest: bool) {
    let e = env();
    let input = blob_corpus(input_name);
    let tag = format!(
        "blob-{input_name}-{}-{}-{}",
        hash.as_str(),
        if page_hashes { "ph" } else { "noph" },
        if nest { "nest" } else { "plain" }
    );
    let blob = e.world.path(&format!("{tag}.blob"));
    let mut a = vec![os("extract-data"), os("-h"), os(hash.as_str())];
    if page_hashes {
        a.push(os("-ph"));
    }
    a.extend([os("-in"), input.as_os_str(), os("-out"), blob.as_os_str()]);
    osslsigncode(&a);

    let mut o = options(hash, page_hashes, false);
    o.statement = Statement::Commercial;
    let sig = sign_blob(&std::fs::read(&blob).unwrap(), &o, &e.signer).unwrap();
    let sig_path = e.world.path(&format!("{tag}.p7"));
    std::fs::write(&sig_path, &sig).unwrap();
    // osslsigncode goes by the name's extension too (a script's output needs .ps1).
    let ext = input_name.rsplit('.').next().unwrap();
    let attached = e.world.path(&format!("{tag}-attached.{ext}"));
    let ca = e.world.path("cert.pem");
    let mut a = vec![
        os("attach-signature"),
        os("-sigin"),
        sig_path.as_os_str(),
        os("-CAfile"),
        ca.as_os_str(),
    ];
    if nest {
        a.push(os("-nest"));
    }
    a.extend([
        os("-in"),
        input.as_os_str(),
        os("-out"),
        attached.as_os_str(),
    ]);
    let text = osslsigncode(&a);
    assert!(text.contains("Signature successfully attached"), "{text}");
    verify(&attached);

    // The blob's content is signed as it is.
    let blob_bytes = std::fs::read(&blob).unwrap();
    let mut reader = der::SliceReader::new(&blob_bytes).unwrap();
    let blob_sd: SignedData = ContentInfo::decode(&mut reader)
        .unwrap()
        .content
        .decode_as()
        .unwrap();
    let sd = signed_data(&sig);
    assert_eq!(
        blob_sd
            .encap_content_info
            .econtent
            .unwrap()
            .to_der()
            .unwrap(),
        sd.encap_content_info
            .econtent
            .clone()
            .unwrap()
            .to_der()
            .unwrap()
    );
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
    let reference = e.world.path(&format!("{tag}-ossl.{ext}"));
    ossl_sign(&input, &reference, &o);
    let reference_sig = e.world.path(&format!("{tag}-ossl.p7"));
    osslsigncode(&[
        os("extract-signature"),
        os("-in"),
        reference.as_os_str(),
        os("-out"),
        reference_sig.as_os_str(),
    ]);
    assert_same_signature(&sig, &std::fs::read(&reference_sig).unwrap());
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
blob_case!(blob_msi_sha256, "a.msi", Sha256, false, false);
blob_case!(blob_msi_sha512, "a.msi", Sha512, false, false);
blob_case!(blob_cab_sha256, "a.cab", Sha256, false, false);
blob_case!(blob_cab_sha384, "a.cab", Sha384, false, false);
blob_case!(blob_ps1_sha256, "a.ps1", Sha256, false, false);
blob_case!(blob_ps1_sha512, "a.ps1", Sha512, false, false);

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
    let pem = std::fs::read(e.world.path("cert.pem")).unwrap();
    let ec = std::fs::read(e.world.path("ec256.pem")).unwrap();
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
        "big.exe",
        "signed-pe32.exe",
        "nested-pe32plus.exe",
    ] {
        let input = corpus(name);
        for hash in [HashAlg::Sha256, HashAlg::Sha384, HashAlg::Sha512] {
            for ph in [false, true] {
                let tag = format!("extract-{name}-{}-{ph}", hash.as_str());
                let reference = e.world.path(&format!("{tag}.p7"));
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
    let sig_path = e.world.path(&format!("{tag}.p7"));
    std::fs::write(&sig_path, &sig).unwrap();

    let native = e.world.path(&format!("{tag}-native.exe"));
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

    let reference = e.world.path(&format!("{tag}-ossl.exe"));
    let ca = e.world.path(&format!("{}.pem", key.label()));
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
        let pin = e.world.path("pin");
        let _token = e.signer.session.lock().unwrap();
        osslsigncode(&[
            os("sign"),
            os("-pkcs11module"),
            os(SOFTHSM),
            os("-key"),
            os("pkcs11:token=signet-demo;object=signkey;type=private"),
            os("-readpass"),
            pin.as_os_str(),
            os("-pkcs11cert"),
            os("pkcs11:token=signet-demo;object=signkey;type=cert"),
            os("-h"),
            os("sha1"),
            os("-in"),
            base.as_os_str(),
            os("-out"),
            p.as_os_str(),
        ]);
    });
    let blob = extract_blob(&mut File::open(&old).unwrap(), HashAlg::Sha256, false).unwrap();
    let sig = sign_blob(&blob, &options(HashAlg::Sha256, false, false), &e.signer).unwrap();
    let out_path = e.world.path("sha1-nested.exe");
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
        e.world.path("cert.pem").as_os_str(),
        os("-in"),
        out_path.as_os_str(),
    ]);
    assert!(text.contains("Number of verified signatures: 2"), "{text}");
    let _ = std::fs::remove_file(&out_path);
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
