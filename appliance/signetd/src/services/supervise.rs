//! The daemon's long-lived tasks, supervised: each has a name, and the first one that
//! panics — or ends while it should run — ends the daemon, which stops as on SIGTERM
//! and exits with status 1, so systemd restarts it. Without this a dead worker would
//! leave a daemon that still accepts jobs it never runs.
//!
//! Three kinds of task:
//! - [`Supervisor::spawn`]: runs as long as the daemon (the token's worker, the agent
//!   watcher, …); the stop does not wait for it.
//! - [`Supervisor::spawn_until_stop`]: runs until the stop, which waits for it to end
//!   ([`Supervisor::wind_down`]): a server.
//! - [`Supervisor::spawn_may_end`]: may end by itself (a watcher of a service that is
//!   not there, a signal forwarder whose source closed); only a panic is a failure.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};

/// A task that ended when it should not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// It panicked.
    #[error("the task {task:?} panicked ({message}); signetd stops and exits with status 1 so that systemd restarts it: if this happens again, report it with this log")]
    Panicked { task: String, message: String },
    /// It returned while signetd was running.
    #[error("the task {task:?} ended while signetd was running; signetd stops and exits with status 1 so that systemd restarts it: if this happens again, report it with this log")]
    Ended { task: String },
}

impl Failure {
    /// The task's name.
    pub fn task(&self) -> &str {
        match self {
            Failure::Panicked { task, .. } | Failure::Ended { task } => task,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Forever,
    UntilStop,
    MayEnd,
}

/// The supervised tasks; see the [module docs](self).
#[derive(Debug, Default)]
pub struct Supervisor {
    set: JoinSet<()>,
    tasks: HashMap<Id, (String, Kind)>,
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor::default()
    }

    /// A task that runs as long as the daemon.
    pub fn spawn<F>(&mut self, name: impl Into<String>, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.add(name.into(), Kind::Forever, task);
    }

    /// A task that runs until the stop, which waits for it ([`Supervisor::wind_down`]).
    pub fn spawn_until_stop<F>(&mut self, name: impl Into<String>, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.add(name.into(), Kind::UntilStop, task);
    }

    /// A task that may end by itself: only its panic is a failure.
    pub fn spawn_may_end<F>(&mut self, name: impl Into<String>, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.add(name.into(), Kind::MayEnd, task);
    }

    fn add<F>(&mut self, name: String, kind: Kind, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = self.set.spawn(task);
        self.tasks.insert(handle.id(), (name, kind));
    }

    /// Waits for `stop` (answers `None`) or for the first task that fails before it
    /// (answers it). Tasks that end because of the stop are not failures: once `stop`
    /// is ready it wins over them.
    pub async fn until(&mut self, stop: impl Future<Output = ()>) -> Option<Failure> {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                biased;
                () = &mut stop => return None,
                Some(ended) = self.set.join_next_with_id() => {
                    if let Some(failure) = self.judge(ended, true) {
                        return Some(failure);
                    }
                }
            }
        }
    }

    /// After the stop: waits, at most `within`, for the tasks that end at the stop.
    /// Answers whether they all ended, or the first task that panicked meanwhile.
    pub async fn wind_down(&mut self, within: Duration) -> Result<bool, Failure> {
        let wait = async {
            while self.tasks.values().any(|(_, k)| *k == Kind::UntilStop) {
                let Some(ended) = self.set.join_next_with_id().await else {
                    break;
                };
                if let Some(failure) = self.judge(ended, false) {
                    return Err(failure);
                }
            }
            Ok(())
        };
        match tokio::time::timeout(within, wait).await {
            Ok(r) => r.map(|()| true),
            Err(_) => Ok(false),
        }
    }

    /// Whether a task's end is a failure; `running`: the daemon is not stopping.
    fn judge(&mut self, ended: Result<(Id, ()), JoinError>, running: bool) -> Option<Failure> {
        let (id, panic) = match ended {
            Ok((id, ())) => (id, None),
            Err(e) => (e.id(), Some(e)),
        };
        let (task, kind) = self
            .tasks
            .remove(&id)
            .unwrap_or_else(|| ("(unnamed)".to_owned(), Kind::Forever));
        match panic {
            Some(e) if e.is_panic() => Some(Failure::Panicked {
                task,
                message: panic_message(e),
            }),
            // Cancelled: only the supervisor's own drop aborts its tasks.
            Some(_) => None,
            None if running && kind != Kind::MayEnd => Some(Failure::Ended { task }),
            None => None,
        }
    }
}

