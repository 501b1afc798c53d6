//! `signet-agent`: runs in the signing VM, owns the token, signs.
//!
//! - [`config`] — `agent.toml`, its defaults and constants; imports nothing of the agent.
//! - [`backend`] — `trait Signer`, the seam the agent signs through, with the
//!   [`backend::SignSpec`] and [`backend::SignError`] every backend shares.
//! - [`signer`] — osslsigncode with the token's PKCS#11 module (a `Signer`); the PIN goes
//!   on stdin.
//! - [`signtool`] — the Windows `Signer`: signtool with the token's CSP, its command line
//!   (the PIN only inside `/kc`, never shown) and its error texts classified.
//! - [`token`] — `trait TokenSession` and its cryptoki adapter [`token::Token`]: the
//!   PKCS#11 session, the PIN guard, health and certificates — the only code that logs
//!   in to the token.
//! - [`token_state`] — the token's state as a pure machine: events in, actions out.
//! - [`loss`] — pure decisions about token loss: classification, the watcher's plan,
//!   backoff.
//! - [`job`] — a job's options and format checked against its profile, before the
//!   token is touched.
//! - [`agent`] — the core commands (`sign`, `health`, `login`, events), one job at a
//!   time, and the watcher that re-opens a lost token; puts a signer and a token
//!   session together ([`agent::Agent::with_parts`]).
//! - [`server`] — the HTTP front (`/agent/v1/...`, events as SSE) over vsock, unix or
//!   TCP; each request's log lines under one span with the host's job id.
//! - [`modules`] — known PKCS#11 modules per platform and the tokens they serve.
//! - [`doctor`] — `signet-agent doctor` and `tokens`: checks of the configuration, the
//!   module, the tokens, the PIN file, osslsigncode and the certificate, without login.
//!
//! Unit tests use stand-ins for the signer and the token session (`stand_in`, compiled
//! for tests only); the real ones run against SoftHSM and osslsigncode in the e2e suite.
//!
//! Flow of a job: `server` spools the uploaded body → `agent::sign` detects the format
//! from the content (`signet_format`), checks it and the profile's options
//! with `job`, names the spooled file with the format's extension, takes the job lock,
//! makes sure the token session is logged in → the `Signer` runs osslsigncode
//! (`signer`) or signtool (`signtool`) → `server`
//! streams the signed file back and the spool is deleted.

pub mod agent;
pub mod backend;
pub mod config;
pub mod doctor;
pub mod job;
pub mod loss;
pub mod modules;
pub mod native;
pub mod rdp;
pub mod server;
pub mod signer;
pub mod signtool;
#[cfg(test)]
mod stand_in;
pub mod token;
pub mod token_state;
pub mod tsa;
