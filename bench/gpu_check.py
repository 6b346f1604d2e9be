"""One command that proves the GPU path: nine checks, each PASS, FAIL or SKIP, then the figures.

Usage (from the repository root; ``resemul_core`` is imported from this checkout)::

    PYTHONPATH=. python3 bench/gpu_check.py --device cuda     # <= 8 minutes on one H100/H200
    .venv/bin/python bench/gpu_check.py --device cpu          # reduced mode, ~3 minutes on 2 cores

The checks (``--checks`` picks some; on a GPU they run in the order 1-5, 8, 9, 7, 6, so that the
compilations of check 6, started first in parallel worker processes, have the longest time):

1. the training, resume and SIGKILL tests (``tests/test_train.py``,
   ``tests/test_distributed.py``) with ``RESEMUL_TEST_DEVICE`` set to the device;
2. a run resumed across devices (device -> CPU -> device), and a ``last.pt`` carrying the
   per-GPU CUDA RNG states of older versions resuming to the same weights;
3. no host synchronisation in 10 steady-state training steps (loader and resident data,
   bf16 and fp32), under ``torch.cuda.set_sync_debug_mode("error")`` (CUDA only);
4. fp32 against bf16 on the same short se-multi run (``bench/precision.py``);
5. a ``compile=True`` run over epoch and stage boundaries: graphs compiled once, plain
   checkpoint keys;
6. training throughput of every variant, eager and compiled, against a baseline in its own
   process, and the estimated time of the full recipe (``bench/throughput.py``);
7. the book's notebooks through papermill for two variants, evaluation and excitations;
8. tagging and excitation extraction on the device against the CPU;
9. ``torchrun`` data-parallel training on 2 GPUs with and without synchronised BatchNorm
   against one GPU (on the CPU: 2 gloo processes at tiny size).

On the CPU every size is reduced (width 1/16, a few steps, 243-sample segments where the paper's
are not needed), torch runs one thread per process (``--threads``) and the CUDA-only checks are
skipped: the same code runs, so it cannot rot.

It needs only the standard library, torch, numpy, pandas, scipy, scikit-learn, matplotlib and
what the library imports (soundfile, soxr; papermill and ipykernel for check 7); a missing
package fails the checks that need it with one sentence. A time budget (``--budget``) skips
the checks that would start after it; a check running at that moment finishes.

Writes ``OUT/<date>-<gpu>.json`` (everything, with the machine) and ``.md`` (the tables);
exits with 1 if any check failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from gpu_common import (
    ALL_VARIANTS,
    CPU_SIZES,
    GPU_SIZES,
    REPO,
    CheckFailed,
    CheckSkipped,
    Context,
    describe,
)


@dataclass(frozen=True)
class Check:
    number: int
    name: str
    module: str  # a module of bench/
    function: str  # (ctx) -> (reason, details); raises CheckFailed / CheckSkipped
    cuda_only: bool = False


CHECKS = (
    Check(1, "training tests on the device", "checks_train", "test_suite"),
    Check(2, "resume across devices", "checks_train", "resume_across_devices"),
    Check(3, "no host syncs in steady state", "checks_train", "host_syncs", cuda_only=True),
    Check(4, "fp32 vs bf16", "checks_train", "precision"),
    Check(5, "compiled training", "checks_train", "compiled_run"),
    Check(6, "throughput", "throughput", "check"),
    Check(7, "book notebooks", "checks_apps", "book"),
    Check(8, "tagging and excitations", "checks_apps", "inference"),
    Check(9, "data-parallel training", "checks_train", "ddp"),
)
#: The order the checks run in. On a GPU, check 6's workers start compiling before check 1 and
#: it runs last, so that they get the most time. On the CPU they start when check 6 does, after
#: check 5 has compiled the same graph into inductor's cache, and the book (slowest) is last.
RUN_ORDER = {"cuda": (1, 2, 3, 4, 5, 8, 9, 7, 6), "cpu": (1, 2, 3, 4, 5, 6, 8, 9, 7)}


@dataclass
class Outcome:
    number: int
    name: str
    status: str  # PASS, FAIL or SKIP
    seconds: float
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


def run_check(check: Check, ctx: Context) -> Outcome:
    """Run one check, catching everything: a check never ends the script."""
    started = time.monotonic()

    def done(status: str, reason: str, details: dict | None = None) -> Outcome:
        outcome = Outcome(
            check.number, check.name, status, time.monotonic() - started, reason, details or {}
        )
        print(
            f"{outcome.number:>2} {status:<4} {outcome.seconds:6.1f}s  {check.name}: {reason}",
            flush=True,
        )
        return outcome

    if check.cuda_only and not ctx.cuda:
        return done("SKIP", "needs CUDA")
    if check.number == 9 and ctx.cuda and ctx.gpus < 2:
        return done("SKIP", f"needs 2 GPUs ({ctx.gpus} visible)")
    if ctx.remaining() <= 0:
        return done("SKIP", "time budget")
    try:
        function: Callable = getattr(importlib.import_module(check.module), check.function)
        reason, details = function(ctx)
    except CheckFailed as err:
        return done("FAIL", err.reason, err.details)
    except CheckSkipped as err:
        return done("SKIP", str(err))
    except Exception as err:  # any other error is the check's failure, with its traceback
        return done("FAIL", describe(err), {"traceback": traceback.format_exc()[-6000:]})
    return done("PASS", reason, details)


def machine_info(device: torch.device) -> dict[str, Any]:
    """GPU name and count, driver, torch/CUDA/cuDNN versions, CPUs, Python, git commit."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
        )
        info["driver"] = _command_output(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        )
    info["git_commit"] = _command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    return info


