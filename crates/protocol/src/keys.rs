//! Key files: hex text, one key per file, written by `gatehouse certs dev`.
//!
//! | file | holds | who reads it |
//! |---|---|---|
//! | `gatekeeper-signing.key` / `.pub` | Ed25519 (PKCS#8 / raw public) | gatekeeper / worker |
//! | `worker-sealing.key` / `.pub` | X25519 | worker / gatekeeper |
//! | `operator-signing.key` / `.pub` | Ed25519 (PKCS#8 / raw public) | `gatehouse dlq replay` / worker |
//! | `worker-data.keys` | AES-256 data keys (keyring) | worker |
//! | `worker-keys.json` | the worker's public sealing keys, certified by the operator key | gatekeeper serves it; clients check it |

use std::path::{Path, PathBuf};

use crate::crypto::{CryptoError, Keyring, OpeningKey, SigningKey, Verifier};
use crate::hex;

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("key file {path}: {reason}")]
pub struct KeyFileError {
    path: PathBuf,
    reason: String,
}

impl KeyFileError {
    pub fn new(path: &Path, reason: impl ToString) -> Self {
        err(path, reason)
    }
}

fn err(path: &Path, reason: impl ToString) -> KeyFileError {
    KeyFileError { path: path.to_owned(), reason: reason.to_string() }
}

/// The bytes of a hex key file.
///
/// # Errors
/// When the file cannot be read or is not hex.
pub fn read_hex(path: &Path) -> Result<Vec<u8>, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, e))?;
    hex::decode(text.trim()).ok_or_else(|| err(path, "not hex"))
}

/// # Errors
/// When the file is missing or not an Ed25519 PKCS#8 key.
pub fn signing_key(path: &Path) -> Result<SigningKey, KeyFileError> {
    SigningKey::from_pkcs8(&read_hex(path)?).map_err(|e: CryptoError| err(path, e))
}

/// # Errors
/// When a file is missing or not a 32-byte public key.
pub fn verifier(paths: &[PathBuf]) -> Result<Verifier, KeyFileError> {
    let keys = paths.iter().map(|p| read_hex(p)).collect::<Result<Vec<_>, _>>()?;
    Verifier::new(keys).map_err(|e| err(paths.first().map_or(Path::new("-"), |p| p), e))
}

/// # Errors
/// When the file is missing or not a 32-byte X25519 secret.
pub fn opening_key(path: &Path) -> Result<OpeningKey, KeyFileError> {
    OpeningKey::from_bytes(&read_hex(path)?).map_err(|e| err(path, e))
}

/// # Errors
/// When the file is missing or not a 32-byte X25519 public key.
pub fn sealing_key(path: &Path) -> Result<[u8; 32], KeyFileError> {
    read_hex(path)?.try_into().map_err(|_| err(path, "not a 32-byte public key"))
}

/// # Errors
/// When the file is missing or malformed.
pub fn keyring(path: &Path) -> Result<Keyring, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, e))?;
    Keyring::parse(&text).map_err(|e| err(path, e))
}

/// Writes the keys above that are missing from `dir` (secrets created with mode 0600). Keys
/// already there are kept: replacing the data keys would make stored records unreadable.
///
/// # Errors
/// When a file cannot be written or there is no system randomness.
pub fn write_dev(dir: &Path) -> Result<(), KeyFileError> {
    let missing =
        |base: &str| !dir.join(format!("{base}.key")).exists() || !dir.join(format!("{base}.pub")).exists();
    // The gatekeeper signs its sessions; an operator signs replays of dead letters.
    for who in ["gatekeeper", "operator"].into_iter().filter(|w| missing(&format!("{w}-signing"))) {
        let pkcs8 = SigningKey::generate_pkcs8().map_err(|e| err(dir, e))?;
        let key = SigningKey::from_pkcs8(&pkcs8).map_err(|e| err(dir, e))?;
        write_file(&dir.join(format!("{who}-signing.key")), &hex::encode(&pkcs8), true)?;
        write_file(&dir.join(format!("{who}-signing.pub")), &hex::encode(&key.public_key()), false)?;
    }
    if missing("worker-sealing") {
        let secret = OpeningKey::generate().map_err(|e| err(dir, e))?;
        let opening = OpeningKey::from_bytes(&secret).map_err(|e| err(dir, e))?;
        write_file(&dir.join("worker-sealing.key"), &hex::encode(&secret), true)?;
        write_file(&dir.join("worker-sealing.pub"), &hex::encode(&opening.public_key()), false)?;
    }
    let set = dir.join("worker-keys.json");
    if !set.exists() {
        // A year from now; `gatehouse keys certify` makes the sets of a real deployment.
        let now = u64::try_from(crate::clock::now_ms()).unwrap_or(0);
        let year = 365 * 24 * 3600 * 1000;
        certify_worker_keys(
            &dir.join("operator-signing.key"),
            &[dir.join("worker-sealing.pub")],
            now,
            now + year,
            &set,
        )?;
    }
    if dir.join("worker-data.keys").exists() {
        return Ok(());
    }
    let ring = Keyring::new_line("k1").map_err(|e| err(dir, e))?;
    write_file(
        &dir.join("worker-data.keys"),
        &format!("# Data keys for encryption at rest: `<id> <hex>`; the last one is active.\n{ring}"),
        true,
    )
}

