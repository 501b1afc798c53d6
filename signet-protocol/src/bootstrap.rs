//! How both daemons start: their files private whatever the umask, logs filtered by
//! `RUST_LOG` — to the journal under systemd ([`journal`]: priorities and each
//! event's fields), else to stderr as text — and their TOML configuration read with
//! errors that name the file, the line and the fix. Memory a job freed stays the
//! daemon's for the next job ([`keep_freed_memory`]).

use std::path::{Path, PathBuf};

/// A configuration file that cannot be read or is not valid TOML for its type.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}; {hint}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
        /// Where the configuration is given, and an example of one.
        hint: &'static str,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

impl FileError {
    /// The file is not there (a first start may go on without it).
    pub fn is_missing(&self) -> bool {
        matches!(self, FileError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Makes what the process creates its own (umask 0077), keeps the memory its jobs
/// free ([`keep_freed_memory`]) and logs at `info` unless `RUST_LOG` says otherwise:
/// to the journal when systemd started the process ([`journal::under_systemd`]), else
/// to stderr as text, in colour only on a terminal.
pub fn start_daemon() {
    #[cfg(unix)]
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    keep_freed_memory();
    let filter =
        || tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    #[cfg(target_os = "linux")]
    if journal::under_systemd(
        std::env::var("JOURNAL_STREAM").ok().as_deref(),
        std::env::var_os("INVOCATION_ID").is_some(),
        journal::stderr_id(),
    ) {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        match journal::layers() {
            Ok(layers) => {
                tracing_subscriber::registry()
                    .with(filter())
                    .with(layers)
                    .init();
                return;
            }
            Err(e) => {
                stderr_text(filter());
                tracing::warn!(error = %e, "started by systemd, but the journal's socket ({}) cannot be written to; logging to stderr", journal::SOCKET);
                return;
            }
        }
    }
    stderr_text(filter());
}

/// Below this size an allocation comes from malloc's heap rather than a mapping of its
/// own: every block a job's bytes move in (256 KiB) and every buffer of a file held in
/// memory (at most 1 MiB) is below it.
pub const HEAP_UP_TO: usize = 4 << 20;

/// How much freed memory malloc's heap keeps before it gives any back.
pub const KEPT_FREE: usize = 16 << 20;

/// Keeps what a job frees for the next one. glibc's malloc maps an allocation of 128
/// KiB or more on its own and unmaps it when it is freed, and gives the top of its
/// heap back once more than 128 KiB of it is free: so every job's blocks were new
/// pages, each one a page fault when first touched (a trap into the kernel, costly in
/// a virtual machine): ~130 faults per 1 MiB job in each daemon, half a millisecond
/// of a job at that size. With [`HEAP_UP_TO`] and [`KEPT_FREE`] the blocks come from
/// the heap and stay there (a few MiB more resident; the 1 GiB run stays far below
/// 64 MiB). A hint: without glibc, nothing is changed.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let (heap_up_to, kept_free) = (HEAP_UP_TO as libc::c_int, KEPT_FREE as libc::c_int);
        // SAFETY: mallopt only sets two of malloc's thresholds, which it reads under
        // its own lock; no memory is touched. A refusal (0) leaves glibc's defaults.
        #[allow(unsafe_code)]
        let _ = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, heap_up_to);
            libc::mallopt(libc::M_TRIM_THRESHOLD, kept_free)
        };
    }
}

