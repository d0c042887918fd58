//! The public side: the only process clients can reach.
//!
//! ```text
//! tls (mTLS accept, client identity) → routes (parse, policy, schema) → ids (job id)
//!     → publish (confirmed) → broker ... worker → replies (by correlation_id) → response
//! ```
//!
//! It holds no storage and no storage credentials: status queries travel to the worker over
//! the broker like jobs do.

pub mod admin;
pub mod ids;
pub mod keys;
pub mod link;
pub mod metrics;
pub mod openapi;
pub mod policy;
pub mod problem;
pub mod process;
pub mod replies;
pub mod routes;
pub mod sanitize;
pub mod server;
pub mod settings;
pub mod startup;
pub mod tally;
pub mod tls;

pub use settings::GatekeeperSettings;
pub use startup::Gatekeeper;
