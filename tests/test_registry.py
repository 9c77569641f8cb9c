"""The registry against a real SeaweedFS over HTTP: the store's conditional writes under
concurrency, aliases moved by many promoters at once, rollback, and what a reader refuses."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tlpipe.registry import (
    Alias,
    RegistryError,
    alias_key,
    list_versions,
    move_alias,
    read_alias,
    resolve_alias,
    rollback,
)
from tlpipe.signing import SIGNATURE, SignatureError, sign, signing_key
from tlpipe.store import open_store

pytestmark = pytest.mark.slow

MODEL = "releases/reg"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TLPIPE_S3_ENDPOINT", raising=False)
        with open_store("tlpipe-registry", root=tmp_path_factory.mktemp("store")) as session:
            yield session


def _version(store, n: int, *, signed: bool = True, model: str = MODEL) -> str:
    """A complete release as the registry sees one: a manifest and its signature."""
    version = hashlib.sha256(f"{model}-{n}".encode()).hexdigest()[:16]
    manifest = json.dumps(
        {"name": "reg", "version": version, "created": f"2026-12-01T00:00:{n:02d}+00:00", "files": {},
         "metrics": {"accuracy": 0.5 + n / 100}},
        indent=2,
    ).encode()  # fmt: skip
    store.client.put_object(Bucket=store.bucket, Key=f"{model}/{version}/manifest.json", Body=manifest)
    if signed:
        body = sign(manifest, signing_key())
        store.client.put_object(Bucket=store.bucket, Key=f"{model}/{version}/{SIGNATURE}", Body=body)
    return version


def _status(err: ClientError) -> int:
    return err.response["ResponseMetadata"]["HTTPStatusCode"]


@pytest.mark.faults
def test_the_store_honours_if_none_match_and_if_match_under_concurrency(store) -> None:
    """Eight writers at once: one creates a key with If-None-Match, the rest get 412; eight
    writers holding the same ETag: one replaces it with If-Match, the rest get 412. Every
    body differs from every other, in both rounds: a replacement that wrote the bytes the
    key already held would keep its ETag, and a second If-Match would then rightly pass."""
    key = "conditions/probe.json"
    barrier = threading.Barrier(8)

    def put(i: int, **condition: str) -> int:
        body = f"{'creator' if 'IfNoneMatch' in condition else 'replacer'} {i}".encode()
        barrier.wait()
        try:
            store.client.put_object(Bucket=store.bucket, Key=key, Body=body, **condition)
            return 200
        except ClientError as err:
            return _status(err)

    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda i: put(i, IfNoneMatch="*"), range(8)))
    assert sorted(created) == [200] + [412] * 7, created
    etag = store.client.head_object(Bucket=store.bucket, Key=key)["ETag"]
    with ThreadPoolExecutor(8) as pool:
        replaced = list(pool.map(lambda i: put(i, IfMatch=etag), range(8)))
    assert sorted(replaced) == [200] + [412] * 7, replaced
    assert store.client.head_object(Bucket=store.bucket, Key=key)["ETag"] != etag


@pytest.mark.faults
def test_eight_concurrent_promoters_lose_no_move_and_never_tear_an_alias(store, tmp_path: Path) -> None:
    model = "releases/race"
    moves_each = 4
    # A version of its own for every move, so every move changes what the alias names.
    versions = [_version(store, n, model=model) for n in range(8 * moves_each)]
    key = signing_key()
    stop = threading.Event()
    reads: list[Alias] = []

    def promoter(i: int) -> None:
        for m in range(moves_each):
            move_alias(
                store, model, "production", versions[i * moves_each + m], f"promoter {i} move {m}", key
            )

    def reader() -> None:
        while not stop.is_set():
            found = read_alias(store, model, "production")  # verifies every read: never torn
            if found is not None:
                reads.append(found)

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(promoter, range(8)))
    finally:
        stop.set()
        watcher.join()
    final = read_alias(store, model, "production")
    assert final is not None
    history = final.history
    # Every move that returned is in the history, in one unbroken chain.
    assert len(history) == final.sequence == 8 * moves_each
    assert history[0]["from"] is None
    assert all(b["from"] == a["to"] for a, b in itertools.pairwise(history))
    assert final.version == history[-1]["to"] and sorted(h["to"] for h in history) == sorted(versions)
    assert sorted(h["why"] for h in history) == sorted(
        f"promoter {i} move {m}" for i in range(8) for m in range(4)
    )
    # What the reader saw, read while the promoters raced: complete, and never going back.
    assert reads and [r.sequence for r in reads] == sorted(r.sequence for r in reads)
    assert all(r.version in versions for r in reads)


@pytest.mark.faults
def test_an_alias_moves_only_to_a_complete_signed_version(store) -> None:
    key = signing_key()
    unsigned = _version(store, 20, signed=False)
    with pytest.raises(RegistryError, match="an unsigned release"):
        move_alias(store, MODEL, "candidate", unsigned, "test", key)
    with pytest.raises(RegistryError, match="no such release"):
        move_alias(store, MODEL, "candidate", "0123456789abcdef", "test", key)
    with pytest.raises(RegistryError, match="is not a release version"):
        move_alias(store, MODEL, "candidate", "../escape", "test", key)
    with pytest.raises(RegistryError, match="alias 'Prod!'"):
        move_alias(store, MODEL, "Prod!", _version(store, 21), "test", key)
    assert read_alias(store, MODEL, "candidate") is None


def test_rollback_returns_to_the_previous_holder_as_a_move_of_its_own(store) -> None:
    key = signing_key()
    a, b = _version(store, 30), _version(store, 31)
    move_alias(store, MODEL, "staging", a, "first", key)
    with pytest.raises(RegistryError, match="no previous version"):
        rollback(store, MODEL, "staging", "nothing before", key)
    move_alias(store, MODEL, "staging", b, "second", key)
    back = rollback(store, MODEL, "staging", "b misbehaves", key)
    assert (back.version, back.sequence, back.history[-1]["why"]) == (a, 3, "b misbehaves")
    assert [h["to"] for h in back.history] == [a, b, a]
    # The same version again changes nothing: a re-run with nothing new records no move.
    assert move_alias(store, MODEL, "staging", a, "again", key).sequence == 3


@pytest.mark.faults
def test_an_old_alias_object_written_back_is_refused_by_a_reader_that_saw_the_newer(
    store, tmp_path: Path
) -> None:
    """Anyone who may write to the bucket can copy back an older, validly signed alias
    object (pointing at an older release): a reader that saw the newer one refuses it."""
    key = signing_key()
    old, new = _version(store, 40), _version(store, 41)
    move_alias(store, MODEL, "served", old, "first", key)
    target = alias_key(MODEL, "served")
    stale = store.client.get_object(Bucket=store.bucket, Key=target)["Body"].read()
    move_alias(store, MODEL, "served", new, "better", key)
    assert resolve_alias(store, MODEL, "served", tmp_path / "seen").version == new
    store.client.put_object(Bucket=store.bucket, Key=target, Body=stale)
    with pytest.raises(SignatureError, match="sequence 1 .* is older than the 2"):
        resolve_alias(store, MODEL, "served", tmp_path / "seen")


@pytest.mark.faults
def test_an_alias_object_altered_or_copied_to_another_name_is_refused(store) -> None:
    key = signing_key()
    move_alias(store, MODEL, "blue", _version(store, 50), "first", key)
    raw = store.client.get_object(Bucket=store.bucket, Key=alias_key(MODEL, "blue"))["Body"].read()
    store.client.put_object(Bucket=store.bucket, Key=alias_key(MODEL, "green"), Body=raw)
    with pytest.raises(RegistryError, match="is alias 'blue'"):
        read_alias(store, MODEL, "green")
    record = json.loads(raw)
    record["body"]["version"] = _version(store, 51)
    store.client.put_object(
        Bucket=store.bucket, Key=alias_key(MODEL, "blue"), Body=json.dumps(record).encode()
    )
    with pytest.raises(SignatureError, match="does not match"):
        read_alias(store, MODEL, "blue")


def test_releases_lists_complete_versions_with_their_aliases(store) -> None:
    model = "releases/listed"
    key = signing_key()
    first, second = _version(store, 1, model=model), _version(store, 2, model=model)
    store.client.put_object(
        Bucket=store.bucket, Key=f"{model}/ffffffffffffffff/model.onnx", Body=b"cut short"
    )
    move_alias(store, model, "production", first, "first", key)
    move_alias(store, model, "candidate", second, "newer", key)
    listed = list_versions(store, model)
    assert [(v.version, v.aliases) for v in listed] == [(first, ("production",)), (second, ("candidate",))]
    assert listed[1].metrics == {"accuracy": 0.52}


def _complete(store, model: str, version: str) -> bool:
    keys = store.client.list_objects_v2(Bucket=store.bucket, Prefix=f"{model}/{version}/").get("KeyCount", 0)
    return keys == 2


@pytest.mark.faults
def test_gc_deletes_only_versions_no_alias_needs(store) -> None:
    """Six versions: production moved 1 -> 2 -> 3 and rolled back to 2; candidate moved along
    every publish to 6; one publish cut short. With --keep 1, only 4 goes: 1 and 3 stay
    (production named them), 2 and 6 (named now), 5 (candidate's rollback; its older
    history is only a list of publishes). A dry run deletes nothing; the incomplete version
    stays until it is older than incomplete_after."""
    from tlpipe.registry import collect_garbage

    model, key = "releases/collected", signing_key()
    v = [_version(store, n, model=model) for n in range(1, 7)]
    for version in v:
        move_alias(store, model, "candidate", version, "published", key)
    for version in v[:3]:
        move_alias(store, model, "production", version, "promoted", key)
    rollback(store, model, "production", "worse", key)
    cut = _version(store, 7, signed=False, model=model)

    dry = collect_garbage(store, model, 1, dry_run=True, grace=0)
    assert dry.dry_run and dry.deleted == (v[3],) and dry.objects == 2
    assert all(_complete(store, model, version) for version in v)

    done = collect_garbage(store, model, 1, grace=0)
    assert done.deleted == (v[3],) and done.objects == 2 and not done.dry_run
    assert done.kept == {
        v[0]: "production history",
        v[1]: "production",
        v[2]: "production rollback",
        v[4]: "candidate rollback",
        v[5]: "candidate",
    }
    assert [x.version for x in list_versions(store, model)] == [v[0], v[1], v[2], v[4], v[5], cut]
    assert store.client.list_objects_v2(Bucket=store.bucket, Prefix=f"{model}/{v[3]}/")["KeyCount"] == 0
    assert collect_garbage(store, model, 0, grace=0).deleted == ()
    assert collect_garbage(store, model, 0, grace=0, incomplete_after=0).deleted == (cut,)
    with pytest.raises(RegistryError, match="keep at least 0"):
        collect_garbage(store, model, -1)


@pytest.mark.faults
def test_gc_keeps_a_version_promoted_while_it_was_being_collected(
    store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mover that checked the version just before gc took its signature away writes the
    alias while gc waits: gc reads the aliases again, puts the signature back and keeps it,
    whole and verifiable."""
    import tlpipe.registry as registry

    model, key = "releases/raced", signing_key()
    old, new = _version(store, 1, model=model), _version(store, 2, model=model)
    move_alias(store, model, "candidate", new, "published", key)

    def promote_meanwhile(seconds: float) -> None:
        with monkeypatch.context() as m:
            m.setattr(registry, "check_version", lambda *a, **k: {})  # its check came earlier
            move_alias(store, model, "production", old, "promoted by hand", key)

    monkeypatch.setattr(registry.time, "sleep", promote_meanwhile)
    done = registry.collect_garbage(store, model, 0, grace=1)
    assert done.deleted == () and done.kept[old] == "production (named while collecting)"
    assert registry.check_version(store, model, old)["version"] == old
