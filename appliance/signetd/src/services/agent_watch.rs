//! The daemon follows the signing agent for its life: its event stream
//! (`GET /agent/v1/events`) and its health, the host's view of the agent VM's tokens
//! (the token service's status) and that VM's QEMU (resets, shutdowns). All of it is
//! fed, one event at a time, to the token's life ([`Life`], pure), and its
//! actions are carried out here: timeline entries ([timeline]), the PIN from the
//! host's `pin_file` given to the agent whenever it needs one — after a signing-VM
//! reboot or an agent restart — so no person types it, the worker woken when signing
//! can work again, and the steps of the escalation ladder when the agent has lost a
//! token the host still has in the VM: the agent re-initialises PKCS#11
//! (`POST /agent/v1/reinit`), the token is re-attached, its USB port reset, the VM
//! reset (through the token service), then an alert.
//!
//! A PIN the token refused is never sent again (the agent would not present it either):
//! the timeline says "PIN rejected — operator action needed" and jobs fail with
//! `pin_rejected` until the PIN file holds another PIN.
//!
//! [`react`] (pure) turns an agent event into the life's event; [`run`] does the I/O.
//!
//! [timeline]: crate::services::timeline

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use secrecy::zeroize::Zeroizing;
use secrecy::SecretString;
use sha2::Sha256;
use signet_api::wire::{
    AgentEvent, AgentEventKind, AgentHealth, AgentLogin, AgentState, ErrorCode, TokenPlace,
    AGENT_EVENTS_PATH, AGENT_LOGIN_PATH, AGENT_REINIT_PATH,
};
use signet_protocol::client;
use tokio::sync::{broadcast, mpsc, watch};

use crate::adapters::agent::Health;
use crate::core::life::{Action, Event, Host, Life};
use crate::core::recovery::Step;
use crate::core::timeline::Seen;
use crate::services::daemon::Daemon;
use crate::services::tokens::{Op, Status, VmSignal};

/// The shortest and longest wait before connecting to the agent again.
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// The wait between tries while the agent's VM boots after a reset or shutdown ...
const RECONNECT_BOOTING: Duration = Duration::from_secs(1);
/// ... for this long after it.
const VM_BOOT: Duration = Duration::from_secs(180);
/// How often the health is read while the event stream is open: the agent may wait for
/// a PIN (the PIN file may have been fixed), or may be another process than the one
/// whose stream this is — a guest reset behind a hybrid-vsock backend leaves the old
/// stream open on the host's side, silent for ever.
const PIN_RECHECK: Duration = Duration::from_secs(10);
/// How long one of those health reads may take.
const HEALTH_LIMIT: Duration = Duration::from_secs(10);
/// How often the ladder's cool-downs are looked at.
const TICK: Duration = Duration::from_millis(250);
/// How long the agent may take to re-initialise PKCS#11 (it waits for the job at the
/// token first).
const REINIT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the agent may take to answer the PIN's delivery: it waits for the job at
/// the token first, then the token's own login (a second on a slow card). The watcher
/// hears nothing else meanwhile, so a hung token must not hold it for ever.
const LOGIN_LIMIT: Duration = Duration::from_secs(120);

/// The token's life event an agent event is, if any.
pub fn react(event: &AgentEventKind) -> Option<Event> {
    match event {
        AgentEventKind::TokenLost { detail, .. } => Some(Event::TokenLost(detail.clone())),
        AgentEventKind::TokenAppeared { .. } => Some(Event::TokenBack),
        AgentEventKind::LoggedIn { .. } => Some(Event::LoggedIn),
        AgentEventKind::PinProblem {
            state: AgentState::PinNeeded,
            ..
        } => Some(Event::PinNeeded),
        _ => None,
    }
}

/// Whether the agent's health may read otherwise after `event`. A job's start and end
/// do not change it (a token lost meanwhile has events of its own), and a health read
/// then would take the token between two jobs, when the next one needs it.
pub fn changes_health(event: &AgentEventKind) -> bool {
    !matches!(
        event,
        AgentEventKind::SigningStarted { .. } | AgentEventKind::SigningFinished { .. }
    )
}

/// What the agent's health, read when the daemon connects, says of the token.
pub fn health_event(h: &AgentHealth) -> Option<Event> {
    match h.state {
        AgentState::Ready => Some(Event::TokenBack),
        AgentState::TokenLost | AgentState::TokenMissing => {
            Some(Event::TokenLost(h.detail.clone()))
        }
        AgentState::PinNeeded => Some(Event::PinNeeded),
        _ => None,
    }
}

