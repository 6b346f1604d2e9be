"""Training throughput on the CPU as ``make book`` uses it: two runs at a time, one thread each.

``make book`` trains ``JOBS`` runs at once (2 by default), each with ``THREADS`` = cores / JOBS
torch threads. This benchmark measures what that buys on this machine, against a plain fp32
loop given every core, in the same invocation and interleaved round by round:

* ``plain, alone``: the unmodified ``(B, C, T)`` computation in fp32 with PyTorch's defaults
  (:mod:`bench.cpu_step`'s reference), one process with all cores' threads;
* ``ours, alone``: :func:`resemul_core.training.loop.train_step` as ``resemul train`` runs it
  on the CPU (channels-last maps, the profile's precision), one process with all threads;
* ``ours, N jobs``: N such processes at once with cores / N threads each, as ``make book`` runs
  them; the effective time per step is the mean of their ms/step divided by N;
* ``plain, N jobs``: the plain loop given the same trick, so that the gain of running jobs side
  by side is not credited to the library.

Every figure is the median over ``--rounds`` rounds. Usage::

    .venv/bin/python bench/cpu_jobs.py --variants basic,se-multi
    .venv/bin/python bench/cpu_jobs.py worker --variant basic --mode ours --threads 1 --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(variant: str, mode: str, threads: int, steps: int, precision: str) -> dict:
    """Time ``steps`` training steps after 3 warm-up steps in this process; ms per step."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, HERE)
    from cpu_step import make_steps  # the same reference and library steps as cpu_step.py

    generator = torch.Generator().manual_seed(1)
    waveform = torch.rand(23, 3**10, generator=generator) * 2 - 1  # B, L
    labels = (torch.rand(23, 20, generator=generator) < 0.1).float()  # B, T
    step = make_steps(variant, waveform, labels)[
        "plain-fp32" if mode == "plain" else f"ours-{precision}"
    ]
    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return {"ms_per_step": (time.perf_counter() - started) / steps * 1e3}


def _run(jobs: int, threads: int, args: argparse.Namespace, variant: str, mode: str) -> float:
    """Effective ms per step of ``jobs`` worker processes running at once."""
    command = [sys.executable, os.path.abspath(__file__), "worker", "--variant", variant]
    command += ["--mode", mode, "--threads", str(threads), "--steps", str(args.steps)]
    command += ["--precision", args.precision]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    times = []
    for process in processes:
        out, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"worker failed: {' '.join(command)}")
        times.append(json.loads(out.strip().splitlines()[-1])["ms_per_step"])
    return statistics.mean(times) / jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker")
    w.add_argument("--variant", required=True)
    w.add_argument("--mode", choices=["plain", "ours"], required=True)
    w.add_argument("--threads", type=int, required=True)
    w.add_argument("--steps", type=int, default=12)
    w.add_argument("--precision", default="bf16")
    parser.add_argument("--variants", default="basic,se-multi")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--precision", default="bf16", help="ours' precision (the demo's: bf16)")
    args = parser.parse_args()
    if args.command == "worker":
        print(json.dumps(worker(args.variant, args.mode, args.threads, args.steps, args.precision)))
        return
    cores = os.cpu_count() or 1
    threads = max(1, cores // args.jobs)
    configs = [
        ("plain, alone", 1, cores, "plain"),
        ("ours, alone", 1, cores, "ours"),
        (f"ours, {args.jobs} jobs", args.jobs, threads, "ours"),
        (f"plain, {args.jobs} jobs", args.jobs, threads, "plain"),
    ]
    print(
        f"{cores} cores; {args.jobs} jobs x {threads} threads; {args.steps} timed steps per "
        f"process; median of {args.rounds} rounds; ours in {args.precision}; width 1/16, batch 23"
    )
    head = " | ".join(f"{name} ms/step" for name, *_ in configs)
    print(f"| variant | {head} | plain alone / ours {args.jobs} jobs | plain {args.jobs} jobs / "
          f"ours {args.jobs} jobs |")  # fmt: skip
    print("|---" * (len(configs) + 3) + "|")
    for variant in args.variants.split(","):
        results: dict[str, list[float]] = {name: [] for name, *_ in configs}
        for r in range(args.rounds):
            for name, jobs, t, mode in configs[r % 4 :] + configs[: r % 4]:
                results[name].append(_run(jobs, t, args, variant, mode))
        med = {name: statistics.median(v) for name, v in results.items()}
        ours_jobs, plain_jobs = med[f"ours, {args.jobs} jobs"], med[f"plain, {args.jobs} jobs"]
        cells = " | ".join(f"{med[name]:.1f}" for name, *_ in configs)
        print(
            f"| {variant} | {cells} | {med['plain, alone'] / ours_jobs:.2f} | "
            f"{plain_jobs / ours_jobs:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
