"""Tests of resemul_core.training.loop: schedule, learning, exact resume, checkpoint safety."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEST_DETERMINISTIC, TEST_DEVICE, pinned_config

import resemul_core.training.loop as train_mod
import resemul_core.training.rng as rng_mod
import resemul_core.training.state as state_mod
from resemul_core import runtime
from resemul_core.analysis.evaluate import evaluate_checkpoint
from resemul_core.config import (
    ModelConfig,
    RunConfig,
    RuntimeConfig,
    TrainConfig,
    model_config,
)
from resemul_core.data.store import write_store_from_arrays
from resemul_core.interfaces.cli import main as cli_main
from resemul_core.interfaces.pipeline import fit
from resemul_core.model.checkpoint import CheckpointError, read_checkpoint, save_payload
from resemul_core.model.sample_cnn import SampleCNN
from resemul_core.profiles import PROFILES, apply_overrides, resolve_config
from resemul_core.training.loop import train
from resemul_core.training.schedule import (
    StageState,
    build_optimizer,
    decayed_learning_rate,
    epoch_batches,
    stage_learning_rate,
    steps_per_epoch,
    update_stage,
)
from resemul_core.training.state import TrainingDiverged, saved_run_config

LENGTH = 3**5  # segment length of a 4-block model
TAGS = ["low tone", "high tone", "noise"]


def tiny(variant: str = "basic", **overrides) -> RunConfig:
    """The tiny profile's run of ``variant`` on the toy store, on the test device."""
    return pinned_config(variant, "tiny", overrides, num_tags=len(TAGS), segment_length=LENGTH)


