//! Everything the Signet pieces agree on, in one place.
//!
//! - [`endpoint`] — the `vsock:CID:PORT` / `unix:PATH` / `tcp:HOST:PORT` /
//!   `tls:HOST:PORT` address syntax.
//! - [`transport`] — connecting to and listening on an endpoint; the peer identity a
//!   listener learns from the kernel (vsock CID, `SO_PEERCRED`, TCP address).
//! - [`client`] — HTTP/1.1 requests over any endpoint, bodies streamed both ways.
//! - [`link`] — the authenticated link between `signetd` and `signet-agent`: each
//!   side's key, the pinned peer key, TLS 1.3 with them on any transport, pairing.
//! - [`pairing`] — the host's half of pairing with an agent.
//! - [`serve`] — the connection loop both servers use (header timeout, connection
//!   cap, TLS, lingering close); [`limits`] — an upload's size and idle limits.
//! - [`tls`] — the client side of `tls:` endpoints: trusted CAs, client credentials.
//! - [`wire`] — the JSON types and query parameters of the client API (`/v1/...`) and
//!   the agent API (`/agent/v1/...`), the stable error codes and what each maps to.
//! - [`operator`] — the operator's result types (job list, audit, host checks) and
//!   their text, the same over HTTP, D-Bus and `signetctl`.
//! - [`batch`] — many files in one request: multipart framing streamed from disk.
//! - [`render`] — the status as text, the same in every front.
//! - [`format`] — recognising the file formats Signet signs from their first bytes.
//! - [`structure`] — whether a file's headers point only inside it (damaged or cut
//!   short files are refused).
//!
//! The host daemon, the signing-VM agent and the client all link this crate, so a
//! change to the wire is a change in one file.

pub mod batch;
pub mod client;
#[cfg(feature = "cli")]
pub mod docs;
pub mod endpoint;
pub mod format;
pub mod limits;
pub mod link;
pub mod operator;
pub mod pairing;
pub mod pin_file;
pub mod render;
pub mod serve;
pub mod structure;
pub mod tls;
pub mod transport;
pub mod wire;

pub use endpoint::Endpoint;

/// Version of the Signet wire protocol and binaries.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
