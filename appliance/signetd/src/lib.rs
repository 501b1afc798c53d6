//! `signetd`: the host daemon, the only door to the token.
//!
//! - [`config`] — `signetd.toml` — listen endpoints, the agent's endpoint, profiles.
//! - [`daemon`] — the core commands (accept a job against the profiles, relay it to the
//!   agent, status). Front ends call these and nothing else.
//! - [`policy`] — who is calling (VM, local user, client) and whether the grants let it
//!   use a profile; per-caller job slots. Pure.
//! - [`limits`] — an upload's size limit and idle timeout, as it streams.
//! - [`serve`] — the connection loop: HTTP/1.1 with a header timeout, the peer as
//!   `ConnectInfo`.
//! - [`server`] — the HTTP front (`/v1/sign`, `/v1/status`) on vsock, unix and TCP.

pub mod config;
pub mod daemon;
pub mod limits;
pub mod policy;
pub mod serve;
pub mod server;
