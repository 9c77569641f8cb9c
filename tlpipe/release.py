"""Reading a published release back: resolve the version, download, verify every SHA-256."""

from __future__ import annotations

import json
from pathlib import Path

from tlpipe.data import sha256_file
from tlpipe.errors import StoreError
from tlpipe.store import StoreSession, download_prefix, object_exists, parse_s3_uri

MANIFEST = "manifest.json"


def resolve_release(store: StoreSession, uri: str) -> str:
    """The key prefix of a complete release: `uri` names a version folder, or a model folder
    whose latest.json points at one."""
    bucket, key = parse_s3_uri(uri)
    if bucket != store.bucket:
        raise StoreError(f"{uri}: bucket {bucket!r} is not the session's bucket {store.bucket!r}")
    prefix = key.rstrip("/")
    if object_exists(store.client, bucket, f"{prefix}/{MANIFEST}"):
        return prefix
    if object_exists(store.client, bucket, f"{prefix}/latest.json"):
        body = store.client.get_object(Bucket=bucket, Key=f"{prefix}/latest.json")["Body"].read()
        _, manifest_key = parse_s3_uri(json.loads(body)["manifest"])
        return manifest_key.rsplit("/", 1)[0]
    raise StoreError(f"{uri}: no {MANIFEST} (an incomplete or missing release) and no latest.json")


def fetch_release(store: StoreSession, uri: str, cache_dir: Path) -> Path:
    """Download a release into `cache_dir/<version>` and verify it against its manifest.

    A folder already verified is reused. Raises StoreError when the release is incomplete
    or any file's SHA-256 differs from the manifest.
    """
    prefix = resolve_release(store, uri)
    dest = cache_dir / prefix.replace("/", "__")
    if (dest / ".verified").is_file():
        return dest
    download_prefix(store.client, store.bucket, prefix + "/", dest)
    verify_release(dest)
    (dest / ".verified").write_text("ok\n")
    return dest


def verify_release(folder: Path) -> dict:
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise StoreError(f"{folder}: no {MANIFEST}; the release is incomplete")
    manifest = json.loads(manifest_path.read_text())
    bad = []
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            bad.append(f"{name} missing")
        elif sha256_file(path) != entry["sha256"]:
            bad.append(f"{name} SHA-256 differs")
    if bad:
        raise StoreError(f"{folder}: release does not match its manifest: {', '.join(bad)}")
    return manifest
