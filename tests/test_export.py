import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.export import export
from tests.conftest import REPO, tiny_params
from tlpipe.errors import GateFailed
from tlpipe.params import parse_params
from tlpipe.settings.text_classification.export import EXPORTER


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
        "from tlpipe.serve import load_bundle\n"
        f"b = load_bundle(Path({str(exported / 'bundle')!r}))\n"
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
        export(EXPORTER, p.export, finetuned, prepared, tmp_path / "x")
    except GateFailed as err:
        assert "exceeds export.max_abs_diff" in str(err)
    else:  # onnxruntime matched PyTorch bit for bit: nothing to fail on
        assert json.loads((tmp_path / "x/parity.json").read_text())["max_abs_diff"] == 0.0


def test_fused_graph_and_int8_model_ship(exported: Path) -> None:
    from tlpipe.settings.text_classification.serve import BundleSpec

    parity = json.loads((exported / "parity.json").read_text())
    assert parity["graph"] == "fused"
    assert parity["fused"]["max_abs_diff"] <= 1e-4
    assert {"Attention", "BiasGelu", "EmbedLayerNormalization"} <= set(parity["fused_operators"])
    spec = BundleSpec.read(exported / "bundle/bundle.json")
    assert json.loads((exported / "bundle/bundle.json").read_text())["setting"] == "text-classification"
    assert spec.models == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    int8 = parity["int8"]
    assert int8["drop"] <= int8["max_drop_allowed"] == 0.01
    assert int8["onnx_bytes"] < 0.5 * parity["onnx_bytes"]


def test_int8_bundle_classifies_and_unknown_precision_is_named(exported: Path) -> None:
    from tlpipe.serve import load_bundle

    texts = ["@united lost my bag again", "thanks @jetblue, great crew", "ok"] * 10
    fp32 = load_bundle(exported / "bundle").predict(texts)
    int8 = load_bundle(exported / "bundle", precision="int8").predict(texts)
    assert len(int8) == len(fp32) == len(texts)
    assert {p["label"] for p in int8} <= {"negative", "neutral", "positive"}
    with pytest.raises(ValueError, match="no fp16 model in this bundle"):
        load_bundle(exported / "bundle", precision="fp16")


def test_int8_accuracy_gate_fails_loudly(finetuned: Path, prepared: Path, tmp_path: Path) -> None:
    """A quantised model that predicts worse than fp32 (here: its logits negated) fails export."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForSequenceClassification

    from tlpipe.settings.text_classification.export import export_onnx
    from tlpipe.settings.text_classification.text import SpecialIds, load_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(finetuned / "model").eval()
    tok = load_tokenizer(finetuned / "model")

    class Negated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(
                logits=-self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
            )

    class BrokenInt8(EXPORTER):
        def quantize(self, src: Path, dst: Path, prepare_dir: Path) -> dict[str, str]:
            export_onnx(Negated(), dst, SpecialIds.of(tok), tok.get_vocab_size(), 18)
            return {"method": "negated"}

    p = parse_params(tiny_params(**{"export.int8_max_drop": 0.0}))
    worse = r"int8 test accuracy .* worse than fp32's .* export.int8_max_drop 0.0"
    with pytest.raises(GateFailed, match=worse):
        export(BrokenInt8, p.export, finetuned, prepared, tmp_path / "x")
    parity = json.loads((tmp_path / "x/parity.json").read_text())
    assert parity["int8"]["drop"] > 0 and parity["int8"]["method"] == "negated"


@pytest.mark.parametrize("model", ["model.onnx", "model.int8.onnx"])
def test_served_graphs_keep_residual_adds_apart_from_layer_norms(
    exported: Path, tmp_path: Path, model: str
) -> None:
    """onnxruntime's CPU SkipLayerNormalization kernel is slower than Add + LayerNormalization:
    neither the shipped graphs nor what a serving session makes of them use it."""
    import onnx

    from tlpipe.serve import inference_session, session_options

    shipped = {n.op_type for n in onnx.load(str(exported / "bundle" / model)).graph.node}
    options = session_options(1)
    options.optimized_model_filepath = str(tmp_path / "served.onnx")
    inference_session(exported / "bundle" / model, options)
    served = {n.op_type for n in onnx.load(str(tmp_path / "served.onnx")).graph.node}
    for ops in (shipped, served):
        assert "SkipLayerNormalization" not in ops
        assert "LayerNormalization" in ops
        assert {"Attention", "QAttention"} & ops


def test_a_head_tail_model_is_served_the_way_it_was_trained(
    pretrained: Path, prepared: Path, tmp_path: Path
) -> None:
    from tasks.finetune import finetune
    from tlpipe.serve import load_bundle
    from tlpipe.settings.text_classification.setting import SETTING
    from tlpipe.settings.text_classification.text import encode

    p = parse_params(tiny_params(**{"finetune.truncation": "head_tail", "finetune.max_length": 12}))
    finetune(SETTING, p.finetune, p.data, pretrained, prepared, tmp_path / "f")
    cut = json.loads((tmp_path / "f/metrics.json").read_text())["truncated"]
    assert cut["truncation"] == "head_tail" and cut["max_length"] == 12 and cut["train_share"] > 0
    export(EXPORTER, p.export, tmp_path / "f", prepared, tmp_path / "x")
    bundle = load_bundle(tmp_path / "x/bundle")
    assert (bundle.spec.truncation, bundle.spec.max_length) == ("head_tail", 12)
    parity = json.loads((tmp_path / "x/parity.json").read_text())
    assert parity["argmax_agreement"] == 1.0
    # What serving feeds the model is the head and the tail of a long text.
    text = "first words " + "middle " * 40 + "last words"
    full = encode(bundle.tokenizer, [text], 10_000)[0]
    ids = bundle.encode([text])[0]
    # 10 tokens between [CLS] and [SEP]: the first 2 and the last 8.
    assert len(ids) == 12 and list(ids[:3]) == list(full[:3]) and list(ids[3:]) == list(full[-9:])
