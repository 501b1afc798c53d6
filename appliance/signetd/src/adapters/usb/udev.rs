//! The real [`TokenWatcher`]: libudev's enumerator for the devices present at start,
//! then a udev monitor on the `usb` subsystem, read on its own thread (a udev socket is
//! not `Send`) and handed to async code over a channel.
//!
//! A removed device's sysfs is gone, so the watcher remembers every device it has seen
//! by syspath and reports a removal with what it last knew. Interface events (`add`,
//! `bind`, `unbind`) are reported as a change of their device, since that is how a host
//! driver grabbing a token shows up.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{
    interface_classes, parse_sysname, Interface, TokenWatcher, UsbDevice, UsbEvent, WatchError,
};
use crate::config::VidPid;

type Seen = Arc<Mutex<HashMap<PathBuf, UsbDevice>>>;

/// Follows the host's USB devices through udev.
#[derive(Debug)]
pub struct UdevWatcher {
    rx: mpsc::Receiver<UsbEvent>,
    seen: Seen,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdevWatcher {
    /// Starts following udev; returns once the monitor is listening, so nothing that
    /// happens after this call is missed.
    pub fn start() -> Result<Self, WatchError> {
        let (tx, rx) = mpsc::channel(256);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let seen: Seen = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let seen = seen.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("udev-watch".into())
                .spawn(move || follow(tx, ready_tx, seen, stop))
                .map_err(WatchError::Udev)?
        };
        ready_rx
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the udev thread ended")))
            .map_err(WatchError::Udev)?;
        Ok(UdevWatcher {
            rx,
            seen,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UdevWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.rx.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl TokenWatcher for UdevWatcher {
    fn enumerate(&mut self) -> Result<Vec<UsbDevice>, WatchError> {
        let found = enumerate()?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for u in &found {
            seen.insert(u.syspath.clone(), u.clone());
        }
        Ok(found)
    }

    async fn next_event(&mut self) -> Option<UsbEvent> {
        self.rx.recv().await
    }
}

/// Every USB device present now, without following changes.
pub fn enumerate() -> Result<Vec<UsbDevice>, WatchError> {
    let mut e = udev::Enumerator::new().map_err(WatchError::Udev)?;
    e.match_subsystem("usb").map_err(WatchError::Udev)?;
    let mut found = Vec::new();
    for d in e.scan_devices().map_err(WatchError::Udev)? {
        if let Some(u) = read_device(&d) {
            found.push(u);
        }
    }
    found.sort_by(|a, b| a.syspath.cmp(&b.syspath));
    Ok(found)
}

fn follow(
    tx: mpsc::Sender<UsbEvent>,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
    seen: Seen,
    stop: Arc<AtomicBool>,
) {
    let socket = match udev::MonitorBuilder::new()
        .and_then(|b| b.match_subsystem("usb"))
        .and_then(|b| b.listen())
    {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Relaxed) && !tx.is_closed() {
        let mut fds = [nix::poll::PollFd::new(
            socket.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        // The timeout only bounds how long a stop request waits.
        match nix::poll::poll(&mut fds, 200u16) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "polling the udev monitor failed; USB changes are no longer followed");
                return;
            }
        }
        for event in socket.iter() {
            if let Some(ev) = translate(&event, &seen) {
                if tx.blocking_send(ev).is_err() {
                    return;
                }
            }
        }
    }
}

fn translate(event: &udev::Event, seen: &Seen) -> Option<UsbEvent> {
    let dev = event.device();
    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    let devtype = dev.devtype().and_then(OsStr::to_str);
    if devtype == Some("usb_interface") {
        // A driver binding to (or leaving) an interface changes its device's conflicts.
        let parent = dev.parent()?;
        let updated = read_device(&parent)?;
        seen.insert(updated.syspath.clone(), updated.clone());
        return Some(UsbEvent::Changed(updated));
    }
    match event.event_type() {
        udev::EventType::Remove => {
            let path = dev.syspath().to_owned();
            seen.remove(&path)
                .or_else(|| from_properties(&dev))
                .map(UsbEvent::Removed)
        }
        udev::EventType::Add => {
            let u = read_device(&dev)?;
            seen.insert(u.syspath.clone(), u.clone());
            Some(UsbEvent::Added(u))
        }
        udev::EventType::Change | udev::EventType::Bind | udev::EventType::Unbind => {
            let u = read_device(&dev)?;
            seen.insert(u.syspath.clone(), u.clone());
            Some(UsbEvent::Changed(u))
        }
        udev::EventType::Unknown => None,
    }
}

fn text(v: Option<&OsStr>) -> Option<String> {
    let s = v?.to_str()?.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// A USB device (not a root hub, not an interface) as sysfs describes it.
pub fn read_device(d: &udev::Device) -> Option<UsbDevice> {
    if d.devtype().and_then(OsStr::to_str) != Some("usb_device") {
        return None;
    }
    let (bus, port) = parse_sysname(d.sysname().to_str()?)?;
    let hex = |attr: &str, prop: &str| {
        text(d.attribute_value(attr))
            .or_else(|| text(d.property_value(prop)))
            .and_then(|s| u16::from_str_radix(&s, 16).ok())
    };
    let id = VidPid {
        vendor: hex("idVendor", "ID_VENDOR_ID")?,
        product: hex("idProduct", "ID_MODEL_ID")?,
    };
    let devnum = text(d.attribute_value("devnum"))
        .or_else(|| text(d.property_value("DEVNUM")))
        .and_then(|s| s.parse().ok())?;
    Some(UsbDevice {
        syspath: d.syspath().to_owned(),
        id,
        bus,
        devnum,
        port,
        serial: super::strings::serial_or_ask(
            text(d.attribute_value("serial")).or_else(|| text(d.property_value("ID_SERIAL_SHORT"))),
            bus,
            devnum,
            &super::strings::Rusb,
        ),
        manufacturer: text(d.attribute_value("manufacturer")),
        product: text(d.attribute_value("product")),
        interfaces: interfaces(d),
    })
}

/// A removed device that was never seen while present: what its uevent still says.
fn from_properties(d: &udev::Device) -> Option<UsbDevice> {
    if d.devtype().and_then(OsStr::to_str) != Some("usb_device") {
        return None;
    }
    let (bus, port) = parse_sysname(d.sysname().to_str()?)?;
    // PRODUCT=529/620/100: vendor/product/bcdDevice in hex without leading zeros.
    let product = text(d.property_value("PRODUCT"))?;
    let mut parts = product.split('/');
    let vendor = u16::from_str_radix(parts.next()?, 16).ok()?;
    let product = u16::from_str_radix(parts.next()?, 16).ok()?;
    Some(UsbDevice {
        syspath: d.syspath().to_owned(),
        id: VidPid { vendor, product },
        bus,
        devnum: text(d.property_value("DEVNUM")).and_then(|s| s.parse().ok())?,
        port,
        serial: text(d.property_value("ID_SERIAL_SHORT")),
        manufacturer: None,
        product: None,
        interfaces: Vec::new(),
    })
}

/// The device's interfaces with their drivers; when the kernel has not made the
/// interface devices (yet), their classes from the configuration descriptor.
fn interfaces(d: &udev::Device) -> Vec<Interface> {
    let mut found = Vec::new();
    if let Ok(mut e) = udev::Enumerator::new() {
        if e.match_parent(d).is_ok() {
            if let Ok(list) = e.scan_devices() {
                for i in list {
                    if i.devtype().and_then(OsStr::to_str) != Some("usb_interface") {
                        continue;
                    }
                    let class = text(i.attribute_value("bInterfaceClass"))
                        .and_then(|s| u8::from_str_radix(&s, 16).ok());
                    if let (Some(class), Some(name)) = (class, i.sysname().to_str()) {
                        found.push(Interface {
                            name: name.to_owned(),
                            class,
                            driver: text(i.driver()),
                        });
                    }
                }
            }
        }
    }
    if found.is_empty() {
        // libudev reads attributes as C strings; descriptors hold NUL bytes.
        if let Ok(raw) = std::fs::read(Path::new(d.syspath()).join("descriptors")) {
            let name = d.sysname().to_string_lossy();
            found = interface_classes(&raw)
                .into_iter()
                .enumerate()
                .map(|(n, class)| Interface {
                    name: format!("{name}:1.{n}"),
                    class,
                    driver: None,
                })
                .collect();
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}
