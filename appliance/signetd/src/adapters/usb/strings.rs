//! String descriptors read from the device itself (libusb, through rusb), for what
//! sysfs does not say: the kernel reads a device's serial number once, at enumeration,
//! and some tokens do not answer it then — Signet tells tokens apart by serial, so it
//! asks the device again.

use std::time::Duration;

/// How long one descriptor request may take.
const TIMEOUT: Duration = Duration::from_millis(500);

/// Reads string descriptors from a device on the host.
pub trait Descriptors {
    /// The serial number of the device at `bus`/`devnum`, if it has one and answers.
    fn serial(&self, bus: u8, devnum: u16) -> Option<String>;
}

/// The real adapter: libusb (rusb). Opening a device needs root, as `signetd` runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rusb;

impl Descriptors for Rusb {
    fn serial(&self, bus: u8, devnum: u16) -> Option<String> {
        let devices = rusb::devices()
            .map_err(|e| tracing::debug!(error = %e, "libusb cannot list the devices"))
            .ok()?;
        let device = devices
            .iter()
            .find(|d| d.bus_number() == bus && u16::from(d.address()) == devnum)?;
        let desc = device.device_descriptor().ok()?;
        desc.serial_number_string_index()?;
        let handle = device
            .open()
            .map_err(|e| tracing::debug!(bus, devnum, error = %e, "cannot open the device to read its serial number"))
            .ok()?;
        let lang = *handle.read_languages(TIMEOUT).ok()?.first()?;
        handle.read_serial_number_string(lang, &desc, TIMEOUT).ok()
    }
}

/// The serial number: sysfs's when it has one, else the device's own answer.
pub fn serial_or_ask(
    from_sysfs: Option<String>,
    bus: u8,
    devnum: u16,
    device: &impl Descriptors,
) -> Option<String> {
    from_sysfs.or_else(|| {
        let s = device.serial(bus, devnum)?;
        let s = s.trim();
        (!s.is_empty()).then(|| s.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A stand-in device answering `answer`, counting the questions.
    struct StandInDevice {
        answer: Option<&'static str>,
        asked: Cell<u32>,
    }

    impl Descriptors for StandInDevice {
        fn serial(&self, _bus: u8, _devnum: u16) -> Option<String> {
            self.asked.set(self.asked.get() + 1);
            self.answer.map(str::to_owned)
        }
    }

    #[test]
    fn the_device_is_asked_only_when_sysfs_has_no_serial() {
        let dev = StandInDevice {
            answer: Some(" 0123ABCD "),
            asked: Cell::new(0),
        };
        assert_eq!(
            serial_or_ask(Some("FROMSYSFS".into()), 1, 5, &dev).as_deref(),
            Some("FROMSYSFS")
        );
        assert_eq!(dev.asked.get(), 0);
        assert_eq!(serial_or_ask(None, 1, 5, &dev).as_deref(), Some("0123ABCD"));
        assert_eq!(dev.asked.get(), 1);
        let blank = StandInDevice {
            answer: Some("   "),
            asked: Cell::new(0),
        };
        assert_eq!(serial_or_ask(None, 1, 5, &blank), None);
    }

    #[test]
    fn libusb_answers_nothing_for_a_device_that_is_not_there() {
        // Bus 255 device 999 exists on no host: the real adapter looks and says so.
        assert_eq!(Rusb.serial(255, 999), None);
    }
}
