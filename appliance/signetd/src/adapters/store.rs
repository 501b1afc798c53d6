//! The daemon's durable state: `state_dir/signet.db` (SQLite) and `state_dir/spool/`.
//!
//! The database runs in WAL mode with `synchronous = FULL`: every commit is on disk
//! when it returns, so a job the daemon said it accepted survives a power cut, not only
//! a crash of the daemon. The schema carries its version in `PRAGMA user_version`. The
//! WAL is copied into the database beside the writer ([`Store::checkpoint`]), not in
//! the commits of jobs.
//!
//! A job's row is written (state `receiving`) **before** its input is read, by a commit
//! not flushed by itself (the client has been told nothing yet; `kill -9` keeps it, as
//! the WAL is in the kernel's cache, and the job's next commit flushes it). An input of
//! at most [`INLINE_MAX`] bytes is kept in the database (table `blobs`) and committed
//! with `queued` in one transaction; a larger one is spooled to `spool/<id>.in` and
//! fsync'd with its directory before the job becomes `queued`. Likewise a result of at
//! most [`INLINE_MAX`] bytes is committed with `signed` and the audit record
//! ([`crate::adapters::audit::append`]) in one transaction, a larger one goes to
//! `spool/<id>.out`, fsync'd, before that transaction. A PE the agent signed natively
//! is kept as its spooled input and what signing changed in it (table `patches`,
//! committed with `signed`; see [`crate::adapters::patched`]): nothing of the input is
//! written over. Inputs are removed when the job ends (an inline one in the transaction
//! that ends it), results when they expire.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};
use signet_api::wire::patch::{Checked, Patch};
use signet_api::wire::{ErrorBody, JobState};

use crate::adapters::audit::{self, Entry};

/// The schema this code reads and writes (2: small inputs and results inline, in
/// `blobs`; 3: results kept as their input and a patch, in `patches`). A signetd that
/// knows an older one would not find them, so it refuses to open.
pub const SCHEMA_VERSION: i64 = 3;
/// The largest input or result kept in the database instead of a spool file: a
/// digest-mode body (the Authenticode data, a signature) always, a small signed file.
pub const INLINE_MAX: u64 = 64 << 10;

/// Whether an input or result of `n` bytes is kept in the database ([`INLINE_MAX`]),
/// not in a spool file.
pub fn kept_inline(n: u64) -> bool {
    n <= INLINE_MAX
}

/// The database's file name in the state directory.
pub const DB_FILE: &str = "signet.db";

/// The state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the job database cannot be read or written: {0}; check the disk and the permissions of the state directory")]
    Db(#[from] rusqlite::Error),
    #[error("the state directory cannot be used: {0}; check `state_dir` in signetd.toml, the disk and its permissions")]
    Io(#[from] std::io::Error),
    #[error("the job database has schema version {found}, this signetd knows up to {SCHEMA_VERSION}; run the signetd that wrote it, or move {DB_FILE} away")]
    Schema { found: i64 },
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error("the job database {path} is damaged ({detail}); signetd does not start on it. Stop here, keep a copy of the state directory, then restore {DB_FILE} from a backup (or salvage it: sqlite3 {DB_FILE} .recover | sqlite3 {DB_FILE}.new, and move the new one in its place); `signetd reset-state` starts afresh once the file is moved away")]
    Damaged { path: PathBuf, detail: String },
}

impl StoreError {
    /// Whether the disk under the state directory is full (SQLite's `SQLITE_FULL`,
    /// or `ENOSPC`/`EDQUOT` from a file).
    pub fn disk_full(&self) -> bool {
        match self {
            StoreError::Db(e) | StoreError::Audit(audit::AuditError::Db(e)) => db_disk_full(e),
            StoreError::Io(e) => io_disk_full(e),
            _ => false,
        }
    }
}

/// Whether SQLite said the database file is damaged or not a database.
pub fn db_damaged(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase))
}

/// Whether SQLite said the disk is full.
pub fn db_disk_full(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull)
}

/// Whether a file operation failed for want of space (`ENOSPC`, or `EDQUOT`: a quota).
pub fn io_disk_full(e: &std::io::Error) -> bool {
    /// Linux's `EDQUOT`.
    const EDQUOT: i32 = 122;
    e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(EDQUOT)
}

/// What a job asks of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sign,
    Batch,
}

impl Kind {
    fn as_str(&self) -> &'static str {
        match self {
            Kind::Sign => "sign",
            Kind::Batch => "batch",
        }
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    pub id: String,
    pub caller: String,
    pub transport: String,
    pub idempotency_key: Option<String>,
    pub kind: Kind,
    pub profile: String,
    pub filename: Option<String>,
    /// The agent's query string.
    pub agent_query: String,
    /// The input's content type (a batch's carries its multipart boundary).
    pub content_type: String,
    pub state: JobState,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub attempts: u32,
    pub input_sha256: Option<String>,
    pub input_bytes: Option<u64>,
    pub output_sha256: Option<String>,
    pub output_bytes: Option<u64>,
    /// The result's content type.
    pub output_type: Option<String>,
    pub error: Option<ErrorBody>,
    /// The result file was removed (expired).
    pub result_gone: bool,
}

/// A job about to be recorded.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub caller: String,
    pub transport: String,
    pub idempotency_key: Option<String>,
    pub kind: Kind,
    pub profile: String,
    pub filename: Option<String>,
    pub agent_query: String,
    pub content_type: String,
    /// What the idempotency key is bound to: the SHA-256 of the request as the caller
    /// asked it (kind, profile, options); the body's is `input_sha256`.
    pub request_sha256: Option<String>,
}

/// The answer to [`Store::insert`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    New(String),
    /// The caller already sent this idempotency key: its job.
    Existing(String),
}

/// The database and the spool.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    /// Read-only connections for the readers ([`Store::reader`]).
    reader: std::sync::Arc<Reader>,
    spool: PathBuf,
    quota: u64,
    /// Inputs and undelivered results (reserved or written).
    used: AtomicU64,
    /// Delivered results kept for a retry (`<id>.delivered`): dropped for room.
    kept: AtomicU64,
    /// One eviction of delivered results at a time.
    evicting: Mutex<()>,
    /// The connection [`Store::checkpoint`] runs on (opened at its first run), so that
    /// the writer's commits never wait for a checkpoint.
    checkpointer: Mutex<Option<Checkpointer>>,
}

/// [`Store::checkpoint`]'s connection, and the database's `data_version` as it saw it
/// after its last run: unchanged, no other connection has committed since.
#[derive(Debug)]
struct Checkpointer {
    conn: Connection,
    seen: Option<i64>,
}

/// The WAL's size, in pages, at which the writer checkpoints it itself: a backstop
/// for a [`Store::checkpoint`] that does not run (SQLite's own default is 1000).
const WAL_BACKSTOP_PAGES: i64 = 16_000;

/// The extension of a delivered result's kept copy.
const DELIVERED_EXT: &str = "delivered";

/// A delivered result kept for a retry.
#[derive(Debug)]
enum KeptCopy {
    /// `<id>.delivered` in the spool.
    File(PathBuf),
    /// In the database (`blobs`, part `out`, `kept = 1`).
    Inline,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    i64::try_from(now_ms() / 1000).unwrap_or(i64::MAX)
}

