"""The companion book's layout: which pages it has, for the variants that were trained.

Public: :func:`toc_text`, :func:`write_toc`.

The training chapter is executed once per variant, so the table of contents depends on which
variants a build trains (``make book VARIANTS=...``); it is written before every build.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .files import write_text
from .model import VARIANTS

__all__ = ["toc_text", "write_toc"]


def toc_text(variants: Iterable[str]) -> str:
    """The ``_toc.yml`` (Jupyter Book 1, ``jb-book`` format) for a build of ``variants``."""
    variants = list(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    sections = "".join(
        f'          - file: executed/train/{v}\n            title: "Training {v}"\n'
        for v in VARIANTS
        if v in variants
    )
    return (
        "# Written by `make book` (resemul_core.book.write_toc); edit that function instead.\n"
        "format: jb-book\n"
        "root: intro\n"
        "parts:\n"
        "  - caption: Walking through the paper\n"
        "    chapters:\n"
        "      - file: executed/01_data\n"
        "      - file: training\n"
        + ("        sections:\n" + sections if sections else "")
        + "      - file: executed/03_evaluate\n"
        "      - file: executed/04_excitations\n"
        "  - caption: Using the library\n"
        "    chapters:\n"
        "      - file: reproduce\n"
        "      - file: keras_weights\n"
        "      - file: api\n"
        "      - file: references\n"
    )


def write_toc(path: str | os.PathLike, variants: Iterable[str]) -> None:
    """Atomically write :func:`toc_text` to ``path`` (``book/_toc.yml``)."""
    write_text(path, toc_text(variants))
