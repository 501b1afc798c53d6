//! `signet-api`: the words every Signet piece shares, without any transport.
//!
//! - [`wire`] — the JSON types and query parameters of the client API (`/v1/...`) and
//!   the agent API (`/agent/v1/...`), the formats Signet signs, the stable error codes
//!   and what each maps to.
//! - [`operator`] — the operator's result types (job list, audit, host checks) and
//!   their text, the same over HTTP, D-Bus and `signetctl`.
//! - [`render`] — the status as text, the same in every front.
//! - [`docs`] — (feature `cli`) the `man` and `completions` subcommands;
//!   [`args`] — (feature `cli`) the arguments `signetctl` and `signetd` share;
//!   [`output`] — (feature `cli`) `--output-format`, and printing to stdout that ends
//!   the program quietly instead of panicking when a pipe's reader has gone.
//! - [`hex`], [`rfc3339`] — bytes and times as text.
//!
//! It has no async runtime, HTTP stack or TLS, so a CLI that only speaks D-Bus links
//! it alone; `signet-protocol` carries these types over the wire. The feature `axum`
//! makes an [`wire::ErrorBody`] an HTTP answer, for the servers.

#[cfg(feature = "cli")]
pub mod args;
#[cfg(feature = "cli")]
pub mod docs;
pub mod hex;
pub mod operator;
#[cfg(feature = "cli")]
pub mod output;
pub mod render;
pub mod rfc3339;
pub mod wire;

/// Version of the Signet wire protocol and binaries.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
