"""A language model's row-level rules: a text input's (`tlpipe.text_rows`); a corpus has no
labels, so the text rules alone apply."""

from __future__ import annotations

from tlpipe.text_rows import TextRows

ROWS = TextRows()
