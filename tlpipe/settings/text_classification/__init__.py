"""Text classification: a text encoder (BERT family) with a classification head, transferred
from a source model to the target's labels.

This module declares the setting (its column roles and metrics) and imports no torch:
params read it. Its implementation (`setting.SETTING`) is made of:
- `classifier`: rows to batches, the loss (cross entropy; with the joint masked-LM objective),
  validation, predictions;
- `arms`: the transfer and scratch classifiers;
- `layers`: each encoder family's layer groups;
- `mlm`: masked-LM (pretraining, task-adaptive pretraining, the joint objective);
- `reference`: TF-IDF with logistic regression;
- `forgetting`: the source task before and after fine-tuning.
"""

from __future__ import annotations

from tlpipe.setting import CLASSIFICATION_METRICS, SettingSpec

METRICS = CLASSIFICATION_METRICS
SPEC = SettingSpec(
    name="text-classification",
    # A target needs both columns, a source its text (and its label when it is labelled).
    roles=("text", "label"),
    metrics=METRICS,
    baseline_name="majority class",
    objectives=("mlm", "supervised"),
    reference_name="TF-IDF + LR",
    sized_scratch=True,
)
