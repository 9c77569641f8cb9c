"""evaluate: what transfer buys, measured honestly.

The shipped (fine-tuned) model is scored on the target test split. A data-efficiency curve
then trains transfer and a from-scratch control at several training-set sizes, several
seeds each, on the same rows; the paired gain gets a confidence interval, and the
negative-transfer gate fails the stage when, at the configured size, transfer is not
better than scratch beyond that noise. Forgetting is the source task's score before and
after fine-tuning.
"""

from __future__ import annotations

import csv
import logging
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tlpipe.checkpoint import seed_everything
from tlpipe.curve import (
    ARMS,
    CurvePoint,
    check_runs,
    choose_scratch,
    curve_plan,
    curve_workers,
    one_fit,
    one_thread,
    scratch_params,
    tuning_plan,
)
from tlpipe.data import read_split
from tlpipe.errors import DataError, GateFailed
from tlpipe.files import fresh_dir, write_json
from tlpipe.metrics import figures
from tlpipe.params import DataParams, EncoderConfig, EvaluateParams, FinetuneParams, Size
from tlpipe.resume import Resume
from tlpipe.setting import Metric, Setting, primary_metric, spec
from tlpipe.train import Runtime, fit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    shipped: dict[str, Any]
    gate: dict[str, Any]
    forgetting: dict[str, Any]

    def summary(self) -> str:
        g = self.gate
        return (
            f"gain in {g['metric']} at {g['units']:,} {g['unit']} {g['gain']:+.4f} "
            f"[{g['ci_low']:+.4f}, {g['ci_high']:+.4f}], gate {'passed' if g['passed'] else 'failed'}; "
            f"shipped model: {figures(self.shipped)}"
        )


def labelled_target(prepare_dir: Path) -> pd.DataFrame:
    """The labelled target rows a curve may train on: train, then pool (never val or test)."""
    return pd.concat([read_split(prepare_dir, "train"), read_split(prepare_dir, "pool")], ignore_index=True)


def draw_order(frame: pd.DataFrame, seed: int, stratify: bool = False) -> np.ndarray:
    """A seeded permutation of `frame`'s rows. Stratified, each label's rows keep their
    permuted order and are spread through the whole order by their rank within the label,
    so every prefix holds each label in proportion to its share (to a row)."""
    order = np.random.default_rng(seed).permutation(len(frame))
    if not stratify:
        return order
    _, label, counts = np.unique(frame["label"].to_numpy()[order], return_inverse=True, return_counts=True)
    rank = np.zeros(len(order))
    for code in range(len(counts)):
        rows = label == code
        rank[rows] = np.arange(rows.sum())
    # Ties (labels of one size) keep the permutation's order: stable.
    return order[np.argsort((rank + 0.5) / counts[label], kind="stable")]


def subsample(
    frame: pd.DataFrame,
    size: Size,
    seed: int,
    units: np.ndarray | None = None,
    unit: str = "rows",
    stratify: bool = False,
) -> pd.DataFrame:
    """The first rows of a seeded draw (`draw_order`) that make `size`: `size` rows, or,
    with each row's `units` (a text's tokens), the fewest rows whose units reach `size`.
    Sizes are nested for a given seed."""
    order = draw_order(frame, seed, stratify)
    if size == "all":
        return frame.iloc[order]
    total = len(frame) if units is None else int(units.sum())
    if size > total:
        raise DataError(
            f"evaluate.sizes asks for {size} training {unit}; the target has {total} "
            f"{unit} outside val and test (train + pool)"
        )
    if units is None:
        return frame.iloc[order[:size]]
    taken = int(np.searchsorted(np.cumsum(units[order]), size)) + 1
    return frame.iloc[order[:taken]]


