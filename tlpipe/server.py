"""`tlpipe serve`: an HTTP server for a release, loaded by alias and switched when it moves.

It speaks the Open Inference Protocol (KServe V2) over JSON, plus a plain `POST /predict`:

    GET  /v2/health/live, /v2/health/ready      liveness; ready once a model is loaded
    GET  /v2                                    server metadata
    GET  /v2/models/<name>[/ready]              model metadata (its version, setting, input)
    POST /v2/models/<name>/infer                {"inputs": [{"name", "shape", "datatype", "data"}]}
    POST /predict                               {"inputs": [...]} -> {"version", "predictions"}

The model is a `Predictor` on onnxruntime (no torch). A `Watcher` reads the alias every
`poll` seconds; when it names another version, that release is downloaded and verified
(`tlpipe.release.fetch_release`) and loaded beside the serving one, which it then replaces
in one assignment: a request is answered wholly by one version, and says which. A load that
fails keeps the old version serving, is logged and shown in the model metadata, and is
tried again with a growing pause. Requests larger than `max_request_bytes` or holding more
than `max_batch` inputs get 413; malformed ones 400, naming the problem.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from tlpipe.errors import TlpipeError
from tlpipe.serve import bundle_setting, from_wire, load_bundle
from tlpipe.setting import Predictor, spec

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8 * 2**20
MAX_BATCH = 256
# The longest pause between two tries at loading a version that failed to load.
MAX_RETRY_SECONDS = 600.0
V2_TYPES = {str: "BYTES", float: "FP32", int: "INT64", bool: "BOOL"}


class RequestError(Exception):
    """A request the server refuses; `status` is the HTTP status it answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Loaded:
    """One version ready to serve."""

    version: str
    folder: Path
    setting: str
    predictor: Predictor
    loaded_at: float

    @property
    def role(self) -> str:
        """The input a request carries: the setting's first column role (text or image)."""
        return spec(self.setting).roles[0]


def load(version: str, folder: Path, threads: int | None, precision: str) -> Loaded:
    predictor = load_bundle(folder, threads=threads, precision=precision)
    return Loaded(version, folder, bundle_setting(folder), predictor, time.time())


