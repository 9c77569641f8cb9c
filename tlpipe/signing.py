"""Release signatures: an ed25519 signature over a release's manifest.json, made with a
private key that never goes to the bucket, checked with public keys the reader trusts.

Write access to the bucket is not enough to forge a release: a manifest rewritten to match
changed files no longer matches its signature, and no signature can be made without the
private key. The publisher's key is TLPIPE_SIGNING_KEY (a PEM file), else the project's own
`.tlpipe/keys/release.key`, created (0600) on first use beside its public half
`release.pub`. A reader trusts the public keys listed in TLPIPE_TRUSTED_KEYS (PEM files,
separated by ':'), else the public half of that same key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tlpipe.errors import TlpipeError

KEY_ENV = "TLPIPE_SIGNING_KEY"
TRUSTED_ENV = "TLPIPE_TRUSTED_KEYS"
DEFAULT_KEY = Path(".tlpipe/keys/release.key")
# The signature's object, beside manifest.json in the release.
MANIFEST_NAME = "manifest.json"
SIGNATURE = f"{MANIFEST_NAME}.sig"
ALGORITHM = "ed25519"


class SignatureError(TlpipeError):
    """A release is unsigned, signed by a key not trusted here, or its signature is wrong;
    or a key file cannot be read."""


def key_id(public: Ed25519PublicKey) -> str:
    """A short name for a public key: the start of the SHA-256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_path() -> tuple[Path, bool]:
    named = os.environ.get(KEY_ENV)
    return (Path(named), True) if named else (DEFAULT_KEY, False)


def create_key(path: Path) -> Ed25519PrivateKey:
    """A new ed25519 key in `path` (0600, refusing to replace one) and its public half in
    `path` with the suffix .pub."""
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    path.with_suffix(".pub").write_bytes(_public_pem(key.public_key()))
    return key


def _load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise SignatureError(f"{path}: not a readable PEM private key ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: an {type(key).__name__}, not an ed25519 key")
    if os.stat(path).st_mode & 0o077:
        raise SignatureError(f"{path}: the signing key is readable by other users; chmod 600 it")
    return key


def signing_key() -> Ed25519PrivateKey:
    """The publisher's private key (see the module docstring). A key file that
    TLPIPE_SIGNING_KEY names must exist; the project's default one is created if missing."""
    path, named = _key_path()
    if not path.exists():
        if named:
            raise SignatureError(f"{KEY_ENV}={path}: no such key file")
        return create_key(path)
    return _load_private(path)


def trusted_keys() -> dict[str, Ed25519PublicKey]:
    """The public keys a release may be signed by here, by key id (see the module
    docstring). Raises SignatureError when there is none, or a file is not a key."""
    listed = [Path(p) for p in os.environ.get(TRUSTED_ENV, "").split(":") if p]
    keys: list[Ed25519PublicKey] = []
    for path in listed:
        try:
            public = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError, TypeError) as err:
            raise SignatureError(f"{TRUSTED_ENV}: {path} is not a readable PEM public key ({err})") from err
        if not isinstance(public, Ed25519PublicKey):
            raise SignatureError(f"{TRUSTED_ENV}: {path} is not an ed25519 public key")
        keys.append(public)
    if not listed:
        path, _ = _key_path()
        if not path.exists():
            raise SignatureError(
                f"no key to check release signatures with: set {TRUSTED_ENV} to the publisher's "
                f"public key (its release.pub), or {KEY_ENV} to its key"
            )
        keys.append(_load_private(path).public_key())
    return {key_id(k): k for k in keys}


def sign(manifest: bytes, key: Ed25519PrivateKey) -> bytes:
    """The signature object for the manifest's exact bytes."""
    record = {
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "signature": base64.b64encode(key.sign(manifest)).decode(),
    }
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def verify(
    manifest: bytes,
    signature: bytes,
    trusted: dict[str, Ed25519PublicKey],
    where: str,
    signed: str = MANIFEST_NAME,
) -> str:
    """Check `signature` (a `sign` object) over the exact bytes of `manifest` (or of what
    `signed` names) with a trusted key; returns that key's id. Raises SignatureError saying
    what is wrong, naming `where`."""
    try:
        record = json.loads(signature)
        algorithm, kid, sig = record["algorithm"], record["key_id"], base64.b64decode(record["signature"])
    except (ValueError, LookupError, TypeError) as err:
        raise SignatureError(f"{where}: the signature of {signed} is not a signature record ({err})") from err
    if algorithm != ALGORITHM:
        raise SignatureError(f"{where}: signed with {algorithm!r}, not {ALGORITHM}")
    public = trusted.get(kid)
    if public is None:
        raise SignatureError(
            f"{where}: signed by key {kid}, which is not trusted here (trusted: "
            f"{', '.join(sorted(trusted))}); add its public key to {TRUSTED_ENV}"
        )
    try:
        public.verify(sig, manifest)
    except InvalidSignature:
        raise SignatureError(f"{where}: the signature does not match {signed} (forged or altered)") from None
    return kid
