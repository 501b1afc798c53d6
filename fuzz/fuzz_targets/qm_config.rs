//! `qm config` output, read when signetd enrolls a signing VM or a build VM.
#![no_main]

use libfuzzer_sys::fuzz_target;
use signetd::adapters::proxmox::{
    check_usb_hotplug, check_vsock_guest, plan_build_vm, plan_signing_vm, VmConfig,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = VmConfig::parse(text);
    let _ = check_usb_hotplug(105, &cfg);
    let _ = check_vsock_guest(105, &cfg);
    let _ = plan_build_vm(105, &cfg);
    if let Ok(plan) = plan_signing_vm(105, &cfg, "3-2", "/run/signet/qmp/105.sock") {
        let _ = plan.to_string();
    }
});
