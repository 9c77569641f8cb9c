"""Reading a published release back: resolve the version, download, verify every SHA-256."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tlpipe.data import sha256_file
from tlpipe.errors import StoreError
from tlpipe.registry import PRODUCTION, resolve_alias
from tlpipe.s3uri import parse_s3_uri
from tlpipe.signing import SIGNATURE, SignatureError, trusted_keys, verify
from tlpipe.store import StoreSession, download_prefix, object_exists, read_object

MANIFEST = "manifest.json"

log = logging.getLogger(__name__)


def resolve_release(store: StoreSession, uri: str, seen_dir: Path) -> str:
    """The key prefix of the release `uri` names: a version folder
    (`s3://bucket/<prefix>/<model>/<version>`), or a model folder and an alias
    (`s3://bucket/<prefix>/<model>@candidate`; a model folder alone means its `production`),
    the alias verified and never older than this reader saw before (`tlpipe.registry`,
    which keeps what it saw under `seen_dir`)."""
    bucket, key = parse_s3_uri(uri)
    if bucket != store.bucket:
        raise StoreError(f"{uri}: bucket {bucket!r} is not the session's bucket {store.bucket!r}")
    model, at, alias = key.rstrip("/").partition("@")
    model = model.rstrip("/")
    if not at and object_exists(store.client, bucket, f"{model}/{MANIFEST}"):
        return model
    found = resolve_alias(store, model, alias if at else PRODUCTION, seen_dir)
    return f"{model}/{found.version}"


def fetch_release(store: StoreSession, uri: str, cache_dir: Path) -> Path:
    """The release `uri` names (`resolve_release`; the aliases it has read are remembered in
    the `aliases` folder beside `cache_dir`), in `cache_dir/<prefix>`, verified on every
    call: first the store's manifest against its signature (a key trusted here,
    tlpipe.signing), then every file against the manifest.

    A cached copy is used only when its manifest is byte for byte the store's and every file
    still has the manifest's SHA-256; otherwise it is deleted (with a warning saying why) and
    downloaded again. A download goes to a folder of its own and takes the cache's place only
    once verified, so the cache never holds part of a release. Raises StoreError when the
    release is incomplete or a downloaded file's SHA-256 differs from the manifest,
    SignatureError when the manifest is unsigned or its signature is not good.
    """
    prefix = resolve_release(store, uri, cache_dir.parent / "aliases")
    dest = cache_dir / prefix.replace("/", "__")
    manifest_key = f"{prefix}/{MANIFEST}"
    where = f"s3://{store.bucket}/{prefix}"
    manifest = read_object(store.client, store.bucket, manifest_key)
    if manifest is None:
        raise StoreError(f"{where}: no {MANIFEST}; the release is incomplete")
    signature = read_object(store.client, store.bucket, f"{prefix}/{SIGNATURE}")
    if signature is None:
        raise SignatureError(f"{where}: no {SIGNATURE}, an unsigned release (its publish was cut short)")
    verify(manifest, signature, trusted_keys(), where)
    if dest.is_dir():
        try:
            if (dest / MANIFEST).read_bytes() != manifest:
                raise StoreError(f"{dest / MANIFEST} is not the store's")
            verify_release(dest)
            return dest
        except (OSError, ValueError, StoreError) as err:
            log.warning("%s: %s; downloading it again", dest, err)
            shutil.rmtree(dest)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=cache_dir))
    try:
        download_prefix(store.client, store.bucket, prefix + "/", partial)
        if (partial / MANIFEST).read_bytes() != manifest:
            raise StoreError(f"s3://{store.bucket}/{manifest_key} changed during the download")
        verify_release(partial)
        os.rename(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
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