fn state_name(s: JobState) -> &'static str {
    s.as_str()
}

impl Store {
    /// Opens (creating) the database and the spool under `state_dir`.
    pub fn open(state_dir: &Path, spool_quota: u64) -> Result<Store, StoreError> {
        let db = state_dir.join(DB_FILE);
        Self::open_unchecked(state_dir, spool_quota).map_err(|e| match e {
            StoreError::Db(e) if db_damaged(&e) => StoreError::Damaged {
                path: db,
                detail: e.to_string(),
            },
            e => e,
        })
    }

    fn open_unchecked(state_dir: &Path, spool_quota: u64) -> Result<Store, StoreError> {
        let spool = state_dir.join("spool");
        std::fs::create_dir_all(&spool)?;
        let conn = Connection::open(state_dir.join(DB_FILE))?;
        // Another process may have the database (signetd and `signetd pair` run just
        // after its start both open it): wait for it rather than fail.
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // A damaged page is found now, not by the jobs that would fail on it.
        let problems: Vec<String> = {
            let mut stmt = conn.prepare("PRAGMA quick_check")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            rows.collect::<Result<_, _>>()?
        };
        if problems.first().map(String::as_str) != Some("ok") {
            return Err(StoreError::Damaged {
                path: state_dir.join(DB_FILE),
                detail: problems.into_iter().take(3).collect::<Vec<_>>().join("; "),
            });
        }
        wal(&conn)?;
        // The job path's statements are compiled once and kept (`prepare_cached`): each
        // job runs some twenty, and SQLite's parser showed in profiles of small jobs.
        conn.set_prepared_statement_cache_capacity(64);
        conn.pragma_update(None, "synchronous", "FULL")?;
        // The WAL is copied into the database by [`Store::checkpoint`], beside the
        // writer; SQLite's own checkpoint ran inside a job's commit, on a runtime thread
        // (two fsyncs of the WAL and one of the database: a 4.5 ms stall was seen).
        conn.pragma_update(None, "wal_autocheckpoint", WAL_BACKSTOP_PAGES)?;
        // The schema is set up in one write transaction: a second process setting it
        // up at the same time waits, then finds it done.
        let setup =
            rusqlite::Transaction::new_unchecked(&conn, rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = setup.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Schema { found: version });
        }
        setup.execute_batch(
            "CREATE TABLE IF NOT EXISTS jobs (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                caller TEXT NOT NULL,
                transport TEXT NOT NULL,
                idempotency_key TEXT,
                kind TEXT NOT NULL,
                profile TEXT NOT NULL,
                filename TEXT,
                agent_query TEXT NOT NULL,
                content_type TEXT NOT NULL,
                state TEXT NOT NULL,
                created_ms INTEGER NOT NULL,
                started_ms INTEGER,
                finished_ms INTEGER,
                attempts INTEGER NOT NULL DEFAULT 0,
                input_sha256 TEXT,
                input_bytes INTEGER,
                output_sha256 TEXT,
                output_bytes INTEGER,
                output_type TEXT,
                error TEXT,
                result_gone INTEGER NOT NULL DEFAULT 0
            );
            CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency
                ON jobs(caller, idempotency_key) WHERE idempotency_key IS NOT NULL;
            CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
            CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_ms);",
        )?;
        add_request_column(&conn)?;
        init_blobs(&conn)?;
        init_patches(&conn)?;
        audit::init(&conn)?;
        init_timeline(&conn)?;
        setup.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        setup.commit()?;
        let (mut used, mut kept) = spool_sizes(&spool)?;
        let (inline_used, inline_kept) = inline_sizes(&conn)?;
        used += inline_used;
        kept += inline_kept;
        Ok(Store {
            conn: Mutex::new(conn),
            reader: std::sync::Arc::new(Reader::new(state_dir.join(DB_FILE))),
            spool,
            quota: spool_quota,
            used: AtomicU64::new(used),
            kept: AtomicU64::new(kept),
            evicting: Mutex::new(()),
            checkpointer: Mutex::new(None),
        })
    }

    /// Copies what the WAL holds into the database file (a passive checkpoint, on a
    /// connection of its own: the writer's commits go on meanwhile). It blocks: run it
    /// off the runtime's threads. Answers (frames in the WAL, frames copied); (0, 0)
    /// when no other connection has committed since its last run.
    ///
    /// Once all is copied, the next write starts the WAL from its start again, and
    /// writes and flushes its header first: a job's first commit after a pause (its
    /// record, on its way to the agent) waited for that flush (~0.5 ms). So the
    /// checkpoint starts the WAL again itself, with a write that changes nothing
    /// (`user_version` set to what it is, on the writer's connection), and runs again
    /// only once something else was committed: while nothing happens the WAL keeps that
    /// one frame, and nothing is written.
    pub fn checkpoint(&self) -> Result<(i64, i64), StoreError> {
        let mut slot = self.checkpointer.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let conn = Connection::open(&self.reader.db)?;
            conn.busy_timeout(std::time::Duration::from_secs(10))?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            *slot = Some(Checkpointer { conn, seen: None });
        }
        let c = slot.as_mut().expect("opened above");
        let version = |conn: &Connection| -> rusqlite::Result<i64> {
            conn.pragma_query_value(None, "data_version", |r| r.get(0))
        };
        if c.seen.is_some() && c.seen == Some(version(&c.conn)?) {
            return Ok((0, 0));
        }
        let (frames, copied): (i64, i64) =
            c.conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get(1)?, r.get(2)?))
                })?;
        if frames > 0 && copied == frames {
            // On the writer's connection: no other connection writes, so that none of
            // the writer's transactions ever finds its snapshot outdated by a commit
            // that is not its own (SQLITE_BUSY_SNAPSHOT).
            let w = self.conn();
            let v: i64 = w.pragma_query_value(None, "user_version", |r| r.get(0))?;
            w.pragma_update(None, "user_version", v)?;
        }
        c.seen = Some(version(&c.conn)?);
        Ok((frames, copied))
    }

    /// The connection, for modules that keep tables of their own in the same database.
    pub fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The read-only connections: a read taken there (a page of the audit log, a walk
    /// of its chain) does not hold the writer's lock, so jobs go on being recorded
    /// while it runs.
    pub fn reader(&self) -> std::sync::Arc<Reader> {
        self.reader.clone()
    }

    pub fn input_path(&self, id: &str) -> PathBuf {
        self.spool.join(format!("{id}.in"))
    }

    pub fn output_path(&self, id: &str) -> PathBuf {
        self.spool.join(format!("{id}.out"))
    }

    /// Where a delivered result is kept for a retry.
    pub fn delivered_path(&self, id: &str) -> PathBuf {
        self.spool.join(format!("{id}.{DELIVERED_EXT}"))
    }

    /// Where the input file of a result kept as a patch ([`Store::finish_patched`]) may
    /// be, in the order it is moved through them (`.in`, `.out`, `.delivered`): tried
    /// in that order, a move between two tries cannot hide it.
    pub fn kept_paths(&self, id: &str) -> Vec<PathBuf> {
        vec![
            self.input_path(id),
            self.output_path(id),
            self.delivered_path(id),
        ]
    }

    pub fn spool_dir(&self) -> &Path {
        &self.spool
    }

    /// Spool space: (used, quota) in bytes.
    pub fn spool_usage(&self) -> (u64, u64) {
        (self.used.load(Ordering::Relaxed), self.quota)
    }

    /// The delivered results kept for a retry, in bytes (outside the quota's count:
    /// dropped to make room).
    pub fn spool_kept(&self) -> u64 {
        self.kept.load(Ordering::Relaxed)
    }

    /// Reserves `n` bytes of spool; false when that would pass the quota. Delivered
    /// results kept for a retry make room: the oldest go first.
    pub fn reserve(&self, n: u64) -> bool {
        let fits = |kept: u64| {
            self.used
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                    u.checked_add(n)
                        .filter(|t| t.saturating_add(kept) <= self.quota)
                })
                .is_ok()
        };
        if fits(self.kept.load(Ordering::SeqCst)) {
            return true;
        }
        // Not even without the kept copies: refused, and nothing is dropped for it.
        if self.used.load(Ordering::SeqCst).saturating_add(n) > self.quota {
            return false;
        }
        let _one = self.evicting.lock().unwrap_or_else(|p| p.into_inner());
        for (id, copy) in self.kept_copies() {
            if fits(self.kept.load(Ordering::SeqCst)) {
                return true;
            }
            let seq = i64::try_from(id).unwrap_or(i64::MAX);
            match copy {
                KeptCopy::File(path) => {
                    self.remove_spooled(&path);
                    // Its result is no longer available: the job says so.
                    if let Err(e) = self
                        .conn()
                        .execute("UPDATE jobs SET result_gone = 1 WHERE seq = ?1", [seq])
                    {
                        tracing::warn!(job = id, error = %e, "a dropped result cannot be marked gone");
                    }
                    tracing::info!(file = %path.display(), "a delivered result's kept copy dropped to make room in the spool");
                }
                KeptCopy::Inline => {
                    if let Err(e) = self.drop_kept_inline(seq) {
                        tracing::warn!(job = id, error = %e, "a delivered result kept in the database cannot be dropped");
                        continue;
                    }
                    tracing::info!(job = id, "a delivered result's kept copy (in the database) dropped to make room in the spool");
                }
            }
        }
        fits(self.kept.load(Ordering::SeqCst))
    }

    /// The delivered results kept for a retry, files and inline ones, oldest job first.
    fn kept_copies(&self) -> Vec<(u64, KeptCopy)> {
        let mut found: Vec<(u64, KeptCopy)> = std::fs::read_dir(&self.spool)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == DELIVERED_EXT))
            .filter_map(|p| {
                let id = p.file_stem()?.to_str()?.parse().ok()?;
                Some((id, KeptCopy::File(p)))
            })
            .collect();
        let inline: rusqlite::Result<Vec<i64>> = (|| {
            let conn = self.conn();
            let mut stmt = conn.prepare("SELECT job FROM blobs WHERE part = 'out' AND kept = 1")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        })();
        match inline {
            Ok(ids) => found.extend(
                ids.into_iter()
                    .filter_map(|id| Some((u64::try_from(id).ok()?, KeptCopy::Inline))),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "the delivered results kept in the database cannot be listed")
            }
        }
        found.sort_by_key(|(id, _)| *id);
        found
    }

    /// Drops job `seq`'s delivered result kept in the database, and says it is gone.
    fn drop_kept_inline(&self, seq: i64) -> rusqlite::Result<()> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let len: Option<u64> = tx
            .prepare_cached("DELETE FROM blobs WHERE job = ?1 AND part = 'out' AND kept = 1 RETURNING length(data)")?.query_row([seq],
                |r| r.get(0),
            )
            .optional()?;
        tx.prepare_cached("UPDATE jobs SET result_gone = 1 WHERE seq = ?1")?
            .execute([seq])?;
        tx.commit()?;
        if let Some(len) = len {
            self.unkeep(len);
        }
        Ok(())
    }

    /// `n` bytes of kept copies are gone.
    fn unkeep(&self, n: u64) {
        let _ = self
            .kept
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| {
                Some(k.saturating_sub(n))
            });
    }

    /// Job `id`'s result was streamed out whole: its file (or its copy in the database)
    /// becomes a kept copy, which no longer counts against the quota. Answers whether
    /// there was a result to move.
    pub fn delivered(&self, id: &str) -> bool {
        let (out, kept) = (self.output_path(id), self.delivered_path(id));
        let Ok(meta) = std::fs::metadata(&out) else {
            return self.delivered_inline(id);
        };
        if std::fs::rename(&out, &kept).is_err() {
            return false;
        }
        self.release(meta.len());
        self.kept.fetch_add(meta.len(), Ordering::SeqCst);
        true
    }

    /// [`Store::delivered`] for a result kept in the database. Not flushed by itself
    /// (`synchronous = NORMAL`, as a file's rename is not): lost to a power cut, the
    /// result only counts against the quota again until it expires.
    fn delivered_inline(&self, id: &str) -> bool {
        let conn = self.conn();
        let marked = (|| {
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            let len = conn
                .prepare_cached(
                    "UPDATE blobs SET kept = 1 WHERE job = ?1 AND part = 'out' AND kept = 0
                     RETURNING length(data)",
                )?
                .query_row([id], |r| r.get::<_, u64>(0))
                .optional();
            conn.pragma_update(None, "synchronous", "FULL")?;
            len
        })();
        match marked {
            Ok(Some(len)) => {
                self.release(len);
                self.kept.fetch_add(len, Ordering::SeqCst);
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(job = id, error = %e, "a delivered result kept in the database cannot be marked so");
                false
            }
        }
    }

    /// Counts `n` bytes of spool that must be kept whatever the quota (results).
    pub fn charge(&self, n: u64) {
        self.used.fetch_add(n, Ordering::SeqCst);
    }

    /// Gives back `n` bytes of spool.
    pub fn release(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                Some(u.saturating_sub(n))
            });
    }

    /// Removes a spool file and gives its space back.
    pub fn remove_spooled(&self, path: &Path) {
        if let Ok(meta) = std::fs::metadata(path) {
            if std::fs::remove_file(path).is_ok() {
                if path.extension().is_some_and(|x| x == DELIVERED_EXT) {
                    self.unkeep(meta.len());
                } else {
                    self.release(meta.len());
                }
            }
        }
    }

    /// Records a job in state `receiving`, or finds the caller's job with the same
    /// idempotency key. A key whose job failed or was cancelled (nothing signed), or
    /// whose result is no longer kept, is given to the new job.
    ///
    /// Not flushed by itself (`synchronous = NORMAL` for it alone): the caller is told
    /// nothing of the job before its input is accepted, which commits `queued` with
    /// `FULL` and so flushes this record with it. A `kill -9` loses nothing (the WAL is
    /// in the kernel's cache: recovery fails the cut-off upload); a power cut may lose
    /// the record of an upload no one heard of.
    pub fn insert(&self, job: &NewJob) -> Result<Inserted, StoreError> {
        let conn = self.conn();
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let inserted = Self::insert_on(&conn, job);
        conn.pragma_update(None, "synchronous", "FULL")?;
        inserted
    }

    /// The caller's job with idempotency key `key` that [`Store::insert`] would answer
    /// with ([`Inserted::Existing`]): one that neither failed nor was cancelled and whose
    /// result is still kept.
    pub fn keyed_job(&self, caller: &str, key: &str) -> Result<Option<String>, StoreError> {
        let found: Option<(i64, String, bool)> = self
            .conn()
            .prepare_cached("SELECT seq, state, result_gone FROM jobs WHERE caller = ?1 AND idempotency_key = ?2")?.query_row(params![caller, key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? != 0)),
            )
            .optional()?;
        Ok(found.and_then(|(seq, state, gone)| {
            let ended = gone
                || state == state_name(JobState::Failed)
                || state == state_name(JobState::Cancelled);
            (!ended).then(|| seq.to_string())
        }))
    }

    fn insert_on(conn: &Connection, job: &NewJob) -> Result<Inserted, StoreError> {
        let tx = conn.unchecked_transaction()?;
        if let Some(key) = &job.idempotency_key {
            let existing: Option<(i64, String, bool)> = tx
                .prepare_cached("SELECT seq, state, result_gone FROM jobs WHERE caller = ?1 AND idempotency_key = ?2")?.query_row(params![job.caller, key],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? != 0)),
                )
                .optional()?;
            match existing {
                Some((seq, state, gone))
                    if gone
                        || state == state_name(JobState::Failed)
                        || state == state_name(JobState::Cancelled) =>
                {
                    tx.prepare_cached("UPDATE jobs SET idempotency_key = NULL WHERE seq = ?1")?
                        .execute([seq])?;
                }
                Some((seq, _, _)) => return Ok(Inserted::Existing(seq.to_string())),
                None => {}
            }
        }
        tx.prepare_cached(
            "INSERT INTO jobs (caller, transport, idempotency_key, kind, profile, filename,
                agent_query, content_type, state, created_ms, request_sha256)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?
        .execute(params![
            job.caller,
            job.transport,
            job.idempotency_key,
            job.kind.as_str(),
            job.profile,
            job.filename,
            job.agent_query,
            job.content_type,
            state_name(JobState::Receiving),
            now_ms(),
            job.request_sha256
        ])?;
        let id = tx.last_insert_rowid().to_string();
        tx.commit()?;
        Ok(Inserted::New(id))
    }

    /// The SHA-256 of the request job `id` was asked with (see
    /// [`NewJob::request_sha256`]); `None` for jobs recorded before it was kept.
    pub fn request_sha256(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT request_sha256 FROM jobs WHERE seq = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?
            .flatten())
    }

    /// The input is spooled: the job waits for its turn.
    pub fn queued(&self, id: &str, sha256: &str, bytes: u64) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "UPDATE jobs SET state = ?2, input_sha256 = ?3, input_bytes = ?4 WHERE seq = ?1",
            )?
            .execute(params![id, state_name(JobState::Queued), sha256, bytes])?;
        Ok(())
    }

    /// The input (at most [`INLINE_MAX`] bytes) is kept in the database and the job
    /// waits for its turn: both in one transaction, flushed when it returns.
    pub fn queued_inline(&self, id: &str, sha256: &str, data: &[u8]) -> Result<(), StoreError> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        tx.prepare_cached(
            "UPDATE jobs SET state = ?2, input_sha256 = ?3, input_bytes = ?4 WHERE seq = ?1",
        )?
        .execute(params![
            id,
            state_name(JobState::Queued),
            sha256,
            data.len() as u64
        ])?;
        tx.prepare_cached("INSERT INTO blobs (job, part, data) VALUES (?1, 'in', ?2)")?
            .execute(params![id, data])?;
        tx.commit()?;
        Ok(())
    }

    /// Job `id`'s input, if it is kept in the database.
    pub fn inline_input(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inline(id, "in")
    }

    /// Job `id`'s result, if it is kept in the database (delivered or not).
    pub fn inline_output(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inline(id, "out")
    }

    fn inline(&self, id: &str, part: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT data FROM blobs WHERE job = ?1 AND part = ?2")?
            .query_row(params![id, part], |r| r.get(0))
            .optional()?)
    }

    /// The job goes to the agent; answers its attempt number.
    ///
    /// A commit that is not flushed to disk by itself (`synchronous = NORMAL` for
    /// it alone): after a crash a job that was `running` is queued again exactly as one
    /// that was `queued` ([`crate::services::jobs`]' recovery), so losing this change to
    /// a power cut loses only the attempt's count and start time; the job's next commit
    /// (`signed`, failed, queued again), with `FULL`, flushes the log with it.
    pub fn running(&self, id: &str) -> Result<u32, StoreError> {
        let conn = self.conn();
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Whatever it answers, the flush is back on before anything else is written.
        let changed = conn
            .prepare_cached("UPDATE jobs SET state = ?2, started_ms = ?3, attempts = attempts + 1 WHERE seq = ?1")
            .and_then(|mut s| s.execute(params![id, state_name(JobState::Running), now_ms()]));
        conn.pragma_update(None, "synchronous", "FULL")?;
        changed?;
        let attempts = conn
            .prepare_cached("SELECT attempts FROM jobs WHERE seq = ?1")?
            .query_row([id], |r| r.get(0))?;
        Ok(attempts)
    }

    /// The job goes back to waiting (a retryable failure, or a restart); one that has
    /// ended meanwhile (cancelled) stays ended.
    pub fn requeue(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached("UPDATE jobs SET state = ?2 WHERE seq = ?1 AND state IN (?2, ?3)")?
            .execute(params![
                id,
                state_name(JobState::Queued),
                state_name(JobState::Running)
            ])?;
        Ok(())
    }

    /// Ends a job (signed, failed or cancelled) and appends its audit record, in one
    /// transaction: there is no signed job without its record. An input kept in the
    /// database goes in the same transaction.
    pub fn finish(
        &self,
        id: &str,
        state: JobState,
        output: Option<(&str, u64, &str)>,
        error: Option<&ErrorBody>,
        entry: &Entry,
    ) -> Result<audit::Record, StoreError> {
        self.finish_with(id, state, output, None, error, entry)
    }

    /// [`Store::finish`], with the result itself (at most [`INLINE_MAX`] bytes) kept in
    /// the database in the same transaction, when `inline` has it.
    pub fn finish_with(
        &self,
        id: &str,
        state: JobState,
        output: Option<(&str, u64, &str)>,
        inline: Option<&[u8]>,
        error: Option<&ErrorBody>,
        entry: &Entry,
    ) -> Result<audit::Record, StoreError> {
        self.finish_in(id, state, output, inline, None, error, entry)
    }

    /// Ends job `id` signed with `output`, its result kept as its spooled input and
    /// `patch` (a [`signet_api::wire::patch::Patch`] as JSON), which goes in the same
    /// transaction ([`crate::adapters::patched`]).
    pub fn finish_patched(
        &self,
        id: &str,
        output: (&str, u64, &str),
        patch: &[u8],
        entry: &Entry,
    ) -> Result<audit::Record, StoreError> {
        self.finish_in(
            id,
            JobState::Signed,
            Some(output),
            None,
            Some(patch),
            None,
            entry,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_in(
        &self,
        id: &str,
        state: JobState,
        output: Option<(&str, u64, &str)>,
        inline: Option<&[u8]>,
        patch: Option<&[u8]>,
        error: Option<&ErrorBody>,
        entry: &Entry,
    ) -> Result<audit::Record, StoreError> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let input: Option<u64> = tx
            .prepare_cached(
                "DELETE FROM blobs WHERE job = ?1 AND part = 'in' RETURNING length(data)",
            )?
            .query_row([id], |r| r.get(0))
            .optional()?;
        if let Some(data) = inline {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO blobs (job, part, data) VALUES (?1, 'out', ?2)",
            )?
            .execute(params![id, data])?;
        }
        if let Some(data) = patch {
            tx.prepare_cached("INSERT OR REPLACE INTO patches (job, data) VALUES (?1, ?2)")?
                .execute(params![id, data])?;
        }
        let error_json = error.map(|e| serde_json::to_string(e).unwrap_or_default());
        tx.prepare_cached(
            "UPDATE jobs SET state = ?2, finished_ms = ?3, output_sha256 = ?4,
                output_bytes = ?5, output_type = ?6, error = ?7
             WHERE seq = ?1",
        )?
        .execute(params![
            id,
            state_name(state),
            now_ms(),
            output.map(|o| o.0),
            output.map(|o| o.1),
            output.map(|o| o.2),
            error_json
        ])?;
        let rec = audit::append(&tx, entry)?;
        tx.commit()?;
        if let Some(n) = input {
            self.release(n);
        }
        if let Some(data) = inline {
            self.charge(data.len() as u64);
        }
        Ok(rec)
    }

    /// Job `id`'s result as a patch to its spooled input, when it is kept so
    /// ([`Store::finish_patched`]), checked against the input's recorded length.
    pub fn result_patch(&self, id: &str) -> Result<Option<Checked>, StoreError> {
        let row: Option<(Vec<u8>, Option<u64>)> = self
            .conn()
            .prepare_cached(
                "SELECT p.data, j.input_bytes FROM patches p JOIN jobs j ON j.seq = p.job
                 WHERE p.job = ?1",
            )?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((data, len)) = row else {
            return Ok(None);
        };
        let damaged = |why: String| {
            StoreError::Io(std::io::Error::other(format!(
                "the patch kept for job {id}'s result cannot be read: {why}"
            )))
        };
        let patch: Patch = serde_json::from_slice(&data).map_err(|e| damaged(e.to_string()))?;
        patch.check(len.unwrap_or(0)).map(Some).map_err(damaged)
    }

    /// The jobs whose result is kept as a patch to their input, and not gone.
    pub fn patched_jobs(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT p.job FROM patches p JOIN jobs j ON j.seq = p.job WHERE j.result_gone = 0",
        )?;
        let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
        Ok(rows
            .map(|r| r.map(|s| s.to_string()))
            .collect::<Result<_, _>>()?)
    }

    pub fn get(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        let Ok(seq) = id.parse::<i64>() else {
            return Ok(None);
        };
        Ok(job(&self.conn(), seq)?)
    }

    /// Jobs in `state`, oldest first.
    pub fn in_state(&self, state: JobState) -> Result<Vec<JobRow>, StoreError> {
        Ok(jobs_in_state(&self.conn(), state)?)
    }

    /// The `limit` jobs that ended last, newest first.
    pub fn ended(&self, limit: u64) -> Result<Vec<JobRow>, StoreError> {
        Ok(jobs_ended(&self.conn(), limit)?)
    }

    /// Marks the results of jobs that ended before `before_ms` as gone; answers their ids.
    pub fn expire(&self, before_ms: u64) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let ids: Vec<i64> = {
            let mut stmt = tx.prepare(
                "SELECT seq FROM jobs WHERE result_gone = 0 AND finished_ms IS NOT NULL AND finished_ms < ?1",
            )?;
            let before = i64::try_from(before_ms).unwrap_or(i64::MAX);
            let rows = stmt.query_map([before], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let (mut used, mut kept) = (0, 0);
        for id in &ids {
            tx.execute("UPDATE jobs SET result_gone = 1 WHERE seq = ?1", [id])?;
            tx.execute("DELETE FROM patches WHERE job = ?1", [id])?;
            let mut stmt =
                tx.prepare("DELETE FROM blobs WHERE job = ?1 RETURNING kept, length(data)")?;
            let gone = stmt.query_map([id], |r| {
                Ok((r.get::<_, i64>(0)? != 0, r.get::<_, u64>(1)?))
            })?;
            for g in gone {
                match g? {
                    (true, n) => kept += n,
                    (false, n) => used += n,
                }
            }
        }
        tx.commit()?;
        self.release(used);
        self.unkeep(kept);
        Ok(ids.iter().map(ToString::to_string).collect())
    }

    /// Job ids whose spool files may exist (not expired).
    pub fn live_ids(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT seq FROM jobs WHERE result_gone = 0")?;
        let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
        Ok(rows
            .map(|r| r.map(|s| s.to_string()))
            .collect::<Result<_, _>>()?)
    }
}

