"""Fields the client seals itself, to a worker key its operator certified.

A kind's schema marks a property ``"x-gatehouse-sealed": true``; such a field leaves this
process sealed: an ephemeral X25519 key agrees with the worker's public key, HKDF-SHA256 (salt
``gatehouse sealed field v1``, info: both public keys) gives an AES-256-GCM key, and the field's
JSON is sealed with the client identity, kind, field path and the job's idempotency key as
associated data. The gatekeeper carries the result (``ghs1.<key id>.<ephemeral key>.<nonce>.
<ciphertext>``) without being able to read it; only the worker opens it.

The worker key comes from ``GET /v1/keys`` but is trusted only when the operator key this
client pins signed the set and the key is valid now: a gatekeeper that swaps in a key of its
own is refused (:class:`SealingError`). The same format as the Rust side
(``gatehouse_protocol::fields`` and ``keyset``), on the ``cryptography`` package.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

MARKER = "x-gatehouse-sealed"
PREFIX = "ghs1."
_SALT = b"gatehouse sealed field v1"
_DOMAIN = b"gatehouse worker key set v1\0"


class SealingError(Exception):
    """The worker key set is not one the pinned operator key certified, no key in it is valid
    now, or a job cannot be sealed."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(public: bytes) -> str:
    """The id of a public key: hex of the first 8 bytes of its SHA-256."""
    return hashlib.sha256(public).digest()[:8].hex()


def client_name(cert: str) -> str:
    """The identity the gatekeeper knows a client by: its certificate's one subject CN."""
    names = x509.load_pem_x509_certificate(Path(cert).read_bytes()).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise SealingError(f"{cert}: not exactly one subject CN")
    return str(names[0].value)


def read_operator_key(path: str) -> bytes:
    """An operator public key file as ``gatehouse certs dev`` writes it (hex of the raw key)."""
    return bytes.fromhex(Path(path).read_text().strip())


def certified_key(key_set: Mapping[str, Any], operator: bytes, now_ms: Optional[int] = None) -> Tuple[bytes, str]:
    """The worker public key to seal to: of ``key_set`` (as ``GET /v1/keys`` serves it), if the
    pinned ``operator`` key (raw Ed25519) signed it, the key valid now that became valid last."""
    try:
        signed = _unb64(str(key_set["set"]))
        signature = _unb64(str(key_set["signature"]))
        if key_set.get("signed_by") != key_id(operator):
            raise InvalidSignature()
        Ed25519PublicKey.from_public_bytes(operator).verify(signature, _DOMAIN + signed)
        keys = json.loads(signed)
    except (KeyError, ValueError, TypeError, InvalidSignature) as e:
        raise SealingError("the worker key set is not one the operator certified") from e
    now = int(time.time() * 1000) if now_ms is None else now_ms
    valid = [k for k in keys if k["not_before_ms"] <= now < k["not_after_ms"]]
    if not valid:
        raise SealingError("no certified worker key is valid now")
    key = max(valid, key=lambda k: k["not_before_ms"])
    public = _unb64(key["public"])
    if len(public) != 32 or key_id(public) != key["id"]:
        raise SealingError("a certified worker key does not match its id")
    return public, key["id"]


def seal_field(recipient: bytes, value: Any, *, client: str, kind: str, path: str, idempotency_key: str) -> str:
    """``value`` sealed to the worker key ``recipient``, bound to where it goes."""
    ephemeral = X25519PrivateKey.generate()
    epk = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=epk + recipient).derive(shared)
    nonce = os.urandom(12)
    aad = "\0".join(["gatehouse field v1", client, kind, path, idempotency_key]).encode()
    plain = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    sealed = AESGCM(key).encrypt(nonce, plain, aad)
    return f"{PREFIX}{key_id(recipient)}.{_b64(epk)}.{_b64(nonce)}.{_b64(sealed)}"


def sealed_paths(schema: Mapping[str, Any], at: str = "") -> List[str]:
    """JSON pointers of the properties ``schema`` marks sealed (through nested ``properties``)."""
    found: List[str] = []
    for name, sub in (schema.get("properties") or {}).items():
        path = f"{at}/{name.replace('~', '~0').replace('/', '~1')}"
        if isinstance(sub, dict) and sub.get(MARKER) is True:
            found.append(path)
        elif isinstance(sub, dict):
            found.extend(sealed_paths(sub, path))
    return found


def catalog_sealed_paths(catalog: str) -> Dict[str, List[str]]:
    """Each kind's sealed fields, read from a job catalog (``config/jobs.toml``) and its schema
    files — the client's own copy, never the gatekeeper's word (Python 3.11+: ``tomllib``)."""
    import tomllib

    path = Path(catalog)
    data = tomllib.loads(path.read_text())
    found: Dict[str, List[str]] = {}
    for kind in data.get("kind", []):
        schema = json.loads((path.parent / kind["schema"]).read_text())
        paths = sealed_paths(schema)
        if paths:
            found[kind["name"]] = paths
    return found


def _pointer(doc: Any, path: str) -> Tuple[Any, Any]:
    """The parent of ``path`` in ``doc`` and the last key, or ``(None, None)`` when absent."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    parent = doc
    for part in parts[:-1]:
        if not isinstance(parent, dict) or part not in parent:
            return None, None
        parent = parent[part]
    if not isinstance(parent, dict) or parts[-1] not in parent:
        return None, None
    return parent, parts[-1]


def seal_payload(
    payload: Any, paths: List[str], recipient: bytes, *, client: str, kind: str, idempotency_key: str
) -> Any:
    """A copy of ``payload`` with each field at ``paths`` that is present sealed."""
    out = json.loads(json.dumps(payload))
    for path in paths:
        parent, last = _pointer(out, path)
        if parent is None:
            continue
        parent[last] = seal_field(
            recipient, parent[last], client=client, kind=kind, path=path, idempotency_key=idempotency_key
        )
    return out
