//! Where one token is and where it should be: a pure state machine per token (no I/O),
//! fed with what udev and the signing VM's QMP monitor report, answering with the QMP
//! actions to take. Adapters carry the actions out and feed their results back.
//!
//! States: absent, on the host, attaching to VM N (`device_add` sent, or accepted but
//! QEMU has not claimed the host device yet), attached to VM N (QEMU says
//! `attached`), conflict (a host driver holds it). Each change keeps its time and
//! reason for the status API.
//!
//! Rules:
//! - **A token is only ever attached to the VM it is assigned to**; events about
//!   other VMs never produce an attach.
//! - The token is re-attached when it re-enumerates (a remove then an add, maybe at a
//!   new port), when QEMU drops it (`DEVICE_DELETED` not asked for by us), when its VM
//!   starts or restarts, and checked again when the VM resets.
//! - A device QEMU accepted but has not claimed is checked again on each tick, since
//!   QEMU claims it by itself when it can and sends no event.
//! - Events may come twice or late (enumeration racing the udev monitor, a QMP answer
//!   after an unplug): handling the same event again changes nothing.
//! - A changed assignment ([`Token::assign`], `[[tokens]]` reloaded) moves the token
//!   to its new VM; a token no longer assigned is left where it is (never taken out
//!   of a VM mid-job) and followed there, never put back.
//! - The operator may take a token out of its VM ([`Input::Hold`]: it stays on the host,
//!   whatever happens, until [`Input::Release`]) and put it in again, or have it
//!   detached and attached anew ([`Input::Replace`]). [`Token::may_attach`] says
//!   beforehand why such a request cannot be carried out (not assigned, assigned to
//!   another VM, unplugged, held by the host, its VM not running).

use std::time::SystemTime;

use serde::Serialize;

/// Where the token is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    Absent,
    OnHost,
    /// `device_add` sent (`accepted: false`) or accepted by QEMU without the host device
    /// claimed yet (`accepted: true`; QEMU keeps trying while the device is there).
    Attaching {
        vmid: u32,
        accepted: bool,
    },
    Attached {
        vmid: u32,
    },
    /// Held on the host; each entry says what holds it and the fix.
    Conflict {
        conflicts: Vec<String>,
    },
}

/// The last change and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    pub reason: String,
}

fn rfc3339<S: serde::Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let t = time::OffsetDateTime::from(*at);
    let text = t
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(serde::ser::Error::custom)?;
    s.serialize_str(&text)
}

/// What happened, as the adapters report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// udev: the token is on the host at `bus`-`port`, with these host-side conflicts.
    Seen {
        bus: u8,
        port: String,
        conflicts: Vec<String>,
    },
    /// udev: the token was removed.
    Gone,
    /// QMP: a monitor connection to the VM's QEMU is up (VM started, or signetd did).
    VmUp(u32),
    /// QMP: the VM's QEMU went away or shut down.
    VmDown(u32),
    /// QMP: `RESET` in the VM.
    VmReset(u32),
    /// `device_add` for this token was accepted by the VM.
    Accepted(u32),
    /// `device_add` found this token's id already in the VM.
    Duplicate(u32),
    /// `device_add` was refused for another reason.
    Refused { vmid: u32, reason: String },
    /// `qom-get attached` on this token's id: `None` when the device is not in the VM.
    Checked { vmid: u32, attached: Option<bool> },
    /// QMP: `DEVICE_DELETED` for this token's id.
    Deleted(u32),
    /// Time passed: a device QEMU accepted but had not claimed is checked again (QEMU
    /// claims a host device by itself when it can, and says nothing).
    Tick,
    /// The operator: take the token out of its VM and keep it on the host.
    Hold,
    /// The operator: let the token go to its VM again (undoes [`Input::Hold`]).
    Release,
    /// The operator: detach the token from its VM and attach it anew.
    Replace,
}

/// Why the operator's attach cannot be carried out now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("token {serial} is not assigned to a signing VM, and Signet attaches a token only to its own VM; assign it in signetd.toml ([[tokens]] serial = \"{serial}\", vm = VMID) and reload signetd (systemctl reload signetd), or enroll the VM with `signetd enroll signing-vm VMID --token {serial}`")]
    NotAssigned { serial: String },
    #[error("token {serial} belongs to VM {assigned}, not VM {asked}, and Signet never attaches a token to a VM it is not assigned to; to move it, change its [[tokens]] entry in signetd.toml to vm = {asked} and reload signetd (systemctl reload signetd)")]
    OtherVm {
        serial: String,
        assigned: u32,
        asked: u32,
    },
    #[error("token {serial} is not plugged into this host; plug it in and it goes to VM {vmid} by itself")]
    Absent { serial: String, vmid: u32 },
    #[error("token {serial} is held on the host: {conflicts}")]
    Held { serial: String, conflicts: String },
    #[error("VM {vmid} is not running (or its Signet monitor is not reachable); start it and token {serial} goes to it by itself")]
    VmDown { serial: String, vmid: u32 },
}

