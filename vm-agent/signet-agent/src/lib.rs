//! `signet-agent`: runs in the signing VM, owns the token, signs.
//!
//! - [`config`] — `agent.toml`.
//! - [`token`] — the PKCS#11 session (cryptoki), the PIN guard, health and certificates —
//!   the only code that logs in to the token.
//! - [`loss`] — pure decisions about token loss: classification, the watcher's plan,
//!   backoff.
//! - [`backend`] — the signing backend `[signer] backend` chose: osslsigncode (the
//!   default) or signtool (Windows only); one enum the agent calls, same specs and
//!   errors for both.
//! - [`signer`] — osslsigncode with the token's PKCS#11 module; the PIN goes on stdin.
//! - [`signtool`] — the Windows backend: signtool with the token's CSP, its command line
//!   (the PIN only inside `/kc`, never shown) and its error texts classified.
//! - [`job`] — a job's options and format checked against its profile, before the
//!   token is touched.
//! - [`agent`] — the core commands (`sign`, `health`, `login`, events), one job at a
//!   time, and the watcher that re-opens a lost token.
//! - [`server`] — the HTTP front (`/agent/v1/...`, events as SSE) over vsock, unix or
//!   TCP.
//! - [`modules`] — known PKCS#11 modules per platform and the tokens they serve.
//! - [`doctor`] — `signet-agent doctor` and `tokens`: checks of the configuration, the
//!   module, the tokens, the PIN file, osslsigncode and the certificate, without login.
//!
//! Flow of a job: `server` spools the uploaded body → `agent::sign` detects the format
//! from the content (`signet_protocol::format`), checks it and the profile's options
//! with `job`, names the spooled file with the format's extension, takes the job lock,
//! makes sure the token session is logged in → `backend` runs osslsigncode (`signer`)
//! or signtool (`signtool`) → `server`
//! streams the signed file back and the spool is deleted.

pub mod agent;
pub mod backend;
pub mod config;
pub mod doctor;
pub mod job;
pub mod loss;
pub mod modules;
pub mod rdp;
pub mod server;
pub mod signer;
pub mod signtool;
pub mod token;
pub mod token_state;
