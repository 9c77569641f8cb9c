"""Transfer strategies side by side on the curve's own runs: which combination to default to.

Each variant is a set of finetune (or evaluate) overrides on params.yaml; every variant
trains at each size with each seed on the same rows, so differences are paired by seed.
Writes bench/strategies.json (every run) and prints a Markdown table.

    python -m bench.strategies --sizes 100 1000 --seeds 0 1 2

It reads params.yaml and outputs/ of the folder it runs in: run it in a workspace
(`.tlpipe/workspaces/<id>/`, which `tlpipe run --params FILE` prints) for another params file.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tasks.evaluate import CurvePoint, curve_workers, interval, one_thread, run_point
from tlpipe.checkpoint import resolve_init
from tlpipe.data import sha256_file
from tlpipe.params import Params, load_params, parse_params, stage_dir
from tlpipe.setting import get_setting

NO_AUGMENT = {"rotation": 0.0, "shift": 0.0, "flip": 0.0, "scale": 0.0, "downscale": 0.0}
LONG = {"finetune.min_steps": 400, "finetune.max_steps": 1200, "finetune.patience": 6}
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    # Plain full fine-tuning: pretrain.init_from as it is (no pretraining), every layer at
    # lr 2e-4 (the best of 1e-4 and 2e-4 on that checkpoint, docs/transfer.md).
    "plain": {"source": "shipped", "finetune.optim.lr": 2e-4},
    "reference": {"arm": "reference"},
    "full+llrd0.8+cosine@2e-4": {
        "finetune.layer_decay": 0.8,
        "finetune.optim.lr": 2e-4,
        "finetune.optim.schedule": "cosine",
    },
    "gradual_unfreeze@2e-4": {"finetune.strategy": "gradual_unfreeze", "finetune.optim.lr": 2e-4},
    "full+l2sp0.01": {"finetune.l2sp": 0.01},
    "full@2e-4": {"finetune.optim.lr": 2e-4},
    "full@1e-4": {"finetune.optim.lr": 1e-4},
    "full@5e-5": {"finetune.optim.lr": 5e-5},
    "freeze_embeddings": {"finetune.strategy": "freeze_embeddings"},
    # Image classification (examples/image-digits: full at lr 1e-3 with augmentation).
    "head_only": {"finetune.strategy": "head_only"},
    "freeze_bottom:2": {"finetune.strategy": "freeze_bottom", "finetune.freeze_bottom": 2},
    "gradual_unfreeze": {"finetune.strategy": "gradual_unfreeze"},
    "full+llrd0.7": {"finetune.layer_decay": 0.7},
    "full@3e-4": {"finetune.optim.lr": 3e-4},
    "full@3e-3": {"finetune.optim.lr": 3e-3},
    "full-augment": {"finetune.augment": NO_AUGMENT},
    "full-bn-update": {"finetune.update_batch_norm": False},
    "full+zoom0.2": {"finetune.augment": {"rotation": 10.0, "shift": 0.1, "flip": 0.0, "scale": 0.2}},
    "full-long": LONG,
    "full-augment-long": {"finetune.augment": NO_AUGMENT, **LONG},
    "full-augment@3e-4": {"finetune.augment": NO_AUGMENT, "finetune.optim.lr": 3e-4},
    "joint0.5": {"finetune.joint_alpha": 0.5},
    "joint0.5-long": {"finetune.joint_alpha": 0.5, **LONG},
    "joint0.7-long": {"finetune.joint_alpha": 0.7, **LONG},
    # Text generation (examples/text-generation: every parameter at lr 2e-3).
    "embeddings": {"finetune.transfer": "embeddings"},
    "freeze_bottom:1": {"finetune.strategy": "freeze_bottom", "finetune.freeze_bottom": 1},
    "joint0.3": {"finetune.joint_alpha": 0.3},
    "full@1e-3": {"finetune.optim.lr": 1e-3},
    "full@5e-3": {"finetune.optim.lr": 5e-3},
    # The scratch control at one cell of its grid (the first of evaluate.scratch_models and
    # of evaluate.scratch_lrs).
    "scratch:same@2e-4": {
        "arm": "scratch",
        "evaluate.scratch_models": [None],
        "evaluate.scratch_lrs": [2e-4],
    },
    "scratch:4x256@2e-4": {
        "arm": "scratch",
        "evaluate.scratch_models": ["small"],
        "evaluate.scratch_lrs": [2e-4],
    },
    "scratch:4x256@1e-3": {
        "arm": "scratch",
        "evaluate.scratch_models": ["small"],
        "evaluate.scratch_lrs": [1e-3],
    },
}
SMALL = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024, "dropout": 0.1}


def _override(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = [SMALL if v == "small" else v for v in value] if isinstance(value, list) else value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[100, 1000])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path("bench/strategies.json"))
    ap.add_argument(
        "--source",
        type=Path,
        help="the transfer arm's source checkpoint (default: the pretrain stage's model, else "
        "pretrain.init_from as it is)",
    )
    ap.add_argument("--suffix", default="", help="appended to each variant's name, e.g. ' [my source]'")
    ap.add_argument("--baseline", default="full", help="the variant the paired differences are taken from")
    args = ap.parse_args()

    base = load_params()
    prepare_dir = stage_dir("prepare")
    results: list[dict[str, Any]] = json.loads(args.out.read_text()) if args.out.is_file() else []
    with tempfile.TemporaryDirectory() as tmp:
        init_from = base.pretrain.init_from
        shipped = resolve_init(init_from, Path(tmp) / "shipped") if init_from else None
        staged = args.source or stage_dir("pretrain") / "model"
        jobs = []
        for name in args.variants:
            raw = base.as_dict()
            overrides = dict(VARIANTS[name])
            arm = overrides.pop("arm", "transfer")
            source_dir = shipped if overrides.pop("source", None) == "shipped" else staged
            if source_dir is None or not source_dir.is_dir():
                raise SystemExit(f"variant {name}: no source checkpoint at {source_dir} (run the pipeline)")
            for dotted, value in overrides.items():
                _override(raw, dotted, value)
            params = parse_params(raw)
            variant, key = name + args.suffix, _fingerprint(params, source_dir)
            # Runs in --out are reused only when made with the same params and source weights.
            stale = [r for r in results if r["variant"] == variant and r.get("fingerprint") != key]
            if stale:
                print(f"{variant}: dropping {len(stale)} runs made with other params or source weights")
                results = [r for r in results if r not in stale]
            done = {(r["size"], r["seed"]) for r in results if r["variant"] == variant}
            jobs += [
                (variant, _point(arm, size, seed, params), params, source_dir, key)
                for size in args.sizes
                for seed in args.seeds
                if (size, seed) not in done
            ]
        # The curve's own layout: one process per core, one torch thread each.
        with ProcessPoolExecutor(curve_workers(), initializer=one_thread) as pool:
            futures = {
                pool.submit(
                    run_point,
                    point,
                    get_setting(params.setting),
                    params.evaluate,
                    params.finetune,
                    params.data,
                    source_dir,
                    prepare_dir,
                ): (name, key)
                for name, point, params, source_dir, key in jobs
            }
            for future in as_completed(futures):
                name, key = futures[future]
                results.append({"variant": name, "fingerprint": key, **future.result()})
                args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results, args.sizes, base.evaluate.metric, args.baseline))


def _point(arm: str, size: int, seed: int, params: Params) -> CurvePoint:
    """A curve run; a scratch run at the first cell of the variant's grid."""
    if arm == "scratch":
        return CurvePoint(arm, size, seed, params.evaluate.scratch_lrs[0], 0)
    return CurvePoint(arm, size, seed)


