"""The ``resemul`` command line: one subcommand per job.

Only this module prints; the library functions it calls log and return values.
Each concern registers its subcommands with one ``add_*_commands(subparsers)`` function.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser"]


def _print_table(rows: list[dict], columns: Sequence[str]) -> None:
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


# --- models (issue 2) -------------------------------------------------------------------


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the twelve variants and their parameter counts")
    p.add_argument("--num-tags", type=int, default=50, help="number of output tags (default 50)")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 = paper)")
    p.add_argument("--alpha", type=float, default=16.0, help="SE expansion ratio (16 = paper)")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from .model import variant_table

    rows = variant_table(num_tags=args.num_tags, width=args.width, alpha=args.alpha)
    _print_table(rows, ["variant", "block", "multi", "trainable", "total"])
    return 0


COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_model_commands,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resemul",
        description="Sample-level CNNs for music auto-tagging (Kim, Lee & Nam, ICASSP 2018).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMAND_GROUPS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"resemul {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
