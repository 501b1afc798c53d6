//! What both comparison suites share: the SoftHSM token on one logged-in session and
//! its keys as `RawSigner`s, the real osslsigncode (sign, verify, extract, attach) with
//! the same key, the fixture corpus (PE programs, a driver, MSI, CAB, PowerShell in
//! each encoding), and the parsing that compares two signatures.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use cms::content_info::ContentInfo;
use cms::signed_data::{SignedData, SignerInfo};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use der::{Decode, Encode};
use signet_authenticode::{asn1, HashAlg, KeyKind, PeImage, RawSigner, SignOptions, Statement};
use signet_test_support::{World, PIN, SOFTHSM};

/// A key of the token on the test process's one logged-in session.
pub struct TokenSigner {
    pub session: Arc<Mutex<Session>>,
    pub key: ObjectHandle,
    pub kind: KeyKind,
    pub label: String,
    pub cert: Vec<u8>,
    pub chain: Vec<Vec<u8>>,
    /// Signature operations made with it.
    pub signs: Mutex<usize>,
}

impl RawSigner for TokenSigner {
    type Error = cryptoki::error::Error;
    fn key(&self) -> KeyKind {
        self.kind
    }
    fn sign(&self, hash: HashAlg, data: &[u8]) -> Result<Vec<u8>, Self::Error> {
        *self.signs.lock().unwrap() += 1;
        let mech = match (self.kind, hash) {
            (KeyKind::Rsa, HashAlg::Sha256) => Mechanism::Sha256RsaPkcs,
            (KeyKind::Rsa, HashAlg::Sha384) => Mechanism::Sha384RsaPkcs,
            (KeyKind::Rsa, HashAlg::Sha512) => Mechanism::Sha512RsaPkcs,
            // SoftHSM (like many tokens) has CKM_ECDSA only: hash here, as libp11
            // does for osslsigncode.
            _ => {
                let digest = hash.digest(data);
                return self
                    .session
                    .lock()
                    .unwrap()
                    .sign(&Mechanism::Ecdsa, self.key, &digest);
            }
        };
        self.session.lock().unwrap().sign(&mech, self.key, data)
    }
    fn certificate(&self) -> &[u8] {
        &self.cert
    }
    fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }
}

/// The world's SoftHSM token, logged in once for the whole process (SoftHSM's
/// configuration is per process), and osslsigncode beside it.
pub struct Token {
    pub world: World,
    pub session: Arc<Mutex<Session>>,
    /// Fixture files made once: name -> path.
    files: Mutex<std::collections::BTreeMap<String, PathBuf>>,
    _ctx: Pkcs11,
}

impl Token {
    /// Logs in to `world`'s token (after the keys the caller made on it) and writes
    /// the PIN file osslsigncode reads.
    pub fn open(world: World) -> Token {
        std::env::set_var("SOFTHSM2_CONF", world.softhsm_conf());
        let ctx = Pkcs11::new(SOFTHSM).unwrap();
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .unwrap();
        let slot = ctx.get_slots_with_token().unwrap()[0];
        let session = ctx.open_ro_session(slot).unwrap();
        session
            .login(UserType::User, Some(&AuthPin::new(PIN.into())))
            .unwrap();
        std::fs::write(world.path("pin"), PIN).unwrap();
        Token {
            world,
            session: Arc::new(Mutex::new(session)),
            files: Mutex::new(Default::default()),
            _ctx: ctx,
        }
    }

