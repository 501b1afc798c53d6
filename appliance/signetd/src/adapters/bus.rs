//! Connections to a D-Bus bus: the system bus, a session bus or an address.

use crate::config::Bus;

/// A connection builder for `bus` (`None` for [`Bus::None`]).
pub fn builder(bus: &Bus) -> Option<zbus::connection::Builder<'static>> {
    Some(match bus {
        Bus::System => zbus::connection::Builder::system(),
        Bus::Session => zbus::connection::Builder::session(),
        Bus::Address(a) => zbus::connection::Builder::address(a.as_str()),
        Bus::None => return None,
    })
}
