//! Signing and sealing of what crosses the broker, and encryption at rest.
//!
//! - **Sessions** (gatekeeper → worker): the sender signs (Ed25519, ring) a short-lived
//!   ephemeral X25519 key once per [`Session`]; per message it then seals the payload with
//!   AES-256-GCM and authenticates the whole body with HMAC-SHA256, both under keys derived
//!   (HKDF-SHA256) from the agreement with the recipient's static key. The signer's key id
//!   travels with the session, so keys can rotate: a verifier holds several public keys. ring
//!   has no *static* X25519 private keys (its agreement keys are ephemeral only), so the
//!   recipient's side of the agreement uses `x25519-dalek`; everything else is ring's.
//! - **Replies** (worker → gatekeeper): AES-256-GCM under a reply key of the session the
//!   request travelled in (derived with its other keys): only the two ends of that session can
//!   make or open one, and it is gone with the session.
//! - **At rest**: AES-256-GCM under a data key from a keyring; the key id is stored with each
//!   value, so old values stay readable after the active key changes.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use ring::{digest, hkdf};
use serde::{Deserialize, Serialize};

use crate::hex;

/// Binary values inside messages: base64url without padding (a third shorter than hex, and
/// every byte of a message costs the broker).
pub(crate) fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub(crate) fn unb64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).ok()
}

/// A cryptographic failure. Deliberately vague: callers say what they were doing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("bad key material: {0}")]
    BadKey(&'static str),
    #[error("no key with id {0}")]
    UnknownKey(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("cannot open: wrong key, or the data was altered")]
    Open,
    #[error("malformed sealed data")]
    Malformed,
    #[error("no system randomness")]
    Random,
    #[error("message format version {0} is not the one this build reads")]
    Version(u32),
    #[error("too old, or from the future")]
    Stale,
}

pub(crate) fn random<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut b = [0u8; N];
    SystemRandom::new().fill(&mut b).map_err(|_| CryptoError::Random)?;
    Ok(b)
}

/// The id of a public key: hex of the first 8 bytes of its SHA-256.
pub fn key_id(public: &[u8]) -> String {
    hex::encode(&digest::digest(&digest::SHA256, public).as_ref()[..8])
}

// ---- signatures -----------------------------------------------------------------------------

/// An Ed25519 signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    id: String,
}

