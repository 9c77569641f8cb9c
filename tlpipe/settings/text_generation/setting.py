"""The text-generation setting: the `tlpipe.setting.Setting` its stages and the shared
machinery call, over this folder's modules."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn
from transformers import AutoModelForCausalLM

from tlpipe.checkpoint import resolve_init
from tlpipe.data import read_split, source_split, texts
from tlpipe.params import DataParams, EncoderConfig, EvaluateParams, FinetuneParams, PretrainParams
from tlpipe.setting import Arm, SourceRun
from tlpipe.settings.text_generation import SPEC
from tlpipe.settings.text_generation.lm import (
    LanguageModelTask,
    SourceLm,
    scores,
    stream_nll,
    torch_continuation,
)
from tlpipe.settings.text_generation.model import LstmLM, layer_groups, load_lm, save_lm
from tlpipe.settings.text_generation.ngram import KneserNey
from tlpipe.settings.text_generation.pretrain import check_block, copy_checkpoint, train_source
from tlpipe.settings.text_generation.sampling import Sampling
from tlpipe.settings.text_generation.tokenizer import encode_texts, eos_id, load_tokenizer, token_stream
from tlpipe.train import Runtime
from tlpipe.transfer import LayerGroups

# The classical reference's n-gram orders, one chosen on the validation text.
REFERENCE_ORDERS = (2, 3, 4, 5)
# The report's samples: continuations of the first words of the first test texts.
SAMPLE_PROMPTS = 4
PROMPT_WORDS = 3
SAMPLING = Sampling(max_new_tokens=30, top_k=40, top_p=0.9, seed=0)


def new_like(model: nn.Module) -> nn.Module:
    """A randomly initialised model of `model`'s architecture and size."""
    if isinstance(model, LstmLM):
        return LstmLM(model.config)
    return AutoModelForCausalLM.from_config(model.config)


def _stream(rows: pd.DataFrame, source_dir: Path) -> np.ndarray:
    return token_stream(load_tokenizer(source_dir), texts(rows))


