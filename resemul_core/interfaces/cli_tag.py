"""The ``resemul tag`` subcommand (to be extended: folders, taggrams, embeddings)."""

from __future__ import annotations

import argparse
import sys

from resemul_core.interfaces.cli_data import device_name, int_at_least

__all__ = ["add_tag_commands"]


def add_tag_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tag", help="tag audio files with a trained model")
    p.add_argument("files", nargs="+", metavar="FILE", help="mp3, wav, flac or ogg files")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint file")
    p.add_argument("--top-k", type=int_at_least(0), default=5, help="tags per file (0: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--all-segments",
        action="store_true",
        help="average over every segment of the file, not the first 10 (training's count)",
    )
    p.set_defaults(func=_cmd_tag)


def _cmd_tag(args: argparse.Namespace) -> int:
    import json

    from resemul_core.data.audio import AudioDecodeError
    from resemul_core.interfaces.tagger import Tagger

    segments = None if args.all_segments else "checkpoint"
    tagger = Tagger.from_checkpoint(args.checkpoint, device=args.device, segments_per_clip=segments)
    top_k = args.top_k or None
    results, failed = [], 0
    for file in args.files:
        try:
            tags = tagger.tag(file, top_k=top_k)
        except (AudioDecodeError, FileNotFoundError) as err:
            print(f"resemul tag: error: {err}", file=sys.stderr)
            failed += 1
            continue
        results.append({"file": file, "tags": [{"tag": t, "probability": p} for t, p in tags]})
        if not args.json:
            print(file)
            width = max(len(t) for t, _ in tags)
            for tag, prob in tags:
                print(f"  {tag.ljust(width)}  {prob:.3f}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0
