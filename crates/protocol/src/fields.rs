//! Fields a client seals itself, to a worker key an operator certified ([`crate::keyset`]):
//! the gatekeeper carries them, checks that they are well-formed sealed values of bounded size,
//! and never sees what is inside. Only the worker opens them.
//!
//! A kind's schema marks such a property `"x-gatehouse-sealed": true` (any JSON type
//! underneath); [`sealed_paths`] finds them. A sealed value is one string,
//! `ghs1.<key id>.<ephemeral public key>.<nonce>.<ciphertext and tag>` (base64url):
//! HPKE-style, the client makes an ephemeral X25519 key, agrees with the worker's public key,
//! derives an AES-256-GCM key with HKDF-SHA256 (salt [`SALT`], info: both public keys) and
//! seals the field's JSON. The associated data binds the client identity (its certificate's
//! CN), the kind, the field's JSON pointer and the job's idempotency key ([`FieldAad`]): a
//! sealed value copied into another client's job, another kind, another field or another job
//! does not open. Everything here is `ring`'s, except the worker's side of the agreement
//! (`x25519-dalek`, as for sessions: ring has no static X25519 keys).

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::agreement::{self, X25519};
use ring::hkdf;
use serde_json::Value;

use crate::crypto::{CryptoError, OpeningKey, b64, key_id, random, unb64};

/// The schema keyword that marks a property sealed.
pub const MARKER: &str = "x-gatehouse-sealed";

/// What every sealed value starts with (the format's version).
pub const PREFIX: &str = "ghs1.";

/// Longest sealed value the gatekeeper carries (characters).
pub const MAX_SEALED_LEN: usize = 64 * 1024;

/// HKDF salt of the field key.
const SALT: &[u8] = b"gatehouse sealed field v1";

/// What a sealed field is bound to.
#[derive(Debug, Clone, Copy)]
pub struct FieldAad<'a> {
    /// The client identity: its certificate's subject CN.
    pub client: &'a str,
    pub kind: &'a str,
    /// The field's JSON pointer in the payload (`/record`).
    pub path: &'a str,
    /// The job's idempotency key (a job with sealed fields must have one).
    pub idempotency_key: &'a str,
}

impl FieldAad<'_> {
    fn bytes(&self) -> Vec<u8> {
        ["gatehouse field v1", self.client, self.kind, self.path, self.idempotency_key]
            .join("\0")
            .into_bytes()
    }
}

/// JSON pointers of the properties `schema` marks sealed, through nested `properties` (a
/// sealed property's own insides are not searched: the whole value is sealed).
pub fn sealed_paths(schema: &Value) -> Vec<String> {
    let mut found = Vec::new();
    walk(schema, "", &mut found);
    found
}

fn walk(schema: &Value, at: &str, found: &mut Vec<String>) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else { return };
    for (name, sub) in props {
        let path = format!("{at}/{}", name.replace('~', "~0").replace('/', "~1"));
        if sub.get(MARKER).and_then(Value::as_bool) == Some(true) {
            found.push(path);
        } else {
            walk(sub, &path, found);
        }
    }
}

/// `schema` as the gatekeeper checks it (and the OpenAPI document shows it): each sealed
/// property a string of the form of a sealed value ([`PATTERN`]), everything else as written.
pub fn as_sent(schema: &Value, paths: &[String]) -> Value {
    let mut view = schema.clone();
    for path in paths {
        // `/a/b` in the payload is `/properties/a/properties/b` in the schema (still escaped).
        let in_schema: String = path.split('/').skip(1).map(|part| format!("/properties/{part}")).collect();
        if let Some(at) = view.pointer_mut(&in_schema) {
            *at = serde_json::json!({
                "type": "string",
                "maxLength": MAX_SEALED_LEN,
                "pattern": PATTERN,
                MARKER: true,
                "description": "sealed by the client to a certified worker key (GET /v1/keys)",
            });
        }
    }
    view
}

