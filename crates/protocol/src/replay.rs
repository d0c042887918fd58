//! Replays of dead letters are an operator's decision, and only an operator's: a replay
//! carries a *grant* signed by an operator key the worker trusts (`keys.operator_keys` in its
//! settings), bound to the exact message body and to the time it was issued. A grant does not
//! outlive the dead letter it was made for: the worker honours it only for a job dead-lettered
//! *before* the grant was issued, so a captured replay cannot re-run the job once it has been
//! dead-lettered again, and only within [`GRANT_MAX_AGE_MS`].
//!
//! Format (the `x-gatehouse-replay` header): `<key id>.<issued at, unix ms>.<signature hex>`,
//! the Ed25519 signature over `"gatehouse replay v1\0" ‖ issued at (8 bytes BE) ‖
//! SHA-256(body)`.

use ring::digest;

use crate::crypto::{CryptoError, SigningKey, Verifier};
use crate::hex;

/// How long a grant stays valid after it was issued (a replay may wait behind a backlog).
pub const GRANT_MAX_AGE_MS: u64 = 24 * 60 * 60 * 1000;

/// How far in the future an issue time may be (clock skew between operator and worker).
const MAX_SKEW_MS: u64 = 5 * 60 * 1000;

fn statement(issued_at_ms: u64, body: &[u8]) -> Vec<u8> {
    [
        b"gatehouse replay v1\0".as_slice(),
        &issued_at_ms.to_be_bytes(),
        digest::digest(&digest::SHA256, body).as_ref(),
    ]
    .concat()
}

/// A grant to replay the message `body`, issued now by `operator`.
pub fn grant(operator: &SigningKey, body: &[u8], issued_at_ms: u64) -> String {
    let signature = operator.sign(&statement(issued_at_ms, body));
    format!("{}.{issued_at_ms}.{}", operator.id(), hex::encode(&signature))
}

/// Checks a grant for `body` at `now_ms`; answers when it was issued.
///
/// # Errors
/// [`CryptoError::Malformed`], [`CryptoError::UnknownKey`] (no operator key of that id is
/// trusted), [`CryptoError::BadSignature`] (another body, or forged), or
/// [`CryptoError::Stale`] (older than [`GRANT_MAX_AGE_MS`], or from the future).
pub fn verify(operators: &Verifier, grant: &str, body: &[u8], now_ms: u64) -> Result<u64, CryptoError> {
    let mut parts = grant.split('.');
    let (Some(key_id), Some(issued), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(CryptoError::Malformed);
    };
    let issued_at_ms: u64 = issued.parse().map_err(|_| CryptoError::Malformed)?;
    let signature = hex::decode(sig).ok_or(CryptoError::Malformed)?;
    operators.verify(key_id, &statement(issued_at_ms, body), &signature)?;
    if issued_at_ms > now_ms + MAX_SKEW_MS || now_ms.saturating_sub(issued_at_ms) > GRANT_MAX_AGE_MS {
        return Err(CryptoError::Stale);
    }
    Ok(issued_at_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_is_valid_only_for_its_body_key_and_time() {
        let op = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let trusted = Verifier::new([op.public_key()]).unwrap();
        let g = grant(&op, b"body", 1_000_000);
        assert_eq!(verify(&trusted, &g, b"body", 1_000_500), Ok(1_000_000));
        assert_eq!(verify(&trusted, &g, b"bodY", 1_000_500), Err(CryptoError::BadSignature));
        assert_eq!(verify(&trusted, &g, b"body", 1_000_000 + GRANT_MAX_AGE_MS + 1), Err(CryptoError::Stale));
        let later = g.replacen(".1000000.", ".2000000.", 1);
        assert_eq!(verify(&trusted, &later, b"body", 2_000_000), Err(CryptoError::BadSignature));
        // Anyone else's key, and no key at all.
        let mallory = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let forged = grant(&mallory, b"body", 1_000_000);
        assert!(matches!(verify(&trusted, &forged, b"body", 1_000_500), Err(CryptoError::UnknownKey(_))));
        assert_eq!(verify(&trusted, "true", b"body", 1), Err(CryptoError::Malformed));
        assert!(verify(&Verifier::default(), &g, b"body", 1_000_500).is_err());
    }
}
