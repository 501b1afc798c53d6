//! Who is calling: the transport's word (vsock CID as a VM, a unix socket's user and
//! groups, a TCP address), or over TLS a remote client's HTTP Basic credentials checked
//! against the client database, wrong secrets throttled per source address.

use std::sync::{Arc, Mutex, OnceLock};

use signet_protocol::transport::Peer;

use crate::config::{Config, Current};
use crate::core::policy::Caller;
use crate::core::refusals::Throttle;
use crate::services::errors::AuthError;

/// The callers' door: identification and authentication.
#[derive(Debug)]
pub struct Callers {
    config: Arc<Current>,
    /// The client database, when remote clients are served (`[tls]`).
    clients: OnceLock<Mutex<rusqlite::Connection>>,
    /// Wrong client secrets per source address.
    throttle: Mutex<Throttle>,
}

impl Callers {
    pub fn new(config: Arc<Current>) -> Self {
        let per_minute = config.get().limits.auth_failures_per_minute;
        Callers {
            config,
            clients: OnceLock::new(),
            throttle: Mutex::new(Throttle::new(per_minute)),
        }
    }

    /// Checks remote clients against `conn` from now on ([`crate::adapters::clients`]).
    pub fn use_clients(&self, conn: rusqlite::Connection) {
        if self.clients.set(Mutex::new(conn)).is_err() {
            tracing::warn!("the client database was opened twice; the first one stays in use");
        }
    }

    fn config(&self) -> Arc<Config> {
        self.config.get()
    }

    fn throttle(&self) -> std::sync::MutexGuard<'_, Throttle> {
        self.throttle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a reloaded `[limits] auth_failures_per_minute`.
    pub fn set_per_minute(&self, per_minute: u32) {
        self.throttle().set_per_minute(per_minute);
    }

    /// How long a throttled address waits at most for its next try, in seconds (the
    /// `Retry-After` of `too_many_attempts`).
    pub fn retry_after_seconds(&self) -> u64 {
        60_u64.div_ceil(u64::from(
            self.config().limits.auth_failures_per_minute.max(1),
        ))
    }

    /// The audit log's name for a caller: who it proved to be, else what the transport
    /// saw (only credentials over TLS can fail, and there the peer is a TCP address).
    pub fn audit_name<E>(&self, caller: &Result<Caller, E>, peer: &Peer) -> String {
        match (caller, peer) {
            (Ok(c), _) => c.key(),
            (Err(_), Peer::Tcp { addr }) => Caller::Anonymous {
                addr: addr.to_string(),
            }
            .key(),
            (Err(_), other) => self.identify(other).key(),
        }
    }

    /// Who is calling: over TLS the client named by HTTP Basic credentials
    /// (`authorization`), which must be valid; otherwise what the transport vouches
    /// for ([`Callers::identify`]).
    pub fn authenticate(
        &self,
        peer: &Peer,
        over_tls: bool,
        authorization: Option<&str>,
    ) -> Result<Caller, AuthError> {
        if !over_tls {
            return Ok(self.identify(peer));
        }
        let Some((name, secret)) = authorization.and_then(crate::adapters::clients::parse_basic)
        else {
            return Err(AuthError::NoCredentials);
        };
        let source = match peer {
            Peer::Tcp { addr } => Some(addr.ip()),
            _ => None,
        };
        if let Some(ip) = source {
            let now = std::time::Instant::now();
            if let Err(wait) = self.throttle().check(ip, now) {
                return Err(AuthError::Throttled { ip, wait });
            }
        }
        let Some(db) = self.clients.get() else {
            return Err(AuthError::NoClientDatabase);
        };
        let now = crate::adapters::store::unix_now();
        let checked = {
            let conn = db.lock().unwrap_or_else(|e| e.into_inner());
            crate::adapters::clients::authenticate(&conn, &name, &secret, now)
        };
        match checked {
            Ok(Ok(granted)) => Ok(Caller::Client { name, granted }),
            Ok(Err(why)) => {
                if let Some(ip) = source {
                    self.throttle().failed(ip, std::time::Instant::now());
                }
                // Which of unknown / wrong / expired it was is for the log only; the
                // front records the refusal in the audit log (`JobService::refuse`).
                tracing::warn!(%peer, client = %name, reason = %why, "refused client credentials");
                Err(AuthError::Invalid { name })
            }
            Err(e) => {
                tracing::error!(error = %e, "client database");
                Err(AuthError::Database)
            }
        }
    }

    /// Who is calling, as far as the connection's transport vouches for it.
    pub fn identify(&self, peer: &Peer) -> Caller {
        match peer {
            Peer::Vsock { cid, .. } => Caller::of_vsock(&self.config().cid_to_vmid, *cid),
            // Its groups as the kernel recorded them when it connected: not read from
            // /proc/PID at the request, where the pid may name another process by then.
            Peer::Unix {
                uid, gid, groups, ..
            } => Caller::Local {
                uid: *uid,
                gid: *gid,
                groups: groups.clone(),
            },
            Peer::Tcp { addr } => match &self.config().insecure_tcp_as {
                Some(name) => Caller::Client {
                    name: name.clone(),
                    granted: Vec::new(),
                },
                None => Caller::Anonymous {
                    addr: addr.to_string(),
                },
            },
        }
    }
}
