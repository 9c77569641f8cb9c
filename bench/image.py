"""Image classification: tlpipe's training loop against a plain PyTorch loop, and inference
on onnxruntime (fp32, static int8, dynamic int8) against PyTorch eager, side by side.

Training is the image example's source task: its CNN (`examples/image-digits`, 32 px, one
channel) on the bundled MNIST digits, with the example's batch, learning rate, warmup and
decay, weight decay, clipping, augmentation (rotation and shift) and the same threads on
both sides. The plain loop is written as torchvision's classification reference trains: a
Dataset that augments one image at a time (Pillow's affine resampling, as torchvision's
RandomAffine does on PIL images), then ToTensor and Normalize; a shuffling DataLoader in the
main process (`--workers`); forward and cross entropy (under bf16 autocast, its `--amp`, on
the bf16 sides); backward, gradient clipping, AdamW (torch's default implementation) and an
LR scheduler step. Both sides start from the same initial weights; each side trains
`--repeats` times, the sides in turn, and throughput is the median over windows of steps
after a warm-up window. Quality: each side's final model's accuracy on held-out digits.
Training FLOPs per image are counted from the model's convolutions and linear layers (3 x
the forward pass) and set against the machine's measured rate for the model's largest
convolution and for a square matrix product.

Inference: the trained CNN (and, with `--efficientnet`, the packaged ImageNet
EfficientNet-Lite0 at 64 px) in PyTorch eager fp32 and on onnxruntime: fp32, static QDQ int8
(what export ships) and dynamic int8; batch 1 (p50 / p95 latency over held-out images one
at a time) and batch 64 (images/s over all held-out images), the engines taking turns.

    python -m bench.image [--steps 150] [--window 25] [--repeats 3] [--efficientnet]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from bench.common import in_turns, machine, pin_threads, ratio, record, stat, threads_from_env, timed
from bench.train import Side, interleaved, matmul_flops
from tlpipe.bundled import materialize_images
from tlpipe.data import label_ids
from tlpipe.params import PretrainParams, load_params
from tlpipe.quantize import quantize_dynamic_int8
from tlpipe.serve import inference_session, session_options
from tlpipe.settings.image_classification import backbones
from tlpipe.settings.image_classification.classifier import Augment, ImageTask, model_input, predict_logits
from tlpipe.settings.image_classification.export import ImageExporter
from tlpipe.settings.image_classification.model import Cnn, CnnConfig, save_checkpoint
from tlpipe.settings.image_classification.preprocess import Preprocessor
from tlpipe.train import Runtime, bf16_native, schedule_factor, source_plan, train_model

EXAMPLE = Path("examples/image-digits/params.yaml")
HELD_OUT = 500
LATENCY_ROWS = 300
INFER_BATCH = 64


# ---- training ----------------------------------------------------------------------------


class AugmentedDigits(Dataset):
    """One image at a time, as torchvision's reference pipeline prepares it: a random affine
    (rotation up to `rotation` degrees, shift up to `shift` of the side) on the PIL image,
    then ToTensor (float in [0, 1], (C, H, W)) and Normalize."""

    def __init__(self, pixels: np.ndarray, y: np.ndarray, augment: Augment, prep: Preprocessor, seed: int):
        self.pixels, self.y, self.augment = pixels, y, augment  # uint8 (N, 1, H, W)
        self.mean = torch.tensor(prep.mean)[:, None, None]
        self.std = torch.tensor(prep.std)[:, None, None]
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.pixels[i, 0])
        side = image.size[0]
        angle = self.rng.uniform(-self.augment.rotation, self.augment.rotation)
        dx, dy = self.rng.uniform(-self.augment.shift, self.augment.shift, 2) * side
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, translate=(dx, dy))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]  # ToTensor
        return (x - self.mean) / self.std, int(self.y[i])  # Normalize


def plain_run(
    model: nn.Module,
    data: AugmentedDigits,
    p: PretrainParams,
    steps: int,
    window: int,
    bf16: bool,
    workers: int,
) -> list[tuple[float, float]]:
    """torchvision's `train_one_epoch`, epoch after epoch until `steps`; (cumulative images,
    elapsed) every `window` steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.optim.lr, weight_decay=p.optim.weight_decay)
    scheduler = LambdaLR(optimizer, schedule_factor(p.optim, steps))
    loader = DataLoader(
        data,
        batch_size=p.optim.batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(p.seed),
    )
    criterion = nn.CrossEntropyLoss()
    marks, images, step = [(0.0, 0.0)], 0, 0
    model.train()
    start = time.perf_counter()
    while step < steps:
        for image, target in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                output = model(image)
                loss = criterion(output, target)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), p.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step, images = step + 1, images + len(image)
            if step % window == 0:
                marks.append((images, time.perf_counter() - start))
            if step == steps:
                break
    model.eval()
    return marks


