"""The ``resemul data`` and ``resemul import-keras`` subcommands, and the CLI's table printer.

Public: :func:`add_data_commands`, :func:`add_keras_commands`, :func:`print_table`, and the
argument types both CLI modules validate their options with at the edge (a bad value is a
one-line argparse error naming the option): :func:`int_at_least`, :func:`positive_float`,
:func:`non_negative_float`, :func:`seed`, :func:`device_name`, :func:`output_dir`,
:func:`split_fractions`.

``data prepare`` decodes a dataset into a segment store and prints the store's summary,
``data info`` prints that summary of an existing store, ``data synth`` writes a synthetic
dataset; ``import-keras`` converts the authors' released Keras models into checkpoints. Like
:mod:`resemul_core.interfaces.cli`, which registers these subcommands with the others, this
module prints; the library functions it calls log and return values.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from resemul_core.config import check_device

__all__ = [
    "add_data_commands",
    "add_keras_commands",
    "device_name",
    "int_at_least",
    "non_negative_float",
    "output_dir",
    "positive_float",
    "print_table",
    "seed",
    "split_fractions",
]


# --- argument types ----------------------------------------------------------------------


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _finite_float(text: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (not NaN, not infinity)."""
    return _finite_float(text, allow_zero=False)


def non_negative_float(text: str) -> float:
    """An argparse ``type``: a finite number >= 0 (not NaN, not infinity)."""
    return _finite_float(text, allow_zero=True)


