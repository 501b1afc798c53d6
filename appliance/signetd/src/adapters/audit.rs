//! The audit log: one record per request that reached policy (signed, refused,
//! failed, cancelled), hash-chained in SQLite.
//!
//! Each record stores the hash of the one before it (`prev`; the first record's is 64
//! zeros) and its own `hash` = SHA-256 of `signet-audit-v1\n` followed by its
//! **canonical serialisation**: the JSON object of [`Canonical`] — the keys `seq`,
//! `time`, `job`, `caller`, `transport`, `profile`, `token_serial`, `cert_sha256`,
//! `filename`, `input_sha256`, `input_bytes`, `output_sha256`, `output_bytes`,
//! `duration_ms`, `result`, `error`, `prev`, in that order, no whitespace, absent values
//! as `null`, strings escaped as serde_json does; then `count` after `error`, only
//! when the record stands for more than one refusal (so records without it hash as
//! they always did). Rows are walked in insertion order
//! (`id`); `seq` counts up by one from 1. [`verify`] names the first record that was
//! changed (its hash does not match its content), deleted (a `seq` is missing) or
//! reordered (a `seq` appears out of place). Deleting the newest records is not
//! visible from the chain alone: [`check_with`] also reads the edit count the
//! `audit_edits` trigger keeps (the daemon never changes or deletes a record, so any
//! count is an edit by hand) and holds the log against a head kept outside the
//! database ([`crate::adapters::head`]: `state_dir/signet.head`, or one exported with `signetd
//! audit head` and given back as `--head HASH:COUNT`).
//!
//! Records are appended with [`append`] inside the caller's transaction, so a job's
//! state change and its record commit together; [`record_refusal`] is the entry for a
//! request refused before it became a job. Refusals are coalesced before they get
//! here ([`crate::core::refusals`]): the first of a caller for one reason is recorded at
//! once, the rest within the interval make one record whose `count` says how many.
//!
//! An operator's action (attach, detach or re-attach a token, cancel a job, enroll a
//! VM) is a record of the same chain, written by [`record_action`]: its `result` is the
//! action's name, `caller` the operator (`pve:USER@REALM` from the web UI, `uid:N` over
//! D-Bus or the operator's HTTP routes), `transport` the front (`web`, `dbus`, `unix`),
//! `job` and `token_serial` what it acted on, `filename` any other target (`VM 105 as
//! signing VM`), and `error` the error code when the action was refused or failed.
//!
//! [`verify_after`] goes on from a [`Mark`] left by an earlier walk, checking only the
//! records appended since; a trigger counts every `UPDATE` and `DELETE` on the table
//! (`audit_edits`), and a mark is only used while that count, the row count before it and
//! the hash at it are what they were (otherwise the whole chain is walked again).

use std::io::Write;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use signet_api::operator::AuditCheck;

const DOMAIN: &[u8] = b"signet-audit-v1\n";
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Creates the audit table on `conn` if it does not exist.
pub fn init(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS audit (
            id INTEGER PRIMARY KEY,
            seq INTEGER NOT NULL,
            time TEXT NOT NULL,
            job TEXT,
            caller TEXT NOT NULL,
            transport TEXT NOT NULL,
            profile TEXT,
            token_serial TEXT,
            cert_sha256 TEXT,
            filename TEXT,
            input_sha256 TEXT,
            input_bytes INTEGER,
            output_sha256 TEXT,
            output_bytes INTEGER,
            duration_ms INTEGER,
            result TEXT NOT NULL,
            error TEXT,
            prev TEXT NOT NULL,
            hash TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS audit_time ON audit(time);
        CREATE INDEX IF NOT EXISTS audit_seq ON audit(seq);
        CREATE TABLE IF NOT EXISTS audit_edits (n INTEGER NOT NULL);
        INSERT INTO audit_edits (n) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM audit_edits);
        CREATE TRIGGER IF NOT EXISTS audit_updated AFTER UPDATE ON audit
            BEGIN UPDATE audit_edits SET n = n + 1; END;
        CREATE TRIGGER IF NOT EXISTS audit_deleted AFTER DELETE ON audit
            BEGIN UPDATE audit_edits SET n = n + 1; END;",
    )?;
    let has_count: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('audit') WHERE name = 'count'",
        [],
        |r| r.get(0),
    )?;
    if !has_count {
        conn.execute("ALTER TABLE audit ADD COLUMN count INTEGER", [])?;
    }
    Ok(())
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Signed,
    Refused,
    Failed,
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Signed => "signed",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// What is known about a request when its record is written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    pub job: Option<String>,
    /// Who asked: the VM (`vm:105`), the local user (`uid:1000`), the remote client
    /// (`client:ci`), or, when credentials failed, the TCP peer (`tcp:10.0.0.5:4711`).
    pub caller: String,
    /// `vsock`, `unix`, `tcp` or `tls`.
    pub transport: String,
    pub profile: Option<String>,
    pub token_serial: Option<String>,
    pub cert_sha256: Option<String>,
    pub filename: Option<String>,
    pub input_sha256: Option<String>,
    pub input_bytes: Option<u64>,
    pub output_sha256: Option<String>,
    pub output_bytes: Option<u64>,
    pub duration_ms: Option<u64>,
    /// `None` only until [`append`] is called; see [`Outcome`].
    pub result: Option<Outcome>,
    /// The error class (`ErrorCode` name), for refused and failed requests.
    pub error: Option<String>,
    /// How many refusals the record stands for, when more than one.
    pub count: Option<u64>,
}

