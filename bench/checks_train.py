"""Checks 1-5 and 9 of ``bench/gpu_check.py``: training on the device.

Each check takes the run's :class:`gpu_check.Context` and returns ``(reason, details)`` for a
PASS, or raises :class:`gpu_check.CheckFailed` (FAIL) or :class:`gpu_check.CheckSkipped`.
"""

from __future__ import annotations

import csv
import importlib
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from gpu_common import REPO, CheckFailed, Context
from train_speed import child_env, compile_stats, strict_compile

#: Check 9: the largest difference allowed between the final losses of a 2-process run with
#: synchronised BatchNorm and a 1-process run (dropout masks are drawn per rank, so they differ).
DDP_TOLERANCE = 0.05
#: Check 3: steady-state steps run under the sync debug mode, after this many warm-up steps.
SYNC_STEPS, SYNC_WARMUP = 10, 3


def _train_module() -> Any:
    # the module, not the function `train` that the package re-exports under the same name
    return importlib.import_module("resemul_core.training.loop")


def _read_log(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "log.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def test_suite(ctx: Context) -> tuple[str, dict]:
    """Check 1: pytest of the training and distributed tests, training on the device."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["tests/test_train.py", "tests/test_distributed.py"]
    if ctx.sizes.pytest_select:
        command += ["-k", ctx.sizes.pytest_select]
    env = child_env() | {"RESEMUL_TEST_DEVICE": str(ctx.device)}
    timeout = ctx.timeout(180)
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        raise CheckFailed(f"pytest did not finish within {timeout:.0f} s") from err
    summaries = [
        line.strip("= ")
        for line in done.stdout.splitlines()
        if re.search(r"\d+ (passed|failed|errors?|skipped|deselected)|no tests ran", line)
    ]
    summary = summaries[-1] if summaries else "no summary line"
    details = {"command": " ".join(command[1:]), "returncode": done.returncode, "summary": summary}
    if done.returncode != 0:
        details["output"] = _tail(done.stdout + done.stderr, 60)
        raise CheckFailed(f"pytest exit {done.returncode}: {summary}", details)
    return f"{summary} (RESEMUL_TEST_DEVICE={ctx.device})", details


def resume_across_devices(ctx: Context) -> tuple[str, dict]:
    """Check 2: device -> CPU -> device resumes of one run; a last.pt with 3 CUDA RNG states."""
    from resemul_core.model.checkpoint import read_checkpoint, save_payload
    from resemul_core.profiles import apply_overrides, resolve_config

    train_mod = _train_module()
    store, root = ctx.store("tiny"), ctx.work / "resume"
    base = resolve_config(
        "res2-multi",
        "tiny",
        {
            "num_stages": 2,
            "max_epochs_per_stage": 2,
            "max_steps_per_epoch": 4,
            "seed": 1,
            "checkpoint_every": 3,
        },
        num_tags=len(store.tags),
        segment_length=store.segment_length,
    )
    on_device = apply_overrides(base, {"device": str(ctx.device), "deterministic": ctx.cuda})
    on_cpu = apply_overrides(base, {"device": "cpu", "deterministic": False})
    fresh = {"progress": False}

    def cuda_states(run: Path) -> int:
        return len(read_checkpoint(run / "last.pt")["rng"]["cuda"])

    hop = root / "hop"
    steps, states = [], []
    for config, kwargs in (
        (on_device, fresh | {"max_steps": 5}),
        (on_cpu, {"resume": True, "max_steps": 6, "progress": False}),
        (on_device, {"resume": True, "progress": False}),
    ):
        result = train_mod.train(store, hop, config=config, **kwargs)
        steps.append(result.global_step)
        states.append(cuda_states(hop))
    log = _read_log(hop)
    losses = [float(r[k]) for r in log for k in ("train_loss", "val_loss")]
    details: dict[str, Any] = {
        "global_steps": steps,
        "cuda_rng_states_saved": states,
        "finished": result.finished,
        "epochs_logged": len(log),
    }
    problems = []
    if steps != [5, 11, 16] or not result.finished or len(log) != 4:
        problems.append(f"device->CPU->device stopped at steps {steps}, {len(log)} epochs logged")
    if not all(math.isfinite(x) for x in losses):
        problems.append("a logged loss is not finite")

    # a last.pt as versions that saved one CUDA state per visible GPU wrote it
    reference, injected = root / "ref", root / "injected"
    train_mod.train(store, reference, config=on_device, max_steps=5, **fresh)
    shutil.copytree(reference, injected)
    payload = torch.load(injected / "last.pt", weights_only=True)
    payload["rng"]["cuda"] = _three_cuda_states(ctx, payload["rng"]["cuda"])
    save_payload(injected / "last.pt", payload)
    ends = [
        train_mod.train(store, run, config=on_device, resume=True, progress=False)
        for run in (reference, injected)
    ]
    want = read_checkpoint(reference / "last.pt")["model_state"]
    got = read_checkpoint(injected / "last.pt")["model_state"]
    same = all(torch.equal(got[k], want[k]) for k in want)
    details["injected"] = {"finished": [e.finished for e in ends], "same_weights": same}
    if not all(e.finished for e in ends):
        problems.append("the run with 3 saved CUDA RNG states did not finish")
    elif not same:
        problems.append("3 saved CUDA RNG states gave other weights than the run's own state")
    if problems:
        raise CheckFailed("; ".join(problems), details)
    where = "CUDA -> CPU -> CUDA" if ctx.cuda else "CPU -> CPU -> CPU"
    return (
        f"{where} finished at step 16 (CUDA RNG states saved: {states}); a last.pt with 3 "
        "CUDA RNG states resumed to the same weights",
        details,
    )


def _three_cuda_states(ctx: Context, saved: list) -> list[torch.Tensor]:
    """The run's own CUDA RNG state first (GPU 0's), then two others; dummies on the CPU."""
    if not ctx.cuda:
        return [torch.zeros(16, dtype=torch.uint8) for _ in range(3)]
    others = []
    for seed in (11, 12):
        generator = torch.Generator(device=ctx.device)
        generator.manual_seed(seed)
        others.append(generator.get_state())
    return [saved[0], *others]


def host_syncs(ctx: Context) -> tuple[str, dict]:
    """Check 3: 10 steady-state steps of train()'s step under sync debug mode "error"."""
    results = {
        f"{path}/{precision}": _sync_trial(ctx, resident=path == "resident", precision=precision)
        for path in ("loader", "resident")
        for precision in ("bf16", "fp32")
    }
    bad = {k: v for k, v in results.items() if v != "no sync"}
    if bad:
        raise CheckFailed("host syncs: " + "; ".join(f"{k}: {v}" for k, v in bad.items()), results)
    return f"{SYNC_STEPS} steps each of {', '.join(results)} made no host sync", results


