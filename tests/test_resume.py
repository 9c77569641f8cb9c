"""Resuming training: a run killed at a failpoint and started again ends with exactly the
weights, the history and the choice of a run never stopped, in every setting's loop and in
masked-LM pretraining; a state from other inputs, or a torn one, is never resumed."""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from tasks import evaluate as evaluate_stage
from tasks.evaluate import run_point
from tests.conftest import AIRLINES, make_project, tiny_params
from tlpipe import faults
from tlpipe.bundled import materialize_images
from tlpipe.checkpoint import seed_everything
from tlpipe.curve import CurvePoint
from tlpipe.data import read_split
from tlpipe.params import EncoderConfig, FinetuneParams, OptimParams, TokenizerParams, parse_params
from tlpipe.resume import Resume, inputs_digest, stage_resume
from tlpipe.setting import get_setting
from tlpipe.settings.image_classification.classifier import Augment, ImageTask, pixels
from tlpipe.settings.image_classification.model import Cnn, CnnConfig
from tlpipe.settings.image_classification.model import layer_groups as cnn_groups
from tlpipe.settings.image_classification.preprocess import Preprocessor
from tlpipe.settings.text_classification.mlm import train_mlm
from tlpipe.settings.text_classification.model import bert_config, new_mlm
from tlpipe.settings.text_classification.text import SpecialIds
from tlpipe.settings.text_generation.lm import LanguageModelTask
from tlpipe.settings.text_generation.model import layer_groups as lm_groups
from tlpipe.settings.text_generation.model import new_lstm
from tlpipe.settings.text_generation.tokenizer import token_stream, train_bpe
from tlpipe.train import CPU_FP32, TrainResult, fit, train_model


class Killed(BaseException):
    """What the armed failpoint raises here in place of SIGKILL: nothing after it runs."""


@pytest.fixture
def kill(monkeypatch: pytest.MonkeyPatch) -> Callable[[str | None], None]:
    """`kill("train.step@5")` arms a failpoint; `kill(None)` disarms it."""

    def sigkill(pid: int, sig: int) -> None:
        raise Killed(f"{pid} {sig}")

    monkeypatch.setattr(faults.os, "kill", sigkill)

    def arm(point: str | None) -> None:
        monkeypatch.setattr(faults, "_passed", collections.Counter())
        if point is None:
            monkeypatch.delenv(faults.ENV, raising=False)
        else:
            monkeypatch.setenv(faults.ENV, point)

    return arm


Run = Callable[[Resume | None], tuple[dict[str, torch.Tensor], Any]]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed weights differ from the uninterrupted run's in {differ}"


