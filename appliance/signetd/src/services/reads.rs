//! The read model: what the fronts show of the jobs and the audit log. The web pages,
//! D-Bus (and so `signetctl`) and the operator's HTTP routes all call these methods.
//!
//! Every read runs on a read-only connection to `signet.db` ([`Store::reader`]), in one
//! read transaction, in `tokio::task::spawn_blocking`: it neither holds the writer's
//! lock nor a runtime thread, so a long read (a walk of the whole audit chain, an
//! export) never keeps the job worker from recording a job.
//!
//! [`Store::reader`]: crate::adapters::store::Store::reader

use rusqlite::Connection;
use signet_api::operator::{AuditCheck, AuditRecord, JobList, JobSummary};
use signet_api::wire::{JobState, JobView};

use crate::adapters::audit::{self, AuditError, Mark, Verified, Walk};
use crate::adapters::queries::{self, AuditPage, TimelineRow};
use crate::adapters::store::{self, JobRow, StoreError};
use crate::services::errors::ReadError;
use crate::services::jobs::JobService;

/// A job as read, with its place in the queue.
#[derive(Debug, Clone)]
pub struct JobLine {
    pub row: JobRow,
    pub view: JobView,
}

/// Every caller's jobs: being uploaded or at the agent, waiting (in the order they
/// will run), and those that ended last (newest first).
#[derive(Debug, Clone, Default)]
pub struct Board {
    /// Receiving, then running (each oldest first).
    pub running: Vec<JobLine>,
    pub queued: Vec<JobLine>,
    pub recent: Vec<JobLine>,
    /// When it was read (ms since the epoch).
    pub now_ms: u64,
}

/// The read model over the job database ([`Daemon::reads`](crate::services::daemon::Daemon::reads)).
#[derive(Debug, Clone, Copy)]
pub struct Reads<'d> {
    jobs: &'d JobService,
}

impl<'d> Reads<'d> {
    /// The read model of `jobs`' database (its queue gives the positions).
    pub fn new(jobs: &'d JobService) -> Self {
        Reads { jobs }
    }
}

fn summary(line: &JobLine, now_ms: u64) -> JobSummary {
    let (row, view) = (&line.row, &line.view);
    JobSummary {
        id: row.id.clone(),
        caller: row.caller.clone(),
        profile: row.profile.clone(),
        filename: row.filename.clone(),
        state: row.state,
        position: view.position,
        created: view.created.clone(),
        age_seconds: now_ms.saturating_sub(row.created_ms) / 1000,
        finished: view.finished.clone(),
        error: row.error.as_ref().map(|e| e.code),
    }
}

