//! The recovery timeline kept: the clock's entries ([`crate::core::timeline`]) written
//! to `state_dir/signet.db` (table `timeline`), read back for the status, and sent to
//! whoever listens (the D-Bus `RecoveryStep` signal).

use std::sync::{Arc, Mutex};

use rusqlite::params;
use signet_api::wire::TimelineEntry;

use crate::adapters::store::{self, Store};
use crate::core::timeline::{Clock, Seen, Severity};

/// The daemon's timeline.
#[derive(Debug)]
pub struct Timeline {
    store: Arc<Store>,
    clock: Mutex<Clock>,
    /// Every entry as it is written (for the D-Bus `RecoveryStep` signal).
    steps: tokio::sync::broadcast::Sender<TimelineEntry>,
}

impl Timeline {
    pub fn new(store: Arc<Store>) -> Self {
        Timeline {
            store,
            clock: Mutex::default(),
            steps: tokio::sync::broadcast::channel(64).0,
        }
    }

    /// Records what was seen, if it makes an entry.
    pub fn saw(&self, seen: Seen) {
        let entry = self
            .clock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .on(seen, store::now_ms());
        let Some(e) = entry else { return };
        // An agent unreachable at start is a warning, as every outage is.
        match e.severity() {
            Severity::Info => {
                tracing::info!(event = e.event, duration_ms = e.duration_ms, "{}", e.detail)
            }
            Severity::Warning => {
                tracing::warn!(event = e.event, duration_ms = e.duration_ms, "{}", e.detail)
            }
            Severity::Error => {
                tracing::error!(event = e.event, duration_ms = e.duration_ms, "{}", e.detail)
            }
        }
        let written = self.store.conn().execute(
            "INSERT INTO timeline (time_ms, event, detail, duration_ms) VALUES (?1, ?2, ?3, ?4)",
            params![
                e.time_ms as i64,
                e.event,
                e.detail,
                e.duration_ms.map(|d| d as i64)
            ],
        );
        if let Err(err) = written {
            tracing::error!(error = %err, "a timeline entry could not be written");
        }
        let _ = self.steps.send(TimelineEntry {
            time: crate::core::time::rfc3339(e.time_ms),
            event: e.event.to_owned(),
            detail: e.detail,
            duration_ms: e.duration_ms,
        });
    }

    /// When each step of the escalation ladder last ran (ms since the epoch), read
    /// back from the stored timeline: a step's rate limit holds across a restart.
    pub fn last_steps(&self) -> Vec<(crate::core::recovery::Step, u64)> {
        // On a read-only connection: reading never waits for the job path's writes.
        let rows = self.store.reader().read(|conn| {
            conn.prepare(
                "SELECT detail, MAX(time_ms) FROM timeline WHERE event = 'recovery_step'
                 GROUP BY substr(detail, 1, instr(detail, ':'))",
            )
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
        });
        match rows {
            Ok(rows) => rows
                .into_iter()
                .filter_map(|(detail, at)| {
                    let name = detail.split(':').next()?;
                    Some((crate::core::recovery::Step::from_name(name)?, at as u64))
                })
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "the timeline cannot be read");
                Vec::new()
            }
        }
    }

    /// Every entry from now on, as it is written.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<TimelineEntry> {
        self.steps.subscribe()
    }

    /// The newest `n` entries, oldest first.
    pub fn recent(&self, n: usize) -> Vec<TimelineEntry> {
        // On a read-only connection: the status never waits for the job path's writes.
        let rows = self.store.reader().read(|conn| {
            conn.prepare(
                "SELECT time_ms, event, detail, duration_ms FROM
                 (SELECT * FROM timeline ORDER BY id DESC LIMIT ?1) ORDER BY id",
            )
            .and_then(|mut st| {
                st.query_map([n as i64], |r| {
                    Ok(TimelineEntry {
                        time: crate::core::time::rfc3339(r.get::<_, i64>(0)? as u64),
                        event: r.get(1)?,
                        detail: r.get(2)?,
                        duration_ms: r.get::<_, Option<i64>>(3)?.map(|d| d as u64),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
        });
        rows.unwrap_or_else(|e| {
            tracing::error!(error = %e, "the timeline cannot be read");
            Vec::new()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::timeline::Seen;

    #[test]
    fn entries_are_stored_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), 1 << 20).unwrap());
        let t = Timeline::new(store);
        let mut steps = t.subscribe();
        t.saw(Seen::AgentDown("connection refused".into()));
        assert_eq!(steps.try_recv().unwrap().event, "agent_unreachable");
        t.saw(Seen::AgentUp);
        t.saw(Seen::PinDelivered);
        let r = t.recent(2);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].event, "agent_back");
        assert!(r[0].duration_ms.is_some());
        assert_eq!(r[1].event, "pin_delivered");

        use crate::core::recovery::{Record, Step};
        t.saw(Seen::Ladder(Record::Ran(Step::AgentReinit)));
        t.saw(Seen::Ladder(Record::Ran(Step::Reattach)));
        t.saw(Seen::Ladder(Record::Ran(Step::AgentReinit)));
        let mut last = t.last_steps();
        last.sort();
        assert_eq!(
            last.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![Step::AgentReinit, Step::Reattach]
        );
        assert!(last[0].1 >= last[1].1, "the newest run of each step");
    }
}
