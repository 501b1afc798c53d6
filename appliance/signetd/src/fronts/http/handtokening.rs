//! The Handtokening-compatible front (`POST /api/sign`), so existing curl and CMake
//! integrations work unchanged: its query and headers become a [`SignQuery`], and
//! errors are answered its way, `{"detail": "..."}` with the status of the code.
//! Pure: the HTTP handler in [`crate::fronts::http`] does the I/O.

use serde::Deserialize;
use signet_api::wire::{ErrorBody, ErrorCode, SignQuery, SignResponse};

/// Where Handtokening's clients send files.
pub const PATH: &str = "/api/sign";

/// The query of `POST /api/sign`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Query {
    #[serde(rename = "signing-profile")]
    signing_profile: Option<String>,
    description: Option<String>,
    url: Option<String>,
    #[serde(rename = "response-type")]
    response_type: Option<String>,
}

/// The job a Handtokening request asks for: its query string and its
/// `Content-Disposition` header.
pub fn sign_query(query: &str, disposition: Option<&str>) -> Result<SignQuery, ErrorBody> {
    let q: Query = serde_urlencoded::from_str(query).map_err(|e| {
        ErrorBody::new(
            ErrorCode::BadRequest,
            format!("bad query: {e}; the parameters are signing-profile, description, url and response-type"),
        )
    })?;
    let response = match q.response_type.as_deref() {
        None | Some("complete") => SignResponse::Complete,
        Some("pkcs7") => SignResponse::Pkcs7,
        Some(other) => {
            return Err(ErrorBody::new(
                ErrorCode::BadRequest,
                format!("response-type {other:?} is not known; use complete or pkcs7"),
            ))
        }
    };
    Ok(SignQuery {
        response,
        profile: q.signing_profile,
        filename: disposition.and_then(filename),
        description: q.description,
        url: q.url,
        ..SignQuery::default()
    })
}

/// The `filename` of a `Content-Disposition: attachment; filename="x.dll"` header.
pub fn filename(disposition: &str) -> Option<String> {
    disposition.split(';').skip(1).find_map(|param| {
        let (k, v) = param.trim().split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("filename") {
            return None;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        (!v.is_empty()).then(|| v.to_owned())
    })
}

/// An error as Handtokening answers it: the status and `{"detail": ...}`.
pub fn detail(e: &ErrorBody) -> (u16, serde_json::Value) {
    (
        e.code.http_status(),
        serde_json::json!({ "detail": e.message }),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_query_and_the_file_name_become_a_job() {
        let q = sign_query(
            "signing-profile=release&description=My%20App&url=https%3A%2F%2Fx.example%2F&response-type=complete",
            Some("attachment; filename=\"app.dll\""),
        )
        .unwrap();
        assert_eq!(q.profile.as_deref(), Some("release"));
        assert_eq!(q.description.as_deref(), Some("My App"));
        assert_eq!(q.url.as_deref(), Some("https://x.example/"));
        assert_eq!(q.filename.as_deref(), Some("app.dll"));
        assert_eq!(q.response, SignResponse::Complete);
        let q = sign_query("response-type=pkcs7", None).unwrap();
        assert_eq!(q.response, SignResponse::Pkcs7);
        let q = sign_query("", None).unwrap();
        assert_eq!(q, SignQuery::default());
    }

    #[test]
    fn bad_queries_say_what_is_understood() {
        for (query, needle) in [
            ("signing-profil=x", "signing-profile, description"),
            ("response-type=zip", "complete or pkcs7"),
        ] {
            let e = sign_query(query, None).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.contains(needle), "{query}: {}", e.message);
        }
    }

    #[test]
    fn file_names_come_from_content_disposition() {
        assert_eq!(
            filename("attachment; filename=\"x.dll\"").as_deref(),
            Some("x.dll")
        );
        assert_eq!(
            filename("attachment;filename=a.exe").as_deref(),
            Some("a.exe")
        );
        assert_eq!(
            filename("attachment; FileName=\"b c.msi\"; size=3").as_deref(),
            Some("b c.msi")
        );
        assert_eq!(filename("attachment"), None);
        assert_eq!(filename("attachment; filename=\"\""), None);
        assert_eq!(
            filename("filename=x.dll"),
            None,
            "the disposition type comes first"
        );
    }

    #[test]
    fn errors_are_details_with_the_codes_status() {
        let (status, body) = detail(&ErrorBody::new(
            ErrorCode::UnknownProfile,
            "no such profile",
        ));
        assert_eq!(status, 404);
        assert_eq!(body, serde_json::json!({"detail": "no such profile"}));
        assert_eq!(detail(&ErrorBody::new(ErrorCode::Forbidden, "x")).0, 403);
        assert_eq!(detail(&ErrorBody::new(ErrorCode::BadRequest, "x")).0, 400);
    }
}
