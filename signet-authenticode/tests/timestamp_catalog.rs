//! RFC 3161 timestamps and security catalogs, against the real tools: a test TSA
//! (`tests/fixtures/make-tsa.sh`, answered by `openssl ts -reply`, over HTTP for
//! osslsigncode) and osslsigncode signing the same files with the same SoftHSM key.
//! The engine's output must carry what osslsigncode's does (for timestamps: the
//! szOID_RFC3161_counterSign unsigned attribute holding a token over the signature
//! value; for catalogs: the same trust list and authenticated attributes) and pass
//! `osslsigncode verify`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cms::content_info::ContentInfo;
use cms::signed_data::{SignedData, SignerInfo};
use der::asn1::OctetString;
use der::{Decode, Encode};
use signet_authenticode::{
    add_timestamp, asn1, sign_blob, sign_catalog, sign_pe, Error, HashAlg, KeyKind, PeImage,
    SignOptions, TimestampRequest, Timestamper,
};
use signet_test_support::{fixture, Tsa, World};

use common::{
    attributes_but_time, first_signer, hex, os, pe_signature, signed_data, Token, TokenSigner,
};

const RFC3161: &str = "1.3.6.1.4.1.311.3.3.1";
const TST_INFO: &str = "1.2.840.113549.1.9.16.1.4";
const CTL: &str = "1.3.6.1.4.1.311.10.1";

/// One token, one TSA for the whole test process.
struct Env {
    token: Token,
    signer: TokenSigner,
    tsa: Tsa,
    /// `openssl ts -reply` keeps its serial number in a file: one at a time.
    tsa_dir: PathBuf,
    replies: Mutex<usize>,
    /// osslsigncode's signatures timestamped over HTTP, one at a time (each counts
    /// the TSA's replies).
    http_tsa: Mutex<()>,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let token = Token::open(World::new().shared_for_the_process());
        let tsa_dir = token.world.path("tsa-direct");
        fixture("make-tsa.sh", &[&tsa_dir]);
        let tsa = Tsa::start(&token.world.path("tsa-http"));
        Env {
            signer: token.signer("signkey", KeyKind::Rsa),
            token,
            tsa,
            tsa_dir,
            replies: Mutex::new(0),
            http_tsa: Mutex::new(()),
        }
    })
}

/// The TSA's reply to `query` (DER TimeStampReq), from `openssl ts -reply`.
fn tsa_reply(query: &[u8]) -> Vec<u8> {
    let e = env();
    let mut n = e.replies.lock().unwrap();
    *n += 1;
    let (q, r) = (
        e.tsa_dir.join(format!("q{n}.tsq")),
        e.tsa_dir.join(format!("r{n}.tsr")),
    );
    std::fs::write(&q, query).unwrap();
    let out = Command::new("openssl")
        .args(["ts", "-reply", "-config"])
        .arg(e.tsa_dir.join("ts.cnf"))
        .arg("-queryfile")
        .arg(&q)
        .arg("-out")
        .arg(&r)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl ts -reply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&r).unwrap()
}

/// A timestamper asking the test TSA; counts its calls.
fn timestamper(calls: Arc<AtomicUsize>) -> Timestamper {
    Timestamper::new(move |req| {
        calls.fetch_add(1, Ordering::SeqCst);
        Ok(tsa_reply(req.der()))
    })
}

fn osslsigncode(args: &[&std::ffi::OsStr]) -> (bool, String) {
    env().token.osslsigncode(args)
}

/// `osslsigncode sign` with the token's key and `extra` options.
fn ossl_sign(input: &Path, output: &Path, hash: HashAlg, extra: &[&str]) {
    let mut a = vec!["-h".to_owned(), hash.as_str().to_owned()];
    a.extend(extra.iter().map(|s| (*s).to_owned()));
    env().token.ossl_sign("signkey", input, output, &a);
}

