"""What fine-tuning costs the source task: a linear probe on a labelled source's labels
and held-out masked-LM loss, before and after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, PreTrainedModel

from tlpipe.batching import length_batches
from tlpipe.data import label_ids, read_split, source_split, texts
from tlpipe.metrics import probe_accuracy
from tlpipe.params import DataParams, EvaluateParams, FinetuneParams
from tlpipe.settings.text_classification.mlm import MLM_EVAL_ROWS, iterate_batches, mlm_eval_loss
from tlpipe.settings.text_classification.model import has_mlm_head, load_mlm
from tlpipe.settings.text_classification.text import SpecialIds, encode, load_tokenizer
from tlpipe.train import Runtime


@torch.no_grad()
def _mean_pooled(
    encoder: PreTrainedModel, ids: list[np.ndarray], pad: int, batch_size: int, runtime: Runtime
) -> torch.Tensor:
    """Sentence features (N, H) on the CPU: the encoder's last hidden states averaged over
    real tokens, computed on `runtime` (both encoders alike: bf16 autocast where native)."""
    encoder.eval()
    encoder.to(runtime.device)
    lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
    out = torch.zeros(len(ids), encoder.config.hidden_size)
    for idx, input_ids, mask in iterate_batches(ids, length_batches(lengths, batch_size, None), pad):
        mask = mask.to(runtime.device)
        with runtime.autocast():
            hidden = encoder(input_ids=input_ids.to(runtime.device), attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        out[torch.from_numpy(idx)] = ((hidden.float() * m).sum(1) / m.sum(1)).cpu()  # (B, H)
    return out


def forgetting(
    p: EvaluateParams,
    ft: FinetuneParams,
    data: DataParams,
    source_dir: Path,
    model: PreTrainedModel,
    prepare_dir: Path,
) -> dict[str, Any]:
    """The source task before and after fine-tuning, on the source rows pretrain held out:
    a linear probe's accuracy on a labelled source's labels over each encoder's features,
    and held-out masked-LM loss when the source model carries a trained LM head. Without a
    source there is nothing to forget: the report says so."""
    report: dict[str, Any] = {
        "source": data.source_kind,
        "source_rows": 0,
        "probe_accuracy_before": None,
        "probe_accuracy_after": None,
        "mlm_loss_before": None,
        "mlm_loss_after": None,
    }
    if data.source_kind == "none":
        return report
    tok = load_tokenizer(source_dir)
    pad = SpecialIds.of(tok).pad
    held_out, _ = source_split(read_split(prepare_dir, "source"))
    picked = held_out.iloc[: p.forgetting_rows]
    report["source_rows"] = len(picked)
    labels = data.source_labels
    if labels is not None and len(picked):
        ids = encode(tok, texts(picked), ft.max_length)
        y = label_ids(picked, labels)
        runtime = Runtime.pick(ft.device, ft.precision)
        before = _mean_pooled(AutoModel.from_pretrained(source_dir), ids, pad, ft.eval_batch_size, runtime)
        after = _mean_pooled(model.base_model, ids, pad, ft.eval_batch_size, runtime)
        model.to("cpu")
        report["probe_accuracy_before"] = probe_accuracy(before, y, len(labels), ft.seed)
        report["probe_accuracy_after"] = probe_accuracy(after, y, len(labels), ft.seed)
    if has_mlm_head(source_dir) and len(held_out):
        held_out_ids = encode(tok, [t for t in texts(held_out) if t.strip()][:MLM_EVAL_ROWS], ft.max_length)
        special = SpecialIds.of(tok)
        mlm = load_mlm(source_dir)
        kw = {"mask_prob": ft.mask_prob, "seed": ft.seed}
        report["mlm_loss_before"] = mlm_eval_loss(mlm, held_out_ids, special, **kw)
        mlm.base_model.load_state_dict(model.base_model.state_dict(), strict=False)
        report["mlm_loss_after"] = mlm_eval_loss(mlm, held_out_ids, special, **kw)
    return report