/// What to do over QMP, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `device_add usb-host` (a duplicate id is reported back as [`Input::Duplicate`]).
    Attach {
        vmid: u32,
        id: String,
        hostbus: u8,
        hostport: String,
    },
    /// `device_del` (a device already gone is fine).
    Detach { vmid: u32, id: String },
    /// `qom-get … attached`.
    Check { vmid: u32, id: String },
}

/// One token's passthrough state.
#[derive(Debug, Clone, Serialize)]
pub struct Token {
    pub serial: String,
    /// The VM this token belongs to, if any.
    pub assigned: Option<u32>,
    #[serde(flatten)]
    pub state: State,
    pub last_change: Change,
    /// Where it is on the host while present (`BUS`, `PORT`).
    #[serde(skip)]
    position: Option<(u8, String)>,
    /// The VM holding a device under this token's id, as far as we know.
    #[serde(skip)]
    in_vm: Option<u32>,
    /// A `device_del` we asked for, whose `DEVICE_DELETED` is not a loss.
    #[serde(skip)]
    detaching: bool,
    /// Whether the assigned VM's QEMU is up.
    #[serde(skip)]
    vm_up: bool,
    /// The operator took it out of its VM: it stays on the host until released.
    #[serde(skip)]
    held: bool,
}

impl Token {
    pub fn new(serial: &str, assigned: Option<u32>, now: SystemTime) -> Self {
        Token {
            serial: serial.to_owned(),
            assigned,
            state: State::Absent,
            last_change: Change {
                at: now,
                reason: "not seen on the host yet".into(),
            },
            position: None,
            in_vm: None,
            detaching: false,
            vm_up: false,
            held: false,
        }
    }

    /// Where it is on the host while plugged in: `BUS`, `PORT`.
    pub fn position(&self) -> Option<(u8, &str)> {
        self.position.as_ref().map(|(b, p)| (*b, p.as_str()))
    }

    /// Whether the operator holds it on the host ([`Input::Hold`]).
    pub fn held(&self) -> bool {
        self.held
    }

    /// Whether an operator's attach (to `asked`, or to its own VM) can be carried out
    /// now; the VM it goes to.
    pub fn may_attach(&self, asked: Option<u32>) -> Result<u32, Refusal> {
        let serial = self.serial.clone();
        let Some(vmid) = self.assigned else {
            return Err(Refusal::NotAssigned { serial });
        };
        if let Some(asked) = asked.filter(|a| *a != vmid) {
            return Err(Refusal::OtherVm {
                serial,
                assigned: vmid,
                asked,
            });
        }
        if self.position.is_none() {
            return Err(Refusal::Absent { serial, vmid });
        }
        if let State::Conflict { conflicts } = &self.state {
            return Err(Refusal::Held {
                serial,
                conflicts: conflicts.join("; "),
            });
        }
        if !self.vm_up {
            return Err(Refusal::VmDown { serial, vmid });
        }
        Ok(vmid)
    }

    /// The QMP id of this token's device.
    pub fn device_id(&self) -> String {
        device_id(&self.serial)
    }

    fn set(&mut self, state: State, reason: String, now: SystemTime) {
        if self.state != state {
            self.state = state;
            self.last_change = Change { at: now, reason };
        }
    }

    /// Attach to the assigned VM if it is up and the token is free to go; else say why
    /// it stays on the host.
    fn place(&mut self, why: &str, now: SystemTime) -> Vec<Action> {
        let Some((bus, port)) = self.position.clone() else {
            return Vec::new();
        };
        let Some(vmid) = self.assigned else {
            self.set(
                State::OnHost,
                format!("{why}; not assigned to a signing VM (signetd enroll signing-vm VMID --token {})", self.serial),
                now,
            );
            return Vec::new();
        };
        if self.held {
            self.set(
                State::OnHost,
                format!(
                    "{why}; kept on the host by the operator (signetctl attach {} gives it back to VM {vmid})",
                    self.serial
                ),
                now,
            );
            return Vec::new();
        }
        if !self.vm_up {
            self.set(
                State::OnHost,
                format!("{why}; VM {vmid} is not running"),
                now,
            );
            return Vec::new();
        }
        let id = self.device_id();
        let mut actions = Vec::new();
        if self.in_vm.is_some_and(|v| v == vmid) {
            // A stale device (an old port) would keep the id taken.
            actions.push(Action::Detach {
                vmid,
                id: id.clone(),
            });
            self.detaching = true;
            self.in_vm = None;
        }
        actions.push(Action::Attach {
            vmid,
            id,
            hostbus: bus,
            hostport: port.clone(),
        });
        self.set(
            State::Attaching {
                vmid,
                accepted: false,
            },
            format!("{why}; attaching {bus}-{port} to VM {vmid}"),
            now,
        );
        actions
    }

    fn mine(&self, vmid: u32) -> bool {
        self.assigned == Some(vmid)
    }

    fn in_flight(&self, vmid: u32) -> bool {
        matches!(self.state, State::Attaching { vmid: v, .. } | State::Attached { vmid: v } if v == vmid)
    }

