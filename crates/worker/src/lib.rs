//! The trusted side. Consumes the job queues with bounded prefetch, and for each delivery
//! decides in one storage transaction: duplicate? in sequence? then runs the handler, records
//! the outcome, commits, replies to `reply_to`, and only then acks.
//!
//! ```text
//! broker ──> delivery (check, isolate, lease) ──> decide (dedupe, sequence, verdict) ──> storage
//!               │          │                            │
//!               │          └── handlers (vault, ledger, executables, yours)
//!               └── settle: ack / requeue / hand off <── outbound (reply, retry, dead letter)
//! sweep (delayed, leases, gaps, retention, schedules) ──> outbound, storage
//! admin (/healthz, /readyz, /metrics, dashboard) <── metrics counted everywhere
//! ```
//!
//! How a delivery flows, function by function: `docs/delivery-flow.md`.
//!
//! # Layers
//!
//! Each top-level module imports only the modules its row names (through `crate::` paths;
//! [`startup`] wires everything). The `layers` test reads this table and the sources and
//! fails on any other import, so the modules stay a DAG.
//!
//! <!-- layers -->
//! | module | may import |
//! |---|---|
//! | `settings` | |
//! | `reasons` | |
//! | `security` | settings, reasons |
//! | `handlers` | settings |
//! | `decide` | handlers, security, reasons |
//! | `admin` | reasons |
//! | `outbound` | decide, handlers, security, admin, reasons |
//! | `delivery` | outbound, decide, handlers, security, admin, settings, reasons |
//! | `sweep` | outbound, decide, security, admin, settings, reasons |
//! | `startup` | delivery, sweep, outbound, decide, handlers, security, admin, settings, reasons |
//! <!-- /layers -->

pub mod admin;
pub mod decide;
pub mod delivery;
pub mod handlers;
pub mod outbound;
pub mod reasons;
pub mod security;
pub mod settings;
pub mod startup;
pub mod sweep;

pub use settings::WorkerSettings;
pub use startup::{Worker, WorkerBuilder, process};
