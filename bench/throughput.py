"""Check 6 of ``bench/gpu_check.py``: training throughput of every variant, and the recipe's time.

:func:`start` launches one worker process per variant (``throughput.py worker``) before the other
checks run: they compile (``compile_model``: CUDA graphs on one GPU) and warm up in parallel,
each with its share of the CPU cores for inductor, and report READY. :func:`check` waits for
them (until the time budget leaves ``timing_reserve_s``), then lets them time one after
another, alone on the device: compiled+resident, eager+resident and eager+loader, at bf16.
Then the baseline of every variant runs in one fresh process (fp32, eager, ``.npy`` per clip,
``loss.item()`` per step, PyTorch's default backend settings). Figures are segments/s, the
median of timed chunks after warm-up, the device synchronised before each clock read.

The full recipe of one variant (se-multi) on MTAT-sized data is estimated from its compiled
training rate and its measured validation rate (one ``validation_loss`` call over an MTAT
epoch's 15,290 segments, the DataLoader's start and loading included):
152,513 training and 15,290 validation segments per epoch, for 15 and 50 epochs (five stages
of 3 to 10 epochs). Goals on one H100/H200, reported, not required: se-multi >= 15,000
segments/s and >= 5x the baseline; the recipe <= 15 minutes.

The check fails when any variant's mode or baseline fails (a compile error, a worker that
died, a compile not finished within the budget), never silently.

A worker (``python bench/throughput.py worker --variant V --store S ...``) compiles and warms
up, prints ``READY {json}``, waits for a line ``GO`` on stdin, times its modes and prints
``RESULT {json}``; any other output goes to stderr (its log under the scratch folder).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from gpu_common import REPO, CheckFailed, Context, describe
from train_speed import (
    MODES,
    OursRun,
    add_timing_args,
    child_env,
    compile_stats,
    first_line,
    run_baseline_process,
    time_ours,
    time_validation,
)

MTAT_TRAIN_SEGMENTS = 152_513
MTAT_VALID_SEGMENTS = 15_290
RECIPE_EPOCHS = (15, 50)
GOAL_SEGMENTS_PER_S = 15_000
GOAL_RATIO = 5.0
GOAL_RECIPE_MIN = 15.0
RESULT_TIMEOUT_S = 180.0  # one worker's timing, after GO
BASELINE_WARMUP = 3
THIS = Path(__file__).resolve()


class Worker:
    """A ``train_speed.py worker`` process and the lines it prints, read by a thread."""

    def __init__(self, variant: str, command: list[str], env: dict[str, str], log: Path) -> None:
        self.variant = variant
        self.log = log
        self._stderr: IO[str] = log.open("w")
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
            cwd=REPO,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)  # end of output

    def expect(self, tag: str, timeout: float) -> dict[str, Any] | None:
        """The JSON after the next line ``TAG {...}``; None on timeout or end of output."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                self._lines.put(None)
                return None
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1 :])
        return None

    def go(self) -> bool:
        """Tell the worker to time its modes; False if it is gone."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("GO\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        return True

    def why_not(self, what: str) -> str:
        """Why no ``what`` line came: the worker's exit and last error line, or the clock."""
        code = self.proc.poll()
        if code is None:
            return f"no {what} in time (see --budget)"
        self._stderr.flush()
        lines = [s for s in self.log.read_text(errors="replace").splitlines() if s.strip()]
        return f"worker exited with {code}: {lines[-1] if lines else 'no output'}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._stderr.close()


@dataclass
class Speed:
    """Check 6's workers, started by :func:`start`; :meth:`stop` ends every one."""

    variants: tuple[str, ...]
    workers: dict[str, Worker]
    store_path: Path
    npy: Path

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()


def recipe_variant(variants: tuple[str, ...]) -> str:
    return "se-multi" if "se-multi" in variants else variants[0]


