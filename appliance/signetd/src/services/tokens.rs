//! The token service: the host's USB devices ([`TokenWatcher`]), the signing VMs'
//! monitors ([`Monitor`]) and one [`Token`] per token serial, put
//! together. It feeds every udev and QMP event to the tokens it concerns, carries
//! their actions out over QMP, and publishes every token's state on a watch channel
//! (for the status API). One loop does all of it, so the tokens' state machines see
//! events one at a time and in order; the operator's commands (attach, detach,
//! re-attach) reach the same loop over a channel ([`Handle`]).
//!
//! [`start`] runs the service for the daemon from its configuration (`[[tokens]]`:
//! which token serial belongs to which signing VM; `[passthrough]`: where the VMs'
//! Signet monitors are). A reload hands it new `[[tokens]]` ([`Handle::reassign`]);
//! the pure [`Setup::replan`] says what changes and the same loop carries it out: an
//! added token goes to its VM, a moved one leaves its old VM for the new one, a
//! removed one is no longer managed — one in a VM is left there, since taking it out
//! could cut a job short — and the monitors of VMs new to `[[tokens]]` are followed.
//! Jobs are not tied to a token (one agent, one worker), so none moves. Without udev the daemon runs on and its status says why
//! tokens are not followed. The commands [`Handle::report`], [`Handle::attach`],
//! [`Handle::detach`] and [`Handle::reattach`] are what the HTTP, D-Bus and CLI fronts
//! call.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use signet_api::wire::{HostToken, TokenChange, TokenPlace, TokensReport};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::adapters::qmp::{Monitor, MonitorEvent, Qmp};
use crate::adapters::usb::{
    self, Catalog, TokenKind, TokenSighting, TokenWatcher, UsbEvent, WatchError,
};
use crate::config::VidPid;
use crate::core::passthrough::{Action, Input, Refusal, State, Token};

/// Every token's state as the status API shows it, by serial.
pub type Status = BTreeMap<String, HostToken>;

/// Which VM each token (by serial) belongs to, and where each VM's Signet monitor is.
#[derive(Debug, Clone)]
pub struct Setup {
    pub catalog: Catalog,
    pub assignments: HashMap<String, u32>,
    /// The devices that stand for each token in its VM, by serial (`usb-host` when absent).
    pub devices: HashMap<String, crate::config::DeviceKind>,
    /// Signet's monitor socket per VM (`proxmox::monitor_path`).
    pub monitors: Vec<(u32, PathBuf)>,
    /// The VMs' USB bus (`xhci.0` on Proxmox).
    pub usb_bus: String,
    pub qmp_timeout: Duration,
    /// The host's sysfs (`/sys`), for USB port resets.
    pub sysfs: PathBuf,
}

impl Setup {
    /// The setup `signetd.toml` describes.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        let mut vms: Vec<u32> = cfg.tokens.iter().map(|t| t.vm).collect();
        vms.sort_unstable();
        vms.dedup();
        Setup {
            catalog: Catalog::new(cfg.known_tokens.clone()),
            assignments: cfg
                .tokens
                .iter()
                .map(|t| (t.serial.clone(), t.vm))
                .collect(),
            devices: cfg
                .tokens
                .iter()
                .map(|t| (t.serial.clone(), t.device.clone()))
                .collect(),
            monitors: vms
                .into_iter()
                .map(|vm| {
                    (
                        vm,
                        crate::adapters::proxmox::monitor_path(&cfg.passthrough.monitor_dir, vm),
                    )
                })
                .collect(),
            usb_bus: cfg.passthrough.usb_bus.clone(),
            qmp_timeout: Duration::from_secs(cfg.passthrough.qmp_timeout_seconds),
            sysfs: cfg.passthrough.sysfs.clone(),
        }
    }
}

/// What new token assignments change for the running service ([`Setup::replan`]):
/// pure, worked out before anything is done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replan {
    /// Tokens assigned that were not: serial, VM. Each goes to its VM when it is
    /// plugged in and the VM runs.
    pub added: Vec<(String, u32)>,
    /// Tokens assigned to another VM: serial, old VM, new VM. Each leaves the old VM
    /// and goes to the new one.
    pub moved: Vec<(String, u32, u32)>,
    /// Tokens no longer assigned: serial, their VM. Signet stops managing them; one in
    /// a VM is left there (taken out, it could cut a job short).
    pub removed: Vec<(String, u32)>,
    /// Tokens whose devices in the VM (`device = ...`) changed: used from their next
    /// attach.
    pub devices: Vec<String>,
    /// VMs new to `[[tokens]]`: their Signet monitor is followed from now on.
    pub start_monitors: Vec<(u32, PathBuf)>,
    /// VMs no token is assigned to any more: their monitor is let go, unless a
    /// token is left in them.
    pub stop_monitors: Vec<u32>,
}

impl Replan {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        *self == Replan::default()
    }
}

