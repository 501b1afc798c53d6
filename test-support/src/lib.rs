//! `signet-test-support`: stand-ins and harnesses that only tests use, so that no
//! shipped binary contains a fake. signetd's own tests (`appliance/signetd/tests`) and
//! the end-to-end tests (`signet-tests`) depend on it as a dev-dependency; nothing
//! shipped does (`tests/deps.rs` checks).
//!
//! - [`pve_api`] — [`StandInPveApi`], the Proxmox VE API as the web UI asks it (a
//!   ticket's privileges on a path), with PVE's login page for a browser.
//! - [`world`] — the end-to-end tests' world (re-exported at the root): a SoftHSM token
//!   per test, the real binaries as child processes, a loopback RFC 3161 TSA (`Tsa`),
//!   umockdev testbeds, and cleanup of every child on drop.
//!
//! Stand-ins that users select on purpose (the SoftHSM demo token) ship with the
//! product instead.

#![allow(clippy::unwrap_used)]

pub mod pve_api;
pub mod world;

pub use pve_api::{encode_ticket, Call, ClusterNode, StandInPveApi};
pub use world::*;
