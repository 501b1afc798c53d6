//! A QMP client for the signing VM's QEMU, over the monitor socket Signet adds to the
//! VM's `args:` — never qemu-server's own `/var/run/qemu-server/<vmid>.qmp`, which
//! serves one client at a time.
//!
//! [`Qmp`] is one connection: greeting and capabilities negotiation, commands with ids
//! and a time limit on every answer, events to subscribers. [`Monitor`] keeps a
//! connection up across QEMU restarts and reports `Connected` / `Disconnected` beside
//! QEMU's events. The USB helpers ([`Qmp::attach_usb_host`], [`Qmp::attached`],
//! [`Qmp::detach`]) hot-plug a host USB device by bus and port under an id derived from
//! the token's serial ([`device_id`](crate::core::passthrough::device_id)). A token's [`DeviceKind`] says which devices
//! stand for it in the VM: `usb-host` for a real token, or — for a lab without a
//! physical token — QEMU's emulated smart card (`usb-ccid` reader + `ccid-card-emulated`);
//! only the `device_add` arguments differ ([`attach_commands`]). QMP is JSON lines; `serde_json` by hand is
//! shorter here than a generated schema crate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::config::DeviceKind;

use crate::core::passthrough::{Action, Input};

/// An event QEMU sent.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpEvent {
    /// The guest reset (`system_reset`, or a reboot from inside the guest).
    Reset {
        guest: bool,
        reason: String,
    },
    Shutdown {
        guest: bool,
        reason: String,
    },
    Stop,
    Resume,
    /// A device is gone (our `device_del`, someone else's, or QEMU's own).
    DeviceDeleted {
        device: Option<String>,
        path: String,
    },
    Other {
        name: String,
        data: Value,
    },
}

impl QmpEvent {
    fn parse(msg: &Value) -> Option<Self> {
        let name = msg.get("event")?.as_str()?;
        let data = msg.get("data").cloned().unwrap_or(Value::Null);
        let s = |k: &str| data.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let guest = data.get("guest").and_then(Value::as_bool).unwrap_or(false);
        Some(match name {
            "RESET" => QmpEvent::Reset {
                guest,
                reason: s("reason"),
            },
            "SHUTDOWN" => QmpEvent::Shutdown {
                guest,
                reason: s("reason"),
            },
            "STOP" => QmpEvent::Stop,
            "RESUME" => QmpEvent::Resume,
            "DEVICE_DELETED" => QmpEvent::DeviceDeleted {
                device: data
                    .get("device")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                path: s("path"),
            },
            _ => QmpEvent::Other {
                name: name.to_owned(),
                data,
            },
        })
    }
}

/// One line QEMU sent after its greeting, read (pure: the monitor's reader acts on it).
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// Not JSON: logged and skipped.
    NotJson,
    /// An event.
    Event(QmpEvent),
    /// The answer to the command sent with `id`: its `return`, or its error's class and
    /// description.
    Answer {
        id: u64,
        answer: Result<Value, (String, String)>,
    },
    /// JSON that is neither (no id, or neither `return` nor `error`): skipped.
    Other,
}

/// Reads one line from QEMU's monitor. Any bytes are safe to give it (fuzzed:
/// `fuzz/fuzz_targets/qmp_line.rs`).
pub fn read_line(line: &str) -> Line {
    let Ok(msg) = serde_json::from_str::<Value>(line) else {
        return Line::NotJson;
    };
    if let Some(ev) = QmpEvent::parse(&msg) {
        return Line::Event(ev);
    }
    let Some(id) = msg.get("id").and_then(Value::as_u64) else {
        return Line::Other;
    };
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    match (msg.get("return"), msg.get("error")) {
        (Some(r), _) => Line::Answer {
            id,
            answer: Ok(r.clone()),
        },
        (None, Some(e)) => Line::Answer {
            id,
            answer: Err((text(e, "class"), text(e, "desc"))),
        },
        (None, None) => Line::Other,
    }
}