    /// The key labelled `label` (and the certificate of the same label) as a signer.
    pub fn signer(&self, label: &str, kind: KeyKind) -> TokenSigner {
        let s = self.session.lock().unwrap();
        let find = |class| {
            s.find_objects(&[
                Attribute::Class(class),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .unwrap()[0]
        };
        let key = find(ObjectClass::PRIVATE_KEY);
        let cert = match s
            .get_attributes(find(ObjectClass::CERTIFICATE), &[AttributeType::Value])
            .unwrap()
            .remove(0)
        {
            Attribute::Value(v) => v,
            other => panic!("certificate value: {other:?}"),
        };
        TokenSigner {
            session: self.session.clone(),
            key,
            kind,
            label: label.to_owned(),
            cert,
            chain: Vec::new(),
            signs: Mutex::new(0),
        }
    }

    /// Runs osslsigncode with the token's configuration; answers (success, output).
    pub fn osslsigncode(&self, args: &[&std::ffi::OsStr]) -> (bool, String) {
        let out = Command::new("osslsigncode")
            .args(args)
            .env("SOFTHSM2_CONF", self.world.softhsm_conf())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// [`Token::osslsigncode`] that must succeed; answers its output.
    pub fn osslsigncode_ok(&self, args: &[&std::ffi::OsStr]) -> String {
        let (ok, text) = self.osslsigncode(args);
        assert!(ok, "osslsigncode {args:?} failed: {text}");
        text
    }

    /// `osslsigncode sign` with the key labelled `label` (as the agent's osslsigncode
    /// backend runs it) and `extra` options before `-in`.
    pub fn ossl_sign(&self, label: &str, input: &Path, output: &Path, extra: &[String]) {
        let pin = self.world.path("pin");
        let uri = |kind: &str| format!("pkcs11:token=signet-demo;object={label};type={kind}");
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
        ];
        a.extend(extra.iter().map(|s| os(s)));
        a.extend([os("-in"), input.as_os_str(), os("-out"), output.as_os_str()]);
        // SoftHSM's file store is not for processes using it at once: one at a time,
        // this process's session included.
        let _token = self.session.lock().unwrap();
        self.osslsigncode_ok(&a);
    }

    /// `osslsigncode extract-signature`: the PKCS#7 of a signed file.
    pub fn ossl_signature(&self, signed: &Path) -> Vec<u8> {
        let out = PathBuf::from(format!("{}.extracted.p7", signed.display()));
        self.osslsigncode_ok(&[
            os("extract-signature"),
            os("-in"),
            signed.as_os_str(),
            os("-out"),
            out.as_os_str(),
        ]);
        let sig = std::fs::read(&out).unwrap();
        let _ = std::fs::remove_file(&out);
        sig
    }

    /// The agent's native path for formats osslsigncode embeds: `extract-data`, the
    /// engine signs the blob (`sign`), `attach-signature` puts it in `output`. Answers
    /// the signature.
    pub fn native_through_blob(
        &self,
        input: &Path,
        output: &Path,
        hash: HashAlg,
        page_hashes: bool,
        nest: bool,
        sign: impl FnOnce(&[u8]) -> Vec<u8>,
    ) -> Vec<u8> {
        self.native_through_blob_stamped(input, output, hash, page_hashes, nest, None, sign)
    }

    /// [`Token::native_through_blob`]; with `tsa_ca`, the signature is timestamped by
    /// the TSA whose certificate that is (`attach-signature` checks it).
    #[allow(clippy::too_many_arguments)]
    pub fn native_through_blob_stamped(
        &self,
        input: &Path,
        output: &Path,
        hash: HashAlg,
        page_hashes: bool,
        nest: bool,
        tsa_ca: Option<&Path>,
        sign: impl FnOnce(&[u8]) -> Vec<u8>,
    ) -> Vec<u8> {
        let blob = PathBuf::from(format!("{}.blob", output.display()));
        let sig_path = PathBuf::from(format!("{}.p7", output.display()));
        let mut a = vec![os("extract-data"), os("-h"), os(hash.as_str())];
        if page_hashes {
            a.push(os("-ph"));
        }
        a.extend([os("-in"), input.as_os_str(), os("-out"), blob.as_os_str()]);
        self.osslsigncode_ok(&a);
        let sig = sign(&std::fs::read(&blob).unwrap());
        std::fs::write(&sig_path, &sig).unwrap();
        let ca = self.world.path("cert.pem");
        let mut a = vec![
            os("attach-signature"),
            os("-sigin"),
            sig_path.as_os_str(),
            os("-CAfile"),
            ca.as_os_str(),
        ];
        if let Some(ca) = tsa_ca {
            a.extend([os("-TSA-CAfile"), ca.as_os_str()]);
        }
        if nest {
            a.push(os("-nest"));
        }
        a.extend([os("-in"), input.as_os_str(), os("-out"), output.as_os_str()]);
        let text = self.osslsigncode_ok(&a);
        assert!(text.contains("Signature successfully attached"), "{text}");
        let _ = std::fs::remove_file(&sig_path);
        let _ = std::fs::remove_file(&blob);
        sig
    }

    /// A fixture made once per process.
    pub fn fixture(&self, name: &str, make: impl FnOnce(&Path)) -> PathBuf {
        let mut files = self.files.lock().unwrap();
        if let Some(p) = files.get(name) {
            return p.clone();
        }
        let p = self.world.path(name);
        make(&p);
        files.insert(name.into(), p.clone());
        p
    }

    /// The unsigned corpus every suite shares, made once: `pe32plus.exe`, `pe32.exe`,
    /// `big.exe` (several buffers), `lib.dll`, `driver.sys` (a kernel driver,
    /// IMAGE_SUBSYSTEM_NATIVE), `a.msi`, `a.cab`, and PowerShell scripts in each
    /// encoding PowerShell reads: `utf8.ps1` (UTF-8, no BOM), `utf8bom.ps1`,
    /// `utf16.ps1` (UTF-16LE with BOM). `None` for another name.
    pub fn unsigned(&self, name: &str) -> Option<PathBuf> {
        let script = |name: &str, bytes: Vec<u8>| {
            Some(self.fixture(name, |p| std::fs::write(p, bytes).unwrap()))
        };
        match name {
            "pe32plus.exe" => {
                Some(self.fixture(name, |p| make_pe(p, "x86_64-w64-mingw32-gcc", None)))
            }
            "pe32.exe" => Some(self.fixture(name, |p| make_pe(p, "i686-w64-mingw32-gcc", None))),
            "big.exe" => Some(self.fixture(name, |p| {
                make_pe(p, "x86_64-w64-mingw32-gcc", Some(3 * 1024 * 1024 + 4321))
            })),
            "lib.dll" => Some(self.fixture(name, |p| {
                let src = self.world.path("lib.c");
                std::fs::write(
                    &src,
                    "__declspec(dllexport) int add(int a, int b) { return a + b; }\n",
                )
                .unwrap();
                run(Command::new("x86_64-w64-mingw32-gcc")
                    .args(["-shared", "-O2", "-s", "-o"])
                    .arg(p)
                    .arg(&src));
            })),
            "driver.sys" => Some(self.fixture(name, |p| {
                run(Command::new("bash")
                    .arg(fixtures().join("make-sys.sh"))
                    .arg(p));
                assert_eq!(subsystem(&std::fs::read(p).unwrap()), 1, "NATIVE");
            })),
            "a.msi" => Some(self.fixture(name, |_| {
                self.world.msi(name);
            })),
            "a.cab" => Some(self.fixture(name, |_| {
                self.world.cab(name);
            })),
            "a.ps1" | "utf8.ps1" => script(name, POWERSHELL.as_bytes().to_vec()),
            "utf8bom.ps1" => script(
                name,
                [b"\xef\xbb\xbf".as_slice(), POWERSHELL.as_bytes()].concat(),
            ),
            "utf16.ps1" => script(
                name,
                [0xff, 0xfe]
                    .into_iter()
                    .chain(POWERSHELL.encode_utf16().flat_map(u16::to_le_bytes))
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// The PowerShell fixture's text (not ASCII only, so the encodings differ).
pub const POWERSHELL: &str =
    "param([string]$Name = 'Wörld')\r\nWrite-Host \"Grüße, $Name\" # Signet ✓\r\n";

pub fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

pub fn make_pe(out: &Path, cc: &str, size: Option<u64>) {
    let mut c = Command::new("bash");
    c.arg(fixtures().join("make-pe.sh"))
        .arg(out)
        .env("CC_MINGW", cc);
    if let Some(s) = size {
        c.arg(s.to_string());
    }
    run(&mut c);
}

/// A PE's optional header Subsystem field.
pub fn subsystem(pe: &[u8]) -> u16 {
    let at = u32::from_le_bytes(pe[60..64].try_into().unwrap()) as usize + 24 + 68;
    u16::from_le_bytes([pe[at], pe[at + 1]])
}

/// osslsigncode's options for `o` (hash, description, URL, statement, page hashes,
/// nesting), as the agent's osslsigncode backend passes them.
pub fn sign_args(o: &SignOptions) -> Vec<String> {
    let mut a = vec!["-h".to_owned(), o.hash.as_str().to_owned()];
    if let Some(d) = &o.description {
        a.extend(["-n".to_owned(), d.clone()]);
    }
    if let Some(u) = &o.url {
        a.extend(["-i".to_owned(), u.clone()]);
    }
    if o.statement == Statement::Commercial {
        a.push("-comm".to_owned());
    }
    if o.page_hashes {
        a.push("-ph".to_owned());
    }
    if o.nested {
        a.push("-nest".to_owned());
    }
    a
}

pub fn signed_data(der: &[u8]) -> SignedData {
    let ci = ContentInfo::from_der(der).unwrap();
    assert_eq!(ci.content_type, asn1::SIGNED_DATA);
    ci.content.decode_as().unwrap()
}

/// The signature in a signed PE file (its certificate table's PKCS#7).
pub fn pe_signature(file: &Path) -> Vec<u8> {
    let mut f = std::fs::File::open(file).unwrap();
    let image = PeImage::parse(&mut f).unwrap();
    image.existing_signature(&mut f).unwrap().unwrap()
}

pub fn first_signer(sd: &SignedData) -> SignerInfo {
    assert_eq!(sd.signer_infos.0.len(), 1);
    sd.signer_infos.0.get(0).unwrap().clone()
}

/// A signer's authenticated attributes as (OID, DER of the values), the signing
/// time's value left out (it is the one attribute two signatures differ in).
pub fn attributes_but_time(si: &SignerInfo) -> Vec<(String, String)> {
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
        .collect()
}

/// The DER of a signature's encapsulated content (the SpcIndirectDataContent, or a
/// catalog's trust list).
pub fn content_der(sd: &SignedData) -> Vec<u8> {
    sd.encap_content_info
        .econtent
        .as_ref()
        .unwrap()
        .to_der()
        .unwrap()
}

/// Asserts that two signatures are the same but for the signing time, the signature
/// value and the unsigned attributes: the same content (so the same file digest and
/// page hashes), certificates, algorithms and authenticated attributes.
pub fn assert_same_signature(native: &[u8], reference: &[u8]) {
    let (n, r) = (signed_data(native), signed_data(reference));
    assert_eq!(
        hex(&content_der(&n)),
        hex(&content_der(&r)),
        "the signed content (SpcIndirectDataContent) differs"
    );
    assert_eq!(
        n.encap_content_info.econtent_type,
        r.encap_content_info.econtent_type
    );
    assert_eq!(n.version, r.version);
    assert_eq!(n.digest_algorithms, r.digest_algorithms);
    assert_eq!(n.certificates, r.certificates);
    assert_eq!(n.crls, r.crls);
    let (ns, rs) = (first_signer(&n), first_signer(&r));
    assert_eq!(ns.version, rs.version);
    assert_eq!(ns.sid, rs.sid);
    assert_eq!(ns.digest_alg, rs.digest_alg);
    assert_eq!(ns.signature_algorithm, rs.signature_algorithm);
    if ns.signature_algorithm.oid == asn1::RSA_ENCRYPTION {
        assert_eq!(ns.signature.as_bytes().len(), rs.signature.as_bytes().len());
    }
    assert_eq!(
        attributes_but_time(&ns),
        attributes_but_time(&rs),
        "authenticated attributes differ"
    );
    assert!(attributes_but_time(&ns)
        .iter()
        .any(|(o, _)| *o == asn1::SIGNING_TIME.to_string()));
    // The messageDigest is over the content's octets.
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

/// Asserts that two signed files embed their signatures the same way: the same
/// length (RSA signatures of one key have one length), and the bytes that differ (if
/// any: the signing time and so the signature value) lie
/// in one span no longer than the signature, inside where `signature` is embedded
/// (for PowerShell, its Base64 block; elsewhere, its DER).
pub fn assert_same_embedding(native: &Path, reference: &Path, signature_len: usize) {
    let (n, r) = (
        std::fs::read(native).unwrap(),
        std::fs::read(reference).unwrap(),
    );
    assert_eq!(
        n.len(),
        r.len(),
        "{} and {}: lengths differ",
        native.display(),
        reference.display()
    );
    // Identical when both were signed within the same second (RSA PKCS#1 v1.5
    // signatures are deterministic).
    let Some(first) = n.iter().zip(&r).position(|(a, b)| a != b) else {
        return;
    };
    let last = n.len()
        - 1
        - n.iter()
            .rev()
            .zip(r.iter().rev())
            .position(|(a, b)| a != b)
            .unwrap();
    // Base64 in UTF-16 takes up to 2 × 4/3 bytes a byte, with its line breaks.
    let limit = signature_len * 3 + 64;
    assert!(
        last - first < limit,
        "{}: differs from osslsigncode's from byte {first} to {last}, more than the signature",
        native.display()
    );
}
