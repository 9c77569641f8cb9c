"""`precision: auto` on a CPU: bf16 only where a probe measured it faster, the verdict kept
per machine and thread count, one probe however many processes ask at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tlpipe import precision
from tlpipe.train import Runtime, bf16_native

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TLPIPE_CACHE_DIR", str(tmp_path))
    return tmp_path / "precision.json"


def test_the_probe_times_both_precisions_and_is_kept(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    verdict = precision.bf16_pays(threads=1)
    record = json.loads(cache.read_text())[precision.probe_key(1)]
    seconds = record["seconds_per_probe"]
    assert seconds["fp32"] > 0 and seconds["bf16"] > 0
    assert record["bf16"] is verdict is (seconds["bf16"] <= precision.MARGIN * seconds["fp32"])

    def probe_again(threads: int) -> dict[str, float]:
        raise AssertionError("a kept verdict was probed again")

    monkeypatch.setattr(precision, "probe_step_seconds", probe_again)
    assert precision.bf16_pays(threads=1) is verdict
    assert precision.probe_key(1) != precision.probe_key(2)  # another thread count probes anew


def test_the_probe_leaves_threads_and_rng_as_they_were(cache: Path) -> None:
    torch.manual_seed(5)
    threads, state = torch.get_num_threads(), torch.get_rng_state()
    precision.probe_step_seconds(1)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), state)


def test_the_key_names_the_machine() -> None:
    ident = precision.cpu_identity()
    key = precision.probe_key(3)
    assert ident["cpu"] in key and torch.__version__ in key and key.endswith("3 threads")
    assert set(ident["flags"]) <= set(precision.MATRIX_FLAGS)


@pytest.mark.skipif(not bf16_native(CPU), reason="this CPU has no native bf16")
@pytest.mark.parametrize("pays", [True, False])
def test_auto_follows_the_verdict(cache: Path, pays: bool) -> None:
    key = precision.probe_key(torch.get_num_threads())
    cache.write_text(json.dumps({key: {"bf16": pays, "seconds_per_probe": {}, "measured": "then"}}))
    assert Runtime.pick("cpu", "auto").bf16 is pays
    assert Runtime.pick("cpu", "fp32").bf16 is False and Runtime.pick("cpu", "bf16").bf16 is True


def test_processes_asking_at_once_share_one_verdict(cache: Path) -> None:
    code = "from tlpipe.precision import bf16_pays; print(bf16_pays(threads=1))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    answers = {p.communicate(timeout=120)[0].strip() for p in procs}
    records = json.loads(cache.read_text())
    assert list(records) == [precision.probe_key(1)]
    assert answers == {str(records[precision.probe_key(1)]["bf16"])}
    assert not list(cache.parent.glob("*.tmp"))
