//! The overview's live state: read from the daemon while someone watches (a browser
//! holding `GET /events` open), every `refresh_seconds` and right after an action, and
//! sent to the watchers when it changed. It also remembers since when the verdict has
//! been what it is ("Token unplugged since 10:42").
//!
//! The queue's and the audit log's pages are live the same way, per watcher
//! ([`polled`]): their part is rendered again every `refresh_seconds` and as soon as a
//! job ends, and sent when it differs from what that browser has.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::sse::Event;
use futures_util::Stream;
use tokio::sync::{broadcast, watch};

use super::model::Overview;
use super::Web;
use crate::services::daemon::Daemon;

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
        // What the daemon knows of the agent (its watcher follows every event), not a
        // contact of its own: watching the page does not ask the agent anything.
        let status = daemon.status_seen();
        let signed = signed_last_hour(daemon).await;
        self.publish(
            Overview::of(&status, signed),
            crate::adapters::store::now_ms(),
        )
    }

    /// Takes `overview` as read at `now_ms`: notes since when its verdict holds and
    /// tells the watchers when anything changed.
    pub fn publish(&self, mut overview: Overview, now_ms: u64) -> Arc<Overview> {
        let since_ms = {
            let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
            match &*since {
                Some((key, at)) if *key == overview.verdict.key => *at,
                _ => {
                    *since = Some((overview.verdict.key.clone(), now_ms));
                    now_ms
                }
            }
        };
        // The host knows better when a token's situation began (its last change).
        overview.since = Some(hh_mm(overview.verdict.since_ms.unwrap_or(since_ms)));
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
    let hour_ago = crate::adapters::store::now_ms().saturating_sub(3_600_000);
    let since = format!("{}.000Z", super::model::time_ms(hour_ago).replace(' ', "T"));
    daemon.reads().signed_since(&since).await.unwrap_or(0)
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

/// A page's live part as server-sent events named `event`, for one watcher: `render`
/// makes it now (first at once, then every [`Web::refresh`] and whenever a job ends),
/// and it is sent when it differs from the last one sent. The stream ends after
/// `lifetime` (the browser reconnects, and its login is checked again), when signetd
/// stops, or when `render` answers `None` (it could not read).
pub fn polled<F, Fut>(
    web: Arc<Web>,
    event: &'static str,
    lifetime: Duration,
    render: F,
) -> impl Stream<Item = Result<Event, Infallible>> + Send
where
    F: Fn(Arc<Web>) -> Fut + Send + 'static,
    Fut: Future<Output = Option<String>> + Send,
{
    struct State<F> {
        web: Arc<Web>,
        finished: broadcast::Receiver<String>,
        closing: watch::Receiver<bool>,
        tick: tokio::time::Interval,
        last: Option<String>,
        render: F,
    }
    let deadline = tokio::time::Instant::now() + lifetime;
    let mut tick = tokio::time::interval(web.refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = State {
        finished: web.daemon.job_finished(),
        closing: web.closing(),
        web,
        tick,
        last: None,
        render,
    };
    futures_util::stream::unfold(state, move |mut s| async move {
        loop {
            // The first tick is at once: the browser gets what is current now, which
            // may be newer than the page it loaded.
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return None,
                _ = s.closing.wait_for(|c| *c) => return None,
                _ = s.tick.tick() => {}
                r = s.finished.recv() => {
                    if matches!(r, Err(broadcast::error::RecvError::Closed)) {
                        return None;
                    }
                }
            }
            // One rendering for a burst of ended jobs.
            while s.finished.try_recv().is_ok() {}
            let html = (s.render)(s.web.clone()).await?;
            if s.last.as_deref() != Some(html.as_str()) {
                s.last = Some(html.clone());
                let e = Event::default().event(event).data(html);
                return Some((Ok(e), s));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use signet_api::wire::{AgentReport, DaemonStatus, ErrorBody, ErrorCode};

    fn overview(reachable: bool, signed: u64) -> Overview {
        let agent = if reachable {
            AgentReport::Reachable {
                endpoint: "unix:/a".into(),
                health: Box::new(
                    serde_json::from_value(serde_json::json!({
                        "version": "0.1.0", "state": "token_missing", "detail": "no token",
                        "module": "/m.so", "signer": "osslsigncode 2.9"
                    }))
                    .unwrap(),
                ),
            }
        } else {
            AgentReport::Unreachable {
                endpoint: "unix:/a".into(),
                error: ErrorBody::new(ErrorCode::AgentUnavailable, "down"),
            }
        };
        Overview::of(
            &DaemonStatus {
                version: "0.1.0".into(),
                signing_works: false,
                default_profile: None,
                profiles: vec![],
                agent,
                queue: None,
                recovery: vec![],
                tokens: None,
                faults: vec![],
            },
            signed,
        )
    }

    const T0: u64 = 1_795_430_520_000; // 2026-11-23 10:42 UTC

    #[test]
    fn the_verdict_keeps_its_since_time_until_it_changes_and_watchers_see_changes_only() {
        let live = Live::default();
        let mut rx = live.subscribe();
        let first = live.publish(overview(true, 0), T0);
        assert_eq!(first.verdict.headline, "Token unplugged");
        assert_eq!(first.since.as_deref(), Some("10:42 UTC"));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        // The same state later: still since 10:42, and nothing new for the watchers.
        let same = live.publish(overview(true, 0), T0 + 600_000);
        assert_eq!(same.since.as_deref(), Some("10:42 UTC"));
        assert!(!rx.has_changed().unwrap());
        // Something else changed (a signature counted): sent, since kept.
        live.publish(overview(true, 1), T0 + 700_000);
        assert!(rx.has_changed().unwrap());
        assert_eq!(
            rx.borrow_and_update().as_ref().unwrap().since.as_deref(),
            Some("10:42 UTC")
        );
        // Another verdict starts its own time.
        let down = live.publish(overview(false, 1), T0 + 900_000);
        assert_eq!(down.verdict.key, "agent_unreachable");
        assert_eq!(down.since.as_deref(), Some("10:57 UTC"));
        assert!(rx.has_changed().unwrap());
        // A new watcher gets the current state first.
        let fresh = live.subscribe();
        assert!(fresh.has_changed().unwrap());
    }
}