    /// A token left in a VM it is no longer assigned to ([`Token::assign`] with
    /// `None`): Signet follows where it is there but never puts it back.
    fn left_in(&self, vmid: u32) -> bool {
        self.assigned.is_none() && self.in_flight(vmid)
    }

    /// In `vmid` as its own VM, or left there.
    fn follows(&self, vmid: u32) -> bool {
        (self.mine(vmid) && self.in_flight(vmid)) || self.left_in(vmid)
    }

    /// Assigns the token to another VM, or to none (`[[tokens]]` changed and reloaded;
    /// `vm_up`: whether that VM's QEMU is up). To another VM: it leaves the old one
    /// and goes to the new one as soon as it can. To none: Signet no longer manages
    /// it, and a token in a VM is left there — taken out, it could cut a job short —
    /// until the operator detaches it, it is unplugged or its VM stops. Assigned again
    /// to the VM it is in, it stays there.
    pub fn assign(&mut self, vmid: Option<u32>, vm_up: bool, now: SystemTime) -> Vec<Action> {
        if self.assigned == vmid {
            return Vec::new();
        }
        self.assigned = vmid;
        self.vm_up = vm_up;
        let Some(new) = vmid else {
            match self.state {
                State::Attaching { vmid, .. } | State::Attached { vmid } => {
                    self.last_change = Change {
                        at: now,
                        reason: format!(
                            "no longer in [[tokens]]; left in VM {vmid} (signetctl detach {} takes it out)",
                            self.serial
                        ),
                    };
                }
                State::OnHost => self.replace_on_host("no longer in [[tokens]]", now),
                State::Absent | State::Conflict { .. } => {}
            }
            return Vec::new();
        };
        if self.in_flight(new) {
            // Left there earlier, or already on its way: nothing to move.
            return Vec::new();
        }
        let mut actions = Vec::new();
        if let Some(old) = self.in_vm.take() {
            actions.push(Action::Detach {
                vmid: old,
                id: self.device_id(),
            });
            self.detaching = true;
        }
        if self.position.is_some() && !matches!(self.state, State::Conflict { .. }) {
            if self.state == State::OnHost {
                // Still on the host, for another reason: say the new one.
                self.state = State::Absent;
            }
            actions.extend(self.place(&format!("assigned to VM {new}"), now));
        }
        actions
    }

    /// On the host, placed again for `why`: the reason is said even when it stays.
    fn replace_on_host(&mut self, why: &str, now: SystemTime) {
        self.state = State::Absent;
        self.place(why, now);
    }

