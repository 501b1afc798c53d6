//! `signetd`: the host daemon, the only door to the token.
//!
//! - [`config`] — `signetd.toml` — listen endpoints, the agent's endpoint, profiles.
//! - [`daemon`] — the core commands (accept a job against the profiles, relay it to the
//!   agent, status). Front ends call these and nothing else.
//! - [`store`] — `state_dir/signet.db` (SQLite, WAL) and the spool: jobs as rows, inputs
//!   and results as fsync'd files.
//! - [`queue`] — pure: the per-token queue, callers taking turns, positions, estimates.
//! - [`jobs`] — the job path: record, spool, queue, the token's worker, results.
//! - [`audit`] — the hash-chained audit log, `signetd audit verify|export`.
//! - [`server`] — the HTTP front (`/v1/sign`, `/v1/status`) on vsock, unix and TCP.

pub mod audit;
pub mod config;
pub mod daemon;
pub mod jobs;
pub mod queue;
pub mod server;
pub mod store;
