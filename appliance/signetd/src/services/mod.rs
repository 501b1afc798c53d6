//! The use cases: the job path, the token service, the agent's view, the operator's
//! actions and reads, the host checks, the metrics, the daemon's tasks and its stop.
//! Fronts call these and nothing below them.

pub mod agent;
pub mod agent_watch;
pub mod alerts;
pub mod callers;
pub mod daemon;
pub mod doctor;
pub mod errors;
pub mod jobs;
pub mod metrics;
pub mod operate;
pub mod ops;
pub mod reads;
pub mod scrape;
pub mod shutdown;
pub mod supervise;
pub mod timeline;
pub mod tokens;
