"""Great Expectations as tlpipe runs it: a dataframe and the expectations it must meet
(a `Frame` of `Spec`s), run in an in-memory, offline GX context whose one Data Docs site
is a folder of the stage's outputs, each result read back as a `Check` with counts and one
line on what was found. Settings build their suites from these; GX is imported only when
a suite runs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

# Great Expectations takes seconds to import: it is imported where it is used, so that
# importing this module (as the Prefect flow does) stays cheap.
if TYPE_CHECKING:
    from great_expectations.data_context import AbstractDataContext
    from great_expectations.expectations import Expectation

# The split name under which checks across splits (leakage) are reported.
ALL = "all"
DOCS_SITE = "tlpipe"


@dataclass(frozen=True)
class Check:
    """The outcome of one expectation on one split (or on all splits, for leakage)."""

    split: str
    check: str
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int
    element_count: int
    description: str
    summary: str

    @property
    def where(self) -> str:
        return f"{self.split}.{self.column}" if self.column else self.split


@dataclass(frozen=True)
class Spec:
    """One expectation to run, with how to read its GX result back as counts and words."""

    check: str
    column: str | None
    description: str
    expectation: Expectation
    # (GX result dict, unexpected, element) -> one line on what was found.
    explain: Callable[[dict[str, Any], int, int], str]
    # GX result dict -> (unexpected, element); None: the result's own map counts.
    counts: Callable[[dict[str, Any]], tuple[int, int]] | None = None


@dataclass(frozen=True)
class Frame:
    """A dataframe validated as one GX batch, with the suite run on it."""

    name: str
    split: str
    data: pd.DataFrame
    specs: tuple[Spec, ...]


def quiet_gx() -> None:
    """GX logs at INFO while it imports and runs; keep it to warnings unless told otherwise."""
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)


def examples(result: dict[str, Any], limit: int = 5) -> str:
    found = sorted({str(v) for v in result["result"].get("partial_unexpected_list") or []})
    return f" (found {', '.join(map(repr, found[:limit]))})" if found else ""


def gx_context(docs_dir: Path) -> AbstractDataContext:
    """An in-memory GX context, quiet and offline, whose one Data Docs site is docs_dir."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        data_docs_sites={
            DOCS_SITE: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def run_frame(context: AbstractDataContext, frame: Frame) -> list[Check]:
    """Run frame's suite on it as a pandas batch; one Check per spec, in spec order."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    source = context.data_sources.add_pandas(frame.name)
    batch = source.add_dataframe_asset(frame.name).add_batch_definition_whole_dataframe(frame.name)
    suite = context.suites.add(gx.ExpectationSuite(name=frame.name))
    for spec in frame.specs:
        spec.expectation.description = spec.description
        spec.expectation.meta = {"check": spec.check}
        suite.add_expectation(spec.expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=frame.name, data=batch, suite=suite)
    )
    outcome = definition.run(
        batch_parameters={"dataframe": frame.data},
        run_id=RunIdentifier(run_name="validate"),
    )
    # GX does not keep the suite's order in its results: match them back by our check name.
    by_check = {r.expectation_config.meta["check"]: r.to_json_dict() for r in outcome.results}
    return [_check(frame, spec, by_check[spec.check]) for spec in frame.specs]


def _check(frame: Frame, spec: Spec, result: dict[str, Any]) -> Check:
    success = bool(result["success"])
    error = result.get("exception_info") or {}
    if error.get("raised_exception"):
        unexpected, element = 0, len(frame.data)
        summary = f"could not be evaluated: {error.get('exception_message')}"
    else:
        if spec.counts is not None:
            unexpected, element = spec.counts(result)
        else:
            unexpected = int(result["result"]["unexpected_count"])
            element = int(result["result"]["element_count"])
        summary = spec.explain(result, unexpected, element)
    return Check(
        split=frame.split,
        check=spec.check,
        expectation=result["expectation_config"]["type"],
        column=spec.column,
        success=success,
        unexpected_count=unexpected,
        element_count=element,
        description=spec.description,
        summary=summary,
    )