/// `osslsigncode sign -ts` with the test TSA over HTTP, which answers it once.
fn ossl_sign_stamped(input: &Path, output: &Path, hash: HashAlg) {
    let e = env();
    let _alone = e.http_tsa.lock().unwrap();
    let before = e.tsa.replies();
    ossl_sign(input, output, hash, &["-ts", &e.tsa.url]);
    assert_eq!(e.tsa.replies(), before + 1, "osslsigncode asked the TSA");
}

/// `osslsigncode verify` with the fixture certificate and the TSA's as trust anchors
/// (the engine's timestamps come from the TSA answering directly, osslsigncode's from
/// the one over HTTP).
fn verify(file: &Path) -> String {
    verify_with(file, &env().tsa_dir.join("tsa.pem"))
}

fn verify_with(file: &Path, tsa_ca: &Path) -> String {
    let e = env();
    let (ok, text) = osslsigncode(&[
        os("verify"),
        os("-CAfile"),
        e.token.world.path("cert.pem").as_os_str(),
        os("-TSA-CAfile"),
        tsa_ca.as_os_str(),
        os("-in"),
        file.as_os_str(),
    ]);
    assert!(
        ok && text.contains("Succeeded"),
        "{}: {text}",
        file.display()
    );
    assert!(!text.contains("MISMATCH"), "{text}");
    text
}

/// The unsigned attributes' OIDs of `si`, and the TSTInfo's (hash OID, imprint) of
/// its RFC 3161 counter-signature.
fn timestamp_of(si: &SignerInfo) -> (Vec<String>, (String, Vec<u8>)) {
    let attrs = si.unsigned_attrs.as_ref().expect("unsigned attributes");
    let oids = attrs.iter().map(|a| a.oid.to_string()).collect();
    let ts = attrs
        .iter()
        .find(|a| a.oid.to_string() == RFC3161)
        .expect("an RFC 3161 counter-signature");
    assert_eq!(ts.values.len(), 1);
    let token = ts.values.get(0).unwrap().to_der().unwrap();
    let ci = ContentInfo::from_der(&token).unwrap();
    assert_eq!(ci.content_type, asn1::SIGNED_DATA);
    // The TSTInfo's content type, inside (eContentType follows version and digests).
    assert!(
        hex(&token).contains(&hex(&const_oid::ObjectIdentifier::new_unwrap(TST_INFO)
            .to_der()
            .unwrap()))
    );
    let tst = signet_authenticode::tst_info(&token).unwrap();
    (
        oids,
        (
            tst.message_imprint.hash_algorithm.oid.to_string(),
            tst.message_imprint.hashed_message.as_bytes().to_vec(),
        ),
    )
}

/// Asserts that the native signature `n` and osslsigncode's `r` (made with `-ts`)
/// carry their timestamps alike: the signer's only unsigned attribute, the same OID,
/// the same hash, an imprint over each one's own signature value; and that both files
/// verify with their timestamps.
fn assert_same_timestamp(hash: HashAlg, native: (&Path, &[u8]), reference: (&Path, &[u8])) {
    let e = env();
    let n = first_signer(&signed_data(native.1));
    let r = first_signer(&signed_data(reference.1));
    let (n_oids, (n_alg, n_imprint)) = timestamp_of(&n);
    let (r_oids, (r_alg, r_imprint)) = timestamp_of(&r);
    assert_eq!(n_oids, vec![RFC3161.to_owned()]);
    assert_eq!(n_oids, r_oids);
    assert_eq!(n_alg, r_alg);
    assert_eq!(hex(&n_imprint), hex(&hash.digest(n.signature.as_bytes())));
    assert_eq!(hex(&r_imprint), hex(&hash.digest(r.signature.as_bytes())));
    for (f, ca) in [
        (native.0, e.tsa_dir.join("tsa.pem")),
        (reference.0, e.tsa.cert.clone()),
    ] {
        let text = verify_with(f, &ca);
        assert!(
            text.contains("Timestamp Server Signature verification: ok")
                && text.contains("Timestamp time:"),
            "{}: {text}",
            f.display()
        );
    }
}

