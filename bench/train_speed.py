"""Training speed per variant: segments per second of forward + backward + SGD step.

Times the training step of :mod:`resemul_core.train` (loss, Nesterov SGD) on random
waveforms, one batch of 23 segments of 59,049 samples per step at the paper's settings, in
fp32 and under bf16 autocast, for each requested variant. Data loading is not included.

Usage::

    .venv/bin/python bench/train_speed.py                       # all 12 variants, paper width
    .venv/bin/python bench/train_speed.py --variants basic,rese2-multi --steps 5
    .venv/bin/python bench/train_speed.py --width 0.125 --precision fp32 --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from resemul_core.model import VARIANTS, build_model, count_parameters
from resemul_core.train import TrainConfig, bce_loss, build_optimizer, select_device


def time_steps(
    variant: str,
    *,
    width: float,
    batch_size: int,
    steps: int,
    warmup: int,
    precision: str,
    device: torch.device,
    num_tags: int = 50,
) -> dict:
    """Seconds per training step of one variant, after ``warmup`` untimed steps."""
    torch.manual_seed(0)
    model = build_model(variant, num_tags=num_tags, width=width).to(device).train()
    optimizer = build_optimizer(model, TrainConfig(), stage=0)
    length = model.config.segment_length
    waveform = (torch.rand(batch_size, length, device=device) * 2 - 1) * 0.3  # B, L
    labels = (torch.rand(batch_size, num_tags, device=device) < 0.1).float()  # B, T
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            logits = model(waveform)
        loss = bce_loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    return {
        "variant": variant,
        "precision": precision,
        "params": count_parameters(model),
        "s_per_step": seconds,
        "segments_per_s": batch_size / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0)")
    parser.add_argument("--batch-size", type=int, default=23, help="segments per step (23)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant (2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (1)")
    parser.add_argument("--precision", default="fp32,bf16", help="fp32 and/or bf16 (both)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"device {device} ({where or platform.machine()}), {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, width {args.width}, batch {args.batch_size}, "
        f"{args.steps} timed steps after {args.warmup} warm-up"
    )
    print(f"{'variant':<13} {'precision':<9} {'params':>12} {'s/step':>8} {'segments/s':>11}")
    rows = []
    for variant in variants:
        for precision in precisions:
            row = time_steps(
                variant,
                width=args.width,
                batch_size=args.batch_size,
                steps=args.steps,
                warmup=args.warmup,
                precision=precision,
                device=device,
            )
            rows.append(row)
            print(
                f"{variant:<13} {precision:<9} {row['params']:>12,} {row['s_per_step']:>8.3f} "
                f"{row['segments_per_s']:>11.1f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": str(device), "width": args.width, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
