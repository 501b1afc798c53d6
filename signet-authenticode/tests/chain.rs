//! `verify_chain` against many anchors: a root, an intermediate the signature
//! carries, a leaf that signs; strangers around them, one of them named as the root
//! is but holding another key. Keys in memory (ring), certificates made by rcgen.
#![allow(clippy::unwrap_used)]

use std::io::Cursor;
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use signet_authenticode::{
    extract_blob, sign_blob, verify_chain, Error, HashAlg, KeyKind, RawSigner, SignOptions,
};

/// A P-256 key in memory and its certificate, with the chain the signature carries.
struct MemorySigner {
    key: EcdsaKeyPair,
    cert: Vec<u8>,
    chain: Vec<Vec<u8>>,
}

impl RawSigner for MemorySigner {
    type Error = std::io::Error;
    fn key(&self) -> KeyKind {
        KeyKind::EcdsaP256
    }
    fn sign(&self, hash: HashAlg, data: &[u8]) -> Result<Vec<u8>, Self::Error> {
        assert_eq!(hash, HashAlg::Sha256);
        let sig = self
            .key
            .sign(&SystemRandom::new(), data)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(sig.as_ref().to_vec())
    }
    fn certificate(&self) -> &[u8] {
        &self.cert
    }
    fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name
        .push(DnType::OrganizationName, "Signet");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p
}

/// A self-signed CA: what issues with it, and its DER certificate.
fn root(name: &str) -> (Issuer<'static, KeyPair>, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let params = ca_params(name);
    let cert = params.self_signed(&key).unwrap();
    (Issuer::new(params, key), cert.der().to_vec())
}

/// Data the engine signs: a PE's Authenticode data blob.
fn blob() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let pe = dir.path().join("app.exe");
    let made = std::process::Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/make-pe.sh"
        ))
        .arg(&pe)
        .status()
        .unwrap();
    assert!(made.success());
    let bytes = std::fs::read(&pe).unwrap();
    extract_blob(&mut Cursor::new(bytes), HashAlg::Sha256, false).unwrap()
}

#[test]
fn a_chain_is_found_among_many_anchors_and_a_namesake_of_its_root_is_not_taken() {
    let (root_issuer, root_der) = root("Signet Test Root");
    let mid_key = KeyPair::generate().unwrap();
    let mid_params = ca_params("Signet Test Intermediate");
    let mid_der = mid_params
        .signed_by(&mid_key, &root_issuer)
        .unwrap()
        .der()
        .to_vec();
    let mid_issuer = Issuer::new(mid_params, mid_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut lp = CertificateParams::new(Vec::<String>::new()).unwrap();
    lp.distinguished_name
        .push(DnType::CommonName, "Signet Test Code Signing");
    lp.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    let leaf_der = lp.signed_by(&leaf_key, &mid_issuer).unwrap().der().to_vec();

    let signer = MemorySigner {
        key: EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &leaf_key.serialize_der(),
            &SystemRandom::new(),
        )
        .unwrap(),
        cert: leaf_der.clone(),
        chain: vec![mid_der.clone()],
    };
    let sig = sign_blob(&blob(), &SignOptions::new(HashAlg::Sha256), &signer).unwrap();
    let now = SystemTime::now();

    // A bundle's worth of strangers, one of them named as the root is.
    let mut strangers: Vec<Vec<u8>> = (0..40)
        .map(|i| root(&format!("Signet Stranger {i}")).1)
        .collect();
    strangers.push(root("Signet Test Root").1);
    strangers.push(b"not a certificate".to_vec());

    let with = |anchor: &[u8]| {
        let mut a = strangers.clone();
        a.insert(a.len() / 2, anchor.to_vec());
        a
    };
    // Through the carried intermediate to the root; to the intermediate; the leaf
    // itself trusted.
    verify_chain(&sig, &with(&root_der), now).unwrap();
    verify_chain(&sig, &with(&mid_der), now).unwrap();
    verify_chain(&sig, &with(&leaf_der), now).unwrap();
    // The namesake holds another key: it issued nothing here.
    let err = verify_chain(&sig, &strangers, now).unwrap_err();
    assert!(
        matches!(&err, Error::Untrusted(why) if why == "unable to get local issuer certificate"),
        "{err}"
    );
    // Without the intermediate carried, the root alone is not enough.
    let alone = MemorySigner {
        chain: Vec::new(),
        ..signer
    };
    let sig = sign_blob(&blob(), &SignOptions::new(HashAlg::Sha256), &alone).unwrap();
    let err = verify_chain(&sig, &with(&root_der), now).unwrap_err();
    assert!(matches!(&err, Error::Untrusted(_)), "{err}");
    verify_chain(&sig, &with(&mid_der), now).unwrap();
}
