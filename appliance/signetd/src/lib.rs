//! `signetd`: the host daemon, the only door to the token.
//!
//! - [`clients`] — remote clients (name, hashed secret, profiles, expiry) in SQLite.
//! - [`config`] — `signetd.toml` — listen endpoints, the agent's endpoint, profiles.
//! - [`daemon`] — the core commands (accept a job against the profiles, relay it to the
//!   agent, status). Front ends call these and nothing else.
//! - [`handtokening`] — `POST /api/sign` as Handtokening speaks it: query, file name,
//!   `{"detail"}` errors. Pure.
//! - [`policy`] — who is calling (VM, local user, client) and whether the grants let it
//!   use a profile; per-caller job slots. Pure.
//! - [`limits`] — an upload's size limit and idle timeout, as it streams.
//! - [`serve`] — the connection loop: HTTP/1.1 with a header timeout, the peer as
//!   `ConnectInfo`.
//! - [`server`] — the HTTP front (`/v1/sign`, `/v1/status`, the Handtokening-compatible
//!   `/api/sign`) on vsock, unix, TCP and TLS.
//! - [`tls`] — the TLS acceptor for remote clients.

pub mod clients;
pub mod config;
pub mod daemon;
pub mod handtokening;
pub mod limits;
pub mod policy;
pub mod serve;
pub mod server;
pub mod tls;