/// Logs as text to stderr.
fn stderr_text(filter: tracing_subscriber::EnvFilter) {
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Logging to the journal with `tracing-journald`: the journal's native protocol, so
/// each line keeps its priority and its fields (`JOB`, `TOKEN`, `CALLER`, ... from the
/// event and the spans it is in, upper-cased, without a prefix) for `journalctl -p`
/// and `journalctl JOB=42`. stderr under systemd would reach the journal too, but as
/// text at one priority, the fields flattened into the message.
#[cfg(target_os = "linux")]
pub mod journal {
    use tracing::Level;
    use tracing_journald::{Priority, PriorityMappings};
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::Layer;

    /// Where journald listens (tracing-journald's fixed path).
    pub const SOCKET: &str = "/run/systemd/journal/socket";

    /// The field that marks a line an operator must act on (`tracing::error!(alert =
    /// true, ...)`): it goes to the journal at `alert` (an error) or `crit`.
    pub const ALERT_FIELD: &str = "alert";

    /// Whether systemd started this process, so its logs go to the journal: stderr is
    /// the journal stream systemd names in `JOURNAL_STREAM` (`DEVICE:INODE`, matched
    /// against stderr's own, so a child whose stderr was redirected does not count),
    /// or `INVOCATION_ID` is set (a unit's process, whatever its stderr).
    pub fn under_systemd(
        journal_stream: Option<&str>,
        invocation_id: bool,
        stderr: Option<(u64, u64)>,
    ) -> bool {
        let stream = journal_stream.and_then(|s| {
            let (dev, ino) = s.split_once(':')?;
            Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?))
        });
        invocation_id || (stream.is_some() && stream == stderr)
    }

    /// stderr's device and inode, as `JOURNAL_STREAM` gives the journal's.
    pub fn stderr_id() -> Option<(u64, u64)> {
        let st = nix::sys::stat::fstat(std::io::stderr()).ok()?;
        Some((st.st_dev, st.st_ino))
    }

    /// The journal priority of a line at `level`; `alert` when it carries
    /// [`ALERT_FIELD`]. Info is `info` (6), not tracing-journald's `notice`.
    pub fn priority(level: Level, alert: bool) -> Priority {
        match (alert, level) {
            (true, Level::ERROR) => Priority::Alert,
            (true, _) => Priority::Critical,
            (false, Level::ERROR) => Priority::Error,
            (false, Level::WARN) => Priority::Warning,
            (false, Level::INFO) => Priority::Informational,
            (false, _) => Priority::Debug,
        }
    }

    fn mappings(alert: bool) -> PriorityMappings {
        PriorityMappings {
            error: priority(Level::ERROR, alert),
            warn: priority(Level::WARN, alert),
            info: priority(Level::INFO, alert),
            debug: priority(Level::DEBUG, alert),
            trace: priority(Level::TRACE, alert),
        }
    }

    /// Whether an event is an operator's alert (it has the [`ALERT_FIELD`]).
    pub fn is_alert(meta: &tracing::Metadata<'_>) -> bool {
        meta.is_event() && meta.fields().field(ALERT_FIELD).is_some()
    }

    /// Two journald layers, as tracing-journald maps priorities by level alone: one
    /// for every span and every event but the alerts, one for the alerts at
    /// [`priority`]`(level, true)`. The alerts' layer sees no spans, so an alert
    /// carries its own fields only (none is logged inside a job's span).
    pub fn layers<S>() -> std::io::Result<Vec<Box<dyn Layer<S> + Send + Sync>>>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        let layer = |alert: bool| -> std::io::Result<tracing_journald::Layer> {
            Ok(tracing_journald::layer()?
                .with_field_prefix(None)
                .with_priority_mappings(mappings(alert)))
        };
        let plain: fn(&tracing::Metadata<'_>) -> bool = |m| !is_alert(m);
        let alerts: fn(&tracing::Metadata<'_>) -> bool = is_alert;
        Ok(vec![
            layer(false)?.with_filter(filter_fn(plain)).boxed(),
            layer(true)?.with_filter(filter_fn(alerts)).boxed(),
        ])
    }
}

/// Reads the file at `path`; `hint` says how to give another.
pub fn read(path: &Path, hint: &'static str) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
        hint,
    })
}