def _sync_trial(ctx: Context, *, resident: bool, precision: str) -> str:
    """``"no sync"``, or the first line of the error a synchronising call raised."""
    from resemul_core.config import TrainConfig
    from resemul_core.data.datasets import SegmentBatches
    from resemul_core.model.sample_cnn import build_model
    from resemul_core.runtime import configure_backends
    from resemul_core.training.feeding import ResidentSplit, device_batches
    from resemul_core.training.loop import train_step
    from resemul_core.training.schedule import build_optimizer, epoch_batches

    store, device = ctx.store("paper"), ctx.device
    batches = SegmentBatches(store, "train")
    configure_backends(device, precision)
    torch.manual_seed(0)
    model = build_model("se-multi", num_tags=store.num_tags, width=0.25).to(device).train()
    optimizer = build_optimizer(model, TrainConfig(), stage=0)
    rows = epoch_batches(
        len(batches), batch_size=23, num_steps=SYNC_WARMUP + SYNC_STEPS, seed=0, epoch=0
    )
    split = ResidentSplit(batches, device) if resident else None
    stream = device_batches(batches, rows, device=device, num_workers=2, resident=split)
    pending = []  # as train() keeps the losses: on the device until a periodic check

    def step() -> None:
        waveform, labels = next(stream)
        pending.append(train_step(model, optimizer, waveform, labels, lr=0.01, precision=precision))

    for _ in range(SYNC_WARMUP):  # cuDNN autotuning, allocations, the plan's copy happen here
        step()
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(SYNC_STEPS):
            step()
        outcome = "no sync"
    except RuntimeError as err:
        outcome = (str(err).strip().splitlines() or [type(err).__name__])[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)  # the rest of the process synchronises freely
        stream.close()
    torch.cuda.synchronize(device)
    return outcome


