"""The ``resemul tag`` and ``resemul embed`` subcommands: tag music, export embeddings.

Both take audio files and folders (searched recursively), a checkpoint (a run directory, a
``.pt`` file, or one of the authors' Keras files with ``--variant``) and the segment choice of
:class:`~resemul_core.interfaces.tagger.Tagger`. A file that cannot be decoded is reported on
stderr, in the ``--csv`` table as "skipped" with its reason, and the others are still tagged;
the exit status is then 1 (2 when nothing could be done at all).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from resemul_core.interfaces.cli_data import device_name, int_at_least

__all__ = ["add_tag_commands"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs", nargs="+", metavar="AUDIO", help="audio files or folders (mp3, wav, flac, ogg)"
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run directory, checkpoint (.pt), or the authors' Keras file (.hdf5, with --variant)",
    )
    p.add_argument("--variant", help="the variant a Keras file holds: se-multi or rese2-multi")
    p.add_argument(
        "--segments",
        choices=("whole", "spread", "first"),
        default="whole",
        help="whole: every whole segment (default); spread: --num-segments spread over the "
        "file; first: the first --num-segments of the first 29 s (the paper's test protocol)",
    )
    p.add_argument(
        "--num-segments",
        type=int_at_least(1),
        help="segments per file for spread and first (default: the training store's, 10)",
    )
    p.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--precision",
        choices=("fast", "fp32", "bf16"),
        default="fast",
        help="fast (default: float32, probabilities within 1e-4 of fp32), fp32 (evaluation's "
        "exact path) or bf16 (fastest; probabilities off by up to a few hundredths)",
    )
    p.add_argument(
        "--batch-size", type=int_at_least(1), default=16, help="segments per forward pass"
    )
    p.add_argument(
        "--workers", type=int_at_least(1), default=2, help="decoding threads (default 2)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_tag_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tag",
        help="tag audio files or folders with a trained model",
        description="Prints each file's most probable tags (or writes a table with --csv); "
        "--taggram writes one file's tag probabilities over time as a figure or table.",
    )
    _common(p)
    p.add_argument("--top-k", type=int_at_least(0), default=5, help="tags per file (0: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "--csv", metavar="OUT.csv", help="write one row per file (status, tags' probabilities)"
    )
    p.add_argument(
        "--taggram",
        metavar="OUT.png|OUT.csv",
        help="for one audio file: its taggram as a figure (.png, .svg) or table (.csv)",
    )
    p.add_argument(
        "--all-segments", action="store_true", help="the same as --segments whole (the default)"
    )
    p.set_defaults(func=_cmd_tag)

    p = sub.add_parser(
        "embed",
        help="write embeddings of audio files (pooled block outputs) for transfer learning",
        description="Each segment's embedding is its blocks' outputs max-pooled over time; "
        "by default the last three blocks', concatenated (1,024 values at the paper's width).",
    )
    _common(p)
    p.add_argument(
        "--out", required=True, metavar="OUT", help="a .npy, .parquet or .csv file to write"
    )
    p.add_argument(
        "--per",
        choices=("file", "segment"),
        default="file",
        help="one embedding per file (the mean over its segments; default) or per segment",
    )
    p.add_argument(
        "--blocks",
        help="blocks to pool, 1 = the first: e.g. 7,8,9 or 'all' (default: the last three)",
    )
    p.set_defaults(func=_cmd_embed)


def _tagger(args: argparse.Namespace, **options):
    from resemul_core.interfaces.tagger import Tagger

    return Tagger.from_checkpoint(
        args.checkpoint,
        variant=args.variant,
        device=args.device,
        segments=args.segments,
        precision=args.precision,
        batch_size=args.batch_size,
        **({"num_segments": args.num_segments} if args.num_segments else {}),
        **options,
    )


def _outcomes(args: argparse.Namespace, tagger, paths, *, embeddings: bool):
    """Tag every file; report each skipped one on stderr as it happens."""
    from resemul_core.interfaces.tag_files import tag_files

    for outcome in tag_files(
        tagger,
        paths,
        embeddings=embeddings,
        workers=args.workers,
        progress=not args.no_progress,
    ):
        if outcome.error:
            print(f"resemul {args.command}: skipped: {outcome.error}", file=sys.stderr)
        yield outcome


def _exit_status(outcomes) -> int:
    if not outcomes:
        return 0
    ok = sum(o.result is not None for o in outcomes)
    return 0 if ok == len(outcomes) else (1 if ok else 2)


def _cmd_tag(args: argparse.Namespace) -> int:
    from resemul_core.interfaces.tag_files import find_audio, tag_table, write_table

    paths = find_audio(args.inputs)
    if args.taggram and len(paths) != 1:
        raise ValueError(f"--taggram takes one audio file, but {len(paths)} were given")
    if args.taggram and Path(args.taggram).suffix.lower() not in (".png", ".svg", ".csv"):
        raise ValueError(f"--taggram {args.taggram}: write a .png, .svg or .csv file")
    tagger = _tagger(args)
    top_k = args.top_k or None
    outcomes = list(_outcomes(args, tagger, paths, embeddings=False))
    done = [o for o in outcomes if o.result is not None]
    if args.csv:
        write_table(tag_table(outcomes, top_k=top_k or len(tagger.tags)), args.csv)
        print(f"wrote {args.csv}: {len(done)} files tagged, {len(outcomes) - len(done)} skipped")
    elif args.json:
        print(
            json.dumps(
                [
                    {
                        "file": str(o.path),
                        "segments": len(o.result.starts),
                        "tags": [{"tag": t, "probability": p} for t, p in o.result.top(top_k)],
                    }
                    for o in done
                ],
                indent=2,
            )
        )
    else:
        for outcome in done:
            tags = outcome.result.top(top_k)
            print(f"{outcome.path}  ({len(outcome.result.starts)} segments)")
            width = max(len(t) for t, _ in tags)
            for tag, prob in tags:
                print(f"  {tag.ljust(width)}  {prob:.3f}")
    if args.taggram and done:
        _write_taggram(done[0].result, Path(args.taggram))
        print(f"wrote {args.taggram}")
    return _exit_status(outcomes)


def _write_taggram(result, out: Path) -> None:
    from resemul_core.files import atomic_write

    frame = result.taggram()
    if out.suffix.lower() == ".csv":
        with atomic_write(out, mode="w") as handle:
            frame.to_csv(handle)
        return
    from resemul_core.analysis.taggram import plot_taggram

    plot_taggram(
        frame, segment_seconds=result.segment_seconds, title=Path(result.source).name, path=out
    )


def _blocks(text: str | None, num_blocks: int) -> list[int] | None:
    if text is None:
        return None
    if text.strip() == "all":
        return list(range(1, num_blocks + 1))
    try:
        blocks = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        blocks = []
    if not blocks or not all(1 <= b <= num_blocks for b in blocks):
        raise ValueError(
            f"--blocks {text}: expected block numbers between 1 and {num_blocks}, "
            "comma-separated, or 'all'"
        )
    return blocks


def _cmd_embed(args: argparse.Namespace) -> int:
    from resemul_core.interfaces.tag_files import embedding_table, find_audio, write_table

    if Path(args.out).suffix.lower() not in (".npy", ".parquet", ".csv"):
        raise ValueError(f"--out {args.out}: write a .npy, .parquet or .csv file")
    paths = find_audio(args.inputs)
    tagger = _tagger(args)
    tagger.embedding_blocks = _blocks(args.blocks, tagger.model.config.num_blocks) or (
        tagger.embedding_blocks
    )
    outcomes = list(_outcomes(args, tagger, paths, embeddings=True))
    table = embedding_table(outcomes, per=args.per)
    if table.empty:
        print(f"resemul embed: nothing written: none of the {len(paths)} files could be decoded")
        return 2
    write_table(table, args.out)
    features = sum(c.startswith("e") and c[1:].isdigit() for c in table.columns)
    blocks = ",".join(map(str, tagger.embedding_blocks))
    print(
        f"wrote {args.out}: {len(table):,} embeddings ({args.per}) of {features} values "
        f"(blocks {blocks}) from {sum(o.result is not None for o in outcomes)} files"
    )
    return _exit_status(outcomes)
