//! The host's tokens on the wire: where each one is (on the host, on its way into its
//! signing VM, in it), as `GET /v1/status` (`tokens`), `GET /v1/tokens`, D-Bus and
//! `signetctl tokens` give it.

use serde::{Deserialize, Serialize};

/// Client → daemon path of the token list ([`TokensReport`]).
pub const TOKENS_PATH: &str = "/v1/tokens";

/// Where a token is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TokenPlace {
    /// Not plugged into the host (or not seen yet).
    Absent,
    /// Plugged into the host and not in a VM; `last_change.reason` says why.
    OnHost,
    /// `device_add` sent (`accepted: false`), or accepted by the VM's QEMU without the
    /// host device claimed yet (`accepted: true`; QEMU keeps trying while it is there).
    Attaching { vmid: u32, accepted: bool },
    /// In VM `vmid`: QEMU has claimed the host device.
    Attached { vmid: u32 },
    /// Held on the host; each entry says what holds it and the fix.
    Conflict { conflicts: Vec<String> },
}

impl TokenPlace {
    /// The place in a few words: `absent`, `on host`, `attaching to VM 105`, ….
    pub fn words(&self) -> String {
        match self {
            TokenPlace::Absent => "absent".into(),
            TokenPlace::OnHost => "on host".into(),
            TokenPlace::Attaching {
                vmid,
                accepted: false,
            } => format!("attaching to VM {vmid}"),
            TokenPlace::Attaching {
                vmid,
                accepted: true,
            } => format!("in VM {vmid}, not claimed by QEMU yet"),
            TokenPlace::Attached { vmid } => format!("attached to VM {vmid}"),
            TokenPlace::Conflict { .. } => "conflict".into(),
        }
    }
}

/// A token's last change of place, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenChange {
    /// RFC 3339.
    pub at: String,
    pub reason: String,
}

/// One token as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostToken {
    pub serial: String,
    /// The model from the known-token table; absent for an unknown smart-card device
    /// (a candidate) and for a token not seen yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `VID:PID` in hex, once seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usb_id: Option<String>,
    /// `BUS-PORT` on the host while plugged in (`usbN: host=BUS-PORT` in Proxmox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<String>,
    /// The signing VM this token belongs to (`[[tokens]]` in `signetd.toml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_vm: Option<u32>,
    #[serde(flatten)]
    pub place: TokenPlace,
    pub last_change: TokenChange,
}

/// Every token the daemon knows of: those configured and those plugged in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokensReport {
    /// Whether the daemon follows the host's USB devices (udev) and so keeps tokens in
    /// their VMs.
    pub watching: bool,
    /// Why it does not, with the fix (or another note for the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default)]
    pub tokens: Vec<HostToken>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_on_the_wire() {
        let t = HostToken {
            serial: "0123ABCD".into(),
            model: Some("SafeNet eToken 5110".into()),
            usb_id: Some("0529:0620".into()),
            host_port: Some("1-2".into()),
            assigned_vm: Some(105),
            place: TokenPlace::Attaching {
                vmid: 105,
                accepted: true,
            },
            last_change: TokenChange {
                at: "2026-11-23T22:00:00Z".into(),
                reason: "VM 105 accepted the device".into(),
            },
        };
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["state"], "attaching");
        assert_eq!(v["vmid"], 105);
        assert_eq!(v["accepted"], true);
        assert_eq!(v["host_port"], "1-2");
        let back: HostToken = serde_json::from_value(v).unwrap();
        assert_eq!(back, t);
        // A token not seen yet: only what is known.
        let absent: HostToken = serde_json::from_str(
            r#"{"serial":"X","state":"absent","last_change":{"at":"t","reason":"r"}}"#,
        )
        .unwrap();
        assert_eq!(absent.place, TokenPlace::Absent);
        assert_eq!(absent.place.words(), "absent");
        assert_eq!(TokenPlace::Attached { vmid: 7 }.words(), "attached to VM 7");
    }
}