def seed(text: str) -> int:
    """An argparse ``type``: a random seed, an integer in [0, 2**64)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(
            f"expected a seed, an integer from 0 to 2**64 - 1, got {text!r}"
        )
    return value


def device_name(text: str) -> str:
    """An argparse ``type``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (also ``mps``, ``xpu``)."""
    try:
        return check_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def output_dir(text: str) -> str:
    """An argparse ``type``: a directory to write into, which need not exist yet, but neither it
    nor the first of its parents that exists may be a file."""
    path = Path(text)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                which = "it" if parent == path else f"its parent {parent}"
                raise argparse.ArgumentTypeError(
                    f"{text!r} cannot be a directory: {which} is a file"
                )
            break
    return text


def split_fractions(text: str) -> list[float]:
    """An argparse ``type``: three finite fractions >= 0 summing to 1, e.g. ``0.8,0.1,0.1``."""
    try:
        values = [float(f) for f in text.split(",")]
    except ValueError:
        values = []
    if (
        len(values) != 3
        or not all(math.isfinite(v) and v >= 0 for v in values)
        or abs(sum(values) - 1) > 1e-6
    ):
        raise argparse.ArgumentTypeError(
            f"expected three fractions >= 0 summing to 1 (train,valid,test, e.g. 0.8,0.1,0.1), "
            f"got {text!r}"
        )
    return values


def print_table(rows: list[dict], columns: Sequence[str]) -> None:
    """Print dict rows as an aligned plain-text table (numbers with thousands separators)."""

    def fmt(value: object) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, int):
            return f"{value:,}"
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value)

    cells = [[fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print(
            "  ".join(
                v.rjust(w) if v[:1].isdigit() else v.ljust(w)
                for v, w in zip(r, widths, strict=True)
            )
        )


# --- data --------------------------------------------------------------------------------


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare, inspect or synthesise datasets (segment stores)")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = actions.add_parser("prepare", help="decode a dataset into a segment store (resumable)")
    p.add_argument("--dataset", required=True, choices=["synth", "mtat", "msd", "table"])
    p.add_argument(
        "--root",
        required=True,
        help="MTAT or MSD folder; the table file for 'table'; for 'synth' where to write it",
    )
    p.add_argument(
        "--out", required=True, type=output_dir, help="store directory (rerun to resume)"
    )
    p.add_argument(
        "--split-policy",
        choices=["paper", "resemul"],
        help="mtat/msd: 'paper' (default; Lee et al., >= 29.1 s) or 'resemul' (official code)",
    )
    p.add_argument(
        "--workers", type=int_at_least(1), help="decoding processes (default: all CPU cores)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("audio (defaults = paper)")
    g.add_argument("--sample-rate", type=int_at_least(1), default=22_050, help="Hz (22050)")
    g.add_argument("--segment-length", type=int_at_least(1), default=59_049, help="samples (59049)")
    g.add_argument("--segments-per-clip", type=int_at_least(1), default=10, help="(10)")
    g.add_argument(
        "--clip-duration", type=positive_float, default=29.0, help="seconds decoded (29)"
    )
    g.add_argument(
        "--min-duration",
        type=non_negative_float,
        help="seconds a clip needs (paper policy 29.1; table: none)",
    )
    g = p.add_argument_group("mtat")
    g.add_argument("--top-k", type=int_at_least(1), default=50, help="most frequent tags kept (50)")
    g = p.add_argument_group("msd")
    g.add_argument("--audio-dir", help="folder of the audio previews (default ROOT/audio)")
    g = p.add_argument_group("table")
    g.add_argument("--path-column", default="path", help="audio path column (path)")
    g.add_argument("--id-column", help="clip id column (default: the path)")
    g.add_argument("--split-column", default="split", help="split column, if present (split)")
    g.add_argument("--tag-columns", help="comma-separated 0/1 tag columns (default: the rest)")
    g.add_argument("--tags-column", help="column of tag lists such as 'rock;guitar'")
    g.add_argument("--tag-separator", default=";", help="separator in --tags-column (;)")
    g.add_argument(
        "--fractions",
        type=split_fractions,
        default="0.8,0.1,0.1",
        help="random split train,valid,test",
    )
    g = p.add_argument_group("synth and table")
    g.add_argument("--seed", type=seed, default=0, help="synthetic data or random split seed (0)")
    g.add_argument("--clips", type=int_at_least(1), help="synth: number of clips (800)")
    p.set_defaults(func=_cmd_data_prepare)

    p = actions.add_parser("info", help="summarise a segment store")
    p.add_argument("store", help="store directory")
    p.set_defaults(func=_cmd_data_info)

    p = actions.add_parser(
        "verify",
        help="check a store against its checksums: manifest, index, labels and every clip",
    )
    p.add_argument("store", help="store directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_data_verify)

    p = actions.add_parser("synth", help="write a synthetic MTAT-format dataset")
    p.add_argument("--out", required=True, type=output_dir, help="dataset folder (e.g. data/synth)")
    p.add_argument(
        "--clips",
        type=int_at_least(1),
        help="number of clips (default: the book's 800; 25,863 with --mtat)",
    )
    p.add_argument("--seed", type=seed, default=0, help="random seed (0)")
    p.add_argument("--force", action="store_true", help="regenerate even if already complete")
    p.add_argument("--workers", type=int_at_least(1), help="processes (default: all CPU cores)")
    p.add_argument(
        "--mtat",
        action="store_true",
        help="fast MTAT-sized release: level variants of a bank of rendered clips, MTAT's"
        " split counts, zero-byte and short clips (resemul_core.data.synth_release)",
    )
    p.add_argument("--bank", type=int_at_least(1), help="--mtat: distinct rendered clips (1024)")
    p.set_defaults(func=_cmd_data_synth)


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from resemul_core.data.prepare import store_summary
    from resemul_core.interfaces.pipeline import prepare

    options: dict = {}
    if args.dataset == "table":
        options = {
            "path_column": args.path_column,
            "id_column": args.id_column,
            "split_column": args.split_column,
            "tags_column": args.tags_column,
            "tag_separator": args.tag_separator,
            "fractions": list(args.fractions),
        }
        if args.tag_columns:
            options["tag_columns"] = [c.strip() for c in args.tag_columns.split(",")]
    elif args.dataset == "mtat":
        options["top_k"] = args.top_k
    elif args.dataset == "msd" and args.audio_dir:
        options["audio_dir"] = args.audio_dir
    if args.min_duration is not None:
        options["min_duration"] = args.min_duration
    try:
        store = prepare(
            args.dataset,
            args.root,
            args.out,
            split_policy=args.split_policy,
            seed=args.seed,
            synth_clips=args.clips,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            audio={
                "sample_rate": args.sample_rate,
                "segment_length": args.segment_length,
                "segments_per_clip": args.segments_per_clip,
                "clip_duration": args.clip_duration,
            },
            **options,
        )
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to resume {args.out}", file=sys.stderr)
        return 130
    _print_store_summary(store_summary(store))
    return 0


def _print_store_summary(summary: dict) -> None:
    print(f"store        {summary['path']}")
    print(f"dataset      {summary['dataset']}  (resemul_core {summary['library_version']})")
    print("params       " + ", ".join(f"{k}={v}" for k, v in summary["params"].items()))
    label = f"tags ({len(summary['tags'])})"
    print(f"{label:13}" + ", ".join(summary["tags"]))
    size, unit = float(summary["size_bytes"]), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    print(f"size         {size:,.1f} {unit} on disk")
    print(f"fingerprint  {summary['fingerprint']}")
    print()
    print_table(summary["splits"], ["split", "clips", "segments"])
    skips = [{"reason": r, "clips": n} for r, n in sorted(summary["skips"].items())]
    print()
    if skips:
        print_table(skips, ["reason", "clips"])
    else:
        print("no input skipped")


def _cmd_data_info(args: argparse.Namespace) -> int:
    from resemul_core.data.prepare import store_summary
    from resemul_core.data.store import open_store

    _print_store_summary(store_summary(open_store(args.store)))
    return 0


def _cmd_data_verify(args: argparse.Namespace) -> int:
    from resemul_core.data.store import verify_store

    report = verify_store(args.store, progress=not args.no_progress)  # StoreCorrupted: exit 2
    print(
        f"{report['path']}: intact: manifest, clips.csv, labels.npy and {report['clips']:,} "
        f"clips ({report['segments']:,} segments) match their checksums; fingerprint "
        f"{report['fingerprint']}"
    )
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from resemul_core.data.synth import DEFAULT_NUM_CLIPS, ensure_dataset, generate_dataset
    from resemul_core.data.synth_release import (
        DEFAULT_BANK_SIZE,
        MTAT_CLIPS,
        ensure_release,
        generate_release,
    )

    if args.mtat:
        make = generate_release if args.force else ensure_release
        summary = make(
            args.out,
            num_clips=args.clips or MTAT_CLIPS,
            bank_size=args.bank or DEFAULT_BANK_SIZE,
            seed=args.seed,
            workers=args.workers,
        )
    else:
        if args.bank is not None:
            raise ValueError("--bank applies to --mtat only")
        make = generate_dataset if args.force else ensure_dataset
        summary = make(
            args.out,
            num_clips=args.clips or DEFAULT_NUM_CLIPS,
            seed=args.seed,
            workers=args.workers,
        )
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


# --- Keras import ------------------------------------------------------------------------


def add_keras_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-keras",
        help="convert the authors' released Keras HDF5 model into a checkpoint",
        description="Load a Keras 2.0.5 model.save / save_weights HDF5 file of the official "
        "code into one of our variants and save it as a checkpoint with the MTAT top-50 tags "
        "in the official order. The released files are se-multi-auc_0.9111-tfrmodel.hdf5 "
        "(--variant se-multi) and rese-multi-auc_0.9113-tfrmodel.hdf5 (--variant rese2-multi).",
    )
    p.add_argument("file", metavar="FILE.hdf5", help="the Keras HDF5 file")
    p.add_argument("--variant", required=True, help="the variant the file holds, e.g. se-multi")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint to write")
    p.add_argument(
        "--width", type=positive_float, default=1.0, help="channel multiplier (1.0 = paper)"
    )
    p.add_argument(
        "--alpha", type=positive_float, default=16.0, help="SE expansion ratio (16 = paper)"
    )
    p.add_argument(
        "--num-blocks", type=int_at_least(3), default=9, help="blocks (9 = paper, 59049 samples)"
    )
    p.set_defaults(func=_cmd_import_keras)


def _cmd_import_keras(args: argparse.Namespace) -> int:
    from resemul_core.model.keras_import import convert_keras_checkpoint

    out = convert_keras_checkpoint(
        args.file,
        args.out,
        variant=args.variant,
        width=args.width,
        alpha=args.alpha,
        num_blocks=args.num_blocks,
    )
    print(f"wrote {out}: {args.variant} from {args.file} (tags: MTAT top 50, official order)")
    return 0
