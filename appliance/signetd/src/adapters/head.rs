//! What the daemon keeps outside its database, so that a database deleted, emptied
//! or cut short is noticed: `state_dir/signet.head` (JSON, mode 0600, replaced
//! atomically) holds the audit chain's head — the newest record's `seq` and hash —
//! and the mark of the last walk of the chain ([`crate::adapters::audit::Mark`]).
//!
//! Its presence says signetd has run on this state directory: a `signet.db` that is
//! then missing, empty (0 bytes), or has lost every audit record makes signetd refuse
//! to start ([`guard`], [`check_opened`]) unless the operator says `signetd
//! reset-state`. The daemon rewrites the file as records are appended ([`Keeper`]),
//! logs the head every [`LOG_EVERY`] records (a copy in the journal), and stops
//! rewriting it once the chain is found broken, so the evidence stays.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::adapters::audit::{self, KnownHead, Mark};

/// The file's name in the state directory.
pub const HEAD_FILE: &str = "signet.head";
/// The head goes to the log every this many records.
pub const LOG_EVERY: u64 = 100;

/// The file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Records in the chain (the newest record's `seq`).
    pub records: u64,
    /// The newest record's hash (64 zeros for none).
    pub hash: String,
    /// The walk's mark: the newest row and the edit count then.
    pub row: i64,
    pub edits: i64,
    /// When it was written (RFC 3339).
    pub time: String,
}

impl Head {
    pub fn of(mark: &Mark) -> Head {
        Head {
            records: mark.records,
            hash: mark.head.clone(),
            row: mark.row,
            edits: mark.edits,
            time: audit::now_rfc3339(),
        }
    }

    pub fn mark(&self) -> Mark {
        Mark {
            row: self.row,
            records: self.records,
            head: self.hash.clone(),
            edits: self.edits,
        }
    }

    pub fn known(&self, state_dir: &Path) -> KnownHead {
        KnownHead {
            records: self.records,
            hash: self.hash.clone(),
            at: format!("in {}", path(state_dir).display()),
        }
    }
}

/// The state directory cannot be trusted as it is.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("{db} is {what}, but signetd has run on {dir} before ({HEAD_FILE} records {records} audit records, written {time}): starting afresh would lose the audit history and reuse job ids. Restore {db} from a backup, or, to start afresh on purpose, run `signetd reset-state`, then start signetd")]
    Lost {
        db: PathBuf,
        dir: PathBuf,
        what: &'static str,
        records: u64,
        time: String,
    },
    #[error("{path} cannot be read ({detail}); it holds the audit chain's head. Restore it from a backup, or run `signetd reset-state` to start a new one")]
    Unreadable { path: PathBuf, detail: String },
    #[error(
        "{path} cannot be written: {source}; check the state directory's disk and permissions"
    )]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(HEAD_FILE)
}

/// The head file, if signetd has written one.
pub fn read(state_dir: &Path) -> Result<Option<Head>, HeadError> {
    let p = path(state_dir);
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| HeadError::Unreadable {
                path: p,
                detail: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(HeadError::Unreadable {
            path: p,
            detail: e.to_string(),
        }),
    }
}

/// Replaces the head file atomically (a temporary file, fsync'd, renamed over it, the
/// directory fsync'd), private to root.
pub fn write(state_dir: &Path, head: &Head) -> Result<(), HeadError> {
    let p = path(state_dir);
    let tmp = state_dir.join(format!("{HEAD_FILE}.tmp"));
    let err = |source| HeadError::Write {
        path: p.clone(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    let json = serde_json::to_vec(head).map_err(|e| err(std::io::Error::other(e)))?;
    f.write_all(&json).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, &p).map_err(err)?;
    crate::adapters::store::sync_dir(state_dir).map_err(err)
}

/// Before the database is opened: with `reset`, forgets the head (the database as it
/// is, or a new one, is the truth from now on); otherwise refuses a database that is
/// missing or empty where signetd has run. Answers the head to hold the log against.
pub fn guard(state_dir: &Path, reset: bool) -> Result<Option<Head>, HeadError> {
    let db = state_dir.join(crate::adapters::store::DB_FILE);
    if reset {
        let old = read(state_dir).ok().flatten();
        match std::fs::remove_file(path(state_dir)) {
            Ok(()) => tracing::warn!(
                head = ?old.as_ref().map(|h| format!("{}:{}", h.hash, h.records)),
                db = %db.display(),
                "reset-state: the audit head kept outside the database is forgotten; {} is taken as it is (a new one if it is missing)",
                db.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(HeadError::Write {
                    path: path(state_dir),
                    source: e,
                })
            }
        }
        return Ok(None);
    }
    let Some(head) = read(state_dir)? else {
        return Ok(None);
    };
    let what = match std::fs::metadata(&db) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("missing"),
        Ok(m) if m.len() == 0 => Some("empty"),
        _ => None,
    };
    match what {
        Some(what) => Err(HeadError::Lost {
            db,
            dir: state_dir.to_owned(),
            what,
            records: head.records,
            time: head.time,
        }),
        None => Ok(Some(head)),
    }
}