def run_point(
    point: CurvePoint,
    setting: Setting,
    p: EvaluateParams,
    ft: FinetuneParams,
    data: DataParams,
    source_dir: Path,
    prepare_dir: Path,
    resume: Resume | None = None,
) -> dict[str, Any]:
    """Train one arm on `point.size` rows drawn with `point.seed`; score it on test, or, for
    a tuning run, keep its best validation scores alone. With `resume`, a run that finished
    there before is taken as it is, and training resumes from the state it saved there.

    Returns the run's record (rows, every test or validation metric of the setting, steps,
    time) and writes nothing but `resume`'s state: the record travels back to whoever runs
    `finish`, from a worker on any machine.
    """
    if resume is not None and (done := resume.result(point.key)) is not None:
        return done
    seed_everything(point.seed)
    target = labelled_target(prepare_dir)
    units = setting.units(target, source_dir)
    rows = subsample(target, point.size, point.seed, units, spec(setting.name).size_unit, p.stratify)
    drawn = len(rows) if units is None else int(units[target.index.get_indexer(rows.index)].sum())
    val, test = read_split(prepare_dir, "val"), read_split(prepare_dir, "test")
    if point.arm == "reference":
        metrics, training = setting.reference(rows, val, test, data, source_dir)
        return _record(point, len(rows), drawn, metrics, training, resume)
    run_ft = ft.model_copy(update={"seed": point.seed})
    if point.arm == "transfer":
        arm = setting.transfer_arm(run_ft, data, source_dir, prepare_dir)
    else:
        assert point.lr is not None and point.model is not None, (
            f"{point.key}: scratch runs name their grid cell"
        )
        run_ft = scratch_params(run_ft, point.lr)
        arm = setting.scratch_arm(data, source_dir, p.scratch_models[point.model])
    runtime = Runtime.pick(ft.device, ft.precision)
    run, _ = fit(
        setting, arm, rows, val, run_ft, data, source_dir, runtime=runtime, resume=resume, desc=point.key
    )
    training: dict[str, Any] = {"best_step": run.best_step, "steps": run.steps, "train_seconds": run.seconds}
    if point.tune:
        metrics = {f"val_{key}": run.best()[f"val_{key}"] for key in setting.metrics}
    else:
        # Under the runtime it trained and validated with (bf16 autocast where native): the
        # arms are scored alike. The shipped model is scored in fp32, as it is served.
        metrics = setting.score(arm.model, test, ft, data, source_dir, runtime)
        if point.size == p.gate_size and point.seed == p.seeds[0]:
            examples = setting.examples(arm.model, test, ft, source_dir)
            if examples is not None:
                training["examples"] = examples
    return _record(point, len(rows), drawn, metrics, training, resume)


