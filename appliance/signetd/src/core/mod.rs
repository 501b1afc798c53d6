//! Pure rules and state machines: no I/O, no clock of their own, nothing above them.
//! Each answers an event with what to do; the services perform it.

pub mod alerts;
pub mod life;
pub mod passthrough;
pub mod policy;
pub mod queue;
pub mod recovery;
pub mod refusals;
pub mod roles;
pub mod time;
pub mod timeline;
