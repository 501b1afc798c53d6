//! Remote clients: a name, a secret, the profiles it may use and an expiry, in the
//! `clients` table of the daemon's database (`state_dir/signet.db`).
//!
//! A secret is 160 random bits, shown once when the client is added and stored only as
//! its SHA-256. A fast hash is enough here: slow password hashes exist to protect
//! guessable passwords, and a 160-bit random secret cannot be guessed, so its hash
//! cannot be reversed by trying candidates either. Secrets travel as the password of
//! HTTP Basic authentication, over TLS only.

use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

/// Bytes of randomness in a secret (160 bits).
pub const SECRET_BYTES: usize = 20;

/// A client as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClientInfo {
    pub name: String,
    pub profiles: Vec<String>,
    /// Unix time (seconds) it was added.
    pub created: i64,
    /// Unix time (seconds) after which its secret is refused.
    pub expires: i64,
}

/// Why a client could not be added, found or authenticated.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("client name {0:?} may only use letters, digits, '-', '_' and '.' (at most 64)")]
    BadName(String),
    #[error("a client named {0:?} exists; remove it first (signetd client remove {0})")]
    Exists(String),
    #[error("no client is named {0:?}; see signetd client list")]
    NoSuchClient(String),
    #[error("cannot create the state directory {path}: {message}; set state_dir in signetd.toml")]
    StateDir { path: String, message: String },
    #[error("the client database failed: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("cannot make a random secret: {0}")]
    Random(String),
}

/// Why a client's credentials were refused. Callers are told only that they were:
/// which of these it was goes to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("no such client")]
    Unknown,
    #[error("wrong secret")]
    WrongSecret,
    #[error("the secret has expired")]
    Expired,
}

/// Opens (creating it if needed) the daemon's database `state_dir/signet.db` in WAL
/// mode, with the `clients` table.
pub fn open(state_dir: &std::path::Path) -> Result<Connection, ClientError> {
    std::fs::create_dir_all(state_dir).map_err(|e| ClientError::StateDir {
        path: state_dir.display().to_string(),
        message: e.to_string(),
    })?;
    let conn = Connection::open(state_dir.join("signet.db"))?;
    // signetd may be opening the database at the same time: wait for it.
    conn.busy_timeout(Duration::from_secs(5))?;
    crate::adapters::store::wal(&conn)?;
    init(&conn)?;
    Ok(conn)
}

/// Creates the `clients` table if it is not there.
pub fn init(conn: &Connection) -> Result<(), ClientError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS clients (
            name TEXT PRIMARY KEY,
            secret_sha256 BLOB NOT NULL,
            profiles TEXT NOT NULL,
            created INTEGER NOT NULL,
            expires INTEGER NOT NULL
        )",
    )?;
    Ok(())
}

/// Whether `name` is a usable client name.
pub fn check_name(name: &str) -> Result<(), ClientError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ClientError::BadName(name.to_owned()));
    }
    Ok(())
}

/// A new random secret, as the client sends it (40 hex digits).
pub fn new_secret() -> Result<String, ClientError> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| ClientError::Random(e.to_string()))?;
    Ok(hex(&bytes))
}

use signet_api::hex::lower as hex;

fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Adds a client valid for `valid` from `now` (unix seconds) that may use `profiles`;
/// answers its secret, which is not stored and cannot be shown again.
pub fn add(
    conn: &Connection,
    name: &str,
    profiles: &[String],
    valid: Duration,
    now: i64,
) -> Result<String, ClientError> {
    check_name(name)?;
    let secret = new_secret()?;
    let expires = now.saturating_add(i64::try_from(valid.as_secs()).unwrap_or(i64::MAX));
    let inserted = conn.execute(
        "INSERT OR IGNORE INTO clients (name, secret_sha256, profiles, created, expires) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![name, digest(&secret), profiles.join(","), now, expires],
    )?;
    if inserted == 0 {
        return Err(ClientError::Exists(name.to_owned()));
    }
    Ok(secret)
}