def _record(
    point: CurvePoint,
    rows: int,
    units: int,
    metrics: dict[str, float],
    training: dict[str, Any],
    resume: Resume | None,
) -> dict[str, Any]:
    """`units`: what the rows count toward the size (their tokens, or the rows themselves).
    The run is recorded as finished in `resume` too."""
    result = {**asdict(point), "rows": rows, "units": units, **metrics, **training}
    if resume is not None:
        resume.finished(point.key, result)
    log.info("%s: %d rows, %s", point.key, rows, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return result


def interval(values: list[float], confidence: float) -> dict[str, float]:
    """Mean, sample std and a two-sided Student-t confidence interval of the mean."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    half = (
        float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1)) * std / math.sqrt(len(x)) if len(x) > 1 else 0.0
    )
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": len(x)}


def summarise(
    results: list[dict[str, Any]], p: EvaluateParams, metrics: dict[str, Metric]
) -> list[dict[str, Any]]:
    """Per size: each arm's (and the reference's) score on every metric (mean, std, interval)
    and the paired gain of transfer over scratch, positive where transfer is better
    (tuning runs are not part of the curve)."""
    runs = {(r["arm"], r["size"], r["seed"]): r for r in results if not r.get("tune")}

    def by(key: tuple[str, Size, int]) -> dict[str, Any]:
        arm, size, seed = key
        return runs[(arm, size, p.seeds[0] if one_fit(arm, size) else seed)]

    arms = (*ARMS, "reference") if any(arm == "reference" for arm, _, _ in runs) else ARMS
    curve = []
    for size in p.sizes:
        first = by(("transfer", size, p.seeds[0]))
        entry: dict[str, Any] = {
            "size": size,
            "rows": first["rows"],
            "units": first.get("units", first["rows"]),
        }
        for arm in arms:
            entry[arm] = {
                key: interval([by((arm, size, s))[key] for s in p.seeds], p.confidence) for key in metrics
            }
        entry["gain"] = {
            key: interval(
                [metric.gain(by(("transfer", size, s))[key], by(("scratch", size, s))[key]) for s in p.seeds],
                p.confidence,
            )
            for key, metric in metrics.items()
        }
        curve.append(entry)
    return curve


def gate(curve: list[dict[str, Any]], p: EvaluateParams, unit: str = "rows") -> dict[str, Any]:
    """The negative-transfer gate: the gain's interval on the primary metric at `gate_size`
    must clear min_gain."""
    entry = next(e for e in curve if e["size"] == p.gate_size)
    gain = entry["gain"][p.metric]
    return {
        "size": p.gate_size,
        "rows": entry["rows"],
        "units": entry["units"],
        "unit": unit,
        "seeds": len(p.seeds),
        "confidence": p.confidence,
        "min_gain": p.min_gain,
        "metric": p.metric,
        "transfer": entry["transfer"][p.metric]["mean"],
        "scratch": entry["scratch"][p.metric]["mean"],
        "gain": gain["mean"],
        "ci_low": gain["ci_low"],
        "ci_high": gain["ci_high"],
        "passed": gain["ci_low"] > p.min_gain,
    }


def gate_message(g: dict[str, Any]) -> str:
    return (
        f"negative-transfer gate at {g['units']} training {g['unit']} ({g['seeds']} seeds): "
        f"transfer {g['metric']} "
        f"{g['transfer']:.4f} vs scratch {g['scratch']:.4f}, gain {g['gain']:+.4f} "
        f"with {g['confidence']:.0%} interval [{g['ci_low']:+.4f}, {g['ci_high']:+.4f}]; its lower end "
        f"must exceed evaluate.min_gain {g['min_gain']:+.4f} and is {g['min_gain'] - g['ci_low']:.4f} short"
    )


def finish(
    setting: Setting,
    p: EvaluateParams,
    ft: FinetuneParams,
    data: DataParams,
    source_dir: Path,
    finetune_dir: Path,
    prepare_dir: Path,
    out_dir: Path,
    results: list[dict[str, Any]],
) -> EvaluateResult:
    """Summarise the curve runs, score the shipped model, measure forgetting, apply the gate.

    Writes each run's record as `runs/<key>.json`, then `metrics.json`, `curve.csv` (DVC
    plot), `curve.png`, `report.md` and the setting's own test plots (a classifier's
    `confusion.csv`). Raises GateFailed, after writing them, when the gate fails.
    """
    metric = primary_metric(setting, p.metric)
    check_runs(results, p, metric)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    for result in results:
        write_json(out_dir / "runs" / f"{CurvePoint.of(result).key}.json", result)
    seed_everything(ft.seed)
    test = read_split(prepare_dir, "test")
    model, shipped = setting.shipped(finetune_dir / "model", test, ft, data, out_dir)
    tuning = [r for r in results if r.get("tune")]
    lr, encoder = next((r["lr"], r["model"]) for r in results if r["arm"] == "scratch" and not r.get("tune"))
    unit = spec(setting.name).size_unit
    curve = summarise(results, p, dict(setting.metrics))
    g = gate(curve, p, unit)
    forgot = setting.forgetting(p, ft, data, source_dir, model, prepare_dir)
    baseline = setting.baseline(read_split(prepare_dir, "train"), test, data, source_dir)
    trivial = (setting.baseline_name, baseline[metric.key])
    write_json(
        out_dir / "metrics.json",
        {
            "setting": setting.name,
            "test_rows": len(test),
            "train_rows": len(read_split(prepare_dir, "train")),
            "baseline": {"predictor": setting.baseline_name, "scores": baseline},
            "shipped": shipped,
            "strategy": _strategy(ft),
            "metric": metric.key,
            "higher_is_better": metric.higher_is_better,
            "scratch": {
                "lr": lr,
                "model": _encoder(p.scratch_models[encoder]),
                "tuned": {
                    "rows": tuning[0]["rows"] if tuning else None,
                    "seed": p.seeds[0],
                    "on": f"val_{metric.key}",
                    "grid": [
                        {
                            "lr": r["lr"],
                            "model": _encoder(p.scratch_models[r["model"]]),
                            **{f"val_{key}": r[f"val_{key}"] for key in setting.metrics},
                        }
                        for r in tuning
                    ],
                },
            },
            "curve": curve,
            "gate": g,
            "gain": {"metric": metric.key, "mean": g["gain"], "ci_low": g["ci_low"], "ci_high": g["ci_high"]},
            "forgetting": forgot,
        },
    )
    _write_curve_csv(out_dir / "curve.csv", curve, list(setting.metrics))
    reference = spec(setting.name).reference_name
    plot_curve(out_dir / "curve.png", curve, metric, trivial, p.confidence, unit, reference)
    (out_dir / "report.md").write_text(curve_markdown(curve, g, metric, trivial))
    log.info("evaluate: %s", gate_message(g) if not g["passed"] else f"gate passed: {g}")
    if not g["passed"]:
        raise GateFailed(gate_message(g))
    return EvaluateResult(shipped, g, forgot)


def evaluate(
    setting: Setting,
    p: EvaluateParams,
    ft: FinetuneParams,
    data: DataParams,
    source_dir: Path,
    finetune_dir: Path,
    prepare_dir: Path,
    out_dir: Path,
    resume: Resume | None = None,
) -> EvaluateResult:
    """Every curve run over a pool of worker processes (`out_dir/runs/*.json`), each taken
    from `resume` when it finished there before or resumed from its saved state, then
    `finish`. The Prefect flow runs the same points as separate task runs on the same kind
    of pool."""
    fresh_dir(out_dir)
    args = (setting, p, ft, data, source_dir, prepare_dir, resume)
    metric = primary_metric(setting, p.metric)
    with ProcessPoolExecutor(curve_workers(), initializer=one_thread) as pool:

        def run_all(plan: list[CurvePoint]) -> list[dict[str, Any]]:
            return list(pool.map(run_point, plan, *([a] * len(plan) for a in args)))

        tuning = run_all(tuning_plan(p))
        results = tuning + run_all(curve_plan(p, choose_scratch(tuning, p, metric)))
    return finish(setting, p, ft, data, source_dir, finetune_dir, prepare_dir, out_dir, results)


def _encoder(config: EncoderConfig | None) -> dict[str, Any] | None:
    """An encoder size as recorded (None: the transfer model's own architecture)."""
    return config.model_dump() if config is not None else None


def _strategy(ft: FinetuneParams) -> dict[str, Any]:
    keys = ("strategy", "freeze_bottom", "layer_decay", "l2sp", "joint_alpha", "tapt_steps")
    return {k: getattr(ft, k) for k in keys} | {"lr": ft.optim.lr, "schedule": ft.optim.schedule}


def _write_curve_csv(path: Path, curve: list[dict[str, Any]], metrics: list[str]) -> None:
    """One row per size: each arm's mean on every metric, the gain's mean and interval
    (a DVC plot)."""
    arms = [arm for arm in (*ARMS, "reference") if arm in curve[0]]
    fields = ["rows", "units"]
    for key in metrics:
        fields += [f"{arm}_{key}" for arm in arms] + [
            f"gain_{key}",
            f"gain_{key}_ci_low",
            f"gain_{key}_ci_high",
        ]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for e in curve:
            row: dict[str, Any] = {"rows": e["rows"], "units": e["units"]}
            for key in metrics:
                row |= {f"{arm}_{key}": e[arm][key]["mean"] for arm in arms}
                gain = e["gain"][key]
                row |= {
                    f"gain_{key}": gain["mean"],
                    f"gain_{key}_ci_low": gain["ci_low"],
                    f"gain_{key}_ci_high": gain["ci_high"],
                }
            writer.writerow(row)


def plot_curve(
    path: Path,
    curve: list[dict[str, Any]],
    metric: Metric,
    baseline: tuple[str, float],
    confidence: float,
    unit: str = "rows",
    reference: str = "reference",
) -> None:
    """The primary test metric against the training set's size in `unit` (log scale), mean
    and interval of each arm, beside what the setting's trivial predictor scores."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [e["units"] for e in curve]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    styles = {"transfer": ("tab:blue", "-"), "scratch": ("tab:orange", "-"), "reference": ("tab:green", ":")}
    for arm, (colour, line) in styles.items():
        if arm not in curve[0]:
            continue
        acc = [e[arm][metric.key] for e in curve]
        label = f"reference ({reference})" if arm == "reference" else arm
        ax.plot(rows, [a["mean"] for a in acc], marker="o", linestyle=line, color=colour, label=label)
        ax.fill_between(
            rows, [a["ci_low"] for a in acc], [a["ci_high"] for a in acc], color=colour, alpha=0.2
        )
    ax.axhline(baseline[1], color="grey", linestyle="--", linewidth=1, label=baseline[0])
    ax.set_xscale("log")
    ax.set_xlabel(f"target training {unit}")
    ax.set_ylabel(f"test {metric.label}")
    ax.set_title(f"Data efficiency (mean and {confidence:.0%} interval over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def curve_markdown(
    curve: list[dict[str, Any]], g: dict[str, Any], metric: Metric, baseline: tuple[str, float]
) -> str:
    reference = "reference" in curve[0]
    m, name = metric.key, metric.label
    lines = [
        f"| {g['unit']} | transfer {name} | scratch {name} | gain (interval) |"
        + (f" reference {name} |" if reference else ""),
        "|---:|---|---|---|" + ("---|" if reference else ""),
    ]
    for e in curve:
        t, s, d = e["transfer"][m], e["scratch"][m], e["gain"][m]
        line = (
            f"| {e['units']} | {t['mean']:.4f} ± {t['std']:.4f} | {s['mean']:.4f} ± {s['std']:.4f} | "
            f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] |"
        )
        if reference:
            r = e["reference"][m]
            line += f" {r['mean']:.4f} ± {r['std']:.4f} |"
        lines.append(line)
    verdict = "passed" if g["passed"] else "FAILED"
    lines += [
        "",
        f"{baseline[0].capitalize()}: {name} {baseline[1]:.4f}. Mean ± std over {g['seeds']} seeds; "
        f"gain intervals at {g['confidence']:.0%}.",
        f"Negative-transfer gate at {g['units']} {g['unit']}: {verdict} (lower end {g['ci_low']:+.4f}, "
        f"needs > {g['min_gain']:+.4f}).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from tasks.wiring import main

    main("evaluate")