class Watcher:
    """The version being served, and the thread that follows the alias.

    `resolve()` says which version the alias names now; `fetch(version)` returns the
    verified release folder of a version. Both may raise; the serving version stays."""

    def __init__(
        self,
        resolve: Callable[[], str],
        fetch: Callable[[str], Path],
        poll: float,
        threads: int | None = None,
        precision: str = "fp32",
    ) -> None:
        self._resolve, self._fetch, self.poll = resolve, fetch, poll
        self._threads, self._precision = threads, precision
        version = resolve()
        self.current = load(version, fetch(version), threads, precision)
        self.failed: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._follow, name="tlpipe-alias-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def check(self) -> None:
        """Load the version the alias names now, if it is another one (and not one that
        failed and waits for its next try); raises what resolving or loading raised."""
        version = self._resolve()
        if version == self.current.version:
            self.failed = None
            return
        failed = self.failed
        if failed and failed["version"] == version and time.monotonic() < failed["retry_at"]:
            return
        try:
            loaded = load(version, self._fetch(version), self._threads, self._precision)
        except Exception as err:
            tries = failed["tries"] + 1 if failed and failed["version"] == version else 1
            pause = min(self.poll * 2**tries, MAX_RETRY_SECONDS)
            self.failed = {
                "version": version,
                "error": f"{type(err).__name__}: {err}",
                "tries": tries,
                "retry_at": time.monotonic() + pause,
            }
            log.error("serve: %s failed to load (try %d, next in %.0f s): %s", version, tries, pause, err)
            return
        previous, self.current, self.failed = self.current.version, loaded, None
        log.info("serve: switched from %s to %s", previous, version)

    def _follow(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.check()
            except Exception as err:  # the alias cannot be read now: keep serving
                log.warning("serve: cannot read the alias: %s", err)


def _flat(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [x for item in data for x in _flat(item)]
    return [data]


def v2_inputs(body: Any, role: str, setting: str, max_batch: int) -> list[Any]:
    """The raw input rows of a V2 inference request, checked: one input tensor named
    `role`, BYTES, its shape [N] or [N, 1] matching its data; an image's bytes are base64."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise RequestError(400, 'the request must be a JSON object with a non-empty "inputs" list')
    tensors = body["inputs"]
    if len(tensors) != 1 or not isinstance(tensors[0], dict):
        raise RequestError(400, f'"inputs" must hold exactly one tensor, named {role!r}; got {len(tensors)}')
    tensor = tensors[0]
    if tensor.get("name") != role:
        raise RequestError(
            400, f"input {tensor.get('name')!r}: this {setting} model takes one input, {role!r}"
        )
    if tensor.get("datatype") != "BYTES":
        raise RequestError(400, f"input {role!r}: datatype {tensor.get('datatype')!r}, expected BYTES")
    shape, data = tensor.get("shape"), tensor.get("data")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RequestError(
            400, f"input {role!r}: shape must be a list of non-negative integers, got {shape!r}"
        )
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise RequestError(400, f"input {role!r}: shape {shape} is not [N] or [N, 1]")
    if not isinstance(data, list):
        raise RequestError(400, f'input {role!r}: "data" must be a list')
    rows = _flat(data)
    if len(rows) != math.prod(shape):
        raise RequestError(
            400, f"input {role!r}: shape {shape} holds {math.prod(shape)} values, data {len(rows)}"
        )
    if len(rows) > max_batch:
        raise RequestError(
            413, f"{len(rows)} inputs in one request, more than the server's limit {max_batch}"
        )
    if not all(isinstance(x, str) for x in rows):
        raise RequestError(400, f"input {role!r}: every element of a BYTES tensor must be a string")
    if role == "image":
        try:
            rows = [base64.b64decode(x, validate=True) for x in rows]
        except ValueError as err:
            raise RequestError(400, f"input 'image': an element is not base64 ({err})") from err
    return rows


def v2_outputs(predictions: list[dict[str, Any]], wanted: list[str] | None) -> list[dict[str, Any]]:
    """A V2 output tensor of shape [N] per field of the predictions (label, score; or
    prompt, continuation), or of the fields a request's "outputs" names."""
    fields = list(predictions[0]) if predictions else []
    if wanted is not None:
        unknown = sorted(set(wanted) - set(fields))
        if unknown:
            raise RequestError(400, f"unknown outputs {unknown}; this model has {fields}")
        fields = [f for f in fields if f in wanted]
    return [
        {
            "name": name,
            "shape": [len(predictions)],
            "datatype": V2_TYPES.get(type(predictions[0][name]), "BYTES"),
            "data": [p[name] for p in predictions],
        }
        for name in fields
    ]


def create_app(
    watcher: Watcher,
    name: str,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_batch: int = MAX_BATCH,
    batch_size: int = 64,
) -> FastAPI:
    """The FastAPI application serving `watcher`'s version under the model name `name`."""
    from contextlib import asynccontextmanager
    from importlib.metadata import PackageNotFoundError, version

    try:
        server_version = version("tlpipe")
    except PackageNotFoundError:
        server_version = "unknown"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher.start()
        yield
        watcher.stop()

    app = FastAPI(title="tlpipe", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=err.status)

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_request_bytes:
            raise RequestError(
                413, f"the request is {int(length)} bytes, more than the limit {max_request_bytes}"
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_request_bytes:
                raise RequestError(413, f"the request is more than the limit of {max_request_bytes} bytes")
        try:
            return json.loads(body)
        except ValueError as err:
            raise RequestError(400, f"the request body is not JSON: {err}") from err

    def model_named(model: str) -> Loaded:
        if model != name:
            raise RequestError(404, f"no model {model!r} here; this server serves {name!r}")
        return watcher.current

    async def predict(loaded: Loaded, rows: list[Any]) -> list[dict[str, Any]]:
        try:
            return await run_in_threadpool(loaded.predictor.predict, rows, batch_size)
        except (TlpipeError, ValueError, OSError) as err:
            raise RequestError(400, f"cannot predict these inputs: {err}") from err

    @app.get("/v2/health/live")
    def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}  # the server starts only once a version has loaded

    @app.get("/v2")
    def server_metadata() -> dict[str, Any]:
        return {"name": "tlpipe", "version": server_version, "extensions": []}

    @app.get("/v2/models/{model}")
    def model_metadata(model: str) -> dict[str, Any]:
        loaded = model_named(model)
        meta: dict[str, Any] = {
            "name": name,
            "versions": [loaded.version],
            "platform": "onnxruntime",
            "inputs": [{"name": loaded.role, "datatype": "BYTES", "shape": [-1]}],
            "parameters": {"setting": loaded.setting, "loaded_at": loaded.loaded_at},
        }
        if watcher.failed:
            meta["parameters"]["failed_load"] = {k: v for k, v in watcher.failed.items() if k != "retry_at"}
        return meta

    @app.get("/v2/models/{model}/ready")
    def model_ready(model: str) -> dict[str, Any]:
        return {"name": name, "ready": model_named(model) is not None}

    @app.post("/v2/models/{model}/infer")
    async def infer(model: str, request: Request) -> dict[str, Any]:
        loaded = model_named(model)  # one version answers the whole request
        body = await read_json(request)
        rows = v2_inputs(body, loaded.role, loaded.setting, max_batch)
        wanted = body.get("outputs")
        if wanted is not None and not (
            isinstance(wanted, list)
            and all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted)
        ):
            raise RequestError(400, '"outputs" must be a list of {"name": ...} objects')
        predictions = await predict(loaded, rows)
        names = [o["name"] for o in wanted] if wanted is not None else None
        answer = {
            "model_name": name,
            "model_version": loaded.version,
            "outputs": v2_outputs(predictions, names),
        }
        if "id" in body:
            answer["id"] = body["id"]
        return answer

    @app.post("/predict")
    async def simple(request: Request) -> dict[str, Any]:
        loaded = watcher.current
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise RequestError(400, 'the request must be {"inputs": [...]}')
        rows = [from_wire(x) for x in body["inputs"]]
        if len(rows) > max_batch:
            raise RequestError(
                413, f"{len(rows)} inputs in one request, more than the server's limit {max_batch}"
            )
        want = bytes if loaded.role == "image" else str
        if not all(isinstance(x, want) for x in rows):
            kind = 'an encoded image as {"base64": ...}' if want is bytes else "a string"
            raise RequestError(400, f"every input to this {loaded.setting} model must be {kind}")
        return {"model_version": loaded.version, "predictions": await predict(loaded, rows)}

    return app
