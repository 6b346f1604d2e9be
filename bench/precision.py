"""fp32 against bf16 on the same short run: what the fast precision costs in loss and ROC-AUC.

:func:`compare_precisions` trains one variant twice from the same seed on the same data and
batch order, once per precision, with the library's training step (``train_step`` fed by
``device_batches`` from a ``ResidentSplit``, the backends set by ``configure_backends``,
Keras-style learning-rate decay from 0.01, no stage change), then reports for each: every
step's training loss, the validation loss (``validation_loss`` at the run's precision, as
``train`` computes it) and the clip-level test ROC-AUC and PR-AUC (``predict_clips`` in fp32
and ``tag_metrics``, as ``resemul evaluate`` scores a model).

Two runs that differ only in rounding still drift apart step by step, so a third run, fp32
from another seed, measures how far an unrelated run of the same recipe lands: the comparison
passes when the fp32 and bf16 validation losses differ by at most ``tolerance`` or by no more
than twice what the other seed's fp32 run differs from the first (whichever is larger). Twice,
because that yardstick is itself one noisy difference: on the CPU at width 1/8, 400 steps, the
fp32 seed-to-seed differences were 0.11, 0.09 and 0.06 while bf16 differed from fp32 by 0.04,
0.02 and 0.06 (``bench/RESULTS.md``). BatchNorm momentum
is 0.1 (:data:`BN_MOMENTUM`), as in the short profiles.

The data is a learnable store made by :func:`make_tone_store`: clips of tones, noises, clicks
and tremolo, ten tags that are each audible in any segment (``write_store_from_arrays``).

Standalone (writes ``OUT/precision.json`` and ``OUT/precision.md``)::

    .venv/bin/python bench/precision.py --device cpu --width 1.0 --steps 200 --variant se-multi \\
        --out bench/out/precision
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resemul_core.analysis.evaluate import predict_clips, tag_metrics
from resemul_core.config import TrainConfig, num_blocks_for
from resemul_core.data.datasets import SegmentBatches, SegmentDataset
from resemul_core.data.store import SegmentStore, write_store_from_arrays
from resemul_core.model.sample_cnn import build_model
from resemul_core.runtime import configure_backends, select_device
from resemul_core.training.feeding import ResidentSplit, device_batches
from resemul_core.training.loop import train_step, validation_loss
from resemul_core.training.schedule import build_optimizer, decayed_learning_rate, epoch_batches

#: Tags of the tone store, in label order.
TONE_TAGS = (
    "tone 220 Hz",
    "tone 440 Hz",
    "tone 880 Hz",
    "tone 1760 Hz",
    "tone 3520 Hz",
    "white noise",
    "rumble",
    "clicks",
    "tremolo",
    "loud",
)
SAMPLE_RATE = 22_050
#: Validation-loss difference allowed between fp32 and bf16 (absolute, in BCE units), or the
#: difference another seed makes in fp32 if that is larger.
DEFAULT_TOLERANCE = 0.02
#: ... or this multiple of the validation-loss difference between two fp32 seeds, if larger.
SEED_FACTOR = 2
#: BatchNorm momentum of the runs: the demo and tiny profiles' 0.1. With the paper's 0.01 the
#: inference statistics trail a 200-step run's weights by ~100 steps, and the validation loss
#: measures that lag (0.64-0.68 against training losses of 0.30-0.39 in one CPU run).
BN_MOMENTUM = 0.1


def tone_clip(labels: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` samples in [-1, 1] where each of :data:`TONE_TAGS` is audible iff its label is 1."""
    t = np.arange(n) / SAMPLE_RATE
    x = 0.01 * rng.standard_normal(n)
    for k, freq in enumerate((220, 440, 880, 1760, 3520)):
        if labels[k]:
            x += rng.uniform(0.1, 0.25) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    if labels[5]:
        x += rng.uniform(0.05, 0.15) * rng.standard_normal(n)
    if labels[6]:  # noise below 150 Hz
        spectrum = np.fft.rfft(rng.standard_normal(n))
        spectrum[np.fft.rfftfreq(n, 1 / SAMPLE_RATE) > 150] = 0
        rumble = np.fft.irfft(spectrum, n)
        x += rng.uniform(0.1, 0.2) * rumble / (rumble.std() + 1e-12)
    if labels[7]:  # decaying 5 ms bursts, 3-5 per second
        period = int(SAMPLE_RATE / rng.uniform(3, 5))
        burst = rng.standard_normal(110) * np.exp(-np.arange(110) / 25)
        for start in range(int(rng.integers(0, period)), n - 110, period):
            x[start : start + 110] += 0.5 * burst
    if labels[8]:
        x *= 1 + 0.8 * np.sin(2 * np.pi * 6 * t)
    x *= 3.0 if labels[9] else 1.0
    return np.clip(x, -1, 1).astype(np.float32)


