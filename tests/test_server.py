"""`tlpipe serve` as a real HTTP server in its own process, serving by alias from a real
SeaweedFS: the Open Inference Protocol's endpoints, request validation and limits, and the
switch to a new version when the alias moves, under load, with a failed load keeping the
old version serving."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import embedded_store, free_port, publish_staged, tiny_params, worse_export
from tlpipe.registry import move_alias
from tlpipe.serve import load_bundle
from tlpipe.signing import signing_key

pytestmark = pytest.mark.slow

MODEL = "served"
TEXTS = ["@united where is my bag", "love it @jetblue", "the flight was ok", "delayed again"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    with embedded_store("tlpipe-serve", tmp_path_factory.mktemp("store")) as session:
        yield session


def _publish(root: Path, store, **overrides):
    return publish_staged(root, store, **{"publish.model_name": MODEL, **overrides})


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"tlpipe serve exited {server.returncode}: {server.stderr.read()}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"tlpipe serve did not become ready within {timeout:.0f} s")


def _infer(url: str, texts: list[str], **extra) -> httpx.Response:
    body = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}], **extra}
    return httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=30)


def _until_version(url: str, version: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = httpx.get(f"{url}/v2/models/{MODEL}", timeout=5).json()
        if meta["versions"] == [version]:
            return meta
        time.sleep(0.2)
    raise AssertionError(f"the server still serves {meta['versions']}, not {version}: {meta}")


@pytest.mark.faults
def test_serve_by_alias_answers_v2_validates_and_switches_atomically_when_the_alias_moves(
    staged: Path, finetuned: Path, prepared: Path, store, tmp_path: Path
) -> None:
    """The production release served over HTTP answers as the bundle does on its own, in
    the V2 shape and on /predict; malformed requests get 400 naming the problem, oversized
    ones 413. Moving production to a worse model switches the server while a client keeps
    asking, every answer whole from one version; a version whose download does not verify
    leaves the last good one serving and is shown in the model metadata."""
    good = tmp_path / "good"
    shutil.copytree(staged, good)
    first = _publish(good, store)
    worse = tmp_path / "worse"
    shutil.copytree(good, worse)
    shutil.rmtree(worse / "outputs/export")
    shutil.copytree(worse_export(finetuned, prepared, tmp_path / "worse-stages"), worse / "outputs/export")
    second = _publish(worse, store)  # held by the champion gate: candidate only
    assert second.held and second.version != first.version

    (good / "params.yaml").write_text(
        yaml.safe_dump(tiny_params(**{"publish.bucket": store.bucket, "publish.model_name": MODEL}))
    )
    (good / "dvc.yaml").write_text("stages: {}\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The publisher's key (TLPIPE_SIGNING_KEY) is the one trusted; the release cache is the
    # server's own.
    env = {
        **os.environ,
        **store.env,
        "TLPIPE_S3_ENDPOINT": store.endpoint_url,
        "HOME": str(tmp_path / "home"),
    }
    command = [
        sys.executable, "-m", "tlpipe.cli", "serve", "--port", str(port), "--poll", "0.3",
        "--max-request-bytes", "20000", "--max-batch", "32", "--threads", "1",
    ]  # fmt: skip
    server = subprocess.Popen(command, cwd=good, env=env, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(url, server)
        assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
        assert httpx.get(f"{url}/v2").json()["name"] == "tlpipe"
        meta = httpx.get(f"{url}/v2/models/{MODEL}").json()
        assert meta["versions"] == [first.version] and meta["inputs"][0]["name"] == "text"
        assert httpx.get(f"{url}/v2/models/{MODEL}/ready").json()["ready"] is True

        want = load_bundle(good / "outputs/export/bundle").predict(TEXTS)
        answer = _infer(url, TEXTS, id="req-1")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model_version"] == first.version and body["id"] == "req-1"
        outputs = {o["name"]: o for o in body["outputs"]}
        assert outputs["label"] == {
            "name": "label",
            "shape": [4],
            "datatype": "BYTES",
            "data": [p["label"] for p in want],
        }
        assert outputs["score"]["datatype"] == "FP32"
        assert outputs["score"]["data"] == pytest.approx([p["score"] for p in want], abs=1e-5)
        only = _infer(url, TEXTS[:1], outputs=[{"name": "label"}]).json()["outputs"]
        assert [o["name"] for o in only] == ["label"]
        simple = httpx.post(f"{url}/predict", json={"inputs": TEXTS}).json()
        assert simple["model_version"] == first.version
        assert [p["label"] for p in simple["predictions"]] == [p["label"] for p in want]

        infer = f"{url}/v2/models/{MODEL}/infer"
        tensor = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}

        def v2(**changed) -> httpx.Response:
            return httpx.post(infer, json={"inputs": [{**tensor, **changed}]})

        refused = {
            "not json": (httpx.post(infer, content=b"{oops"), 400, "not JSON"),
            "no inputs": (httpx.post(infer, json={"inputs": []}), 400, 'non-empty "inputs"'),
            "wrong name": (v2(name="image"), 400, "takes one input, 'text'"),
            "wrong type": (v2(datatype="FP32"), 400, "expected BYTES"),
            "wrong shape": (v2(shape=[2]), 400, "holds 2 values, data 1"),
            "not strings": (v2(data=[3]), 400, "must be a string"),
            "bad outputs": (
                _infer(url, ["hi"], outputs=[{"name": "logits"}]),
                400,
                "unknown outputs ['logits']",
            ),
            "other model": (
                httpx.post(f"{url}/v2/models/other/infer", json={"inputs": [tensor]}),
                404,
                "no model 'other'",
            ),
            "too many": (
                _infer(url, ["hi"] * 33),
                413,
                "33 inputs in one request, more than the server's limit 32",
            ),
            "too large": (_infer(url, ["x" * 30000]), 413, "more than the limit 20000"),
            "bad predict": (httpx.post(f"{url}/predict", json={"inputs": [1]}), 400, "must be a string"),
        }
        for case, (got, status, message) in refused.items():
            assert got.status_code == status and message in got.json()["error"], (
                case,
                got.status_code,
                got.text,
            )

        # A client asks without pause while production moves to the worse model.
        want_worse = load_bundle(worse / "outputs/export/bundle").predict(TEXTS)
        by_version = {
            first.version: [p["label"] for p in want],
            second.version: [p["label"] for p in want_worse],
        }
        seen, errors, stop = [], [], threading.Event()

        def ask() -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    got = client.post(f"{url}/predict", json={"inputs": TEXTS})
                    if got.status_code != 200:
                        errors.append(got.text)
                        continue
                    body = got.json()
                    seen.append((body["model_version"], [p["label"] for p in body["predictions"]]))

        client = threading.Thread(target=ask)
        client.start()
        time.sleep(1.0)
        move_alias(store, f"releases/{MODEL}", "production", second.version, "by hand", signing_key())
        _until_version(url, second.version)
        time.sleep(1.0)
        stop.set()
        client.join()
        assert not errors, errors[:3]
        assert {v for v, _ in seen} == {first.version, second.version}
        assert all(labels == by_version[v] for v, labels in seen)
        switch = [v for v, _ in seen].index(second.version)
        assert all(v == second.version for v, _ in seen[switch:])  # never back

        # A third version, complete and signed, whose model.onnx in the bucket was replaced.
        parity = good / "outputs/export/parity.json"
        parity.write_text(json.dumps({**json.loads(parity.read_text()), "note": "retrained"}))
        third = _publish(good, store, **{"publish.promote": False})
        key = f"releases/{MODEL}/{third.version}/model.onnx"
        store.client.put_object(Bucket=store.bucket, Key=key, Body=b"not a model")
        move_alias(store, f"releases/{MODEL}", "production", third.version, "by hand", signing_key())
        deadline = time.monotonic() + 60
        while "failed_load" not in (meta := httpx.get(f"{url}/v2/models/{MODEL}").json())["parameters"]:
            assert time.monotonic() < deadline, meta
            time.sleep(0.2)
        failed = meta["parameters"]["failed_load"]
        assert meta["versions"] == [second.version] and failed["version"] == third.version
        assert "model.onnx SHA-256 differs" in failed["error"]
        still = httpx.post(f"{url}/predict", json={"inputs": TEXTS}).json()
        assert still["model_version"] == second.version
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_a_bundle_folder_under_the_projects_model_name(staged: Path, tmp_path: Path) -> None:
    """`tlpipe serve --bundle` serves a folder as it is, named after publish.model_name of
    the project it runs in, its version "local" (no manifest)."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(**{"publish.model_name": MODEL})))
    (project / "dvc.yaml").write_text("stages: {}\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bundle = staged / "outputs/export/bundle"
    command = [sys.executable, "-m", "tlpipe.cli", "serve", "--bundle", str(bundle), "--port", str(port)]
    server = subprocess.Popen(command, cwd=project, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(url, server)
        assert httpx.get(f"{url}/v2/models/{MODEL}").json()["versions"] == ["local"]
        labels = _infer(url, TEXTS).json()["outputs"][0]["data"]
        assert labels == [p["label"] for p in load_bundle(bundle).predict(TEXTS)]
    finally:
        server.terminate()
        server.wait(timeout=30)