/// A program and a kernel driver (IMAGE_SUBSYSTEM_NATIVE), signed whole by the engine.
#[test]
fn a_timestamped_pe_carries_what_osslsigncode_ts_writes() {
    let e = env();
    let driver = e.token.unsigned("driver.sys").unwrap();
    for (name, hash) in [
        ("app.exe", HashAlg::Sha256),
        ("app.exe", HashAlg::Sha384),
        ("driver.sys", HashAlg::Sha256),
        ("driver.sys", HashAlg::Sha512),
    ] {
        let tag = format!("ts-{}-{name}", hash.as_str());
        let input = if name == "driver.sys" {
            driver.clone()
        } else {
            e.token.world.pe(&tag)
        };
        let native = e.token.world.path(&format!("native-{tag}"));
        let reference = e.token.world.path(&format!("ossl-{tag}"));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut o = SignOptions::new(hash);
        o.timestamp = Some(timestamper(calls.clone()));
        {
            let mut i = std::fs::File::open(&input).unwrap();
            let mut out = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&native)
                .unwrap();
            sign_pe(&mut i, &mut out, &o, &e.signer).unwrap();
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "{tag}: one timestamp per signature"
        );
        ossl_sign_stamped(&input, &reference, hash);
        let (ns, rs) = (pe_signature(&native), pe_signature(&reference));
        common::assert_same_signature(&ns, &rs);
        assert_same_timestamp(hash, (&native, &ns), (&reference, &rs));
    }
}

/// PowerShell scripts in each encoding, an MSI and a cabinet, timestamped through the
/// agent's native path (extract-data, the engine signs and timestamps, attach-signature):
/// the same signature and timestamp attribute as `osslsigncode sign -ts` writes.
#[test]
fn timestamped_scripts_and_installers_through_the_agents_path_match_osslsigncode_ts() {
    let e = env();
    for (name, hash) in [
        ("utf8.ps1", HashAlg::Sha256),
        ("utf8bom.ps1", HashAlg::Sha384),
        ("utf16.ps1", HashAlg::Sha256),
        ("a.msi", HashAlg::Sha256),
        ("a.cab", HashAlg::Sha512),
    ] {
        let input = e.token.unsigned(name).unwrap();
        let native = e
            .token
            .world
            .path(&format!("ts-native-{}-{name}", hash.as_str()));
        let reference = e
            .token
            .world
            .path(&format!("ts-ossl-{}-{name}", hash.as_str()));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut o = SignOptions::new(hash);
        o.timestamp = Some(timestamper(calls.clone()));
        let tsa_ca = e.tsa_dir.join("tsa.pem");
        let sig = e.token.native_through_blob_stamped(
            &input,
            &native,
            hash,
            false,
            false,
            Some(&tsa_ca),
            |blob| sign_blob(blob, &o, &e.signer).unwrap(),
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1, "{name}");
        assert_eq!(
            e.token.ossl_signature(&native),
            sig,
            "{name}: attached as made"
        );
        ossl_sign_stamped(&input, &reference, hash);
        let rs = e.token.ossl_signature(&reference);
        common::assert_same_signature(&sig, &rs);
        assert_same_timestamp(hash, (&native, &sig), (&reference, &rs));
    }
}

