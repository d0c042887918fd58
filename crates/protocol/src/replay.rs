//! Replays of dead letters are an operator's decision, and only an operator's: a replay
//! carries a *grant* signed by an operator key the worker trusts (`keys.operator_keys` in its
//! settings), bound to the exact message body, the job id the worker verified, the **dead
//! letter** it is for (the job's dead-letter count, which the worker keeps) and the time it was
//! issued. A grant does not outlive its dead letter: once the job is dead-lettered again, the
//! count has moved on and the grant is refused, whatever the clocks say; and only within
//! [`GRANT_MAX_AGE_MS`], with an issue time at most [`MAX_SKEW_MS`] ahead of the worker's clock.
//!
//! Format (the `x-gatehouse-replay` header): `<key id>.<issued at, unix ms>.<dead count>.<signature hex>`,
//! the Ed25519 signature over `"gatehouse replay v2\0" ‖ issued at (8 bytes BE) ‖ dead count
//! (4 bytes BE) ‖ job id ‖ "\0" ‖ SHA-256(body)`.

use ring::digest;

use crate::crypto::{CryptoError, SigningKey, Verifier};
use crate::hex;

/// How long a grant stays valid after it was issued (a replay may wait behind a backlog).
pub const GRANT_MAX_AGE_MS: u64 = 24 * 60 * 60 * 1000;

/// How far in the future an issue time may be (clock skew between operator and worker).
pub const MAX_SKEW_MS: u64 = 60 * 1000;

/// The dead letter a grant is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// When the operator issued it (unix ms).
    pub issued_at_ms: u64,
    /// The job's dead-letter count when its dead letter was published.
    pub dead_count: u32,
}

fn statement(grant: Grant, job_id: &str, body: &[u8]) -> Vec<u8> {
    [
        b"gatehouse replay v2\0".as_slice(),
        &grant.issued_at_ms.to_be_bytes(),
        &grant.dead_count.to_be_bytes(),
        job_id.as_bytes(),
        b"\0",
        digest::digest(&digest::SHA256, body).as_ref(),
    ]
    .concat()
}

/// A grant to replay the message `body` of job `job_id`, dead-lettered for the `dead_count`th
/// time, issued at `issued_at_ms` by `operator`.
pub fn grant(operator: &SigningKey, job_id: &str, dead_count: u32, body: &[u8], issued_at_ms: u64) -> String {
    let g = Grant { issued_at_ms, dead_count };
    let signature = operator.sign(&statement(g, job_id, body));
    format!("{}.{issued_at_ms}.{dead_count}.{}", operator.id(), hex::encode(&signature))
}

/// Checks a grant for `body` of job `job_id` (the id the worker verified) at `now_ms`; answers
/// the dead letter it is for.
///
/// # Errors
/// [`CryptoError::Malformed`], [`CryptoError::UnknownKey`] (no operator key of that id is
/// trusted), [`CryptoError::BadSignature`] (another body or job, or forged), or
/// [`CryptoError::Stale`] (older than [`GRANT_MAX_AGE_MS`], or from the future).
pub fn verify(
    operators: &Verifier,
    grant: &str,
    job_id: &str,
    body: &[u8],
    now_ms: u64,
) -> Result<Grant, CryptoError> {
    let mut parts = grant.split('.');
    let (Some(key_id), Some(issued), Some(count), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(CryptoError::Malformed);
    };
    let issued_at_ms: u64 = issued.parse().map_err(|_| CryptoError::Malformed)?;
    let dead_count: u32 = count.parse().map_err(|_| CryptoError::Malformed)?;
    let signature = hex::decode(sig).ok_or(CryptoError::Malformed)?;
    let g = Grant { issued_at_ms, dead_count };
    operators.verify(key_id, &statement(g, job_id, body), &signature)?;
    if issued_at_ms > now_ms + MAX_SKEW_MS || now_ms.saturating_sub(issued_at_ms) > GRANT_MAX_AGE_MS {
        return Err(CryptoError::Stale);
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_is_valid_only_for_its_body_job_dead_letter_key_and_time() {
        let op = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let trusted = Verifier::new([op.public_key()]).unwrap();
        let g = grant(&op, "job-a", 1, b"body", 1_000_000);
        let ok = Grant { issued_at_ms: 1_000_000, dead_count: 1 };
        assert_eq!(verify(&trusted, &g, "job-a", b"body", 1_000_500), Ok(ok));
        assert_eq!(verify(&trusted, &g, "job-a", b"bodY", 1_000_500), Err(CryptoError::BadSignature));
        assert_eq!(verify(&trusted, &g, "job-b", b"body", 1_000_500), Err(CryptoError::BadSignature));
        let recounted = g.replacen(".1000000.1.", ".1000000.2.", 1);
        assert_eq!(verify(&trusted, &recounted, "job-a", b"body", 1_000_500), Err(CryptoError::BadSignature));
        assert_eq!(
            verify(&trusted, &g, "job-a", b"body", 1_000_000 + GRANT_MAX_AGE_MS + 1),
            Err(CryptoError::Stale)
        );
        // Issued further ahead of the worker's clock than the skew allows.
        assert_eq!(
            verify(&trusted, &g, "job-a", b"body", 1_000_000 - MAX_SKEW_MS - 1),
            Err(CryptoError::Stale)
        );
        let later = g.replacen(".1000000.", ".2000000.", 1);
        assert_eq!(verify(&trusted, &later, "job-a", b"body", 2_000_000), Err(CryptoError::BadSignature));
        // Anyone else's key, and no key at all.
        let mallory = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let forged = grant(&mallory, "job-a", 1, b"body", 1_000_000);
        assert!(matches!(
            verify(&trusted, &forged, "job-a", b"body", 1_000_500),
            Err(CryptoError::UnknownKey(_))
        ));
        assert_eq!(verify(&trusted, "true", "job-a", b"body", 1), Err(CryptoError::Malformed));
        assert!(verify(&Verifier::default(), &g, "job-a", b"body", 1_000_500).is_err());
    }
}
