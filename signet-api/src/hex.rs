//! Bytes as hexadecimal text: digests, key ids, fingerprints, USB ids.

use std::fmt::Write;

/// Lower-case hex, two digits a byte, nothing between (`"00ff"`).
pub fn lower(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Upper-case hex, two digits a byte, nothing between (`"00FF"`).
pub fn upper(bytes: &[u8]) -> String {
    upper_joined(bytes, "")
}

/// Upper-case hex, two digits a byte, `sep` between them (`"00:FF"`).
pub fn upper_joined(bytes: &[u8], sep: &str) -> String {
    let mut s = String::with_capacity(bytes.len() * (2 + sep.len()));
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push_str(sep);
        }
        let _ = write!(s, "{b:02X}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_forms() {
        assert_eq!(lower(&[]), "");
        assert_eq!(lower(&[0, 0x0f, 0xab, 0xff]), "000fabff");
        assert_eq!(upper(&[0, 0x0f, 0xab, 0xff]), "000FABFF");
        assert_eq!(upper_joined(&[0x0a, 0xbc], ":"), "0A:BC");
        assert_eq!(upper_joined(&[0x0a], ":"), "0A");
        assert_eq!(upper_joined(&[], ":"), "");
    }
}