def precision(ctx: Context) -> tuple[str, dict]:
    """Check 4: the same short se-multi run in fp32 and bf16 (``bench/precision.py``)."""
    from precision import compare_precisions, markdown, summary_line

    result = compare_precisions(
        ctx.store("paper"),
        device=ctx.device,
        width=ctx.sizes.precision_width,
        steps=ctx.sizes.precision_steps,
        variant="se-multi",
    )
    ctx.tables["precision"] = {
        "data": result,
        "markdown": "## fp32 vs bf16 (check 4)\n\n" + markdown(result),
    }
    if not result["passed"]:
        raise CheckFailed(summary_line(result), result)
    return summary_line(result), {k: v for k, v in result.items() if k != "runs"}


def compiled_run(ctx: Context) -> tuple[str, dict]:
    """Check 5: train(compile=True) over epoch and stage boundaries; graphs and keys."""
    from resemul_core.config import KERAS_BN_MOMENTUM
    from resemul_core.model.checkpoint import read_checkpoint
    from resemul_core.profiles import resolve_config

    train_mod = _train_module()
    store = ctx.store("tiny")
    config = resolve_config(
        "se-multi",
        "tiny",
        {
            "device": str(ctx.device),
            "compile": True,
            "num_stages": 2,
            "max_epochs_per_stage": 2,
            "max_steps_per_epoch": 3,
            "checkpoint_every": 2,
            # the model check 6 compiles on a CPU: tiny's width, the paper's BN momentum
            "bn_momentum": KERAS_BN_MOMENTUM,
        },
        num_tags=len(store.tags),
        segment_length=store.segment_length,
    )
    strict_compile()  # a fresh dynamo that fails rather than fall back to eager
    trace: list[dict[str, int]] = []
    real_step = train_mod.train_step

    def counted_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = real_step(*args, **kwargs)
        trace.append(compile_stats())
        return loss

    run = ctx.work / "compiled"
    train_mod.train_step = counted_step  # train() looks the step up in its module each call
    try:
        result = train_mod.train(store, run, config, progress=False)
    finally:
        train_mod.train_step = real_step
    log = _read_log(run)
    stages = sorted({int(r["stage"]) for r in log})
    prefixed = [
        f"{name}: {key}"
        for name in ("last.pt", "best.pt")
        for key in read_checkpoint(run / name)["model_state"]
        if "_orig_mod" in key
    ]
    first, last = trace[0], trace[-1]
    details = {
        "steps": len(trace),
        "epochs": len(log),
        "stages": stages,
        "after_first_step": first,
        "at_end": last,
        "prefixed_keys": prefixed[:5],
    }
    problems = []
    if not result.finished or len(log) != 4 or stages != [0, 1]:
        problems.append(f"the run did not cover 4 epochs of 2 stages ({len(log)} epochs)")
    if first["unique_graphs"] < 1:
        problems.append("no graph was compiled")
    if (last["unique_graphs"], last["frames"]) != (first["unique_graphs"], first["frames"]):
        problems.append(f"recompiled after the first step: {first} -> {last}")
    if prefixed:
        problems.append(f"checkpoint keys carry _orig_mod ({prefixed[0]})")
    if problems:
        raise CheckFailed("; ".join(problems), details)
    return (
        f"{len(trace)} steps, 4 epochs, stage change: {first['unique_graphs']} graph(s) at the "
        f"first step and no recompile after it ({first['graph_breaks']} graph breaks); "
        "checkpoint keys plain",
        details,
    )