/// A small pool of read-only connections to `signet.db`. SQLite's WAL lets them read
/// beside the writer: a reader sees what was committed when its read began, and
/// neither waits for the other.
#[derive(Debug)]
pub struct Reader {
    db: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

/// How many idle read connections are kept open.
const IDLE_READERS: usize = 4;

impl Reader {
    fn new(db: PathBuf) -> Reader {
        Reader {
            db,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Opens a read-only connection to the database (it must exist).
    pub fn open(db: &Path) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(conn)
    }

    /// Runs `f` in one read transaction (one consistent view of the database) on a
    /// read-only connection. It blocks: async callers run it in
    /// `tokio::task::spawn_blocking`.
    pub fn read<T, E: From<rusqlite::Error>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        let taken = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match taken {
            Some(c) => c,
            None => Reader::open(&self.db)?,
        };
        let result = {
            let tx = conn.unchecked_transaction()?;
            let r = f(&tx);
            // A read transaction: nothing to commit, only the snapshot to let go.
            drop(tx);
            r
        };
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
        result
    }
}

/// Job `seq`.
pub fn job(conn: &Connection, seq: i64) -> rusqlite::Result<Option<JobRow>> {
    conn.prepare_cached(&select("WHERE seq = ?1"))?
        .query_row([seq], row)
        .optional()
}

/// Jobs in `state`, oldest first.
pub fn jobs_in_state(conn: &Connection, state: JobState) -> rusqlite::Result<Vec<JobRow>> {
    let mut stmt = conn.prepare(&select("WHERE state = ?1 ORDER BY seq"))?;
    let rows = stmt.query_map([state_name(state)], row)?;
    rows.collect()
}

/// The `limit` jobs that ended last, newest first.
pub fn jobs_ended(conn: &Connection, limit: u64) -> rusqlite::Result<Vec<JobRow>> {
    let mut stmt = conn.prepare(&select(
        "WHERE finished_ms IS NOT NULL ORDER BY finished_ms DESC, seq DESC LIMIT ?1",
    ))?;
    let rows = stmt.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], row)?;
    rows.collect()
}

