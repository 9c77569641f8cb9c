"""Serving over HTTP: `tlpipe serve` against a plain FastAPI + PyTorch server on the same
fine-tuned model, side by side.

Both servers run in processes of their own, with the same onnxruntime / torch threads (all
cores but one: the load comes from this process, on the one left), one uvicorn worker each,
answering `POST /predict` with one label and score per text. The load is real test tweets,
one per request, sent by `concurrency` clients at once without pause; each level is a fixed
number of requests, and the two sides take turns, round by round. Figures: requests per
second, p50 and p99 latency as the client sees it, errors (any non-200 answer or failed
connection), and how often the two servers' labels agree on the same texts.

    python -m bench.serving                       # after `make run`
    python -m bench.serving --baseline MODEL --port N --threads T   # the baseline server alone
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel

from bench.common import REPS, in_turns, ratio, record, stat, threads_from_env
from tlpipe.data import read_split, texts

MODEL = Path("outputs/finetune/model")
BUNDLE = Path("outputs/export/bundle")
PREPARE = Path("outputs/prepare")
CONCURRENCY = (1, 4, 16)
REQUESTS = 300
ROUNDS = max(3, REPS - 2)
AGREEMENT_ROWS = 200
SIDES = ("tlpipe", "fastapi_pytorch")


class PredictRequest(BaseModel):
    inputs: list[str]


def baseline_app(model_dir: Path, threads: int, max_length: int) -> Any:
    """The plain server: FastAPI, the checkpoint's tokenizer, the fine-tuned model in
    PyTorch eager fp32 under inference mode, softmax, the best label."""
    import torch
    from fastapi import FastAPI
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(threads)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding()
    app = FastAPI()

    @app.post("/predict")
    def predict(request: PredictRequest) -> dict[str, Any]:
        encoded = tokenizer.encode_batch(request.inputs)
        ids = torch.tensor([e.ids for e in encoded])
        mask = torch.tensor([e.attention_mask for e in encoded])
        with torch.inference_mode():
            probs = model(input_ids=ids, attention_mask=mask).logits.softmax(-1)
        best = probs.argmax(-1)
        return {
            "predictions": [
                {"label": labels[int(b)], "score": float(probs[i, b])} for i, b in enumerate(best)
            ]
        }

    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(side: str, threads: int, max_length: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    if side == "tlpipe":
        command = [sys.executable, "-m", "tlpipe.cli", "serve", "--bundle", str(BUNDLE)]
        command += ["--port", str(port), "--threads", str(threads), "--max-batch", "1024"]
    else:
        command = [sys.executable, "-m", "bench.serving", "--baseline", str(MODEL), "--port", str(port)]
        command += ["--threads", str(threads), "--max-length", str(max_length)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{side} server exited {server.returncode}: {server.stderr.read()}")
        try:
            httpx.post(f"{url}/predict", json={"inputs": ["warm up"]}, timeout=5).raise_for_status()
            return server, url
        except httpx.HTTPError:
            time.sleep(0.3)
    server.kill()
    raise RuntimeError(f"{side} server did not answer within 180 s")


async def load(url: str, rows: list[str], concurrency: int, requests: int) -> dict[str, Any]:
    """`requests` requests of one text each from `concurrency` clients at once: latencies
    (s), wall seconds, errors."""
    latencies: list[float] = []
    errors = 0
    queue = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in queue:
            start = time.perf_counter()
            try:
                got = await http.post(f"{url}/predict", json={"inputs": [rows[i % len(rows)]]})
                if got.status_code != 200:
                    errors += 1
                    continue
            except httpx.HTTPError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"latencies": latencies, "wall": wall, "errors": errors}


def labels_of(url: str, rows: list[str]) -> list[str]:
    got = httpx.post(f"{url}/predict", json={"inputs": rows}, timeout=120)
    got.raise_for_status()
    return [p["label"] for p in got.json()["predictions"]]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, help="serve this checkpoint as the baseline server, alone")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    if args.baseline is not None:
        import uvicorn

        app = baseline_app(args.baseline, args.threads, args.max_length)
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
        return

    from tlpipe.params import load_params

    max_length = load_params().finetune.max_length
    threads = max(1, threads_from_env() - 1)
    rows = texts(read_split(PREPARE, "test"))
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for side in SIDES:  # inside the try: a side that fails to start stops the other
            servers[side] = start(side, threads, max_length)
        agreement = np.mean(
            np.array(labels_of(servers["tlpipe"][1], rows[:AGREEMENT_ROWS]))
            == np.array(labels_of(servers["fastapi_pytorch"][1], rows[:AGREEMENT_ROWS]))
        )
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for concurrency in CONCURRENCY:
            for _, side in in_turns(SIDES, ROUNDS):
                done = asyncio.run(load(servers[side][1], rows, concurrency, REQUESTS))
                runs.setdefault((side, concurrency), []).append(done)
                ms = np.percentile(done["latencies"], 50) * 1e3 if done["latencies"] else float("nan")
                print(
                    f"{side} c={concurrency}: {REQUESTS / done['wall']:.0f} req/s, p50 {ms:.1f} ms",
                    flush=True,
                )
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(timeout=30)

    levels: dict[str, Any] = {}
    for concurrency in CONCURRENCY:
        level = {}
        for side in SIDES:
            done = runs[(side, concurrency)]
            level[side] = {
                "requests_per_s": stat([REQUESTS / r["wall"] for r in done], "req/s"),
                "p50_ms": stat([float(np.percentile(r["latencies"], 50)) * 1e3 for r in done], "ms"),
                "p99_ms": stat([float(np.percentile(r["latencies"], 99)) * 1e3 for r in done], "ms"),
                "errors": sum(r["errors"] for r in done),
            }
        level["throughput_ratio"] = ratio(
            level["tlpipe"]["requests_per_s"], level["fastapi_pytorch"]["requests_per_s"]
        )
        level["p50_ratio"] = ratio(level["fastapi_pytorch"]["p50_ms"], level["tlpipe"]["p50_ms"])
        levels[str(concurrency)] = level
    record(
        "serving",
        {
            "server_threads": threads,
            "requests_per_level": REQUESTS,
            "rounds": ROUNDS,
            "label_agreement": float(agreement),
            "agreement_rows": AGREEMENT_ROWS,
            "levels": levels,
        },
    )


if __name__ == "__main__":
    main()