#[test]
fn digest_mode_signatures_are_timestamped_too() {
    let e = env();
    let input = e.token.world.pe("blob.exe");
    let blob = e.token.world.path("blob.bin");
    let sig = e.token.world.path("blob.p7");
    let signed = e.token.world.path("blob-signed.exe");
    let (ok, text) = osslsigncode(&[
        os("extract-data"),
        os("-h"),
        os("sha256"),
        os("-in"),
        input.as_os_str(),
        os("-out"),
        blob.as_os_str(),
    ]);
    assert!(ok, "{text}");
    let calls = Arc::new(AtomicUsize::new(0));
    let mut o = SignOptions::new(HashAlg::Sha256);
    o.timestamp = Some(timestamper(calls.clone()));
    let p7 = sign_blob(&std::fs::read(&blob).unwrap(), &o, &e.signer).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    std::fs::write(&sig, &p7).unwrap();
    let (ok, text) = osslsigncode(&[
        os("attach-signature"),
        os("-sigin"),
        sig.as_os_str(),
        os("-CAfile"),
        e.token.world.path("cert.pem").as_os_str(),
        os("-TSA-CAfile"),
        e.tsa_dir.join("tsa.pem").as_os_str(),
        os("-in"),
        input.as_os_str(),
        os("-out"),
        signed.as_os_str(),
    ]);
    assert!(ok, "{text}");
    let text = verify(&signed);
    assert!(
        text.contains("Timestamp Server Signature verification: ok"),
        "{text}"
    );
}

#[test]
fn a_reply_for_another_imprint_is_refused_and_nothing_is_signed_without_one() {
    let e = env();
    let ours = TimestampRequest::over(b"our signature", HashAlg::Sha256).unwrap();
    let other = TimestampRequest::over(b"another signature", HashAlg::Sha256).unwrap();
    let wrong = tsa_reply(other.der());
    let err = ours.check(&wrong).unwrap_err();
    assert!(err.contains("message imprint"), "{err}");
    // The right one passes the same check.
    assert!(ours.check(&tsa_reply(ours.der())).is_ok());
    // A reply to a request with the same imprint but another nonce is refused too.
    let twin = TimestampRequest::over(b"our signature", HashAlg::Sha256).unwrap();
    let err = ours.check(&tsa_reply(twin.der())).unwrap_err();
    assert!(err.contains("nonce"), "{err}");
    assert!(ours.check(b"not DER").is_err());

    // Embedding checks too: a signature with a reply to another request.
    let mut o = SignOptions::new(HashAlg::Sha256);
    let cat = e.token.world.cat("refused.cat");
    let plain = sign_catalog(&std::fs::read(&cat).unwrap(), &o, &e.signer).unwrap();
    let request = TimestampRequest::for_signature(&plain, HashAlg::Sha256).unwrap();
    assert!(matches!(
        add_timestamp(&plain, &request, &wrong),
        Err(Error::Timestamp { .. })
    ));
    assert!(add_timestamp(&plain, &other, &tsa_reply(other.der())).is_err());

    // A timestamper that gets nothing: no signature comes out.
    o.timestamp = Some(Timestamper::new(|_| {
        Err(Error::Timestamp {
            tried: vec!["http://127.0.0.1:9/".into()],
            why: "connection refused".into(),
        })
    }));
    let input = e.token.world.pe("unstamped.exe");
    let out_path = e.token.world.path("unstamped-signed.exe");
    let mut i = std::fs::File::open(&input).unwrap();
    let mut out = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&out_path)
        .unwrap();
    let err = sign_pe(&mut i, &mut out, &o, &e.signer).unwrap_err();
    assert!(
        matches!(&err, Error::Timestamp { tried, .. } if tried.len() == 1),
        "{err}"
    );
    // What was written is at most the file copied on the way (it is read once): no
    // certificate table, nothing signed.
    let written = std::fs::read(&out_path).unwrap();
    let original = std::fs::read(&input).unwrap();
    assert!(original.starts_with(&written));
    assert!(
        written.is_empty()
            || PeImage::parse(&mut std::io::Cursor::new(&written))
                .unwrap()
                .signature_range()
                .is_none()
    );
}