/// What went wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to the VM's monitor socket {path}: {source}; is the VM running, and does its `args:` carry Signet's monitor (signetd enroll signing-vm)?")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM's monitor did not answer {what} within {timeout:?}; QEMU may be hung")]
    Timeout { what: String, timeout: Duration },
    #[error("the VM's monitor closed the connection (QEMU stopped or restarted)")]
    Disconnected,
    #[error("the VM's monitor spoke something other than QMP: {0}")]
    Protocol(String),
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("writing to the VM's monitor failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a USB device could not be hot-plugged.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("the VM already has a device with id {id}; detach it first (device_del) or it is already attached")]
    DuplicateId { id: String },
    #[error("the VM has no USB bus {bus}; give the VM a qemu-xhci controller (Proxmox: machine version 7.1 or newer with a modern ostype adds one for usbN entries)")]
    NoBus { bus: String },
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// The `device_add` arguments that put a token into the VM, in order: one `usb-host`,
/// or the emulated reader then its card on the reader's CCID bus (`ID.0`). The
/// host's bus and port only matter to `usb-host`.
pub fn attach_commands(
    kind: &DeviceKind,
    id: &str,
    bus: &str,
    hostbus: u8,
    hostport: &str,
) -> Vec<Value> {
    match kind {
        DeviceKind::UsbHost => vec![json!({
            "driver": "usb-host", "id": id, "bus": bus,
            "hostbus": hostbus, "hostport": hostport,
        })],
        DeviceKind::EmulatedCcid { db, certs } => vec![
            json!({"driver": "usb-ccid", "id": id, "bus": bus}),
            json!({
                "driver": "ccid-card-emulated", "id": format!("{id}-card"),
                "bus": format!("{id}.0"), "backend": "certificates", "db": db,
                "cert1": certs[0], "cert2": certs[1], "cert3": certs[2],
            }),
        ],
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>>>;

/// One QMP connection.
#[derive(Debug)]
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
    timeout: Duration,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Qmp {
    /// The reader goes with the connection (the socket closes with it).
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Arc<Self>, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (read, writer) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = tokio::time::timeout(timeout, lines.next_line())
            .await
            .map_err(|_| QmpError::Timeout {
                what: "with its greeting".into(),
                timeout,
            })??
            .ok_or(QmpError::Disconnected)?;
        let greeting: Value =
            serde_json::from_str(&greeting).map_err(|e| QmpError::Protocol(e.to_string()))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a QMP greeting, got {greeting}"
            )));
        }
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(256);
        let (closed_tx, closed) = watch::channel(false);
        let reader = {
            let pending = pending.clone();
            let events = events.clone();
            tokio::spawn(async move {
                loop {
                    let line = match lines.next_line().await {
                        Ok(Some(l)) => l,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "reading the VM's monitor failed");
                            break;
                        }
                    };
                    let (id, answer) = match read_line(&line) {
                        Line::NotJson => {
                            tracing::warn!(line, "the VM's monitor sent a line that is not JSON");
                            continue;
                        }
                        Line::Event(ev) => {
                            let _ = events.send(ev);
                            continue;
                        }
                        Line::Answer { id, answer } => (id, answer),
                        Line::Other => continue,
                    };
                    let waiter = pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    if let Some(w) = waiter {
                        let _ = w.send(answer);
                    }
                }
                // Closed first, then the waiters dropped (answering them `Disconnected`):
                // a command registered after the clear sees the flag.
                let _ = closed_tx.send(true);
                pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
            })
        };
        let qmp = Arc::new(Qmp {
            writer: tokio::sync::Mutex::new(writer),
            pending,
            next_id: AtomicU64::new(1),
            events,
            closed,
            timeout,
            reader,
        });
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs a command; its answer must come within the connection's time limit.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        // The reader drops all waiters when the connection closes; one added after that
        // would wait for nothing.
        if *self.closed.borrow() {
            self.forget(id);
            return Err(QmpError::Disconnected);
        }
        let mut msg = json!({"execute": command, "id": id});
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let sent = async {
            let mut w = self.writer.lock().await;
            w.write_all(line.as_bytes()).await
        }
        .await;
        if let Err(e) = sent {
            self.forget(id);
            return Err(if *self.closed.borrow() {
                QmpError::Disconnected
            } else {
                QmpError::Io(e)
            });
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Err(_) => {
                self.forget(id);
                Err(QmpError::Timeout {
                    what: command.to_owned(),
                    timeout: self.timeout,
                })
            }
            Ok(Err(_)) => Err(QmpError::Disconnected),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                command: command.to_owned(),
                class,
                desc,
            }),
        }
    }

    fn forget(&self, id: u64) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// QEMU's events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Resolves when the connection has closed.
    pub async fn closed(&self) {
        let mut c = self.closed.clone();
        let _ = c.wait_for(|c| *c).await;
    }

    /// `device_add usb-host` for the host device at `hostbus`/`hostport` (e.g. 1 and
    /// `2.4`). QEMU accepts it whether or not the device is there; see [`Qmp::attached`].
    pub async fn attach_usb_host(
        &self,
        id: &str,
        bus: &str,
        hostbus: u8,
        hostport: &str,
    ) -> Result<(), AttachError> {
        self.attach(&DeviceKind::UsbHost, id, bus, hostbus, hostport)
            .await
    }

    /// Puts the token's devices ([`attach_commands`]) into the VM. When a later device
    /// is refused, the ones added before it are taken out again.
    pub async fn attach(
        &self,
        kind: &DeviceKind,
        id: &str,
        bus: &str,
        hostbus: u8,
        hostport: &str,
    ) -> Result<(), AttachError> {
        for (i, args) in attach_commands(kind, id, bus, hostbus, hostport)
            .into_iter()
            .enumerate()
        {
            let added = self.device_add(args, id, bus).await;
            if i > 0 && added.is_err() {
                if let Err(e) = self.detach(id).await {
                    tracing::warn!(error = %e, id, "taking out a half-attached token failed");
                }
            }
            added?;
        }
        Ok(())
    }

    async fn device_add(&self, args: Value, id: &str, bus: &str) -> Result<(), AttachError> {
        match self.execute("device_add", Some(args)).await {
            Ok(_) => Ok(()),
            Err(QmpError::Command { desc, .. }) if desc.contains("Duplicate") => {
                Err(AttachError::DuplicateId { id: id.to_owned() })
            }
            Err(QmpError::Command { desc, .. })
                if desc.contains("Bus '") && desc.contains("not found") =>
            {
                Err(AttachError::NoBus {
                    bus: bus.to_owned(),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the device is in the VM (`None`: no such device) and, if so, whether
    /// QEMU has really claimed the host device behind it (`Some(true)`).
    pub async fn attached(&self, id: &str) -> Result<Option<bool>, QmpError> {
        let args = json!({"path": format!("/machine/peripheral/{id}"), "property": "attached"});
        match self.execute("qom-get", Some(args)).await {
            Ok(v) => Ok(Some(v.as_bool().unwrap_or(false))),
            Err(QmpError::Command { class, desc, .. })
                if class == "DeviceNotFound" || desc.contains("not found") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// `device_del`, then waits for QEMU's `DEVICE_DELETED` for it. A device that is
    /// already gone counts as detached.
    pub async fn detach(&self, id: &str) -> Result<(), QmpError> {
        let mut events = self.subscribe();
        match self.execute("device_del", Some(json!({"id": id}))).await {
            Ok(_) => {}
            Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => return Ok(()),
            Err(e) => return Err(e),
        }
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(QmpEvent::DeviceDeleted { device, .. }) if device.as_deref() == Some(id) => {
                        return Ok(())
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err(QmpError::Disconnected),
                }
            }
        };
        tokio::select! {
            r = tokio::time::timeout(self.timeout, wait) => r.map_err(|_| QmpError::Timeout {
                what: format!("device_del {id} with DEVICE_DELETED"),
                timeout: self.timeout,
            })?,
            _ = self.closed() => Err(QmpError::Disconnected),
        }
    }
}

impl Qmp {
    /// Carries out one passthrough action on this VM (`usb_bus`: the VM's USB bus,
    /// `xhci.0` on Proxmox) and says what came of it, for the token's state machine.
    pub async fn perform(
        &self,
        usb_bus: &str,
        kind: &DeviceKind,
        action: &Action,
    ) -> Option<Input> {
        match action {
            Action::Attach {
                vmid,
                id,
                hostbus,
                hostport,
            } => Some(
                match self.attach(kind, id, usb_bus, *hostbus, hostport).await {
                    Ok(()) => Input::Accepted(*vmid),
                    Err(AttachError::DuplicateId { .. }) => Input::Duplicate(*vmid),
                    Err(e) => Input::Refused {
                        vmid: *vmid,
                        reason: e.to_string(),
                    },
                },
            ),
            Action::Detach { id, .. } => {
                if let Err(e) = self.detach(id).await {
                    tracing::warn!(error = %e, id, "detaching a token failed");
                }
                None
            }
            Action::Check { vmid, id } => match self.attached(id).await {
                Ok(attached) => Some(Input::Checked {
                    vmid: *vmid,
                    attached,
                }),
                Err(e) => {
                    tracing::warn!(error = %e, id, "checking a token's device failed");
                    None
                }
            },
        }
    }
}

impl MonitorEvent {
    /// What this event means to the token whose device id is `id` in VM `vmid`.
    pub fn to_input(&self, vmid: u32, id: &str) -> Option<Input> {
        match self {
            MonitorEvent::Connected => Some(Input::VmUp(vmid)),
            MonitorEvent::Disconnected | MonitorEvent::Qmp(QmpEvent::Shutdown { .. }) => {
                Some(Input::VmDown(vmid))
            }
            MonitorEvent::Qmp(QmpEvent::Reset { .. }) => Some(Input::VmReset(vmid)),
            MonitorEvent::Qmp(QmpEvent::DeviceDeleted { device, .. })
                if device.as_deref() == Some(id) =>
            {
                Some(Input::Deleted(vmid))
            }
            MonitorEvent::Qmp(_) => None,
        }
    }
}

/// What a [`Monitor`] reports.
#[derive(Debug, Clone, PartialEq)]
pub enum MonitorEvent {
    /// A new connection is up (QEMU started, or restarted): state in QEMU may be new.
    Connected,
    /// The connection closed: QEMU stopped, crashed or is restarting.
    Disconnected,
    Qmp(QmpEvent),
}

/// Keeps a QMP connection to one VM up: connects when QEMU is there, reconnects when
/// it comes back, and reports its events in order.
#[derive(Debug)]
pub struct Monitor {
    current: watch::Receiver<Option<Arc<Qmp>>>,
    events: mpsc::Receiver<MonitorEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Monitor {
    /// Starts following the monitor socket at `path`.
    pub fn start(path: PathBuf, timeout: Duration) -> Self {
        let (current_tx, current) = watch::channel(None);
        let (tx, events) = mpsc::channel(256);
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let qmp = match Qmp::connect(&path, timeout).await {
                    Ok(q) => q,
                    Err(e) => {
                        tracing::debug!(error = %e, "the VM's monitor is not there yet");
                        // Waiting for QEMU to (re)start: there is nothing to wake on.
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                };
                backoff = Duration::from_millis(100);
                let mut sub = qmp.subscribe();
                let _ = current_tx.send(Some(qmp.clone()));
                if tx.send(MonitorEvent::Connected).await.is_err() {
                    return;
                }
                loop {
                    // Events QEMU sent before closing come first.
                    let ev = tokio::select! {
                        biased;
                        r = sub.recv() => r,
                        _ = qmp.closed() => match sub.try_recv() {
                            Ok(ev) => Ok(ev),
                            Err(_) => break,
                        },
                    };
                    match ev {
                        Ok(ev) => {
                            if tx.send(MonitorEvent::Qmp(ev)).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "QMP events were dropped");
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    }
                }
                let _ = current_tx.send(None);
                if tx.send(MonitorEvent::Disconnected).await.is_err() {
                    return;
                }
            }
        });
        Monitor {
            current,
            events,
            task,
        }
    }

    /// The next event; `None` only if the monitor's task ended.
    pub async fn next(&mut self) -> Option<MonitorEvent> {
        self.events.recv().await
    }

    /// The live connection, if QEMU is up.
    pub fn qmp(&self) -> Option<Arc<Qmp>> {
        self.current.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::passthrough::device_id;

    /// Lines as QEMU 10 prints them (recorded from `qemu-system-x86_64 -qmp`).
    #[test]
    fn monitor_lines_are_read_as_events_answers_or_skipped() {
        assert_eq!(
            read_line(r#"{"return": {}, "id": 3}"#),
            Line::Answer {
                id: 3,
                answer: Ok(serde_json::json!({}))
            }
        );
        assert_eq!(
            read_line(
                r#"{"id": 4, "error": {"class": "GenericError", "desc": "Duplicate device ID 'signet-0123'"}}"#
            ),
            Line::Answer {
                id: 4,
                answer: Err((
                    "GenericError".into(),
                    "Duplicate device ID 'signet-0123'".into()
                ))
            }
        );
        assert_eq!(
            read_line(
                r#"{"timestamp": {"seconds": 1764690000, "microseconds": 5}, "event": "RESET", "data": {"guest": true, "reason": "guest-reset"}}"#
            ),
            Line::Event(QmpEvent::Reset {
                guest: true,
                reason: "guest-reset".into()
            })
        );
        assert_eq!(read_line("garbage {"), Line::NotJson);
        assert_eq!(read_line(r#"{"return": {}}"#), Line::Other);
        assert_eq!(read_line(r#"{"id": 5}"#), Line::Other);
        assert_eq!(read_line(r#"{"id": -1, "return": 1}"#), Line::Other);
        assert_eq!(read_line(r#"[1, 2]"#), Line::Other);
    }

    #[test]
    fn device_ids_are_valid_stable_and_distinct() {
        assert_eq!(device_id("0123ABCD"), "signet-0123ABCD");
        let odd = device_id("12 34/56");
        assert!(odd.starts_with("signet-12_34_56-"), "{odd}");
        assert_eq!(odd, device_id("12 34/56"));
        assert_ne!(device_id("12 34"), device_id("12/34"));
        assert_ne!(device_id("12_34"), device_id("12 34"));
        for s in ["ü", "a:b", "", &"x".repeat(200)] {
            let id = device_id(s);
            assert!(id.starts_with(|c: char| c.is_ascii_alphabetic()));
            assert!(id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')));
            assert!(id.len() < 64);
        }
    }

    #[test]
    fn attach_arguments_per_device_kind() {
        assert_eq!(
            attach_commands(&DeviceKind::UsbHost, "signet-A", "xhci.0", 3, "1.2"),
            vec![
                json!({"driver": "usb-host", "id": "signet-A", "bus": "xhci.0",
                        "hostbus": 3, "hostport": "1.2"})
            ]
        );
        let lab = DeviceKind::EmulatedCcid {
            db: "sql:/lab/nssdb".into(),
            certs: ["lab-id".into(), "lab-codesign".into(), "lab-enc".into()],
        };
        assert_eq!(
            attach_commands(&lab, "signet-A", "uhci.0", 3, "1.2"),
            vec![
                json!({"driver": "usb-ccid", "id": "signet-A", "bus": "uhci.0"}),
                json!({"driver": "ccid-card-emulated", "id": "signet-A-card",
                       "bus": "signet-A.0", "backend": "certificates",
                       "db": "sql:/lab/nssdb", "cert1": "lab-id",
                       "cert2": "lab-codesign", "cert3": "lab-enc"}),
            ]
        );
        // From signetd.toml.
        #[derive(serde::Deserialize)]
        struct T {
            device: DeviceKind,
        }
        let t: T = toml::from_str(
            "device = { kind = \"emulated-ccid\", db = \"sql:/lab/nssdb\", certs = [\"lab-id\", \"lab-codesign\", \"lab-enc\"] }",
        )
        .unwrap();
        assert_eq!(t.device, lab);
        let t: T = toml::from_str("device = { kind = \"usb-host\" }").unwrap();
        assert_eq!(t.device, DeviceKind::UsbHost);
        assert!(toml::from_str::<T>(
            "device = { kind = \"emulated-ccid\", db = \"x\", certs = [\"a\"] }"
        )
        .is_err());
    }

    #[test]
    fn events_parse() {
        let e = |s: &str| QmpEvent::parse(&serde_json::from_str(s).unwrap()).unwrap();
        assert_eq!(
            e(
                r#"{"event":"RESET","data":{"guest":false,"reason":"host-qmp-system-reset"},"timestamp":{}}"#
            ),
            QmpEvent::Reset {
                guest: false,
                reason: "host-qmp-system-reset".into()
            }
        );
        assert_eq!(
            e(
                r#"{"event":"DEVICE_DELETED","data":{"device":"token0","path":"/machine/peripheral/token0"}}"#
            ),
            QmpEvent::DeviceDeleted {
                device: Some("token0".into()),
                path: "/machine/peripheral/token0".into()
            }
        );
        assert_eq!(e(r#"{"event":"STOP"}"#), QmpEvent::Stop);
        assert!(matches!(
            e(r#"{"event":"POWERDOWN"}"#),
            QmpEvent::Other { .. }
        ));
        assert!(QmpEvent::parse(&json!({"return": {}})).is_none());
    }
}