fn panic_message(e: JoinError) -> String {
    let payload = e.into_panic();
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "no message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::{oneshot, watch};

    fn forever() -> impl Future<Output = ()> + Send + 'static {
        std::future::pending()
    }

    #[tokio::test]
    async fn a_task_that_panics_is_reported_by_name() {
        let mut s = Supervisor::new();
        s.spawn("agent watcher", forever());
        s.spawn("worker", async { panic!("the queue is gone") });
        let failure = s.until(forever()).await;
        assert_eq!(
            failure,
            Some(Failure::Panicked {
                task: "worker".into(),
                message: "the queue is gone".into()
            })
        );
        let text = failure.map(|f| f.to_string()).unwrap_or_default();
        assert!(
            text.contains("\"worker\"") && text.contains("systemd restarts it"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_formatted_panic_keeps_its_message() {
        let mut s = Supervisor::new();
        let n = 3;
        s.spawn("janitor", async move { panic!("job {n} is missing") });
        assert_eq!(
            s.until(forever()).await,
            Some(Failure::Panicked {
                task: "janitor".into(),
                message: "job 3 is missing".into()
            })
        );
    }

    #[tokio::test]
    async fn a_task_that_returns_early_is_reported() {
        let mut s = Supervisor::new();
        s.spawn("worker", forever());
        s.spawn_until_stop("server on unix:/run/signet/signetd.sock", async {});
        assert_eq!(
            s.until(forever()).await,
            Some(Failure::Ended {
                task: "server on unix:/run/signet/signetd.sock".into()
            })
        );
    }

    #[tokio::test]
    async fn tasks_ending_at_the_stop_are_not_reported() {
        let mut s = Supervisor::new();
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut closed = Vec::new();
        for name in ["server 1", "server 2"] {
            let mut stop = stop_rx.clone();
            let (closed_tx, closed_rx) = oneshot::channel();
            closed.push(closed_rx);
            s.spawn_until_stop(name, async move {
                let _ = stop.wait_for(|s| *s).await;
                let _ = closed_tx.send(());
            });
        }
        s.spawn("worker", forever());
        stop_tx.send_replace(true);
        // Both servers are ending before the supervisor looks.
        for c in closed {
            c.await.unwrap();
        }
        let mut stop = stop_rx.clone();
        let stopping = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        assert_eq!(s.until(stopping).await, None);
        // The servers ended; the worker, which runs as long as the daemon, is not
        // waited for.
        assert_eq!(s.wind_down(Duration::from_secs(60)).await, Ok(true));
    }

    #[tokio::test]
    async fn a_task_that_may_end_is_reported_only_when_it_panics() {
        let mut s = Supervisor::new();
        let (ended_tx, ended_rx) = oneshot::channel();
        // It ends first; the worker ends after it, and is the one reported.
        s.spawn_may_end("host-shutdown watcher", async move {
            let _ = ended_tx.send(());
        });
        s.spawn("worker", async move {
            let _ = ended_rx.await;
        });
        assert_eq!(
            s.until(forever()).await,
            Some(Failure::Ended {
                task: "worker".into()
            })
        );

        let mut s = Supervisor::new();
        s.spawn_may_end("token service", async { panic!("udev went away") });
        assert_eq!(
            s.until(forever()).await.as_ref().map(Failure::task),
            Some("token service")
        );
    }

    #[tokio::test]
    async fn a_server_that_panics_at_the_stop_is_reported() {
        let mut s = Supervisor::new();
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut stop = stop_rx.clone();
        s.spawn_until_stop("web UI server", async move {
            let _ = stop.wait_for(|s| *s).await;
            panic!("closing went wrong");
        });
        stop_tx.send_replace(true);
        assert_eq!(
            s.wind_down(Duration::from_secs(60)).await,
            Err(Failure::Panicked {
                task: "web UI server".into(),
                message: "closing went wrong".into()
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_wind_down_is_bounded() {
        let mut s = Supervisor::new();
        s.spawn_until_stop("server that never closes", forever());
        assert_eq!(s.wind_down(Duration::from_secs(1)).await, Ok(false));
    }
}