/// Every client, by name.
pub fn list(conn: &Connection) -> Result<Vec<ClientInfo>, ClientError> {
    let mut stmt =
        conn.prepare("SELECT name, profiles, created, expires FROM clients ORDER BY name")?;
    let rows = stmt.query_map([], |r| {
        Ok(ClientInfo {
            name: r.get(0)?,
            profiles: split(&r.get::<_, String>(1)?),
            created: r.get(2)?,
            expires: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn split(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Removes a client; its secret stops working at once.
pub fn remove(conn: &Connection, name: &str) -> Result<(), ClientError> {
    if conn.execute("DELETE FROM clients WHERE name = ?1", params![name])? == 0 {
        return Err(ClientError::NoSuchClient(name.to_owned()));
    }
    Ok(())
}

/// Checks `name`'s `secret` at `now`; answers the profiles the client may use.
pub fn authenticate(
    conn: &Connection,
    name: &str,
    secret: &str,
    now: i64,
) -> Result<Result<Vec<String>, AuthFailure>, ClientError> {
    let row: Option<(Vec<u8>, String, i64)> = conn
        .query_row(
            "SELECT secret_sha256, profiles, expires FROM clients WHERE name = ?1",
            params![name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((stored, profiles, expires)) = row else {
        return Ok(Err(AuthFailure::Unknown));
    };
    // Compare every byte, whatever the first difference.
    let given = digest(secret);
    let same = stored.len() == given.len()
        && stored
            .iter()
            .zip(&given)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return Ok(Err(AuthFailure::WrongSecret));
    }
    if now >= expires {
        return Ok(Err(AuthFailure::Expired));
    }
    Ok(Ok(split(&profiles)))
}

/// A validity like `90s`, `30m`, `4h`, `7d` or `2w`.
pub fn parse_validity(s: &str) -> Result<Duration, String> {
    let err =
        || format!("{s:?} is not a validity; write a number and a unit: 90s, 30m, 4h, 7d, 2w");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| err())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(err()),
    };
    if n == 0 {
        return Err(err());
    }
    n.checked_mul(mult).map(Duration::from_secs).ok_or_else(err)
}

/// `Authorization: Basic ...` as a name and a secret; `None` when it is not that.
pub fn parse_basic(header: &str) -> Option<(String, String)> {
    use base64::Engine;
    let (scheme, value) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (name, secret) = text.split_once(':')?;
    Some((name.to_owned(), secret.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        init(&c).unwrap();
        init(&c).unwrap();
        c
    }

    #[test]
    fn a_secret_is_shown_once_and_only_its_hash_is_kept() {
        let c = db();
        let s = add(
            &c,
            "ci",
            &["release".into()],
            Duration::from_secs(3600),
            1000,
        )
        .unwrap();
        assert_eq!(s.len(), 2 * SECRET_BYTES);
        assert!(s.chars().all(|c| c.is_ascii_hexdigit()));
        let stored: Vec<u8> = c
            .query_row("SELECT secret_sha256 FROM clients", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, Sha256::digest(s.as_bytes()).to_vec());
        let dump: String = c
            .query_row(
                "SELECT name || profiles || created || expires FROM clients",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(!dump.contains(&s));
        let other = add(&c, "cd", &[], Duration::from_secs(1), 1000).unwrap();
        assert_ne!(s, other, "secrets are random");
    }

    #[test]
    fn authentication_checks_the_secret_and_the_expiry() {
        let c = db();
        let s = add(
            &c,
            "ci",
            &["release".into(), "test".into()],
            Duration::from_secs(3600),
            1000,
        )
        .unwrap();
        assert_eq!(
            authenticate(&c, "ci", &s, 1000).unwrap(),
            Ok(vec!["release".to_owned(), "test".to_owned()])
        );
        assert_eq!(
            authenticate(&c, "ci", &s, 4599).unwrap().map(|_| ()),
            Ok(())
        );
        assert_eq!(
            authenticate(&c, "ci", &s, 4600).unwrap(),
            Err(AuthFailure::Expired)
        );
        assert_eq!(
            authenticate(&c, "ci", "00", 1000).unwrap(),
            Err(AuthFailure::WrongSecret)
        );
        assert_eq!(
            authenticate(&c, "cd", &s, 1000).unwrap(),
            Err(AuthFailure::Unknown)
        );
        remove(&c, "ci").unwrap();
        assert_eq!(
            authenticate(&c, "ci", &s, 1000).unwrap(),
            Err(AuthFailure::Unknown)
        );
        assert!(matches!(
            remove(&c, "ci"),
            Err(ClientError::NoSuchClient(_))
        ));
    }

    #[test]
    fn names_are_checked_and_unique() {
        let c = db();
        add(&c, "ci-1.x", &[], Duration::from_secs(1), 0).unwrap();
        assert!(matches!(
            add(&c, "ci-1.x", &[], Duration::from_secs(1), 0),
            Err(ClientError::Exists(_))
        ));
        for bad in ["", "a b", "a:b", "ü", &"x".repeat(65)] {
            assert!(
                matches!(
                    add(&c, bad, &[], Duration::from_secs(1), 0),
                    Err(ClientError::BadName(_))
                ),
                "{bad}"
            );
        }
        let l = list(&c).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].name, "ci-1.x");
        assert_eq!(l[0].expires, 1);
    }

    #[test]
    fn validities_parse() {
        assert_eq!(parse_validity("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_validity("4h").unwrap(), Duration::from_secs(4 * 3600));
        assert_eq!(
            parse_validity("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        for bad in [
            "",
            "4",
            "h",
            "4x",
            "0h",
            "-1h",
            "4 h",
            "99999999999999999999w",
        ] {
            let e = parse_validity(bad).unwrap_err();
            assert!(e.contains("4h"), "{bad}: {e}");
        }
    }

    #[test]
    fn basic_credentials_parse() {
        // "ci:s3cr:et" — the secret may contain a colon, the name may not.
        assert_eq!(
            parse_basic("Basic Y2k6czNjcjpldA=="),
            Some(("ci".into(), "s3cr:et".into()))
        );
        assert_eq!(
            parse_basic("basic Y2k6"),
            Some(("ci".into(), String::new()))
        );
        for bad in ["Bearer abc", "Basic", "Basic !!!", "Basic Y2k="] {
            assert_eq!(parse_basic(bad), None, "{bad}");
        }
    }
}