/// Certifies the worker public keys in `worker_keys` (hex files) for `not_before_ms` until
/// `not_after_ms` with the operator key in `operator_key`, and writes the set to `out` (see
/// [`crate::keyset`]).
///
/// # Errors
/// When a key file is missing or malformed, or `out` cannot be written.
pub fn certify_worker_keys(
    operator_key: &Path,
    worker_keys: &[PathBuf],
    not_before_ms: u64,
    not_after_ms: u64,
    out: &Path,
) -> Result<(), KeyFileError> {
    use crate::keyset::{SignedKeySet, WorkerKey};
    let signer = signing_key(operator_key)?;
    let keys = worker_keys
        .iter()
        .map(|p| WorkerKey::new(&read_hex(p)?, not_before_ms, not_after_ms).map_err(|e| err(p, e)))
        .collect::<Result<Vec<_>, _>>()?;
    let set = SignedKeySet::certify(&signer, &keys).map_err(|e| err(out, e))?;
    let text = serde_json::to_string_pretty(&set).map_err(|e| err(out, e))?;
    write_file(out, &text, false)
}

/// Writes `text` (plus a final newline) to `path`; a `secret` file is created with mode 0600
/// from the start (never readable by others, not even for a moment), replacing any file there.
///
/// # Errors
/// When the file cannot be written.
pub fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), KeyFileError> {
    use std::io::Write as _;
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt as _;
        // An existing file keeps its mode when truncated: start afresh.
        let _ = std::fs::remove_file(path);
        open.create_new(true).mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = open.open(path).map_err(|e| err(path, e))?;
    file.write_all(format!("{}\n", text.trim_end()).as_bytes()).map_err(|e| err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_keys_load_and_fit_together() {
        let dir = std::env::temp_dir().join(format!("gatehouse-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_dev(&dir).unwrap();
        let gk = signing_key(&dir.join("gatekeeper-signing.key")).unwrap();
        let v = verifier(&[dir.join("gatekeeper-signing.pub")]).unwrap();
        assert!(v.verify(gk.id(), b"m", &gk.sign(b"m")).is_ok());
        let worker = opening_key(&dir.join("worker-sealing.key")).unwrap();
        let session =
            crate::crypto::Session::start(&gk, &sealing_key(&dir.join("worker-sealing.pub")).unwrap(), 1)
                .unwrap();
        let opened = crate::crypto::Session::accept(&v, gk.id(), &session.header(), &worker).unwrap();
        assert_eq!(opened.open(&session.seal(b"p", b"a").unwrap(), b"a").unwrap(), b"p");
        assert_eq!(keyring(&dir.join("worker-data.keys")).unwrap().active_id(), "k1");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = |f: &str| std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            for secret in
                ["gatekeeper-signing.key", "operator-signing.key", "worker-sealing.key", "worker-data.keys"]
            {
                assert_eq!(mode(secret), 0o600, "{secret}");
            }
            // Rewriting a secret over a readable file does not keep the old mode.
            std::fs::set_permissions(dir.join("worker-data.keys"), std::fs::Permissions::from_mode(0o644))
                .unwrap();
            write_file(&dir.join("worker-data.keys"), "k1 00", true).unwrap();
            assert_eq!(mode("worker-data.keys"), 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