def ddp(ctx: Context) -> tuple[str, dict]:
    """Check 9: torchrun with 2 processes, synced and per-rank BN, against 1 process."""
    sizes = ctx.sizes
    store = ctx.store(sizes.ddp_store)
    kind = "cuda" if ctx.cuda else "cpu"
    train_args = [
        "-m",
        "resemul_core.interfaces.cli",
        "train",
        "--variant=se-multi",
        f"--data={store.path}",
        f"--profile={sizes.ddp_profile}",
        "--set=num_stages=1",
        f"--set=max_epochs_per_stage={sizes.ddp_epochs}",
        f"--set=max_steps_per_epoch={sizes.ddp_steps}",
        "--precision=fp32",
        f"--device={kind}",
        "--workers=0",
        "--no-progress",
        *(["--data-on-device"] if ctx.cuda else []),
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc_per_node=2"]
    env = child_env() | ({} if ctx.cuda else {"OMP_NUM_THREADS": "1"})  # 2 ranks, few cores
    runs = {
        "1 process": [sys.executable, *train_args],
        "2 processes, synced BN": [*torchrun, *train_args],
        "2 processes, per-rank BN": [*torchrun, *train_args, "--set=sync_bn=false"],
    }
    rows: dict[str, dict[str, Any]] = {}
    for name, command in runs.items():
        out = ctx.work / "ddp" / re.sub(r"\W+", "-", name)
        timeout = ctx.timeout(120)
        try:
            done = subprocess.run(
                [*command, f"--out={out}"],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as err:
            raise CheckFailed(f"{name}: did not finish within {timeout:.0f} s", rows) from err
        if done.returncode != 0:
            rows[name] = {"output": _tail(done.stdout + done.stderr)}
            raise CheckFailed(f"{name}: exit {done.returncode}", rows)
        last = _read_log(out)[-1]
        rows[name] = {
            "train_loss": float(last["train_loss"]),
            "val_loss": float(last["val_loss"]),
            "segments_per_s": float(last["segments_per_s"]),
        }
    one = rows["1 process"]
    for row in rows.values():
        row["train_diff"] = abs(row["train_loss"] - one["train_loss"])
        row["val_diff"] = abs(row["val_loss"] - one["val_loss"])
    ctx.tables["ddp"] = {"data": rows, "markdown": _ddp_markdown(rows, ctx)}
    synced = rows["2 processes, synced BN"]
    reason = (
        f"synced BN vs 1 process: abs diff train {synced['train_diff']:.4f}, val "
        f"{synced['val_diff']:.4f} (tolerance {DDP_TOLERANCE}); segments/s "
        + ", ".join(f"{k} {v['segments_per_s']:,.0f}" for k, v in rows.items())
    )
    if max(synced["train_diff"], synced["val_diff"]) > DDP_TOLERANCE:
        raise CheckFailed(reason, rows)
    return reason, rows


def _ddp_markdown(rows: dict[str, dict[str, Any]], ctx: Context) -> str:
    sizes = ctx.sizes
    lines = [
        f"## Data-parallel training (check 9): se-multi, profile {sizes.ddp_profile}, fp32, "
        f"{sizes.ddp_epochs} epochs of {sizes.ddp_steps} steps of 23 segments; last epoch",
        "",
        "| run | final train loss | final val loss | val diff vs 1 process | segments/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | {r['val_diff']:.4f} | "
            f"{r['segments_per_s']:,.0f} |"
        )
    return "\n".join(lines) + "\n"