/// Where the host has the agent VM's tokens: in the VM when one of them is; away when
/// none is on the host (absent, or in conflict); else on its way.
pub fn host_of(status: &Status, serials: &[String], vm: u32) -> Host {
    let mine: Vec<_> = status
        .values()
        .filter(|t| serials.contains(&t.serial))
        .collect();
    let in_vm = mine.iter().any(|t| {
        matches!(
            t.place,
            TokenPlace::Attached { vmid } | TokenPlace::Attaching { vmid, accepted: true } if vmid == vm
        )
    });
    if in_vm {
        return Host::InVm;
    }
    let why = mine
        .iter()
        .map(|t| format!("{}: {}", t.serial, t.place.words()))
        .collect::<Vec<_>>()
        .join("; ");
    let away = mine
        .iter()
        .all(|t| matches!(t.place, TokenPlace::Absent | TokenPlace::Conflict { .. }));
    if away {
        Host::Away(why)
    } else {
        Host::Elsewhere(why)
    }
}

/// Checks the host's PIN file without reading it: a regular file, not empty, owned by
/// root and open to nobody else (`signet_protocol::pin_file::check`, as
/// `signetd check-config` does).
pub fn check_pin_path(path: &Path) -> Result<(), String> {
    signet_protocol::pin_file::check(path, 0)
}

