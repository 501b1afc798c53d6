//! What one signing job asks for, checked before the token is touched: the profile's
//! options as they arrive from the host, and whether the profile signs the format the
//! input turned out to be (a damaged file of that format is `bad_input`). Pure; [`crate::agent`] calls it.

use signet_api::wire::{
    check_timestamp_url, AgentSignQuery, ErrorBody, ErrorCode, MAX_TIMESTAMP_SERVERS,
};
use signet_format::{BlobOptions, Detected, Format, FormatError};

/// Checks the options of a job. The daemon checked them in its configuration already;
/// the agent does not take that on trust.
pub fn check_query(query: &AgentSignQuery) -> Result<(), ErrorBody> {
    let bad = |m: String| ErrorBody::new(ErrorCode::BadRequest, m);
    if query.timestamp.len() > MAX_TIMESTAMP_SERVERS {
        return Err(bad(format!(
            "at most {MAX_TIMESTAMP_SERVERS} timestamp servers may be given, not {}",
            query.timestamp.len()
        )));
    }
    for url in &query.timestamp {
        check_timestamp_url(url).map_err(|e| bad(format!("timestamp server: {e}")))?;
    }
    Ok(())
}

/// Turns what detection found into the job's format, or the error the caller gets:
/// not a format Signet signs, or not one this profile signs.
pub fn admit(
    query: &AgentSignQuery,
    detected: Result<Detected, FormatError>,
) -> Result<Detected, ErrorBody> {
    let detected = detected.map_err(|e| {
        let code = match e {
            FormatError::Empty => ErrorCode::EmptyInput,
            FormatError::Unsupported { .. }
            | FormatError::TextNotScript { .. }
            | FormatError::NotDigestBlob => ErrorCode::UnsupportedFormat,
            FormatError::Damaged { .. } => ErrorCode::BadInput,
            FormatError::Unreadable(_) => ErrorCode::Internal,
        };
        ErrorBody::new(code, e.to_string())
    })?;
    allowed(query, Some(detected.format))?;
    Ok(detected)
}

/// Whether digest mode's Authenticode data was made as the profile signs: with its
/// hash, and for a PE with page hashes exactly when it asks for them. Otherwise the
/// signature would not be the one the whole file would get. An APPX/MSIX package's
/// data is hashed as its AppxBlockMap.xml says, whole or in digest mode, whatever
/// the profile's hash: any algorithm Signet signs with is taken.
pub fn digest_matches(
    query: &AgentSignQuery,
    kind: Option<Format>,
    blob: BlobOptions,
) -> Result<(), ErrorBody> {
    let profile = query.profile.as_deref().map_or_else(
        || "this signing profile".to_owned(),
        |p| format!("the signing profile {p:?}"),
    );
    let fix = "signet does this itself from GET /v1/profile; update it if it did not";
    let want = query.hash.as_str();
    let package = kind == Some(Format::Appx) && blob.hash.is_some();
    if blob.hash != Some(query.hash) && !package {
        let made = blob
            .hash
            .map_or("an algorithm Signet does not sign with", |h| h.as_str());
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!(
                "the Authenticode data was extracted with {made}, and {profile} signs with {want}: extract it with `osslsigncode extract-data -h {want}` ({fix})"
            ),
        ));
    }
    if kind == Some(Format::Pe) && blob.page_hashes != query.page_hashes {
        let (has, asks, flag) = if blob.page_hashes {
            ("has page hashes", "signs without", "without -ph")
        } else {
            ("has no page hashes", "adds them", "with -ph")
        };
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("the Authenticode data {has}, and {profile} {asks}: extract it {flag} ({fix})"),
        ));
    }
    Ok(())
}