/// A record as stored and exported ([`signet_api::operator::AuditRecord`], the
/// type every front carries). Field order is the canonical order.
pub use signet_api::operator::AuditRecord as Record;

/// The hashed part of a record: every field but `hash`, in this order.
#[derive(Serialize)]
struct Canonical<'a> {
    seq: u64,
    time: &'a str,
    job: &'a Option<String>,
    caller: &'a str,
    transport: &'a str,
    profile: &'a Option<String>,
    token_serial: &'a Option<String>,
    cert_sha256: &'a Option<String>,
    filename: &'a Option<String>,
    input_sha256: &'a Option<String>,
    input_bytes: Option<u64>,
    output_sha256: &'a Option<String>,
    output_bytes: Option<u64>,
    duration_ms: Option<u64>,
    result: &'a str,
    error: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    prev: &'a str,
}

/// The chain's view of a [`Record`]: its canonical form and the hash it should carry.
pub trait Chained {
    /// The canonical serialisation (see the module docs).
    fn canonical(&self) -> String;
    /// The hash this record should carry.
    fn compute_hash(&self) -> String;
}

impl Chained for Record {
    fn canonical(&self) -> String {
        serde_json::to_string(&Canonical {
            seq: self.seq,
            time: &self.time,
            job: &self.job,
            caller: &self.caller,
            transport: &self.transport,
            profile: &self.profile,
            token_serial: &self.token_serial,
            cert_sha256: &self.cert_sha256,
            filename: &self.filename,
            input_sha256: &self.input_sha256,
            input_bytes: self.input_bytes,
            output_sha256: &self.output_sha256,
            output_bytes: self.output_bytes,
            duration_ms: self.duration_ms,
            result: &self.result,
            error: &self.error,
            count: self.count,
            prev: &self.prev,
        })
        .unwrap_or_default()
    }

    fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update(self.canonical().as_bytes());
        hex(&h.finalize())
    }
}

/// Lowercase hex.
pub use signet_api::hex::lower as hex;

/// The audit log cannot be read, or its chain is broken.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the audit log cannot be read or written: {0}; check the state directory's disk and permissions")]
    Db(#[from] rusqlite::Error),
    #[error("audit record {seq} (row {row}) was changed: its hash does not match its content")]
    Changed { seq: u64, row: i64 },
    #[error(
        "audit record {seq} was deleted: row {row} holds record {found} where record {seq} belongs"
    )]
    Deleted { seq: u64, row: i64, found: u64 },
    #[error(
        "audit records were reordered: row {row} holds record {found} where record {seq} belongs"
    )]
    Reordered { seq: u64, row: i64, found: u64 },
    #[error("cannot write the export: {0}")]
    Write(#[from] std::io::Error),
    #[error("--since {0:?} is not a time; give RFC 3339, e.g. 2026-11-23T08:00:00Z")]
    BadTime(String),
    #[error("the newest audit records were deleted: the log ends at record {found}, but record {head} was written (the head kept {at}); restore signet.db from a backup")]
    Truncated { head: u64, found: u64, at: String },
    #[error("audit record {seq} is not the one written: its hash is not the head kept {at}; restore signet.db from a backup")]
    HeadMismatch { seq: u64, at: String },
    #[error("the audit log was edited by hand {edits} times (changes or deletions counted by its trigger); the records that remain verify, but some may be gone. Compare with an export or backup")]
    Edited { edits: i64 },
}

impl AuditError {
    /// The `seq` of the first bad record, when the chain is broken.
    pub fn record(&self) -> Option<u64> {
        match self {
            AuditError::Changed { seq, .. }
            | AuditError::Deleted { seq, .. }
            | AuditError::Reordered { seq, .. }
            | AuditError::HeadMismatch { seq, .. } => Some(*seq),
            AuditError::Truncated { found, .. } => Some(found + 1),
            _ => None,
        }
    }