    /// Handles one input; returns the actions to carry out, in order.
    pub fn handle(&mut self, input: Input, now: SystemTime) -> Vec<Action> {
        match input {
            Input::Seen {
                bus,
                port,
                conflicts,
            } => {
                let moved = self.position.as_ref() != Some(&(bus, port.clone()));
                self.position = Some((bus, port.clone()));
                // While QEMU holds the token its interfaces show QEMU's claim (usbfs):
                // that is not a conflict.
                if !moved && self.in_flight_any() {
                    return Vec::new();
                }
                if !conflicts.is_empty() {
                    self.set(
                        State::Conflict {
                            conflicts: conflicts.clone(),
                        },
                        format!("held on the host: {}", conflicts.join("; ")),
                        now,
                    );
                    return Vec::new();
                }
                self.place(&format!("on the host at {bus}-{port}"), now)
            }
            Input::Gone => {
                self.position = None;
                self.set(State::Absent, "unplugged".into(), now);
                Vec::new()
            }
            Input::VmUp(vmid) => {
                if !self.mine(vmid) {
                    return Vec::new();
                }
                if self.vm_up && self.in_flight(vmid) {
                    return Vec::new();
                }
                self.vm_up = true;
                match self.state {
                    State::Conflict { .. } | State::Absent => Vec::new(),
                    _ => self.place(&format!("VM {vmid} is up"), now),
                }
            }
            Input::VmDown(vmid) => {
                if self.in_vm == Some(vmid) {
                    self.in_vm = None;
                    self.detaching = false;
                }
                if self.left_in(vmid) {
                    return self.place(&format!("VM {vmid} stopped"), now);
                }
                if !self.mine(vmid) {
                    return Vec::new();
                }
                self.vm_up = false;
                if self.in_flight(vmid) {
                    self.set(State::OnHost, format!("VM {vmid} stopped"), now);
                }
                Vec::new()
            }
            Input::VmReset(vmid) => {
                if self.follows(vmid) {
                    // QEMU keeps its devices across a reset; make sure ours is there.
                    return vec![Action::Check {
                        vmid,
                        id: self.device_id(),
                    }];
                }
                Vec::new()
            }
            Input::Accepted(vmid) | Input::Duplicate(vmid) => {
                self.in_vm = Some(vmid);
                if !self.mine(vmid) {
                    // Ours in a VM it does not belong to (assignment changed meanwhile).
                    self.detaching = true;
                    self.in_vm = None;
                    return vec![Action::Detach {
                        vmid,
                        id: self.device_id(),
                    }];
                }
                if self.state
                    == (State::Attaching {
                        vmid,
                        accepted: false,
                    })
                {
                    self.set(
                        State::Attaching {
                            vmid,
                            accepted: true,
                        },
                        format!("VM {vmid} accepted the device; waiting for QEMU to claim it"),
                        now,
                    );
                    return vec![Action::Check {
                        vmid,
                        id: self.device_id(),
                    }];
                }
                Vec::new()
            }
            Input::Refused { vmid, reason } => {
                if self.mine(vmid) && self.in_flight(vmid) {
                    self.set(
                        State::OnHost,
                        format!("VM {vmid} refused the device: {reason}"),
                        now,
                    );
                }
                Vec::new()
            }
            Input::Checked { vmid, attached } => {
                if !self.follows(vmid) {
                    return Vec::new();
                }
                match attached {
                    Some(true) => {
                        self.in_vm = Some(vmid);
                        self.set(
                            State::Attached { vmid },
                            format!("attached to VM {vmid}"),
                            now,
                        );
                        Vec::new()
                    }
                    Some(false) => {
                        self.in_vm = Some(vmid);
                        self.set(
                            State::Attaching {
                                vmid,
                                accepted: true,
                            },
                            format!(
                                "VM {vmid} has the device but QEMU has not claimed the token (yet)"
                            ),
                            now,
                        );
                        Vec::new()
                    }
                    None => {
                        self.in_vm = None;
                        self.place(&format!("the device was missing from VM {vmid}"), now)
                    }
                }
            }
            Input::Tick => match self.state {
                State::Attaching {
                    vmid,
                    accepted: true,
                } => vec![Action::Check {
                    vmid,
                    id: self.device_id(),
                }],
                _ => Vec::new(),
            },
            Input::Hold => {
                self.held = true;
                let mut actions = Vec::new();
                if let Some(vmid) = self.in_vm.take() {
                    actions.push(Action::Detach {
                        vmid,
                        id: self.device_id(),
                    });
                    self.detaching = true;
                }
                if self.position.is_some() {
                    self.place("detached by the operator", now);
                }
                actions
            }
            Input::Release => {
                let was_held = std::mem::take(&mut self.held);
                if self.position.is_none() || matches!(self.state, State::Conflict { .. }) {
                    return Vec::new();
                }
                if !was_held && self.assigned.is_some_and(|v| self.in_flight(v)) {
                    return Vec::new();
                }
                self.place("attach asked by the operator", now)
            }
            Input::Replace => {
                self.held = false;
                if self.position.is_none() || matches!(self.state, State::Conflict { .. }) {
                    return Vec::new();
                }
                if let Some(vmid) = self.assigned.filter(|_| self.vm_up) {
                    // Whatever is under our id goes first (removing nothing is fine).
                    self.in_vm = Some(vmid);
                }
                self.place("re-attach asked by the operator", now)
            }
            Input::Deleted(vmid) => {
                // Our own device_del: its event comes after the device we added in
                // its place was accepted, and says nothing about that one.
                if std::mem::take(&mut self.detaching) {
                    return Vec::new();
                }
                // Only a device we knew to be there can be lost; a late or repeated
                // event about an earlier one is not.
                let had = self.in_vm == Some(vmid);
                if had {
                    self.in_vm = None;
                }
                if had && self.follows(vmid) {
                    // A token left there is not put back: it goes on the host.
                    return self.place(&format!("VM {vmid} dropped the device"), now);
                }
                Vec::new()
            }
        }
    }

    fn in_flight_any(&self) -> bool {
        matches!(self.state, State::Attaching { .. } | State::Attached { .. })
    }
}

