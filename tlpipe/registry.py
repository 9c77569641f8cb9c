"""The model registry on S3: immutable, content-addressed versions (what publish uploads)
and aliases (`candidate`, `production`, any name a user picks) that each point at one.

    <prefix>/<model>/<version>/manifest.json (+ .sig)   a version (tasks.publish)
    <prefix>/<model>/aliases/<alias>.json               an alias

An alias object holds the version it points at, its whole history (every move: from, to,
by, at, why; oldest first) and a sequence number (the history's length), signed with the
publisher's ed25519 key (tlpipe.signing) over all of it. A move reads the alias and its
ETag, appends to the history and writes with If-Match on that ETag (If-None-Match for a new
alias): a mover that loses the race (412, or AWS's 409 ConditionalRequestConflict) reads
again and tries again, so no move is lost and no reader sees half of one. An alias moves
only to a complete version (its manifest signed by a trusted key). A reader checks the
signature, that the object is the alias it was read as, and that its sequence never goes
back from what this reader saw before: an older alias object written back over the newer
one (a rollback by anyone who may write to the bucket) is refused.
"""

from __future__ import annotations

import base64
import getpass
import json
import logging
import os
import random
import re
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tlpipe.errors import StoreError, TlpipeError
from tlpipe.files import write_json
from tlpipe.params import PublishParams
from tlpipe.signing import ALGORITHM, MANIFEST_NAME, SIGNATURE, SignatureError, key_id, trusted_keys, verify
from tlpipe.store import StoreSession, read_object

log = logging.getLogger(__name__)

ALIASES = "aliases"
CANDIDATE, PRODUCTION = "candidate", "production"
ALIAS_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# A mover that loses this many races in a row gives up (a store that never lets a
# conditional write through, not a busy one: eight movers at once need a handful).
MOVE_ATTEMPTS = 64
# How long `collect_garbage` waits, once it has made the versions it deletes incomplete,
# before it reads the aliases again: longer than any move's check-then-write takes.
GC_GRACE_SECONDS = 5.0
# An incomplete version (no signed manifest) untouched this long is a publish cut short, not
# one under way: `collect_garbage` deletes it.
INCOMPLETE_AFTER_SECONDS = 24 * 3600.0
_CONFLICT = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


class RegistryError(TlpipeError):
    """An alias cannot be moved or read: an unknown or incomplete version, no previous
    holder to roll back to, an alias object that is not what it claims, or one older than
    this reader has seen."""


@dataclass(frozen=True)
class Alias:
    """An alias as read from (or written to) the store; `etag` is what a move's If-Match
    names."""

    model: str
    name: str
    version: str
    sequence: int
    history: tuple[dict[str, Any], ...]
    etag: str

    @property
    def previous(self) -> str | None:
        """The version this alias pointed at before its last move."""
        return self.history[-1]["from"] if self.history else None


def model_prefix(p: PublishParams) -> str:
    """Where the model `p` publishes keeps its versions and aliases in the bucket."""
    return f"{p.prefix}/{p.model_name}"


def _trusting(key: Ed25519PrivateKey) -> dict[str, Ed25519PublicKey]:
    """The keys trusted here, and the public half of the key that signs the moves."""
    return trusted_keys() | {key_id(key.public_key()): key.public_key()}


def check_alias_name(alias: str) -> str:
    if not ALIAS_NAME.fullmatch(alias):
        raise RegistryError(
            f"alias {alias!r} must be 1-63 of a-z, 0-9, '_' and '-', starting with a letter or digit"
        )
    return alias


