"""The ``resemul`` command line: one subcommand per job.

Only this module and :mod:`resemul_core.interfaces.cli_data` (the ``data`` and
``import-keras`` subcommands) print; the library functions they call log and return values.
Each concern registers its subcommands with one ``add_*_commands(subparsers)`` function; how
:func:`main` reports a failure (one line, exit status 2) is
:mod:`resemul_core.interfaces.cli_errors`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from resemul_core.config import PRECISIONS
from resemul_core.interfaces.cli_data import (
    add_data_commands,
    add_keras_commands,
    device_name,
    int_at_least,
    output_dir,
    positive_float,
    print_table,
    seed,
)
from resemul_core.interfaces.cli_errors import (
    _EPILOG,
    _command_name,
    _error_message,
    _Parser,
    _print_traceback,
    _rerun_advice,
)
from resemul_core.interfaces.cli_tag import add_tag_commands

__all__ = ["main", "build_parser"]


# --- models ------------------------------------------------------------------------------


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the twelve variants and their parameter counts")
    p.add_argument(
        "--num-tags", type=int_at_least(1), default=50, help="number of output tags (default 50)"
    )
    p.add_argument(
        "--width", type=positive_float, default=1.0, help="channel multiplier (1.0 = paper)"
    )
    p.add_argument(
        "--alpha", type=positive_float, default=16.0, help="SE expansion ratio (16 = paper)"
    )
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from resemul_core.model.sample_cnn import variant_table

    rows = variant_table(num_tags=args.num_tags, width=args.width, alpha=args.alpha)
    print_table(rows, ["variant", "block", "multi", "trainable", "total"])
    return 0


# --- excitations -------------------------------------------------------------------------


def add_excitation_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "excitations",
        help="extract and analyse the SE gates of a trained model (paper Sec. 4.3)",
        description="Writes OUT/excitations.npz, OUT/summary.json and the figures as PNG.",
    )
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT", help="run directory or .pt file")
    p.add_argument("--data", required=True, metavar="STORE", help="segment store directory")
    p.add_argument("--split", default="test", help="split to analyse (default: test)")
    p.add_argument(
        "--out",
        metavar="DIR",
        type=output_dir,
        help="output directory (default: RUN/excitations)",
    )
    p.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--batch-size", type=int_at_least(1), default=64, help="segments per forward pass"
    )
    p.add_argument(
        "--loudness",
        choices=("rms", "db"),
        default="rms",
        help="per-segment loudness: RMS amplitude (default) or dBFS",
    )
    p.add_argument(
        "--segment-levels",
        choices=("first", "all"),
        default="first",
        help="SE levels whose per-segment gates are saved (default: first)",
    )
    p.add_argument("--tags", help="comma-separated tags for the per-level figure")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_excitations)


def _cmd_excitations(args: argparse.Namespace) -> int:
    from resemul_core.interfaces.pipeline import analyse_excitations

    analysis = analyse_excitations(
        args.source,
        args.data,
        out=args.out,
        split=args.split,
        device=args.device,
        loudness=args.loudness,
        segment_levels=args.segment_levels,
        batch_size=args.batch_size,
        tags=[t.strip() for t in args.tags.split(",")] if args.tags else None,
        progress=not args.no_progress,
    )
    summary, out = analysis.summary, analysis.out
    print(
        f"{summary['variant']} on {summary['split']}: {summary['num_clips']:,} clips, "
        f"{summary['num_segments']:,} segments, {summary['num_tags']} tags"
    )
    print("standard deviation of tag-mean excitations across tags, mean over channels:")
    rows = [
        {**r, "std": f"{r['std']:.4g}", "paper": "-" if r["paper"] is None else r["paper"]}
        for r in summary["std_across_tags"]
    ]
    print_table(rows, ["level", "channels", "std", "paper"])
    loud = summary["loudness"]
    print(
        f"level {loud['level']} excitation vs loudness ({loud['measure']}): "
        f"{loud['positive']} of {loud['channels']} channels rise, {loud['negative']} fall "
        f"(paper: {summary['paper']['slope_counts']['positive']} positive / "
        f"{summary['paper']['slope_counts']['negative']} negative of 128)"
    )
    print(f"  {loud['convention']}")
    print(
        f"wrote {out / 'excitations.npz'}, {out / 'summary.json'} and "
        f"{len(analysis.figures)} figures to {out}"
    )
    return 0


# --- training, evaluation, tagging -------------------------------------------------------


def add_train_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a variant on a segment store (continues a run already in --out)",
        description="Settings are resolved once: the paper's defaults, the --profile's table, "
        "the flags and --set overrides, then the store's tags and segment length. "
        "Any setting can be given with --set KEY=VALUE; the valid keys are: "
        + ", ".join(_setting_names()),
    )
    p.add_argument("--variant", help="e.g. rese2-multi (see 'resemul models'); fresh runs only")
    p.add_argument("--data", required=True, help="segment store directory")
    p.add_argument(
        "--out", required=True, type=output_dir, help="run directory (checkpoints, log.csv)"
    )
    p.add_argument(
        "--profile",
        help="paper | demo | gpu | tiny (default: paper; a resumed run keeps its own)",
    )
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="require a run in --out to continue (by default one is continued if present)",
    )
    resume.add_argument("--overwrite", action="store_true", help="replace a run in --out")
    p.add_argument(
        "--max-steps", type=int_at_least(1), help="stop (resumably) after N steps of this call"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("everyday settings (shortcuts for --set)")
    g.add_argument("--seed", type=seed, help="seeds weights, data order and dropout")
    g.add_argument("--width", type=positive_float, help="channel multiplier (1.0 = paper)")
    g.add_argument("--device", type=device_name, help="auto | cpu | cuda | cuda:N")
    g.add_argument("--precision", choices=PRECISIONS, help="fp32 (the paper's), tf32 or bf16")
    g.add_argument(
        "--workers", type=int_at_least(0), help="DataLoader worker processes (0: in-process)"
    )
    g.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile forward + backward (CUDA graphs on one GPU)",
    )
    g.add_argument(
        "--data-on-device",
        action="store_true",
        default=None,
        help="hold the training split on the GPU as int16 (MTAT: 18 GB)",
    )
    g.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="start from a trained model's weights (a .pt file or a run directory); the head "
        "is re-made if the tags differ",
    )
    g.add_argument(
        "--freeze-blocks",
        type=int_at_least(0),
        metavar="N",
        help="with --init-from: keep the stem and the first N blocks as loaded",
    )
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any setting, e.g. --set num_stages=2 --set sync_bn=false (repeatable)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="clip-level ROC-AUC and PR-AUC of a trained model")
    p.add_argument("checkpoint", help="run directory (its best.pt) or checkpoint file")
    p.add_argument("--data", required=True, help="segment store directory")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument(
        "--out", type=output_dir, help="folder for metrics.json (default: the run directory)"
    )
    p.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--clips-per-batch", type=int_at_least(1), default=16, help="clips per forward pass"
    )
    p.add_argument("--workers", type=int_at_least(0), default=0, help="DataLoader worker processes")
    p.add_argument("--per-tag", action="store_true", help="also print every tag's scores")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "compare",
        help="evaluate every run of a runs folder and compare them the paper's way, with intervals",
    )
    p.add_argument("runs", help="folder of run directories (or of seed<N> folders of them)")
    p.add_argument("--data", required=True, help="segment store directory")
    p.add_argument("--variants", default="", help="subset, e.g. 'se se-multi' (default: all)")
    p.add_argument(
        "--resamples", type=int_at_least(1), default=2000, help="bootstrap resamples of clips"
    )
    p.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_compare)


def _setting_names() -> list[str]:
    from resemul_core.profiles import setting_names

    return [name.partition(".")[2] for name in setting_names()]


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from resemul_core.interfaces.pipeline import fit
    from resemul_core.profiles import parse_overrides
    from resemul_core.training.run_dir import LAST_CHECKPOINT, resolve_checkpoint

    shortcuts = {
        "seed": args.seed,
        "width": args.width,
        "device": args.device,
        "precision": args.precision,
        "num_workers": args.workers,
        "compile": args.compile,
        "data_on_device": args.data_on_device,
        "init_from": args.init_from,
        "freeze_blocks": args.freeze_blocks,
    }
    overrides = {k: v for k, v in shortcuts.items() if v is not None}
    overrides.update(parse_overrides(args.set))
    fresh = args.overwrite or not (Path(args.out) / LAST_CHECKPOINT).is_file()
    if fresh and overrides.get("init_from") is not None:  # a resumed run no longer needs it
        resolve_checkpoint(overrides["init_from"])  # a missing file: one line, before any work
    rank = int(os.environ.get("RANK", "0"))  # under torchrun, rank 0 logs and reports
    if rank > 0:
        logging.getLogger("resemul_core").setLevel(logging.WARNING)
    run = fit(  # its errors (a run in the way, a diverged loss, ...) are main's to report
        args.data,
        args.out,
        variant=args.variant,
        profile=args.profile,
        overrides=overrides,
        resume=True if args.resume else "auto",
        overwrite=args.overwrite,
        max_steps=args.max_steps,
        progress=not args.no_progress,
    )
    if rank > 0:
        return 0
    result = run.result
    state = "finished" if result.finished else "stopped (run the same command to continue)"
    print(f"run          {result.run_dir}  ({state})")
    print(f"variant      {run.config.variant}  on {run.device}")
    print(f"model        {result.best_checkpoint}")
    print(f"val loss     {result.best_val_loss:.4f}")
    print(f"epochs       {result.epochs}  ({result.global_step:,} steps)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from resemul_core.interfaces.pipeline import evaluate

    result = evaluate(
        args.checkpoint,
        args.data,
        split=args.split,
        out=args.out,
        device=args.device,
        clips_per_batch=args.clips_per_batch,
        num_workers=args.workers,
        progress=not args.no_progress,
    )
    print(f"checkpoint   {result['checkpoint']}  ({result['variant']})")
    print(f"data         {result['store']}  split {result['split']}, {result['num_clips']:,} clips")
    roc, pr = ("n/a" if result[k] is None else f"{result[k]:.4f}" for k in ("roc_auc", "pr_auc"))
    print(f"ROC-AUC      {roc}  (macro over {result['num_tags_scored']} tags)")
    print(f"PR-AUC       {pr}")
    if result["excluded_tags"]:
        print("excluded     " + ", ".join(result["excluded_tags"]) + "  (no positive/negative)")
    print(f"written      {result['metrics_path']}")
    if args.per_tag:
        rows = [{"tag": tag, **values} for tag, values in result["per_tag"].items()]
        print()
        print_table(rows, ["tag", "positives", "roc_auc", "pr_auc"])
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import pandas as pd

    from resemul_core.analysis.comparison import difference_display, score_display
    from resemul_core.interfaces.pipeline import compare_runs

    comparison = compare_runs(
        args.runs,
        args.data,
        variants=args.variants,
        device=args.device,
        num_resamples=args.resamples,
        progress=not args.no_progress,
    )
    seeds = [s for s in comparison.seeds if s] or ["one seed"]
    print(
        f"{len(comparison.scores)} variants, {', '.join(seeds)}, {len(comparison.labels):,} clips"
    )
    with pd.option_context("display.width", 200, "display.max_colwidth", None):
        for title, table in (
            ("Scores, 95 % intervals over test clips", score_display(comparison.scores_table)),
            ("The paper's differences, paired", difference_display(comparison.differences)),
            ("The paper's claims", comparison.claims.set_index("claim")),
        ):
            print(f"\n{title}\n{table.to_string()}")
    return 0


COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_model_commands,
    add_excitation_commands,
    add_data_commands,
    add_train_commands,
    add_keras_commands,
    add_tag_commands,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="resemul",
        description="Sample-level CNNs for music auto-tagging (Kim, Lee & Nam, ICASSP 2018).",
        epilog=_EPILOG,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages; tracebacks of errors"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMAND_GROUPS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``resemul`` command; its exit status.

    0 on success; 2 for an error the user can cause (an invalid argument or file, a run in
    the way, a full disk, a diverged run), reported in one line on stderr; 130 when
    interrupted. Bugs raise, with their traceback.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    command = _command_name(args)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _print_traceback(args)
        print(f"resemul {command}: interrupted; {_rerun_advice(args)}", file=sys.stderr)
        return 130
    except Exception as err:
        message = _error_message(err, args)
        if message is None:
            raise
        _print_traceback(args)
        print(f"resemul {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
