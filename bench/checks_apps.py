"""Checks 7 and 8 of ``bench/gpu_check.py``: the book, tagging and excitations on the device.

Each check takes the run's :class:`gpu_common.Context` and returns ``(reason, details)`` for a
PASS, or raises :class:`gpu_common.CheckFailed` (FAIL).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from gpu_common import REPO, CheckFailed, Context

#: Check 8: largest absolute difference allowed between device and CPU, for tag
#: probabilities and SE gates (both in [0, 1]), with TF32 off on the device.
INFERENCE_TOLERANCE = 1e-3


def book(ctx: Context) -> tuple[str, dict]:
    """Check 7: the notebooks as ``make book`` runs them (papermill, kernel python3), for
    two variants, on the device with the ``gpu`` profile (``tiny`` on the CPU)."""
    try:
        import papermill
    except ImportError as err:
        raise CheckFailed(
            f"papermill is not importable ({err}); install the carried wheels (make gpu-wheels)"
        ) from err
    notebooks = REPO / "book" / "notebooks"
    root = ctx.work / "book"
    data, store, runs = root / "synth", root / "synth-store", root / "runs"
    device = "cuda" if ctx.cuda else "cpu"
    profile = ctx.sizes.book_profile
    seconds: dict[str, float] = {}

    def execute(name: str, page: str, **parameters: Any) -> None:
        started = time.perf_counter()
        target = root / "executed" / f"{page}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            papermill.execute_notebook(
                str(notebooks / f"{name}.ipynb"),
                str(target),
                parameters=parameters,
                cwd=str(notebooks),  # as the Makefile runs them
                progress_bar=False,
                kernel_name="python3",
                execution_timeout=int(ctx.timeout(300)),
            )
        except papermill.PapermillExecutionError as err:
            raise CheckFailed(f"{page}: {err.ename}: {err.evalue}", {"seconds": seconds}) from err
        except Exception as err:  # no kernel, a timeout: name the notebook
            first = (str(err).strip().splitlines() or [""])[0]
            details = {"seconds": seconds}
            raise CheckFailed(f"{page}: {type(err).__name__}: {first}", details) from err
        seconds[page] = round(time.perf_counter() - started, 1)

    workers = max(1, min(4, os.cpu_count() or 1))
    execute(
        "01_data",
        "01_data",
        dataset="synth",
        root=str(data),
        store_dir=str(store),
        split_policy="paper",
        synth_clips=ctx.sizes.synth_clips,
        workers=workers,
    )
    variants = ctx.sizes.book_variants
    for variant in variants:
        execute(
            "02_train",
            f"train/{variant}",
            variant=variant,
            profile=profile,
            data=str(store),
            device=device,
            out=str(runs / variant),
        )
    execute(
        "03_evaluate",
        "03_evaluate",
        runs=str(runs),
        data=str(store),
        variants=" ".join(variants),
        device=device,
    )
    execute(
        "04_excitations",
        "04_excitations",
        run=str(runs / "se-multi"),
        data=str(store),
        device=device,
    )
    scores = {v: json.loads((runs / v / "metrics.json").read_text())["roc_auc"] for v in variants}
    details = {"profile": profile, "device": device, "seconds": seconds, "test_roc_auc": scores}
    lines = [
        f"## Book notebooks (check 7): profile {profile} on {device}, "
        f"{ctx.sizes.synth_clips} synthetic clips",
        "",
        "| notebook | seconds |",
        "|---|---:|",
        *(f"| {page} | {s:.1f} |" for page, s in seconds.items()),
        "",
        "Test ROC-AUC: " + ", ".join(f"{v} {a:.3f}" for v, a in scores.items()),
    ]
    ctx.tables["book"] = {"data": details, "markdown": "\n".join(lines) + "\n"}
    return (
        f"{len(seconds)} notebooks ({profile} profile on {device}) in {sum(seconds.values()):.0f}"
        " s; test ROC-AUC " + ", ".join(f"{v} {a:.3f}" for v, a in scores.items()),
        details,
    )


def inference(ctx: Context) -> tuple[str, dict]:
    """Check 8: ``Tagger`` on a wav and ``extract_excitations`` on the store, on the device
    and on the CPU, from one checkpoint: the same probabilities and gates."""
    from resemul_core.analysis.excitations import extract_excitations
    from resemul_core.interfaces.tagger import Tagger
    from resemul_core.profiles import resolve_config
    from resemul_core.runtime import configure_backends
    from resemul_core.training.loop import train
    from resemul_core.training.run_dir import load_model

    store, device = ctx.store("paper"), str(ctx.device)
    config = resolve_config(
        "se-multi",
        "tiny",
        {
            "width": ctx.sizes.tag_width,
            "device": device,
            "num_stages": 1,
            "max_epochs_per_stage": 1,
            "max_steps_per_epoch": 3,
            "val_segments": 23,
            "precision": "fp32",
        },
        num_tags=len(store.tags),
        segment_length=store.segment_length,
    )
    run = ctx.work / "tagging" / "run"
    train(store, run, config, progress=False)
    wav = _write_wav(ctx.work / "tagging" / "clip.wav")
    configure_backends(ctx.device, "fp32")  # TF32 off: compare float32 with float32
    probs = {
        d: Tagger.from_checkpoint(run, device=d, precision="fp32").predict(wav)
        for d in ("cpu", device)
    }
    prob_diff = float(np.abs(probs["cpu"] - probs[device]).max())
    gates = {}
    for name, where, batch in (("cpu", "cpu", 64), ("device", device, 48)):
        model, _ = load_model(run)
        gates[name] = extract_excitations(
            model,
            store,
            split="test",
            batch_size=batch,
            device=where,
            segment_levels="all",
            progress=False,
        )
    cpu, dev = gates["cpu"], gates["device"]
    gate_diff = max(
        [float(np.abs(a - b).max()) for a, b in zip(cpu.clip, dev.clip, strict=True)]
        + [float(np.abs(cpu.segment[k] - dev.segment[k]).max()) for k in cpu.segment]
    )
    details = {
        "tolerance": INFERENCE_TOLERANCE,
        "max_probability_diff": prob_diff,
        "max_gate_diff": gate_diff,
        "levels": list(cpu.levels),
        "segments": int(cpu.num_segments),
        "top_tags_cpu": [store.tags[k] for k in np.argsort(-probs["cpu"])[:3]],
        "top_tags_device": [store.tags[k] for k in np.argsort(-probs[device])[:3]],
    }
    reason = (
        f"{device} vs cpu: max abs diff probabilities {prob_diff:.2e}, SE gates {gate_diff:.2e} "
        f"({len(cpu.levels)} levels, {cpu.num_segments} segments); tolerance "
        f"{INFERENCE_TOLERANCE:g}"
    )
    if max(prob_diff, gate_diff) > INFERENCE_TOLERANCE:
        raise CheckFailed(reason, details)
    return reason, details


def _write_wav(path: Path) -> Path:
    """A 30 s, 44.1 kHz wav of two tones and noise (the tagger resamples it)."""
    import soundfile as sf

    rate = 44_100
    t = np.arange(30 * rate) / rate
    rng = np.random.default_rng(0)
    audio = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1760 * t)
    audio += 0.03 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio.astype(np.float32), rate)
    return path
