//! The overview's live state: read from the daemon while someone watches (a browser
//! holding `GET /events` open), every `refresh_seconds` and right after an action, and
//! sent to the watchers when it changed. It also remembers since when the verdict has
//! been what it is ("Token unplugged since 10:42").

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::model::Overview;
use super::Web;
use crate::daemon::Daemon;

/// The overview as last read.
#[derive(Debug)]
pub struct Live {
    tx: watch::Sender<Option<Arc<Overview>>>,
    /// The verdict's key and when it became that, in ms since the epoch.
    since: Mutex<Option<(String, u64)>>,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            tx: watch::channel(None).0,
            since: Mutex::new(None),
        }
    }
}

impl Live {
    /// Reads the overview now and tells the watchers if it changed.
    pub async fn refresh(&self, daemon: &Daemon) -> Arc<Overview> {
        let status = daemon.status().await;
        let signed = signed_last_hour(daemon).await;
        let mut overview = Overview::of(&status, signed);
        let now = crate::store::now_ms();
        let since_ms = {
            let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
            match &*since {
                Some((key, at)) if *key == overview.verdict.key => *at,
                _ => {
                    *since = Some((overview.verdict.key.clone(), now));
                    now
                }
            }
        };
        overview.since = Some(hh_mm(since_ms));
        let overview = Arc::new(overview);
        self.tx.send_if_modified(|cur| {
            if cur.as_deref() == Some(&*overview) {
                false
            } else {
                *cur = Some(overview.clone());
                true
            }
        });
        overview
    }

    /// A receiver that sees the current overview first, then each change.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Overview>>> {
        let mut rx = self.tx.subscribe();
        rx.mark_changed();
        rx
    }

    /// Browsers watching now.
    pub fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// `HH:MM UTC` of a time in ms since the epoch.
fn hh_mm(ms: u64) -> String {
    let t = super::model::time_ms(ms);
    format!("{} UTC", t.get(11..16).unwrap_or(""))
}

async fn signed_last_hour(daemon: &Daemon) -> u64 {
    // As the audit log writes times (RFC 3339, UTC, milliseconds), which sort as text.
    let hour_ago = crate::store::now_ms().saturating_sub(3_600_000);
    let since = format!("{}.000Z", super::model::time_ms(hour_ago).replace(' ', "T"));
    let db = daemon.config().state_dir.join(crate::store::DB_FILE);
    tokio::task::spawn_blocking(move || {
        let conn = super::pages::open_read_only(&db).ok()?;
        super::query::signed_since(&conn, &since).ok()
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(0)
}

/// Re-reads the overview every `period` while anyone watches. Runs for the daemon's
/// life.
pub async fn run(web: Arc<Web>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        if web.live.watchers() > 0 {
            web.live.refresh(&web.daemon).await;
        }
    }
}