    /// `changed`, `deleted` or `reordered` for a broken chain.
    pub fn kind(&self) -> &'static str {
        match self {
            AuditError::Changed { .. } => "changed",
            AuditError::Deleted { .. } => "deleted",
            AuditError::Reordered { .. } => "reordered",
            AuditError::Truncated { .. } => "deleted",
            AuditError::HeadMismatch { .. } => "changed",
            AuditError::Edited { .. } => "edited",
            _ => "error",
        }
    }
}

/// Now, as the records write it: RFC 3339, UTC, milliseconds (sorts as it reads).
pub use signet_api::rfc3339::now_millis as now_rfc3339;

/// Appends one record after the newest; call inside the transaction that changes the
/// job's state. Answers the record written.
pub fn append(conn: &Connection, entry: &Entry) -> Result<Record, AuditError> {
    append_as(
        conn,
        entry,
        entry.result.unwrap_or(Outcome::Failed).as_str(),
    )
}

/// [`append`] with `result` written as given.
fn append_as(conn: &Connection, entry: &Entry, result: &str) -> Result<Record, AuditError> {
    let last: Option<(u64, String)> = conn
        .prepare_cached("SELECT seq, hash FROM audit ORDER BY id DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (seq, prev) = last.map_or((1, GENESIS.to_owned()), |(s, h)| (s + 1, h));
    let mut rec = Record {
        seq,
        time: now_rfc3339(),
        job: entry.job.clone(),
        caller: entry.caller.clone(),
        transport: entry.transport.clone(),
        profile: entry.profile.clone(),
        token_serial: entry.token_serial.clone(),
        cert_sha256: entry.cert_sha256.clone(),
        filename: entry.filename.clone(),
        input_sha256: entry.input_sha256.clone(),
        input_bytes: entry.input_bytes,
        output_sha256: entry.output_sha256.clone(),
        output_bytes: entry.output_bytes,
        duration_ms: entry.duration_ms,
        result: result.to_owned(),
        error: entry.error.clone(),
        count: entry.count,
        prev,
        hash: String::new(),
    };
    rec.hash = rec.compute_hash();
    conn.prepare_cached("INSERT INTO audit (seq, time, job, caller, transport, profile, token_serial,
            cert_sha256, filename, input_sha256, input_bytes, output_sha256, output_bytes,
            duration_ms, result, error, prev, hash, count)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)")?.execute(params![
            rec.seq,
            rec.time,
            rec.job,
            rec.caller,
            rec.transport,
            rec.profile,
            rec.token_serial,
            rec.cert_sha256,
            rec.filename,
            rec.input_sha256,
            rec.input_bytes,
            rec.output_sha256,
            rec.output_bytes,
            rec.duration_ms,
            rec.result,
            rec.error,
            rec.prev,
            rec.hash,
            rec.count
        ],
    )?;
    Ok(rec)
}

/// Records a request refused before it became a job (unknown profile, not permitted,
/// bad input), in a transaction of its own. `entry.result` is set to refused.
pub fn record_refusal(conn: &Connection, entry: &Entry) -> Result<Record, AuditError> {
    let tx = conn.unchecked_transaction()?;
    let mut e = entry.clone();
    e.result = Some(Outcome::Refused);
    let rec = append(&tx, &e)?;
    tx.commit()?;
    Ok(rec)
}

/// An operator's action, for its record (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Action {
    /// `attach`, `detach`, `reattach`, `cancel`, `enroll`, `pair`.
    pub action: &'static str,
    /// Who: `pve:root@pam`, `uid:0`.
    pub operator: String,
    /// The front: `web`, `dbus`, `unix`, `cli` (`signetd enroll`).
    pub transport: String,
    pub job: Option<String>,
    pub token_serial: Option<String>,
    /// Any other target, in words.
    pub target: Option<String>,
    /// The error code when the action was refused or failed.
    pub error: Option<String>,
}

/// Records an operator's action in a transaction of its own. The transaction takes the
/// write lock first (`BEGIN IMMEDIATE`): `signetd enroll` records from a process of its
/// own beside the running daemon, and the chain's newest record must not change between
/// reading it and appending after it.
pub fn record_action(conn: &Connection, a: &Action) -> Result<Record, AuditError> {
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    let entry = Entry {
        job: a.job.clone(),
        caller: a.operator.clone(),
        transport: a.transport.clone(),
        token_serial: a.token_serial.clone(),
        filename: a.target.clone(),
        error: a.error.clone(),
        ..Entry::default()
    };
    let rec = append_as(&tx, &entry, a.action)?;
    tx.commit()?;
    Ok(rec)
}

fn rows(conn: &Connection, since: Option<&str>) -> Result<Vec<(i64, Record)>, AuditError> {
    rows_from(conn, since, i64::MIN)
}

