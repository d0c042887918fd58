//! The worker's public sealing keys as a set an operator certified (Ed25519), which the
//! gatekeeper serves as is at `GET /v1/keys`. A client pins the operator's public key and seals
//! fields ([`crate::fields`]) only to a key of a correctly signed set, inside its validity
//! window: a gatekeeper that swaps in a key of its own cannot make a client seal to it.
//!
//! The set travels as the exact bytes that were signed (`set`, base64url of its JSON), so no
//! canonical form is needed; the signature covers [`DOMAIN`] and those bytes (the operator
//! key also signs replay grants: a signature of one can never pass for the other).
//! Rotation: certify a set with the new key before the old one expires (the worker opens both
//! while both are listed); revocation: leave a key out of the next set.

use serde::{Deserialize, Serialize};

use crate::crypto::{CryptoError, SigningKey, Verifier, b64, key_id, unb64};

/// What the operator's signature covers before the set's bytes.
const DOMAIN: &[u8] = b"gatehouse worker key set v1\0";

/// One worker key and when clients may seal to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerKey {
    /// [`key_id`] of the key (what a sealed value names).
    pub id: String,
    /// The X25519 public key, base64url.
    pub public: String,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

impl WorkerKey {
    /// # Errors
    /// [`CryptoError::BadKey`] when `public` is not 32 bytes.
    pub fn new(public: &[u8], not_before_ms: u64, not_after_ms: u64) -> Result<Self, CryptoError> {
        if public.len() != 32 {
            return Err(CryptoError::BadKey("not 32 bytes"));
        }
        Ok(Self { id: key_id(public), public: b64(public), not_before_ms, not_after_ms })
    }

    /// The public key's bytes.
    ///
    /// # Errors
    /// When the key is malformed or its id is not its own.
    pub fn public_key(&self) -> Result<[u8; 32], CryptoError> {
        let key: [u8; 32] =
            unb64(&self.public).and_then(|k| k.try_into().ok()).ok_or(CryptoError::BadKey("not 32 bytes"))?;
        if key_id(&key) != self.id {
            return Err(CryptoError::BadKey("id does not match the key"));
        }
        Ok(key)
    }

    fn valid_at(&self, now_ms: u64) -> bool {
        self.not_before_ms <= now_ms && now_ms < self.not_after_ms
    }
}

/// A certified set, as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedKeySet {
    /// Base64url of the JSON array of [`WorkerKey`]s that was signed.
    pub set: String,
    /// The id of the operator key that signed.
    pub signed_by: String,
    /// Ed25519 signature, base64url.
    pub signature: String,
}

impl SignedKeySet {
    /// Certifies `keys` with the operator key `signer`.
    ///
    /// # Errors
    /// When `keys` is empty.
    pub fn certify(signer: &SigningKey, keys: &[WorkerKey]) -> Result<Self, CryptoError> {
        if keys.is_empty() {
            return Err(CryptoError::BadKey("an empty key set"));
        }
        let bytes = serde_json::to_vec(keys).map_err(|_| CryptoError::Malformed)?;
        let signature = signer.sign(&[DOMAIN, &bytes].concat());
        Ok(Self { set: b64(&bytes), signed_by: signer.id().to_owned(), signature: b64(&signature) })
    }

    /// The keys, if the set is signed by the pinned operator key `operator` (raw Ed25519).
    ///
    /// # Errors
    /// [`CryptoError::BadSignature`] (or `UnknownKey`) when another key signed it or anything
    /// was altered; `Malformed` when it does not read.
    pub fn verify(&self, operator: &[u8]) -> Result<Vec<WorkerKey>, CryptoError> {
        let bytes = unb64(&self.set).ok_or(CryptoError::Malformed)?;
        let signature = unb64(&self.signature).ok_or(CryptoError::Malformed)?;
        Verifier::new([operator.to_vec()])?.verify(
            &self.signed_by,
            &[DOMAIN, &bytes].concat(),
            &signature,
        )?;
        serde_json::from_slice(&bytes).map_err(|_| CryptoError::Malformed)
    }

    /// The key a client seals to at `now_ms`: of the set's keys valid then, the one valid
    /// since last.
    ///
    /// # Errors
    /// As [`SignedKeySet::verify`]; [`CryptoError::Stale`] when no key is valid now.
    pub fn current(&self, operator: &[u8], now_ms: u64) -> Result<([u8; 32], String), CryptoError> {
        let keys = self.verify(operator)?;
        let key = keys
            .iter()
            .filter(|k| k.valid_at(now_ms))
            .max_by_key(|k| k.not_before_ms)
            .ok_or(CryptoError::Stale)?;
        Ok((key.public_key()?, key.id.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::OpeningKey;

    fn operator() -> SigningKey {
        SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap()
    }

    fn worker_public() -> [u8; 32] {
        OpeningKey::from_bytes(&OpeningKey::generate().unwrap()).unwrap().public_key()
    }

    #[test]
    fn a_client_takes_only_a_key_its_operator_certified_and_that_is_valid_now() {
        let op = operator();
        let (old, new) = (worker_public(), worker_public());
        let set = SignedKeySet::certify(
            &op,
            &[WorkerKey::new(&old, 0, 2_000).unwrap(), WorkerKey::new(&new, 1_000, 3_000).unwrap()],
        )
        .unwrap();
        let pinned = op.public_key();
        assert_eq!(set.current(&pinned, 500).unwrap().0, old);
        assert_eq!(set.current(&pinned, 1_500).unwrap().0, new, "the newer key during the overlap");
        assert_eq!(set.current(&pinned, 3_000), Err(CryptoError::Stale));

        // A gatekeeper that swaps in a key of its own: re-signing needs the operator's key.
        let mine = worker_public();
        let mut swapped = set.clone();
        swapped.set = b64(&serde_json::to_vec(&[WorkerKey::new(&mine, 0, 3_000).unwrap()]).unwrap());
        assert!(swapped.current(&pinned, 500).is_err());
        let forged = SignedKeySet::certify(&operator(), &[WorkerKey::new(&mine, 0, 3_000).unwrap()]).unwrap();
        assert!(forged.current(&pinned, 500).is_err(), "signed by another operator key");
        // A key listed under another key's id.
        let mut lying = WorkerKey::new(&old, 0, 3_000).unwrap();
        lying.public = b64(&mine);
        let lying = SignedKeySet::certify(&op, &[lying]).unwrap();
        assert!(lying.current(&pinned, 500).is_err());
    }
}