fn select(filter: &str) -> String {
    format!(
        "SELECT seq, caller, transport, idempotency_key, kind, profile, filename, agent_query,
            content_type, state, created_ms, started_ms, finished_ms, attempts, input_sha256,
            input_bytes, output_sha256, output_bytes, output_type, error, result_gone
         FROM jobs {filter}"
    )
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    let state: String = r.get(9)?;
    let error: Option<String> = r.get(19)?;
    Ok(JobRow {
        id: r.get::<_, i64>(0)?.to_string(),
        caller: r.get(1)?,
        transport: r.get(2)?,
        idempotency_key: r.get(3)?,
        kind: if r.get::<_, String>(4)? == "batch" {
            Kind::Batch
        } else {
            Kind::Sign
        },
        profile: r.get(5)?,
        filename: r.get(6)?,
        agent_query: r.get(7)?,
        content_type: r.get(8)?,
        state: JobState::parse(&state).unwrap_or(JobState::Failed),
        created_ms: r.get(10)?,
        started_ms: r.get(11)?,
        finished_ms: r.get(12)?,
        attempts: r.get(13)?,
        input_sha256: r.get(14)?,
        input_bytes: r.get(15)?,
        output_sha256: r.get(16)?,
        output_bytes: r.get(17)?,
        output_type: r.get(18)?,
        error: error.and_then(|e| serde_json::from_str(&e).ok()),
        result_gone: r.get::<_, i64>(20)? != 0,
    })
}

