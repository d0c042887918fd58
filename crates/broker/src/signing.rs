//! Signatures on messages: the signer's key id and an Ed25519 signature over the exact body,
//! carried as headers. Whoever can publish to the broker cannot forge a job or a reply
//! without the signing key.

use gatehouse_protocol::crypto::{CryptoError, SigningKey, Verifier};
use gatehouse_protocol::hex;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, LongString};

use crate::topology::headers;

/// `props` with the signature of `body` added.
pub fn signed(props: BasicProperties, key: &SigningKey, body: &[u8]) -> BasicProperties {
    let mut h = props.headers().clone().unwrap_or_default();
    h.insert(headers::KEY_ID.into(), AMQPValue::LongString(LongString::from(key.id())));
    h.insert(
        headers::SIGNATURE.into(),
        AMQPValue::LongString(LongString::from(hex::encode(&key.sign(body)))),
    );
    props.with_headers(h)
}

/// The signature headers of a message, (key id, signature hex), to keep with a stored copy.
pub fn signature_of(props: &BasicProperties) -> Option<(String, String)> {
    Some((header(props, headers::KEY_ID)?, header(props, headers::SIGNATURE)?))
}

/// `props` carrying a signature kept by [`signature_of`].
pub fn with_signature(props: BasicProperties, (key_id, signature): (String, String)) -> BasicProperties {
    let mut h = props.headers().clone().unwrap_or_default();
    h.insert(headers::KEY_ID.into(), AMQPValue::LongString(LongString::from(key_id)));
    h.insert(headers::SIGNATURE.into(), AMQPValue::LongString(LongString::from(signature)));
    props.with_headers(h)
}

fn header(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// Checks the signature headers of a message against `body`.
///
/// # Errors
/// [`CryptoError::BadSignature`] when the headers are missing or malformed or the signature
/// does not verify; [`CryptoError::UnknownKey`] for a key the verifier does not trust.
pub fn verify(props: &BasicProperties, body: &[u8], verifier: &Verifier) -> Result<(), CryptoError> {
    let key_id = header(props, headers::KEY_ID).ok_or(CryptoError::BadSignature)?;
    let signature =
        header(props, headers::SIGNATURE).and_then(|s| hex::decode(&s)).ok_or(CryptoError::BadSignature)?;
    verifier.verify(&key_id, body, &signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_properties_verify_and_tampering_does_not() {
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let verifier = Verifier::new([key.public_key()]).unwrap();
        let props = signed(BasicProperties::default(), &key, b"body");
        assert_eq!(verify(&props, b"body", &verifier), Ok(()));
        assert_eq!(verify(&props, b"b0dy", &verifier), Err(CryptoError::BadSignature));
        assert_eq!(verify(&BasicProperties::default(), b"body", &verifier), Err(CryptoError::BadSignature));
    }
}