impl Setup {
    /// What replacing this setup's assignments with `new`'s changes (the catalog,
    /// bus, time limit and sysfs stay as the service was started with).
    pub fn replan(&self, new: &Setup) -> Replan {
        let mut plan = Replan::default();
        let sorted = |m: &HashMap<String, u32>| -> BTreeMap<String, u32> {
            m.iter().map(|(s, v)| (s.clone(), *v)).collect()
        };
        let (old_a, new_a) = (sorted(&self.assignments), sorted(&new.assignments));
        for (serial, vm) in &new_a {
            match old_a.get(serial) {
                None => plan.added.push((serial.clone(), *vm)),
                Some(old) if old != vm => plan.moved.push((serial.clone(), *old, *vm)),
                Some(_) => {
                    if self.devices.get(serial) != new.devices.get(serial) {
                        plan.devices.push(serial.clone());
                    }
                }
            }
        }
        for (serial, vm) in &old_a {
            if !new_a.contains_key(serial) {
                plan.removed.push((serial.clone(), *vm));
            }
        }
        let old_vms: BTreeMap<u32, &PathBuf> = self.monitors.iter().map(|(v, p)| (*v, p)).collect();
        let new_vms: BTreeMap<u32, &PathBuf> = new.monitors.iter().map(|(v, p)| (*v, p)).collect();
        plan.start_monitors = new_vms
            .iter()
            .filter(|(v, _)| !old_vms.contains_key(v))
            .map(|(v, p)| (*v, (*p).clone()))
            .collect();
        plan.stop_monitors = old_vms
            .keys()
            .filter(|v| !new_vms.contains_key(v))
            .copied()
            .collect();
        plan
    }
}

/// An operator's command for one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Into its VM (`Some`: the VM the operator expects it to go to).
    Attach(Option<u32>),
    /// Out of its VM, kept on the host until attached again.
    Detach,
    /// Out of its VM and in again.
    Reattach,
    /// The host resets the token's USB port (recovery).
    ResetPort,
    /// The token's signing VM is reset (recovery).
    ResetVm,
}

/// What a signing VM's QEMU did, for those following the token's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmSignal {
    /// QEMU shut the VM down or went away.
    Down,
    /// QEMU reset the VM (a reboot).
    Reset,
}

impl VmSignal {
    fn of(ev: &MonitorEvent) -> Option<VmSignal> {
        use crate::adapters::qmp::QmpEvent;
        match ev {
            MonitorEvent::Disconnected | MonitorEvent::Qmp(QmpEvent::Shutdown { .. }) => {
                Some(VmSignal::Down)
            }
            MonitorEvent::Qmp(QmpEvent::Reset { .. }) => Some(VmSignal::Reset),
            MonitorEvent::Connected | MonitorEvent::Qmp(_) => None,
        }
    }
}

#[derive(Debug)]
struct Command {
    serial: String,
    op: Op,
    reply: oneshot::Sender<Result<HostToken, TokenError>>,
}

/// Why a token command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no token with serial {serial} is plugged into this host or assigned in signetd.toml (tokens known: {known}); `signetctl tokens` lists them")]
    Unknown { serial: String, known: String },
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("signetd does not follow the host's tokens: {0}")]
    NotRunning(String),
    #[error("the token service did not answer in time; signetd's log says why")]
    NoAnswer,
    #[error("token {serial} is not on the host (its state: {state}); plug it in")]
    NotOnHost { serial: String, state: String },
    #[error("the USB port of token {serial} could not be reset: {why}")]
    PortReset { serial: String, why: String },
    #[error("token {serial} has no signing VM in signetd.toml ([[tokens]] vm = ...)")]
    NoVm { serial: String },
    #[error("signing VM {vmid} is not running or Signet's monitor for it is not connected; start it (`qm start {vmid}`)")]
    VmNotConnected { vmid: u32 },
    #[error("signing VM {vmid} could not be reset: {why}")]
    VmReset { vmid: u32, why: String },
}

/// The door to the running token service (or the reason it is not running).
#[derive(Debug, Clone)]
pub struct Handle {
    running: Option<(watch::Receiver<Status>, mpsc::Sender<Command>)>,
    /// The assignments the service is to follow ([`Handle::reassign`]).
    wanted: Option<Arc<watch::Sender<Setup>>>,
    /// The signing VMs' resets and shutdowns.
    vm_signals: Option<broadcast::Sender<(u32, VmSignal)>>,
    /// Why the service is not running, or stopped.
    stopped: Arc<Mutex<Option<String>>>,
    timeout: Duration,
}

impl Handle {
    /// No service, for this reason (said with the fix).
    pub fn off(why: impl Into<String>) -> Self {
        Handle {
            running: None,
            wanted: None,
            vm_signals: None,
            stopped: Arc::new(Mutex::new(Some(why.into()))),
            timeout: Duration::ZERO,
        }
    }

