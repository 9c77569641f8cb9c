"""Training on two CPU processes (torchrun, gloo): the stage as DVC runs it on 2 ranks
against 1, its resume after a kill, SIGTERM, and the loop's collectives on their own."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from tasks.wiring import run_stage
from tests.conftest import free_port, tiny_params
from tlpipe.checkpoint import WEIGHTS
from tlpipe.distributed import World, average_gradients, launch_command
from tlpipe.params import parse_params
from tlpipe.train import Runtime, adamw, clip_and_step

REPO = Path(__file__).resolve().parents[1]
# No dropout: two ranks then compute, slice by slice, the gradients one process computes on
# the whole batch, and the runs differ by float rounding alone.
NO_DROPOUT = {"pretrain.model.dropout": 0.0, "finetune.evaluations": 4, "finetune.epochs": 3}
# What 2 ranks may differ from 1 by: the gradient is summed in another order, and Adam
# turns a rounding difference in a near-zero gradient into a step of up to lr. Measured on
# the tiny encoder (9 steps, lr 1e-3): losses 5e-6 apart (relative), weights 1.1e-4
# (relative L2 over all of them).
LOSS_RTOL = 1e-4
WEIGHTS_RTOL = 1e-3
# Masked-LM on 2 ranks draws other masks: measured 0.3% apart at most (12 steps).
MLM_RTOL = 0.01


@pytest.fixture(scope="module")
def project(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with prepare's outputs and a tiny source model without dropout."""
    root = tmp_path_factory.mktemp("distributed")
    shutil.copytree(prepared, root / "outputs/prepare")
    _write_params(root, 1)
    here = Path.cwd()
    os.chdir(root)
    try:
        run_stage("pretrain", parse_params(tiny_params(**NO_DROPOUT)))
    finally:
        os.chdir(here)
    return root


def _write_params(root: Path, nproc: int, **more: object) -> None:
    raw = tiny_params(**{**NO_DROPOUT, "finetune.distributed.nproc": nproc, **more})
    (root / "params.yaml").write_text(yaml.safe_dump(parse_params(raw).as_dict(), sort_keys=False))


