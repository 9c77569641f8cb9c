"""How target-only words fare in a text-generation run: the words of the target's test text
that never occur in the source text the tokenizer and the source model were trained on,
against the words that do.

A word is a pre-token of the byte-level BPE (a run of letters, digits or punctuation with
its leading space). For each class: its share of the test words and tokens, the tokens per
word (the BPE spells an unseen word from smaller pieces, never as unknown), and the loss
per word (nats, the sum over its tokens) of the source model and of the fine-tuned model,
each word scored in the test stream's context as perplexity is, and the class's share of
the loss fine-tuning saves; then the most frequent target-only words with their pieces.
Writes bench/target_words.json and prints a Markdown table.

Give it the workspace of a text-generation run after finetune (`.tlpipe/workspaces/<id>/`,
which `tlpipe run --params FILE` prints):

    python -m bench.target_words --workspace .tlpipe/workspaces/<id>
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from tlpipe.data import read_split, source_split
from tlpipe.params import load_params, stage_dir
from tlpipe.settings.text_generation.lm import stream_nll
from tlpipe.settings.text_generation.model import load_lm
from tlpipe.settings.text_generation.tokenizer import eos_id, load_tokenizer

TEXT = "text"


def pre_tokens(tok: Tokenizer, text: str) -> list[str]:
    """The words the BPE splits `text` into before merging (its pre-tokens)."""
    normalized = tok.normalizer.normalize_str(text) if tok.normalizer is not None else text
    return [word for word, _ in tok.pre_tokenizer.pre_tokenize_str(normalized)]


def word_stream(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """The test stream (EOS t1 EOS ... EOS, as perplexity reads it) and each word of it with
    the stream positions of its tokens."""
    eos = eos_id(tok)
    stream, words = [eos], []
    for text, enc in zip(texts, tok.encode_batch(texts, add_special_tokens=False), strict=True):
        spelled = pre_tokens(tok, text)
        start = len(stream)
        stream += enc.ids
        spans: dict[int, list[int]] = {}
        for pos, word in enumerate(enc.word_ids):
            if word is not None:
                spans.setdefault(word, []).append(start + pos)
        assert len(spans) == len(spelled), f"pre-tokens and word ids disagree on {text!r}"
        words += [(spelled[w], np.asarray(spans[w])) for w in sorted(spans)]
        stream.append(eos)
    return np.asarray(stream, dtype=np.int32), words


def measure(workspace: Path, top: int) -> dict[str, Any]:
    params = load_params(workspace / "params.yaml")
    prepare, source_dir, finetuned_dir = (
        stage_dir(s, workspace / "outputs") for s in ("prepare", "pretrain", "finetune")
    )
    tok = load_tokenizer(source_dir / "model")
    _, source_train = source_split(read_split(prepare, "source"))
    seen = {w for text in source_train[TEXT] for w in pre_tokens(tok, text)}
    test = read_split(prepare, "test")[TEXT].tolist()
    stream, words = word_stream(tok, test)
    only = np.array([w not in seen for w, _ in words])
    n_tokens = np.array([len(span) for _, span in words])
    block, batch = params.finetune.max_length, params.finetune.eval_batch_size
    per_word: dict[str, np.ndarray] = {}
    for name, model_dir in (("source model", source_dir / "model"), ("fine-tuned", finetuned_dir / "model")):
        nll = stream_nll(load_lm(model_dir), stream, block, batch)
        # nll[i] is the loss of stream token i + 1.
        per_word[name] = np.array([nll[span - 1].sum() for _, span in words])
    before, after = per_word.values()
    saved = before - after
    classes: dict[str, Any] = {}
    for label, mask in (("in the source", ~only), ("target-only", only)):
        classes[label] = {
            "words": int(mask.sum()),
            "share_of_words": float(mask.mean()),
            "share_of_tokens": float(n_tokens[mask].sum() / n_tokens.sum()),
            "tokens_per_word": float(n_tokens[mask].mean()),
            "nats_per_word": {name: float(v[mask].mean()) for name, v in per_word.items()},
            "share_of_nats_saved": float(saved[mask].sum() / saved.sum()),
        }
    frequent = Counter(w for (w, _), o in zip(words, only, strict=True) if o).most_common(top)
    return {
        "test_texts": len(test),
        "test_words": len(words),
        "source_texts": len(source_train),
        "classes": classes,
        "frequent_target_only": [
            {"word": word, "count": c, "pieces": [tok.decode([i]) for i in tok.encode(word).ids]}
            for word, c in ((tok.decoder.decode([w]), c) for w, c in frequent)
        ],
    }


def table(found: dict[str, Any]) -> str:
    models = list(next(iter(found["classes"].values()))["nats_per_word"])
    head = "| words | share of words | share of tokens | tokens / word | " + " | ".join(
        f"nats / word, {m}" for m in models
    )
    lines = [head + " | share of the loss fine-tuning saves |", "|---" * (5 + len(models)) + "|"]
    for label, c in found["classes"].items():
        nats = " | ".join(f"{c['nats_per_word'][m]:.2f}" for m in models)
        lines.append(
            f"| {label} | {c['share_of_words']:.1%} | {c['share_of_tokens']:.1%} | "
            f"{c['tokens_per_word']:.2f} | {nats} | {c['share_of_nats_saved']:.1%} |"
        )
    spelled = ", ".join(
        f"`{f['word'].strip()}` ({f['count']}: {'·'.join(p.strip() for p in f['pieces'])})"
        for f in found["frequent_target_only"]
    )
    return "\n".join(lines) + f"\n\nMost frequent target-only words: {spelled}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=Path("."))
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("bench/target_words.json"))
    args = ap.parse_args()
    found = measure(args.workspace, args.top)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(found, indent=1) + "\n")
    print(table(found))


if __name__ == "__main__":
    main()