    fn stopped(&self) -> Option<String> {
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every token the service knows and whether it is following the host.
    pub fn report(&self) -> TokensReport {
        let stopped = self.stopped();
        TokensReport {
            watching: self.running.is_some() && stopped.is_none(),
            detail: stopped,
            tokens: self
                .running
                .as_ref()
                .map(|(s, _)| s.borrow().values().cloned().collect())
                .unwrap_or_default(),
        }
    }

    /// The tokens' states as they change; `None` when the service is not running.
    pub fn subscribe(&self) -> Option<watch::Receiver<Status>> {
        self.running.as_ref().map(|(s, _)| s.clone())
    }

    /// The signing VMs' resets and shutdowns from now on; `None` when the
    /// service is not running.
    pub fn vm_signals(&self) -> Option<broadcast::Receiver<(u32, VmSignal)>> {
        self.vm_signals.as_ref().map(broadcast::Sender::subscribe)
    }

    /// Puts new token assignments in force (`[[tokens]]` reloaded): the service's loop
    /// takes them up next, as [`Setup::replan`] says, and logs what it did. Answers at
    /// once; false when the service is not running (then there is nothing to move).
    pub fn reassign(&self, setup: Setup) -> bool {
        match &self.wanted {
            Some(w) if self.stopped().is_none() => {
                w.send_replace(setup);
                true
            }
            _ => false,
        }
    }

    /// Runs an operator's command in the service's loop; answers the token's state
    /// once QEMU has answered.
    pub async fn ask(&self, serial: &str, op: Op) -> Result<HostToken, TokenError> {
        let Some((_, commands)) = &self.running else {
            return Err(TokenError::NotRunning(self.stopped().unwrap_or_default()));
        };
        let (reply, answer) = oneshot::channel();
        let cmd = Command {
            serial: serial.to_owned(),
            op,
            reply,
        };
        let stopped =
            || TokenError::NotRunning(self.stopped().unwrap_or_else(|| "it stopped".into()));
        commands.send(cmd).await.map_err(|_| stopped())?;
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err(TokenError::NoAnswer),
        }
    }
}

/// Starts the token service for the daemon, as `signetd.toml` says; the daemon runs
/// without it when it is switched off or udev is not there, and says why.
/// The service's loop runs on `tasks`: its end is said in the status (the daemon
/// signs on without it), its panic stops the daemon.
pub fn start(
    cfg: &crate::config::Config,
    tasks: &mut crate::services::supervise::Supervisor,
) -> Handle {
    if !cfg.passthrough.enabled {
        return Handle::off(
            "token passthrough is switched off ([passthrough] enabled = false in signetd.toml)",
        );
    }
    let watcher = match crate::adapters::usb::udev::UdevWatcher::start() {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "tokens are not followed");
            return Handle::off(e.to_string());
        }
    };
    let (service, _) = TokenService::new(watcher, Setup::from_config(cfg));
    let handle = service.handle();
    let stopped = handle.stopped.clone();
    tasks.spawn_may_end("token service", async move {
        let why = match service.run().await {
            Ok(()) => "the udev watcher stopped; restart signetd".to_owned(),
            Err(e) => e.to_string(),
        };
        tracing::error!(reason = %why, "the token service stopped");
        *stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    });
    handle
}

/// The tokens whose view differs between `old` and `new` (changed or new), for the
/// token-changed signal.
pub fn changed(old: &Status, new: &Status) -> Vec<HostToken> {
    new.iter()
        .filter(|(serial, t)| old.get(*serial) != Some(*t))
        .map(|(_, t)| t.clone())
        .collect()
}

/// A token's view for the status API: its state, with the model and port it was last
/// seen with.
pub fn view(t: &Token, seen: Option<&(VidPid, TokenKind)>) -> HostToken {
    let place = match &t.state {
        State::Absent => TokenPlace::Absent,
        State::OnHost => TokenPlace::OnHost,
        State::Attaching { vmid, accepted } => TokenPlace::Attaching {
            vmid: *vmid,
            accepted: *accepted,
        },
        State::Attached { vmid } => TokenPlace::Attached { vmid: *vmid },
        State::Conflict { conflicts } => TokenPlace::Conflict {
            conflicts: conflicts.clone(),
        },
    };
    let at = signet_api::rfc3339::format(time::OffsetDateTime::from(t.last_change.at));
    HostToken {
        serial: t.serial.clone(),
        model: seen.and_then(|(_, k)| match k {
            TokenKind::Known { model } => Some(model.clone()),
            TokenKind::Candidate => None,
        }),
        usb_id: seen.map(|(id, _)| id.to_string()),
        host_port: t.position().map(|(bus, port)| format!("{bus}-{port}")),
        assigned_vm: t.assigned,
        place,
        last_change: TokenChange {
            at,
            reason: t.last_change.reason.clone(),
        },
    }
}

