"""The demo design experiment: one training run and what the book would show of it.

``run`` trains a variant through :func:`resemul_core.interfaces.pipeline.fit` (one torch thread,
so that two runs can share a 2-core machine), scores it on the test split
(:func:`~resemul_core.interfaces.pipeline.evaluate`, which also writes ``predictions.npz``) and,
for an SE variant, analyses its excitations; it prints one JSON line: training seconds, test
ROC-AUC / PR-AUC, the SE gates' spread per level and the "std across tags" per level. ``pair``
prints the paired bootstrap difference of two evaluated runs on the same test clips. The table
in bench/RESULTS.md ("Demo design experiment (CPU)") was made with these steps::

    .venv/bin/resemul data synth --out data/synth && .venv/bin/resemul data prepare \\
        --dataset synth --root data/synth --out data/synth-store
    .venv/bin/python bench/demo_design.py run data/synth-store runs/exp/a se-multi \\
        --profile demo --set "learning_rate=0.1 num_stages=3 seed=0"
    .venv/bin/python bench/demo_design.py pair runs/exp/a runs/exp/b
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def run(store: str, run_dir: str, variant: str, profile: str, overrides: str) -> dict:
    """Train, evaluate and (for SE variants) analyse one run; a JSON-ready summary."""
    from resemul_core.analysis.excitations import se_variants
    from resemul_core.interfaces.pipeline import analyse_excitations, evaluate, fit
    from resemul_core.profiles import parse_overrides

    torch.set_num_threads(1)
    started = time.perf_counter()
    settings = parse_overrides(overrides)
    fit(store, run_dir, variant=variant, profile=profile, overrides=settings, progress=False)
    out = {"variant": variant, "profile": profile, "set": overrides}
    out["train_s"] = round(time.perf_counter() - started, 1)
    result = evaluate(run_dir, store, device="cpu", progress=False)
    out |= {"roc_auc": round(result["roc_auc"], 4), "pr_auc": round(result["pr_auc"], 4)}
    if variant in se_variants():
        summary = analyse_excitations(run_dir, store, device="cpu", progress=False).summary
        out["std_across_tags"] = [round(row["std"], 4) for row in summary["std_across_tags"]]
        out["gates"] = summary["gates"]
    return out


def pair(run_a: str, run_b: str, resamples: int) -> dict:
    """ROC-AUC of run A minus run B on the same test clips, with its paired interval."""
    from resemul_core.analysis.statistics import paired_difference
    from resemul_core.training.run_dir import read_predictions

    a, b = read_predictions(run_a), read_predictions(run_b)
    if not (a["clip_index"] == b["clip_index"]).all():
        raise SystemExit(f"{run_a} and {run_b} were scored on different clips")
    iv = paired_difference(a["labels"], a["scores"], b["scores"], num_resamples=resamples)
    return {"a": run_a, "b": run_b, **iv.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train, evaluate and analyse one run")
    p.add_argument("store")
    p.add_argument("run_dir")
    p.add_argument("variant")
    p.add_argument("--profile", default="demo")
    p.add_argument("--set", default="", help='overrides, e.g. "learning_rate=0.1 seed=1"')
    p = sub.add_parser("pair", help="paired bootstrap difference of two evaluated runs")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    if args.command == "run":
        print(json.dumps(run(args.store, args.run_dir, args.variant, args.profile, args.set)))
    else:
        print(json.dumps(pair(args.run_a, args.run_b, args.resamples)))


if __name__ == "__main__":
    main()