def make_toy_store(path: Path, *, clips=(48, 16, 16), segments: int = 4, seed: int = 0):
    """A learnable toy task: tags = a 700 Hz tone, a 5.5 kHz tone, loud white noise."""
    rng = np.random.default_rng(seed)
    n = sum(clips)
    labels = rng.integers(0, 2, (n, len(TAGS)))
    t = np.arange(segments * LENGTH) / 22_050
    waveforms = []
    for lab in labels:
        x = 0.02 * rng.standard_normal(t.size)
        if lab[0]:
            x += 0.4 * np.sin(2 * np.pi * 700 * t + rng.uniform(0, 2 * np.pi))
        if lab[1]:
            x += 0.4 * np.sin(2 * np.pi * 5500 * t + rng.uniform(0, 2 * np.pi))
        if lab[2]:
            x += 0.3 * rng.standard_normal(t.size)
        waveforms.append(np.clip(x, -1, 1).reshape(segments, LENGTH).astype(np.float32))
    splits = ["train"] * clips[0] + ["valid"] * clips[1] + ["test"] * clips[2]
    return write_store_from_arrays(
        path, waveforms=waveforms, labels=labels, splits=splits, tags=TAGS
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_toy_store(tmp_path_factory.mktemp("data") / "toy")


def read_log(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "log.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- pure schedule functions ----------------------------------------------------------------


def test_update_stage_stops_at_third_epoch_without_improvement():
    state = StageState()
    outcomes = []
    for epoch, loss in enumerate([1.0, 0.8, 0.8, 0.9, 0.7, 0.75, 0.71, 0.72]):
        state, improved, over = update_stage(state, loss, epoch=epoch, patience=2, max_epochs=100)
        outcomes.append((improved, over))
    # an equal loss is no improvement (min_delta 0); improvement at epoch 4 resets the count
    assert outcomes == [
        (True, False),
        (True, False),
        (False, False),
        (False, False),
        (True, False),
        (False, False),
        (False, False),
        (False, True),
    ]
    assert (state.best_loss, state.best_epoch, state.epochs) == (0.7, 4, 8)


def test_update_stage_patience_zero_and_epoch_cap():
    state, improved, over = update_stage(StageState(), 1.0, epoch=0, patience=0, max_epochs=9)
    assert improved and not over
    # Keras checks wait >= patience before incrementing: patience 0 stops at the first bad epoch
    assert update_stage(state, 2.0, epoch=1, patience=0, max_epochs=9).stage_over
    capped = update_stage(StageState(epochs=2), 0.5, epoch=7, patience=2, max_epochs=3)
    assert capped.improved and capped.stage_over


def test_update_stage_nan_never_improves():
    state = StageState(best_loss=1.0, best_epoch=0, epochs=1)
    assert not update_stage(state, math.nan, epoch=1, patience=2, max_epochs=100).improved


def test_learning_rates_follow_the_paper():
    config = TrainConfig()
    lrs = [stage_learning_rate(config, s) for s in range(config.num_stages)]
    assert lrs == pytest.approx([0.01, 0.002, 4e-4, 8e-5, 1.6e-5])
    assert decayed_learning_rate(0.01, 0, decay=1e-6) == 0.01
    assert decayed_learning_rate(0.01, 1_000_000, decay=1e-6) == pytest.approx(0.005)
    assert steps_per_epoch(152_500, config) == 6_631  # MTAT, specification §3
    assert steps_per_epoch(152_500, dataclasses.replace(config, max_steps_per_epoch=60)) == 60


def test_epoch_batches_reproducible_full_and_covering():
    a = epoch_batches(100, batch_size=23, num_steps=5, seed=3, epoch=7)
    assert a.shape == (5, 23)
    assert np.array_equal(a, epoch_batches(100, batch_size=23, num_steps=5, seed=3, epoch=7))
    assert not np.array_equal(a, epoch_batches(100, batch_size=23, num_steps=5, seed=3, epoch=8))
    assert sorted(a.ravel()[:100]) == list(range(100))  # one permutation ...
    assert np.array_equal(a.ravel()[100:], a.ravel()[:15])  # ... whose start fills the last batch
    small = epoch_batches(10, batch_size=23, num_steps=2, seed=0, epoch=0)
    assert set(small.ravel()) == set(range(10))


def test_profiles_change_sizes_not_the_algorithm():
    """Profiles change sizes and budgets; the CPU demo profiles also the first stage's learning
    rate (their 720-1,080 steps leave the paper's 0.01 far from converged; Profile's Note),
    and nothing else of the recipe."""
    algorithm = ("lr_factor", "momentum", "nesterov", "lr_decay", "patience")
    algorithm += ("weight_decay", "batch_size")
    faster = {"demo": 0.04, "demo-excitations": 0.1}
    for profile in PROFILES.values():
        rate = resolve_config("basic", profile.name).train.learning_rate
        assert rate == faster.get(profile.name, 0.01), profile.name
    paper = resolve_config("basic", "paper")
    assert paper.train.num_stages == 5 and paper.train.max_epochs_per_stage == 100
    assert paper.train.max_steps_per_epoch is None and paper.model.width == 1.0
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for profile in PROFILES.values():
        config = resolve_config("basic", profile.name)
        assert not set(profile.overrides) & set(algorithm), profile.name
        for name in algorithm:
            assert getattr(config.train, name) == getattr(paper.train, name), (profile.name, name)
        # sizes, and for the short runs the BN averaging horizon (see Profile's Note)
        assert set(profile.overrides) & model_fields <= {"width", "bn_momentum"}
        unsized = dataclasses.replace(
            config.model, width=paper.model.width, bn_momentum=paper.model.bn_momentum
        )
        assert unsized == paper.model, profile.name
    runtime_fields = {f.name for f in dataclasses.fields(RuntimeConfig)}
    assert "device" in runtime_fields and "learning_rate" not in runtime_fields


# --- the loop ---------------------------------------------------------------------------------


def test_tiny_model_learns_the_toy_task(store, tmp_path):
    config = tiny("basic", num_stages=1, max_epochs_per_stage=4, max_steps_per_epoch=None)
    result = train(store, tmp_path / "run", config, progress=False)
    log = read_log(tmp_path / "run")
    assert result.finished and len(log) == 4
    assert float(log[-1]["train_loss"]) < 0.8 * float(log[0]["train_loss"])
    metrics = evaluate_checkpoint(result.run_dir, store, device="cpu", progress=False)
    assert metrics["roc_auc"] > 0.8


def test_stages_restart_from_the_best_weights(store, tmp_path, monkeypatch):
    scripted = iter(
        [1.0, 0.8, 0.9, 0.85, 0.95] + [0.7, 0.6, 0.65, 0.6, 0.61] + [0.5, 0.55, 0.6, 0.6]
    )
    after_epoch: list[dict] = []  # weights the validation saw, per epoch
    at_stage_start: list[tuple[int, dict]] = []

    def fake_validation(model, *args, **kwargs):
        after_epoch.append({k: v.cpu().clone() for k, v in model.state_dict().items()})
        return next(scripted)

    real_build = state_mod.build_optimizer

    def spy_build(model, config, *, stage):
        at_stage_start.append((stage, {k: v.cpu().clone() for k, v in model.state_dict().items()}))
        return real_build(model, config, stage=stage)

    monkeypatch.setattr(train_mod, "validation_loss", fake_validation)
    monkeypatch.setattr(state_mod, "build_optimizer", spy_build)
    config = tiny("res2", num_stages=3, max_epochs_per_stage=100, max_steps_per_epoch=2)
    run = tmp_path / "run"
    result = train(store, run, config, progress=False)
    log = read_log(run)
    assert [int(r["stage"]) for r in log] == [0] * 5 + [1] * 5 + [2] * 4
    assert [int(r["improved"]) for r in log] == [1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0]
    assert [float(log[e]["lr"]) for e in (0, 5, 10)] == pytest.approx([0.01, 0.002, 4e-4], 1e-4)
    assert result.finished and result.epochs == 14 and result.best_val_loss == 0.5
    assert [s for s, _ in at_stage_start] == [0, 1, 2]
    assert_same_tensors(at_stage_start[1][1], after_epoch[1])  # stage 0's best epoch
    assert_same_tensors(at_stage_start[2][1], after_epoch[6])  # stage 1's best epoch
    best = read_checkpoint(run / "best.pt")
    assert (best["stage"], best["epoch"], best["val_loss"]) == (2, 10, 0.5)
    assert_same_tensors(best["model_state"], after_epoch[10])


def test_nan_loss_stops_naming_the_step(store, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = train_mod.bce_loss

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = real_loss(logits, targets)
        return loss * math.nan if calls["n"] == 3 else loss

    monkeypatch.setattr(train_mod, "bce_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="global step 3 "):
        train(store, tmp_path / "run", tiny("basic"), progress=False)


# --- checkpoints and resume -------------------------------------------------------------------

RESUME = {
    "num_stages": 2,
    "max_epochs_per_stage": 2,
    "max_steps_per_epoch": 4,
    "checkpoint_every": 3,
}


def resume_config(variant: str, **overrides) -> RunConfig:
    """The tiny profile shortened to 2 stages of 2 epochs of 4 steps, checkpoints every 3."""
    return tiny(variant, **{**RESUME, **overrides})


@pytest.fixture(scope="module")
def reference_run(store, tmp_path_factory):
    """An uninterrupted run with dropout in the blocks and the head."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(store, run, resume_config("res2-multi"), progress=False)
    return run


def assert_same_run(run: Path, reference: Path) -> None:
    for name in ("best.pt", "last.pt"):
        got, want = read_checkpoint(run / name), read_checkpoint(reference / name)
        assert_same_tensors(got["model_state"], want["model_state"])
    got = read_checkpoint(run / "last.pt")["optimizer_state"]["state"]
    want = read_checkpoint(reference / "last.pt")["optimizer_state"]["state"]
    for k in want:
        assert torch.equal(got[k]["momentum_buffer"], want[k]["momentum_buffer"])
    columns = ("epoch", "stage", "train_loss", "val_loss", "improved", "global_step")
    assert [[r[c] for c in columns] for r in read_log(run)] == [
        [r[c] for c in columns] for r in read_log(reference)
    ]


def test_stop_and_resume_gives_identical_weights(store, tmp_path, reference_run):
    run = tmp_path / "run"
    first = train(store, run, resume_config("res2-multi"), max_steps=5, progress=False)
    assert not first.finished and first.global_step == 5
    saved = torch.load(run / "last.pt", weights_only=True)
    assert saved["progress"]["epoch"] == 1 and saved["progress"]["step"] == 1
    assert isinstance(saved["rng"]["numpy"][1], list)
    train(store, run, resume=True, max_steps=6, progress=False)  # stops within stage 1
    final = train(store, run, resume=True, progress=False)
    assert final.finished and final.global_step == 16
    assert_same_run(run, reference_run)
    again = train(store, run, resume=True, progress=False)  # a finished run stays finished
    assert again.finished and again.global_step == 16


def test_sigkill_then_resume_gives_identical_weights(store, tmp_path, reference_run):
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "resemul_core.interfaces.cli",
        "train",
        "--variant",
        "res2-multi",
        "--data",
        str(store.path),
        "--out",
        str(run),
        "--profile",
        "tiny",
        "--set",
        "num_stages=2",
        "--set",
        "max_epochs_per_stage=2",
        "--set",
        "max_steps_per_epoch=4",
        "--set",
        "checkpoint_every=1",
        "--device",
        TEST_DEVICE,
        *(["--set", "deterministic=true"] if TEST_DETERMINISTIC else []),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (run / "last.pt").exists():
                with_steps = read_checkpoint(run / "last.pt")["progress"]["global_step"]
                if with_steps >= 3:
                    break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    killed_at = read_checkpoint(run / "last.pt")["progress"]["global_step"]
    assert 3 <= killed_at < 16
    resumed = train(store, run, resume_config("res2-multi"), resume=True, progress=False)
    assert resumed.config == resume_config("res2-multi")  # checkpoint_every 1 -> 3 may change
    assert_same_run(run, reference_run)


def test_corrupted_checkpoint_is_refused_and_kept(store, tmp_path):
    run = tmp_path / "run"
    train(store, run, resume_config("basic"), max_steps=6, progress=False)
    best_bytes = (run / "best.pt").read_bytes()
    corrupt = (run / "last.pt").read_bytes()[:1000]
    (run / "last.pt").write_bytes(corrupt)
    with pytest.raises(CheckpointError, match="last.pt"):
        train(store, run, resume=True, progress=False)
    assert (run / "last.pt").read_bytes() == corrupt
    assert (run / "best.pt").read_bytes() == best_bytes


def test_mismatched_resume_is_refused(store, tmp_path):
    run = tmp_path / "run"
    config = resume_config("basic")
    train(store, run, config, max_steps=2, progress=False)
    before = (run / "last.pt").read_bytes()
    other = make_toy_store(tmp_path / "other", seed=1)
    with pytest.raises(CheckpointError, match="fingerprint"):
        train(other, run, resume=True, progress=False)
    with pytest.raises(
        CheckpointError, match=r"configured differently: train\.learning_rate \(0\.01 -> 0\.1\)"
    ):
        train(store, run, resume_config("basic", learning_rate=0.1), resume=True, progress=False)
    with pytest.raises(
        CheckpointError, match=r"the run was configured differently: train\.seed \(0 -> 4\)"
    ):
        train(store, run, resume_config("basic", seed=4), resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"model\.width \(0\.0625 -> 0\.125\)"):
        train(store, run, resume_config("basic", width=0.125), resume=True, progress=False)
    with pytest.raises(CheckpointError, match="it trains 'basic', not 'se'"):
        train(store, run, resume_config("se"), resume=True, progress=False)
    assert (run / "last.pt").read_bytes() == before
    # runtime fields may change on resume, and the resumed run uses them
    runtime = apply_overrides(config, {"checkpoint_every": 2, "num_workers": 1})
    result = train(store, run, runtime, resume=True, progress=False)
    assert result.finished and result.config == runtime
    assert saved_run_config(run) == runtime


def test_fresh_run_refuses_an_existing_run(store, tmp_path):
    run = tmp_path / "run"
    config = resume_config("basic")
    train(store, run, config, max_steps=1, progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(store, run, config)
    result = train(store, run, config, overwrite=True, max_steps=1, progress=False)
    assert result.global_step == 1


def test_the_model_must_fit_the_store(store, tmp_path):
    # a config resolved without the store's facts: 9 blocks and 50 tags unless told otherwise
    five_blocks = apply_overrides(tiny("basic"), {"num_blocks": 5})
    with pytest.raises(ValueError, match="243 samples"):
        train(store, tmp_path / "run", five_blocks)
    fifty_tags = apply_overrides(tiny("basic"), {"num_tags": 50})
    with pytest.raises(ValueError, match="has 3 tags but the model predicts 50"):
        train(store, tmp_path / "run", fifty_tags)
    with pytest.raises(ValueError, match="needs a config"):
        train(store, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_overrides_that_contradict_the_store_are_refused(store, tmp_path, capsys):
    """A num_tags or num_blocks the store does not have is an error, not silently replaced."""
    run = tmp_path / "run"
    with pytest.raises(
        ValueError, match="num_tags=50 was asked for, but the data gives num_tags=3"
    ):
        fit(store, run, variant="basic", profile="tiny", overrides={"num_tags": 50})
    with pytest.raises(ValueError, match="num_blocks=9 was asked for, .* num_blocks=4"):
        fit(store, run, variant="basic", profile="tiny", overrides={"model.num_blocks": 9})
    base = ["train", "--data", str(store.path), "--out", str(run), "--no-progress"]
    fresh = base + ["--variant", "basic", "--profile", "tiny", "--device", "cpu"]
    assert cli_main(fresh + ["--set", "num_tags=50"]) == 2
    assert "the data gives num_tags=3" in capsys.readouterr().err
    assert not run.exists()
    # agreeing with the store is fine
    done = fit(
        store,
        run,
        variant="basic",
        profile="tiny",
        overrides={"num_tags": 3, "num_blocks": 4, "device": "cpu"},
        max_steps=1,
        progress=False,
    )
    assert done.config.model.num_tags == 3 and done.result.global_step == 1


def test_checkpoints_carry_what_inference_needs(store, tmp_path):
    run = tmp_path / "run"
    config = resume_config("se-multi")
    train(store, run, config, max_steps=5, progress=False)
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["tags"] == TAGS and best["variant"] == "se-multi"
    assert best["store_fingerprint"] == store.fingerprint
    assert best["audio"]["segment_length"] == LENGTH and best["audio"]["segments_per_clip"] == 4
    assert TrainConfig.from_dict(best["train_config"]) == config.train
    assert RuntimeConfig.from_dict(best["runtime_config"]) == config.runtime
    assert ModelConfig.from_dict(best["model_config"]) == config.model
    assert saved_run_config(run) == config


def test_cli_train_resume_and_refusal(store, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--data", str(store.path), "--out", str(run), "--no-progress"]
    fresh = base + ["--variant", "basic", "--profile", "tiny", "--device", "cpu"]
    assert cli_main(fresh + ["--max-steps", "3"]) == 0
    assert "stopped (run the same command to continue)" in capsys.readouterr().out
    before = (run / "last.pt").read_bytes()
    # a run in --out is continued, so a different recipe is refused, not started over it
    assert cli_main(fresh + ["--seed", "4"]) == 2
    err = capsys.readouterr().err
    assert "the run was configured differently: train.seed (0 -> 4)" in err
    assert cli_main(fresh + ["--set", "widht=0.5"]) == 2
    assert "unknown setting 'widht'; valid settings:" in capsys.readouterr().err
    assert (run / "last.pt").read_bytes() == before
    # --resume requires a run
    nothing = ["train", "--data", str(store.path), "--out", str(tmp_path / "none"), "--resume"]
    assert cli_main(nothing + ["--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(fresh + ["--max-steps", "1"]) == 0  # the same command continues
    assert read_checkpoint(run / "last.pt")["progress"]["global_step"] == 4
    assert "stopped" in capsys.readouterr().out
    assert cli_main(base + ["--resume", "--set", "checkpoint_every=2"]) == 0
    assert "finished" in capsys.readouterr().out
    last = read_checkpoint(run / "last.pt")
    assert last["progress"]["done"] and last["runtime_config"]["checkpoint_every"] == 2


def test_a_store_without_validation_segments_is_refused(tmp_path):
    no_valid = make_toy_store(tmp_path / "store", clips=(4, 0, 2))
    with pytest.raises(ValueError, match="'valid' split"):
        train(no_valid, tmp_path / "run", tiny("basic"))
    assert not (tmp_path / "run").exists()


# --- precision, devices, processes, compilation ------------------------------------------------


def test_precision_is_one_recorded_setting_faithful_by_default():
    paper = resolve_config("basic", "paper")
    assert TrainConfig().precision == "fp32" and paper.train.precision == "fp32"
    assert {resolve_config("basic", p).train.precision for p in ("demo", "gpu", "tiny")} == {"bf16"}
    # it changes the numbers: part of the recipe, fixed for a run
    assert "precision" not in {f.name for f in dataclasses.fields(RuntimeConfig)}
    with pytest.raises(ValueError, match="unknown precision 'fp16'; valid: fp32, tf32, bf16"):
        TrainConfig(precision="fp16")
    # checkpoints written before the setting existed (their training config also held the
    # runtime settings, some of which did not exist yet): autocast on was bf16, off was fp32
    old = {**TrainConfig().to_dict(), **RuntimeConfig(num_workers=3).to_dict()}
    del old["precision"], old["deterministic"]
    assert TrainConfig.from_dict({**old, "autocast": True}).precision == "bf16"
    assert TrainConfig.from_dict({**old, "autocast": False}) == TrainConfig()
    assert RuntimeConfig.from_dict({**old, "autocast": True}) == RuntimeConfig(num_workers=3)


def test_precision_changes_the_step_as_stated():
    """fp32 and tf32 are the same on a CPU; bf16 autocast rounds the forward pass."""
    torch.manual_seed(0)
    waveform, labels = 0.3 * torch.randn(4, LENGTH), (torch.rand(4, 3) < 0.5).float()
    losses, weights = {}, {}
    for precision in ("fp32", "tf32", "bf16"):
        torch.manual_seed(1)
        model = SampleCNN(model_config("basic", num_tags=3, num_blocks=4))
        optimizer = build_optimizer(model, TrainConfig(), stage=0)
        loss = train_mod.train_step(
            model, optimizer, waveform, labels, lr=0.01, precision=precision
        )
        losses[precision], weights[precision] = float(loss), model.state_dict()
    assert losses["fp32"] == losses["tf32"]
    assert_same_tensors(weights["fp32"], weights["tf32"])
    assert losses["bf16"] != losses["fp32"]
    assert abs(losses["bf16"] - losses["fp32"]) < 0.02  # bf16 keeps ~3 significant digits


def test_a_resume_may_not_change_the_precision(store, tmp_path):
    run = tmp_path / "run"
    train(store, run, resume_config("basic", precision="fp32"), max_steps=2, progress=False)
    assert read_checkpoint(run / "last.pt")["train_config"]["precision"] == "fp32"
    with pytest.raises(CheckpointError, match=r"train\.precision \('fp32' -> 'bf16'\)"):
        train(store, run, resume_config("basic"), resume=True, progress=False)


def test_only_the_run_devices_cuda_rng_state_is_restored():
    states = [torch.full((4,), k, dtype=torch.uint8) for k in range(3)]
    cuda = torch.device
    assert rng_mod.saved_cuda_rng_state(states, cuda("cpu")) is None
    assert rng_mod.saved_cuda_rng_state([], cuda("cuda", 0)) is None  # a CPU run, on a GPU
    assert rng_mod.saved_cuda_rng_state(states[2:], cuda("cuda", 1)) is states[2]
    # per-GPU lists of earlier versions: the device's own entry, or the first when it is gone
    assert rng_mod.saved_cuda_rng_state(states, cuda("cuda", 1)) is states[1]
    assert rng_mod.saved_cuda_rng_state(states[:2], cuda("cuda", 5)) is states[0]


def test_a_checkpoint_with_cuda_rng_states_of_other_gpus_resumes(store, tmp_path, reference_run):
    """A ``last.pt`` written on a machine with three GPUs resumes here (and equals the
    uninterrupted run: the CPU-side states are what a CPU run draws from)."""
    run = tmp_path / "run"
    train(store, run, resume_config("res2-multi"), max_steps=5, progress=False)
    payload = torch.load(run / "last.pt", weights_only=True)
    if TEST_DEVICE == "cpu":
        assert payload["rng"]["cuda"] == []  # nothing of a GPU the run did not use
    else:
        assert len(payload["rng"]["cuda"]) == 1  # only the run device's
    payload["rng"]["cuda"] = [
        torch.cuda.get_rng_state() if TEST_DEVICE != "cpu" else torch.zeros(16, dtype=torch.uint8)
    ] * 3
    save_payload(run / "last.pt", payload)
    final = train(store, run, resume=True, progress=False)
    assert final.finished and final.global_step == 16
    if TEST_DEVICE == "cpu":
        assert_same_run(run, reference_run)


def test_too_many_processes_for_the_batch_are_refused_before_starting(store, tmp_path, monkeypatch):
    from resemul_core.training.distributed import check_world_size

    check_world_size(23, batch_size=23, sync_bn=True)  # one segment each: fine with synced BN
    check_world_size(11, batch_size=23, sync_bn=False)  # two or three each
    with pytest.raises(ValueError, match="a batch of 23 over 12 processes leaves some 1 segment"):
        check_world_size(12, batch_size=23, sync_bn=False)
    with pytest.raises(ValueError, match="24 processes cannot share a batch of 23 segments"):
        check_world_size(24, batch_size=23, sync_bn=True)
    # train() checks before joining a process group (there is none to join here: it would hang
    # or fail otherwise) and before touching the run directory
    monkeypatch.setenv("WORLD_SIZE", "12")
    monkeypatch.setenv("RANK", "3")
    no_sync = tiny("basic", sync_bn=False)
    with pytest.raises(ValueError, match="use at most 11 processes, or keep sync_bn"):
        train(store, tmp_path / "run", no_sync)
    assert not (tmp_path / "run").exists()


def test_deterministic_algorithms_are_scoped():
    assert not torch.are_deterministic_algorithms_enabled()
    with runtime.deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    with runtime.deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()


def test_compiled_training_saves_plain_keys_and_compiles_once(store, tmp_path):
    """torch.compile over two stages and four epochs: one graph (no recompiles at epoch or
    stage boundaries), checkpoint keys of the plain model, and without dropout (the compiled
    graph draws its masks with its own generator) the same model as eager up to the
    compiler's float reassociation (measured: 2.4e-7 after 16 steps)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    config = resume_config("se-multi", precision="fp32", dropout=0.0)
    compiled = train(
        store, tmp_path / "c", apply_overrides(config, {"compile": True}), progress=False
    )
    assert compiled.finished and compiled.epochs == 4
    assert counters["stats"]["unique_graphs"] == 1
    got = read_checkpoint(tmp_path / "c" / "last.pt")["model_state"]
    train(store, tmp_path / "e", config, progress=False)
    want = read_checkpoint(tmp_path / "e" / "last.pt")["model_state"]
    assert list(got) == list(want) and not any("_orig_mod" in k for k in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)


def test_weight_decay_is_keras_l2_on_convolution_kernels_only():
    """``weight_decay = wd`` acts as Keras' ``l2(wd)`` on the convolution kernels: a gradient of
    ``2 * wd * w`` there and nothing on biases, BatchNorm, SE or dense layers."""
    torch.manual_seed(0)
    from resemul_core import build_model

    model = build_model("se-multi", num_tags=3, width=1 / 16, num_blocks=4)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = TrainConfig(weight_decay=0.01, learning_rate=0.1, lr_decay=0.0)
    optimizer = build_optimizer(model, config, stage=0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # the loss' own gradient is 0: only the regulariser acts
    optimizer.step()
    # first Nesterov step from an empty buffer: w -= lr * (1 + momentum) * 2 * wd * w
    shrink = 1 - 0.1 * (1 + 0.9) * 2 * 0.01
    kernels = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Conv1d)}
    assert len(kernels) == 1 + 4  # the stem and one convolution per SE block
    for name, p in model.named_parameters():
        expected = before[name] * shrink if name in kernels else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0), name
    # the default has no regulariser and one parameter group, as resumable checkpoints expect
    assert len(build_optimizer(model, TrainConfig(), stage=0).param_groups) == 1