/// Whether `value` has the form of a sealed value (what the gatekeeper checks, and what the
/// OpenAPI document's [`PATTERN`] says): the prefix, a 16-hex-digit key id, a 32-byte key, a
/// 12-byte nonce and at least a tag's worth of ciphertext, in base64url, of bounded length.
/// Whether it opens only the worker can tell.
pub fn well_formed(value: &str) -> bool {
    let b64 = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let Some(rest) = value.strip_prefix(PREFIX).filter(|_| value.len() <= MAX_SEALED_LEN) else {
        return false;
    };
    let parts: Vec<&str> = rest.split('.').collect();
    let [kid, epk, nonce, ct] = parts[..] else { return false };
    kid.len() == 16
        && kid.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && epk.len() == 43
        && nonce.len() == 16
        && ct.len() >= 22
        && [epk, nonce, ct].into_iter().all(b64)
}

/// [`well_formed`] as a JSON Schema `pattern`.
pub const PATTERN: &str = r"^ghs1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}\.[A-Za-z0-9_-]{16}\.[A-Za-z0-9_-]{22,}$";

struct Parts<'a> {
    kid: &'a str,
    epk: [u8; 32],
    nonce: [u8; 12],
    ct: Vec<u8>,
}

impl<'a> Parts<'a> {
    fn parse(value: &'a str) -> Option<Self> {
        let rest = value.strip_prefix(PREFIX)?;
        let mut it = rest.split('.');
        let (kid, epk, nonce, ct) = (it.next()?, it.next()?, it.next()?, it.next()?);
        if it.next().is_some() || kid.is_empty() || kid.len() > 64 {
            return None;
        }
        let ct = unb64(ct)?;
        (ct.len() >= 16).then_some(())?;
        Some(Self { kid, epk: unb64(epk)?.try_into().ok()?, nonce: unb64(nonce)?.try_into().ok()?, ct })
    }
}

fn field_key(shared: &[u8], epk: &[u8; 32], recipient: &[u8; 32]) -> Result<LessSafeKey, CryptoError> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(shared);
    let info: [&[u8]; 2] = [epk, recipient];
    let okm = prk.expand(&info, &AES_256_GCM).map_err(|_| CryptoError::BadKey("hkdf"))?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

/// Seals `value` to the worker key `recipient` (what a client does).
///
/// # Errors
/// Without system randomness.
pub fn seal(recipient: &[u8; 32], aad: &FieldAad<'_>, value: &Value) -> Result<String, CryptoError> {
    let rng = ring::rand::SystemRandom::new();
    let private = agreement::EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| CryptoError::Random)?;
    let epk: [u8; 32] = private
        .compute_public_key()
        .map_err(|_| CryptoError::Random)?
        .as_ref()
        .try_into()
        .map_err(|_| CryptoError::BadKey("x25519"))?;
    let key =
        agreement::agree_ephemeral(private, &agreement::UnparsedPublicKey::new(&X25519, recipient), |s| {
            field_key(s, &epk, recipient)
        })
        .map_err(|_| CryptoError::BadKey("x25519 public key"))??;
    let nonce: [u8; 12] = random()?;
    let mut data = serde_json::to_vec(value).map_err(|_| CryptoError::Malformed)?;
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad.bytes()), &mut data)
        .map_err(|_| CryptoError::Malformed)?;
    Ok(format!("{PREFIX}{}.{}.{}.{}", key_id(recipient), b64(&epk), b64(&nonce), b64(&data)))
}

/// A fresh idempotency key (32 hex digits) for a job whose fields are sealed.
///
/// # Errors
/// Without system randomness.
pub fn random_key() -> Result<String, CryptoError> {
    Ok(crate::hex::encode(&random::<16>()?))
}

/// The worker's keys that open sealed fields: its current sealing key and, during a
/// rotation, the earlier ones still certified.
pub struct FieldOpener {
    keys: Vec<(String, OpeningKey)>,
}

impl FieldOpener {
    pub fn new(keys: Vec<OpeningKey>) -> Self {
        Self { keys: keys.into_iter().map(|k| (key_id(&k.public_key()), k)).collect() }
    }

