//! A signer for fuzzing the engine's readers: a real certificate (made once with
//! rcgen) and a signature of the right length that nothing checks. It exists only
//! here; the readers under test run before and around it.

use std::convert::Infallible;
use std::sync::OnceLock;

use signet_authenticode::{HashAlg, KeyKind, RawSigner};

#[derive(Debug)]
pub struct FuzzSigner {
    cert: Vec<u8>,
}

impl RawSigner for FuzzSigner {
    type Error = Infallible;

    fn key(&self) -> KeyKind {
        KeyKind::EcdsaP256
    }

    fn sign(&self, _hash: HashAlg, data: &[u8]) -> Result<Vec<u8>, Infallible> {
        let mut rs = HashAlg::Sha512.digest(data);
        rs[0] |= 1;
        rs[32] |= 1;
        Ok(rs)
    }

    fn certificate(&self) -> &[u8] {
        &self.cert
    }

    fn chain(&self) -> &[Vec<u8>] {
        &[]
    }
}

/// The one signer, made at the first call.
pub fn signer() -> &'static FuzzSigner {
    static SIGNER: OnceLock<FuzzSigner> = OnceLock::new();
    SIGNER.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("a P-256 key");
        let params = rcgen::CertificateParams::new(vec!["fuzz".to_owned()]).expect("params");
        let cert = params.self_signed(&key).expect("a certificate");
        FuzzSigner {
            cert: cert.der().to_vec(),
        }
    })
}
