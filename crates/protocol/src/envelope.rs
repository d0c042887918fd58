//! What travels through the broker from gatekeeper to worker.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{JobId, Priority, Sequence};

/// One accepted job, as the gatekeeper publishes it (the AMQP message body).
///
/// `client` is the identity the gatekeeper authenticated; the worker acts on it and on
/// nothing the client claimed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobEnvelope {
    pub id: JobId,
    pub kind: String,
    pub client: String,
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<Sequence>,
    pub payload: Value,
    /// Unix time in milliseconds when the gatekeeper accepted the job.
    pub submitted_at_ms: u64,
}

/// A query from the gatekeeper to the worker over the control queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// The status of `id`, answered only if `client` owns it.
    Status { id: JobId, client: String },
}
