"""The README's Python examples run as written.

Every ```python block of README.md is executed, in order, in a folder laid out as the README
assumes after its commands have run: a segment store in ``data/synth-store``, a finished run of
se-multi in ``runs/se-multi`` and a ``song.mp3``. The store and the run are small (4-block
models), so the blocks run in seconds, but they are made by the real code path.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from resemul_core.data.store import write_store_from_arrays
from resemul_core.interfaces.pipeline import fit

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def test_the_readme_has_a_tagging_quick_start():
    blocks = python_blocks()
    assert len(blocks) >= 4
    assert any("Tagger.from_checkpoint" in b and "taggram" in b and "embed" in b for b in blocks)


@pytest.fixture
def readme_folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    length, n = 3**5, 40
    t = np.arange(2 * length) / 22_050
    labels = rng.integers(0, 2, (n, 3)).astype(np.uint8)
    waveforms = [
        (
            0.3 * np.sin(2 * np.pi * (300 + 900 * int(lab[0])) * t)
            + 0.05 * rng.standard_normal(t.size)
        )
        .reshape(2, length)
        .astype(np.float32)
        for lab in labels
    ]
    store = write_store_from_arrays(
        tmp_path / "data" / "synth-store",
        waveforms=waveforms,
        labels=labels,
        splits=["train"] * 24 + ["valid"] * 8 + ["test"] * 8,
        tags=["bright", "dark", "noisy"],
    )
    fit(
        store,
        tmp_path / "runs" / "se-multi",
        variant="se-multi",
        profile="tiny",
        overrides={"device": "cpu"},
        progress=False,
    )
    song = 0.3 * np.sin(2 * np.pi * 440 * np.arange(5 * 22_050) / 22_050)
    sf.write(tmp_path / "song.mp3", song.astype(np.float32), 22_050)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_python_block_of_the_readme_runs(readme_folder):
    for number, block in enumerate(python_blocks(), start=1):
        code = compile(block, f"README.md python block {number}", "exec")
        exec(code, {"__name__": f"readme_block_{number}"})  # noqa: S102 - the README's own code
