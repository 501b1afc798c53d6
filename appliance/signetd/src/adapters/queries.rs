//! Read-only queries on `signet.db` beside the job and audit tables' own
//! ([`crate::adapters::store`], [`crate::adapters::audit`]): signatures per hour, the
//! recovery timeline, signing latencies, a page of the audit log with a search, the
//! counts the metrics read at each scrape. Nothing here writes;
//! [`crate::services::reads`] runs them on a read-only connection.

use rusqlite::{params, Connection};
use serde::Serialize;

/// Files signed since `since` (an RFC 3339 time as the audit log writes it).
pub fn signed_since(conn: &Connection, since: &str) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT COUNT(*) FROM audit WHERE result = 'signed' AND time >= ?1",
        [since],
        |r| r.get(0),
    )
}

/// The serial of the token that signed last.
pub fn last_token_serial(conn: &Connection) -> rusqlite::Result<Option<String>> {
    use rusqlite::OptionalExtension;
    conn.query_row(
        "SELECT token_serial FROM audit WHERE token_serial IS NOT NULL ORDER BY id DESC LIMIT 1",
        [],
        |r| r.get(0),
    )
    .optional()
}

/// The time of the newest audit record (RFC 3339).
pub fn newest_audit_time(conn: &Connection) -> rusqlite::Result<Option<String>> {
    use rusqlite::OptionalExtension;
    conn.query_row("SELECT time FROM audit ORDER BY id DESC LIMIT 1", [], |r| {
        r.get(0)
    })
    .optional()
}

/// One entry of the recovery timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimelineRow {
    pub time_ms: u64,
    pub event: String,
    pub detail: String,
    pub duration_ms: Option<u64>,
}

/// The timeline's entries since `from_ms`, oldest first.
pub fn timeline_since(conn: &Connection, from_ms: u64) -> rusqlite::Result<Vec<TimelineRow>> {
    let mut stmt = conn.prepare(
        "SELECT time_ms, event, detail, duration_ms FROM timeline WHERE time_ms >= ?1
         ORDER BY time_ms, id",
    )?;
    let rows = stmt.query_map([i64::try_from(from_ms).unwrap_or(i64::MAX)], |r| {
        Ok(TimelineRow {
            time_ms: r.get(0)?,
            event: r.get(1)?,
            detail: r.get(2)?,
            duration_ms: r.get(3)?,
        })
    })?;
    rows.collect()
}

/// The jobs signed since `from_ms`: id, when each ended and how long its caller waited
/// (from the request to the signature), oldest first.
pub fn signed_since_ms(
    conn: &Connection,
    from_ms: u64,
) -> rusqlite::Result<Vec<(String, u64, u64)>> {
    let mut stmt = conn.prepare(
        "SELECT seq, finished_ms, finished_ms - created_ms FROM jobs
         WHERE state = 'signed' AND finished_ms >= ?1 ORDER BY finished_ms",
    )?;
    let rows = stmt.query_map([i64::try_from(from_ms).unwrap_or(i64::MAX)], |r| {
        Ok((
            r.get::<_, i64>(0)?.to_string(),
            r.get::<_, u64>(1)?,
            r.get::<_, i64>(2)?.max(0) as u64,
        ))
    })?;
    rows.collect()
}

/// One audit record as the audit page shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRow {
    pub seq: u64,
    pub time: String,
    pub job: Option<String>,
    pub caller: String,
    pub profile: Option<String>,
    pub filename: Option<String>,
    pub input_sha256: Option<String>,
    pub output_sha256: Option<String>,
    pub cert_sha256: Option<String>,
    pub token_serial: Option<String>,
    pub result: String,
    pub error: Option<String>,
}

/// A page of the audit log, newest first, and how many records match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    pub rows: Vec<AuditRow>,
    pub total: u64,
}

