//! The token service: the host's USB devices ([`TokenWatcher`]), the signing VMs'
//! monitors ([`Monitor`]) and one [`passthrough::Token`] per token serial, put
//! together. It feeds every udev and QMP event to the tokens it concerns, carries
//! their actions out over QMP, and publishes every token's state on a watch channel
//! (for the status API). One loop does all of it, so the tokens' state machines see
//! events one at a time and in order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};

use crate::passthrough::{Action, Input, Token};
use crate::qmp::{Monitor, MonitorEvent, Qmp};
use crate::usb::{self, Catalog, TokenSighting, TokenWatcher, UsbEvent, WatchError};

/// Every token's state, by serial.
pub type Status = BTreeMap<String, Token>;

/// Which VM each token (by serial) belongs to, and where each VM's Signet monitor is.
#[derive(Debug, Clone)]
pub struct Setup {
    pub catalog: Catalog,
    pub assignments: HashMap<String, u32>,
    /// Signet's monitor socket per VM (`proxmox::monitor_path`).
    pub monitors: Vec<(u32, PathBuf)>,
    /// The VMs' USB bus (`xhci.0` on Proxmox).
    pub usb_bus: String,
    pub qmp_timeout: Duration,
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
    tokens: Status,
    vms: HashMap<u32, Arc<Qmp>>,
    events: mpsc::Receiver<VmEvent>,
    monitors: Vec<tokio::task::JoinHandle<()>>,
    status: watch::Sender<Status>,
}

impl<W> Drop for TokenService<W> {
    fn drop(&mut self) {
        for m in &self.monitors {
            m.abort();
        }
    }
}

impl<W: TokenWatcher> TokenService<W> {
    /// Starts following the VMs' monitors; [`TokenService::run`] does the rest.
    pub fn new(watcher: W, setup: Setup) -> (Self, watch::Receiver<Status>) {
        let (tx, events) = mpsc::channel(256);
        let monitors = setup
            .monitors
            .iter()
            .map(|(vmid, path)| {
                let (vmid, tx) = (*vmid, tx.clone());
                let mut m = Monitor::start(path.clone(), setup.qmp_timeout);
                tokio::spawn(async move {
                    while let Some(ev) = m.next().await {
                        if tx.send((vmid, ev, m.qmp())).await.is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        let (status, rx) = watch::channel(Status::new());
        let service = TokenService {
            watcher,
            setup,
            tokens: Status::new(),
            vms: HashMap::new(),
            events,
            monitors,
            status,
        };
        (service, rx)
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
            }
        }
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
            if let Some(result) = qmp.perform(&self.setup.usb_bus, &action).await {
                if let Some(t) = self.tokens.get_mut(serial) {
                    queue.extend(t.handle(result, SystemTime::now()));
                }
            }
        }
        self.publish();
    }

    fn publish(&self) {
        self.status.send_replace(self.tokens.clone());
    }
}
