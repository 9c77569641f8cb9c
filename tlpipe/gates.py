"""The gates a published version passes before `production` moves to it, beyond the stage
gates that let it be published at all (validation, the negative-transfer gate, ONNX parity):

- champion: the candidate is not worse than the current production model by more than a
  tolerance on the setting's primary metric, both bundles scored by their own predictors on
  the same frozen test split in the same run (the champion is downloaded and re-scored,
  never trusted from the metrics it shipped with);
- serving: the version is downloaded by alias into a clean folder, verified against its
  signed manifest and loaded in a separate process that has no torch (`tlpipe.servecheck`),
  and answers the inputs export recorded with the predictions export recorded.

Each gate is a `Gate`: its name, whether it passed, a sentence with its figures, and the
figures themselves (what publish writes to gates.json and the report shows).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tlpipe.errors import DataError, TlpipeError
from tlpipe.registry import PRODUCTION, read_alias
from tlpipe.release import fetch_release
from tlpipe.serve import bundle_setting, load_bundle
from tlpipe.setting import Metric
from tlpipe.store import StoreSession

# A served score may differ from the recorded one by this much (onnxruntime's sums differ
# in the last bits with the thread count); a label or a generated text must be the same.
SCORE_TOLERANCE = 1e-4
SERVING_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Champion:
    """The champion check's outcome, and the production version it compared against (None:
    no production model yet), which the production move then expects to still be there."""

    gate: Gate
    version: str | None


def champion_check(
    store: StoreSession,
    model: str,
    version: str,
    candidate_dir: Path,
    test: pd.DataFrame,
    metric: Metric,
    tolerance: float,
) -> Champion:
    """Score the candidate bundle (`candidate_dir`, the content of `version`) and the
    current production bundle of `model` on `test` with the setting's `metric`; the gate
    passes when the candidate is at most `tolerance` worse, or when there is no production
    model yet, or when it is this version."""
    current = read_alias(store, model, PRODUCTION)
    if current is None:
        return Champion(Gate("champion", True, "no production model yet: this is the first"), None)
    held = current.version
    if held == version:
        return Champion(Gate("champion", True, f"production already names {version}"), held)
    with tempfile.TemporaryDirectory(prefix="tlpipe-champion-") as work:
        # The version production named when read: the move that follows expects it there.
        champion_dir = fetch_release(store, f"s3://{store.bucket}/{model}/{held}", Path(work) / "releases")
        ours, theirs = bundle_setting(candidate_dir), bundle_setting(champion_dir)
        if ours != theirs:
            detail = f"the production model {held} is a {theirs} model, this one {ours}: not comparable"
            return Champion(Gate("champion", False, detail, {"champion": held}), held)
        try:
            candidate = load_bundle(candidate_dir).score(test)
            champion = load_bundle(champion_dir).score(test)
        except (DataError, ValueError) as err:
            detail = f"the production model {held} cannot be scored on this test split: {err}"
            return Champion(Gate("champion", False, detail, {"champion": held}), held)
    gain = metric.gain(candidate[metric.key], champion[metric.key])
    passed = math.isfinite(gain) and gain >= -tolerance
    figures = {
        "champion": held,
        "metric": metric.key,
        "candidate_score": candidate[metric.key],
        "champion_score": champion[metric.key],
        "gain": gain,
        "tolerance": tolerance,
        "test_rows": len(test),
        "candidate_scores": candidate,
        "champion_scores": champion,
    }
    verdict = "within" if passed else "beyond"
    detail = (
        f"test {metric.label} {candidate[metric.key]:.4f} vs production {held}'s {champion[metric.key]:.4f} "
        f"on the same {len(test)} test rows: {gain:+.4f}, {verdict} publish.champion_tolerance {tolerance}"
    )
    return Champion(Gate("champion", passed, detail, figures), held)


def _serve(store: StoreSession, uri: str, recorded: Path, root: Path) -> tuple[dict[str, Any], Gate | None]:
    """`tlpipe.servecheck` on `uri` in a clean folder: what it found (with its seconds), or
    the failed gate when it did not answer."""
    with tempfile.TemporaryDirectory(prefix="tlpipe-serving-") as work:
        command = [sys.executable, "-m", "tlpipe.servecheck", uri, str(recorded.resolve()), work]
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command, cwd=root, env={**os.environ, **store.env}, capture_output=True, text=True,
                timeout=SERVING_TIMEOUT_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return {}, Gate("serving", False, f"{uri} did not answer within {SERVING_TIMEOUT_S:.0f} s")
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        return {}, Gate("serving", False, f"{uri} failed to serve: {last}", {"exit_code": done.returncode})
    return {**json.loads(done.stdout), "seconds": round(seconds, 2)}, None


def serving_check(
    store: StoreSession, model: str, alias: str, version: str, recorded: Path, root: Path
) -> Gate:
    """Ask `model`@`alias` (which names `version`), downloaded into a clean folder in a
    process without torch, for export's `recorded` predictions; the gate passes when torch
    stayed out and every prediction of `version` matches. When the alias was moved on
    meanwhile (another run published), `version` is asked again by its own URI, and the
    detail says so."""
    uri = f"s3://{store.bucket}/{model}@{alias}"
    found, failed = _serve(store, uri, recorded, root)
    moved = ""
    if failed is not None or found["version"] != version:
        now = read_alias(store, model, alias)
        if now is not None and now.version != version:
            moved = f"; {uri} was moved to {now.version} meanwhile, so {version} was asked by its version"
            uri = f"s3://{store.bucket}/{model}/{version}"
            found, failed = _serve(store, uri, recorded, root)
    if failed is not None:
        return Gate("serving", False, failed.detail + moved, failed.figures)
    figures, seconds = found, found["seconds"]
    problems = []
    if found["version"] != version:
        problems.append(f"it resolved to {found['version']}, not {version}")
    if found["torch_loaded"]:
        problems.append("the serving process imported torch")
    if found["differ"]:
        problems.append(f"{len(found['differ'])} of {found['rows']} predictions differ from export's")
    if problems:
        return Gate("serving", False, f"{uri}: " + "; ".join(problems) + moved, figures)
    detail = (
        f"{uri} ({version}) downloaded, verified and loaded without torch; {found['rows']} recorded "
        f"predictions matched, in {seconds:.1f} s{moved}"
    )
    return Gate("serving", True, detail, figures)


def same_prediction(served: dict[str, Any], recorded: dict[str, Any]) -> bool:
    """One served prediction against the recorded one: the same keys, the same labels and
    texts, scores within SCORE_TOLERANCE."""
    if served.keys() != recorded.keys():
        return False
    for key, value in recorded.items():
        got = served[key]
        if isinstance(value, float) and isinstance(got, float):
            if abs(got - value) > SCORE_TOLERANCE:
                return False
        elif got != value:
            return False
    return True


class PromotionHeld(TlpipeError):
    """The run published its version and moved `candidate`, but a gate kept `production`
    where it was."""
