//! The trusted side. Consumes the job queues with bounded prefetch, and for each delivery
//! decides in one storage transaction: duplicate? in sequence? then runs the handler, records
//! the outcome, commits, replies to `reply_to`, and only then acks.
//!
//! ```text
//! consumer ──> apply (dedupe, sequence) ──> handlers (registry: vault, ledger, yours) ──> storage
//!     │                                                                     │
//!     └── ack after commit <── reply (reply_to, correlation_id) <───────────┘
//! control ──> status queries from the gatekeeper, answered from storage (owner only)
//! ```

pub mod acks;
pub mod admin;
pub mod apply;
pub mod cancel;
pub mod consumer;
pub mod dashboard;
pub mod delays;
pub mod dispatch;
pub mod gaps;
pub mod handlers;
pub mod job_locks;
pub mod keys;
pub mod leases;
pub mod metrics;
pub mod process;
pub mod progress;
pub mod reply;
pub mod retention;
pub mod schedules;
pub mod settings;
pub mod startup;

pub use settings::WorkerSettings;
pub use startup::Worker;