/// Records matching `search` (in caller, file name, profile, result, error, token, job id or
/// a hash prefix; all when empty), `per_page` from `offset`, newest first.
pub fn audit_page(
    conn: &Connection,
    search: &str,
    offset: u64,
    per_page: u32,
) -> rusqlite::Result<AuditPage> {
    let search = search.trim();
    let like = format!(
        "%{}%",
        search
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    );
    let prefix = format!(
        "{}%",
        search
            .to_ascii_lowercase()
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    );
    let filter = "(?1 = '' OR caller LIKE ?2 ESCAPE '\\' OR filename LIKE ?2 ESCAPE '\\'
        OR profile LIKE ?2 ESCAPE '\\' OR result LIKE ?2 ESCAPE '\\' OR error LIKE ?2 ESCAPE '\\'
        OR token_serial LIKE ?2 ESCAPE '\\'
        OR job = ?1 OR input_sha256 LIKE ?3 ESCAPE '\\' OR output_sha256 LIKE ?3 ESCAPE '\\')";
    let total: u64 = conn.query_row(
        &format!("SELECT COUNT(*) FROM audit WHERE {filter}"),
        params![search, like, prefix],
        |r| r.get(0),
    )?;
    let mut stmt = conn.prepare(&format!(
        "SELECT seq, time, job, caller, profile, filename, input_sha256, output_sha256,
            cert_sha256, token_serial, result, error
         FROM audit WHERE {filter} ORDER BY id DESC LIMIT ?4 OFFSET ?5"
    ))?;
    let rows = stmt.query_map(
        params![
            search,
            like,
            prefix,
            per_page,
            i64::try_from(offset).unwrap_or(i64::MAX)
        ],
        |r| {
            Ok(AuditRow {
                seq: r.get(0)?,
                time: r.get(1)?,
                job: r.get(2)?,
                caller: r.get(3)?,
                profile: r.get(4)?,
                filename: r.get(5)?,
                input_sha256: r.get(6)?,
                output_sha256: r.get(7)?,
                cert_sha256: r.get(8)?,
                token_serial: r.get(9)?,
                result: r.get(10)?,
                error: r.get(11)?,
            })
        },
    )?;
    Ok(AuditPage {
        rows: rows.collect::<Result<_, _>>()?,
        total,
    })
}

/// How many jobs are in each state that has not ended (`receiving`, `queued`,
/// `running`), by the state's name.
pub fn live_jobs_by_state(conn: &Connection) -> rusqlite::Result<Vec<(String, u64)>> {
    let mut stmt = conn.prepare(
        "SELECT state, COUNT(*) FROM jobs WHERE state IN ('receiving', 'queued', 'running')
         GROUP BY state",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// How often each recovery step ran, was skipped or failed, from the whole timeline:
/// (event, the step's name as its detail begins, count).
pub fn recovery_steps(conn: &Connection) -> rusqlite::Result<Vec<(String, String, u64)>> {
    let mut stmt = conn.prepare(
        "SELECT event, substr(detail, 1, instr(detail, ':') - 1), COUNT(*) FROM timeline
         WHERE event IN ('recovery_step', 'recovery_step_skipped', 'recovery_step_failed')
         GROUP BY 1, 2",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::audit::{self, Entry, Outcome};

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        audit::init(&conn).unwrap();
        for (i, (caller, file, result)) in [
            ("vm:105", "app.exe", Outcome::Signed),
            ("uid:0", "setup_100%.msi", Outcome::Signed),
            ("vm:106", "tool.exe", Outcome::Refused),
            ("client:ci", "lib.dll", Outcome::Failed),
        ]
        .into_iter()
        .enumerate()
        {
            let tx = conn.unchecked_transaction().unwrap();
            audit::append(
                &tx,
                &Entry {
                    job: Some((i + 1).to_string()),
                    caller: caller.into(),
                    transport: "unix".into(),
                    filename: Some(file.into()),
                    input_sha256: Some(format!("{i}abc{i}")),
                    result: Some(result),
                    error: (result == Outcome::Failed).then(|| "token_unavailable".into()),
                    ..Entry::default()
                },
            )
            .unwrap();
            tx.commit().unwrap();
        }
        conn
    }

    #[test]
    fn the_audit_page_searches_and_pages_newest_first() {
        let conn = db();
        let all = audit_page(&conn, "", 0, 10).unwrap();
        assert_eq!(all.total, 4);
        assert_eq!(
            all.rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [4, 3, 2, 1]
        );
        let page2 = audit_page(&conn, "", 2, 2).unwrap();
        assert_eq!(
            (
                page2.total,
                page2.rows.iter().map(|r| r.seq).collect::<Vec<_>>()
            ),
            (4, vec![2, 1])
        );
        let vm = audit_page(&conn, "vm:10", 0, 10).unwrap();
        assert_eq!(vm.total, 2);
        assert_eq!(audit_page(&conn, "refused", 0, 10).unwrap().total, 1);
        assert_eq!(audit_page(&conn, "token_unav", 0, 10).unwrap().total, 1);
        // LIKE's wildcards are taken literally.
        let pct = audit_page(&conn, "100%", 0, 10).unwrap();
        assert_eq!(pct.rows.len(), 1);
        assert_eq!(pct.rows[0].filename.as_deref(), Some("setup_100%.msi"));
        // A job id matches exactly, a hash by its prefix: job 3, and record 4's input
        // hash 3abc3.
        let three = audit_page(&conn, "3", 0, 10).unwrap();
        assert_eq!(three.rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 3]);
        assert_eq!(audit_page(&conn, "2ABC", 0, 10).unwrap().rows[0].seq, 3);
        assert_eq!(
            audit_page(&conn, "nothing-like-it", 0, 10).unwrap().total,
            0
        );
        assert_eq!(signed_since(&conn, "1970-01-01T00:00:00Z").unwrap(), 2);
        assert_eq!(signed_since(&conn, "9999-01-01T00:00:00Z").unwrap(), 0);
    }
}