def _without_clock(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def _killed_then_resumed(
    run: Run,
    kill: Callable[[str | None], None],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    point: str | None = None,
) -> None:
    """Kill `run` at `point` (by default the step after its first saved state: mid-epoch),
    start it again, and compare it with a run never stopped."""
    whole_weights, whole = run(None)
    point = point or f"train.step@{whole.history[0]['step'] + 1}"
    resume = Resume(tmp_path / "resume", every_s=0)
    kill(point)
    with pytest.raises(Killed):
        run(resume)
    kill(None)
    assert list(resume.dir.glob("*.pt")), "the killed run saved no state to resume from"
    with caplog.at_level(logging.INFO, logger="tlpipe"):
        weights, resumed = run(resume)
    assert "resumed at step" in caplog.text
    _same(whole_weights, weights)
    if isinstance(whole, TrainResult):
        assert (resumed.best_step, resumed.best_score, resumed.steps, resumed.examples) == (
            whole.best_step,
            whole.best_score,
            whole.steps,
            whole.examples,
        )
        assert _without_clock(resumed.history) == _without_clock(whole.history)
    else:
        assert (resumed.tokens, _without_clock(resumed.history)) == (
            whole.tokens,
            _without_clock(whole.history),
        )


@pytest.fixture(scope="module")
def classifier_inputs(pretrained: Path, prepared: Path) -> tuple[Path, Path, pd.DataFrame, pd.DataFrame]:
    return pretrained, prepared, read_split(prepared, "train"), read_split(prepared, "val")


def _classifier_run(inputs: tuple, **finetune: Any) -> Run:
    source, prepared, train, val = inputs
    params = parse_params(tiny_params(**{f"finetune.{k}": v for k, v in finetune.items()}))
    p, setting = params.finetune, get_setting(params.setting)

    def run(resume: Resume | None) -> tuple[dict[str, torch.Tensor], TrainResult]:
        seed_everything(p.seed)
        arm = setting.transfer_arm(p, params.data, source, prepared)
        result, _ = fit(setting, arm, train, val, p, params.data, source, runtime=CPU_FP32, resume=resume)
        return arm.model.state_dict(), result

    return run


# Each strategy carries other state between steps: the joint loss its own generator and
# pending source batches, gradual unfreezing the epoch, L2-SP its anchors.
STRATEGIES = {
    "full": {},
    "joint": {"joint_alpha": 0.3},
    "gradual_unfreeze": {"strategy": "gradual_unfreeze", "epochs": 4},
    "l2sp": {"l2sp": 0.01, "layer_decay": 0.8},
}


@pytest.mark.faults
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_classifier_killed_mid_epoch_resumes_to_the_same_weights(
    classifier_inputs: tuple, kill: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, strategy: str
) -> None:
    # 60 rows in batches of 16: 4 steps an epoch, a validation every step or two.
    run = _classifier_run(classifier_inputs, evaluations=3, patience=5, **STRATEGIES[strategy])
    _killed_then_resumed(run, kill, tmp_path, caplog)


@pytest.mark.faults
def test_a_kill_while_writing_a_state_resumes_from_the_one_before(
    classifier_inputs: tuple, kill: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _classifier_run(classifier_inputs, evaluations=4, patience=5)
    _, whole = run(None)
    first, second = (row["step"] for row in whole.history[:2])
    resume = Resume(tmp_path / "resume", every_s=0)
    kill("resume.write@2")
    with pytest.raises(Killed):
        run(resume)
    kill(None)
    # The second state was written in full beside the first, never renamed over it.
    assert list(resume.dir.glob(".*.pt.tmp"))
    assert torch.load(resume.state_path("finetune"), weights_only=True)["loop"]["step"] == first < second
    with caplog.at_level(logging.INFO, logger="tlpipe"):
        weights, resumed = run(resume)
    assert f"resumed at step {first} of" in caplog.text
    _same(run(None)[0], weights)
    assert _without_clock(resumed.history) == _without_clock(whole.history)


@pytest.mark.faults
def test_an_early_stopped_run_resumes_to_its_stop(
    classifier_inputs: tuple, kill: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _classifier_run(classifier_inputs, evaluations=8, patience=1, epochs=4)
    _, whole = run(None)
    assert whole.steps < 16, "the run never stopped early; the test needs a smaller patience"
    _killed_then_resumed(run, kill, tmp_path, caplog, f"train.step@{whole.steps - 1}")


@pytest.fixture(scope="module")
def tweets(sample_csv: Path) -> tuple[list[str], list[str]]:
    frame = pd.read_csv(sample_csv, dtype=str)
    airline = frame["text"].str.contains(AIRLINES, case=False, regex=True)
    return frame.loc[~airline, "text"].tolist(), frame.loc[airline, "text"].tolist()


@pytest.mark.faults
def test_an_lstm_language_model_resumes_to_the_same_weights(
    tweets: tuple[list[str], list[str]], kill: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The LSTM's own dropout draws from torch's global generator."""
    tok = train_bpe(tweets[0], TokenizerParams(vocab_size=400, min_frequency=2, lowercase=False))
    train, val = token_stream(tok, tweets[1][:150]), token_stream(tok, tweets[1][150:])
    p = FinetuneParams(epochs=1, min_steps=12, max_steps=12, evaluations=4, patience=4)

    def run(resume: Resume | None) -> tuple[dict[str, torch.Tensor], TrainResult]:
        torch.manual_seed(0)
        model = new_lstm(tok.get_vocab_size(), 32, 2, 0.2)
        task = LanguageModelTask(train, val, 16, 8, 32, CPU_FP32, seed=0)
        result = train_model(model, task, p, lm_groups(model), runtime=CPU_FP32, resume=resume)
        return model.state_dict(), result

    _killed_then_resumed(run, kill, tmp_path, caplog)


@pytest.mark.faults
def test_a_cnn_resumes_to_the_same_weights_and_batch_norm_statistics(
    tmp_path: Path, kill: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The augmentation draws from the task's own generator."""
    digits = pd.read_parquet(materialize_images(tmp_path / "data/raw/uci-digits.parquet"))
    labels = tuple(str(d) for d in range(10))
    prep = Preprocessor(size=16, channels=1, mean=(0.3,), std=(0.4,))
    train, val = digits.iloc[:160], digits.iloc[1500:1600]
    y, val_y = (f["label"].map({d: i for i, d in enumerate(labels)}).to_numpy() for f in (train, val))
    p = FinetuneParams(epochs=3, evaluations=3, patience=3, optim=OptimParams(lr=3e-3, batch_size=32))

    def run(resume: Resume | None) -> tuple[dict[str, torch.Tensor], TrainResult]:
        torch.manual_seed(0)
        model = Cnn(CnnConfig(channels=1, widths=(8, 16), labels=labels, dropout=0.1))
        task = ImageTask(
            pixels(train, prep), y, pixels(val, prep), val_y, prep, len(labels),
            batch_size=32, eval_batch_size=64, runtime=CPU_FP32, seed=0,
            augment=Augment(rotation=5, shift=0.05),
        )  # fmt: skip
        result = train_model(model, task, p, cnn_groups(model), runtime=CPU_FP32, resume=resume)
        return model.state_dict(), result

    _killed_then_resumed(run, kill, tmp_path, caplog)


def _mlm_run(**changed: Any) -> Run:
    special = SpecialIds(pad=0, cls=2, sep=3, mask=4, unk=1)
    rng = np.random.default_rng(0)
    ids = [np.array([2, *rng.integers(5, 200, rng.integers(4, 30)), 3]) for _ in range(120)]
    kw = {
        "steps": 14,
        "optim": OptimParams(lr=1e-3, batch_size=16),
        "mask_prob": 0.15,
        "seed": 0,
        "log_every": 3,
    }

    def run(resume: Resume | None) -> tuple[dict[str, torch.Tensor], Any]:
        torch.manual_seed(0)
        encoder = EncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
        model = new_mlm(bert_config(encoder, 200, special.pad, 64))
        result = train_mlm(model, ids, special, runtime=CPU_FP32, resume=resume, **(kw | changed))
        return model.state_dict(), result

    return run


@pytest.mark.faults
def test_masked_lm_pretraining_resumes_to_the_same_weights(
    kill: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _killed_then_resumed(_mlm_run(), kill, tmp_path, caplog, "train.step@8")


@pytest.mark.faults
def test_a_state_saved_by_other_params_is_started_over(
    kill: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    resume = Resume(tmp_path / "resume", every_s=0)
    kill("train.step@8")
    with pytest.raises(Killed):
        _mlm_run()(resume)
    kill(None)
    weights, _ = _mlm_run(mask_prob=0.2)(resume)
    assert "saved by another run" in caplog.text
    _same(_mlm_run(mask_prob=0.2)(None)[0], weights)


@pytest.mark.faults
def test_a_torn_state_is_started_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    resume = Resume(tmp_path / "resume", every_s=0)
    resume.dir.mkdir(parents=True)
    resume.state_path("pretrain").write_bytes(b"PK\x03\x04 not a whole state")
    weights, _ = _mlm_run()(resume)
    assert "cannot read the saved training state" in caplog.text
    _same(_mlm_run()(None)[0], weights)


def test_the_stage_key_follows_params_and_input_bytes(tmp_path: Path) -> None:
    data = tmp_path / "prepare"
    data.mkdir()
    (data / "train.parquet").write_bytes(b"one")
    p = parse_params(tiny_params())
    key = inputs_digest((p.finetune, data))
    assert stage_resume("finetune", (p.finetune, data), tmp_path).dir == tmp_path / "finetune" / key
    assert inputs_digest((p.finetune, data)) == key
    assert inputs_digest((p.finetune.model_copy(update={"seed": 2}), data)) != key
    (data / "train.parquet").write_bytes(b"two")
    assert inputs_digest((p.finetune, data)) != key


def _stage(project: Path, stage: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m tasks.<stage>` in `project`, as dvc.yaml runs it."""
    return subprocess.run(
        [sys.executable, "-m", f"tasks.{stage}"],
        cwd=project,
        capture_output=True,
        text=True,
        env={**os.environ, "TLPIPE_CHECKPOINT_EVERY_S": "0", **env},
        timeout=600,
    )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.faults
def test_stages_sigkilled_mid_epoch_mid_write_and_mid_export_resume_to_the_same_bytes(
    tmp_path: Path, sample_csv: Path
) -> None:
    """SIGKILL, for real, at three points: a kill leaves the stage's previous outputs as
    they were, and the next run resumes (training) or redoes (export) the work and writes
    byte for byte what a run never stopped wrote, then drops the saved states."""
    project = make_project(tmp_path / "proj", sample_csv, tiny_params(**{"pretrain.steps": 16}))
    for stage in ("prepare", "validate"):
        assert _stage(project, stage).returncode == 0
    out = {s: project / "outputs" / s for s in ("pretrain", "finetune", "export")}
    files = {
        "pretrain": out["pretrain"] / "model/model.safetensors",
        "finetune": out["finetune"] / "model/model.safetensors",
        "export": out["export"] / "bundle/model.onnx",
    }
    # Runs never stopped: the bytes to reach.
    whole = {}
    for stage in ("pretrain", "finetune", "export"):
        done = _stage(project, stage)
        assert done.returncode == 0, done.stderr
        whole[stage] = _digest(files[stage])
    history = (out["finetune"] / "history.csv").read_text().splitlines()
    first_validation = int(history[1].split(",")[0])

    cases = [
        ("pretrain", "train.step@6"),  # masked-LM, between its saves at steps 4 and 8
        ("finetune", f"train.step@{first_validation + 1}"),  # mid-epoch
        ("finetune", "resume.write@2"),  # the second state written, not yet renamed
        ("export", "export.write"),  # the bundle written, before its parity gate
    ]
    for stage, point in cases:
        killed = _stage(project, stage, TLPIPE_FAILPOINT=point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
        assert _digest(files[stage]) == whole[stage], f"{point}: the killed {stage} touched its outputs"
        saved = list((project / ".tlpipe/resume" / stage).glob("*/*.pt"))
        assert bool(saved) == (stage != "export"), (point, saved)
        files[stage].unlink()  # whatever the next run writes, it writes anew
        again = _stage(project, stage)
        assert again.returncode == 0, again.stderr[-2000:]
        if stage != "export":
            assert "resumed at step" in again.stderr, (point, again.stderr[-2000:])
        assert _digest(files[stage]) == whole[stage], f"{point}: the resumed {stage} wrote other bytes"
        assert not (project / ".tlpipe/resume" / stage).exists(), "the finished stage left its states"


def _curve_inputs(pretrained: Path, prepared: Path) -> tuple[Any, ...]:
    """A curve run's inputs on the tiny params, after its point."""
    params = parse_params(tiny_params())
    return (get_setting(params.setting), params.evaluate, params.finetune, params.data, pretrained, prepared)


@pytest.mark.faults
def test_a_finished_curve_run_is_taken_as_it_was(
    pretrained: Path, prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = _curve_inputs(pretrained, prepared)
    point = CurvePoint("transfer", 20, 0)
    resume = Resume(tmp_path / "resume", every_s=0)
    first = run_point(point, *inputs, resume)
    assert not list(resume.dir.glob("*.pt")), "a finished run keeps no training state"
    monkeypatch.setattr(evaluate_stage, "fit", lambda *a, **k: pytest.fail("the finished run trained again"))
    again = run_point(point, *inputs, resume)
    assert again == json.loads(json.dumps(first))


@pytest.mark.faults
def test_a_curve_run_killed_mid_training_resumes_to_the_same_record(
    pretrained: Path,
    prepared: Path,
    tmp_path: Path,
    kill: Callable[[str | None], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A curve run (transfer at 20 rows) killed after its first saved state resumes from it
    and returns the record of a run never stopped, its scores and steps alike."""
    inputs = _curve_inputs(pretrained, prepared)
    point = CurvePoint("transfer", 20, 0)
    whole = run_point(point, *inputs)
    resume = Resume(tmp_path / "resume", every_s=0)
    kill("train.step@3")
    with pytest.raises(Killed):
        run_point(point, *inputs, resume)
    kill(None)
    assert list(resume.dir.glob("*.pt")), "the killed run saved no state to resume from"
    with caplog.at_level(logging.INFO, logger="tlpipe"):
        resumed = run_point(point, *inputs, resume)
    assert "resumed at step" in caplog.text

    def timeless(record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in json.loads(json.dumps(record)).items() if "seconds" not in k}

    assert timeless(resumed) == timeless(whole)
