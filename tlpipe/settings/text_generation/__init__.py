"""Text generation: a language model trained on a source corpus whose parameters carry over
to a target domain, fine-tuned on a small target corpus and scored by perplexity.

This module declares the setting (its column roles and metrics) and imports no torch.
Its parts:
- `tokenizer`: the byte-level BPE tokenizer trained on the source corpus, and corpora as
  token streams (no torch: serving imports it);
- `ngram`: the classical reference, an interpolated Kneser-Ney n-gram model (no torch);
- `model`: the LSTM language model with a tied output projection, the GPT-style decoder,
  their layer groups and checkpoints;
- `lm`: token streams to training blocks, the causal-LM loss (with the joint source
  objective), perplexity.
"""

from __future__ import annotations

from tlpipe.setting import Metric, SettingSpec

METRICS = {
    # exp of the mean per-token loss: the model is as unsure as a uniform choice among
    # this many tokens.
    "perplexity": Metric("perplexity", "perplexity", higher_is_better=False),
    # The mean negative log-likelihood per token, in nats.
    "loss": Metric("loss", "loss per token", higher_is_better=False),
}
SPEC = SettingSpec(
    name="text-generation",
    # Plain text, no labels: a target and a source are each a text column.
    roles=("text",),
    metrics=METRICS,
    baseline_name="unigram model",
    objectives=("causal_lm",),
    reference_name="Kneser-Ney n-gram",
    sized_scratch=False,
    labelled=False,
    carried=("all", "embeddings"),
    size_unit="tokens",
)