/// Whether the profile signs `format` (`None`: a digest whose file type cannot be
/// told, which only a profile without a format list signs).
pub fn allowed(query: &AgentSignQuery, format: Option<Format>) -> Result<(), ErrorBody> {
    if query.formats.is_empty() || format.is_some_and(|f| query.formats.contains(&f)) {
        return Ok(());
    }
    let profile = query.profile.as_deref().map_or_else(
        || "this signing profile".to_owned(),
        |p| format!("the signing profile {p:?}"),
    );
    let allowed: Vec<String> = Format::ALL
        .iter()
        .filter(|f| query.formats.contains(f))
        .map(ToString::to_string)
        .collect();
    let what = match format {
        Some(f) => format!("the file's format is {f}"),
        None => "the digest does not say which kind of file it is".to_owned(),
    };
    Err(ErrorBody::new(
        ErrorCode::UnsupportedFormat,
        format!(
            "{what}, which {profile} does not sign; it signs: {}. Use a profile that signs this format",
            allowed.join(", ")
        ),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn detected(format: Format) -> Result<Detected, FormatError> {
        Ok(Detected {
            format,
            extension: "x",
        })
    }

    #[test]
    fn a_profile_signs_only_the_formats_it_lists() {
        let all = AgentSignQuery::default();
        for f in Format::ALL {
            assert_eq!(admit(&all, detected(f)).unwrap().format, f);
        }
        let some = AgentSignQuery {
            profile: Some("drivers".into()),
            formats: vec![Format::Pe, Format::Cat],
            ..AgentSignQuery::default()
        };
        assert!(admit(&some, detected(Format::Cat)).is_ok());
        let err = admit(&some, detected(Format::Msi)).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsupportedFormat);
        assert!(
            err.message
                .contains("MSI (Windows Installer package or patch)")
                && err.message.contains("\"drivers\"")
                && err
                    .message
                    .contains("PE (EXE/DLL/SYS), CAT (security catalog)"),
            "{}",
            err.message
        );
    }

    #[test]
    fn detection_failures_keep_their_codes() {
        let q = AgentSignQuery::default();
        let cases = [
            (FormatError::Empty, ErrorCode::EmptyInput),
            (
                FormatError::Unsupported { seen: "x".into() },
                ErrorCode::UnsupportedFormat,
            ),
            (
                FormatError::TextNotScript { name: None },
                ErrorCode::UnsupportedFormat,
            ),
            (FormatError::Unreadable("x".into()), ErrorCode::Internal),
            (
                FormatError::Damaged {
                    format: Format::Pe,
                    damage: signet_format::structure::Damage("cut".into()),
                },
                ErrorCode::BadInput,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(admit(&q, Err(e)).unwrap_err().code, code);
        }
    }

    #[test]
    fn digest_data_must_be_made_as_the_profile_signs() {
        use signet_api::wire::DigestAlgorithm::*;
        let q = AgentSignQuery {
            profile: Some("release".into()),
            hash: Sha512,
            page_hashes: true,
            ..AgentSignQuery::default()
        };
        let blob = |hash, page_hashes| BlobOptions { hash, page_hashes };
        assert!(digest_matches(&q, Some(Format::Pe), blob(Some(Sha512), true)).is_ok());
        // Only PE files have pages.
        assert!(digest_matches(&q, Some(Format::Msi), blob(Some(Sha512), false)).is_ok());
        let e = digest_matches(&q, Some(Format::Pe), blob(Some(Sha256), true)).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(
            e.message.contains(
                "extracted with sha256, and the signing profile \"release\" signs with sha512"
            ) && e.message.contains("-h sha512"),
            "{}",
            e.message
        );
        let e = digest_matches(&q, Some(Format::Pe), blob(Some(Sha512), false)).unwrap_err();
        assert!(
            e.message.contains("has no page hashes") && e.message.contains("with -ph"),
            "{}",
            e.message
        );
        // A package's block map names its hash, in both modes alike.
        assert!(digest_matches(&q, Some(Format::Appx), blob(Some(Sha256), false)).is_ok());
        assert!(digest_matches(&q, Some(Format::Appx), blob(None, false)).is_err());
        let e = digest_matches(&q, None, blob(None, false)).unwrap_err();
        assert!(
            e.message.contains("an algorithm Signet does not sign with"),
            "{}",
            e.message
        );
    }

    #[test]
    fn timestamp_servers_are_checked_again() {
        let ok = AgentSignQuery {
            timestamp: vec!["http://127.0.0.1:1/".into(), "https://tsa.example/".into()],
            ..AgentSignQuery::default()
        };
        assert!(check_query(&ok).is_ok());
        let bad = AgentSignQuery {
            timestamp: vec!["file:///etc/passwd".into()],
            ..AgentSignQuery::default()
        };
        assert_eq!(check_query(&bad).unwrap_err().code, ErrorCode::BadRequest);
        let many = AgentSignQuery {
            timestamp: vec!["http://t/".into(); MAX_TIMESTAMP_SERVERS + 1],
            ..AgentSignQuery::default()
        };
        assert_eq!(check_query(&many).unwrap_err().code, ErrorCode::BadRequest);
    }
}
