"""The text classifier's row-level rules: a text input's (`tlpipe.text_rows`), with its
labels checked against the label set."""

from __future__ import annotations

from tlpipe.text_rows import TextRows

ROWS = TextRows()
