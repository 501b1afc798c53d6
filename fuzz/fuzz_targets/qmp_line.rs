//! Lines from QEMU's monitor (QMP), read by signetd's monitor of each VM.
#![no_main]

use libfuzzer_sys::fuzz_target;
use signetd::adapters::qmp::{read_line, Line, MonitorEvent};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Line::Event(ev) = read_line(text) {
        let _ = MonitorEvent::Qmp(ev).to_input(100, "signet-0123ABCD");
    }
});