/// Puts the database in WAL mode. Switching a new database's journal needs it to
/// itself, and SQLite answers "busy" at once, without waiting, while another process
/// opens it too: tried again for up to 10 s.
pub fn wal(conn: &Connection) -> rusqlite::Result<()> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < until =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

/// Adds `jobs.request_sha256` (what an idempotency key is bound to) to a database
/// written before it existed; its old rows keep NULL there.
fn add_request_column(conn: &Connection) -> rusqlite::Result<()> {
    let has: bool = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('jobs') WHERE name = 'request_sha256'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has {
        conn.execute("ALTER TABLE jobs ADD COLUMN request_sha256 TEXT", [])?;
    }
    Ok(())
}

/// Creates the table of inputs and results kept in the database (at most
/// [`INLINE_MAX`] bytes each; `part` `in` or `out`, `kept`: a result delivered and kept
/// for a retry), and drops what no job needs any more. Every change to it is in the
/// transaction that changes its job, so that finds nothing unless a bug left it.
fn init_blobs(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS blobs (
            job INTEGER NOT NULL,
            part TEXT NOT NULL CHECK (part IN ('in', 'out')),
            data BLOB NOT NULL,
            kept INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (job, part)
        );",
    )?;
    let stale = conn.execute(
        "DELETE FROM blobs WHERE job NOT IN (SELECT seq FROM jobs WHERE result_gone = 0)
            OR (part = 'in' AND job NOT IN
                (SELECT seq FROM jobs WHERE state IN ('receiving', 'queued', 'running')))",
        [],
    )?;
    if stale > 0 {
        tracing::warn!(
            rows = stale,
            "inputs or results kept in the database for no job were removed"
        );
    }
    Ok(())
}