#[test]
fn a_catalog_is_signed_as_osslsigncode_signs_it() {
    let e = env();
    let cat = e.token.world.cat("drivers.cat");
    let native = e.token.world.path("drivers-native.cat");
    let reference = e.token.world.path("drivers-ossl.cat");
    let mut o = SignOptions::new(HashAlg::Sha256);
    o.description = Some("Signet test".into());
    o.url = Some("https://signet.example/".into());
    let signed = sign_catalog(&std::fs::read(&cat).unwrap(), &o, &e.signer).unwrap();
    std::fs::write(&native, &signed).unwrap();
    ossl_sign(
        &cat,
        &reference,
        HashAlg::Sha256,
        &["-n", "Signet test", "-i", "https://signet.example/"],
    );
    let (n, r) = (
        signed_data(&signed),
        signed_data(&std::fs::read(&reference).unwrap()),
    );
    // The trust list itself, unchanged.
    let unsigned = signed_data(&std::fs::read(&cat).unwrap());
    let content = |sd: &SignedData| {
        assert_eq!(sd.encap_content_info.econtent_type.to_string(), CTL);
        sd.encap_content_info
            .econtent
            .as_ref()
            .unwrap()
            .to_der()
            .unwrap()
    };
    assert_eq!(hex(&content(&n)), hex(&content(&r)));
    assert_eq!(hex(&content(&n)), hex(&content(&unsigned)));
    assert_eq!(n.version, r.version);
    assert_eq!(n.digest_algorithms, r.digest_algorithms);
    assert_eq!(n.certificates, r.certificates);
    let (ns, rs) = (first_signer(&n), first_signer(&r));
    assert_eq!(ns.sid, rs.sid);
    assert_eq!(ns.digest_alg, rs.digest_alg);
    assert_eq!(ns.signature_algorithm, rs.signature_algorithm);
    assert_eq!(
        attributes_but_time(&ns),
        attributes_but_time(&rs),
        "authenticated attributes differ"
    );
    // contentType is the trust list's; messageDigest is over its content octets.
    let attr = |oid| {
        ns.signed_attrs
            .as_ref()
            .unwrap()
            .iter()
            .find(|a| a.oid == oid)
            .unwrap()
            .values
            .get(0)
            .unwrap()
            .clone()
    };
    let ct: const_oid::ObjectIdentifier = attr(asn1::CONTENT_TYPE).decode_as().unwrap();
    assert_eq!(ct.to_string(), CTL);
    let md: OctetString = attr(asn1::MESSAGE_DIGEST).decode_as().unwrap();
    let ctl = n.encap_content_info.econtent.as_ref().unwrap();
    assert_eq!(md.as_bytes(), HashAlg::Sha256.digest(ctl.value()));
    verify(&native);
    verify(&reference);

    // Timestamped, it verifies with the timestamp.
    let stamped = e.token.world.path("drivers-stamped.cat");
    o.timestamp = Some(timestamper(Arc::new(AtomicUsize::new(0))));
    let signed = sign_catalog(&std::fs::read(&cat).unwrap(), &o, &e.signer).unwrap();
    std::fs::write(&stamped, &signed).unwrap();
    let text = verify(&stamped);
    assert!(
        text.contains("Timestamp Server Signature verification: ok"),
        "{text}"
    );

    // Not a catalog: refused with what it is.
    let blob = sign_catalog(
        b"\x30\x03\x02\x01\x01",
        &SignOptions::new(HashAlg::Sha256),
        &e.signer,
    );
    assert!(matches!(blob, Err(Error::NotCatalog(_))), "{blob:?}");
    // A PE's signature is a signedData too, but not of a trust list.
    let input = e.token.world.pe("not-a-catalog.exe");
    let pe = e.token.world.path("not-a-catalog-signed.exe");
    {
        let mut i = std::fs::File::open(&input).unwrap();
        let mut out = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&pe)
            .unwrap();
        sign_pe(
            &mut i,
            &mut out,
            &SignOptions::new(HashAlg::Sha256),
            &e.signer,
        )
        .unwrap();
    }
    let err = sign_catalog(
        &pe_signature(&pe),
        &SignOptions::new(HashAlg::Sha256),
        &e.signer,
    );
    assert!(
        matches!(&err, Err(Error::NotCatalog(w)) if w.contains("trust list")),
        "{err:?}"
    );
}
