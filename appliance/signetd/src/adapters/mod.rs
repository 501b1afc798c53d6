//! The outside world, one narrow door each: SQLite, the audit chain's files, QEMU's
//! monitor, udev and USB, Proxmox's `qm`, file modes, TLS. They know nothing of jobs
//! or services.

pub mod agent;
pub mod alerts;
pub mod audit;
pub mod bus;
pub mod clients;
pub mod head;
pub mod patched;
pub mod private;
pub mod proxmox;
pub mod qmp;
pub mod queries;
pub mod store;
pub mod tls;
pub mod usb;