/// The QMP id of a token's `usb-host` device: stable for a serial, valid as a QMP id
/// (letters, digits, `-`, `_`, `.`, starting with a letter), and distinct for distinct
/// serials (a serial that needed changing gets a hash of the original appended).
pub fn device_id(serial: &str) -> String {
    let clean: String = serial
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if clean == serial {
        format!("signet-{clean}")
    } else {
        // FNV-1a: stable across builds and platforms.
        let mut h: u32 = 0x811c_9dc5;
        for b in serial.bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        format!("signet-{clean}-{h:08x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const VM: u32 = 105;
    const OTHER: u32 = 106;

    fn t(n: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(n)
    }

    fn seen(port: &str) -> Input {
        Input::Seen {
            bus: 1,
            port: port.into(),
            conflicts: vec![],
        }
    }

    fn attach(port: &str) -> Action {
        Action::Attach {
            vmid: VM,
            id: "signet-TOK1".into(),
            hostbus: 1,
            hostport: port.into(),
        }
    }

    fn detach() -> Action {
        Action::Detach {
            vmid: VM,
            id: "signet-TOK1".into(),
        }
    }

    fn check() -> Action {
        Action::Check {
            vmid: VM,
            id: "signet-TOK1".into(),
        }
    }

    fn attaching(accepted: bool) -> State {
        State::Attaching { vmid: VM, accepted }
    }

    /// A token assigned to VM, VM up, plugged in at 1-2 and attached.
    fn attached() -> Token {
        let mut k = Token::new("TOK1", Some(VM), t(0));
        assert_eq!(k.handle(Input::VmUp(VM), t(1)), vec![]);
        assert_eq!(k.handle(seen("2"), t(2)), vec![attach("2")]);
        assert_eq!(k.state, attaching(false));
        assert_eq!(k.handle(Input::Accepted(VM), t(3)), vec![check()]);
        assert_eq!(k.state, attaching(true));
        assert_eq!(
            k.handle(
                Input::Checked {
                    vmid: VM,
                    attached: Some(true)
                },
                t(4)
            ),
            vec![]
        );
        assert_eq!(k.state, State::Attached { vmid: VM });
        assert_eq!(k.last_change.at, t(4));
        k
    }

    #[test]
    fn plugged_in_with_its_vm_up_goes_to_its_vm() {
        let k = attached();
        assert_eq!(k.last_change.reason, "attached to VM 105");
    }

    #[test]
    fn plugged_in_before_its_vm_starts_waits_on_the_host() {
        let mut k = Token::new("TOK1", Some(VM), t(0));
        assert_eq!(k.handle(seen("2"), t(1)), vec![]);
        assert_eq!(k.state, State::OnHost);
        assert!(k.last_change.reason.contains("VM 105 is not running"));
        assert_eq!(k.handle(Input::VmUp(VM), t(2)), vec![attach("2")]);
    }

    #[test]
    fn unassigned_tokens_stay_on_the_host_whatever_vm_comes_up() {
        let mut k = Token::new("TOK1", None, t(0));
        assert_eq!(k.handle(seen("2"), t(1)), vec![]);
        assert_eq!(k.state, State::OnHost);
        assert!(k.last_change.reason.contains("enroll signing-vm"));
        for input in [
            Input::VmUp(VM),
            Input::VmReset(VM),
            Input::Deleted(VM),
            Input::Checked {
                vmid: VM,
                attached: None,
            },
        ] {
            assert_eq!(k.handle(input, t(2)), vec![]);
        }
        assert_eq!(k.state, State::OnHost);
    }

    #[test]
    fn never_attached_to_another_vm() {
        let mut k = attached();
        for input in [
            Input::VmUp(OTHER),
            Input::VmReset(OTHER),
            Input::Deleted(OTHER),
            Input::VmDown(OTHER),
            Input::Checked {
                vmid: OTHER,
                attached: None,
            },
            Input::Refused {
                vmid: OTHER,
                reason: "x".into(),
            },
        ] {
            let actions = k.handle(input.clone(), t(9));
            assert!(actions.is_empty(), "{input:?} gave {actions:?}");
        }
        assert_eq!(k.state, State::Attached { vmid: VM });
        // A stray acceptance by another VM (an old assignment) is undone, not kept.
        assert_eq!(
            k.handle(Input::Accepted(OTHER), t(10)),
            vec![Action::Detach {
                vmid: OTHER,
                id: "signet-TOK1".into()
            }]
        );
        assert_eq!(k.state, State::Attached { vmid: VM });
    }

    #[test]
    fn re_enumeration_re_attaches_at_the_new_port() {
        let mut k = attached();
        assert_eq!(k.handle(Input::Gone, t(5)), vec![]);
        assert_eq!(k.state, State::Absent);
        assert_eq!(k.last_change.reason, "unplugged");
        // Back at another port: the old device (old port) goes, the new one comes.
        assert_eq!(k.handle(seen("3"), t(6)), vec![detach(), attach("3")]);
        assert_eq!(k.state, attaching(false));
        // Our own device_del's DEVICE_DELETED is not a loss, even when it comes
        // after the new device was accepted (QMP events queue behind the answers).
        assert_eq!(k.handle(Input::Accepted(VM), t(7)), vec![check()]);
        assert_eq!(k.handle(Input::Deleted(VM), t(8)), vec![]);
        // The new device is known to be there: losing it is noticed, detaching
        // removes it.
        assert_eq!(k.handle(Input::Deleted(VM), t(9)), vec![attach("3")]);
        k.handle(Input::Accepted(VM), t(10));
        assert_eq!(k.handle(Input::Hold, t(11)), vec![detach()]);
    }

    #[test]
    fn qemu_dropping_the_device_re_attaches_it() {
        let mut k = attached();
        assert_eq!(k.handle(Input::Deleted(VM), t(5)), vec![attach("2")]);
        assert!(k.last_change.reason.contains("dropped"));
        // The same event again while attaching: nothing more.
        assert_eq!(k.handle(Input::Deleted(VM), t(6)), vec![]);
        assert_eq!(k.state, attaching(false));
    }

    #[test]
    fn duplicate_events_change_nothing() {
        let mut k = attached();
        let before = k.last_change.clone();
        assert_eq!(k.handle(seen("2"), t(9)), vec![]);
        assert_eq!(k.handle(Input::VmUp(VM), t(9)), vec![]);
        assert_eq!(k.handle(Input::Accepted(VM), t(9)), vec![]);
        assert_eq!(
            k.handle(
                Input::Checked {
                    vmid: VM,
                    attached: Some(true)
                },
                t(9)
            ),
            vec![]
        );
        assert_eq!(k.state, State::Attached { vmid: VM });
        assert_eq!(k.last_change, before);
        let mut a = Token::new("TOK1", Some(VM), t(0));
        a.handle(Input::Gone, t(1));
        a.handle(Input::Gone, t(2));
        assert_eq!(a.state, State::Absent);
    }

    #[test]
    fn a_reset_checks_and_a_missing_device_is_re_added() {
        let mut k = attached();
        assert_eq!(k.handle(Input::VmReset(VM), t(5)), vec![check()]);
        assert_eq!(
            k.handle(
                Input::Checked {
                    vmid: VM,
                    attached: Some(true)
                },
                t(6)
            ),
            vec![]
        );
        assert_eq!(k.handle(Input::VmReset(VM), t(7)), vec![check()]);
        assert_eq!(
            k.handle(
                Input::Checked {
                    vmid: VM,
                    attached: None
                },
                t(8)
            ),
            vec![attach("2")]
        );
    }

    #[test]
    fn vm_restart_re_attaches() {
        let mut k = attached();
        assert_eq!(k.handle(Input::VmDown(VM), t(5)), vec![]);
        assert_eq!(k.state, State::OnHost);
        assert_eq!(k.last_change.reason, "VM 105 stopped");
        // The new QEMU has none of the old devices: no detach first.
        assert_eq!(k.handle(Input::VmUp(VM), t(6)), vec![attach("2")]);
    }

    #[test]
    fn signetd_restarting_finds_the_device_already_there() {
        let mut k = Token::new("TOK1", Some(VM), t(0));
        k.handle(seen("2"), t(1));
        assert_eq!(k.handle(Input::VmUp(VM), t(2)), vec![attach("2")]);
        assert_eq!(k.handle(Input::Duplicate(VM), t(3)), vec![check()]);
        k.handle(
            Input::Checked {
                vmid: VM,
                attached: Some(true),
            },
            t(4),
        );
        assert_eq!(k.state, State::Attached { vmid: VM });
    }

    #[test]
    fn accepted_is_not_attached() {
        let mut k = Token::new("TOK1", Some(VM), t(0));
        k.handle(Input::VmUp(VM), t(1));
        k.handle(seen("2"), t(2));
        k.handle(Input::Accepted(VM), t(3));
        k.handle(
            Input::Checked {
                vmid: VM,
                attached: Some(false),
            },
            t(4),
        );
        assert_eq!(k.state, attaching(true));
        assert!(k
            .last_change
            .reason
            .contains("waiting for QEMU to claim it"));
    }

    #[test]
    fn ticks_check_only_an_accepted_device_not_yet_claimed() {
        let mut k = Token::new("TOK1", Some(VM), t(0));
        assert_eq!(k.handle(Input::Tick, t(1)), vec![]);
        k.handle(Input::VmUp(VM), t(1));
        k.handle(seen("2"), t(2));
        assert_eq!(
            k.handle(Input::Tick, t(3)),
            vec![],
            "device_add not answered yet"
        );
        k.handle(Input::Accepted(VM), t(3));
        assert_eq!(k.handle(Input::Tick, t(4)), vec![check()]);
        k.handle(
            Input::Checked {
                vmid: VM,
                attached: Some(true),
            },
            t(5),
        );
        assert_eq!(k.state, State::Attached { vmid: VM });
        assert_eq!(k.handle(Input::Tick, t(6)), vec![]);
    }

    #[test]
    fn refusal_leaves_it_on_the_host_with_the_reason() {
        let mut k = Token::new("TOK1", Some(VM), t(0));
        k.handle(Input::VmUp(VM), t(1));
        k.handle(seen("2"), t(2));
        k.handle(
            Input::Refused {
                vmid: VM,
                reason: "the VM has no USB bus xhci.0".into(),
            },
            t(3),
        );
        assert_eq!(k.state, State::OnHost);
        assert!(k.last_change.reason.contains("no USB bus"));
    }

    #[test]
    fn conflicts_hold_it_until_freed() {
        let mut k = Token::new("TOK1", Some(VM), t(0));
        k.handle(Input::VmUp(VM), t(1));
        let held = Input::Seen {
            bus: 1,
            port: "2".into(),
            conflicts: vec!["interface 1-2:1.0 is held by usbfs; stop pcscd".into()],
        };
        assert_eq!(k.handle(held.clone(), t(2)), vec![]);
        assert!(matches!(k.state, State::Conflict { .. }));
        assert!(k.last_change.reason.contains("pcscd"));
        assert_eq!(k.handle(Input::VmUp(VM), t(3)), vec![]);
        assert_eq!(k.handle(seen("2"), t(4)), vec![attach("2")]);
        // Once QEMU holds it, its own claim (usbfs) is no conflict.
        k.handle(Input::Accepted(VM), t(5));
        assert_eq!(k.handle(held, t(6)), vec![]);
        assert_eq!(k.state, attaching(true));
    }

    #[test]
    fn late_answers_after_an_unplug_are_ignored() {
        let mut k = Token::new("TOK1", Some(VM), t(0));
        k.handle(Input::VmUp(VM), t(1));
        k.handle(seen("2"), t(2));
        k.handle(Input::Gone, t(3));
        assert_eq!(k.handle(Input::Accepted(VM), t(4)), vec![]);
        assert_eq!(
            k.handle(
                Input::Checked {
                    vmid: VM,
                    attached: Some(true)
                },
                t(5)
            ),
            vec![]
        );
        assert_eq!(k.state, State::Absent);
        // It comes back at the same port: the device QEMU accepted is replaced.
        assert_eq!(k.handle(seen("2"), t(6)), vec![detach(), attach("2")]);
    }

    #[test]
    fn reassignment_detaches_from_the_old_vm() {
        let mut k = attached();
        let actions = k.assign(Some(OTHER), true, t(5));
        assert_eq!(
            actions,
            vec![
                detach(),
                Action::Attach {
                    vmid: OTHER,
                    id: "signet-TOK1".into(),
                    hostbus: 1,
                    hostport: "2".into()
                }
            ]
        );
        // Assigned to the VM it is in: nothing moves.
        assert_eq!(k.assign(Some(OTHER), true, t(6)), vec![]);
    }

    #[test]
    fn a_token_newly_assigned_goes_to_its_vm() {
        let mut k = Token::new("TOK1", None, t(0));
        assert_eq!(k.handle(seen("2"), t(1)), vec![]);
        assert_eq!(k.state, State::OnHost);
        // Its VM is not up yet: it waits on the host, saying why.
        assert_eq!(k.assign(Some(VM), false, t(2)), vec![]);
        assert_eq!(k.state, State::OnHost);
        assert!(
            k.last_change.reason.contains("VM 105 is not running"),
            "{}",
            k.last_change.reason
        );
        assert_eq!(k.handle(Input::VmUp(VM), t(3)), vec![attach("2")]);

        let mut up = Token::new("TOK1", None, t(0));
        up.handle(seen("2"), t(1));
        assert_eq!(up.assign(Some(VM), true, t(2)), vec![attach("2")]);
        assert_eq!(up.state, attaching(false));
        assert_eq!(
            up.last_change.reason,
            "assigned to VM 105; attaching 1-2 to VM 105"
        );
        // Not plugged in: assigned, nothing to do until it is.
        let mut absent = Token::new("TOK1", None, t(0));
        assert_eq!(absent.assign(Some(VM), true, t(1)), vec![]);
        assert_eq!(absent.handle(seen("2"), t(2)), vec![attach("2")]);
    }

    #[test]
    fn a_token_no_longer_assigned_is_left_in_its_vm_and_never_put_back() {
        let mut k = attached();
        assert_eq!(
            k.assign(None, false, t(5)),
            vec![],
            "never yanked from its VM"
        );
        assert_eq!(k.state, State::Attached { vmid: VM });
        assert_eq!(k.assigned, None);
        assert_eq!(
            k.last_change.reason,
            "no longer in [[tokens]]; left in VM 105 (signetctl detach TOK1 takes it out)"
        );
        // Followed where it is: a reset checks it, a check keeps it.
        assert_eq!(k.handle(Input::VmReset(VM), t(6)), vec![check()]);
        let there = Input::Checked {
            vmid: VM,
            attached: Some(true),
        };
        assert_eq!(k.handle(there, t(7)), vec![]);
        assert_eq!(k.state, State::Attached { vmid: VM });
        // Dropped by QEMU: not put back, on the host.
        assert_eq!(k.handle(Input::Deleted(VM), t(8)), vec![]);
        assert_eq!(k.state, State::OnHost);
        assert!(
            k.last_change.reason.contains("not assigned"),
            "{}",
            k.last_change.reason
        );
        // Its VM coming up again does not take it either.
        assert_eq!(k.handle(Input::VmUp(VM), t(9)), vec![]);
        assert_eq!(k.state, State::OnHost);

        // Left there, then its VM stops: on the host.
        let mut s = attached();
        s.assign(None, false, t(5));
        assert_eq!(s.handle(Input::VmDown(VM), t(6)), vec![]);
        assert_eq!(s.state, State::OnHost);

        // Left there, then the operator detaches it.
        let mut d = attached();
        d.assign(None, false, t(5));
        assert_eq!(
            d.may_attach(None),
            Err(Refusal::NotAssigned {
                serial: "TOK1".into()
            })
        );
        assert_eq!(d.handle(Input::Hold, t(6)), vec![detach()]);
        assert_eq!(d.state, State::OnHost);

        // Left there, then assigned to that VM again: it stays, nothing is sent.
        let mut a = attached();
        a.assign(None, false, t(5));
        assert_eq!(a.assign(Some(VM), true, t(6)), vec![]);
        assert_eq!(a.state, State::Attached { vmid: VM });
        assert_eq!(
            a.handle(Input::Deleted(VM), t(7)),
            vec![attach("2")],
            "its own again: put back"
        );

        // On the host when unassigned: says so.
        let mut h = Token::new("TOK1", Some(VM), t(0));
        h.handle(seen("2"), t(1));
        assert_eq!(h.assign(None, false, t(2)), vec![]);
        assert!(
            h.last_change
                .reason
                .starts_with("no longer in [[tokens]]; not assigned"),
            "{}",
            h.last_change.reason
        );
    }

    #[test]
    fn status_view() {
        let k = attached();
        let v = serde_json::to_value(&k).unwrap();
        assert_eq!(v["state"], "attached");
        assert_eq!(v["vmid"], VM);
        assert_eq!(v["serial"], "TOK1");
        assert_eq!(v["last_change"]["reason"], "attached to VM 105");
        assert_eq!(v["last_change"]["at"], "1970-01-01T00:00:04Z");
    }

    #[test]
    fn the_operator_holds_releases_and_replaces() {
        let mut k = attached();
        assert_eq!(k.handle(Input::Hold, t(5)), vec![detach()]);
        assert_eq!(k.state, State::OnHost);
        assert!(k.held());
        assert!(
            k.last_change.reason.contains("signetctl attach TOK1"),
            "{}",
            k.last_change.reason
        );
        // Our own device_del is no loss, and nothing puts it back while held: not a
        // re-plug, not the VM restarting.
        assert_eq!(k.handle(Input::Deleted(VM), t(6)), vec![]);
        assert_eq!(k.handle(Input::Gone, t(7)), vec![]);
        assert_eq!(k.handle(seen("3"), t(8)), vec![]);
        assert_eq!(k.handle(Input::VmDown(VM), t(9)), vec![]);
        assert_eq!(k.handle(Input::VmUp(VM), t(10)), vec![]);
        assert_eq!(k.state, State::OnHost);
        // Released: back to its VM at its current port.
        assert_eq!(k.handle(Input::Release, t(11)), vec![attach("3")]);
        assert_eq!(k.state, attaching(false));
        assert!(k.last_change.reason.contains("operator"));
        // Attach on a token already there changes nothing.
        let mut a = attached();
        assert_eq!(a.handle(Input::Release, t(5)), vec![]);
        assert_eq!(a.state, State::Attached { vmid: VM });
        // Replace: out and in again, even when we did not know it was there.
        assert_eq!(a.handle(Input::Replace, t(6)), vec![detach(), attach("2")]);
        assert_eq!(
            a.handle(Input::Deleted(VM), t(7)),
            vec![],
            "our own device_del"
        );
        assert_eq!(a.state, attaching(false));
        // Nothing to do for a token that is not plugged in.
        let mut gone = Token::new("TOK1", Some(VM), t(0));
        assert_eq!(gone.handle(Input::Replace, t(1)), vec![]);
        assert_eq!(gone.handle(Input::Release, t(1)), vec![]);
        assert_eq!(gone.handle(Input::Hold, t(1)), vec![]);
        assert_eq!(gone.state, State::Absent);
    }

    #[test]
    fn the_operator_cannot_attach_where_a_token_does_not_belong() {
        let k = attached();
        assert_eq!(k.may_attach(None), Ok(VM));
        assert_eq!(k.may_attach(Some(VM)), Ok(VM));
        let e = k.may_attach(Some(OTHER)).unwrap_err();
        assert!(matches!(
            e,
            Refusal::OtherVm {
                assigned: VM,
                asked: OTHER,
                ..
            }
        ));
        assert!(e.to_string().contains("vm = 106"), "{e}");
        let mut free = Token::new("TOK1", None, t(0));
        free.handle(seen("2"), t(1));
        let e = free.may_attach(Some(VM)).unwrap_err();
        assert!(
            e.to_string().contains("[[tokens]]") && e.to_string().contains("enroll signing-vm"),
            "{e}"
        );
        let absent = Token::new("TOK1", Some(VM), t(0));
        assert!(matches!(
            absent.may_attach(None),
            Err(Refusal::Absent { .. })
        ));
        let mut down = Token::new("TOK1", Some(VM), t(0));
        down.handle(seen("2"), t(1));
        assert!(matches!(down.may_attach(None), Err(Refusal::VmDown { .. })));
        let mut held = Token::new("TOK1", Some(VM), t(0));
        held.handle(Input::VmUp(VM), t(1));
        held.handle(
            Input::Seen {
                bus: 1,
                port: "2".into(),
                conflicts: vec!["pcscd holds it".into()],
            },
            t(2),
        );
        let e = held.may_attach(None).unwrap_err();
        assert!(e.to_string().contains("pcscd holds it"), "{e}");
    }
}