def _env(tmp: Path, **more: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TLPIPE_PROGRESS": "0", "TMPDIR": str(tmp), **more}


def _finetune(
    root: Path, nproc: int, name: str, params: dict[str, object] | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m tasks.finetune` (what dvc.yaml runs) on `nproc` processes, on the tiny
    params and `params`; its outputs are moved to outputs/<name>."""
    _write_params(root, nproc, **(params or {}))
    tmp = root / f"tmp-{name}"
    tmp.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "tasks.finetune"],
        cwd=root,
        env=_env(tmp, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode == 0:
        # Neither a rank's scratch outputs nor torchrun's own folders.
        assert not list(tmp.iterdir()), "the run left temporary files behind"
        shutil.move(root / "outputs/finetune", root / "outputs" / name)
    return done


def _history(out: Path) -> list[dict[str, float]]:
    with (out / "history.csv").open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _weight_gap(a: Path, b: Path) -> float:
    """||a - b|| / ||a|| over every weight of the two models."""
    wa, wb = load_file(a / "model" / WEIGHTS), load_file(b / "model" / WEIGHTS)
    assert wa.keys() == wb.keys()
    gap = sum(float((wa[k].double() - wb[k].double()).square().sum()) for k in wa)
    return (gap / sum(float(wa[k].double().square().sum()) for k in wa)) ** 0.5


@pytest.mark.slow
def test_two_ranks_train_as_one_process_does_on_the_same_global_batch(project: Path) -> None:
    """The same global batch (16 rows, 8 a rank): the same validations at the same steps,
    the loss curve within LOSS_RTOL, the same best step and scores, weights within
    WEIGHTS_RTOL; rank 0 alone writes (the outputs a one-process run writes, nothing else)."""
    one = _finetune(project, 1, "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _finetune(project, 2, "two")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = project / "outputs/one", project / "outputs/two"
    assert sorted(p.relative_to(a) for p in a.rglob("*")) == sorted(p.relative_to(b) for p in b.rglob("*"))
    ha, hb = _history(a), _history(b)
    assert [r["step"] for r in ha] == [r["step"] for r in hb] and len(ha) >= 3
    for ra, rb in zip(ha, hb, strict=True):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=LOSS_RTOL)
        assert rb["val_macro_f1"] == pytest.approx(ra["val_macro_f1"], abs=1e-6)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["best_step"] == mb["best_step"] and ma["steps_run"] == mb["steps_run"]
    assert mb["val_accuracy"] == pytest.approx(ma["val_accuracy"], abs=1e-6)
    assert _weight_gap(a, b) < WEIGHTS_RTOL
    # Only rank 0 logs below warnings.
    assert two.stderr.count("finetune: best step") == 1


@pytest.mark.slow
def test_masked_lm_pretraining_on_two_ranks_follows_the_one_process_curve(
    project: Path, tmp_path: Path
) -> None:
    """pretrain's masked-LM loop on 2 ranks: each rank masks its own slice, so the draws are
    not one process's, but the loss curve stays within MLM_RTOL of its."""
    root = tmp_path / "project"
    keep = shutil.ignore_patterns("finetune*", "one", "two")
    shutil.copytree(project / "outputs", root / "outputs", ignore=keep)
    raw = tiny_params(**{**NO_DROPOUT, "pretrain.distributed.nproc": 2})
    (root / "params.yaml").write_text(yaml.safe_dump(parse_params(raw).as_dict(), sort_keys=False))
    one = (root / "outputs/pretrain/history.csv").read_text()
    done = subprocess.run(
        [sys.executable, "-m", "tasks.pretrain"],
        cwd=root,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two = (root / "outputs/pretrain/history.csv").read_text()
    ha, hb = (list(csv.DictReader(text.splitlines())) for text in (one, two))
    assert [r["step"] for r in ha] == [r["step"] for r in hb]
    for ra, rb in zip(ha, hb, strict=True):
        assert float(rb["loss"]) == pytest.approx(float(ra["loss"]), rel=MLM_RTOL)


@pytest.mark.slow
@pytest.mark.faults
def test_two_ranks_killed_mid_run_resume_to_the_weights_of_a_run_never_stopped(project: Path) -> None:
    """Both ranks SIGKILLed at their 7th step, a state saved at every validation: the next
    run resumes from rank 0's state (every rank's generators and task draws in it: the
    joint loss draws each rank's own source batches) and ends where an uninterrupted 2-rank
    run ends."""
    joint = {"finetune.joint_alpha": 0.3}
    whole = _finetune(project, 2, "whole", joint)
    assert whole.returncode == 0, whole.stderr[-3000:]
    every = {"TLPIPE_CHECKPOINT_EVERY_S": "0"}
    killed = _finetune(project, 2, "killed", joint, TLPIPE_FAILPOINT="train.step@7", **every)
    assert killed.returncode == 1
    assert "tasks.finetune on 2 processes failed" in killed.stderr
    assert not (project / "outputs/finetune").exists()
    resumed = _finetune(project, 2, "resumed", joint, **every)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step" in resumed.stderr
    assert _history(project / "outputs/whole") == _history(project / "outputs/resumed")
    assert _weight_gap(project / "outputs/whole", project / "outputs/resumed") == 0.0


@pytest.mark.slow
@pytest.mark.faults
def test_sigterm_to_the_stage_stops_torchrun_and_every_rank(project: Path, tmp_path: Path) -> None:
    """The stage's process killed (DVC or a scheduler stopping it): torchrun gets SIGTERM by
    its parent-death signal and takes its ranks down with it; nothing is written."""
    _write_params(project, 2, **{"finetune.min_steps": 100000, "finetune.evaluations": 1})
    stage = subprocess.Popen(
        [sys.executable, "-m", "tasks.finetune"], cwd=project, env=_env(tmp_path), stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        ranks: list[psutil.Process] = []
        while time.monotonic() < deadline and len(ranks) < 2:
            time.sleep(0.5)
            family = psutil.Process(stage.pid).children(recursive=True)
            ranks = [p for p in family if "LOCAL_RANK" in _environ(p)]
        assert len(ranks) == 2, "torchrun did not start two ranks"
        family = psutil.Process(stage.pid).children(recursive=True)
        stage.send_signal(signal.SIGTERM)
        stage.wait()
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    finally:
        stage.kill()
        stage.wait()
    assert not (project / "outputs/finetune").exists()


def _environ(p: psutil.Process) -> dict[str, str]:
    try:
        return p.environ()
    except psutil.Error:
        return {}


def test_the_stage_starts_torchrun_standalone_on_this_interpreter() -> None:
    cmd = launch_command("tasks.finetune", 4)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc-per-node=4" in cmd and cmd[-2:] == ["-m", "tasks.finetune"]


def test_params_ask_for_processes_per_training_stage() -> None:
    p = parse_params(tiny_params(**{"pretrain.distributed.nproc": 2, "finetune.distributed.backend": "gloo"}))
    assert (p.pretrain.distributed.nproc, p.finetune.distributed.nproc) == (2, 1)
    assert p.finetune.distributed.backend == "gloo"
    with pytest.raises(ValueError, match="nproc"):
        parse_params(tiny_params(**{"finetune.distributed.nproc": 0}))


def test_the_row_sparse_embedding_gradient_is_off_among_ranks() -> None:
    cpu = Runtime(torch.device("cpu"), bf16=False)
    assert cpu.among(World()).uses("embedding_row_grads")
    among = cpu.among(World(rank=1, size=2))
    assert not among.uses("embedding_row_grads") and among.uses("clip_in_step")


def _collectives(rank: int, size: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        w = World(rank, size)
        torch.manual_seed(0)
        shared = torch.nn.Linear(4, 3)
        # Each rank's own gradient; `b` has one on rank 0 alone, `c` on no rank.
        a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
        a.grad = torch.full((3,), float(rank + 1))
        b.grad = torch.ones(3) * 4 if rank == 0 else None
        average_gradients([a, b, c], w)
        found = {"a": a.grad.tolist(), "b": b.grad.tolist(), "c": c.grad is None}
        # Clipping inside the fused step after the average: every rank steps alike, as
        # clip_grad_norm_ then a plain step would on the averaged gradient.
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))
        results = []
        for in_step in (True, False):
            model = torch.nn.Linear(4, 3)
            model.load_state_dict(shared.state_dict())
            opt = adamw(model.parameters(), 0.1)
            (model(x) ** 2).sum().mul(50).backward()
            average_gradients(list(model.parameters()), w)
            clip_and_step(opt, list(model.parameters()), 0.5, in_step)
            results.append(torch.cat([q.detach().reshape(-1) for q in model.parameters()]))
        found["in_step_gap"] = float((results[0] - results[1]).abs().max())
        gathered = [torch.zeros_like(results[0]) for _ in range(size)]
        dist.all_gather(gathered, results[0])
        found["rank_gap"] = float((gathered[0] - gathered[1]).abs().max())
        Path(out, f"{rank}.json").write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


def test_gradients_are_averaged_over_ranks_and_clipping_in_the_step_stays_exact(tmp_path: Path) -> None:
    mp.spawn(_collectives, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    found = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for f in found:
        assert f["a"] == [1.5, 1.5, 1.5]  # (1 + 2) / 2
        assert f["b"] == [2.0, 2.0, 2.0]  # rank 1 counts zero
        assert f["c"] is True  # no rank had one: still none, as on one process
        assert f["in_step_gap"] < 1e-6
        assert f["rank_gap"] == 0.0
    assert np.isfinite([f["in_step_gap"] for f in found]).all()