/// The rows after row `after` (since `since` when given), in order.
fn rows_from(
    conn: &Connection,
    since: Option<&str>,
    after: i64,
) -> Result<Vec<(i64, Record)>, AuditError> {
    let mut stmt = conn.prepare(
        "SELECT id, seq, time, job, caller, transport, profile, token_serial, cert_sha256,
            filename, input_sha256, input_bytes, output_sha256, output_bytes, duration_ms,
            result, error, prev, hash, count
         FROM audit WHERE (?1 IS NULL OR time >= ?1) AND id > ?2 ORDER BY id",
    )?;
    let rows = stmt.query_map(params![since, after], |r| {
        Ok((
            r.get(0)?,
            Record {
                seq: r.get(1)?,
                time: r.get(2)?,
                job: r.get(3)?,
                caller: r.get(4)?,
                transport: r.get(5)?,
                profile: r.get(6)?,
                token_serial: r.get(7)?,
                cert_sha256: r.get(8)?,
                filename: r.get(9)?,
                input_sha256: r.get(10)?,
                input_bytes: r.get(11)?,
                output_sha256: r.get(12)?,
                output_bytes: r.get(13)?,
                duration_ms: r.get(14)?,
                result: r.get(15)?,
                error: r.get(16)?,
                prev: r.get(17)?,
                hash: r.get(18)?,
                count: r.get(19)?,
            },
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A chain that verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verified {
    pub records: u64,
    /// The newest record's hash (64 zeros when the log is empty).
    pub head: String,
}

/// Walks the whole chain; the error names the first record that was changed, deleted
/// or reordered.
pub fn verify(conn: &Connection) -> Result<Verified, AuditError> {
    check_chain(&rows(conn, None)?)
}

/// Where a walk of the chain ended, to go on from there ([`verify_after`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// The newest record's row (0 for an empty log).
    pub row: i64,
    pub records: u64,
    pub head: String,
    /// `audit_edits` when the mark was made: any `UPDATE` or `DELETE` since voids it.
    pub edits: i64,
}

/// How [`verify_after`] checked the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// Every record.
    Whole,
    /// Only the records after the mark (this many).
    Appended(u64),
}

/// How many times the audit table was changed or deleted from (by hand: the daemon
/// only appends).
pub fn edits(conn: &Connection) -> Result<i64, AuditError> {
    Ok(conn
        .query_row("SELECT n FROM audit_edits", [], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// Whether `mark` still describes the start of the chain: no record changed or deleted
/// since (the edit count), as many rows up to it, and its head where it was.
fn mark_holds(conn: &Connection, mark: &Mark) -> Result<bool, AuditError> {
    if edits(conn)? != mark.edits {
        return Ok(false);
    }
    let (count, head): (u64, Option<String>) = conn.query_row(
        "SELECT (SELECT COUNT(*) FROM audit WHERE id <= ?1),
                (SELECT hash FROM audit WHERE id = ?1)",
        [mark.row],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(count == mark.records
        && (mark.row == 0 && head.is_none() || head.as_deref() == Some(mark.head.as_str())))
}

/// Verifies the chain going on from `from` when that mark still holds (only the
/// records appended since are walked), else the whole chain; a break found after the
/// mark is named by walking the whole chain again. Answers the result, the new mark and
/// how the chain was walked.
pub fn verify_after(
    conn: &Connection,
    from: Option<&Mark>,
) -> Result<(Verified, Mark, Walk), AuditError> {
    let edits_now = edits(conn)?;
    if let Some(m) = from {
        if mark_holds(conn, m)? {
            let after = rows_after(conn, m.row)?;
            let n = after.len() as u64;
            if let Ok(v) = check_chain_from(&after, m.records, &m.head) {
                let row = after.last().map_or(m.row, |(id, _)| *id);
                let mark = Mark {
                    row,
                    records: v.records,
                    head: v.head.clone(),
                    edits: edits_now,
                };
                return Ok((v, mark, Walk::Appended(n)));
            }
        }
    }
    let all = rows(conn, None)?;
    let v = check_chain(&all)?;
    let mark = Mark {
        row: all.last().map_or(0, |(id, _)| *id),
        records: v.records,
        head: v.head.clone(),
        edits: edits_now,
    };
    Ok((v, mark, Walk::Whole))
}

fn rows_after(conn: &Connection, row: i64) -> Result<Vec<(i64, Record)>, AuditError> {
    rows_from(conn, None, row)
}

/// A head kept outside the database: record `records` has hash `hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownHead {
    pub records: u64,
    pub hash: String,
    /// Where it was kept, for the message (`in state_dir/signet.head`, `given`).
    pub at: String,
}

impl KnownHead {
    /// `HASH:COUNT` as `signetd audit head` prints it.
    pub fn parse(s: &str, at: &str) -> Result<KnownHead, String> {
        let (hash, count) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not HASH:COUNT; `signetd audit head` prints one"))?;
        let records = count
            .parse()
            .map_err(|_| format!("{count:?} is not a record count; give HASH:COUNT as `signetd audit head` prints it"))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{hash:?} is not a SHA-256 in hex; give HASH:COUNT as `signetd audit head` prints it"
            ));
        }
        Ok(KnownHead {
            records,
            hash: hash.to_ascii_lowercase(),
            at: at.to_owned(),
        })
    }
}

/// Whether the log still holds `head`: the record it names, with that hash.
pub fn holds(conn: &Connection, head: &KnownHead) -> Result<(), AuditError> {
    if head.records == 0 {
        return Ok(());
    }
    let found: u64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM audit", [], |r| r.get(0))?;
    let hash: Option<String> = conn
        .query_row(
            "SELECT hash FROM audit WHERE seq = ?1 ORDER BY id LIMIT 1",
            [head.records],
            |r| r.get(0),
        )
        .optional()?;
    match hash {
        None => Err(AuditError::Truncated {
            head: head.records,
            found: found.min(head.records.saturating_sub(1)),
            at: head.at.clone(),
        }),
        Some(h) if h != head.hash => Err(AuditError::HeadMismatch {
            seq: head.records,
            at: head.at.clone(),
        }),
        Some(_) => Ok(()),
    }
}

/// The whole check: the chain ([`verify_after`] from `mark`), the edit count, and
/// `head` when one is known. Answers the verified chain and its new mark.
pub fn check_all(
    conn: &Connection,
    mark: Option<&Mark>,
    head: Option<&KnownHead>,
) -> Result<(Verified, Mark), AuditError> {
    let (v, m, _) = verify_after(conn, mark)?;
    if let Some(h) = head {
        holds(conn, h)?;
    }
    let n = edits(conn)?;
    if n != 0 {
        return Err(AuditError::Edited { edits: n });
    }
    Ok((v, m))
}

/// [`verify`] as the fronts answer it; `Err` only when the log cannot be read.
pub fn check(conn: &Connection) -> Result<AuditCheck, AuditError> {
    check_with(conn, None)
}

/// [`check_all`] as the fronts answer it, against `head` when one is known; `Err`
/// only when the log cannot be read.
pub fn check_with(conn: &Connection, head: Option<&KnownHead>) -> Result<AuditCheck, AuditError> {
    Ok(match check_all(conn, None, head).map(|(v, _)| v) {
        Ok(v) => AuditCheck {
            ok: true,
            records: Some(v.records),
            head: Some(v.head),
            kind: None,
            record: None,
            message: None,
        },
        Err(e @ AuditError::Db(_)) => return Err(e),
        Err(e) => AuditCheck {
            ok: false,
            records: None,
            head: None,
            kind: Some(e.kind().to_owned()),
            record: e.record(),
            message: Some(e.to_string()),
        },
    })
}

/// The newest `n` records, oldest first.
pub fn tail(conn: &Connection, n: u64) -> Result<Vec<Record>, AuditError> {
    let first: Option<(i64, String)> = conn
        .query_row(
            "SELECT id, time FROM (SELECT id, time FROM audit ORDER BY id DESC LIMIT ?1)
             ORDER BY id LIMIT 1",
            [i64::try_from(n).unwrap_or(i64::MAX)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((first, time)) = first else {
        return Ok(Vec::new());
    };
    // Times only grow along the chain (unless the clock went back): read from the
    // first record's time, keep from its row.
    let from = if rows_before_time(conn, first, &time)? {
        None
    } else {
        Some(time)
    };
    Ok(rows(conn, from.as_deref())?
        .into_iter()
        .filter(|(id, _)| *id >= first)
        .map(|(_, r)| r)
        .collect())
}

/// The records since `since` (RFC 3339; all when `None`), oldest first.
pub fn since(conn: &Connection, since: Option<&str>) -> Result<Vec<Record>, AuditError> {
    let since = since.map(normalise_time).transpose()?;
    Ok(rows(conn, since.as_deref())?
        .into_iter()
        .map(|(_, r)| r)
        .collect())
}

/// Whether a record after row `id` has a time before `time` (the clock went back).
fn rows_before_time(conn: &Connection, id: i64, time: &str) -> Result<bool, AuditError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM audit WHERE id > ?1 AND time < ?2 LIMIT 1",
            params![id, time],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

fn normalise_time(s: &str) -> Result<String, AuditError> {
    signet_api::rfc3339::parse(s)
        .map(signet_api::rfc3339::millis)
        .ok_or_else(|| AuditError::BadTime(s.to_owned()))
}

/// The pure walk behind [`verify`].
fn check_chain(rows: &[(i64, Record)]) -> Result<Verified, AuditError> {
    check_chain_from(rows, 0, GENESIS)
}

/// The walk of `rows` following `before` verified records whose head is `head`.
fn check_chain_from(
    rows: &[(i64, Record)],
    before: u64,
    head: &str,
) -> Result<Verified, AuditError> {
    let seqs: std::collections::HashSet<u64> = rows.iter().map(|(_, r)| r.seq).collect();
    let mut prev = head.to_owned();
    for (i, (row, rec)) in rows.iter().enumerate() {
        let expected = before + i as u64 + 1;
        if rec.compute_hash() != rec.hash {
            return Err(AuditError::Changed {
                seq: rec.seq,
                row: *row,
            });
        }
        if rec.seq != expected {
            // The expected record is elsewhere: moved; nowhere: deleted.
            return Err(if seqs.contains(&expected) {
                AuditError::Reordered {
                    seq: expected,
                    row: *row,
                    found: rec.seq,
                }
            } else {
                AuditError::Deleted {
                    seq: expected,
                    row: *row,
                    found: rec.seq,
                }
            });
        }
        if rec.prev != prev {
            // Right place, intact content, wrong link: the link itself was rewritten.
            return Err(AuditError::Changed {
                seq: rec.seq,
                row: *row,
            });
        }
        prev = rec.hash.clone();
    }
    Ok(Verified {
        records: before + rows.len() as u64,
        head: prev,
    })
}

/// Writes the records since `since` (RFC 3339; all when `None`) as JSON lines; answers
/// how many.
pub fn export(
    conn: &Connection,
    since: Option<&str>,
    out: &mut dyn Write,
) -> Result<u64, AuditError> {
    let since = since.map(normalise_time).transpose()?;
    let rows = rows(conn, since.as_deref())?;
    for (_, rec) in &rows {
        serde_json::to_writer(&mut *out, rec).map_err(std::io::Error::from)?;
        out.write_all(b"\n")?;
    }
    Ok(rows.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_records_cut_off_are_found_against_a_head_kept_elsewhere() {
        let conn = db_with(4);
        let v = verify(&conn).unwrap();
        let kept = KnownHead::parse(&format!("{}:{}", v.head, v.records), "given").unwrap();
        assert!(check_all(&conn, None, Some(&kept)).is_ok());
        // Cut off with the counting trigger dropped and the count reset: the chain
        // alone verifies, the head does not.
        conn.execute_batch(
            "DROP TRIGGER audit_deleted; DELETE FROM audit WHERE seq >= 3; UPDATE audit_edits SET n = 0;",
        )
        .unwrap();
        assert!(verify(&conn).is_ok());
        let e = check_all(&conn, None, Some(&kept)).unwrap_err();
        assert_eq!((e.kind(), e.record()), ("deleted", Some(3)), "{e}");
        assert!(e.to_string().contains("ends at record 2"), "{e}");
        // Another log's head of the same length.
        let other = KnownHead::parse(&format!("{}:2", "0".repeat(64)), "given").unwrap();
        let e = check_all(&conn, None, Some(&other)).unwrap_err();
        assert_eq!((e.kind(), e.record()), ("changed", Some(2)));
    }

    #[test]
    fn an_edit_by_hand_is_counted_even_when_undone() {
        let conn = db_with(2);
        conn.execute_batch(
            "UPDATE audit SET caller = 'x' WHERE seq = 1; UPDATE audit SET caller = 'uid:0' WHERE seq = 1;",
        )
        .unwrap();
        assert!(verify(&conn).is_ok());
        let e = check_all(&conn, None, None).unwrap_err();
        assert_eq!(e.kind(), "edited", "{e}");
        let c = check(&conn).unwrap();
        assert!(!c.ok && c.kind.as_deref() == Some("edited"));
    }

    #[test]
    fn a_head_is_read_as_hash_colon_count() {
        let h = "AB".repeat(32);
        let k = KnownHead::parse(&format!("{h}:7"), "given").unwrap();
        assert_eq!((k.records, k.hash), (7, h.to_ascii_lowercase()));
        assert!(KnownHead::parse("abc:7", "given").is_err());
        assert!(KnownHead::parse(&format!("{h}:x"), "given").is_err());
        assert!(KnownHead::parse(&h, "given").is_err());
    }

    fn db_with(n: usize) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        init(&conn).unwrap();
        for i in 0..n {
            let tx = conn.unchecked_transaction().unwrap();
            append(
                &tx,
                &Entry {
                    job: Some(format!("{}", i + 1)),
                    caller: format!("uid:{i}"),
                    transport: "unix".into(),
                    filename: Some("app.exe".into()),
                    input_bytes: Some(10),
                    result: Some(Outcome::Signed),
                    ..Entry::default()
                },
            )
            .unwrap();
            tx.commit().unwrap();
        }
        conn
    }

    #[test]
    fn the_canonical_form_is_fixed() {
        let rec = Record {
            seq: 1,
            time: "2026-11-23T08:00:00.000Z".into(),
            job: Some("7".into()),
            caller: "uid:0".into(),
            transport: "unix".into(),
            profile: None,
            token_serial: None,
            cert_sha256: None,
            filename: Some("a\"b.exe".into()),
            input_sha256: None,
            input_bytes: Some(3),
            output_sha256: None,
            output_bytes: None,
            duration_ms: None,
            result: "signed".into(),
            error: None,
            count: None,
            prev: GENESIS.into(),
            hash: "ignored".into(),
        };
        assert_eq!(
            rec.canonical(),
            format!(
                r#"{{"seq":1,"time":"2026-11-23T08:00:00.000Z","job":"7","caller":"uid:0","transport":"unix","profile":null,"token_serial":null,"cert_sha256":null,"filename":"a\"b.exe","input_sha256":null,"input_bytes":3,"output_sha256":null,"output_bytes":null,"duration_ms":null,"result":"signed","error":null,"prev":"{GENESIS}"}}"#
            )
        );
        assert_eq!(rec.compute_hash().len(), 64);
    }

    #[test]
    fn an_intact_chain_verifies_and_links() {
        let conn = db_with(5);
        let v = verify(&conn).unwrap();
        assert_eq!(v.records, 5);
        let all = rows(&conn, None).unwrap();
        assert_eq!(all[0].1.prev, GENESIS);
        for w in all.windows(2) {
            assert_eq!(w[1].1.prev, w[0].1.hash);
        }
        assert_eq!(v.head, all[4].1.hash);
        let refused = record_refusal(
            &conn,
            &Entry {
                caller: "vm:9".into(),
                transport: "vsock".into(),
                error: Some("forbidden".into()),
                ..Entry::default()
            },
        )
        .unwrap();
        assert_eq!((refused.seq, refused.result.as_str()), (6, "refused"));
        assert_eq!(verify(&conn).unwrap().records, 6);
        assert_eq!(verify(&db_with(0)).unwrap().head, GENESIS);
    }

    #[test]
    fn a_changed_record_is_named() {
        let conn = db_with(5);
        conn.execute("UPDATE audit SET filename = 'evil.exe' WHERE seq = 3", [])
            .unwrap();
        let e = verify(&conn).unwrap_err();
        assert!(matches!(e, AuditError::Changed { seq: 3, .. }), "{e}");
        assert!(e.to_string().contains("record 3"), "{e}");
    }

    #[test]
    fn a_rewritten_link_is_named() {
        let conn = db_with(4);
        // Record 3 rehashed over a forged link: its own hash matches, the link does not.
        let mut all = rows(&conn, None).unwrap();
        let rec = &mut all[2].1;
        rec.prev = GENESIS.into();
        rec.hash = rec.compute_hash();
        conn.execute(
            "UPDATE audit SET prev = ?1, hash = ?2 WHERE seq = 3",
            params![rec.prev, rec.hash],
        )
        .unwrap();
        assert!(matches!(
            verify(&conn).unwrap_err(),
            AuditError::Changed { seq: 3, .. }
        ));
    }

    #[test]
    fn a_deleted_record_is_named() {
        let conn = db_with(5);
        conn.execute("DELETE FROM audit WHERE seq = 2", []).unwrap();
        let e = verify(&conn).unwrap_err();
        assert!(
            matches!(
                e,
                AuditError::Deleted {
                    seq: 2,
                    found: 3,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn swapped_records_are_named() {
        let conn = db_with(5);
        conn.execute_batch(
            "UPDATE audit SET id = -1 WHERE seq = 2;
             UPDATE audit SET id = 2 WHERE seq = 4;
             UPDATE audit SET id = 4 WHERE seq = 2;",
        )
        .unwrap();
        let e = verify(&conn).unwrap_err();
        assert!(
            matches!(
                e,
                AuditError::Reordered {
                    seq: 2,
                    found: 4,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!((e.record(), e.kind()), (Some(2), "reordered"));
    }

    #[test]
    fn export_writes_json_lines_since_a_time() {
        let conn = db_with(3);
        let mut out = Vec::new();
        assert_eq!(export(&conn, None, &mut out).unwrap(), 3);
        let lines: Vec<Record> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2].compute_hash(), lines[2].hash);
        let mut out = Vec::new();
        assert_eq!(
            export(&conn, Some("2999-01-01T00:00:00Z"), &mut out).unwrap(),
            0
        );
        assert!(matches!(
            export(&conn, Some("yesterday"), &mut out),
            Err(AuditError::BadTime(_))
        ));
    }

    #[test]
    fn a_tail_is_the_newest_records_oldest_first_even_after_the_clock_went_back() {
        let conn = db_with(5);
        let seqs = |v: Vec<Record>| v.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(tail(&conn, 2).unwrap()), [4, 5]);
        assert_eq!(seqs(tail(&conn, 50).unwrap()), [1, 2, 3, 4, 5]);
        assert!(tail(&conn, 0).unwrap().is_empty());
        assert!(tail(&db_with(0), 3).unwrap().is_empty());
        // Record 5 written by a clock set back a year: still in the tail.
        conn.execute(
            "UPDATE audit SET time = '2000-01-01T00:00:00.000Z' WHERE seq = 5",
            [],
        )
        .unwrap();
        assert_eq!(seqs(tail(&conn, 3).unwrap()), [3, 4, 5]);
        // since() reads by time; check() answers what verify() finds.
        assert_eq!(
            seqs(since(&conn, Some("1999-01-01T00:00:00Z")).unwrap()).len(),
            5
        );
        assert!(matches!(
            since(&conn, Some("soon")),
            Err(AuditError::BadTime(_))
        ));
        let c = check(&conn).unwrap();
        assert!(!c.ok);
        assert_eq!((c.kind.as_deref(), c.record), (Some("changed"), Some(5)));
        let c = check(&db_with(2)).unwrap();
        assert!(c.ok && c.records == Some(2) && c.head.as_deref().is_some_and(|h| h.len() == 64));
    }

    #[test]
    fn the_walk_goes_on_from_its_mark_and_starts_over_when_anything_changed() {
        let conn = db_with(4);
        let (v, mark, walk) = verify_after(&conn, None).unwrap();
        assert_eq!((v.records, walk), (4, Walk::Whole));
        assert_eq!(v, verify(&conn).unwrap());
        // Two more: only those are walked, and the result is the whole walk's.
        for i in 0..2 {
            record_action(
                &conn,
                &Action {
                    action: "detach",
                    operator: format!("pve:op{i}@pve"),
                    transport: "web".into(),
                    token_serial: Some("0123ABCD".into()),
                    ..Action::default()
                },
            )
            .unwrap();
        }
        let (v, mark2, walk) = verify_after(&conn, Some(&mark)).unwrap();
        assert_eq!((v.records, walk), (6, Walk::Appended(2)));
        assert_eq!(v, verify(&conn).unwrap());
        let (_, mark3, walk) = verify_after(&conn, Some(&mark2)).unwrap();
        assert_eq!((walk, &mark3), (Walk::Appended(0), &mark2));
        // A record before the mark changed: the whole chain is walked and the change named.
        conn.execute("UPDATE audit SET filename = 'evil.exe' WHERE seq = 2", [])
            .unwrap();
        let e = verify_after(&conn, Some(&mark3)).unwrap_err();
        assert_eq!((e.kind(), e.record()), ("changed", Some(2)));
        // Changed back (the trigger still counts it): a whole walk, intact.
        conn.execute("UPDATE audit SET filename = 'app.exe' WHERE seq = 2", [])
            .unwrap();
        let (_, _, walk) = verify_after(&conn, Some(&mark3)).unwrap();
        assert_eq!(walk, Walk::Whole);
        // The newest records deleted behind the mark's back: walked whole.
        let (_, mark, _) = verify_after(&conn, None).unwrap();
        conn.execute_batch("DROP TRIGGER audit_deleted; DELETE FROM audit WHERE seq = 6;")
            .unwrap();
        let (v, _, walk) = verify_after(&conn, Some(&mark)).unwrap();
        assert_eq!((v.records, walk), (5, Walk::Whole));
    }

    #[test]
    fn an_operators_action_is_a_record_of_the_chain() {
        let conn = db_with(1);
        let rec = record_action(
            &conn,
            &Action {
                action: "enroll",
                operator: "uid:0".into(),
                transport: "dbus".into(),
                target: Some("VM 105 as signing VM".into()),
                error: Some("forbidden".into()),
                ..Action::default()
            },
        )
        .unwrap();
        assert_eq!(
            (rec.seq, rec.result.as_str(), rec.caller.as_str()),
            (2, "enroll", "uid:0")
        );
        assert_eq!(rec.filename.as_deref(), Some("VM 105 as signing VM"));
        assert_eq!(verify(&conn).unwrap().records, 2);
    }
}