/// Creates the table of results kept as a patch to their spooled input (JSON of a
/// [`Patch`]; [`crate::adapters::patched`]), and drops the patches of results gone.
fn init_patches(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS patches (
            job INTEGER PRIMARY KEY,
            data BLOB NOT NULL
        );
        DELETE FROM patches WHERE job NOT IN (SELECT seq FROM jobs WHERE result_gone = 0);",
    )
}

/// The bytes kept in the database: (inputs and undelivered results, delivered results kept).
fn inline_sizes(conn: &Connection) -> rusqlite::Result<(u64, u64)> {
    conn.query_row(
        "SELECT COALESCE(SUM(CASE WHEN kept = 0 THEN length(data) END), 0),
                COALESCE(SUM(CASE WHEN kept = 1 THEN length(data) END), 0)
         FROM blobs",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// The spool's bytes: (inputs and undelivered results, delivered results kept).
fn spool_sizes(dir: &Path) -> std::io::Result<(u64, u64)> {
    let (mut used, mut kept) = (0, 0);
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let meta = e.metadata()?;
        if meta.is_file() {
            if e.path().extension().is_some_and(|x| x == DELIVERED_EXT) {
                kept += meta.len();
            } else {
                used += meta.len();
            }
        }
    }
    Ok((used, kept))
}

/// Flushes a directory's entries (a created or renamed file's name) to disk.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates the recovery timeline's table on `conn` if it does not exist
/// (`services::timeline` writes it).
fn init_timeline(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS timeline (
            id INTEGER PRIMARY KEY,
            time_ms INTEGER NOT NULL,
            event TEXT NOT NULL,
            detail TEXT NOT NULL,
            duration_ms INTEGER
        );",
    )
}

#[cfg(test)]
mod tests {

    #[test]
    fn processes_opening_a_new_database_at_once_all_get_it() {
        // signetd starting and `signetd pair` run just after it both set the schema
        // up; each must wait for the other's, not trip on the column it added.
        for _ in 0..12 {
            let dir = tempfile::tempdir().unwrap();
            let start = std::sync::Arc::new(std::sync::Barrier::new(4));
            let opened: Vec<_> = (0..4)
                .map(|_| {
                    let (dir, start) = (dir.path().to_owned(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        Store::open(&dir, 1 << 20).map(|_| ())
                    })
                })
                .collect();
            for o in opened {
                o.join().unwrap().unwrap();
            }
        }
    }
    use super::*;

    fn job(caller: &str, key: Option<&str>) -> NewJob {
        NewJob {
            caller: caller.into(),
            transport: "unix".into(),
            idempotency_key: key.map(Into::into),
            kind: Kind::Sign,
            profile: "release".into(),
            filename: Some("app.exe".into()),
            agent_query: "profile=release".into(),
            content_type: "application/octet-stream".into(),
            request_sha256: Some("r1".into()),
        }
    }