Layer = tuple[float, nn.Module, tuple[int, ...]]


def layer_flops(model: nn.Module, prep: Preprocessor) -> list[Layer]:
    """Per convolution and linear layer, in forward order: its forward FLOPs for one image
    (2 x multiply-adds), the layer, and its input's shape without the batch axis."""
    layers: list[Layer] = []

    def keep(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            flops = 2.0 * out[0].numel() * k
        else:
            flops = 2.0 * module.in_features * module.out_features
        layers.append((flops, module, tuple(args[0].shape[1:])))

    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, prep.channels, prep.size, prep.size))
    for h in hooks:
        h.remove()
    return layers


def training_flops(layers: list[Layer]) -> float:
    """FLOPs of one training step per image: 3 x the forward pass's (backward computes the
    input and the weight gradients, each as costly as the forward)."""
    return 3.0 * sum(flops for flops, _, _ in layers)


def conv_flops(layers: list[Layer], batch: int, dtype: torch.dtype) -> dict[str, Any]:
    """FLOP/s of the model's costliest convolution, forward, at the training batch: the
    machine's practical rate for this kind of work."""
    convs = [layer for layer in layers if isinstance(layer[1], nn.Conv2d)]
    flops, conv, shape = max(convs, key=lambda layer: layer[0])
    conv = copy.deepcopy(conv)
    x = torch.randn(batch, *shape)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        seconds = timed(lambda: [conv(x) for _ in range(10)], reps=5, warmup=2)
    return {
        "conv": f"{conv.in_channels}->{conv.out_channels} {conv.kernel_size[0]}x{conv.kernel_size[1]} "
        f"on {shape[1]}x{shape[2]}, batch {batch}",
        "flops": stat([10 * batch * flops / s for s in seconds], "FLOP/s"),
    }


