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

/// The bytes of hex text (either case, two digits a byte, nothing between); `None`
/// when it is not that.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    let digit = |b: u8| char::from(b).to_digit(16);
    text.as_bytes()
        .chunks(2)
        .map(|pair| Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_forms() {
        assert_eq!(lower(&[]), "");
        assert_eq!(lower(&[0, 0x0f, 0xab, 0xff]), "000fabff");
        assert_eq!(upper(&[0, 0x0f, 0xab, 0xff]), "000FABFF");
        assert_eq!(decode("000fabFF"), Some(vec![0, 0x0f, 0xab, 0xff]));
        assert_eq!(decode(""), Some(vec![]));
        for bad in ["0", "0g", "+1", "é1"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
        assert_eq!(upper_joined(&[0x0a, 0xbc], ":"), "0A:BC");
        assert_eq!(upper_joined(&[0x0a], ":"), "0A");
        assert_eq!(upper_joined(&[], ":"), "");
    }
}
