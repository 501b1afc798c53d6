//! `signet-test-support`: stand-ins that only tests use, so that no shipped binary
//! contains a fake. signetd's own tests (`appliance/signetd/tests`) and the end-to-end
//! tests (`signet-tests`) depend on it; nothing shipped does.
//!
//! - [`pve_api`] — [`StandInPveApi`], the Proxmox VE API as the web UI asks it (a
//!   ticket's privileges on a path), with PVE's login page for a browser.
//!
//! Stand-ins that users select on purpose (the SoftHSM demo token) ship with the
//! product instead.

pub mod pve_api;

pub use pve_api::{encode_ticket, Call, StandInPveApi};
