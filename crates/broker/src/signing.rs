//! Provenance of messages from the gatekeeper, carried as headers: the id of the key that
//! signed the sender's session, the session itself, and an HMAC of the exact body under the
//! session (see `gatehouse_protocol::crypto::Session`). Whoever can publish to the broker
//! cannot forge or alter a job without the gatekeeper's session keys.

use gatehouse_protocol::Provenance;
use gatehouse_protocol::crypto::{CryptoError, Session};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, LongString};

use crate::topology::headers;

/// `props` with the provenance of `body`, sent in `session`.
pub fn signed(props: BasicProperties, session: &Session, body: &[u8]) -> BasicProperties {
    let provenance =
        Provenance { key_id: session.key_id().to_owned(), session: session.header(), mac: session.mac(body) };
    with_provenance(props, provenance)
}

/// The provenance headers of a message, to keep with a stored copy.
pub fn provenance_of(props: &BasicProperties) -> Option<Provenance> {
    Some(Provenance {
        key_id: header(props, headers::KEY_ID)?,
        session: header(props, headers::SESSION)?,
        mac: header(props, headers::MAC)?,
    })
}

/// `props` carrying a provenance kept by [`provenance_of`].
pub fn with_provenance(props: BasicProperties, p: Provenance) -> BasicProperties {
    let mut h = props.headers().clone().unwrap_or_default();
    for (name, value) in [(headers::KEY_ID, p.key_id), (headers::SESSION, p.session), (headers::MAC, p.mac)] {
        h.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    }
    props.with_headers(h)
}

fn header(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// Checks the provenance of a message: `session` resolves the (key id, session header) to a
/// verified session — typically from a cache, since a session carries many messages — and
/// the body's MAC must check under it. Answers the session, which opens the payload.
///
/// # Errors
/// [`CryptoError::BadSignature`] when the headers are missing or the MAC does not check;
/// whatever `session` answers for a session it cannot verify.
pub fn verify<S>(
    props: &BasicProperties,
    body: &[u8],
    session: impl FnOnce(&str, &str) -> Result<S, CryptoError>,
) -> Result<S, CryptoError>
where
    S: AsRef<Session>,
{
    let p = provenance_of(props).ok_or(CryptoError::BadSignature)?;
    let s = session(&p.key_id, &p.session)?;
    s.as_ref().check_mac(body, &p.mac)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use gatehouse_protocol::crypto::{OpeningKey, SigningKey, Verifier};

    use super::*;

    #[test]
    fn signed_properties_verify_and_tampering_does_not() {
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let verifier = Verifier::new([key.public_key()]).unwrap();
        let worker = OpeningKey::from_bytes(&OpeningKey::generate().unwrap()).unwrap();
        let session = Session::start(&key, &worker.public_key(), 1).unwrap();
        let accept = |id: &str, h: &str| Session::accept(&verifier, id, h, &worker).map(Box::new);
        let props = signed(BasicProperties::default(), &session, b"body");
        assert!(verify(&props, b"body", accept).is_ok());
        assert_eq!(verify(&props, b"b0dy", accept).err(), Some(CryptoError::BadSignature));
        assert_eq!(
            verify(&BasicProperties::default(), b"body", accept).err(),
            Some(CryptoError::BadSignature)
        );
        let kept = with_provenance(BasicProperties::default(), provenance_of(&props).unwrap());
        assert!(verify(&kept, b"body", accept).is_ok());
    }
}
