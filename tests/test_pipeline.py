"""The one front door: `resemul train` and the book's training chapter call the same function.

The notebook's code cells are executed here in-process (papermill's run of the same cells is in
test_book.py), with :func:`resemul_core.interfaces.pipeline.fit` wrapped by a spy.
"""

import json
import os
import re
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import TEST_DEVICE

from resemul_core.interfaces import pipeline
from resemul_core.interfaces.cli import main
from resemul_core.model.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LENGTH = 3**5  # 4 blocks


def _run_notebook_cells(name: str, parameters: dict) -> dict:
    """Execute a book notebook's code cells in this process, its parameters cell replaced."""
    notebook = json.loads((ROOT / "book" / "notebooks" / f"{name}.ipynb").read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    namespace: dict = dict(parameters)
    os.environ.setdefault("MPLBACKEND", "Agg")
    for cell in code[1:]:  # code[0] holds the parameters
        source = "".join(line for line in cell["source"] if not line.startswith("%"))
        exec(compile(source, f"{name}.ipynb", "exec"), namespace)
    return namespace


def test_resemul_train_and_the_training_chapter_call_the_same_function(store_dir, tmp_path):
    settings = ["width=0.125", "seed=3", "max_steps_per_epoch=2"]
    with mock.patch.object(pipeline, "fit", wraps=pipeline.fit) as spy:
        code = main(
            ["train", "--variant", "se", "--profile", "tiny", "--data", str(store_dir)]
            + ["--out", str(tmp_path / "cli"), "--device", TEST_DEVICE, "--no-progress"]
            + [arg for s in settings for arg in ("--set", s)]
        )
        assert code == 0
        namespace = _run_notebook_cells(
            "02_train",
            {
                "variant": "se",
                "profile": "tiny",
                "overrides": " ".join(settings),
                "data": str(store_dir),
                "device": TEST_DEVICE,
                "out": str(tmp_path / "book"),
            },
        )
    assert spy.call_count == 2
    (cli_args, cli_kwargs), (book_args, book_kwargs) = spy.call_args_list
    for kwargs in (cli_kwargs, book_kwargs):
        assert kwargs["variant"] == "se" and kwargs["profile"] == "tiny"
        assert kwargs["overrides"] == {
            "width": 0.125,
            "seed": 3,
            "max_steps_per_epoch": 2,
            "device": TEST_DEVICE,
        }
    # the same settings give the same run: identical configs and bit-identical weights
    cli, book = (read_checkpoint(tmp_path / d / "best.pt") for d in ("cli", "book"))
    for key in ("model_config", "train_config", "runtime_config"):
        assert cli[key] == book[key], key
    assert cli["model_config"]["width"] == 0.125 and cli["train_config"]["seed"] == 3
    for name, tensor in cli["model_state"].items():
        assert torch.equal(tensor, book["model_state"][name]), name
    # and the chapter shows the configuration that ran, seed and device included
    shown = namespace["run"].settings()
    assert shown["train.seed"] == 3 and shown["model.width"] == 0.125
    assert shown["runtime.device (used)"] == TEST_DEVICE


def test_a_resumed_run_keeps_its_settings_and_takes_new_runtime_ones(store_dir, tmp_path):
    first = pipeline.fit(
        store_dir,
        tmp_path / "run",
        variant="basic",
        profile="tiny",
        overrides={"device": TEST_DEVICE, "max_steps_per_epoch": 2},
        max_steps=3,
        progress=False,
    )
    assert not first.result.finished
    # no variant, no profile: the saved configuration, with the runtime override applied
    again = pipeline.fit(
        store_dir, tmp_path / "run", overrides={"checkpoint_every": 2}, progress=False
    )
    assert again.result.finished
    assert again.config.model == first.config.model and again.config.train == first.config.train
    assert again.config.runtime.checkpoint_every == 2
    with pytest.raises(ValueError, match="configured differently: train.seed"):
        pipeline.fit(store_dir, tmp_path / "run", overrides={"seed": 5}, progress=False)


def test_a_fresh_run_needs_a_variant_and_unknown_names_stop_before_the_data_is_read(tmp_path):
    with pytest.raises(ValueError, match="needs a variant"):
        pipeline.fit(tmp_path / "missing-store", tmp_path / "run")
    with pytest.raises(ValueError, match="unknown variant 'rese3'; valid variants: basic"):
        pipeline.fit(tmp_path / "missing-store", tmp_path / "run", variant="rese3")
    with pytest.raises(ValueError, match="unknown profile 'fast'; valid profiles: paper"):
        pipeline.fit(tmp_path / "missing-store", tmp_path / "run", variant="se", profile="fast")


def test_make_book_passes_width_and_seed_to_the_training_chapter():
    """``make book WIDTH=... SEED=...`` hands the settings, unchanged, to the notebook that calls
    :func:`pipeline.fit`, and trains them into their own run folder."""
    dry = subprocess.run(
        ["make", "-n", "--no-print-directory", "book", "WIDTH=0.125", "SEED=3", "VARIANTS=se"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert 'dir=runs/demo-synth-width0.125-seed3/$v; extra="width=0.125 seed=3"' in dry
    assert '-p overrides "$extra"' in dry and "-p out ../../$dir" in dry
    assert "OMP_NUM_THREADS=" in dry  # each training job gets its share of the cores
    plain = subprocess.run(
        ["make", "-n", "--no-print-directory", "book", "VARIANTS=se", "SEEDS="],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert 'dir=runs/demo-synth/$v; extra=""' in plain
    # the excitation chapter analyses a longer run of its own with the demo profile ...
    assert "-p profile demo-excitations" in plain
    assert "-p run ../../runs/demo-excitations-synth/se-multi" in plain
    assert "book/toc.py --excitation-run se-multi se" in plain
    # ... and the comparison's run with any other profile
    tiny = _make_book("VARIANTS=se", "PROFILE=tiny", "SEEDS=").stdout
    assert "-p run ../../runs/tiny-synth/se-multi" in tiny and "demo-excitations" not in tiny
    # by default every variant is trained from two seeds
    default = _make_book("VARIANTS=se").stdout
    assert "-j2 train-job/0/se train-job/1/se train-job/excitation-run" in default
    assert "-p runs ../../runs/demo-synth-seeds0-1 " in default


def _make_book(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-n", "--no-print-directory", "book", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def _training_calls(*args: str) -> list[str]:
    """The papermill calls of ``make book``'s training jobs, with ``echo`` standing in for
    papermill: each job's shell snippet, as ``make -n`` prints it, is run by ``sh``."""
    dry = _make_book(*args).stdout
    jobs = re.search(r"make --no-print-directory -j\d+ (.*)", dry).group(1).split()
    calls = []
    for job in jobs:
        snippet = subprocess.run(
            ["make", "-n", "--no-print-directory", job, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.replace(".venv/bin/papermill", "echo papermill")
        out = subprocess.run(["sh", "-c", snippet], capture_output=True, text=True, check=True)
        calls += [line for line in out.stdout.splitlines() if line.startswith(("papermill", "OMP"))]
    return calls


def test_make_book_trains_every_variant_per_seed_and_compares_the_seeds():
    """``make book SEEDS="0 1"``: one run per seed and variant under ``RUNS/seed<N>``, the first
    seed's training pages in the book, the evaluation reading every seed, the excitation
    chapter the first seed's model (without its own run); two jobs at a time, one thread each
    on this 2-core layout."""
    args = ("VARIANTS=se basic", "SEEDS=0 1", "WIDTH=0.125", "EXCITATION_PROFILE=", "THREADS=1")
    dry = _make_book(*args).stdout
    assert "make --no-print-directory -j2 train-job/0/se train-job/0/basic train-job/1/se" in dry
    assert "-p runs ../../runs/demo-synth-width0.125-seeds0-1 " in dry
    assert "-p run ../../runs/demo-synth-width0.125-seeds0-1/seed0/se-multi" in dry
    calls = _training_calls(*args)
    assert len(calls) == 4
    assert "book/executed/train/se.ipynb -p variant se" in calls[0]
    assert "-p overrides width=0.125 seed=0" in calls[0]
    assert "-p out ../../runs/demo-synth-width0.125-seeds0-1/seed0/se" in calls[0]
    assert "book/executed/train/seeds/basic-seed1.ipynb -p variant basic" in calls[3]
    assert "-p overrides width=0.125 seed=1" in calls[3]
    one = _training_calls("VARIANTS=se", "JOBS=1", "SEEDS=")
    assert "-p profile demo-excitations" in one[-1] and len(one) == 2
    single = _make_book("VARIANTS=se", "JOBS=1", "SEEDS=").stdout
    assert "-j1 train-job/-/se train-job/excitation-run" in single
    # run for real: the check stops the build before any notebook runs
    both = subprocess.run(
        ["make", "--no-print-directory", "book", "VARIANTS=se", "SEEDS=0 1", "SEED=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert both.returncode == 2
    assert "give SEED (one run per variant) or SEEDS (several), not both" in both.stdout
