"""One CPU training step at the book's demo width: the library's step against a plain fp32 one.

Times, in one process and interleaved (chunk by chunk, in rotating order, so that the load of
other jobs on a shared machine falls on every mode alike), three ways of running one optimizer
step of a variant at width 1/16 on a batch of 23 segments of 59,049 samples with Nesterov SGD:

* ``plain-fp32``: the reference, the unmodified computation with PyTorch's defaults: the model's
  ``(B, C, T)`` path (``SampleCNN.channels_last_on_cpu = False``), ``loss.backward()`` and
  ``optimizer.step()``, float32;
* ``ours-fp32``: :func:`resemul_core.training.loop.train_step` at precision ``fp32``, as
  ``resemul train`` runs it on the CPU (channels-last feature maps);
* ``ours-bf16``: the same at precision ``bf16`` (the ``demo`` profile's setting).

Each mode runs ``--warmup`` steps first, then ``--rounds`` chunks of ``--chunk`` steps; the
figure is the median over chunks of the mean ms/step, and the ratio is plain-fp32's median over
the mode's. Usage::

    .venv/bin/python bench/cpu_step.py                      # basic, se-multi
    .venv/bin/python bench/cpu_step.py --quick --variants basic,se,res2,rese2
    .venv/bin/python bench/cpu_step.py --json bench/out/cpu_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from resemul_core.model.sample_cnn import SampleCNN, build_model
from resemul_core.training.loop import train_step

MODES = ("plain-fp32", "ours-fp32", "ours-bf16")
BATCH, TAGS, WIDTH = 23, 20, 1 / 16


def _model(name: str, *, reference: bool) -> tuple[SampleCNN, torch.optim.Optimizer]:
    """A variant at demo width and its Nesterov SGD, the same weights for every mode."""
    torch.manual_seed(0)
    model = build_model(name, num_tags=TAGS, width=WIDTH)
    model.channels_last_on_cpu = not reference
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    return model, optimizer


def make_steps(
    name: str, waveform: torch.Tensor, labels: torch.Tensor
) -> dict[str, Callable[[], None]]:
    """One closure per mode, each running one optimizer step on its own copy of the model.

    Args:
        name: the variant.
        waveform: ``(B, L)`` float32.
        labels: ``(B, T)`` 0/1 float32.
    """
    plain, plain_opt = _model(name, reference=True)

    def plain_step() -> None:
        loss = F.binary_cross_entropy_with_logits(plain(waveform), labels)
        plain_opt.zero_grad()
        loss.backward()
        plain_opt.step()

    steps: dict[str, Callable[[], None]] = {"plain-fp32": plain_step}
    for precision in ("fp32", "bf16"):
        model, optimizer = _model(name, reference=False)

        def ours(model: SampleCNN = model, opt: torch.optim.Optimizer = optimizer,
                 precision: str = precision) -> None:  # fmt: skip
            train_step(model, opt, waveform, labels, lr=0.01, precision=precision)

        steps[f"ours-{precision}"] = ours
    return steps


def time_variant(name: str, *, warmup: int, rounds: int, chunk: int) -> dict[str, list[float]]:
    """ms/step of every mode per chunk, measured interleaved; ``{mode: [ms, ...]}``."""
    generator = torch.Generator().manual_seed(1)
    waveform = torch.rand(BATCH, 3**10, generator=generator) * 2 - 1  # B, L
    labels = (torch.rand(BATCH, TAGS, generator=generator) < 0.1).float()  # B, T
    steps = make_steps(name, waveform, labels)
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    order = list(steps)
    for r in range(rounds):
        for mode in order[r % len(order) :] + order[: r % len(order)]:  # rotate who goes first
            started = time.perf_counter()
            for _ in range(chunk):
                steps[mode]()
            times[mode].append((time.perf_counter() - started) / chunk * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="basic,se-multi")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="2 warm-up steps, 5 chunks of 2")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="write the per-chunk times here")
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.rounds, args.chunk = 2, 5, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}, "
        f"batch {BATCH}, width 1/16, {args.warmup} warm-up steps, {args.rounds} chunks of "
        f"{args.chunk} steps per mode, interleaved"
    )
    print(
        "| variant | " + " | ".join(f"{m} ms/step" for m in MODES) + " | ratio fp32 | ratio bf16 |"
    )
    print("|---" * (len(MODES) + 3) + "|")
    results = {}
    for name in args.variants.replace(",", " ").split():
        times = time_variant(name, warmup=args.warmup, rounds=args.rounds, chunk=args.chunk)
        med = {mode: statistics.median(ts) for mode, ts in times.items()}
        base = med["plain-fp32"]
        cells = " | ".join(f"{med[m]:.1f}" for m in MODES)
        print(
            f"| {name} | {cells} | {base / med['ours-fp32']:.2f} | {base / med['ours-bf16']:.2f} |",
            flush=True,
        )
        results[name] = {"chunks_ms": times, "median_ms": med}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "args": vars(args), "results": results}, f)


if __name__ == "__main__":
    main()