    #[test]
    fn a_job_lives_through_its_states_and_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let Inserted::New(id) = store.insert(&job("uid:0", None)).unwrap() else {
            panic!()
        };
        assert_eq!(store.get(&id).unwrap().unwrap().state, JobState::Receiving);
        store.queued(&id, "ab", 3).unwrap();
        assert_eq!(store.running(&id).unwrap(), 1);
        // Marking a job running is not flushed by itself (nor is its record); the
        // connection goes back to FULL (2) after each.
        let sync: i64 = store
            .conn()
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2);
        store.requeue(&id).unwrap();
        assert_eq!(store.running(&id).unwrap(), 2);
        drop(store);
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.in_state(JobState::Running).unwrap().len(), 1);
        let rec = store
            .finish(
                &id,
                JobState::Signed,
                Some(("cd", 5, "application/octet-stream")),
                None,
                &Entry {
                    job: Some(id.clone()),
                    caller: "uid:0".into(),
                    transport: "unix".into(),
                    result: Some(audit::Outcome::Signed),
                    ..Entry::default()
                },
            )
            .unwrap();
        assert_eq!(rec.seq, 1);
        let row = store.get(&id).unwrap().unwrap();
        assert_eq!(
            (row.state, row.output_bytes, row.input_bytes),
            (JobState::Signed, Some(5), Some(3))
        );
        assert!(audit::verify(&store.conn()).is_ok());
        assert_eq!(store.expire(u64::MAX).unwrap(), vec![id.clone()]);
        assert!(store.get(&id).unwrap().unwrap().result_gone);
        assert!(store.get("nope").unwrap().is_none());
    }

    #[test]
    fn an_idempotency_key_finds_the_same_job_until_it_fails() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let Inserted::New(a) = store.insert(&job("uid:0", Some("k"))).unwrap() else {
            panic!()
        };
        assert_eq!(
            store.insert(&job("uid:0", Some("k"))).unwrap(),
            Inserted::Existing(a.clone())
        );
        // Another caller's key is its own.
        assert!(matches!(
            store.insert(&job("uid:1", Some("k"))).unwrap(),
            Inserted::New(_)
        ));
        store
            .finish(&a, JobState::Failed, None, None, &Entry::default())
            .unwrap();
        let Inserted::New(b) = store.insert(&job("uid:0", Some("k"))).unwrap() else {
            panic!("a failed job's key starts a new job")
        };
        assert_ne!(b, a);
        assert_eq!(store.request_sha256(&b).unwrap().as_deref(), Some("r1"));
        // Signed, then its result expires: the key is free again.
        store
            .finish(&b, JobState::Signed, None, None, &Entry::default())
            .unwrap();
        assert_eq!(
            store.insert(&job("uid:0", Some("k"))).unwrap(),
            Inserted::Existing(b.clone())
        );
        store.expire(u64::MAX).unwrap();
        assert!(matches!(
            store.insert(&job("uid:0", Some("k"))).unwrap(),
            Inserted::New(c) if c != b
        ));
    }

    #[test]
    fn a_database_from_before_the_request_binding_is_opened_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(
                "CREATE TABLE jobs (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT, caller TEXT NOT NULL,
                    transport TEXT NOT NULL, idempotency_key TEXT, kind TEXT NOT NULL,
                    profile TEXT NOT NULL, filename TEXT, agent_query TEXT NOT NULL,
                    content_type TEXT NOT NULL, state TEXT NOT NULL,
                    created_ms INTEGER NOT NULL, started_ms INTEGER, finished_ms INTEGER,
                    attempts INTEGER NOT NULL DEFAULT 0, input_sha256 TEXT,
                    input_bytes INTEGER, output_sha256 TEXT, output_bytes INTEGER,
                    output_type TEXT, error TEXT, result_gone INTEGER NOT NULL DEFAULT 0);
                 INSERT INTO jobs (caller, transport, idempotency_key, kind, profile,
                    agent_query, content_type, state, created_ms)
                 VALUES ('uid:0', 'unix', 'old', 'sign', 'release', 'profile=release',
                    'application/octet-stream', 'queued', 1);",
            )
            .unwrap();
        }
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(store.request_sha256("1").unwrap(), None);
        assert_eq!(store.get("1").unwrap().unwrap().state, JobState::Queued);
        drop(store);
        // Opening again finds the column in place.
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let Inserted::New(id) = store.insert(&job("uid:0", Some("new"))).unwrap() else {
            panic!()
        };
        assert_eq!(store.request_sha256(&id).unwrap().as_deref(), Some("r1"));
    }

    #[test]
    fn the_spool_quota_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 100).unwrap();
        assert!(store.reserve(60));
        assert!(!store.reserve(50));
        store.release(20);
        assert!(store.reserve(50));
        assert_eq!(store.spool_usage(), (90, 100));
        let f = store.input_path("1");
        std::fs::write(&f, [0u8; 10]).unwrap();
        store.remove_spooled(&f);
        assert_eq!(store.spool_usage().0, 80);
    }

    #[test]
    fn delivered_results_leave_the_quota_and_make_room_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 100).unwrap();
        for id in ["1", "2"] {
            assert_eq!(
                store.insert(&job("uid:0", None)).unwrap(),
                Inserted::New(id.into())
            );
            assert!(store.reserve(40));
            std::fs::write(store.output_path(id), [0u8; 40]).unwrap();
        }
        assert!(!store.reserve(40), "80 of 100 in use");
        assert!(store.delivered("1") && store.delivered("2"));
        assert!(!store.delivered("2"), "moved once");
        assert_eq!(store.spool_usage().0, 0);
        // 60 fits beside one kept copy: the oldest goes.
        assert!(store.reserve(60));
        assert!(!store.delivered_path("1").exists());
        assert!(
            store.get("1").unwrap().unwrap().result_gone,
            "job 1 says so"
        );
        assert!(store.delivered_path("2").exists());
        assert!(!store.get("2").unwrap().unwrap().result_gone);
        // More than the quota drops nothing.
        assert!(!store.reserve(50));
        assert!(store.delivered_path("2").exists());
        // A reopen counts the kept copy apart.
        drop(store);
        let store = Store::open(dir.path(), 100).unwrap();
        assert_eq!(store.spool_usage().0, 0);
        assert!(store.reserve(100));
        assert!(!store.delivered_path("2").exists());
    }

    #[test]
    fn a_small_input_and_result_live_in_the_database_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 100).unwrap();
        let Inserted::New(id) = store.insert(&job("uid:0", None)).unwrap() else {
            panic!()
        };
        assert!(store.reserve(30));
        store.charge(30);
        store.release(30);
        store.queued_inline(&id, "ab", &[7u8; 30]).unwrap();
        assert_eq!(store.spool_usage().0, 30);
        // The input and `queued` survive a reopen together, and count again.
        drop(store);
        let store = Store::open(dir.path(), 100).unwrap();
        assert_eq!(store.spool_usage().0, 30);
        let row = store.get(&id).unwrap().unwrap();
        assert_eq!((row.state, row.input_bytes), (JobState::Queued, Some(30)));
        assert_eq!(store.inline_input(&id).unwrap(), Some(vec![7u8; 30]));
        assert!(!store.input_path(&id).exists());
        // Signed with its result in the same transaction; the input goes with it.
        store.running(&id).unwrap();
        store
            .finish_with(
                &id,
                JobState::Signed,
                Some(("cd", 20, "application/pkcs7-signature")),
                Some(&[9u8; 20]),
                None,
                &Entry {
                    job: Some(id.clone()),
                    caller: "uid:0".into(),
                    transport: "unix".into(),
                    result: Some(audit::Outcome::Signed),
                    ..Entry::default()
                },
            )
            .unwrap();
        assert_eq!(store.inline_input(&id).unwrap(), None);
        assert_eq!(store.inline_output(&id).unwrap(), Some(vec![9u8; 20]));
        assert_eq!(store.spool_usage().0, 20);
        // Delivered: kept for a retry, outside the quota, still there to read.
        assert!(store.delivered(&id));
        assert!(!store.delivered(&id), "moved once");
        assert_eq!((store.spool_usage().0, store.spool_kept()), (0, 20));
        assert_eq!(store.inline_output(&id).unwrap(), Some(vec![9u8; 20]));
        drop(store);
        let store = Store::open(dir.path(), 100).unwrap();
        assert_eq!((store.spool_usage().0, store.spool_kept()), (0, 20));
        // It expires with the job's result.
        assert_eq!(store.expire(u64::MAX).unwrap(), vec![id.clone()]);
        assert_eq!(store.inline_output(&id).unwrap(), None);
        assert_eq!((store.spool_usage().0, store.spool_kept()), (0, 0));
        assert!(audit::verify(&store.conn()).is_ok());
    }

    #[test]
    fn an_ended_job_keeps_no_inline_input_and_kept_results_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 100).unwrap();
        let mut ids = Vec::new();
        for _ in 0..3 {
            let Inserted::New(id) = store.insert(&job("uid:0", None)).unwrap() else {
                panic!()
            };
            store.charge(10);
            store.queued_inline(&id, "ab", &[1u8; 10]).unwrap();
            ids.push(id);
        }
        assert_eq!(store.spool_usage().0, 30);
        // Cancelled and failed jobs drop their input in the transaction that ends them.
        store
            .finish(&ids[0], JobState::Cancelled, None, None, &Entry::default())
            .unwrap();
        store
            .finish(&ids[1], JobState::Failed, None, None, &Entry::default())
            .unwrap();
        assert_eq!(store.spool_usage().0, 10);
        assert_eq!(store.inline_input(&ids[0]).unwrap(), None);
        store
            .finish_with(
                &ids[2],
                JobState::Signed,
                Some(("cd", 60, "application/octet-stream")),
                Some(&[2u8; 60]),
                None,
                &Entry::default(),
            )
            .unwrap();
        assert_eq!(store.spool_usage().0, 60);
        assert!(
            !store.reserve(50),
            "60 of 100 in use by an undelivered result"
        );
        assert!(store.delivered(&ids[2]));
        // 50 fits only once the kept copy goes: it is dropped and the job says so.
        assert!(store.reserve(50));
        assert_eq!(store.inline_output(&ids[2]).unwrap(), None);
        assert!(store.get(&ids[2]).unwrap().unwrap().result_gone);
        assert_eq!(store.spool_kept(), 0);
    }

    #[test]
    fn inline_data_of_no_job_is_dropped_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let Inserted::New(id) = store.insert(&job("uid:0", None)).unwrap() else {
            panic!()
        };
        store.queued_inline(&id, "ab", &[1u8; 10]).unwrap();
        // Rows no transaction of the store would leave: an input of an ended job, and
        // data of a job that does not exist.
        store
            .conn()
            .execute_batch(&format!(
                "UPDATE jobs SET state = 'failed' WHERE seq = {id};
                 INSERT INTO blobs (job, part, data) VALUES (999, 'out', x'00');"
            ))
            .unwrap();
        drop(store);
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let left: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM blobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
        assert_eq!(store.spool_usage().0, 0);
    }

    #[test]
    fn the_wal_is_checkpointed_beside_the_writer_and_not_in_its_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 30).unwrap();
        let backstop: i64 = store
            .conn()
            .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
            .unwrap();
        assert_eq!(backstop, WAL_BACKSTOP_PAGES);
        for _ in 0..20 {
            let Inserted::New(id) = store.insert(&job("uid:0", None)).unwrap() else {
                panic!()
            };
            store.queued_inline(&id, "ab", b"x").unwrap();
        }
        let (frames, copied) = store.checkpoint().unwrap();
        assert!(
            frames > 0 && copied == frames,
            "{frames} frames, {copied} copied"
        );
        // A reader opened now sees every job from the database file.
        let n: i64 = Reader::open(&dir.path().join(DB_FILE))
            .unwrap()
            .query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 20);
        // The checkpoint started the WAL again itself (a new header, its salts new)
        // with a frame of its own: a job's commits then go on in it, and never write
        // its header (nor wait for its flush).
        let wal = dir.path().join(format!("{DB_FILE}-wal"));
        let header = || std::fs::read(&wal).unwrap()[..32].to_vec();
        let started = header();
        let Inserted::New(id) = store.insert(&job("uid:0", None)).unwrap() else {
            panic!()
        };
        store.queued_inline(&id, "ab", b"y").unwrap();
        assert_eq!(header(), started, "a job's commit started the WAL again");
        let (frames, copied) = store.checkpoint().unwrap();
        assert!(
            frames > 1 && frames < 20 && copied == frames,
            "{frames} frames, {copied} copied"
        );
        assert_ne!(
            header(),
            started,
            "the checkpoint did not start the WAL again"
        );
        // Nothing committed since: nothing to do, nothing written.
        let (idle, len) = (header(), std::fs::metadata(&wal).unwrap().len());
        assert_eq!(store.checkpoint().unwrap(), (0, 0));
        assert_eq!(store.checkpoint().unwrap(), (0, 0));
        assert_eq!(
            (header(), std::fs::metadata(&wal).unwrap().len()),
            (idle, len)
        );
        // The schema's version is what it was.
        let v: i64 = store
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    #[test]
    fn an_older_database_is_opened_and_marked_with_this_version() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), 1).unwrap());
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch("DROP TABLE blobs; DROP TABLE patches; PRAGMA user_version = 1;")
                .unwrap();
        }
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let v: i64 = store
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let Inserted::New(id) = store.insert(&job("uid:0", None)).unwrap() else {
            panic!()
        };
        store.queued_inline(&id, "ab", b"x").unwrap();
        assert_eq!(store.inline_input(&id).unwrap().as_deref(), Some(&b"x"[..]));
    }

    #[test]
    fn ended_jobs_come_newest_first_and_live_ones_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let mut ids = Vec::new();
        for _ in 0..4 {
            let Inserted::New(id) = store.insert(&job("uid:0", None)).unwrap() else {
                panic!()
            };
            ids.push(id);
        }
        let end = |id: &str| {
            store
                .finish(
                    id,
                    JobState::Failed,
                    None,
                    None,
                    &Entry {
                        job: Some(id.to_owned()),
                        caller: "uid:0".into(),
                        transport: "unix".into(),
                        result: Some(audit::Outcome::Failed),
                        ..Entry::default()
                    },
                )
                .unwrap();
        };
        // Ended out of order: 3, then 1, then 2 (4 still receiving), a second apart.
        for (t, i) in [2, 0, 1].into_iter().enumerate() {
            end(&ids[i]);
            store
                .conn()
                .execute(
                    "UPDATE jobs SET finished_ms = ?1 WHERE seq = ?2",
                    params![1_000 * (t as i64 + 1), ids[i]],
                )
                .unwrap();
        }
        let got: Vec<String> = store.ended(10).unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(got, [ids[1].clone(), ids[0].clone(), ids[2].clone()]);
        assert!(!got.contains(&ids[3]));
        assert_eq!(store.ended(1).unwrap().len(), 1);
    }

    #[test]
    fn a_full_disk_is_told_apart_from_other_faults() {
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some("database or disk is full".into()),
        );
        assert!(StoreError::Db(full).disk_full());
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        assert!(!StoreError::Db(busy).disk_full());
        assert!(io_disk_full(&std::io::Error::from_raw_os_error(28)));
        assert!(io_disk_full(&std::io::Error::from_raw_os_error(122)));
        assert!(!io_disk_full(&std::io::Error::from_raw_os_error(13)));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), 1).unwrap());
        Connection::open(dir.path().join(DB_FILE))
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let e = Store::open(dir.path(), 1).unwrap_err();
        assert!(matches!(e, StoreError::Schema { .. }), "{e}");
    }
}
