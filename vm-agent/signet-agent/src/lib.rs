//! `signet-agent`: runs in the signing VM, owns the token, signs.
//!
//! - [`config`] — `agent.toml`.
//! - [`token`] — the PKCS#11 session (cryptoki), the PIN guard, health and certificates —
//!   the only code that logs in to the token.
//! - [`loss`] — pure decisions about token loss: classification, the watcher's plan,
//!   backoff.
//! - [`signer`] — osslsigncode with the token's PKCS#11 module; the PIN goes on stdin.
//! - [`agent`] — the core commands (`sign`, `health`, `login`, events), one job at a
//!   time, and the watcher that re-opens a lost token.
//! - [`server`] — the HTTP front (`/agent/v1/...`, events as SSE) over vsock, unix or
//!   TCP.
//!
//! Flow of a job: `server` spools the uploaded body → `agent::sign` checks the format,
//! takes the job lock, makes sure the token session is logged in → `signer` runs
//! osslsigncode → `server` streams the signed file back and the spool is deleted.

pub mod agent;
pub mod config;
pub mod loss;
pub mod server;
pub mod signer;
pub mod token;