def bench_training(
    steps: int, window: int, repeats: int, workers: int, data: dict[str, Any]
) -> tuple[dict[str, Any], nn.Module]:
    p: PretrainParams = data["params"].pretrain
    prep: Preprocessor = data["prep"]
    labels = data["labels"]
    augment = Augment.of(p.augment)
    train_px, train_y = data["train_pixels"], data["train_y"]
    held_px, held_y = data["held_pixels"], data["held_y"]
    torch.manual_seed(p.seed)
    initial = Cnn(CnnConfig(prep.channels, p.cnn.widths, labels, p.cnn.dropout))
    plan = source_plan(p).model_copy(update={"min_steps": steps, "max_steps": steps,
                                              "evaluations": steps // window, "patience": steps})  # fmt: skip
    dataset = AugmentedDigits(train_px.numpy(), train_y, augment, prep, p.seed)
    finals: dict[str, nn.Module] = {}

    def train(name: str, loop: str, bf16: bool) -> tuple[list[tuple[float, float]], nn.Module]:
        model = copy.deepcopy(initial)
        if loop == "plain":
            marks = plain_run(model, dataset, p, steps, window, bf16, workers)
        else:
            rt = Runtime(torch.device("cpu"), bf16)
            task = ImageTask(
                train_px, train_y, held_px[:256], held_y[:256], prep, len(labels),
                batch_size=p.optim.batch_size, eval_batch_size=256, runtime=rt, seed=p.seed, augment=augment,
            )  # fmt: skip
            run = train_model(model, task, plan, model.layer_groups(), runtime=rt, desc=f"train {name}")
            marks = [(0, 0.0)] + [(h["examples"], h["seconds"]) for h in run.history]
        finals.setdefault(name, model)
        return marks, model

    def accuracy(model: nn.Module) -> float:
        return float((predict_logits(model, held_px, prep, 256).argmax(1) == held_y).mean())

    configs = {"plain": ("plain", False), "tlpipe_fp32": ("tlpipe", False)}
    if bf16_native(torch.device("cpu")):
        configs |= {"plain_bf16": ("plain", True), "tlpipe": ("tlpipe", True)}
    sides: dict[str, Side] = interleaved(configs, train, accuracy, repeats, "images/s")
    out = {
        name: {"images_per_s": s.throughput("images/s"), "held_out_accuracy": s.quality}
        for name, s in sides.items()
    }
    best = "tlpipe" if Runtime.pick("cpu").bf16 and "tlpipe" in out else "tlpipe_fp32"
    same = "plain_bf16" if best == "tlpipe" else "plain"
    layers = layer_flops(initial, prep)
    per_image = training_flops(layers)
    peaks = {"fp32": matmul_flops(torch.device("cpu"), torch.float32, 2048)}
    convs = {"fp32": conv_flops(layers, p.optim.batch_size, torch.float32)}
    if bf16_native(torch.device("cpu")):
        peaks["bf16"] = matmul_flops(torch.device("cpu"), torch.bfloat16, 2048)
        convs["bf16"] = conv_flops(layers, p.optim.batch_size, torch.bfloat16)
    hardware = {}
    for name, r in out.items():
        useful = per_image * r["images_per_s"]["median"]
        precision = "bf16" if name in ("tlpipe", "plain_bf16") else "fp32"
        hardware[name] = {
            "useful_flops": useful,
            "fraction_of_conv_rate": useful / convs[precision]["flops"]["median"],
            "fraction_of_matmul_peak": useful / peaks[precision]["median"],
        }
    return {
        "model": f"CNN widths {list(p.cnn.widths)}, {prep.size} px, {prep.channels} channel(s), "
        f"{sum(q.numel() for q in initial.parameters())} parameters",
        "train_rows": len(train_px),
        "batch_size": p.optim.batch_size,
        "steps": steps,
        "window_steps": window,
        "repeats": repeats,
        "plain_loader_workers": workers,
        "sides": out,
        "speedup_vs_plain": {
            name: ratio(r["images_per_s"], out["plain"]["images_per_s"]) for name, r in out.items()
        },
        "speedup_same_precision": ratio(out[best]["images_per_s"], out[same]["images_per_s"]),
        "tlpipe_default": best,
        "training_flops_per_image": per_image,
        "conv_rate": convs,
        "matmul_peak": {k: {"name": f"{k} matmul 2048^3", "flops": v} for k, v in peaks.items()},
        "hardware": hardware,
    }, finals[best]


# ---- inference ---------------------------------------------------------------------------

Engine = Callable[[np.ndarray], np.ndarray]


def torch_engine(model: nn.Module, prep: Preprocessor) -> Engine:
    model.eval()

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(model_input(torch.from_numpy(pixels), prep)).numpy()

    return run


def ort_engine(path: Path, prep: Preprocessor, threads: int) -> Engine:
    session = inference_session(path, session_options(threads))

    def run(pixels: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"pixel_values": prep.normalise(pixels)})[0]

    return run


def bench_inference(
    name: str, model: nn.Module, prep: Preprocessor, data: dict[str, Any], threads: int, rounds: int
) -> dict[str, Any]:
    """Every engine on the held-out images, taking turns: latency at batch 1, throughput at
    INFER_BATCH, and accuracy (or, for a model whose labels are not the digits, argmax
    agreement with PyTorch fp32)."""
    held_px = prep.batch_pixels(data["held_images"])  # uint8 (N, C, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, bundle, prepare = Path(tmp, "model"), Path(tmp, "bundle"), Path(tmp, "prepare")
        save_checkpoint(model, prep, ckpt)
        bundle.mkdir()
        prepare.mkdir()
        # Calibration images for static int8, from the training rows as export takes them.
        pd.DataFrame({"image": data["train_images"][:256]}).to_parquet(prepare / "train.parquet")
        pd.DataFrame({"image": data["train_images"][256:512]}).to_parquet(prepare / "val.parquet")
        exporter = ImageExporter(ckpt)
        exporter.write(bundle, opset=18)
        fp32, static, dynamic = bundle / "model.onnx", bundle / "static.onnx", bundle / "dynamic.onnx"
        exporter.quantize(fp32, static, prepare)
        quantize_dynamic_int8(fp32, dynamic)
        engines = {
            "pytorch_fp32": (torch_engine(model, prep), None),
            "ort_fp32": (ort_engine(fp32, prep, threads), fp32.stat().st_size),
            "ort_int8_static (shipped)": (ort_engine(static, prep, threads), static.stat().st_size),
            "ort_int8_dynamic": (ort_engine(dynamic, prep, threads), dynamic.stat().st_size),
        }
        latency: dict[str, list[float]] = {e: [] for e in engines}
        p95: dict[str, list[float]] = {e: [] for e in engines}
        rate: dict[str, list[float]] = {e: [] for e in engines}
        single = [held_px[i : i + 1] for i in range(min(LATENCY_ROWS, len(held_px)))]
        batches = [held_px[i : i + INFER_BATCH] for i in range(0, len(held_px), INFER_BATCH)]
        for r, engine in in_turns(list(engines), rounds + 1):
            run = engines[engine][0]
            times = []
            for x in single:
                start = time.perf_counter()
                run(x)
                times.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            for x in batches:
                run(x)
            seconds = time.perf_counter() - start
            if r:  # round 0 warms every engine up
                latency[engine].append(float(np.percentile(times, 50)))
                p95[engine].append(float(np.percentile(times, 95)))
                rate[engine].append(len(held_px) / seconds)
        reference = np.concatenate([engines["pytorch_fp32"][0](x) for x in batches]).argmax(1)
        out: dict[str, Any] = {}
        for engine, (run, size) in engines.items():
            pred = np.concatenate([run(x) for x in batches]).argmax(1)
            quality = (
                {"accuracy": float((pred == data["held_y"]).mean())}
                if len(exporter.labels) == len(data["labels"])
                else {"argmax_agreement_with_pytorch_fp32": float((pred == reference).mean())}
            )
            out[engine] = {
                "batch1_p50_ms": stat(latency[engine], "ms"),
                "batch1_p95_ms": stat(p95[engine], "ms"),
                f"batch{INFER_BATCH}_images_per_s": stat(rate[engine], "images/s"),
                "onnx_bytes": size,
                **quality,
            }
    base = out["pytorch_fp32"]
    return {
        "model": name,
        "rows": len(held_px),
        "rounds": rounds,
        "engines": out,
        "speedup_vs_pytorch": {
            e: {
                "batch1": ratio(base["batch1_p50_ms"], r["batch1_p50_ms"]),
                f"batch{INFER_BATCH}": ratio(
                    r[f"batch{INFER_BATCH}_images_per_s"], base[f"batch{INFER_BATCH}_images_per_s"]
                ),
            }
            for e, r in out.items()
        },
    }


# ---- the data and main -------------------------------------------------------------------


def imagenet_digits(data: dict[str, Any], steps: int, size: int = 64) -> tuple[nn.Module, Preprocessor]:
    """The packaged ImageNet EfficientNet-Lite0 with a new head, fine-tuned on the training
    digits for `steps` steps (so that each engine's accuracy means something)."""
    p: PretrainParams = data["params"].pretrain
    prep = backbones.imagenet_preprocessor(size)
    model = backbones.imagenet_backbone(size, data["labels"])
    rows = min(len(data["train_images"]), steps * p.optim.batch_size)
    rt = Runtime.pick()
    task = ImageTask(
        torch.from_numpy(prep.batch_pixels(data["train_images"][:rows])), data["train_y"][:rows],
        torch.from_numpy(prep.batch_pixels(data["held_images"][:256])), data["held_y"][:256], prep,
        len(data["labels"]), batch_size=p.optim.batch_size, eval_batch_size=256, runtime=rt, seed=p.seed,
        augment=Augment.of(p.augment),
    )  # fmt: skip
    plan = source_plan(p).model_copy(update={"min_steps": steps, "max_steps": steps, "evaluations": 1})
    train_model(model, task, plan, model.layer_groups(), runtime=rt, desc="EfficientNet-Lite0")
    return model.eval(), prep


def digits(params_path: Path, tmp: Path) -> dict[str, Any]:
    """The example's source digits, decoded as its pretrain stage does (the preprocessor's
    mean and std measured on the training images): all but HELD_OUT rows to train on."""
    params = load_params(params_path)
    p = params.pretrain
    table = pd.read_parquet(materialize_images(tmp / params.data.source.path))
    table = table.iloc[np.random.default_rng(p.seed).permutation(len(table))]  # the file is in label order
    labels = tuple(sorted(table["label"].astype(str).unique()))
    train, held = table.iloc[:-HELD_OUT], table.iloc[-HELD_OUT:]
    raw = Preprocessor(p.image.size, p.image.channels, (0.5,) * p.image.channels, (0.5,) * p.image.channels)
    train_px = torch.from_numpy(raw.batch_pixels(list(train["image"])))
    prep = Preprocessor.fitted(train_px.numpy(), p.image.size)
    return {
        "params": params,
        "labels": labels,
        "prep": prep,
        "train_images": list(train["image"]),
        "train_pixels": train_px,
        "train_y": label_ids(train, labels),
        "held_images": list(held["image"]),
        "held_pixels": torch.from_numpy(prep.batch_pixels(list(held["image"]))),
        "held_y": label_ids(held, labels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=EXAMPLE)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--window", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each training side, interleaved")
    parser.add_argument("--workers", type=int, default=0, help="the plain loop's DataLoader workers")
    parser.add_argument("--rounds", type=int, default=5, help="inference rounds per engine, interleaved")
    parser.add_argument("--efficientnet", action="store_true", help="also time EfficientNet-Lite0 inference")
    parser.add_argument("--efficientnet-steps", type=int, default=60, help="its fine-tuning steps first")
    parser.add_argument("--results", type=Path, default=Path("bench/results.json"))
    args = parser.parse_args()
    if args.steps // args.window < 3:
        parser.error("--steps must be at least 3 windows: one warm-up and two timed")
    threads = threads_from_env()
    pin_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = digits(args.params, Path(tmp))
    out: dict[str, Any] = {"threads": threads, "device": "cpu"}
    out["training"], model = bench_training(args.steps, args.window, args.repeats, args.workers, data)
    print(f"training: {out['training']['speedup_same_precision']:.2f}x the plain loop", flush=True)
    out["inference"] = {
        "cnn": bench_inference("the trained CNN", model, data["prep"], data, threads, args.rounds)
    }
    if args.efficientnet:
        model, prep = imagenet_digits(data, args.efficientnet_steps)
        out["inference"]["efficientnet_lite0"] = bench_inference(
            f"EfficientNet-Lite0 from ImageNet, {prep.size} px, fine-tuned {args.efficientnet_steps} steps",
            model,
            prep,
            data,
            threads,
            args.rounds,
        )
    print(json.dumps(out["inference"]["cnn"]["speedup_vs_pytorch"], indent=1), flush=True)
    record("image-cpu", out, args.results)
    print(machine())


if __name__ == "__main__":
    main()