class TextGeneration:
    name = SPEC.name
    roles = SPEC.roles
    metrics = SPEC.metrics
    baseline_name = SPEC.baseline_name

    pretrain = staticmethod(train_source)
    copy_checkpoint = staticmethod(copy_checkpoint)

    def resolve_init(self, init_from: str, p: PretrainParams, download_dir: Path) -> Path:
        return resolve_init(init_from, download_dir)

    def save_source(self, run: SourceRun, model_dir: Path, meta: dict[str, Any]) -> None:
        save_lm(run.model, run.preprocessor, model_dir, meta)

    def layer_groups(self, model: nn.Module) -> LayerGroups:
        return layer_groups(model)

    def transfer_arm(self, p: FinetuneParams, data: DataParams, source_dir: Path, prepare_dir: Path) -> Arm:
        """The source model, whole (`finetune.transfer: all`) or its embeddings alone in a
        re-initialised model (`embeddings`); under the joint objective, the source text the
        loss mixes in (the rows pretrain trained on, not those it held out)."""
        source = load_lm(source_dir)
        if p.transfer == "embeddings":
            groups = layer_groups(source)
            model = new_like(source)
            kept = {name for name, _ in source.named_parameters() if groups.depth(name) == 0}
            state = source.state_dict()
            model.load_state_dict({k: v for k, v in state.items() if k in kept}, strict=False)
        else:
            model = source
            kept = {name for name, _ in source.named_parameters()}
        extras = None
        if p.joint_alpha:
            _, trained_on = source_split(read_split(prepare_dir, "source"))
            extras = SourceLm(_stream(trained_on, source_dir), p.joint_alpha)
        return Arm(model, kept, extras, {"transferred": p.transfer})

    def scratch_arm(self, data: DataParams, source_dir: Path, size: EncoderConfig | None) -> Arm:
        """The source model's architecture and tokenizer, randomly initialised."""
        return Arm(new_like(load_lm(source_dir)))

    def task(
        self,
        arm: Arm,
        train: pd.DataFrame,
        val: pd.DataFrame,
        p: FinetuneParams,
        data: DataParams,
        source_dir: Path,
        runtime: Runtime,
    ) -> LanguageModelTask:
        check_block(arm.model, p.max_length, "finetune.max_length")
        return LanguageModelTask(
            _stream(train, source_dir),
            _stream(val, source_dir),
            p.max_length,
            p.optim.batch_size,
            p.eval_batch_size,
            runtime,
            p.seed,
            source=arm.extras,
        )

    def units(self, rows: pd.DataFrame, source_dir: Path) -> np.ndarray:
        """Tokens per text, its EOS included: what the curve's sizes count."""
        return np.asarray([len(ids) + 1 for ids in encode_texts(load_tokenizer(source_dir), texts(rows))])

    def score(
        self,
        model: nn.Module,
        rows: pd.DataFrame,
        p: FinetuneParams,
        data: DataParams,
        source_dir: Path,
        runtime: Runtime | None = None,
    ) -> dict[str, float]:
        nll = stream_nll(model, _stream(rows, source_dir), p.max_length, p.eval_batch_size, runtime)
        return scores(nll)

    def reference(
        self, train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, data: DataParams, source_dir: Path
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Interpolated Kneser-Ney on the training tokens, its order chosen on val."""
        vocab = load_tokenizer(source_dir).get_vocab_size()
        stream, val_stream = _stream(train, source_dir), _stream(val, source_dir)
        tried = {}
        for order in REFERENCE_ORDERS:
            if len(stream) >= order:
                model = KneserNey.fit(stream, order, vocab)
                tried[order] = scores(-model.log_probs(val_stream))["perplexity"]
        best = min(tried, key=tried.__getitem__)
        test_scores = scores(-KneserNey.fit(stream, best, vocab).log_probs(_stream(test, source_dir)))
        return test_scores, {"order": best, "val_perplexity": {str(k): v for k, v in tried.items()}}

    def baseline(
        self, train: pd.DataFrame, test: pd.DataFrame, data: DataParams, source_dir: Path
    ) -> dict[str, float]:
        """A unigram model of the training tokens (smoothed toward uniform, so every token
        has a probability)."""
        vocab = load_tokenizer(source_dir).get_vocab_size()
        unigram = KneserNey.fit(_stream(train, source_dir), 1, vocab)
        return scores(-unigram.log_probs(_stream(test, source_dir)))

    def examples(
        self, model: nn.Module, rows: pd.DataFrame, p: FinetuneParams, source_dir: Path
    ) -> list[dict[str, str]]:
        """Seeded continuations of the first words of the first test texts."""
        tok = load_tokenizer(source_dir)
        eos = eos_id(tok)
        out = []
        for text in texts(rows)[:SAMPLE_PROMPTS]:
            prompt = " ".join(text.split()[:PROMPT_WORDS])
            ids = [eos, *tok.encode(prompt, add_special_tokens=False).ids]
            out.append(
                {"prompt": prompt, "continuation": tok.decode(torch_continuation(model, ids, SAMPLING, eos))}
            )
        return out

    def shipped(
        self, model_dir: Path, test: pd.DataFrame, p: FinetuneParams, data: DataParams, out_dir: Path
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Perplexity and loss per token on the test text, with its token count and samples."""
        model = load_lm(model_dir)
        stream = _stream(test, model_dir)
        found = scores(stream_nll(model, stream, p.max_length, p.eval_batch_size))
        return model, {
            **found,
            "test_tokens": len(stream) - 1,
            "samples": self.examples(model, test, p, model_dir),
        }

    def save(self, model: nn.Module, source_dir: Path, out_dir: Path, meta: dict[str, Any]) -> None:
        save_lm(model, load_tokenizer(source_dir), out_dir, meta)

    def input_facts(
        self, splits: dict[str, pd.DataFrame], p: FinetuneParams, source_dir: Path
    ) -> dict[str, Any]:
        """Each split's tokens and the training block."""
        tokens = {f"{name}_tokens": len(_stream(rows, source_dir)) - 1 for name, rows in splits.items()}
        return {"tokens": {"block": p.max_length, **tokens}}

    def forgetting(
        self,
        p: EvaluateParams,
        ft: FinetuneParams,
        data: DataParams,
        source_dir: Path,
        model: nn.Module,
        prepare_dir: Path,
    ) -> dict[str, Any]:
        """Perplexity on the source text pretrain held out, of the source model and of the
        fine-tuned one."""
        report: dict[str, Any] = {"source": data.source_kind, "source_rows": 0}
        if data.source_kind == "none":
            return report
        held_out, _ = source_split(read_split(prepare_dir, "source"))
        picked = held_out.iloc[: p.forgetting_rows]
        if not len(picked):
            return report
        stream = _stream(picked, source_dir)
        before = scores(stream_nll(load_lm(source_dir), stream, ft.max_length, ft.eval_batch_size))
        after = scores(stream_nll(model, stream, ft.max_length, ft.eval_batch_size))
        return report | {
            "source_rows": len(picked),
            "source_tokens": len(stream) - 1,
            "perplexity_before": before["perplexity"],
            "perplexity_after": after["perplexity"],
            "loss_before": before["loss"],
            "loss_after": after["loss"],
            "loss_change": after["loss"] - before["loss"],
            "ratio": after["perplexity"] / before["perplexity"]
            if math.isfinite(before["perplexity"])
            else None,
        }


SETTING = TextGeneration()
