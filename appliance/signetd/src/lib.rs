//! `signetd`: the host daemon, the only door to the token.
//!
//! - [`clients`] — remote clients (name, hashed secret, profiles, expiry) in SQLite.
//! - [`config`] — `signetd.toml` — listen endpoints, the agent's endpoint, profiles.
//! - [`daemon`] — the core commands (accept a job against the profiles, relay it to the
//!   agent, status). Front ends call these and nothing else.
//! - [`doctor`] — the host checks behind `signetctl doctor`: facts read under a root
//!   directory, judged by pure functions, each failure with its fix.
//! - [`ops`] — the operator's commands: every caller's jobs, cancel any job, the audit
//!   log's tail, check and export, doctor; the job-finished events for D-Bus signals.
//! - [`operate`] — the operator's actions, audited with who did them: attach, detach,
//!   re-attach a token, cancel a job, enroll a VM (its dry run first).
//! - [`enroll_config`] — what `signetd enroll` appends to `signetd.toml`: a build VM's
//!   grant, a signing VM's `[[tokens]]` entry.
//! - [`dbus`] — the D-Bus front (`org.signet.Signet1`) on the system bus, for `signetctl`.
//! - [`passthrough`] — each token's place (absent, on host, attaching, attached to VM N, conflict):
//!   a pure state machine answering udev and QMP events with QMP actions.
//! - [`proxmox`] — VM configuration through `qm`: USB slot, vsock device and Signet's monitor
//!   in `args:`, for `signetd enroll`.
//! - [`recovery`] — the escalation ladder for a lost token (agent re-init → re-attach →
//!   USB port reset → VM reset): cool-downs, rate limits, one alert, never a loop. Pure.
//! - [`qmp`] — QMP client for the signing VM's QEMU: commands, events, USB hot-plug, reconnect.
//! - [`tokens`] — the token service: udev, the VMs' monitors and the tokens' state machines
//!   together, each token's state published for the status API; new `[[tokens]]` from a
//!   reload followed as they come.
//! - [`usb`] — which USB devices on the host are tokens, by serial, and what holds them.
//! - [`handtokening`] — `POST /api/sign` as Handtokening speaks it: query, file name,
//!   `{"detail"}` errors. Pure.
//! - [`policy`] — who is calling (VM, local user, client) and whether the grants let it
//!   use a profile; per-caller job slots. Pure.
//! - [`refusals`] — refusals that cannot flood: audit records coalesced per caller and
//!   reason, wrong client secrets throttled per address. Pure.
//! - [`roles`] — who may call what on the host: operators (root, `signet-admin`),
//!   signers (`signet`), enrolling for root alone. Pure but for the group lookup.
//! - [`private`] — state private whatever the umask (state dir 0700, files 0600), unix
//!   sockets 0660 for root and the signer group.
//! - [`limits`] — an upload's size limit and idle timeout, as it streams.
//! - [`serve`] — the connection loop: HTTP/1.1 with a header timeout, the peer as
//!   `ConnectInfo`.
//! - [`server`] — the HTTP front (`/v1/sign`, `/v1/status`, the Handtokening-compatible
//!   `/api/sign`) on vsock, unix, TCP and TLS.
//! - [`server_ops`] — the operator's HTTP routes (`/v1/operator/...`, local root).
//! - [`tls`] — the TLS acceptor for remote clients.
//! - [`store`] — `state_dir/signet.db` (SQLite, WAL) and the spool: jobs as rows, inputs
//!   and results as fsync'd files.
//! - [`queue`] — pure: the per-token queue, callers taking turns, positions, estimates.
//! - [`jobs`] — the job path: record, spool, queue, the token's worker, results.
//! - [`audit`] — the hash-chained audit log, `signetd audit verify|export`.
//! - [`supervise`] — the daemon's long-lived tasks, named; the first that panics or
//!   ends before the stop stops the daemon with exit status 1, for systemd to restart.
//! - [`web`] — the web UI (overview, queue, audit) for browsers, behind the Proxmox VE
//!   login.

pub mod agent_watch;
pub mod audit;
pub mod clients;
pub mod config;
pub mod daemon;
pub mod dbus;
pub mod doctor;
pub mod enroll_config;
pub mod handtokening;
pub mod head;
pub mod jobs;
pub mod life;
pub use signet_protocol::limits;
pub mod operate;
pub mod ops;
pub mod passthrough;
pub mod policy;
pub mod private;
pub mod proxmox;
pub mod qmp;
pub mod queue;
pub mod recovery;
pub mod refusals;
pub mod reload;
pub mod roles;
pub use signet_protocol::serve;
pub mod server;
pub mod server_ops;
pub mod shutdown;
pub mod store;
pub mod supervise;
pub mod timeline;
pub mod tls;
pub mod tokens;
pub mod usb;
pub mod web;