/// `text` (from `path`) as `T`; a TOML error shows its line and what was expected.
pub fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, FileError> {
    toml::from_str(text).map_err(|e| FileError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().replace('\n', "\n  "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn faults() -> i64 {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes one rusage into the zeroed space given.
        #[allow(unsafe_code)]
        let usage = unsafe {
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()), 0);
            usage.assume_init()
        };
        usage.ru_minflt
    }

    /// Allocates `len` bytes, touches every page and frees them; answers the page
    /// faults that took.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn touch(len: usize) -> i64 {
        let before = faults();
        let mut block = Vec::<u8>::with_capacity(len);
        block.resize(len, 1);
        std::hint::black_box(&block);
        drop(block);
        faults() - before
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_freed_megabyte_is_reused_without_new_page_faults() {
        const MIB: usize = 1 << 20;
        // glibc's defaults map a megabyte on its own and unmap it when it is freed,
        // so each allocation faults its 256 pages in again.
        keep_freed_memory();
        // A thread of its own: its own arena, its own fault count.
        std::thread::spawn(|| {
            touch(MIB);
            for round in 0..4 {
                let again = touch(MIB);
                assert!(
                    again < 16,
                    "round {round}: a megabyte freed and allocated again faulted {again} pages"
                );
            }
        })
        .join()
        .unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn levels_map_to_journal_priorities_and_alerts_to_alert_or_crit() {
        use journal::priority;
        use tracing::Level;
        use tracing_journald::Priority;
        assert_eq!(priority(Level::ERROR, false), Priority::Error);
        assert_eq!(priority(Level::WARN, false), Priority::Warning);
        assert_eq!(priority(Level::INFO, false), Priority::Informational);
        assert_eq!(priority(Level::DEBUG, false), Priority::Debug);
        assert_eq!(priority(Level::TRACE, false), Priority::Debug);
        assert_eq!(priority(Level::ERROR, true), Priority::Alert);
        assert_eq!(priority(Level::WARN, true), Priority::Critical);
        assert_eq!(priority(Level::INFO, true), Priority::Critical);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_event_with_the_alert_field_is_an_alert() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;
        // Which events the filter calls alerts, as the journal's layers see them.
        let seen = Arc::new(Mutex::new(Vec::new()));
        struct Probe(Arc<Mutex<Vec<(String, bool)>>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Probe {
            fn on_event(
                &self,
                e: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                let name = e.metadata().level().to_string();
                self.0
                    .lock()
                    .unwrap()
                    .push((name, journal::is_alert(e.metadata())));
            }
        }
        let subscriber = tracing_subscriber::registry().with(Probe(seen.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("job", job = 7);
            let _in = span.enter();
            assert!(!journal::is_alert(span.metadata().unwrap()));
            tracing::error!(alert = true, "operator action needed");
            tracing::error!(error = "x", "failed");
            tracing::warn!(job = 7, "waiting");
        });
        assert_eq!(
            *seen.lock().unwrap(),
            [
                ("ERROR".to_owned(), true),
                ("ERROR".to_owned(), false),
                ("WARN".to_owned(), false)
            ]
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn systemd_is_told_by_the_journal_stream_on_stderr_or_the_invocation_id() {
        use journal::under_systemd;
        assert!(under_systemd(Some("8:1234"), false, Some((8, 1234))));
        // JOURNAL_STREAM inherited by a process whose stderr went elsewhere.
        assert!(!under_systemd(Some("8:1234"), false, Some((8, 999))));
        assert!(!under_systemd(Some("garbage"), false, Some((8, 1234))));
        assert!(!under_systemd(None, false, Some((8, 1234))));
        assert!(under_systemd(None, true, None));
        assert!(!under_systemd(None, false, None));
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Sample {
        port: u16,
    }

    #[test]
    fn errors_name_the_file_and_the_fix() {
        let missing = read(Path::new("/nonexistent/x.toml"), "pass --config PATH").unwrap_err();
        assert!(missing.is_missing());
        let text = missing.to_string();
        assert!(
            text.starts_with("cannot read /nonexistent/x.toml: "),
            "{text}"
        );
        assert!(text.ends_with("; pass --config PATH"), "{text}");
        let bad = parse_toml::<Sample>(Path::new("/etc/x.toml"), "port = \"high\"\n").unwrap_err();
        assert!(!bad.is_missing());
        let text = bad.to_string();
        assert!(text.starts_with("/etc/x.toml: "), "{text}");
        assert!(text.contains("line 1"), "{text}");
        assert_eq!(
            parse_toml::<Sample>(Path::new("x"), "port = 7")
                .unwrap()
                .port,
            7
        );
    }
}