/// The operator's token commands, logged.
impl Handle {
    /// Puts the token into its signing VM (`vm`: the VM the operator expects; another
    /// one is refused, never attached to).
    pub async fn attach(&self, serial: &str, vm: Option<u32>) -> Result<HostToken, TokenError> {
        self.token_command(serial, Op::Attach(vm)).await
    }

    /// Takes the token out of its VM and keeps it on the host until it is attached
    /// again.
    pub async fn detach(&self, serial: &str) -> Result<HostToken, TokenError> {
        self.token_command(serial, Op::Detach).await
    }

    /// Detaches the token from its VM and attaches it anew.
    pub async fn reattach(&self, serial: &str) -> Result<HostToken, TokenError> {
        self.token_command(serial, Op::Reattach).await
    }

    async fn token_command(&self, serial: &str, op: Op) -> Result<HostToken, TokenError> {
        let r = self.ask(serial, op).await;
        match &r {
            Ok(t) => tracing::info!(serial, ?op, place = %t.place.words(), "token command"),
            Err(e) => tracing::warn!(serial, ?op, error = %e, "token command refused"),
        }
        r
    }
}

/// How often a device QEMU accepted but has not claimed is checked again (QEMU itself
/// rescans for host devices every 2 s).
pub const TICK: Duration = Duration::from_secs(2);

type VmEvent = (u32, MonitorEvent, Option<Arc<Qmp>>);

/// The running service.
#[derive(Debug)]
pub struct TokenService<W> {
    watcher: W,
    setup: Setup,
    tokens: BTreeMap<String, Token>,
    vms: HashMap<u32, Arc<Qmp>>,
    events: mpsc::Receiver<VmEvent>,
    /// Where the monitors' tasks send their events (for monitors started later).
    events_tx: mpsc::Sender<VmEvent>,
    /// The task following each VM's monitor.
    monitors: BTreeMap<u32, tokio::task::JoinHandle<()>>,
    status: watch::Sender<Status>,
    /// What each token (by serial) was last seen as.
    seen: HashMap<String, (VidPid, TokenKind)>,
    commands: mpsc::Receiver<Command>,
    command_tx: mpsc::Sender<Command>,
    vm_signals: broadcast::Sender<(u32, VmSignal)>,
    /// The assignments wanted, as the last reload gave them.
    wanted: watch::Receiver<Setup>,
    wanted_tx: Arc<watch::Sender<Setup>>,
}

impl<W> Drop for TokenService<W> {
    fn drop(&mut self) {
        for m in self.monitors.values() {
            m.abort();
        }
    }
}

/// Follows VM `vmid`'s Signet monitor at `path`, sending its events to `tx`.
fn follow_monitor(
    vmid: u32,
    path: PathBuf,
    timeout: Duration,
    tx: mpsc::Sender<VmEvent>,
) -> tokio::task::JoinHandle<()> {
    let mut m = Monitor::start(path, timeout);
    tokio::spawn(async move {
        while let Some(ev) = m.next().await {
            if tx.send((vmid, ev, m.qmp())).await.is_err() {
                return;
            }
        }
    })
}

impl<W: TokenWatcher> TokenService<W> {
    /// Starts following the VMs' monitors; [`TokenService::run`] does the rest.
    pub fn new(watcher: W, setup: Setup) -> (Self, watch::Receiver<Status>) {
        let (events_tx, events) = mpsc::channel(256);
        let monitors = setup
            .monitors
            .iter()
            .map(|(vmid, path)| {
                let task =
                    follow_monitor(*vmid, path.clone(), setup.qmp_timeout, events_tx.clone());
                (*vmid, task)
            })
            .collect();
        let (wanted_tx, wanted) = watch::channel(setup.clone());
        let (status, rx) = watch::channel(Status::new());
        let (command_tx, commands) = mpsc::channel(16);
        // Assigned tokens are listed (absent) before they are seen.
        let now = SystemTime::now();
        let tokens = setup
            .assignments
            .iter()
            .map(|(serial, vm)| (serial.clone(), Token::new(serial, Some(*vm), now)))
            .collect();
        let service = TokenService {
            watcher,
            setup,
            tokens,
            vms: HashMap::new(),
            events,
            events_tx,
            monitors,
            status,
            seen: HashMap::new(),
            commands,
            command_tx,
            vm_signals: broadcast::channel(64).0,
            wanted,
            wanted_tx: Arc::new(wanted_tx),
        };
        service.publish();
        (service, rx)
    }

    /// The door for the daemon's commands and status.
    pub fn handle(&self) -> Handle {
        Handle {
            running: Some((self.status.subscribe(), self.command_tx.clone())),
            wanted: Some(self.wanted_tx.clone()),
            vm_signals: Some(self.vm_signals.clone()),
            stopped: Arc::default(),
            // An operator's command runs at most a detach, an attach and a check.
            timeout: self.setup.qmp_timeout * 4,
        }
    }

