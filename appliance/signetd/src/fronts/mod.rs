//! The doors callers use: HTTP (the client API, Handtokening's, the operator's
//! routes), D-Bus for `signetctl`, the web UI, Prometheus' `/metrics`. Each parses,
//! calls a service and renders.

pub mod dbus;
pub mod http;
pub mod metrics;
pub mod web;