impl Reads<'_> {
    /// Runs `f` on a read-only connection, in one read transaction, off the runtime.
    /// `what` names the read for the error ("reading the jobs").
    pub async fn read<T, F>(&self, what: &'static str, f: F) -> Result<T, ReadError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let reader = self.jobs.store().reader();
        match tokio::task::spawn_blocking(move || reader.read(f)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(ReadError::failed(what, &e)),
            Err(e) => Err(ReadError::failed(what, &e)),
        }
    }

    fn line(&self, row: JobRow) -> JobLine {
        let view = self.jobs.view(&row);
        JobLine { row, view }
    }

    /// Every caller's jobs, with the `recent` that ended last.
    pub async fn board(&self, recent: u64) -> Result<Board, ReadError> {
        let (live, queued, ended) = self
            .read("reading the jobs", move |conn| {
                let mut live = store::jobs_in_state(conn, JobState::Receiving)?;
                live.extend(store::jobs_in_state(conn, JobState::Running)?);
                let queued = store::jobs_in_state(conn, JobState::Queued)?;
                Ok((live, queued, store::jobs_ended(conn, recent)?))
            })
            .await?;
        let mut queued: Vec<JobLine> = queued.into_iter().map(|r| self.line(r)).collect();
        queued.sort_by_key(|j| {
            (
                j.view.position.unwrap_or(u64::MAX),
                j.row.id.parse::<u64>().unwrap_or(0),
            )
        });
        Ok(Board {
            running: live.into_iter().map(|r| self.line(r)).collect(),
            queued,
            recent: ended.into_iter().map(|r| self.line(r)).collect(),
            now_ms: store::now_ms(),
        })
    }

    /// Every caller's jobs as the operator's commands answer them (`JobList`).
    pub async fn jobs(&self, recent: u64) -> Result<JobList, ReadError> {
        let b = self.board(recent).await?;
        let all = |v: &[JobLine]| v.iter().map(|l| summary(l, b.now_ms)).collect();
        Ok(JobList {
            running: all(&b.running),
            queued: all(&b.queued),
            recent: all(&b.recent),
        })
    }

    /// Job `id` as the operator sees it (for the job-finished signal).
    pub async fn job_summary(&self, id: &str) -> Option<JobSummary> {
        let seq = id.parse::<i64>().ok()?;
        let row = self
            .read("reading the job", move |conn| Ok(store::job(conn, seq)?))
            .await
            .ok()
            .flatten()?;
        Some(summary(&self.line(row), store::now_ms()))
    }

    /// The newest `n` audit records, oldest first.
    pub async fn audit_tail(&self, n: u64) -> Result<Vec<AuditRecord>, ReadError> {
        self.read("reading the audit log", move |conn| {
            Ok(audit::tail(conn, n)?)
        })
        .await
    }

    /// The audit records since `since` (RFC 3339; all when `None`), oldest first.
    pub async fn audit_since(&self, since: Option<&str>) -> Result<Vec<AuditRecord>, ReadError> {
        let since = since.map(str::to_owned);
        self.read("reading the audit log", move |conn| {
            Ok(audit::since(conn, since.as_deref()))
        })
        .await?
        .map_err(|e| match e {
            e @ AuditError::BadTime(_) => ReadError::BadRequest { why: e.to_string() },
            e => ReadError::failed("reading the audit log", &e),
        })
    }

    /// Walks the whole audit chain, held against the head kept in the state directory.
    pub async fn audit_verify(&self) -> Result<AuditCheck, ReadError> {
        let dir = self.jobs.config().state_dir.clone();
        let known = crate::adapters::head::read(&dir)
            .ok()
            .flatten()
            .map(|h| h.known(&dir));
        self.read("reading the audit log", move |conn| {
            Ok(audit::check_with(conn, known.as_ref())?)
        })
        .await
    }

    /// Walks the audit chain on from `from` when that mark still holds, else whole
    /// ([`audit::verify_after`]); the walk's own failure is the inner error.
    pub async fn audit_verify_after(
        &self,
        from: Option<Mark>,
    ) -> Result<Result<(Verified, Mark, Walk), AuditError>, ReadError> {
        self.read("reading the audit log", move |conn| {
            Ok(audit::verify_after(conn, from.as_ref()))
        })
        .await
    }

    /// The audit records matching `search`, `per_page` from `offset`, newest first.
    pub async fn audit_page(
        &self,
        search: &str,
        offset: u64,
        per_page: u32,
    ) -> Result<AuditPage, ReadError> {
        let search = search.to_owned();
        self.read("reading the audit log", move |conn| {
            Ok(queries::audit_page(conn, &search, offset, per_page)?)
        })
        .await
    }

    /// The whole audit log as JSON lines.
    pub async fn audit_export(&self) -> Result<Vec<u8>, ReadError> {
        self.read("exporting the audit log", |conn| {
            let mut out = Vec::new();
            audit::export(conn, None, &mut out)?;
            Ok(out)
        })
        .await
    }

    /// Files signed since `since` (RFC 3339).
    pub async fn signed_since(&self, since: &str) -> Result<u64, ReadError> {
        let since = since.to_owned();
        self.read("reading the audit log", move |conn| {
            Ok(queries::signed_since(conn, &since)?)
        })
        .await
    }

    /// The recovery timeline since `from_ms`, oldest first.
    pub async fn timeline_since(&self, from_ms: u64) -> Result<Vec<TimelineRow>, ReadError> {
        self.read("reading the timeline", move |conn| {
            Ok(queries::timeline_since(conn, from_ms)?)
        })
        .await
    }

    /// The jobs signed since `from_ms`: id, end, wait (ms), oldest first.
    pub async fn signed_since_ms(
        &self,
        from_ms: u64,
    ) -> Result<Vec<(String, u64, u64)>, ReadError> {
        self.read("reading the jobs", move |conn| {
            Ok(queries::signed_since_ms(conn, from_ms)?)
        })
        .await
    }

    /// The serial of the token that signed last, and the newest audit record's time.
    pub async fn last_signature(&self) -> (Option<String>, Option<String>) {
        self.read("reading the audit log", |conn| {
            Ok((
                queries::last_token_serial(conn)?,
                queries::newest_audit_time(conn)?,
            ))
        })
        .await
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::adapters::audit::{Entry, Outcome};
    use crate::adapters::store::{Inserted, Kind, NewJob, Store};
    use crate::services::daemon::Daemon;

    fn daemon(dir: &std::path::Path) -> Arc<Daemon> {
        let path = dir.join("signetd.toml");
        std::fs::write(
            &path,
            format!(
                "state_dir = \"{}\"\nagent = \"unix:/run/a.sock\"\nlisten = [\"unix:/run/s.sock\"]\ndefault_profile = \"release\"\n\n[profiles.release]\n",
                dir.join("state").display()
            ),
        )
        .unwrap();
        Arc::new(Daemon::open(crate::config::Config::load(&path).unwrap()).unwrap())
    }

    /// Records a job and ends it signed, with its audit record, as the worker does.
    fn sign_one(store: &Store) -> String {
        let Inserted::New(id) = store
            .insert(&NewJob {
                caller: "vm:101".into(),
                transport: "vsock".into(),
                idempotency_key: None,
                kind: Kind::Sign,
                profile: "release".into(),
                filename: Some("app.exe".into()),
                agent_query: "profile=release".into(),
                content_type: "application/octet-stream".into(),
                request_sha256: None,
            })
            .unwrap()
        else {
            panic!("a new job")
        };
        store.queued(&id, "ab", 3).unwrap();
        store.running(&id).unwrap();
        store
            .finish(
                &id,
                JobState::Signed,
                Some(("cd", 5, "application/octet-stream")),
                None,
                &Entry {
                    job: Some(id.clone()),
                    caller: "vm:101".into(),
                    transport: "vsock".into(),
                    result: Some(Outcome::Signed),
                    ..Entry::default()
                },
            )
            .unwrap();
        id
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_read_does_not_hold_up_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = daemon(dir.path());
        for _ in 0..3 {
            sign_one(daemon.store());
        }
        let (walked, started) = tokio::sync::oneshot::channel();
        let (release, held) = std::sync::mpsc::channel::<()>();
        // A walk of the chain through the read model, held open until released.
        let d = daemon.clone();
        let long_read = tokio::spawn(async move {
            d.reads()
                .read("walking the chain", move |conn| {
                    let first = audit::verify(conn)?.records;
                    walked.send(first).unwrap();
                    held.recv().unwrap();
                    // Still the view the read began with.
                    Ok((first, audit::verify(conn)?.records))
                })
                .await
        });
        assert_eq!(started.await.unwrap(), 3);
        // The writer records and ends a job while the read is open. (Were the read on
        // the writer's connection, this would wait for it for ever: the guard turns
        // that into a failure.)
        let store = daemon.store().clone();
        let write = tokio::task::spawn_blocking(move || sign_one(&store));
        let wrote = tokio::time::timeout(std::time::Duration::from_secs(60), write).await;
        let still_open = !long_read.is_finished();
        // Let the read go before any assertion, so a failure is reported, not hung.
        release.send(()).unwrap();
        let id = wrote.expect("the write waited for the read").unwrap();
        assert!(still_open, "the write completed while the read was open");
        assert_eq!(
            daemon.store().get(&id).unwrap().unwrap().state,
            JobState::Signed
        );
        assert_eq!(long_read.await.unwrap().unwrap(), (3, 3));
        // A read that begins now sees the new job and its record.
        let reads = daemon.reads();
        assert_eq!(reads.audit_verify().await.unwrap().records, Some(4));
        let list = reads.jobs(10).await.unwrap();
        assert_eq!(list.recent.len(), 4);
        assert_eq!(list.recent[0].id, id);
        assert_eq!(
            reads.job_summary(&id).await.unwrap().state,
            JobState::Signed
        );
    }

    #[tokio::test]
    async fn the_read_model_answers_what_the_fronts_show() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = daemon(dir.path());
        let id = sign_one(daemon.store());
        let reads = daemon.reads();
        let tail = reads.audit_tail(10).await.unwrap();
        assert_eq!(tail.len(), 1);
        assert_eq!(tail[0].job.as_deref(), Some(id.as_str()));
        assert_eq!(reads.audit_since(None).await.unwrap(), tail);
        let e = reads.audit_since(Some("yesterday")).await.unwrap_err();
        assert!(matches!(e, ReadError::BadRequest { .. }), "{e:?}");
        let page = reads.audit_page("vm:101", 0, 10).await.unwrap();
        assert_eq!(page.total, 1);
        let export = reads.audit_export().await.unwrap();
        assert_eq!(String::from_utf8(export).unwrap().lines().count(), 1);
        assert_eq!(reads.signed_since("1970-01-01T00:00:00Z").await.unwrap(), 1);
        assert_eq!(reads.signed_since_ms(0).await.unwrap().len(), 1);
        let (v, mark, walk) = reads.audit_verify_after(None).await.unwrap().unwrap();
        assert_eq!((v.records, walk), (1, Walk::Whole));
        sign_one(daemon.store());
        let (v, _, walk) = reads.audit_verify_after(Some(mark)).await.unwrap().unwrap();
        assert_eq!((v.records, walk), (2, Walk::Appended(1)));
        assert!(reads.job_summary("99").await.is_none());
    }
}
