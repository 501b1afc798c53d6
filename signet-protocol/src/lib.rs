//! `signet-protocol`: how the Signet pieces reach each other — addresses, transports,
//! the authenticated host↔agent link and HTTP over them. The types they exchange are
//! `signet-api`'s; recognising files is `signet-format`'s.
//!
//! - `bootstrap` (feature `daemon`) — how both daemons start: umask, malloc's thresholds, logs,
//!   TOML configuration.
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
//! - [`batch`] — many files in one request: multipart framing streamed from disk.
//! - [`file_body`] — a file as a body, read ahead on a blocking thread.
//! - [`pin_file`] — the checks a PIN file must pass (owner, mode).
//! - [`writeback`] — a large file sent to the disk while it is written, so that its
//!   closing `fsync` is short.
//! - [`whole`] — a small file read whole into memory faulted in at once, or mapped
//!   read-only for bytes the kernel copies on.
//!
//! The host daemon, the signing-VM agent and the client link this crate; `signetctl`,
//! which speaks D-Bus only, does not.

pub mod batch;
#[cfg(feature = "daemon")]
pub mod bootstrap;
pub mod client;
pub mod endpoint;
pub mod file_body;
pub mod limits;
pub mod link;
pub mod pairing;
pub mod pin_file;
pub mod serve;
pub mod tls;
pub mod transport;
pub mod whole;
pub mod writeback;

pub use endpoint::Endpoint;

/// The block every hop reads a file in, and buffers its writes to a file in: a file's
/// bytes are copied in blocks of this size (constant memory whatever its size). tokio's
/// file I/O goes through the blocking pool once per call, and each chunk read becomes
/// one body frame: 4 KiB blocks cost a thread hand-off and a socket write per 4 KiB.
pub const IO_BLOCK: usize = 256 << 10;

/// The read buffer under a TLS connection. rustls reads one record (16 KiB at most) per
/// read; from the socket directly that is a system call per record, 64 per MiB, on
/// the path of every upload to the agent. Read through this buffer, one call takes
/// what the socket holds and the records are cut from memory.
pub const TLS_READ_AHEAD: usize = IO_BLOCK;
