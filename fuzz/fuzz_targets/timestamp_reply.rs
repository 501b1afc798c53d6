//! The RFC 3161 reply reader and its checks on any bytes: `TimestampRequest::check`
//! (a TimeStampResp: status, the token, its TSTInfo, imprint, nonce, signers) and
//! `tst_info` on the same bytes as a token — what a timestamp server, reached over
//! plain HTTP, sends the agent. The request has a fixed nonce (feature `fuzzing`) so
//! that the seeds, replies of `openssl ts -reply` to it, pass every check and the
//! fuzzer starts from accepted replies.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use signet_authenticode::{tst_info, HashAlg, TimestampRequest};

/// The signature value the seeds' requests are over, and their nonce
/// (scripts/fuzz.sh writes the same request).
const SIGNATURE_VALUE: &[u8] = b"signet fuzz signature value";
const NONCE: [u8; 8] = *b"ABCDEFGH";

fn request() -> &'static TimestampRequest {
    static REQUEST: OnceLock<TimestampRequest> = OnceLock::new();
    REQUEST.get_or_init(|| {
        TimestampRequest::with_nonce(SIGNATURE_VALUE, HashAlg::Sha256, NONCE).expect("the request")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = request().check(data) {
        let _ = tst_info(&token).expect("an accepted token's TSTInfo reads");
    }
    let _ = tst_info(data);
});
