//! Format detection and the structure checks, on any bytes: what every uploaded file
//! and every digest-mode blob meets first, in signetd, the agent and the client.
#![no_main]

use libfuzzer_sys::fuzz_target;
use signet_format::{detect, detect_digest_blob, digest_blob_options, structure, Format};

fuzz_target!(|data: &[u8]| {
    for name in [None, Some("x.ps1"), Some("x.psd1")] {
        if let Ok(found) = detect(data, name) {
            let _ = structure::check(data, data.len() as u64, found.format);
        }
    }
    for format in [Format::Pe, Format::Msi, Format::Cab, Format::Cat] {
        let _ = structure::check(data, data.len() as u64, format);
    }
    let _ = detect_digest_blob(data);
    let _ = digest_blob_options(data);
});
