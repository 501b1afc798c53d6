//! `signetd`: the host daemon, the only door to the token.
//!
//! The crate is built in layers; a module imports only its own layer and those below
//! it, and no two modules import each other (`tests/layers.rs` holds the rule):
//!
//! - [`fronts`] — the doors callers use: HTTP (client API, Handtokening's `/api/sign`,
//!   the operator's routes), D-Bus for `signetctl`, the web UI, `/metrics`. Parse,
//!   call, render.
//! - [`services`] — the use cases: the job path and its worker, the token service, the
//!   agent's view, the operator's actions and reads, the host checks, the daemon's
//!   tasks, its reload and its stop.
//! - [`adapters`] — one narrow door to each outside thing: SQLite and the spool, the
//!   audit chain and its head, QEMU's monitor, udev and USB, `qm`, D-Bus connections,
//!   file modes, TLS, remote clients.
//! - [`config`] — `signetd.toml`: every section's types, their checks, edits by
//!   `signetd enroll`, what a reload changes.
//! - [`core`] — pure rules and state machines: who may call what, the queue, refusals,
//!   a token's place, an agent's life, the recovery ladder, the timeline's clock.

pub mod adapters;
pub mod config;
pub mod core;
pub mod fronts;
pub mod services;

pub use signet_protocol::{limits, serve};
