"""Fine-tuning (resemul_core.training.init_from): a run that starts from a trained model,
re-headed for a table dataset's tags, with frozen blocks, resumed exactly, from the CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import TEST_DEVICE, pinned_config

import resemul_core.training.state as state_mod
from resemul_core.data.store import SegmentStore, write_store_from_arrays
from resemul_core.interfaces.cli import main as cli_main
from resemul_core.interfaces.pipeline import fit, prepare
from resemul_core.model.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from resemul_core.model.sample_cnn import SampleCNN
from resemul_core.profiles import parse_overrides, resolve_config
from resemul_core.training.init_from import load_initial_weights
from resemul_core.training.loop import train

RATE = 22_050
LENGTH = 3**5  # segment length of a 4-block model
SEGMENTS = 4  # per clip
PRE_TAGS = ["700 Hz", "5500 Hz", "noise"]  # what the pretrained model predicts
NEW_TONES = {"high": 4000.0, "low": 1000.0}  # the table's tags (sorted, as read_table has them)


def clip(rng: np.random.Generator, tones: list[float], noise: bool = False) -> np.ndarray:
    """``SEGMENTS * LENGTH`` samples: faint noise, a sine per tone, loud noise if asked."""
    t = np.arange(SEGMENTS * LENGTH) / RATE
    x = 0.02 * rng.standard_normal(t.size)
    for hz in tones:
        x += 0.4 * np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi))
    if noise:
        x += 0.3 * rng.standard_normal(t.size)
    return np.clip(x, -1, 1).astype(np.float32)


def tiny(variant: str = "basic", *, num_tags: int, **overrides):
    """The tiny profile on the test device, for a store of ``num_tags`` tags."""
    return pinned_config(variant, "tiny", overrides, num_tags=num_tags, segment_length=LENGTH)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A run of basic trained on 3 tags (two tones and noise): its directory."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (64, len(PRE_TAGS)))
    waves = [
        clip(rng, [hz for hz, on in zip((700, 5500), lab[:2], strict=True) if on], bool(lab[2]))
        for lab in labels
    ]
    root = tmp_path_factory.mktemp("pretrain")
    store = write_store_from_arrays(
        root / "store",
        waveforms=[w.reshape(SEGMENTS, LENGTH) for w in waves],
        labels=labels,
        splits=["train"] * 48 + ["valid"] * 8 + ["test"] * 8,
        tags=PRE_TAGS,
    )
    config = tiny(num_tags=3, num_stages=1, max_epochs_per_stage=3, max_steps_per_epoch=None)
    train(store, root / "run", config, progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def table_store(tmp_path_factory) -> SegmentStore:
    """A table dataset of 2 tags tied to tone frequency (1 kHz "low", 4 kHz "high"): WAV
    files and a CSV, prepared by ``resemul data prepare --dataset table``'s code."""
    root = tmp_path_factory.mktemp("table")
    rng = np.random.default_rng(1)
    rows = []
    for i, split in enumerate(["train"] * 40 + ["valid"] * 8 + ["test"] * 8):
        tags = [tag for tag in NEW_TONES if rng.random() < 0.5]
        sf.write(root / f"song{i}.wav", clip(rng, [NEW_TONES[t] for t in tags]), RATE)
        rows.append({"path": f"song{i}.wav", "split": split, "tags": ";".join(tags)})
    with (root / "songs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "split", "tags"])
        writer.writeheader()
        writer.writerows(rows)
    audio = {"sample_rate": RATE, "segment_length": LENGTH, "segments_per_clip": SEGMENTS}
    store = prepare(
        "table", root / "songs.csv", root / "store", audio=audio, workers=1, progress=False
    )
    assert store.tags == sorted(NEW_TONES)
    return store


def body(state: dict) -> dict:
    """The stem's and the blocks' tensors of a state dict."""
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


def initial_weights(monkeypatch) -> list[dict]:
    """A list that receives the weights the run's first optimizer is built for (its start)."""
    first_model: list[dict] = []
    real_build = state_mod.build_optimizer

    def spy(model, config, *, stage):
        if not first_model:
            first_model.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_build(model, config, stage=stage)

    monkeypatch.setattr(state_mod, "build_optimizer", spy)
    return first_model


def read_log(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "log.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


# --- settings ---------------------------------------------------------------------------------


def test_the_settings_parse_and_refuse_what_makes_no_sense(tmp_path):
    parsed = parse_overrides(["init_from=runs/se-multi", "freeze_blocks=2"])
    assert parsed == {"init_from": "runs/se-multi", "freeze_blocks": 2}
    assert parse_overrides(["init_from=none"]) == {"init_from": None}
    config = resolve_config(
        "basic",
        "tiny",
        {"init_from": tmp_path / "pre.pt", "freeze_blocks": 4},
        num_tags=2,
        segment_length=LENGTH,
    )
    assert config.train.init_from == str(tmp_path / "pre.pt")  # a Path is kept as plain text
    with pytest.raises(ValueError, match="freeze_blocks=2 needs init_from: frozen blocks would"):
        resolve_config("basic", "tiny", {"freeze_blocks": 2})
    with pytest.raises(ValueError, match=r"freeze_blocks=5 is more than the model's 4 blocks"):
        resolve_config(
            "basic",
            "tiny",
            {"init_from": "x.pt", "freeze_blocks": 5},
            num_tags=2,
            segment_length=LENGTH,
        )
    with pytest.raises(ValueError, match="freeze_blocks must be >= 0"):
        resolve_config("basic", "tiny", {"init_from": "x.pt", "freeze_blocks": -1})


# --- loading ----------------------------------------------------------------------------------


def test_finetuning_reheads_the_model_and_learns_the_new_tags(
    pretrained, table_store, tmp_path, monkeypatch
):
    first_model = initial_weights(monkeypatch)
    run = fit(
        table_store,
        tmp_path / "run",
        variant="basic",
        profile="tiny",
        progress=False,
        overrides={
            "init_from": pretrained,
            "device": TEST_DEVICE,
            "num_stages": 1,
            "max_epochs_per_stage": 4,
            "max_steps_per_epoch": None,
        },
    )
    source = read_checkpoint(pretrained / "best.pt")["model_state"]
    assert_same(body(first_model[0]), body(source))
    for key in ("head.fc1.weight", "head.bn.running_var"):  # the hidden layer fits: loaded
        assert torch.equal(first_model[0][key], source[key]), key
    assert (
        first_model[0]["head.fc2.weight"].shape[0] == 2 and source["head.fc2.weight"].shape[0] == 3
    )
    init = json.loads((tmp_path / "run" / "config.json").read_text())["init"]
    assert init["head"] == "re-made" and (init["source_tags"], init["tags"]) == (3, 2)
    assert init["reinitialised"] == ["head.fc2.weight", "head.fc2.bias"]
    assert init["loaded"] == len(source) - 2 and len(init["sha256"]) == 64
    assert init["source"] == str((pretrained / "best.pt").absolute())
    model, payload = load_checkpoint(run.result.best_checkpoint)
    assert model.head.fc2.out_features == 2 and payload["tags"] == ["high", "low"]
    assert payload["init"] == init  # every checkpoint carries the provenance
    losses = [float(row["train_loss"]) for row in read_log(tmp_path / "run")]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses


def test_frozen_blocks_keep_their_weights_and_statistics(pretrained, table_store, tmp_path):
    config = tiny(num_tags=2, init_from=str(pretrained), freeze_blocks=2, max_epochs_per_stage=2)
    result = train(table_store, tmp_path / "run", config, progress=False)
    assert result.finished and result.config.train.freeze_blocks == 2
    source = read_checkpoint(pretrained / "best.pt")["model_state"]
    frozen = ("stem.", "blocks.0.", "blocks.1.")
    for name in ("best.pt", "last.pt"):  # after the stage change too (it reloads best.pt)
        saved = read_checkpoint(tmp_path / "run" / name)["model_state"]
        assert saved["blocks.1.bn.num_batches_tracked"] == source["blocks.1.bn.num_batches_tracked"]
        assert_same(
            {k: v for k, v in saved.items() if k.startswith(frozen)},
            {k: v for k, v in source.items() if k.startswith(frozen)},
        )
        for key in ("blocks.2.conv.weight", "blocks.3.bn.running_mean", "blocks.2.bn.weight"):
            assert not torch.equal(saved[key], source[key]), (name, key)
    # SGD kept no momentum for the frozen parameters: they never had a gradient
    last = read_checkpoint(tmp_path / "run" / "last.pt")
    names = list(dict(SampleCNN(config.model).named_parameters()))
    with_momentum = {names[i] for i in last["optimizer_state"]["state"]}
    assert with_momentum == {n for n in names if not n.startswith(frozen)}
    assert last["init"]["frozen_blocks"] == 2


def test_the_same_tags_in_another_order_reorder_the_output_rows(pretrained):
    source, payload = load_checkpoint(pretrained / "best.pt")
    tags = ["noise", "700 Hz", "5500 Hz"]
    model = SampleCNN(source.config)
    report = load_initial_weights(model, pretrained, tags=tags)
    assert report.head == "reordered" and report.reinitialised == ()
    assert "reordered" in report.summary()
    x = torch.from_numpy(
        np.stack([clip(np.random.default_rng(i), [700])[:LENGTH] for i in range(4)])
    )
    with torch.no_grad():
        want, got = source.eval()(x), model.eval()(x)
    for i, tag in enumerate(tags):
        assert torch.equal(got[:, i], want[:, payload["tags"].index(tag)]), tag
    same = SampleCNN(source.config)
    assert load_initial_weights(same, pretrained / "best.pt", tags=PRE_TAGS).head == "loaded"
    assert_same(same.state_dict(), source.state_dict())


def test_another_head_is_re_made_but_another_body_is_refused(pretrained, table_store, tmp_path):
    multi = SampleCNN(tiny("basic-multi", num_tags=2).model)
    report = load_initial_weights(multi, pretrained, tags=["high", "low"])
    assert report.head == "re-made" and "head.fc1.weight" in report.reinitialised
    assert "reads other features" in report.summary()
    wider = tiny(num_tags=2, init_from=str(pretrained), width=0.125)
    with pytest.raises(
        CheckpointError,
        match=r"stem.conv.weight has shape \(8, 1, 3\) there, \(16, 1, 3\) here; "
        r"train with --width 0.0625 to start from it",
    ):
        train(table_store, tmp_path / "wide", wider, progress=False)
    with pytest.raises(
        CheckpointError,
        match=r"blocks\.0\.se\.\S+ of shape .* is not in it; "
        r"train with --variant basic",
    ):
        train(
            table_store,
            tmp_path / "se",
            tiny("se", num_tags=2, init_from=str(pretrained)),
            progress=False,
        )
    assert not (tmp_path / "wide").exists() and not (tmp_path / "se").exists()
    with pytest.raises(ValueError, match="from its own checkpoint .*best.pt: a fresh run replaces"):
        own = tiny(num_tags=2, init_from=str(pretrained))
        train(table_store, pretrained, own, overwrite=True, progress=False)
    assert (pretrained / "best.pt").is_file()
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        train(
            table_store,
            tmp_path / "gone",
            tiny(num_tags=2, init_from=str(tmp_path / "missing.pt")),
            progress=False,
        )


# --- resume -----------------------------------------------------------------------------------

SHORT = {
    "num_stages": 2,
    "max_epochs_per_stage": 2,
    "max_steps_per_epoch": 4,
    "checkpoint_every": 3,
}


def test_a_resumed_finetuning_is_exact_without_its_init_file(pretrained, table_store, tmp_path):
    init = tmp_path / "pre.pt"
    shutil.copy(pretrained / "best.pt", init)
    config = tiny(num_tags=2, init_from=str(init), freeze_blocks=1, **SHORT)
    reference = train(table_store, tmp_path / "reference", config, progress=False)
    run = tmp_path / "run"
    first = train(table_store, run, config, max_steps=5, progress=False)
    assert not first.finished
    started = read_checkpoint(run / "last.pt")["init"]
    init.unlink()  # no longer needed: the weights come from last.pt
    other = tiny(num_tags=2, init_from=str(pretrained), freeze_blocks=1, **SHORT)
    with pytest.raises(CheckpointError, match=r"train.init_from \('.*pre.pt' -> '.*run'\)"):
        train(table_store, run, other, resume=True, progress=False)
    final = train(table_store, run, config, resume=True, progress=False)
    assert final.finished and final.global_step == reference.global_step == 16
    for name in ("best.pt", "last.pt"):
        got, want = read_checkpoint(run / name), read_checkpoint(reference.run_dir / name)
        assert_same(got["model_state"], want["model_state"])
        assert got["init"] == started
    columns = ("epoch", "stage", "train_loss", "val_loss", "improved", "global_step")
    assert [[r[c] for c in columns] for r in read_log(run)] == [
        [r[c] for c in columns] for r in read_log(reference.run_dir)
    ]


# --- command line -----------------------------------------------------------------------------


def test_train_init_from_on_the_command_line(pretrained, table_store, tmp_path, capsys):
    init = tmp_path / "pre.pt"
    shutil.copy(pretrained / "best.pt", init)
    out = tmp_path / "run"
    command = [
        "train",
        "--variant",
        "basic",
        "--data",
        str(table_store.path),
        "--out",
        str(out),
        "--init-from",
        str(init),
        "--freeze-blocks",
        "1",
        "--profile",
        "tiny",
        "--device",
        TEST_DEVICE,
        "--set",
        "num_stages=1",
        "--set",
        "max_epochs_per_stage=2",
        "--no-progress",
    ]
    assert cli_main([*command, "--max-steps", "12"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["init"]["frozen_blocks"] == 1 and saved["init"]["source"] == str(init.absolute())
    assert saved["train_config"]["init_from"] == str(init)
    init.unlink()  # the same command continues the run: the file is not needed any more
    assert cli_main(command) == 0
    assert "finished" in capsys.readouterr().out
    missing = tmp_path / "missing.pt"
    command[command.index(str(init))] = str(missing)
    command[command.index(str(out))] = str(tmp_path / "other")
    assert cli_main(command) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(missing) in err and "does not exist" in err
    assert not (tmp_path / "other").exists()


def test_finetuning_starts_from_the_authors_keras_file(table_store, tmp_path, monkeypatch):
    """``--init-from file.hdf5``: the Keras weights are converted (as the run's variant and
    size), cached, and start the run; the 50-tag head is re-made for the table's 2 tags."""
    from test_keras_import import build_official, write_keras

    from resemul_core.model.keras_import import import_keras

    monkeypatch.setenv("RESEMUL_CACHE", str(tmp_path / "cache"))
    keras_file = tmp_path / "se-multi-auc_0.9111-tfrmodel.hdf5"
    sizes = {"width": 1 / 16, "num_blocks": 4, "alpha": 16}
    write_keras(keras_file, build_official("se-multi", np.random.default_rng(3), **sizes))
    first_model = initial_weights(monkeypatch)
    fit(
        table_store,
        tmp_path / "run",
        variant="se-multi",
        profile="tiny",
        progress=False,
        max_steps=2,
        overrides={"init_from": keras_file, "device": TEST_DEVICE},
    )
    keras = import_keras(keras_file, variant="se-multi", **sizes).state_dict()
    assert_same(body(first_model[0]), body(keras))
    assert torch.equal(first_model[0]["head.fc1.weight"], keras["head.fc1.weight"])
    init = json.loads((tmp_path / "run" / "config.json").read_text())["init"]
    assert init["head"] == "re-made" and (init["source_tags"], init["tags"]) == (50, 2)
    assert list((tmp_path / "cache" / "keras").glob("*-se-multi-*.pt"))  # converted once, kept