/// Reads the host's PIN file, checked first, into memory that is wiped when dropped.
pub fn read_pin_file(path: &Path) -> Result<Zeroizing<String>, String> {
    use std::io::Read;
    check_pin_path(path)?;
    let cannot = |e: std::io::Error| format!("cannot read the PIN file {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(cannot)?;
    let len = file.metadata().map_err(cannot)?.len();
    // Room for all of it up front: growing the buffer would leave copies behind.
    let mut text = Zeroizing::new(String::with_capacity(
        usize::try_from(len)
            .unwrap_or(0)
            .saturating_add(1)
            .min(1 << 16),
    ));
    file.take(1 << 16)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    Ok(text)
}

/// The PIN in the file's text: its first line, without the line end.
pub fn pin_of(text: &str) -> Option<&str> {
    let pin = text.lines().next()?.trim_end_matches('\r');
    (!pin.is_empty()).then_some(pin)
}

/// The file in the state directory that remembers the PIN the token refused.
pub const REFUSED_FILE: &str = "pin.refused";
/// The per-install key of that memory's HMAC.
pub const SALT_FILE: &str = "pin.salt";

/// The watcher's memory across connections, and across restarts: the refused PIN's
/// HMAC-SHA-256 (keyed with a random per-install salt) is kept in
/// `state_dir/pin.refused` (0600), so a restart of signetd and the agent together does
/// not cost the token another try.
#[derive(Debug, Default)]
struct PinMemory {
    /// The HMAC of the last PIN the token refused: never sent again.
    rejected: Option<[u8; 32]>,
    /// The last complaint about the PIN file, so it is logged once.
    complaint: Option<String>,
    /// The state directory, where the memory is kept (none: in memory only).
    dir: Option<std::path::PathBuf>,
    /// The salt of the HMAC.
    salt: Vec<u8>,
    /// The PIN file as last seen (modified time, length, inode), to notice a change.
    seen: Option<(std::time::SystemTime, u64, u64)>,
    /// The refused PIN is in the file now: said once.
    said_refused: bool,
}

impl PinMemory {
    /// The memory kept under `dir`, created on first use (a fresh salt).
    fn load(dir: &Path) -> PinMemory {
        let mut m = PinMemory {
            dir: Some(dir.to_owned()),
            ..PinMemory::default()
        };
        let salt_path = dir.join(SALT_FILE);
        m.salt = match std::fs::read(&salt_path) {
            Ok(s) if s.len() >= 16 => s,
            _ => {
                let mut salt = vec![0u8; 32];
                if getrandom::fill(&mut salt).is_err() || write_private(&salt_path, &salt).is_err()
                {
                    tracing::warn!(path = %salt_path.display(), "the refused-PIN memory cannot be kept on disk; a restart forgets it");
                    m.dir = None;
                }
                salt
            }
        };
        if m.dir.is_some() {
            m.rejected = std::fs::read_to_string(dir.join(REFUSED_FILE))
                .ok()
                .and_then(|t| unhex32(t.trim()));
        }
        m
    }

    /// The PIN's fingerprint: HMAC-SHA-256 keyed with the salt.
    fn fingerprint(&self, pin: &str) -> [u8; 32] {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<Sha256> as Mac>::new_from_slice(&self.salt)
            .expect("HMAC takes keys of any length");
        mac.update(b"signet-refused-pin\n");
        mac.update(pin.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The token refused the PIN whose fingerprint is `hash`: kept, on disk too.
    fn refused(&mut self, hash: [u8; 32]) {
        self.rejected = Some(hash);
        if let Some(dir) = &self.dir {
            let path = dir.join(REFUSED_FILE);
            if let Err(e) = write_private(&path, crate::adapters::audit::hex(&hash).as_bytes()) {
                tracing::warn!(path = %path.display(), error = %e, "the refused PIN cannot be remembered on disk; a restart forgets it");
            }
        }
    }

    /// Whether the PIN file changed since last asked (the first look is a change).
    fn file_changed(&mut self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::metadata(path).ok().map(|m| {
            (
                m.modified().unwrap_or(std::time::UNIX_EPOCH),
                m.len(),
                m.ino(),
            )
        });
        let changed = now.is_some() && now != self.seen;
        self.seen = now;
        changed
    }
}

/// Writes `bytes` to `path` atomically, readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = std::path::PathBuf::from(format!("{}.tmp", path.display()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Follows the agent and the token's life for the daemon's life. Its two halves (the
/// agent's stream here, the token's life in [`live`]) end together: a panic in either
/// is this task's.
pub async fn run(daemon: Arc<Daemon>) {
    let (tx, rx) = mpsc::channel(64);
    let (refollow, gone) = watch::channel(0u64);
    let mut life = tokio::spawn(live(daemon.clone(), rx, refollow));
    tokio::select! {
        ended = &mut life => {
            if let Err(e) = ended {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
        }
        () = follow_agent(&daemon, tx, gone) => {}
    }
    life.abort();
}

async fn follow_agent(
    daemon: &Arc<Daemon>,
    tx: mpsc::Sender<Event>,
    mut gone: watch::Receiver<u64>,
) {
    let mut last = None;
    let mut instance = None;
    let mut vm_went = None;
    let mut resets = *gone.borrow();
    let mut said: Option<String> = None;
    loop {
        let mut connected = false;
        let why = follow(daemon, &tx, &mut instance, &mut gone, &mut connected).await;
        // Each new reason once in the log (a refused key, a wrong agent, no agent),
        // not every retry's.
        if connected || said.as_deref() != Some(why.as_str()) {
            tracing::warn!(reason = %why, "the agent cannot be followed; trying again");
            said = (!connected).then(|| why.clone());
        }
        let _ = tx.send(Event::AgentDown(why)).await;
        let now = *gone.borrow();
        if now != resets {
            resets = now;
            vm_went = Some(Instant::now());
        }
        let booting = vm_went.is_some_and(|at| at.elapsed() < VM_BOOT);
        let pause = next_wait(last, connected, booting);
        last = Some(pause);
        tokio::time::sleep(pause).await;
    }
}

/// The wait before the next try to reach the agent, after one that ended (`connected`:
/// the stream had been open; `last`: the wait before this try). It doubles from
/// [`RECONNECT_MIN`] up to [`RECONNECT_MAX`]; while the agent's VM boots after a reset
/// or shutdown (`booting`) it stays at [`RECONNECT_BOOTING`], so the new agent is found
/// soon after it listens.
fn next_wait(last: Option<Duration>, connected: bool, booting: bool) -> Duration {
    match last {
        _ if booting => RECONNECT_BOOTING,
        Some(last) if !connected => (last * 2).min(RECONNECT_MAX),
        _ => RECONNECT_MIN,
    }
}

/// The agent VM's tokens, and whether Signet can act on the host for them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Scope {
    vm: Option<u32>,
    serials: Vec<String>,
}

impl Scope {
    /// The agent's VM and its tokens in `cfg` (`[[tokens]]`, which a reload changes).
    fn of(cfg: &crate::config::Config) -> Scope {
        let vm = cfg.agent_vm();
        Scope {
            vm,
            serials: vm
                .map(|vm| {
                    cfg.tokens
                        .iter()
                        .filter(|t| t.vm == vm)
                        .map(|t| t.serial.clone())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// The token's life: owns [`Life`], feeds it the agent's events (from [`follow`]),
/// the host's view of the tokens, the VM's resets and time, and carries out what it
/// asks.
async fn live(daemon: Arc<Daemon>, mut agent: mpsc::Receiver<Event>, refollow: watch::Sender<u64>) {
    let mut cfg = daemon.config();
    let mut scope = Scope::of(&cfg);
    let service = daemon.token_service();
    let mut status = service.subscribe();
    let mut vm_signals = service.vm_signals();
    // The host steps need the token service and the VM's monitor (its VM in
    // [[tokens]]).
    let mut followed = status.is_some() && !scope.serials.is_empty();
    let mut life = Life::new(
        cfg.recovery.policy(),
        cfg.recovery.enabled,
        followed,
        followed,
    );
    let now = Instant::now();
    let now_ms = crate::adapters::store::now_ms();
    for (step, at_ms) in daemon.timeline().last_steps() {
        let ago = Duration::from_millis(now_ms.saturating_sub(at_ms));
        if let Some(at) = now.checked_sub(ago) {
            life.remember(step, at);
        }
    }
    // Without a PIN file there is no PIN to remember.
    let mut pins = match &cfg.pin_file {
        Some(p) => {
            let mut m = PinMemory::load(&cfg.state_dir);
            m.file_changed(p);
            m
        }
        None => PinMemory::default(),
    };
    let first = match (&status, scope.vm) {
        (Some(s), Some(vm)) if followed => {
            Some(Event::Host(host_of(&s.borrow(), &scope.serials, vm)))
        }
        _ => None,
    };
    if let Some(ev) = first {
        for a in life.on(ev, Instant::now()) {
            act(&daemon, &scope, &mut pins, &refollow, a).await;
        }
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // A reload ([[tokens]] of the agent's VM changed): the ladder acts on the new
        // tokens from now on, and the host's view of them is read afresh.
        let now_cfg = daemon.config();
        if !Arc::ptr_eq(&now_cfg, &cfg) {
            cfg = now_cfg;
            let new_scope = Scope::of(&cfg);
            if new_scope != scope {
                scope = new_scope;
                followed = status.is_some() && !scope.serials.is_empty();
                life.rescope(followed, followed);
                tracing::info!(vm = ?scope.vm, tokens = ?scope.serials, "the recovery ladder follows the agent VM's tokens as reloaded");
                if let (Some(s), Some(vm), true) = (&status, scope.vm, followed) {
                    let ev = Event::Host(host_of(&s.borrow(), &scope.serials, vm));
                    for a in life.on(ev, Instant::now()) {
                        act(&daemon, &scope, &mut pins, &refollow, a).await;
                    }
                }
            }
        }
        let event = tokio::select! {
            ev = agent.recv() => match ev {
                Some(ev) => ev,
                None => return,
            },
            _ = tick.tick() => Event::Tick,
            s = next_status(&mut status), if followed => match scope.vm {
                Some(vm) => Event::Host(host_of(&s, &scope.serials, vm)),
                None => continue,
            },
            sig = next_signal(&mut vm_signals) => match sig {
                (id, VmSignal::Reset) if Some(id) == scope.vm => Event::VmReset,
                (id, VmSignal::Down) if Some(id) == scope.vm => Event::VmDown,
                _ => continue,
            },
        };
        let tick = event == Event::Tick;
        for a in life.on(event, Instant::now()) {
            act(&daemon, &scope, &mut pins, &refollow, a).await;
        }
        // A changed PIN file reaches an agent that waits for a PIN at once.
        let changed = tick
            && cfg
                .pin_file
                .as_deref()
                .is_some_and(|p| pins.file_changed(p));
        if changed {
            if let Some(Ok(h)) = health(&daemon).await {
                if matches!(h.state, AgentState::PinNeeded | AgentState::PinRejected) {
                    tracing::info!("the PIN file changed; giving the agent its PIN");
                    for a in life.on(Event::PinNeeded, Instant::now()) {
                        act(&daemon, &scope, &mut pins, &refollow, a).await;
                    }
                }
            }
        }
    }
}

async fn next_status(rx: &mut Option<watch::Receiver<Status>>) -> Status {
    if let Some(r) = rx {
        if r.changed().await.is_ok() {
            return r.borrow_and_update().clone();
        }
    }
    std::future::pending().await
}

async fn next_signal(rx: &mut Option<broadcast::Receiver<(u32, VmSignal)>>) -> (u32, VmSignal) {
    loop {
        match rx {
            Some(r) => match r.recv().await {
                Ok(s) => return s,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => *rx = None,
            },
            None => return std::future::pending().await,
        }
    }
}

/// Carries out one of the life's actions.
async fn act(
    daemon: &Arc<Daemon>,
    scope: &Scope,
    pins: &mut PinMemory,
    refollow: &watch::Sender<u64>,
    action: Action,
) {
    match action {
        Action::Refollow => refollow.send_modify(|n| *n += 1),
        Action::Record(seen) => daemon.timeline().saw(seen),
        Action::ResumeQueue => daemon.job_service().wake_worker(),
        Action::DeliverPin => deliver_pin(daemon, pins).await,
        // The operator's alert for it is the alerts service's (`operator-needed`,
        // raised from the timeline's `recovery_exhausted`): one alert line per incident.
        Action::Alert(why) => tracing::error!("{why}"),
        Action::Run(step) => {
            // A step takes a while (the agent waits for the job at the token, QEMU
            // answers in its time): it runs beside the loop, which goes on hearing.
            let daemon = daemon.clone();
            let serials = scope.serials.clone();
            tokio::spawn(async move {
                if let Err(why) = run_step(&daemon, &serials, step).await {
                    tracing::warn!(step = step.name(), error = %why, "a recovery step failed");
                    daemon
                        .timeline()
                        .saw(Seen::StepFailed(format!("{}: {why}", step.name())));
                }
            });
        }
    }
}

async fn run_step(daemon: &Daemon, serials: &[String], step: Step) -> Result<(), String> {
    // The step was decided on the loss; the token may have come back since (the agent
    // found it again while a job held it, and said both at once). A token the agent
    // holds ready again is not disturbed.
    if step == Step::AgentReinit {
        if let Ok(h) = daemon.agent().health(HEALTH_LIMIT).await {
            if h.state == AgentState::Ready {
                tracing::info!(
                    step = step.name(),
                    "recovery: the token is back and ready before the step ran; nothing to do"
                );
                return Ok(());
            }
        }
    }
    tracing::warn!(step = step.name(), "recovery: {}", step.words());
    let host = |op: Op| async move {
        let Some(serial) = serials.first() else {
            return Err("no token of the agent's VM is in [[tokens]]".to_owned());
        };
        daemon
            .token_service()
            .ask(serial, op)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    match step {
        Step::AgentReinit => {
            let agent = &daemon.config().agent;
            let req = http::Request::post(AGENT_REINIT_PATH)
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let resp = tokio::time::timeout(REINIT_TIMEOUT, client::send(agent, req))
                .await
                .map_err(|_| "the agent did not answer in time".to_owned())?
                .map_err(|e| e.to_string())?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(client::error_body(agent, resp).await.message)
            }
        }
        Step::Reattach => host(Op::Reattach).await,
        Step::UsbPortReset => host(Op::ResetPort).await,
        Step::VmReset => host(Op::ResetVm).await,
    }
}

/// One connection to the agent's event stream, until it ends; why it ended, for the
/// timeline. `connected` tells whether the stream was open. `gone` changes when the
/// agent went away with its VM (reset, shut down): the stream is dropped at once.
async fn follow(
    daemon: &Daemon,
    life: &mpsc::Sender<Event>,
    instance: &mut Option<String>,
    gone: &mut watch::Receiver<u64>,
    connected: &mut bool,
) -> String {
    match follow_once(daemon, life, instance, gone, connected).await {
        Ok(never) => match never {},
        Err(why) => why,
    }
}

/// The agent the daemon followed went away with its VM: the job at it runs again,
/// and the next agent seen is not taken for another restart.
fn agent_gone(daemon: &Daemon, instance: &mut Option<String>) {
    *instance = None;
    daemon.job_service().agent_restarted();
}

/// True once the agent was gone since this was last asked.
fn went_away(gone: &mut watch::Receiver<u64>) -> bool {
    let changed = gone.has_changed().unwrap_or(false);
    gone.mark_unchanged();
    changed
}

/// The next time the agent goes away with its VM.
async fn goes_away(gone: &mut watch::Receiver<u64>) {
    if gone.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn follow_once(
    daemon: &Daemon,
    life: &mpsc::Sender<Event>,
    instance: &mut Option<String>,
    gone: &mut watch::Receiver<u64>,
    connected: &mut bool,
) -> Result<std::convert::Infallible, String> {
    if went_away(gone) {
        agent_gone(daemon, instance);
    }
    let agent = &daemon.config().agent;
    let req = http::Request::get(AGENT_EVENTS_PATH)
        .header(http::header::ACCEPT, "text/event-stream")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    // An agent that accepts but never answers (a hung guest, a frozen process: the
    // link's handshake and the answer both wait on it) is given up like a silent
    // health read, so the outage is seen and the next try made.
    let resp = match tokio::time::timeout(HEALTH_LIMIT, client::send(agent, req)).await {
        Ok(r) => r.map_err(|e| e.to_string())?,
        Err(_) => {
            daemon.timeline().saw(Seen::ContactFailed);
            return Err(format!(
                "the agent did not answer its event stream within {} s",
                HEALTH_LIMIT.as_secs()
            ));
        }
    };
    if !resp.status().is_success() {
        return Err(format!(
            "the agent answered {} to its event stream",
            resp.status()
        ));
    }
    *connected = true;
    let _ = life.send(Event::AgentUp).await;
    let health_now = health(daemon).await;
    // Gone while connecting: this is already the next agent, or none.
    if went_away(gone) {
        agent_gone(daemon, instance);
    }
    if let Some(Ok(h)) = health_now {
        seen_instance(daemon, instance, &h);
        if let Some(ev) = health_event(&h) {
            let _ = life.send(ev).await;
        }
    }
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    // The first check one period from now: the health was just read.
    let mut recheck =
        tokio::time::interval_at(tokio::time::Instant::now() + PIN_RECHECK, PIN_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            frame = body.frame() => {
                let Some(Ok(frame)) = frame else {
                    return Err("the agent's event stream ended".to_owned());
                };
                let Ok(data) = frame.into_data() else { continue };
                buf.extend_from_slice(&data);
                let mut heard = false;
                for event in take_events(&mut buf) {
                    heard |= changes_health(&event.kind);
                    if let Some(ev) = react(&event.kind) {
                        let _ = life.send(ev).await;
                    }
                }
                // What the agent said changes what it reports: the daemon's view of it
                // (the web's overview, the worker's token facts) reads it anew.
                if heard {
                    let _ = health(daemon).await;
                }
            }
            _ = goes_away(gone) => {
                agent_gone(daemon, instance);
                return Err("the signing VM was reset or stopped; following the agent that comes next".to_owned());
            }
            _ = recheck.tick() => {
                let h = health(daemon).await;
                if h.is_none() {
                    // A stream can stay open, silent, behind an agent that is gone
                    // (a killed process behind a vsock backend): no answer is an
                    // outage from now, whatever the stream says.
                    daemon.timeline().saw(Seen::ContactFailed);
                    return Err(format!(
                        "the agent did not answer its health within {} s",
                        HEALTH_LIMIT.as_secs()
                    ));
                }
                daemon.timeline().saw(Seen::ContactOk);
                if let Some(Ok(h)) = h {
                    if seen_instance(daemon, instance, &h) {
                        return Err("the agent restarted; following its new event stream".to_owned());
                    }
                    if daemon.config().pin_file.is_some()
                        && matches!(h.state, AgentState::PinNeeded | AgentState::PinRejected)
                    {
                        let _ = life.send(Event::PinNeeded).await;
                    }
                }
            }
        }
    }
}

/// The agent's health within [`HEALTH_LIMIT`]: `None` when it did not answer.
/// The agent's health within [`HEALTH_LIMIT`], read through the daemon's view of the
/// agent (which learns it): `None` when it did not answer.
async fn health(daemon: &Daemon) -> Option<Result<AgentHealth, ()>> {
    match daemon.agent().read_health(HEALTH_LIMIT).await {
        Health::Answered(h) => Some(Ok(*h)),
        Health::Refused(_) => Some(Err(())),
        Health::Unreachable(_) | Health::Silent(_) => None,
    }
}

/// Notes which agent process answered; true (and the job at the old one abandoned:
/// [`JobService::agent_restarted`](crate::services::jobs::JobService::agent_restarted)) when it is another than before.
fn seen_instance(daemon: &Daemon, known: &mut Option<String>, h: &AgentHealth) -> bool {
    let Some(now) = &h.instance else {
        return false;
    };
    let changed = known.as_ref().is_some_and(|k| k != now);
    *known = Some(now.clone());
    if changed {
        tracing::info!(instance = %now, "the agent is a new process (its VM was reset, or it restarted)");
        daemon.job_service().agent_restarted();
    }
    changed
}

/// Takes the complete server-sent events out of `buf` (their `data:` lines as JSON).
fn take_events(buf: &mut Vec<u8>) -> Vec<AgentEvent> {
    let mut out = Vec::new();
    while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
        let block: Vec<u8> = buf.drain(..end + 2).collect();
        let text = String::from_utf8_lossy(&block);
        let data: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim_start)
            .collect();
        if let Ok(e) = serde_json::from_str::<AgentEvent>(&data) {
            out.push(e);
        }
    }
    out
}

/// Gives the agent the PIN from the host's PIN file, unless there is none, it cannot
/// be used, or the token refused it before.
async fn deliver_pin(daemon: &Daemon, pins: &mut PinMemory) {
    let Some(path) = daemon.config().pin_file.clone() else {
        return;
    };
    let read = tokio::task::spawn_blocking({
        let path = path.clone();
        move || read_pin_file(&path)
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let text = match read {
        Ok(t) => t,
        Err(why) => {
            if pins.complaint.as_ref() != Some(&why) {
                tracing::error!("{why}; the agent waits for a PIN");
                pins.complaint = Some(why);
            }
            return;
        }
    };
    let Some(pin) = pin_of(&text) else {
        tracing::error!(path = %path.display(), "the PIN file is empty; put the token's PIN in it");
        return;
    };
    let hash = pins.fingerprint(pin);
    if pins.rejected == Some(hash) {
        // Refused before (perhaps before a restart): never sent again.
        daemon.job_service().set_host_pin_rejected(true);
        if !pins.said_refused {
            pins.said_refused = true;
            tracing::error!(path = %path.display(), "the PIN in the PIN file is one the token refused before; it is not sent again. Put the right PIN in that file (check the token's PIN counter with `signetctl status` first)");
        }
        return;
    }
    pins.said_refused = false;
    pins.complaint = None;
    let body = AgentLogin {
        pin: SecretString::from(pin.to_owned()),
    };
    let req = login_request(&body);
    let agent = &daemon.config().agent;
    let answer = match send_within(LOGIN_LIMIT, client::send(agent, req)).await {
        Some(Ok(resp)) if resp.status().is_success() => Ok(()),
        Some(Ok(resp)) => Err(Some(client::error_body(agent, resp).await)),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "the PIN could not be given to the agent");
            Err(None)
        }
        None => {
            tracing::warn!(
                limit_s = LOGIN_LIMIT.as_secs(),
                "the agent did not answer the PIN's delivery in time (its token may hang); it is given again when the agent asks for it"
            );
            Err(None)
        }
    };
    match answer {
        Ok(()) => {
            daemon.job_service().set_host_pin_rejected(false);
            daemon.timeline().saw(Seen::PinDelivered);
            daemon.job_service().wake_worker();
        }
        Err(Some(e)) if e.code == ErrorCode::PinRejected => {
            pins.refused(hash);
            daemon.job_service().set_host_pin_rejected(true);
            daemon.timeline().saw(Seen::PinRejected(format!(
                "PIN rejected — operator action needed: the token refused the PIN in {}; it is not tried again. Put the right PIN in that file (check the token's PIN counter with `signetctl status` first)",
                path.display()
            )));
        }
        Err(Some(e)) => {
            tracing::warn!(code = %e.code, detail = %e.message, "the agent did not take the PIN")
        }
        Err(None) => {}
    }
}

/// The request that gives the agent the PIN. Its body is serialised into a buffer
/// sized first (a buffer that grows leaves copies behind) and wiped when hyper drops
/// the last reference to it; hyper's and TLS's own buffers are beyond its reach.
fn login_request(body: &AgentLogin) -> http::Request<http_body_util::Full<Bytes>> {
    let json = secret_json(body);
    let mut req = http::Request::new(http_body_util::Full::new(Bytes::from_owner(json)));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static(AGENT_LOGIN_PATH);
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    req
}

/// `value` as JSON in memory wiped when dropped, allocated once at its exact size.
fn secret_json<T: serde::Serialize>(value: &T) -> Zeroizing<Vec<u8>> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Neither write fails: both writers take everything, and the value is plain data.
    let _ = serde_json::to_writer(&mut count, value);
    let mut out = Zeroizing::new(Vec::with_capacity(count.0));
    let _ = serde_json::to_writer(&mut *out, value);
    out
}

/// `request`'s answer, or `None` when it takes longer than `limit` (the request is
/// dropped, its connection closed).
async fn send_within<T>(
    limit: Duration,
    request: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::time::timeout(limit, request).await.ok()
}

#[cfg(test)]
mod tests {
    /// The PIN's body is the same JSON the agent reads, in a buffer that never grew.
    #[test]
    fn the_pins_body_is_made_once_at_its_size() {
        let body = signet_api::wire::AgentLogin {
            pin: secrecy::SecretString::from("12345678".to_owned()),
        };
        let json = super::secret_json(&body);
        assert_eq!(json.capacity(), json.len());
        let back: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, serde_json::json!({"pin": "12345678"}));
        let req = super::login_request(&body);
        assert_eq!(req.uri().path(), signet_api::wire::AGENT_LOGIN_PATH);
        assert_eq!(req.method(), http::Method::POST);
    }

    /// An agent that takes the PIN's delivery and never answers holds the watcher
    /// for [`super::LOGIN_LIMIT`], no longer.
    #[tokio::test(start_paused = true)]
    async fn a_pin_delivery_the_agent_never_answers_ends_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let hold = tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
            drop(conn);
        });
        let agent = signet_protocol::Endpoint::Unix(path);
        let body = signet_api::wire::AgentLogin {
            pin: secrecy::SecretString::from("1234".to_owned()),
        };
        let req = super::login_request(&body);
        let started = tokio::time::Instant::now();
        let answer = super::send_within(
            super::LOGIN_LIMIT,
            signet_protocol::client::send(&agent, req),
        )
        .await;
        assert!(answer.is_none(), "no answer, so none is taken");
        let waited = started.elapsed();
        assert!(
            waited >= super::LOGIN_LIMIT && waited < super::LOGIN_LIMIT * 2,
            "{waited:?}"
        );
        hold.abort();
    }

    #[test]
    fn a_jobs_start_and_end_leave_the_health_as_read_and_the_tokens_news_not() {
        use signet_api::wire::{AgentEventKind as K, AgentState};
        let serial = || "s".to_owned();
        for job in [
            K::SigningStarted {
                job: 1,
                filename: None,
            },
            K::SigningFinished {
                job: 1,
                ok: true,
                code: None,
                retryable: false,
                ms: 3,
            },
        ] {
            assert!(!super::changes_health(&job), "{job:?}");
        }
        for news in [
            K::TokenAppeared {
                label: "l".into(),
                serial: serial(),
            },
            K::TokenLost {
                serial: serial(),
                detail: "d".into(),
            },
            K::LoggedIn {
                label: "l".into(),
                serial: serial(),
            },
            K::PinProblem {
                state: AgentState::PinNeeded,
                detail: "d".into(),
            },
        ] {
            assert!(super::changes_health(&news), "{news:?}");
        }
    }

    #[test]
    fn a_refused_pin_is_remembered_on_disk_keyed_per_install() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut m = super::PinMemory::load(dir.path());
        let wrong = m.fingerprint("000000");
        assert_ne!(wrong, m.fingerprint("123456"));
        m.refused(wrong);
        for f in [super::REFUSED_FILE, super::SALT_FILE] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let kept = std::fs::read_to_string(dir.path().join(super::REFUSED_FILE)).unwrap();
        assert!(!kept.contains("000000"));
        // After a restart: the same fingerprint, still refused.
        let again = super::PinMemory::load(dir.path());
        assert_eq!(again.rejected, Some(again.fingerprint("000000")));
        // Another install keys it differently.
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            super::PinMemory::load(other.path()).fingerprint("000000"),
            wrong
        );
    }

    #[test]
    fn a_changed_pin_file_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pin");
        let mut m = super::PinMemory::default();
        assert!(!m.file_changed(&f), "no file yet");
        std::fs::write(&f, "1").unwrap();
        assert!(m.file_changed(&f));
        assert!(!m.file_changed(&f), "unchanged");
        std::fs::write(&f, "123456").unwrap();
        assert!(m.file_changed(&f), "another length");
    }

    #[test]
    fn reconnects_back_off_but_not_while_the_vm_boots() {
        let ms = Duration::from_millis;
        let mut last = None;
        let mut waits = Vec::new();
        for _ in 0..7 {
            let w = next_wait(last, false, false);
            waits.push(w.as_millis());
            last = Some(w);
        }
        assert_eq!(waits, [250, 500, 1000, 2000, 4000, 5000, 5000]);
        assert_eq!(next_wait(Some(ms(5000)), true, false), RECONNECT_MIN);
        assert_eq!(next_wait(Some(ms(5000)), false, true), RECONNECT_BOOTING);
        assert_eq!(next_wait(Some(ms(250)), true, true), RECONNECT_BOOTING);
    }

    use super::*;

    #[test]
    fn agent_events_and_health_become_life_events() {
        let lost = AgentEventKind::TokenLost {
            serial: "a1".into(),
            detail: "CKR_DEVICE_REMOVED".into(),
        };
        assert_eq!(
            react(&lost),
            Some(Event::TokenLost("CKR_DEVICE_REMOVED".into()))
        );
        let back = AgentEventKind::TokenAppeared {
            label: "l".into(),
            serial: "a1".into(),
        };
        assert_eq!(react(&back), Some(Event::TokenBack));
        let needed = AgentEventKind::PinProblem {
            state: AgentState::PinNeeded,
            detail: String::new(),
        };
        assert_eq!(react(&needed), Some(Event::PinNeeded));
        let rejected = AgentEventKind::PinProblem {
            state: AgentState::PinRejected,
            detail: String::new(),
        };
        assert_eq!(react(&rejected), None, "never on a rejection");
        let started = AgentEventKind::SigningStarted {
            job: 1,
            filename: None,
        };
        assert_eq!(react(&started), None);

        let mut h: AgentHealth = serde_json::from_value(serde_json::json!({
            "version": "1", "state": "token_missing", "detail": "no token labelled x",
            "module": "/m.so", "signer": "osslsigncode 2.9"
        }))
        .unwrap();
        assert_eq!(
            health_event(&h),
            Some(Event::TokenLost("no token labelled x".into()))
        );
        h.state = AgentState::Ready;
        assert_eq!(health_event(&h), Some(Event::TokenBack));
        h.state = AgentState::PinLocked;
        assert_eq!(health_event(&h), None);
    }

    #[test]
    fn the_host_has_the_token_in_the_vm_when_one_of_its_tokens_is() {
        use signet_api::wire::{HostToken, TokenChange};
        let t = |serial: &str, place| HostToken {
            serial: serial.into(),
            model: None,
            usb_id: None,
            host_port: None,
            assigned_vm: Some(105),
            place,
            last_change: TokenChange {
                at: "t".into(),
                reason: "r".into(),
            },
        };
        let serials = vec!["A".to_owned()];
        let mut status = Status::new();
        status.insert("A".into(), t("A", TokenPlace::Absent));
        status.insert("B".into(), t("B", TokenPlace::Attached { vmid: 105 }));
        assert!(matches!(host_of(&status, &serials, 105), Host::Away(w) if w.starts_with("A: ")));
        status.insert(
            "A".into(),
            t(
                "A",
                TokenPlace::Attaching {
                    vmid: 105,
                    accepted: false,
                },
            ),
        );
        assert!(
            matches!(host_of(&status, &serials, 105), Host::Elsewhere(_)),
            "not yet accepted"
        );
        status.insert(
            "A".into(),
            t(
                "A",
                TokenPlace::Attaching {
                    vmid: 105,
                    accepted: true,
                },
            ),
        );
        assert_eq!(host_of(&status, &serials, 105), Host::InVm);
        assert!(
            matches!(host_of(&status, &serials, 106), Host::Elsewhere(_)),
            "another VM"
        );
    }

    #[test]
    fn the_pin_file_must_be_private_and_the_pin_is_its_first_line() {
        assert_eq!(pin_of("1234\n"), Some("1234"));
        assert_eq!(pin_of("12 34\r\nnext"), Some("12 34"));
        assert_eq!(pin_of("\n"), None);
        assert_eq!(pin_of(""), None);
    }

    #[test]
    fn server_sent_events_are_taken_whole() {
        let mut buf = b"event: token_lost\ndata: {\"seq\":1,\"time\":\"t\",\"type\":\"token_lost\",\"details\":{\"serial\":\"a\",\"detail\":\"gone\"}}\n\nevent: logg".to_vec();
        let events = take_events(&mut buf);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].seq, 1);
        assert_eq!(buf, b"event: logg", "the partial event waits for its end");
        assert!(take_events(&mut b": keep-alive\n\n".to_vec()).is_empty());
    }
}
