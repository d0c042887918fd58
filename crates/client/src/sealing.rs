//! Fields the client seals itself ([`gatehouse_protocol::fields`]): to a worker key that the
//! operator certified — checked against the operator's public key the client pins, never
//! taken on the gatekeeper's word.

use std::path::Path;

use gatehouse_protocol::fields::{self, FieldAad};
use gatehouse_protocol::keyset::SignedKeySet;
use serde_json::Value;

use crate::{ClientError, Connection, Method};

/// Seals a client's fields to one certified worker key.
#[derive(Debug, Clone)]
pub struct Sealer {
    key: [u8; 32],
    key_id: String,
    client: String,
}

fn sealing(reason: impl ToString) -> ClientError {
    ClientError::Seal(reason.to_string())
}

/// The identity the gatekeeper knows a client by: its certificate's one subject CN.
///
/// # Errors
/// When the file is not a PEM certificate with exactly one CN.
pub fn client_name(cert: &Path) -> Result<String, ClientError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = crate::load_certs(cert)?.into_iter().next().ok_or_else(|| sealing("no certificate"))?;
    let (_, parsed) = X509Certificate::from_der(der.as_ref()).map_err(sealing)?;
    let mut cns = parsed.subject().iter_common_name();
    match (cns.next().and_then(|cn| cn.as_str().ok()), cns.next()) {
        (Some(cn), None) => Ok(cn.to_owned()),
        _ => Err(sealing(format!("{}: not exactly one subject CN", cert.display()))),
    }
}

impl Sealer {
    /// A sealer for `client` to the key of `set` that is valid now, if `operator` (the pinned
    /// operator public key, raw Ed25519) signed the set.
    ///
    /// # Errors
    /// [`ClientError::Seal`] when the set is not signed by that key, or no key is valid now.
    pub fn new(set: &SignedKeySet, operator: &[u8], client: &str) -> Result<Self, ClientError> {
        let now = u64::try_from(gatehouse_protocol::clock::now_ms()).unwrap_or(0);
        let (key, key_id) = set
            .current(operator, now)
            .map_err(|e| sealing(format!("the worker key set is not one the operator certified: {e}")))?;
        Ok(Self { key, key_id, client: client.to_owned() })
    }

    /// The id of the worker key it seals to.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Seals, in the submit body `job`, each field of the payload at `paths` (the kind's
    /// sealed fields, [`gatehouse_protocol::schemas::Schemas::sealed`]) that is present and not
    /// sealed yet. The fields are bound to the job's idempotency key: one is added when `job`
    /// has none.
    ///
    /// # Errors
    /// When `job` has no `kind`, or without system randomness.
    pub fn seal(&self, job: &mut Value, paths: &[String]) -> Result<(), ClientError> {
        let kind = job["kind"].as_str().ok_or_else(|| sealing("the job has no kind"))?.to_owned();
        if paths.iter().all(|p| job["payload"].pointer(p).is_none()) {
            return Ok(());
        }
        if !job["idempotency_key"].is_string() {
            job["idempotency_key"] = Value::String(fields::random_key().map_err(sealing)?);
        }
        let key = job["idempotency_key"].as_str().unwrap_or_default().to_owned();
        for path in paths {
            let Some(field) = job["payload"].pointer_mut(path) else { continue };
            if field.as_str().is_some_and(fields::well_formed) {
                continue;
            }
            let aad = FieldAad { client: &self.client, kind: &kind, path, idempotency_key: &key };
            *field = Value::String(fields::seal(&self.key, &aad, field).map_err(sealing)?);
        }
        Ok(())
    }
}

impl Connection {
    /// `GET /v1/keys`: the worker key set as the gatekeeper serves it (check it with
    /// [`Sealer::new`]).
    ///
    /// # Errors
    /// When the request fails or the answer is not a key set.
    pub async fn worker_keys(&mut self) -> Result<SignedKeySet, ClientError> {
        let res = self.request(Method::GET, "/v1/keys", &[], Vec::new()).await?;
        if res.status != 200 {
            return Err(sealing(format!("GET /v1/keys answered {}: {}", res.status, res.text())));
        }
        serde_json::from_slice(&res.body).map_err(|e| sealing(format!("GET /v1/keys: {e}")))
    }

    /// A [`Sealer`] for `client` to the worker key the gatekeeper serves, checked against the
    /// pinned operator key `operator`.
    ///
    /// # Errors
    /// As [`Connection::worker_keys`] and [`Sealer::new`].
    pub async fn sealer(&mut self, operator: &[u8], client: &str) -> Result<Sealer, ClientError> {
        let set = self.worker_keys().await?;
        Sealer::new(&set, operator, client)
    }
}