def alias_key(model: str, alias: str) -> str:
    """The object key of `alias` of the model at key prefix `model` (`<prefix>/<name>`)."""
    return f"{model}/{ALIASES}/{check_alias_name(alias)}.json"


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _signed(body: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    record = {
        "body": body,
        "signature": {
            "algorithm": ALGORITHM,
            "key_id": key_id(key.public_key()),
            "signature": base64.b64encode(key.sign(_canonical(body))).decode(),
        },
    }
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def _parse(raw: bytes, model: str, alias: str, trusted: dict[str, Ed25519PublicKey], where: str) -> dict:
    """The body of a signed alias object, checked: signed by a trusted key, and naming this
    model and alias (an alias object copied to another name is refused)."""
    try:
        record = json.loads(raw)
        body, signature = record["body"], json.dumps(record["signature"]).encode()
    except (ValueError, LookupError, TypeError) as err:
        raise RegistryError(f"{where}: not a signed alias object ({err})") from err
    verify(_canonical(body), signature, trusted, where, signed="the alias")
    if body.get("model") != model or body.get("alias") != alias:
        raise RegistryError(
            f"{where}: the object is alias {body.get('alias')!r} of {body.get('model')!r}, "
            f"not {alias!r} of {model!r}"
        )
    return body


def read_alias(
    store: StoreSession, model: str, alias: str, trusted: dict[str, Ed25519PublicKey] | None = None
) -> Alias | None:
    """`alias` as the store holds it now, verified; None when it was never set."""
    key = alias_key(model, alias)
    where = f"s3://{store.bucket}/{key}"
    try:
        got = store.client.get_object(Bucket=store.bucket, Key=key)
        raw = got["Body"].read()
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise StoreError(f"cannot read {where}: {err}") from err
    except BotoCoreError as err:
        raise StoreError(f"cannot read {where}: {err}") from err
    body = _parse(raw, model, alias, trusted if trusted is not None else trusted_keys(), where)
    return Alias(
        model, alias, body["version"], int(body["sequence"]), tuple(body["history"]), got["ETag"].strip('"')
    )


def check_version(
    store: StoreSession, model: str, version: str, trusted: dict[str, Ed25519PublicKey] | None = None
) -> dict[str, Any]:
    """The manifest of a complete version (signed by a trusted key); RegistryError when the
    version is missing or incomplete, SignatureError when its signature is not good."""
    where = f"s3://{store.bucket}/{model}/{version}"
    if not re.fullmatch(r"[0-9a-f]{16}", version):
        raise RegistryError(f"{version!r} is not a release version (16 hex digits)")
    manifest = read_object(store.client, store.bucket, f"{model}/{version}/{MANIFEST_NAME}")
    if manifest is None:
        raise RegistryError(f"{where}: no such release (no {MANIFEST_NAME})")
    signature = read_object(store.client, store.bucket, f"{model}/{version}/{SIGNATURE}")
    if signature is None:
        raise RegistryError(f"{where}: an unsigned release (its publish was cut short); publish it again")
    verify(manifest, signature, trusted if trusted is not None else trusted_keys(), where)
    return json.loads(manifest)


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def move_alias(
    store: StoreSession,
    model: str,
    alias: str,
    version: str,
    why: str,
    key: Ed25519PrivateKey,
    *,
    expect: str | None = None,
    if_unset: bool = False,
) -> Alias:
    """Point `alias` at `version` (a complete release), appending the move to its history;
    a move to the version it already names changes nothing. With `expect`, the move happens
    only while the alias still names that version (RegistryError otherwise); with
    `if_unset`, only when the alias names nothing yet (else it is returned as it is). Raises
    RegistryError or SignatureError when the version is not a complete signed release,
    StoreError when the store refuses the write or keeps refusing it."""
    trusted = _trusting(key)
    target = alias_key(model, alias)
    for attempt in range(MOVE_ATTEMPTS):
        current = read_alias(store, model, alias, trusted)
        held = current.version if current is not None else None
        if expect is not None and held != expect:
            raise RegistryError(f"alias {alias} of {model} now names {held}, not {expect}; not moved")
        if current is not None and (held == version or if_unset):
            return current
        # Checked right before every write: `collect_garbage` makes a version incomplete
        # before it looks for the aliases that need it one last time.
        check_version(store, model, version, trusted)
        entry = {"from": held, "to": version, "by": _actor(), "at": _now(), "why": why}
        history = (*(current.history if current is not None else ()), entry)
        body = {
            "model": model,
            "alias": alias,
            "version": version,
            "sequence": len(history),
            "history": history,
        }
        condition = {"IfMatch": f'"{current.etag}"'} if current is not None else {"IfNoneMatch": "*"}
        try:
            put = store.client.put_object(
                Bucket=store.bucket,
                Key=target,
                Body=_signed(body, key),
                ContentType="application/json",
                **condition,
            )
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") not in _CONFLICT:
                raise StoreError(f"cannot move alias s3://{store.bucket}/{target}: {err}") from err
            # Another mover got there first: read what it wrote and try again, after a
            # random pause that grows with the tries (so movers do not collide in step).
            time.sleep(random.uniform(0, min(0.5, 0.005 * 2**attempt)))
            continue
        except BotoCoreError as err:
            raise StoreError(f"cannot move alias s3://{store.bucket}/{target}: {err}") from err
        log.info("alias %s of %s: %s -> %s (%s)", alias, model, held, version, why)
        return Alias(model, alias, version, len(history), history, put["ETag"].strip('"'))
    raise StoreError(
        f"alias s3://{store.bucket}/{target}: {MOVE_ATTEMPTS} conditional writes in a row lost to other "
        "writers; the store may not honour If-Match"
    )


def rollback(store: StoreSession, model: str, alias: str, why: str, key: Ed25519PrivateKey) -> Alias:
    """Point `alias` back at the version it named before its last move (itself a move, kept
    in the history). RegistryError when it was never moved."""
    current = read_alias(store, model, alias, _trusting(key))
    if current is None or current.previous is None:
        raise RegistryError(f"alias {alias} of {model} has no previous version to roll back to")
    return move_alias(store, model, alias, current.previous, why, key, expect=current.version)


def resolve_alias(store: StoreSession, model: str, alias: str, seen_dir: Path) -> Alias:
    """`alias` verified, and never older than this reader has seen: its sequence is kept
    under `seen_dir`, and an alias object with a lower one (an older object written back
    over the newer one) is refused. RegistryError when the alias is not set."""
    found = read_alias(store, model, alias)
    where = f"s3://{store.bucket}/{alias_key(model, alias)}"
    if found is None:
        raise RegistryError(f"{where}: the alias {alias!r} is not set for {model}")
    record = seen_dir / store.bucket / model / f"{alias}.json"
    seen = json.loads(record.read_text()) if record.is_file() else {"sequence": 0}
    if found.sequence < seen["sequence"]:
        raise SignatureError(
            f"{where}: sequence {found.sequence} ({found.version}) is older than the {seen['sequence']} "
            f"({seen['version']}) read here before: an old alias object written back; refused"
        )
    if found.sequence > seen["sequence"]:
        record.parent.mkdir(parents=True, exist_ok=True)
        write_json(record, {"sequence": found.sequence, "version": found.version})
    return found


@dataclass(frozen=True)
class Version:
    """A complete release of a model, with what its manifest says and the aliases on it."""

    version: str
    created: str
    metrics: dict[str, Any]
    aliases: tuple[str, ...]


def _listing(store: StoreSession, model: str) -> tuple[dict[str, datetime], list[str]]:
    """The model's version folders (each with the time its newest object was written) and
    the names of its aliases."""
    paginator = store.client.get_paginator("list_objects_v2")
    versions: dict[str, datetime] = {}
    names = []
    try:
        for page in paginator.paginate(Bucket=store.bucket, Prefix=f"{model}/"):
            for obj in page.get("Contents", []):
                folder, _, rest = obj["Key"][len(model) + 1 :].partition("/")
                if folder == ALIASES:
                    name = rest.removesuffix(".json")
                    if rest.endswith(".json") and ALIAS_NAME.fullmatch(name):
                        names.append(name)
                elif rest:
                    versions[folder] = max(versions.get(folder, obj["LastModified"]), obj["LastModified"])
    except (ClientError, BotoCoreError) as err:
        raise StoreError(f"cannot list s3://{store.bucket}/{model}/: {err}") from err
    return versions, names


def read_aliases(store: StoreSession, model: str, names: list[str] | None = None) -> list[Alias]:
    """Every alias of the model (or those `names`), each verified."""
    names = _listing(store, model)[1] if names is None else names
    return [found for name in names if (found := read_alias(store, model, name)) is not None]


def references(aliases: list[Alias]) -> dict[str, list[str]]:
    """Each version the aliases need, with why: the version an alias names now, the one its
    rollback returns to, and every version any alias but `candidate` ever named (a record
    of what was deliberately promoted). `candidate` moves on every publish, so its history
    is the list of publishes and keeps nothing beyond its rollback target."""
    needed: dict[str, list[str]] = {}

    def need(version: str | None, why: str) -> None:
        if version and why not in needed.setdefault(version, []):
            needed[version].append(why)

    for alias in aliases:
        need(alias.version, alias.name)
        need(alias.previous, f"{alias.name} rollback")
        if alias.name != CANDIDATE:
            for entry in alias.history:
                if entry["to"] not in (alias.version, alias.previous):
                    need(entry["to"], f"{alias.name} history")
    return needed


def list_versions(store: StoreSession, model: str) -> list[Version]:
    """Every version of the model with a manifest, oldest first, with its aliases."""
    folders, names = _listing(store, model)
    aliases: dict[str, list[str]] = {}
    for found in read_aliases(store, model, names):
        aliases.setdefault(found.version, []).append(found.name)
    found_versions = []
    for version in folders:
        body = read_object(store.client, store.bucket, f"{model}/{version}/{MANIFEST_NAME}")
        if body is None:
            continue  # an upload cut short: not a release
        manifest = json.loads(body)
        found_versions.append(
            Version(
                version,
                manifest.get("created", ""),
                manifest.get("metrics", {}),
                tuple(sorted(aliases.get(version, []))),
            )
        )
    return sorted(found_versions, key=lambda v: (v.created, v.version))


def lineage(store: StoreSession, model: str, version: str) -> dict[str, Any]:
    """Where `version` came from and where it went: its verified manifest's lineage (input
    data hashes, source model, fine-tuned weights, ONNX files), its git commit and dvc.lock
    hashes, and every alias move that named it."""
    manifest = check_version(store, model, version)
    moves = []
    named_by = []
    for alias in read_aliases(store, model):
        if alias.version == version:
            named_by.append(alias.name)
        moves += [
            {"alias": alias.name, **entry}
            for entry in alias.history
            if version in (entry["from"], entry["to"])
        ]
    return {
        "version": version,
        "created": manifest.get("created"),
        "setting": manifest.get("setting"),
        "git": manifest.get("git"),
        "dvc_lock": manifest.get("dvc_lock"),
        "lineage": manifest.get("lineage"),
        "files": {name: entry["sha256"] for name, entry in manifest.get("files", {}).items()},
        "aliases": sorted(named_by),
        "moves": sorted(moves, key=lambda m: m["at"]),
    }


@dataclass(frozen=True)
class Collection:
    """What `collect_garbage` did (or, dry, would do): the versions deleted, those kept
    with why, and the object count deleted."""

    deleted: tuple[str, ...]
    kept: dict[str, str]
    objects: int
    dry_run: bool


def collect_garbage(
    store: StoreSession,
    model: str,
    keep: int,
    *,
    dry_run: bool = False,
    incomplete_after: float = INCOMPLETE_AFTER_SECONDS,
    grace: float = GC_GRACE_SECONDS,
) -> Collection:
    """Delete the model's versions that no alias needs (`references`): all but the `keep`
    newest complete versions, except those; and incomplete ones (no signed manifest)
    untouched for `incomplete_after` seconds (a publish or a collection cut short; a
    younger one may be a publish under way).

    Each doomed version first loses its signature, so no alias can move to it (a move checks
    the version right before it writes); `grace` seconds later the aliases are read again,
    and a version one of them came to need meanwhile gets its signature back and is kept.
    Then its files go, manifest last. RegistryError or SignatureError when an alias cannot
    be read and verified (nothing is deleted then), StoreError when the store refuses.
    """
    if keep < 0:
        raise RegistryError(f"gc --keep {keep}: keep at least 0 versions")
    folders, names = _listing(store, model)
    needed = references(read_aliases(store, model, names))
    complete, stale = [], []
    now = datetime.now(UTC)
    for version in sorted(folders):
        if not re.fullmatch(r"[0-9a-f]{16}", version):
            continue  # not a folder publish writes
        try:
            manifest = check_version(store, model, version)
        except (RegistryError, SignatureError):
            if (now - folders[version]).total_seconds() >= incomplete_after:
                stale.append(version)
            continue
        complete.append((manifest.get("created", ""), version))
    complete.sort()
    newest = {version for _, version in complete[len(complete) - keep :]} if keep else set()
    kept: dict[str, str] = {}
    for version in [v for _, v in complete] + stale:
        if version in needed:
            kept[version] = ", ".join(needed[version])
        elif version in newest:
            kept[version] = f"one of the {keep} newest"
    doomed = [v for _, v in complete if v not in kept] + [v for v in stale if v not in kept]
    if dry_run:
        return Collection(tuple(doomed), kept, sum(len(_keys(store, model, v)) for v in doomed), True)
    signatures = {}
    for version in doomed:
        sig_key = f"{model}/{version}/{SIGNATURE}"
        signatures[version] = read_object(store.client, store.bucket, sig_key)
        _delete(store, [sig_key])
    if doomed:
        time.sleep(grace)
        needed = references(read_aliases(store, model))
    deleted, objects = [], 0
    for version in doomed:
        if version in needed:
            body, sig_key = signatures[version], f"{model}/{version}/{SIGNATURE}"
            try:
                if body is not None:
                    store.client.put_object(Bucket=store.bucket, Key=sig_key, Body=body, IfNoneMatch="*")
            except (ClientError, BotoCoreError) as err:
                raise StoreError(
                    f"cannot put back s3://{store.bucket}/{sig_key}, which {', '.join(needed[version])} "
                    f"came to need while gc ran: {err}; restore it from outputs/publish/{SIGNATURE} of the "
                    "run that published it"
                ) from err
            kept[version] = f"{', '.join(needed[version])} (named while collecting)"
            log.warning("gc: %s of %s came to be needed meanwhile; kept", version, model)
            continue
        keys = _keys(store, model, version)
        manifest = f"{model}/{version}/{MANIFEST_NAME}"
        _delete(store, [k for k in keys if k != manifest] + [k for k in keys if k == manifest])
        deleted.append(version)
        objects += len(keys) + (signatures[version] is not None)
        log.info("gc: deleted %s of %s (%d objects)", version, model, len(keys))
    return Collection(tuple(deleted), kept, objects, False)


def _keys(store: StoreSession, model: str, version: str) -> list[str]:
    keys = []
    try:
        pages = store.client.get_paginator("list_objects_v2").paginate(
            Bucket=store.bucket, Prefix=f"{model}/{version}/"
        )
        for page in pages:
            keys += [obj["Key"] for obj in page.get("Contents", [])]
    except (ClientError, BotoCoreError) as err:
        raise StoreError(f"cannot list s3://{store.bucket}/{model}/{version}/: {err}") from err
    return keys


def _delete(store: StoreSession, keys: list[str]) -> None:
    """Delete `keys` one by one, in order (the order is what keeps a half-deleted version
    incomplete rather than torn)."""
    for key in keys:
        try:
            store.client.delete_object(Bucket=store.bucket, Key=key)
        except (ClientError, BotoCoreError) as err:
            raise StoreError(f"cannot delete s3://{store.bucket}/{key}: {err}") from err


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