def make_tone_store(
    path: Path,
    *,
    clips: Sequence[int] = (64, 16, 16),
    segments_per_clip: int = 10,
    segment_length: int = 59_049,
    seed: int = 0,
) -> SegmentStore:
    """A store of ``clips`` (train, valid, test) tone clips; every tag on with chance 0.3, and
    in each split of at least 10 clips on in one clip and off in another."""
    rng = np.random.default_rng(seed)
    total, tags = sum(clips), len(TONE_TAGS)
    labels = (rng.random((total, tags)) < 0.3).astype(np.uint8)
    for start, count in zip(np.cumsum([0, *clips[:-1]]), clips, strict=True):
        for k in range(min(count, tags)):  # every tag on and off in a split of >= 10 clips,
            labels[start + k, k] = 1  # so that its ROC-AUC is defined
            labels[start + (k + 1) % count, k] = 0 if count > 1 else labels[start, k]
    n = segments_per_clip * segment_length
    waveforms = [
        tone_clip(labels[i], np.random.default_rng([seed, i]), n).reshape(
            segments_per_clip, segment_length
        )
        for i in range(total)
    ]
    splits = ["train"] * clips[0] + ["valid"] * clips[1] + ["test"] * clips[2]
    return write_store_from_arrays(
        path, waveforms=waveforms, labels=labels, splits=splits, tags=TONE_TAGS, dataset="tones"
    )


def train_short(
    store: SegmentStore,
    *,
    precision: str,
    variant: str,
    width: float,
    steps: int,
    device: torch.device,
    batch_size: int = 23,
    seed: int = 0,
    bn_momentum: float = BN_MOMENTUM,
) -> dict[str, Any]:
    """``steps`` training steps at ``precision``, then validation and test scores."""
    configure_backends(device, precision)  # sets TF32 off for fp32, on for bf16
    torch.manual_seed(seed)  # same weights and dropout masks for every precision
    blocks = num_blocks_for(store.segment_length)
    model = build_model(
        variant,
        num_tags=store.num_tags,
        width=width,
        num_blocks=blocks,
        bn_momentum=bn_momentum,
    )
    model = model.to(device).train()
    config = TrainConfig()
    optimizer = build_optimizer(model, config, stage=0)
    batches = SegmentBatches(store, "train")
    resident = ResidentSplit(batches, device)
    per_epoch = math.ceil(len(batches) / batch_size)
    losses: list[torch.Tensor] = []
    started = time.perf_counter()
    epoch = 0
    while len(losses) < steps:
        rows = epoch_batches(
            len(batches),
            batch_size=batch_size,
            num_steps=min(per_epoch, steps - len(losses)),
            seed=seed,
            epoch=epoch,
        )
        for waveform, labels in device_batches(batches, rows, device=device, resident=resident):
            lr = decayed_learning_rate(config.learning_rate, len(losses), decay=config.lr_decay)
            losses.append(
                train_step(model, optimizer, waveform, labels, lr=lr, precision=precision)
            )
        epoch += 1
    train_losses = torch.stack(losses).cpu().tolist()  # the only read-back of the run
    seconds = time.perf_counter() - started
    val_loss = validation_loss(
        model, SegmentDataset(store, "valid"), device=device, precision=precision
    )
    scores, labels, _ = predict_clips(model, store, device=device, precision="fp32", progress=False)
    metrics = tag_metrics(labels, scores, store.tags)
    return {
        "precision": precision,
        "seed": seed,
        "train_losses": [round(x, 6) for x in train_losses],
        "final_train_loss": float(np.mean(train_losses[-10:])),
        "val_loss": val_loss,
        "test_roc_auc": metrics.roc_auc,
        "test_pr_auc": metrics.pr_auc,
        "train_seconds": seconds,
    }


