"""MagnaTagATune's split rule, in one place: a clip's split is that of its mp3 folder.

Public: :data:`MTAT_SPLIT_OF_FOLDER`, :func:`mtat_split`, :func:`mtat_folders`.

MTAT's audio lies in sixteen folders ``0``..``f``; the official code (and Lee et al.'s split)
assigns folders 0-b to train, c to valid and d-f to test. The real reader
(:func:`resemul_core.data.sources.read_mtat`) and both synthetic generators
(:mod:`resemul_core.data.synth`, :mod:`resemul_core.data.synth_release`) use this module, so
the rule cannot drift between the data and its stand-ins. No dependencies beyond the standard
library: the generators' worker processes import it cheaply.
"""

from __future__ import annotations

__all__ = ["MTAT_SPLIT_OF_FOLDER", "mtat_folders", "mtat_split"]

#: Split of each MTAT mp3 folder (the first character of ``mp3_path``), in folder order 0..f.
MTAT_SPLIT_OF_FOLDER: dict[str, str] = {
    **dict.fromkeys("0123456789ab", "train"),
    "c": "valid",
    **dict.fromkeys("def", "test"),
}


def mtat_split(mp3_path: str) -> str:
    """The split of an MTAT clip from its ``mp3_path`` (relative to ``mp3/``), e.g.
    ``"c/artist-album-01-title-0-29.mp3"`` -> ``"valid"``.

    Raises:
        ValueError: the path does not start with a folder 0-9 or a-f (either case).
    """
    split = MTAT_SPLIT_OF_FOLDER.get(mp3_path.strip()[:1].lower())
    if split is None:
        raise ValueError(f"mp3_path {mp3_path!r} does not start with a folder 0-9 or a-f")
    return split


def mtat_folders(split: str) -> str:
    """The folders of ``split``, in order: ``"0123456789ab"``, ``"c"`` or ``"def"``."""
    folders = "".join(f for f, s in MTAT_SPLIT_OF_FOLDER.items() if s == split)
    if not folders:
        raise ValueError(f"unknown split {split!r}; MTAT has train, valid and test")
    return folders
