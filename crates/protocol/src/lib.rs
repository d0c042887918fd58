//! The words gatekeeper and worker share: what a client submits, what travels through the
//! broker, what comes back, and the job catalog both sides read.
//!
//! Nothing here does network or storage I/O. Values that cross a trust boundary are parsed into
//! types with private fields (`JobId`, `Priority`, `Sequence`), so code behind the gatekeeper
//! cannot hold an unchecked one.

pub mod batch;
pub mod catalog;
pub mod clock;
pub mod crypto;
pub mod envelope;
pub mod fields;
pub mod hex;
pub mod hosts;
pub mod ids;
pub mod keys;
pub mod keyset;
pub mod listing;
pub mod pem;
pub mod replay;
pub mod schemas;
pub mod settings;
pub mod status;
pub mod submit;
pub mod trace;

pub use catalog::{Catalog, KindSpec};
pub use envelope::{ControlRequest, JobEnvelope, ReplyTo, SealedJob, SealedReply, Vouched};
pub use ids::JobId;
pub use status::{JobEvent, JobState, JobStatus, Progress};
pub use submit::{Priority, Sequence, SubmitRequest};
