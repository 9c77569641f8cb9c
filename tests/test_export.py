import json
import subprocess
import sys
from pathlib import Path

from tasks.export import export
from tests.conftest import REPO, tiny_params
from tlpipe.errors import GateFailed
from tlpipe.params import parse_params


def test_parity_over_whole_test_split(exported: Path) -> None:
    parity = json.loads((exported / "parity.json").read_text())
    assert parity["rows"] == 60
    assert parity["max_abs_diff"] <= 1e-4
    assert parity["argmax_agreement"] == 1.0


def test_dynamic_batch_and_sequence_axes(exported: Path) -> None:
    import onnx

    graph = onnx.load(str(exported / "bundle/model.onnx")).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}


def test_bundle_runs_without_torch(exported: Path, tmp_path: Path) -> None:
    script = (
        "import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
        "from pathlib import Path\n"
        "from tlpipe.serve import Bundle\n"
        f"b = Bundle(Path({str(exported / 'bundle')!r}))\n"
        "preds = b.predict(['@united lost my bag again', 'thanks @jetblue, great crew', 'ok'] * 40)\n"
        "assert len(preds) == 120 and all(p['label'] in b.spec.labels for p in preds)\n"
        "assert 'torch' not in {m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_parity_gate_fails_loudly(finetuned: Path, prepared: Path, tmp_path: Path) -> None:
    p = parse_params(tiny_params(**{"export.max_abs_diff": 1e-30}))
    try:
        export(p.export, p.finetune.max_length, finetuned, prepared, tmp_path / "x")
    except GateFailed as err:
        assert "exceeds export.max_abs_diff" in str(err)
    else:  # onnxruntime matched PyTorch bit for bit: nothing to fail on
        assert json.loads((tmp_path / "x/parity.json").read_text())["max_abs_diff"] == 0.0