def compare_precisions(
    store: SegmentStore,
    *,
    device: torch.device,
    width: float,
    steps: int,
    variant: str = "se-multi",
    batch_size: int = 23,
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
    reference: bool = True,
    bn_momentum: float = BN_MOMENTUM,
) -> dict[str, Any]:
    """The same short run in fp32 and in bf16, their differences, and (``reference``) the
    difference that another seed makes in fp32 (see the module docstring)."""
    kwargs = {
        "variant": variant,
        "width": width,
        "steps": steps,
        "device": device,
        "batch_size": batch_size,
        "bn_momentum": bn_momentum,
    }
    runs = {p: train_short(store, precision=p, seed=seed, **kwargs) for p in ("fp32", "bf16")}
    if reference:
        runs["fp32, other seed"] = train_short(store, precision="fp32", seed=seed + 1, **kwargs)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    val_diff = abs(fp32["val_loss"] - bf16["val_loss"])
    seed_diff = abs(runs["fp32, other seed"]["val_loss"] - fp32["val_loss"]) if reference else 0
    step_diffs = np.abs(np.subtract(fp32["train_losses"], bf16["train_losses"]))
    return {
        **{k: v for k, v in kwargs.items() if k != "device"},
        "seed": seed,
        "device": str(device),
        "segment_length": store.segment_length,
        "train_segments": len(SegmentDataset(store, "train")),
        "runs": runs,
        "val_loss_diff": val_diff,
        "seed_val_loss_diff": seed_diff if reference else None,
        "max_step_loss_diff": float(step_diffs.max()),
        "roc_auc_diff": bf16["test_roc_auc"] - fp32["test_roc_auc"],
        "tolerance": tolerance,
        "passed": bool(val_diff <= max(tolerance, SEED_FACTOR * seed_diff)),
    }


def summary_line(result: dict[str, Any]) -> str:
    """One line: validation losses, their difference against the allowance, AUCs."""
    fp32, bf16 = result["runs"]["fp32"], result["runs"]["bf16"]
    verdict = "<=" if result["passed"] else ">"
    seed = result["seed_val_loss_diff"]
    allowed = (
        f"max({result['tolerance']}, {SEED_FACTOR} x seed diff {seed:.4f})"
        if seed is not None
        else ""
    )
    return (
        f"val loss fp32 {fp32['val_loss']:.4f}, bf16 {bf16['val_loss']:.4f}, abs diff "
        f"{result['val_loss_diff']:.4f} {verdict} {allowed or result['tolerance']}; max step "
        f"loss diff {result['max_step_loss_diff']:.4f}; test ROC-AUC fp32 "
        f"{fp32['test_roc_auc']:.4f}, bf16 {bf16['test_roc_auc']:.4f}"
    )


def markdown(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table and two sentences."""
    lines = [
        f"{result['variant']}, width {result['width']:g}, {result['steps']} steps of "
        f"{result['batch_size']} segments ({result['segment_length']} samples) on "
        f"{result['device']}, BN momentum {result['bn_momentum']:g}, "
        f"{result['train_segments']} training segments of the tone store",
        "",
        "| run | seed | final train loss | val loss | test ROC-AUC | test PR-AUC | train s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in result["runs"].items():
        lines.append(
            f"| {name} | {run['seed']} | {run['final_train_loss']:.4f} | {run['val_loss']:.4f} "
            f"| {run['test_roc_auc']:.4f} | {run['test_pr_auc']:.4f} "
            f"| {run['train_seconds']:.1f} |"
        )
    seed = result["seed_val_loss_diff"]
    allowed = f"the larger of {result['tolerance']} and {SEED_FACTOR} x the seed's difference"
    lines += [
        "",
        f"Validation loss, fp32 minus bf16, in absolute value: {result['val_loss_diff']:.4f}"
        + (f"; fp32 with another seed: {seed:.4f}" if seed is not None else "")
        + f" (allowed: {allowed if seed is not None else result['tolerance']}: "
        f"{'within' if result['passed'] else 'outside'}). Largest per-step training-loss "
        f"difference {result['max_step_loss_diff']:.4f}; ROC-AUC bf16 - fp32 = "
        f"{result['roc_auc_diff']:+.4f}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (200)")
    parser.add_argument("--variant", default="se-multi", help="model variant (se-multi)")
    parser.add_argument("--batch-size", type=int, default=23, help="segments per step (23)")
    parser.add_argument("--clips", default="64,16,16", help="train,valid,test clips")
    parser.add_argument("--segments", type=int, default=10, help="segments per clip (10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    parser.add_argument("--bn-momentum", type=float, default=BN_MOMENTUM)
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the fp32 run with another seed"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/precision"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    clips = tuple(int(c) for c in args.clips.split(","))
    with tempfile.TemporaryDirectory(prefix="resemul_precision_") as tmp:
        store = make_tone_store(Path(tmp) / "store", clips=clips, segments_per_clip=args.segments)
        result = compare_precisions(
            store,
            device=device,
            width=args.width,
            steps=args.steps,
            variant=args.variant,
            batch_size=args.batch_size,
            seed=args.seed,
            tolerance=args.tolerance,
            reference=not args.no_reference,
            bn_momentum=args.bn_momentum,
        )
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    result["machine"] = f"{platform.machine()}, torch {torch.__version__}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps(result, indent=2) + "\n")
    text = f"`{result['command']}`\n\n" + markdown(result)
    (args.out / "precision.md").write_text(text)
    print(text, end="")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