    /// Enumerates the tokens present, then follows udev and the monitors until the
    /// watcher stops.
    pub async fn run(mut self) -> Result<(), WatchError> {
        for d in self.watcher.enumerate()? {
            self.on_usb(UsbEvent::Added(d)).await;
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.on_tick().await,
                ev = self.watcher.next_event() => match ev {
                    Some(ev) => self.on_usb(ev).await,
                    None => return Ok(()),
                },
                Some((vmid, ev, qmp)) = self.events.recv() => self.on_vm(vmid, ev, qmp).await,
                Some(cmd) = self.commands.recv() => {
                    let result = self.command(&cmd.serial, cmd.op).await;
                    let _ = cmd.reply.send(result);
                }
                Ok(()) = self.wanted.changed() => {
                    let setup = self.wanted.borrow_and_update().clone();
                    self.reassign(setup).await;
                }
            }
        }
    }

    /// Follows new assignments ([`Handle::reassign`]): starts the monitors of VMs new
    /// to them, moves, adds and lets go of tokens as [`Setup::replan`] says, and lets
    /// go of the monitors no token needs any more.
    async fn reassign(&mut self, new: Setup) {
        let plan = self.setup.replan(&new);
        self.setup.assignments = new.assignments;
        self.setup.devices = new.devices;
        if plan.is_empty() {
            return;
        }
        for (vmid, path) in &plan.start_monitors {
            tracing::info!(vmid, monitor = %path.display(), "following the signing VM's monitor");
            let task = follow_monitor(
                *vmid,
                path.clone(),
                self.setup.qmp_timeout,
                self.events_tx.clone(),
            );
            if let Some(old) = self.monitors.insert(*vmid, task) {
                old.abort();
            }
        }
        let now = SystemTime::now();
        for (serial, vmid) in &plan.added {
            let up = self.vms.contains_key(vmid);
            tracing::info!(
                serial,
                vmid,
                "token assigned: signetd keeps it in its VM from now on"
            );
            let actions = match self.tokens.get_mut(serial) {
                Some(t) => t.assign(Some(*vmid), up, now),
                None => {
                    let mut t = Token::new(serial, Some(*vmid), now);
                    if up {
                        t.handle(Input::VmUp(*vmid), now);
                    }
                    self.tokens.insert(serial.clone(), t);
                    Vec::new()
                }
            };
            self.carry_out(serial, actions).await;
        }
        for (serial, from, to) in &plan.moved {
            tracing::info!(
                serial,
                from,
                to,
                "token assigned to another VM: it leaves VM {from} for VM {to}"
            );
            let up = self.vms.contains_key(to);
            let actions = match self.tokens.get_mut(serial) {
                Some(t) => t.assign(Some(*to), up, now),
                None => Vec::new(),
            };
            self.carry_out(serial, actions).await;
        }
        for (serial, vmid) in &plan.removed {
            let Some(t) = self.tokens.get_mut(serial) else {
                continue;
            };
            t.assign(None, false, now);
            match t.state {
                State::Attaching { vmid: there, .. } | State::Attached { vmid: there } => {
                    tracing::warn!(serial, vmid = there, "token no longer in [[tokens]]: left in VM {there}, which may be signing with it; signetd no longer puts it back. `signetctl detach {serial}` takes it out")
                }
                State::Absent => {
                    // Neither assigned nor plugged in: no longer listed.
                    tracing::info!(
                        serial,
                        vmid,
                        "token no longer in [[tokens]] and not plugged in: no longer listed"
                    );
                    self.tokens.remove(serial);
                }
                State::OnHost | State::Conflict { .. } => {
                    tracing::info!(
                        serial,
                        vmid,
                        "token no longer in [[tokens]]: kept on the host"
                    )
                }
            }
        }
        for serial in &plan.devices {
            tracing::info!(serial, "the token's devices in its VM changed: used from its next attach (signetctl reattach {serial})");
        }
        let mut monitors = new.monitors;
        for vmid in &plan.stop_monitors {
            let left = self.tokens.values().any(|t| {
                matches!(t.state, State::Attaching { vmid: v, .. } | State::Attached { vmid: v } if v == *vmid)
            });
            if left {
                tracing::info!(vmid, "no token is assigned to VM {vmid} any more; its monitor is still followed while a token is left in it");
                // Asked again at the next reassignment.
                monitors.extend(
                    self.setup
                        .monitors
                        .iter()
                        .filter(|(v, _)| v == vmid)
                        .cloned(),
                );
                continue;
            }
            tracing::info!(
                vmid,
                "no token is assigned to VM {vmid} any more; its monitor is let go"
            );
            if let Some(task) = self.monitors.remove(vmid) {
                task.abort();
            }
            self.vms.remove(vmid);
        }
        self.setup.monitors = monitors;
        self.publish();
    }

    async fn command(&mut self, serial: &str, op: Op) -> Result<HostToken, TokenError> {
        let Some(t) = self.tokens.get_mut(serial) else {
            let known: Vec<&str> = self.tokens.keys().map(String::as_str).collect();
            return Err(TokenError::Unknown {
                serial: serial.to_owned(),
                known: if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            });
        };
        let input = match op {
            Op::Attach(vm) => {
                t.may_attach(vm)?;
                Input::Release
            }
            Op::Reattach => {
                t.may_attach(None)?;
                Input::Replace
            }
            Op::Detach => Input::Hold,
            Op::ResetPort => {
                let Some((bus, port)) = t.position().map(|(b, p)| (b, p.to_owned())) else {
                    return Err(TokenError::NotOnHost {
                        serial: serial.to_owned(),
                        state: format!("{:?}", t.state),
                    });
                };
                let sysfs = self.setup.sysfs.clone();
                tracing::warn!(serial, bus, port, "resetting the token's USB port");
                tokio::task::spawn_blocking(move || usb::reset_port(&sysfs, bus, &port))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .map_err(|why| TokenError::PortReset {
                        serial: serial.to_owned(),
                        why,
                    })?;
                return Ok(view(t, self.seen.get(serial)));
            }
            Op::ResetVm => {
                let vmid = t.assigned.ok_or_else(|| TokenError::NoVm {
                    serial: serial.to_owned(),
                })?;
                let qmp = self
                    .vms
                    .get(&vmid)
                    .cloned()
                    .ok_or(TokenError::VmNotConnected { vmid })?;
                tracing::warn!(serial, vmid, "resetting the signing VM");
                qmp.execute("system_reset", None)
                    .await
                    .map_err(|e| TokenError::VmReset {
                        vmid,
                        why: e.to_string(),
                    })?;
                return Ok(view(t, self.seen.get(serial)));
            }
        };
        let actions = t.handle(input, SystemTime::now());
        self.carry_out(serial, actions).await;
        let t = self.tokens.get(serial).ok_or(TokenError::NoAnswer)?;
        Ok(view(t, self.seen.get(serial)))
    }

    async fn on_usb(&mut self, ev: UsbEvent) {
        let (device, gone) = match ev {
            UsbEvent::Added(d) | UsbEvent::Changed(d) => (d, false),
            UsbEvent::Removed(d) => (d, true),
        };
        let Some(sighting) = TokenSighting::of(&self.setup.catalog, device) else {
            return;
        };
        let Some(serial) = sighting.device.serial.clone() else {
            tracing::warn!(port = %sighting.device.host_port(), id = %sighting.device.id,
                "a token without a serial number is ignored: Signet tells tokens apart by serial");
            return;
        };
        let now = SystemTime::now();
        self.seen
            .insert(serial.clone(), (sighting.device.id, sighting.kind.clone()));
        if gone {
            if let Some(t) = self.tokens.get_mut(&serial) {
                let actions = t.handle(Input::Gone, now);
                self.carry_out(&serial, actions).await;
            }
            return;
        }
        if !self.tokens.contains_key(&serial) {
            let assigned = self.setup.assignments.get(&serial).copied();
            let mut t = Token::new(&serial, assigned, now);
            if let Some(vmid) = assigned.filter(|v| self.vms.contains_key(v)) {
                t.handle(Input::VmUp(vmid), now);
            }
            tracing::info!(serial, kind = ?sighting.kind, port = %sighting.device.host_port(), "token seen");
            self.tokens.insert(serial.clone(), t);
        }
        let mut conflicts: Vec<String> = sighting.conflicts.iter().map(|c| c.to_string()).collect();
        conflicts.extend(usb::host_program_conflict(&usb::running_programs()));
        let input = Input::Seen {
            bus: sighting.device.bus,
            port: sighting.device.port.clone(),
            conflicts,
        };
        let actions = match self.tokens.get_mut(&serial) {
            Some(t) => t.handle(input, now),
            None => Vec::new(),
        };
        self.carry_out(&serial, actions).await;
    }

    async fn on_tick(&mut self) {
        let serials: Vec<String> = self.tokens.keys().cloned().collect();
        for serial in serials {
            let actions = match self.tokens.get_mut(&serial) {
                Some(t) => t.handle(Input::Tick, SystemTime::now()),
                None => continue,
            };
            if !actions.is_empty() {
                self.carry_out(&serial, actions).await;
            }
        }
    }

    async fn on_vm(&mut self, vmid: u32, ev: MonitorEvent, qmp: Option<Arc<Qmp>>) {
        if !self.monitors.contains_key(&vmid) {
            // Sent before its monitor was let go.
            return;
        }
        if let Some(signal) = VmSignal::of(&ev) {
            let _ = self.vm_signals.send((vmid, signal));
        }
        match qmp {
            Some(q) => self.vms.insert(vmid, q),
            None => self.vms.remove(&vmid),
        };
        let serials: Vec<String> = self.tokens.keys().cloned().collect();
        for serial in serials {
            let Some(t) = self.tokens.get_mut(&serial) else {
                continue;
            };
            let Some(input) = ev.to_input(vmid, &t.device_id()) else {
                continue;
            };
            let actions = t.handle(input, SystemTime::now());
            self.carry_out(&serial, actions).await;
        }
        self.publish();
    }

    /// Runs the actions over QMP, feeding each result back, until none are left.
    async fn carry_out(&mut self, serial: &str, actions: Vec<Action>) {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            let vmid = match &action {
                Action::Attach { vmid, .. }
                | Action::Detach { vmid, .. }
                | Action::Check { vmid, .. } => *vmid,
            };
            let Some(qmp) = self.vms.get(&vmid).cloned() else {
                tracing::debug!(
                    vmid,
                    ?action,
                    "VM not connected; its next start will redo this"
                );
                continue;
            };
            tracing::info!(serial, ?action, "passthrough");
            let kind = self.setup.devices.get(serial).cloned().unwrap_or_default();
            if let Some(result) = qmp.perform(&self.setup.usb_bus, &kind, &action).await {
                if let Some(t) = self.tokens.get_mut(serial) {
                    queue.extend(t.handle(result, SystemTime::now()));
                }
            }
        }
        self.publish();
    }

    fn publish(&self) {
        let view: Status = self
            .tokens
            .iter()
            .map(|(serial, t)| (serial.clone(), view(t, self.seen.get(serial))))
            .collect();
        self.status.send_if_modified(|s| {
            let changed = *s != view;
            *s = view;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signet_api::wire::{ErrorBody, ErrorCode};

    fn setup(tokens: &[(&str, u32)]) -> Setup {
        let text = tokens
            .iter()
            .map(|(serial, vm)| format!("[[tokens]]\nserial = \"{serial}\"\nvm = {vm}\n"))
            .collect::<String>();
        let cfg = crate::config::Config::parse(
            std::path::Path::new("/etc/signet/signetd.toml"),
            &format!("agent = \"unix:/a\"\n[passthrough]\nmonitor_dir = \"/run/m\"\n{text}"),
        )
        .unwrap();
        Setup::from_config(&cfg)
    }

    #[test]
    fn a_replan_adds_moves_and_lets_go_of_tokens_and_their_vms_monitors() {
        let old = setup(&[("A", 105), ("B", 106), ("C", 107)]);
        assert!(old.replan(&old.clone()).is_empty());
        let new = setup(&[("A", 105), ("B", 108), ("D", 105)]);
        let plan = old.replan(&new);
        assert_eq!(plan.added, vec![("D".to_owned(), 105)]);
        assert_eq!(plan.moved, vec![("B".to_owned(), 106, 108)]);
        assert_eq!(plan.removed, vec![("C".to_owned(), 107)]);
        assert!(plan.devices.is_empty());
        assert_eq!(
            plan.start_monitors,
            vec![(108, PathBuf::from("/run/m/vm-108.qmp"))]
        );
        assert_eq!(plan.stop_monitors, vec![106, 107]);

        // From none: every token added, every VM's monitor started.
        let plan = setup(&[]).replan(&old);
        assert_eq!(plan.added.len(), 3);
        assert_eq!(plan.start_monitors.len(), 3);
        assert!(plan.removed.is_empty() && plan.stop_monitors.is_empty());

        // Another device for the same token in the same VM: noted, nothing moves.
        let mut lab = old.clone();
        lab.devices.insert(
            "A".into(),
            crate::config::DeviceKind::EmulatedCcid {
                db: "sql:/tmp/db".into(),
                certs: ["a".into(), "b".into(), "c".into()],
            },
        );
        let plan = old.replan(&lab);
        assert_eq!(plan.devices, vec!["A".to_owned()]);
        assert!(plan.added.is_empty() && plan.moved.is_empty() && plan.removed.is_empty());
    }

    /// A watcher that reports one device plugged in and nothing after.
    struct OneDevice(Option<usb::UsbDevice>);

    impl TokenWatcher for OneDevice {
        fn enumerate(&mut self) -> Result<Vec<usb::UsbDevice>, WatchError> {
            Ok(self.0.take().into_iter().collect())
        }
        fn next_event(
            &mut self,
        ) -> impl std::future::Future<Output = Option<UsbEvent>> + Send + '_ {
            std::future::pending()
        }
    }

    async fn until(
        rx: &mut watch::Receiver<Status>,
        what: &str,
        cond: impl FnMut(&Status) -> bool,
    ) -> Status {
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(cond))
            .await
            .unwrap_or_else(|_| panic!("never: {what}"))
            .unwrap()
            .clone()
    }

    #[tokio::test]
    async fn the_running_service_follows_new_assignments() {
        let dir = tempfile::tempdir().unwrap();
        let device = usb::UsbDevice {
            syspath: "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2".into(),
            id: "0529:0620".parse().unwrap(),
            bus: 1,
            devnum: 5,
            port: "2".into(),
            serial: Some("TOK1".into()),
            manufacturer: Some("SafeNet".into()),
            product: Some("eToken".into()),
            interfaces: vec![],
        };
        let at = |tokens: &[(&str, u32)]| {
            let mut s = setup(tokens);
            // No QEMU: the VMs' monitors are never there.
            for (vm, path) in &mut s.monitors {
                *path = crate::adapters::proxmox::monitor_path(dir.path(), *vm);
            }
            s
        };
        let (service, mut rx) = TokenService::new(OneDevice(Some(device)), at(&[]));
        let handle = service.handle();
        tokio::spawn(service.run());
        until(&mut rx, "seen on the host, unassigned", |s| {
            s.get("TOK1")
                .is_some_and(|t| t.place == TokenPlace::OnHost && t.assigned_vm.is_none())
        })
        .await;

        // Assigned, with another token that is not plugged in.
        assert!(handle.reassign(at(&[("TOK1", 105), ("TOK2", 106)])));
        let s = until(&mut rx, "assigned to VM 105", |s| {
            s.get("TOK1").is_some_and(|t| t.assigned_vm == Some(105)) && s.contains_key("TOK2")
        })
        .await;
        let t = &s["TOK1"];
        assert_eq!(t.place, TokenPlace::OnHost);
        assert!(
            t.last_change.reason.contains("VM 105 is not running"),
            "{t:?}"
        );
        assert_eq!(
            (s["TOK2"].place.clone(), s["TOK2"].assigned_vm),
            (TokenPlace::Absent, Some(106))
        );
        let refused = handle.ask("TOK1", Op::Attach(Some(106))).await.unwrap_err();
        assert!(
            refused.to_string().contains("VM 105, not VM 106"),
            "{refused}"
        );

        // Let go: the plugged-in token stays listed on the host, the absent one goes.
        assert!(handle.reassign(at(&[])));
        let s = until(&mut rx, "let go", |s| !s.contains_key("TOK2")).await;
        assert_eq!(s["TOK1"].assigned_vm, None);
        assert!(
            s["TOK1"].last_change.reason.contains("not assigned"),
            "{:?}",
            s["TOK1"]
        );

        assert!(!Handle::off("switched off").reassign(at(&[])));
    }

    #[test]
    fn a_tokens_view_and_what_changed() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(4);
        let mut t = Token::new("0123ABCD", Some(105), at);
        let absent = view(&t, None);
        assert_eq!(absent.place, TokenPlace::Absent);
        assert_eq!((&absent.model, &absent.host_port), (&None, &None));
        assert_eq!(absent.last_change.at, "1970-01-01T00:00:04Z");
        assert_eq!(absent.assigned_vm, Some(105));
        t.handle(
            Input::Seen {
                bus: 1,
                port: "2.4".into(),
                conflicts: vec![],
            },
            at,
        );
        let seen = (
            "0529:0620".parse().unwrap(),
            TokenKind::Known {
                model: "SafeNet eToken 5110".into(),
            },
        );
        let v = view(&t, Some(&seen));
        assert_eq!(v.place, TokenPlace::OnHost);
        assert_eq!(v.model.as_deref(), Some("SafeNet eToken 5110"));
        assert_eq!(v.usb_id.as_deref(), Some("0529:0620"));
        assert_eq!(v.host_port.as_deref(), Some("1-2.4"));
        let candidate = view(
            &t,
            Some(&("1234:5678".parse().unwrap(), TokenKind::Candidate)),
        );
        assert_eq!(candidate.model, None);

        let before: Status = [("0123ABCD".to_owned(), absent.clone())].into();
        let after: Status = [
            ("0123ABCD".to_owned(), v.clone()),
            ("0456".to_owned(), absent.clone()),
        ]
        .into();
        let c = changed(&before, &after);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0], v);
        assert!(changed(&after, &after).is_empty());
    }

    #[test]
    fn errors_reach_clients_with_their_codes() {
        let unknown = TokenError::Unknown {
            serial: "X".into(),
            known: "none".into(),
        };
        assert_eq!(ErrorBody::from(&unknown).code, ErrorCode::UnknownToken);
        let other = TokenError::Refused(Refusal::OtherVm {
            serial: "X".into(),
            assigned: 105,
            asked: 106,
        });
        assert_eq!(ErrorBody::from(&other).code, ErrorCode::Forbidden);
        assert!(ErrorBody::from(&other)
            .message
            .contains("VM 105, not VM 106"));
        let off = Handle::off("udev is not there");
        let report = off.report();
        assert!(!report.watching);
        assert_eq!(report.detail.as_deref(), Some("udev is not there"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let e = rt.block_on(off.ask("X", Op::Detach)).unwrap_err();
        assert_eq!(ErrorBody::from(&e).code, ErrorCode::TokenUnavailable);
        assert!(e.to_string().contains("udev is not there"), "{e}");
    }
}