impl SigningKey {
    /// A new key as PKCS#8 bytes (to store).
    ///
    /// # Errors
    /// Without system randomness.
    pub fn generate_pkcs8() -> Result<Vec<u8>, CryptoError> {
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| CryptoError::Random)
    }

    /// # Errors
    /// When `pkcs8` is not an Ed25519 key.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, CryptoError> {
        let pair =
            Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| CryptoError::BadKey("not an Ed25519 key"))?;
        let id = key_id(pair.public_key().as_ref());
        Ok(Self { pair, id })
    }

    pub fn public_key(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The signature of `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
}

/// The public keys a verifier trusts, by key id.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    keys: Vec<(String, Vec<u8>)>,
}

impl Verifier {
    /// Trusts these Ed25519 public keys (32 bytes each).
    ///
    /// # Errors
    /// When a key is not 32 bytes.
    pub fn new(public_keys: impl IntoIterator<Item = Vec<u8>>) -> Result<Self, CryptoError> {
        let keys =
            public_keys
                .into_iter()
                .map(|k| {
                    if k.len() == 32 { Ok((key_id(&k), k)) } else { Err(CryptoError::BadKey("not 32 bytes")) }
                })
                .collect::<Result<_, _>>()?;
        Ok(Self { keys })
    }

    /// Trusts one more key (32 bytes).
    ///
    /// # Errors
    /// When the key is not 32 bytes.
    pub fn trust(&mut self, public_key: Vec<u8>) -> Result<(), CryptoError> {
        self.keys.extend(Self::new([public_key])?.keys);
        Ok(())
    }

    /// Checks `signature` over `message` by the key `key_id`.
    ///
    /// # Errors
    /// [`CryptoError::UnknownKey`] or [`CryptoError::BadSignature`].
    pub fn verify(&self, key_id: &str, message: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
        let (_, key) = self
            .keys
            .iter()
            .find(|(id, _)| id == key_id)
            .ok_or_else(|| CryptoError::UnknownKey(key_id.to_owned()))?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(message, signature)
            .map_err(|_| CryptoError::BadSignature)
    }
}

// ---- sealing --------------------------------------------------------------------------------

/// Data sealed to one recipient in a [`Session`] (which the message carrying it names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// AES-GCM nonce (base64url).
    pub nonce: String,
    /// Ciphertext and tag (base64url).
    pub ct: String,
}

/// An X25519 key pair that can open what was sealed to it.
pub struct OpeningKey {
    secret: x25519_dalek::StaticSecret,
}

impl OpeningKey {
    /// A new secret (32 bytes, to store).
    ///
    /// # Errors
    /// Without system randomness.
    pub fn generate() -> Result<[u8; 32], CryptoError> {
        random()
    }

    /// # Errors
    /// When `secret` is not 32 bytes.
    pub fn from_bytes(secret: &[u8]) -> Result<Self, CryptoError> {
        let bytes: [u8; 32] = secret.try_into().map_err(|_| CryptoError::BadKey("not 32 bytes"))?;
        Ok(Self { secret: x25519_dalek::StaticSecret::from(bytes) })
    }

    pub fn public_key(&self) -> [u8; 32] {
        x25519_dalek::PublicKey::from(&self.secret).to_bytes()
    }

    /// An Ed25519 key derived from this secret for `purpose` (HKDF-SHA256): only a holder of
    /// the secret has it, and it stays the same for as long as the secret does. The worker signs
    /// the jobs it makes itself (schedule firings) with it.
    ///
    /// # Errors
    /// Only if the derivation fails.
    pub fn derive_signing_key(&self, purpose: &str) -> Result<SigningKey, CryptoError> {
        let seed = self.derive_secret(purpose)?;
        let pair =
            Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| CryptoError::BadKey("ed25519 seed"))?;
        let id = key_id(pair.public_key().as_ref());
        Ok(SigningKey { pair, id })
    }

    /// 32 secret bytes derived from this secret for `purpose` (HKDF-SHA256): only a holder of
    /// the secret can compute them (the worker keys its schedule firings' ids with them).
    ///
    /// # Errors
    /// Only if the derivation fails.
    pub fn derive_secret(&self, purpose: &str) -> Result<[u8; 32], CryptoError> {
        struct Seed;
        impl hkdf::KeyType for Seed {
            fn len(&self) -> usize {
                32
            }
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"gatehouse derived signing key v1")
            .extract(self.secret.as_bytes());
        let mut seed = [0u8; 32];
        prk.expand(&[purpose.as_bytes()], Seed)
            .and_then(|okm| okm.fill(&mut seed))
            .map_err(|_| CryptoError::BadKey("hkdf"))?;
        Ok(seed)
    }

    pub(crate) fn agree(&self, public: &[u8; 32]) -> [u8; 32] {
        self.secret.diffie_hellman(&x25519_dalek::PublicKey::from(*public)).to_bytes()
    }
}

// ---- sessions -------------------------------------------------------------------------------

/// A sender's session with one recipient: everything the gatekeeper sends the worker for a
/// while (see [`SESSION_LIFETIME_MS`]) is sealed and authenticated under it.
///
/// At its start the sender makes an ephemeral X25519 key, agrees on a secret with the
/// recipient's static key, derives an AES-256-GCM sealing key and an HMAC-SHA256 key from it
/// (HKDF), and signs a *statement* — the ephemeral public key, the recipient's key and the
/// start time — with its Ed25519 key. The ephemeral private key is gone after the agreement.
///
/// Per message that leaves one AES-GCM and one HMAC instead of two X25519 operations and an
/// Ed25519 signature; the recipient verifies the statement once per session (and caches the
/// result), then checks each message's MAC. Only the holder of the ephemeral key (the sender)
/// or of the recipient's secret can compute the MAC key, so a valid MAC under a validly
/// signed statement proves the message came from the sender, unaltered. A compromised sender
/// can open at most what it sealed in its current session: earlier session keys are dropped.
pub struct Session {
    epk: [u8; 32],
    started_at_ms: u64,
    key_id: String,
    signature: Vec<u8>,
    seal: LessSafeKey,
    mac: ring::hmac::Key,
    /// Seals the recipient's replies to what was sent in this session.
    reply: LessSafeKey,
}

/// How long a sender uses one session before starting the next.
pub const SESSION_LIFETIME_MS: u64 = 10_000;

const SESSION_CONTEXT: &[u8] = b"gatehouse session v1\0";

fn statement(epk: &[u8; 32], recipient: &[u8; 32], started_at_ms: u64) -> Vec<u8> {
    [SESSION_CONTEXT, epk, recipient, &started_at_ms.to_be_bytes()].concat()
}

impl Session {
    /// Starts a session from `signer` to `recipient` (an X25519 public key).
    ///
    /// # Errors
    /// Without system randomness, or for a recipient key that is not a curve point.
    pub fn start(signer: &SigningKey, recipient: &[u8; 32], now_ms: u64) -> Result<Self, CryptoError> {
        use ring::agreement::{EphemeralPrivateKey, UnparsedPublicKey, X25519, agree_ephemeral};
        let rng = SystemRandom::new();
        let ephemeral = EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| CryptoError::Random)?;
        let epk: [u8; 32] = ephemeral
            .compute_public_key()
            .map_err(|_| CryptoError::Random)?
            .as_ref()
            .try_into()
            .map_err(|_| CryptoError::BadKey("x25519 public key"))?;
        let (seal, mac, reply) =
            agree_ephemeral(ephemeral, &UnparsedPublicKey::new(&X25519, recipient), |shared| {
                session_keys(shared, &epk, recipient)
            })
            .map_err(|_| CryptoError::BadKey("x25519 agreement"))??;
        let signature = signer.sign(&statement(&epk, recipient, now_ms));
        Ok(Self { epk, started_at_ms: now_ms, key_id: signer.id().to_owned(), signature, seal, mac, reply })
    }

    /// The recipient's side: checks the sender's signature on the session `header` (see
    /// [`Session::header`]) by the key `key_id`, and derives the same keys with `mine`.
    ///
    /// # Errors
    /// [`CryptoError::Malformed`], [`CryptoError::UnknownKey`] or [`CryptoError::BadSignature`].
    pub fn accept(
        verifier: &Verifier,
        key_id: &str,
        header: &str,
        mine: &OpeningKey,
    ) -> Result<Self, CryptoError> {
        let mut parts = header.split('.');
        let (Some(epk), Some(started), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CryptoError::Malformed);
        };
        let epk: [u8; 32] = unb64(epk).and_then(|b| b.try_into().ok()).ok_or(CryptoError::Malformed)?;
        let started_at_ms: u64 = started.parse().map_err(|_| CryptoError::Malformed)?;
        let signature = unb64(sig).ok_or(CryptoError::Malformed)?;
        let recipient = mine.public_key();
        verifier.verify(key_id, &statement(&epk, &recipient, started_at_ms), &signature)?;
        let (seal, mac, reply) = session_keys(&mine.agree(&epk), &epk, &recipient)?;
        Ok(Self { epk, started_at_ms, key_id: key_id.to_owned(), signature, seal, mac, reply })
    }

    /// The session as a message header: `<ephemeral key>.<start ms>.<signature>` (base64url).
    pub fn header(&self) -> String {
        format!("{}.{}.{}", b64(&self.epk), self.started_at_ms, b64(&self.signature))
    }

    /// A short name of this session (from its ephemeral key), by which a reply says which
    /// session's reply key sealed it.
    pub fn id(&self) -> String {
        b64(&self.epk[..12])
    }

    /// The id of the key that signed the session.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn started_at_ms(&self) -> u64 {
        self.started_at_ms
    }

    /// Seals `plain`, bound to `aad`.
    ///
    /// # Errors
    /// Without system randomness.
    pub fn seal(&self, plain: &[u8], aad: &[u8]) -> Result<Sealed, CryptoError> {
        seal_with(&self.seal, plain, aad)
    }

    /// Opens what [`Session::seal`] sealed in this session; `aad` must be what it was bound to.
    ///
    /// # Errors
    /// [`CryptoError::Open`] when it was sealed in another session (another key) or anything
    /// was altered.
    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        open_with(&self.seal, sealed, aad)
    }

    /// Seals a reply to a message of this session, bound to `aad`, under the session's own
    /// reply key: only the two ends of the session can open it, and once the sender has
    /// forgotten the session (see the gatekeeper's reply window) not even a later compromise of
    /// the sender opens it.
    ///
    /// # Errors
    /// Without system randomness.
    pub fn seal_reply(&self, plain: &[u8], aad: &[u8]) -> Result<Sealed, CryptoError> {
        seal_with(&self.reply, plain, aad)
    }

    /// Opens what [`Session::seal_reply`] sealed.
    ///
    /// # Errors
    /// [`CryptoError::Open`] when sealed in another session or bound to another `aad`.
    pub fn open_reply(&self, sealed: &Sealed, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        open_with(&self.reply, sealed, aad)
    }

    /// The MAC of a whole message body (base64url).
    pub fn mac(&self, body: &[u8]) -> String {
        b64(ring::hmac::sign(&self.mac, body).as_ref())
    }

    /// Checks a MAC made by [`Session::mac`] (in constant time).
    ///
    /// # Errors
    /// [`CryptoError::BadSignature`] when it does not match.
    pub fn check_mac(&self, body: &[u8], mac: &str) -> Result<(), CryptoError> {
        let tag = unb64(mac).ok_or(CryptoError::BadSignature)?;
        ring::hmac::verify(&self.mac, body, &tag).map_err(|_| CryptoError::BadSignature)
    }
}

/// The sealing and MAC keys of a session: HKDF-SHA256 of the shared secret, salted with both
/// public keys.
fn session_keys(
    shared: &[u8],
    epk: &[u8; 32],
    recipient: &[u8; 32],
) -> Result<(LessSafeKey, ring::hmac::Key, LessSafeKey), CryptoError> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[&epk[..], &recipient[..]].concat()).extract(shared);
    let aead = |info: &[u8]| {
        prk.expand(&[info], &AES_256_GCM)
            .map(|k| LessSafeKey::new(UnboundKey::from(k)))
            .map_err(|_| CryptoError::BadKey("hkdf"))
    };
    let mac = prk
        .expand(&[b"gatehouse session mac v1"], ring::hmac::HMAC_SHA256)
        .map_err(|_| CryptoError::BadKey("hkdf"))?;
    Ok((
        aead(b"gatehouse session seal v1")?,
        ring::hmac::Key::from(mac),
        aead(b"gatehouse session reply v1")?,
    ))
}

/// AES-256-GCM with a random nonce. Each key seals at most one session's messages (or
/// replies), far below the 2^32 random-nonce budget.
fn seal_with(key: &LessSafeKey, plain: &[u8], aad: &[u8]) -> Result<Sealed, CryptoError> {
    let nonce = random::<12>()?;
    let mut buf = plain.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf)
        .map_err(|_| CryptoError::Open)?;
    Ok(Sealed { nonce: b64(&nonce), ct: b64(&buf) })
}

fn open_with(key: &LessSafeKey, sealed: &Sealed, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let nonce: [u8; 12] =
        unb64(&sealed.nonce).and_then(|b| b.try_into().ok()).ok_or(CryptoError::Malformed)?;
    let mut ct = unb64(&sealed.ct).ok_or(CryptoError::Malformed)?;
    let plain = key
        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut ct)
        .map_err(|_| CryptoError::Open)?;
    Ok(plain.to_vec())
}

// ---- at rest --------------------------------------------------------------------------------

/// Data keys for encryption at rest: new values use the active key; any listed key decrypts.
pub struct Keyring {
    keys: Vec<(String, LessSafeKey)>,
    active: usize,
}

/// Prefix of a value encrypted at rest: `v2.<key id>.<nonce hex>.<ciphertext hex>`. Version 2
/// values are bound by their caller to everything that places them (table, column, row,
/// owner); version 1 values, written by earlier releases, to their row id only.
const AT_REST_PREFIX: &str = "v2.";
const AT_REST_LEGACY_PREFIX: &str = "v1.";

impl Keyring {
    /// Parses a keyring file: one `<id> <64 hex digits>` per line; the last key is active;
    /// `#` starts a comment.
    ///
    /// # Errors
    /// When a line is malformed or there is no key.
    pub fn parse(text: &str) -> Result<Self, CryptoError> {
        let mut keys = Vec::new();
        for line in text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty()) {
            let (id, key) =
                line.split_once(char::is_whitespace).ok_or(CryptoError::BadKey("keyring line"))?;
            let bytes =
                hex::decode(key.trim()).filter(|b| b.len() == 32).ok_or(CryptoError::BadKey("data key"))?;
            if id.contains('.') || id.is_empty() {
                return Err(CryptoError::BadKey("key id"));
            }
            let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| CryptoError::BadKey("data key"))?;
            keys.push((id.to_owned(), LessSafeKey::new(key)));
        }
        let active = keys.len().checked_sub(1).ok_or(CryptoError::BadKey("empty keyring"))?;
        Ok(Self { keys, active })
    }

    /// A keyring line for a new random key called `id`.
    ///
    /// # Errors
    /// Without system randomness.
    pub fn new_line(id: &str) -> Result<String, CryptoError> {
        Ok(format!("{id} {}\n", hex::encode(&random::<32>()?)))
    }

    pub fn active_id(&self) -> &str {
        &self.keys[self.active].0
    }

    /// Encrypts `plain` under the active key, bound to `aad` (e.g. the row's id).
    ///
    /// # Errors
    /// Without system randomness.
    pub fn encrypt(&self, plain: &[u8], aad: &[u8]) -> Result<String, CryptoError> {
        let (id, key) = &self.keys[self.active];
        let nonce = random::<12>()?;
        let mut buf = plain.to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf)
            .map_err(|_| CryptoError::Open)?;
        Ok(format!("{AT_REST_PREFIX}{id}.{}.{}", hex::encode(&nonce), hex::encode(&buf)))
    }

    /// Decrypts a value made by [`Keyring::encrypt`] under any key of the ring.
    ///
    /// # Errors
    /// Unknown key id, malformed value, or altered data.
    pub fn decrypt(&self, value: &str, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let rest = value
            .strip_prefix(AT_REST_PREFIX)
            .or_else(|| value.strip_prefix(AT_REST_LEGACY_PREFIX))
            .ok_or(CryptoError::Malformed)?;
        let mut parts = rest.splitn(3, '.');
        let (id, nonce, ct) = match (parts.next(), parts.next(), parts.next()) {
            (Some(i), Some(n), Some(c)) => (i, n, c),
            _ => return Err(CryptoError::Malformed),
        };
        let (_, key) =
            self.keys.iter().find(|(k, _)| k == id).ok_or_else(|| CryptoError::UnknownKey(id.to_owned()))?;
        let nonce: [u8; 12] =
            hex::decode(nonce).and_then(|b| b.try_into().ok()).ok_or(CryptoError::Malformed)?;
        let mut ct = hex::decode(ct).ok_or(CryptoError::Malformed)?;
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut ct)
            .map_err(|_| CryptoError::Open)?;
        Ok(plain.to_vec())
    }

    /// The format of a stored value: `Some(2)` as this release writes it, `Some(1)` from an
    /// earlier release, `None` for plaintext (from before encryption was on).
    pub fn version(value: &str) -> Option<u8> {
        if value.starts_with(AT_REST_PREFIX) {
            Some(2)
        } else if value.starts_with(AT_REST_LEGACY_PREFIX) {
            Some(1)
        } else {
            None
        }
    }

    /// The key id a stored value was encrypted under.
    pub fn key_of(value: &str) -> Option<&str> {
        value
            .strip_prefix(AT_REST_PREFIX)
            .or_else(|| value.strip_prefix(AT_REST_LEGACY_PREFIX))?
            .split('.')
            .next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_unaltered_and_by_a_trusted_key() {
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let other = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let v = Verifier::new([key.public_key(), other.public_key()]).unwrap();
        let sig = key.sign(b"body");
        assert_eq!(v.verify(key.id(), b"body", &sig), Ok(()));
        assert_eq!(v.verify(key.id(), b"bodY", &sig), Err(CryptoError::BadSignature));
        assert_eq!(v.verify(other.id(), b"body", &sig), Err(CryptoError::BadSignature));
        let stranger = Verifier::new([other.public_key()]).unwrap();
        assert!(matches!(stranger.verify(key.id(), b"body", &sig), Err(CryptoError::UnknownKey(_))));
    }

    fn keys() -> (SigningKey, Verifier, OpeningKey) {
        let signer = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let verifier = Verifier::new([signer.public_key()]).unwrap();
        (signer, verifier, OpeningKey::from_bytes(&OpeningKey::generate().unwrap()).unwrap())
    }

    #[test]
    fn a_session_opens_and_authenticates_only_for_its_recipient() {
        let (signer, verifier, worker) = keys();
        let sent = Session::start(&signer, &worker.public_key(), 1_000).unwrap();
        let got = Session::accept(&verifier, signer.id(), &sent.header(), &worker).unwrap();
        assert_eq!(got.started_at_ms(), 1_000);

        let sealed = sent.seal(b"secret payload", b"job-1").unwrap();
        assert!(!unb64(&sealed.ct).unwrap().windows(6).any(|w| w == b"secret"));
        assert_eq!(got.open(&sealed, b"job-1").unwrap(), b"secret payload");
        assert_eq!(got.open(&sealed, b"job-2"), Err(CryptoError::Open));
        let mut tampered = sealed.clone();
        tampered.ct.replace_range(0..2, if &tampered.ct[0..2] == "00" { "01" } else { "00" });
        assert_eq!(got.open(&tampered, b"job-1"), Err(CryptoError::Open));

        let mac = sent.mac(b"body");
        assert_eq!(got.check_mac(b"body", &mac), Ok(()));
        assert_eq!(got.check_mac(b"bodY", &mac), Err(CryptoError::BadSignature));

        // Another recipient verifies the statement only for itself: the signature binds the
        // recipient's key, so the header is refused.
        let stranger = OpeningKey::from_bytes(&OpeningKey::generate().unwrap()).unwrap();
        assert_eq!(
            Session::accept(&verifier, signer.id(), &sent.header(), &stranger).err(),
            Some(CryptoError::BadSignature)
        );
        // A later session of the same sender cannot open or vouch for this one's messages.
        let next = Session::start(&signer, &worker.public_key(), 2_000).unwrap();
        let next = Session::accept(&verifier, signer.id(), &next.header(), &worker).unwrap();
        assert_eq!(next.open(&sealed, b"job-1"), Err(CryptoError::Open));
        assert_eq!(next.check_mac(b"body", &mac), Err(CryptoError::BadSignature));
    }

    #[test]
    fn a_session_header_must_be_signed_by_a_trusted_key_and_unaltered() {
        let (signer, verifier, worker) = keys();
        let header = Session::start(&signer, &worker.public_key(), 1_000).unwrap().header();
        let later = header.replacen(".1000.", ".1001.", 1);
        assert_eq!(
            Session::accept(&verifier, signer.id(), &later, &worker).err(),
            Some(CryptoError::BadSignature)
        );
        let (other, _, _) = keys();
        let forged = Session::start(&other, &worker.public_key(), 1_000).unwrap().header();
        assert!(Session::accept(&verifier, signer.id(), &forged, &worker).is_err());
        assert!(matches!(
            Session::accept(&verifier, other.id(), &forged, &worker),
            Err(CryptoError::UnknownKey(_))
        ));
        assert_eq!(
            Session::accept(&verifier, signer.id(), "00.1.00", &worker).err(),
            Some(CryptoError::Malformed)
        );
    }

    #[test]
    fn replies_open_only_in_their_session_and_for_their_binding() {
        let (signer, verifier, worker) = keys();
        let sent = Session::start(&signer, &worker.public_key(), 1_000).unwrap();
        let got = Session::accept(&verifier, signer.id(), &sent.header(), &worker).unwrap();
        assert_eq!(sent.id(), got.id());
        let reply = got.seal_reply(b"result", b"c1").unwrap();
        assert_eq!(sent.open_reply(&reply, b"c1").unwrap(), b"result");
        assert_eq!(sent.open_reply(&reply, b"c2"), Err(CryptoError::Open));
        // Not under the session's sealing key, nor in another session.
        assert_eq!(sent.open(&reply, b"c1"), Err(CryptoError::Open));
        let next = Session::start(&signer, &worker.public_key(), 2_000).unwrap();
        assert_ne!(next.id(), sent.id());
        assert_eq!(next.open_reply(&reply, b"c1"), Err(CryptoError::Open));
    }

    #[test]
    fn at_rest_values_are_bound_to_their_key_and_row() {
        let ring = Keyring::parse(&Keyring::new_line("k1").unwrap()).unwrap();
        let value = ring.encrypt(b"record", b"tok_1").unwrap();
        assert!(Keyring::version(&value) == Some(2) && !value.contains(&hex::encode(b"record")));
        assert_eq!(ring.decrypt(&value, b"tok_1").unwrap(), b"record");
        assert_eq!(ring.decrypt(&value, b"tok_2"), Err(CryptoError::Open));
        // Another key of the same name cannot open it: the key is what matters.
        let impostor = Keyring::parse(&Keyring::new_line("k1").unwrap()).unwrap();
        assert_eq!(impostor.decrypt(&value, b"tok_1"), Err(CryptoError::Open));
    }

    #[test]
    fn keyring_uses_the_last_key_and_reads_all() {
        let k1 = Keyring::new_line("k1").unwrap();
        let ring1 = Keyring::parse(&k1).unwrap();
        let v1 = ring1.encrypt(b"a", b"x").unwrap();
        let ring2 = Keyring::parse(&format!("{k1}{}", Keyring::new_line("k2").unwrap())).unwrap();
        assert_eq!(ring2.active_id(), "k2");
        assert_eq!(ring2.decrypt(&v1, b"x").unwrap(), b"a");
        let v2 = ring2.encrypt(b"b", b"x").unwrap();
        assert_eq!(Keyring::key_of(&v2), Some("k2"));
        assert!(matches!(ring1.decrypt(&v2, b"x"), Err(CryptoError::UnknownKey(_))));
    }
}