def _fingerprint(params: Params, source_dir: Path) -> str:
    """What a run's result depends on besides its size and seed: the finetune, evaluate and
    label params, the prepared data, the source model's weights and the code the evaluate
    stage runs (its Python deps in dvc.yaml)."""
    h = hashlib.sha256(
        json.dumps(
            [
                params.finetune.model_dump(mode="json"),
                params.evaluate.model_dump(mode="json"),
                params.data.labels,
            ]
        ).encode()
    )
    deps = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]["evaluate"]["deps"]
    code = [Path(d) for d in deps if d.endswith(".py")]
    for path in (source_dir / "model.safetensors", stage_dir("prepare") / "summary.json", *code):
        h.update(_file_hash(path).encode())
    return h.hexdigest()[:16]


@functools.cache
def _file_hash(path: Path) -> str:
    """A file's SHA-256, once per process: every variant on a source hashes the same weights."""
    return sha256_file(path) if path.is_file() else "-"


def table(results: list[dict[str, Any]], sizes: list[int], metric: str, baseline: str = "full") -> str:
    """`metric`'s mean ± std per variant and size, and the paired (same seed, same rows)
    difference from `baseline` (variant minus baseline) with its 95% interval."""
    variants = list(dict.fromkeys(r["variant"] for r in results))
    acc = {(r["variant"], r["size"], r["seed"]): r[metric] for r in results}
    head = (
        "| variant | "
        + " | ".join(f"{metric} @ {s} | vs {baseline} @ {s}" for s in sizes)
        + " | train s/run |"
    )
    lines = [head, "|---" * (2 * len(sizes) + 2) + "|"]
    for v in variants:
        cells = []
        for s in sizes:
            seeds = sorted(seed for (vv, ss, seed) in acc if vv == v and ss == s)
            if not seeds:
                cells += ["", ""]
                continue
            x = [acc[(v, s, seed)] for seed in seeds]
            ci = interval(x, 0.95) if len(x) > 1 else {"mean": x[0], "std": 0.0}
            cells.append(f"{ci['mean']:.4f} ± {ci['std']:.4f} (n={len(x)})")
            paired = [
                acc[(v, s, seed)] - acc[(baseline, s, seed)] for seed in seeds if (baseline, s, seed) in acc
            ]
            if v != baseline and len(paired) > 1:
                d = interval(paired, 0.95)
                cells.append(f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]")
            else:
                cells.append("")
        secs = np.mean([r["train_seconds"] for r in results if r["variant"] == v])
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {secs:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