    /// Opens the sealed value `value` bound to `aad`.
    ///
    /// # Errors
    /// [`CryptoError::Malformed`] when it is not a sealed value, [`CryptoError::UnknownKey`]
    /// when sealed to a key this worker does not hold, [`CryptoError::Open`] when it was sealed
    /// for another client, kind, field or job, or altered.
    pub fn open(&self, value: &str, aad: &FieldAad<'_>) -> Result<Value, CryptoError> {
        let parts = Parts::parse(value).ok_or(CryptoError::Malformed)?;
        let (_, key) = self
            .keys
            .iter()
            .find(|(id, _)| id == parts.kid)
            .ok_or_else(|| CryptoError::UnknownKey(parts.kid.to_owned()))?;
        let shared = key.agree(&parts.epk);
        if shared == [0u8; 32] {
            return Err(CryptoError::BadKey("x25519 public key of low order"));
        }
        let sealing = field_key(&shared, &parts.epk, &key.public_key())?;
        let mut data = parts.ct;
        let plain = sealing
            .open_in_place(Nonce::assume_unique_for_key(parts.nonce), Aad::from(aad.bytes()), &mut data)
            .map_err(|_| CryptoError::Open)?;
        serde_json::from_slice(plain).map_err(|_| CryptoError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn worker() -> OpeningKey {
        OpeningKey::from_bytes(&OpeningKey::generate().unwrap()).unwrap()
    }

    const AAD: FieldAad<'static> =
        FieldAad { client: "dev-client", kind: "vault.put_sealed", path: "/record", idempotency_key: "k-1" };

    #[test]
    fn a_sealed_field_opens_only_where_it_was_sealed_for() {
        let key = worker();
        let value = json!({"ssn": "078-05-1120"});
        let sealed = seal(&key.public_key(), &AAD, &value).unwrap();
        assert!(well_formed(&sealed) && !sealed.contains("078-05"), "{sealed}");
        let opener = FieldOpener::new(vec![key]);
        assert_eq!(opener.open(&sealed, &AAD).unwrap(), value);
        for moved in [
            FieldAad { client: "other", ..AAD },
            FieldAad { kind: "vault.put", ..AAD },
            FieldAad { path: "/note", ..AAD },
            FieldAad { idempotency_key: "k-2", ..AAD },
        ] {
            assert_eq!(opener.open(&sealed, &moved), Err(CryptoError::Open), "{moved:?}");
        }
        let mut altered = sealed.clone().into_bytes();
        let last = altered.len() - 3;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        assert!(opener.open(std::str::from_utf8(&altered).unwrap(), &AAD).is_err());
        assert!(matches!(
            FieldOpener::new(vec![worker()]).open(&sealed, &AAD),
            Err(CryptoError::UnknownKey(_))
        ));
        assert!(!well_formed("078-05-1120") && !well_formed("ghs1.a.b.c") && !well_formed(&"x".repeat(10)));
        // The form is checked, not whether it decodes: that fails at the worker.
        let odd = format!("ghs1.{}.{}.{}.{}", "0".repeat(16), "D".repeat(43), "A".repeat(16), "D".repeat(22));
        assert!(well_formed(&odd));
        assert!(matches!(opener.open(&odd, &AAD), Err(CryptoError::Malformed | CryptoError::UnknownKey(_))));
    }

    #[test]
    fn sealed_paths_are_found_and_sent_as_strings() {
        let schema = json!({"type": "object", "properties": {
            "record": {"x-gatehouse-sealed": true, "type": "object"},
            "meta": {"type": "object", "properties": {"a/b": {"x-gatehouse-sealed": true, "type": "integer"}}},
            "plain": {"type": "string"}
        }});
        let mut paths = sealed_paths(&schema);
        paths.sort();
        assert_eq!(paths, ["/meta/a~1b", "/record"]);
        let view = as_sent(&schema, &paths);
        assert_eq!(view["properties"]["record"]["type"], "string");
        assert_eq!(view["properties"]["meta"]["properties"]["a/b"]["type"], "string");
        assert_eq!(view["properties"]["plain"]["type"], "string");
    }
}