def start(ctx: Context) -> None:
    """Write the baseline's ``.npy`` clips and launch one compiling worker per variant."""
    from data_speed import write_npy_clips

    sizes, variants = ctx.sizes, ctx.variants
    store = ctx.store(sizes.speed_store)
    npy = write_npy_clips(store, ctx.work / "npy")
    threads = max(1, (os.cpu_count() or 1) // len(variants))  # the cores, shared out
    env = child_env() | {"TORCHINDUCTOR_COMPILE_THREADS": str(threads)}
    env.setdefault("OMP_NUM_THREADS", str(threads))
    logs = ctx.work / "speed"
    logs.mkdir(parents=True, exist_ok=True)
    workers = {}
    for variant in variants:
        command = [
            sys.executable,
            str(THIS),
            "worker",
            f"--variant={variant}",
            f"--store={store.path}",
            f"--modes={','.join(reversed(MODES))}",  # compiled first: it is ready at GO
            "--precision=bf16",
            f"--width={sizes.speed_width!r}",
            "--batch-size=23",
            f"--steps={sizes.speed_steps}",
            f"--warmup={sizes.speed_warmup}",
            f"--chunks={sizes.speed_chunks}",
            f"--compile-warmup={sizes.compile_warmup}",
            f"--device={ctx.device}",
            f"--workers={sizes.loader_workers}",
            f"--eval-segments={sizes.eval_segments}",
            *(["--eval-rate"] if variant == recipe_variant(variants) else []),
        ]
        workers[variant] = Worker(variant, command, env, logs / f"{variant}.log")
    ctx.speed = Speed(tuple(variants), workers, store.path, npy)


def check(ctx: Context) -> tuple[str, dict]:
    """Wait for the compilations, time every variant alone, then the baseline process."""
    if ctx.speed is None:
        start(ctx)
    speed = ctx.speed
    if isinstance(speed, Exception):
        raise CheckFailed(f"could not start the workers: {describe(speed)}")
    sizes = ctx.sizes
    wait_until = max(time.monotonic() + 1.0, ctx.deadline - sizes.timing_reserve_s)
    ready: dict[str, dict[str, Any]] = {}
    for variant, worker in speed.workers.items():
        info = worker.expect("READY", wait_until - time.monotonic())
        ready[variant] = info if info is not None else {"error": worker.why_not("READY")}
        if info is None:
            worker.stop()  # a straggler must not compile while the others are timed
    results: dict[str, dict[str, Any]] = {}
    for variant, worker in speed.workers.items():  # one at a time: alone on the device
        result, error = None, ready[variant].get("error", "")
        if worker.proc.poll() is None and worker.go():
            result = worker.expect("RESULT", min(RESULT_TIMEOUT_S, ctx.timeout(30)))
            error = worker.why_not("RESULT")
        worker.stop()
        results[variant] = result or {m: {"error": error} for m in MODES}
    baseline = run_baseline_process(
        speed.variants,
        store=speed.store_path,
        npy=speed.npy,
        width=sizes.speed_width,
        batch_size=23,
        steps=sizes.baseline_steps,
        warmup=BASELINE_WARMUP,
        device=ctx.device,
        num_workers=sizes.loader_workers,
        chunks=sizes.speed_chunks,
        timeout=ctx.timeout(120),
    )
    rows = [_row(v, results[v], baseline[v], ready[v]) for v in speed.variants]
    recipe = _recipe(recipe_variant(speed.variants), results)
    ctx.tables["throughput"] = {
        "data": {"rows": rows, "recipe": recipe},
        "markdown": _markdown(rows, recipe, ctx),
    }
    failures = [
        f"{r['variant']} {mode}: {f['error']}"
        for r in rows
        for mode, f in [*r["modes"].items(), ("baseline", r["baseline"])]
        if "error" in f
    ]
    reason = _summary(rows, recipe, ctx)
    details = {"rows": rows, "recipe": recipe, "failures": failures}
    if failures:
        raise CheckFailed(f"{len(failures)} failed: {failures[0]}; {reason}", details)
    return reason, details


def _row(variant: str, result: dict, baseline: dict, ready: dict) -> dict[str, Any]:
    modes = {m: result.get(m, {"error": "not measured"}) for m in MODES}
    compiled = modes["compiled+resident"]
    ratio = None
    if "error" not in compiled and "error" not in baseline:
        ratio = compiled["segments_per_s"] / baseline["segments_per_s"]
    params = next((f["params"] for f in [*modes.values(), baseline] if "params" in f), None)
    return {
        "variant": variant,
        "params": params,
        "modes": modes,
        "baseline": baseline,
        "ratio": ratio,
        "compile_s": ready.get("compile_s"),
    }


def _recipe(variant: str, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Minutes of the full recipe on MTAT-sized data from the measured rates."""
    result = results.get(variant, {})
    mode = next(
        (m for m in ("compiled+resident", "eager+resident") if "error" not in result.get(m, {})),
        None,
    )
    eval_rate = result.get("eval_segments_per_s")
    if mode is None or not eval_rate:
        return {"variant": variant, "error": result.get("eval_error", "no training rate")}
    rate = result[mode]["segments_per_s"]
    epoch_s = MTAT_TRAIN_SEGMENTS / rate + MTAT_VALID_SEGMENTS / eval_rate
    return {
        "variant": variant,
        "mode": mode,
        "train_segments_per_s": rate,
        "eval_segments_per_s": eval_rate,
        "epoch_s": epoch_s,
        "minutes": {str(e): e * epoch_s / 60 for e in RECIPE_EPOCHS},
    }


def _cell(figures: dict[str, Any]) -> str:
    return "failed" if "error" in figures else f"{figures['segments_per_s']:,.0f}"


def _goals(rows: list[dict], recipe: dict, ctx: Context) -> list[str]:
    """Each goal with the figure against it, met or missed; none in reduced mode."""
    if ctx.sizes.reduced:
        return ["goals: not applicable in reduced (CPU) mode"]
    row = next((r for r in rows if r["variant"] == "se-multi"), None)
    goals = []
    if row is not None and "error" not in row["modes"]["compiled+resident"]:
        rate = row["modes"]["compiled+resident"]["segments_per_s"]
        goals.append(
            f"se-multi compiled {rate:,.0f} segments/s (goal {GOAL_SEGMENTS_PER_S:,}: "
            f"{'met' if rate >= GOAL_SEGMENTS_PER_S else 'missed'})"
        )
    if row is not None and row["ratio"] is not None:
        met = "met" if row["ratio"] >= GOAL_RATIO else "missed"
        goals.append(f"{row['ratio']:.1f}x the baseline (goal {GOAL_RATIO:g}x: {met})")
    if "minutes" in recipe:
        low, high = (recipe["minutes"][str(e)] for e in RECIPE_EPOCHS)
        verdict = "met" if high <= GOAL_RECIPE_MIN else "met at 15 epochs only"
        verdict = verdict if low <= GOAL_RECIPE_MIN else "missed"
        goals.append(f"recipe {low:.1f}-{high:.1f} min (goal {GOAL_RECIPE_MIN:g} min: {verdict})")
    return goals


def _summary(rows: list[dict], recipe: dict, ctx: Context) -> str:
    compiled = sum("error" not in r["modes"]["compiled+resident"] for r in rows)
    text = f"{compiled}/{len(rows)} variants compiled and timed; " + "; ".join(
        _goals(rows, recipe, ctx)
    )
    if "minutes" in recipe and ctx.sizes.reduced:
        text += f"; recipe estimate {recipe['minutes']['15']:.0f}-{recipe['minutes']['50']:.0f} min"
    return text


def _markdown(rows: list[dict], recipe: dict, ctx: Context) -> str:
    sizes = ctx.sizes
    lines = [
        f"## Throughput (check 6): width {sizes.speed_width:g}, batch 23, ours bf16, "
        f"segments/s (median of {sizes.speed_chunks} chunks of {sizes.speed_steps} timed "
        f"steps after warm-up); baseline fp32 eager in its own process",
        "",
        "| variant | params | " + " | ".join(MODES) + " | baseline | compiled / baseline "
        "| compile s |",
        "|---|---:|" + "---:|" * (len(MODES) + 3),
    ]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.1f}"
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
        cells = [_cell(r["modes"][m]) for m in MODES] + [_cell(r["baseline"]), ratio, compile_s]
        lines.append(f"| {r['variant']} | {r['params'] or 0:,} | " + " | ".join(cells) + " |")
    lines.append("")
    if "minutes" in recipe:
        lines.append(
            f"Full recipe of {recipe['variant']} on MTAT-sized data ({recipe['mode']} "
            f"{recipe['train_segments_per_s']:,.0f} segments/s, validation "
            f"{recipe['eval_segments_per_s']:,.0f} segments/s): {recipe['epoch_s']:.0f} s per "
            + "epoch; "
            + ", ".join(f"{e} epochs {m:.1f} min" for e, m in recipe["minutes"].items())
            + "."
        )
    else:
        lines.append(f"Full recipe: not estimated ({recipe.get('error')}).")
    lines += ["", *(f"- {g}" for g in _goals(rows, recipe, ctx))]
    failed = [
        f"- FAILED {r['variant']} {m}: {f['error']}"
        for r in rows
        for m, f in [*r["modes"].items(), ("baseline", r["baseline"])]
        if "error" in f
    ]
    return "\n".join(lines + failed) + "\n"


def _worker_main(args: argparse.Namespace) -> int:
    """Compile (if asked), report READY, wait for GO, time every mode, report RESULT."""
    from resemul_core.data.store import open_store

    store = open_store(args.store)
    device = torch.device(args.device)
    modes = [m for m in args.modes.split(",") if m]
    common = {
        "store": store,
        "width": args.width,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "device": device,
        "num_workers": args.workers,
    }
    ready: dict[str, Any] = {"variant": args.variant}
    compiled: OursRun | None = None
    if "compiled+resident" in modes:
        try:
            compiled = OursRun(
                args.variant,
                mode="compiled+resident",
                total_steps=args.compile_warmup + args.warmup + args.steps,
                **common,
            )
            ready["compile_s"] = round(compiled.warm_up(args.compile_warmup), 2)
            ready.update(compile_stats())
        except Exception as err:
            compiled, ready["error"] = None, first_line(err)
    print("READY " + json.dumps(ready), flush=True)
    if sys.stdin.readline().strip() != "GO":
        return 0  # the parent gave up on this worker
    results: dict[str, Any] = {}
    for mode in modes:
        try:
            if mode == "compiled+resident":
                if compiled is None:
                    raise RuntimeError(ready.get("error", "not compiled"))
                compiled.warm_up(args.warmup)
                results[mode] = compiled.measure(args.steps, args.chunks) | {
                    "compile_s": ready["compile_s"]
                }
            else:
                results[mode] = time_ours(
                    args.variant,
                    mode=mode,
                    steps=args.steps,
                    warmup=args.warmup,
                    chunks=args.chunks,
                    **common,
                )
        except Exception as err:
            results[mode] = {"error": first_line(err)}
    if args.eval_rate:
        try:
            model = (
                compiled.model
                if compiled is not None
                else OursRun(args.variant, mode="eager+resident", total_steps=1, **common).model
            )
            results["eval_segments_per_s"] = time_validation(
                model,
                store,
                device=device,
                precision=args.precision,
                num_workers=args.workers,
                segments=args.eval_segments,
            )
        except Exception as err:
            results["eval_error"] = first_line(err)
    print("RESULT " + json.dumps({"variant": args.variant, **results}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``worker``: one variant's timing process (see :func:`start`)."""
    parser = argparse.ArgumentParser(description="a timing worker of check 6")
    sub = parser.add_subparsers(dest="command", required=True)
    work = sub.add_parser("worker")
    add_timing_args(work)
    work.add_argument("--variant", required=True)
    work.add_argument("--modes", default=",".join(MODES))
    work.add_argument("--precision", default="bf16")
    work.add_argument("--compile-warmup", type=int, default=5)
    work.add_argument("--eval-rate", action="store_true")
    work.add_argument("--eval-segments", type=int, default=MTAT_VALID_SEGMENTS)
    return _worker_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
