//! The D-Bus front: the daemon's core commands on the system bus, for `signetctl` and
//! other host tools. Like the HTTP front it holds no logic: each method calls a
//! [`Daemon`] command and returns its result type as JSON, the same JSON the HTTP API
//! gives, so every front renders the same types.
//!
//! Well-known name [`BUS_NAME`], object [`OBJECT_PATH`], interface [`INTERFACE`] (the
//! version is in the names). Who may call what is the bus's policy:
//! `packaging/dbus/org.signet.Signet1.conf`.

use std::sync::Arc;

use crate::daemon::Daemon;

/// The daemon's well-known name on the bus.
pub const BUS_NAME: &str = "org.signet.Signet1";
/// The object that carries [`INTERFACE`].
pub const OBJECT_PATH: &str = "/org/signet/Signet1";
/// The interface: status now; control methods and signals join it.
pub const INTERFACE: &str = "org.signet.Signet1.Manager";

/// Which bus the daemon serves on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bus {
    System,
    Session,
    /// A D-Bus address, e.g. `unix:path=/run/test/bus.sock`.
    Address(String),
    None,
}

impl std::str::FromStr for Bus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "system" => Bus::System,
            "session" => Bus::Session,
            "none" | "" => Bus::None,
            a if a.contains(':') && a.contains('=') => Bus::Address(a.to_owned()),
            other => {
                return Err(format!(
                    "{other:?} is not a bus: write \"system\", \"session\", \"none\" or a D-Bus address such as \"unix:path=/run/dbus/system_bus_socket\""
                ))
            }
        })
    }
}

impl std::fmt::Display for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bus::System => f.write_str("system bus"),
            Bus::Session => f.write_str("session bus"),
            Bus::Address(a) => write!(f, "bus {a}"),
            Bus::None => f.write_str("no bus"),
        }
    }
}

/// A connection builder for `bus` (`None` for [`Bus::None`]).
pub fn builder(bus: &Bus) -> Option<zbus::connection::Builder<'static>> {
    Some(match bus {
        Bus::System => zbus::connection::Builder::system(),
        Bus::Session => zbus::connection::Builder::session(),
        Bus::Address(a) => zbus::connection::Builder::address(a.as_str()),
        Bus::None => return None,
    })
}

/// The object served at [`OBJECT_PATH`].
#[derive(Debug)]
pub struct Manager {
    daemon: Arc<Daemon>,
}

#[zbus::interface(name = "org.signet.Signet1.Manager")]
impl Manager {
    /// The appliance's status as JSON: the `DaemonStatus` of `GET /v1/status`.
    async fn status(&self) -> String {
        serde_json::to_string(&self.daemon.status().await).unwrap_or_default()
    }

    /// The daemon's version.
    #[zbus(property)]
    async fn version(&self) -> String {
        signet_protocol::VERSION.to_owned()
    }
}

/// Serves the daemon on `bus` under [`BUS_NAME`]; the connection lives as long as the
/// returned value. `Ok(None)` when the bus is [`Bus::None`].
pub async fn serve(daemon: Arc<Daemon>, bus: &Bus) -> zbus::Result<Option<zbus::Connection>> {
    let Some(builder) = builder(bus) else {
        return Ok(None);
    };
    let conn = builder
        .name(BUS_NAME)
        .serve_at(OBJECT_PATH, Manager { daemon })
        .build()
        .await?;
    Ok(Some(conn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_choices_parse_and_explain_themselves() {
        assert_eq!("system".parse::<Bus>(), Ok(Bus::System));
        assert_eq!("none".parse::<Bus>(), Ok(Bus::None));
        assert_eq!(
            "unix:path=/tmp/b.sock".parse::<Bus>(),
            Ok(Bus::Address("unix:path=/tmp/b.sock".into()))
        );
        let err = "sytem".parse::<Bus>().unwrap_err();
        assert!(err.contains("\"sytem\"") && err.contains("system"), "{err}");
    }
}