/// After the database is opened: refuses one that has lost every audit record the
/// head says were written (a database replaced by a new one).
pub fn check_opened(
    state_dir: &Path,
    conn: &rusqlite::Connection,
    head: Option<&Head>,
) -> Result<(), HeadError> {
    let Some(head) = head else { return Ok(()) };
    let count: u64 = conn
        .query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))
        .unwrap_or(0);
    if head.records > 0 && count == 0 {
        return Err(HeadError::Lost {
            db: state_dir.join(crate::adapters::store::DB_FILE),
            dir: state_dir.to_owned(),
            what: "without any audit record",
            records: head.records,
            time: head.time.clone(),
        });
    }
    Ok(())
}

/// Keeps the head file up to date and the chain checked, for the daemon's life.
#[derive(Debug)]
pub struct Keeper {
    state_dir: PathBuf,
    /// The last head written (or read at start).
    last: Option<Head>,
    /// Why the chain is broken, once it is: the file is no longer rewritten.
    pub broken: Option<String>,
}

impl Keeper {
    pub fn new(state_dir: &Path, head: Option<Head>) -> Keeper {
        Keeper {
            state_dir: state_dir.to_owned(),
            last: head,
            broken: None,
        }
    }

    /// The head last kept.
    pub fn head(&self) -> Option<&Head> {
        self.last.as_ref()
    }

    /// Checks the chain from the last mark (appended records only, while the mark
    /// holds) against the last head kept, then keeps the new head. Answers the fault
    /// when the chain is broken (logged once).
    pub fn check(&mut self, conn: &rusqlite::Connection) -> Option<String> {
        if self.broken.is_some() {
            return self.broken.clone();
        }
        let known = self.last.as_ref().map(|h| h.known(&self.state_dir));
        let mark = self.last.as_ref().map(Head::mark);
        match audit::check_all(conn, mark.as_ref(), known.as_ref()) {
            Ok((_, mark)) => {
                let head = Head::of(&mark);
                let changed = self
                    .last
                    .as_ref()
                    .is_none_or(|l| (l.records, &l.hash) != (head.records, &head.hash));
                if changed {
                    let before = self.last.as_ref().map_or(0, |l| l.records);
                    if head.records / LOG_EVERY > before / LOG_EVERY {
                        tracing::info!(records = head.records, head = %format!("{}:{}", head.hash, head.records), "audit chain head (keep it elsewhere to check the log with `signetd audit verify --head`)");
                    }
                    if let Err(e) = write(&self.state_dir, &head) {
                        tracing::error!(error = %e, "the audit head cannot be kept outside the database");
                    }
                    self.last = Some(head);
                }
                None
            }
            Err(e @ audit::AuditError::Db(_)) => {
                tracing::warn!(error = %e, "the audit log cannot be checked now");
                None
            }
            Err(e) => {
                let why = format!("the audit log is broken: {e}. If this signet.db is the one to keep (an older backup restored on purpose), run `signetd reset-state` and restart signetd to take it as it is");
                tracing::error!(kind = e.kind(), record = ?e.record(), "{why}");
                self.broken = Some(why);
                self.broken.clone()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn head(records: u64) -> Head {
        Head {
            records,
            hash: "ab".repeat(32),
            row: records as i64,
            edits: 0,
            time: "2026-12-02T08:00:00.000Z".into(),
        }
    }

    #[test]
    fn the_head_is_written_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        write(dir.path(), &head(3)).unwrap();
        write(dir.path(), &head(4)).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(head(4)));
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_missing_or_empty_database_is_refused_once_signetd_has_run() {
        let dir = tempfile::tempdir().unwrap();
        // Never ran: a new database is fine.
        assert_eq!(guard(dir.path(), false).unwrap(), None);
        write(dir.path(), &head(2)).unwrap();
        let e = guard(dir.path(), false).unwrap_err();
        assert!(
            e.to_string().contains("is missing") && e.to_string().contains("signetd reset-state"),
            "{e}"
        );
        std::fs::write(dir.path().join(crate::adapters::store::DB_FILE), b"").unwrap();
        let e = guard(dir.path(), false).unwrap_err();
        assert!(e.to_string().contains("is empty"), "{e}");
        // Said on purpose: the head is forgotten.
        assert_eq!(guard(dir.path(), true).unwrap(), None);
        assert_eq!(read(dir.path()).unwrap(), None);
    }
}