def _command_output(command: list[str]) -> str | None:
    """The first line a cheap command prints, or None if it cannot run."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def device_slug(info: dict[str, Any]) -> str:
    """``nvidia-h200`` (``2x-nvidia-h200`` for two), or ``cpu``: the name of the result files."""
    if "gpu" not in info:
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower()).strip("-")
    return f"{info['gpu_count']}x-{slug}" if info["gpu_count"] > 1 else slug


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the command, the machine, one row per check, the tables."""
    m = report["machine"]
    where = f"{m['gpu']} x {m['gpu_count']}, driver {m.get('driver')}" if "gpu" in m else "CPU"
    lines = [
        f"# GPU check, {report['date']}, {where}",
        "",
        f"`{report['command']}`",
        "",
        f"{report['mode']} mode on `{report['device']}`; torch {m['torch']} (CUDA {m['cuda']}, "
        f"cuDNN {m['cudnn']}), Python {m['python']}, {m['cpu_count']} CPUs, commit "
        f"{m.get('git_commit')}; {report['total_s']:.0f} s of a {report['budget_s']:.0f} s budget.",
        "",
        "| # | check | result | seconds | figures |",
        "|---:|---|---|---:|---|",
    ]
    for c in report["checks"]:
        reason = c["reason"].replace("|", "/")
        lines.append(
            f"| {c['number']} | {c['name']} | {c['status']} | {c['seconds']:.1f} | {reason} |"
        )
    for table in report["tables"].values():
        lines += ["", table["markdown"].rstrip()]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    parser.add_argument("--budget", type=float, help="seconds (default 480 on CUDA, 300 on CPU)")
    parser.add_argument("--checks", help="comma-separated check numbers (default: all)")
    parser.add_argument("--variants", help="check 6's variants, comma-separated, or all")
    parser.add_argument("--out", type=Path, help="default bench/gpu (CUDA), bench/out/gpu-check")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads per process (default: 1 on the CPU)"
    )
    args = parser.parse_args(argv)
    numbers = {c.number for c in CHECKS}
    args.checks = [int(n) for n in args.checks.split(",")] if args.checks else sorted(numbers)
    if set(args.checks) - numbers:
        parser.error(f"unknown check numbers {sorted(set(args.checks) - numbers)}")
    return args


def _use_checkout_first() -> None:
    """Import ``resemul_core`` from this checkout, here and in every child process (pytest,
    torchrun, notebook kernels, workers), whatever their working directory: ``PYTHONPATH``
    entries become absolute, with the checkout first."""
    entries = [str(REPO)] + [
        str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(entries))
    sys.path.insert(1, str(REPO))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _use_checkout_first()
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    threads = args.threads or (1 if sizes.reduced else None)
    if threads:
        # On a small shared CPU, two threads per process spin against each other and every
        # other job (check 2 took 23 s with 2 threads and 4 s with 1 at load 5 on 2 cores);
        # children (pytest, torchrun, notebook kernels, workers) inherit the setting.
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    budget = args.budget if args.budget is not None else sizes.budget_s
    variants = sizes.speed_variants
    if args.variants:
        variants = ALL_VARIANTS if args.variants == "all" else tuple(args.variants.split(","))
    started = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="resemul_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        device=device,
        sizes=sizes,
        work=work,
        deadline=started + budget,
        gpus=torch.cuda.device_count() if device.type == "cuda" else 0,
        variants=variants,
    )
    info = machine_info(device)
    mode = "reduced (CPU)" if sizes.reduced else "full"
    print(
        f"# gpu_check on {info.get('gpu', 'CPU')} ({device}), {mode} mode, torch "
        f"{info['torch']}, {torch.get_num_threads()} torch threads, budget {budget:.0f} s, "
        f"scratch {work}",
        flush=True,
    )
    outcomes: dict[int, Outcome] = {}
    try:
        if 6 in args.checks and device.type == "cuda":
            try:  # compile every variant in parallel while the other checks run
                importlib.import_module("throughput").start(ctx)
            except Exception as err:
                ctx.speed = err  # check 6 reports it
        for number in RUN_ORDER[device.type]:
            if number in args.checks:
                check = next(c for c in CHECKS if c.number == number)
                outcomes[number] = run_check(check, ctx)
    finally:
        if ctx.speed is not None and not isinstance(ctx.speed, Exception):
            ctx.speed.stop()
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - started
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "device": str(device),
        "mode": mode,
        "budget_s": budget,
        "total_s": round(total, 1),
        "torch_threads": torch.get_num_threads(),
        "machine": info,
        "sizes": dataclasses.asdict(sizes) | {"speed_variants": list(variants)},
        "checks": [dataclasses.asdict(outcomes[n]) for n in sorted(outcomes)],
        "tables": ctx.tables,
    }
    out = args.out or REPO / ("bench/gpu" if device.type == "cuda" else "bench/out/gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{report['date']}-{device_slug(info)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    for table in ctx.tables.values():
        print("\n" + table["markdown"].rstrip(), flush=True)
    counts = {s: sum(o.status == s for o in outcomes.values()) for s in ("PASS", "FAIL", "SKIP")}
    print(
        f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
        f"{total:.0f} s; wrote {stem}.json and .md",
        flush=True,
    )
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
