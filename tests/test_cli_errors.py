"""Every failure a user can cause ends in one line on stderr, exit status 2, no traceback.

The line names the argument or file and the reason, and says nothing untrue (a checkpoint that
does not exist, a resume that cannot work). Bugs still raise with their traceback.
"""

from __future__ import annotations

import errno
import math
import os
import resource
import signal

import numpy as np
import pytest
from conftest import TEST_DEVICE

from resemul_core.config import ModelConfig, RuntimeConfig, TrainConfig
from resemul_core.interfaces import cli
from resemul_core.interfaces.cli import build_parser, main
from resemul_core.profiles import resolve_config
from resemul_core.training import loop, state
from resemul_core.training.loop import train

LENGTH = 3**5  # 4 blocks


def run(argv: list[str], capsys) -> tuple[int, str]:
    """``resemul ARGV`` in this process: its exit status and its stderr, which must be one
    line without a traceback."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    except KeyboardInterrupt:  # pytest would end the session
        pytest.fail("KeyboardInterrupt escaped resemul's main")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return code, lines[0]


def train_args(store_dir, out, *extra: str) -> list[str]:
    return [
        "train",
        "--variant",
        "basic",
        "--profile",
        "tiny",
        "--data",
        str(store_dir),
        "--out",
        str(out),
        "--device",
        TEST_DEVICE,
        "--no-progress",
        *extra,
    ]


# --- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "S", "--out", "R", "--variant", "basic"],
        ["evaluate", "R", "--data", "S"],
        ["compare", "RUNS", "--data", "S"],
        ["tag", "song.mp3", "--checkpoint", "R"],
        ["excitations", "R", "--data", "S"],
    ],
    ids=lambda argv: argv[0],
)
def test_an_unknown_device_is_an_argument_error(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, line = run([*argv, "--device", "bogus"], capsys)
    assert code == 2
    assert line.startswith(f"resemul {argv[0]}: error: argument --device: unknown device 'bogus'")
    assert not (tmp_path / "R").exists()


BAD_NUMBERS = ["nan", "inf", "-inf", "-1", "0"]
DATA_PREPARE = ["data", "prepare", "--dataset", "synth", "--root", "synth", "--out", "store"]
TRAIN = ["train", "--data", "S", "--out", "R", "--variant", "basic"]


@pytest.mark.parametrize(
    ("argv", "option", "valid"),
    [
        (DATA_PREPARE, "--sample-rate", []),
        (DATA_PREPARE, "--segment-length", []),
        (DATA_PREPARE, "--segments-per-clip", []),
        (DATA_PREPARE, "--clip-duration", []),
        (DATA_PREPARE, "--min-duration", ["0"]),
        (DATA_PREPARE, "--workers", []),
        (DATA_PREPARE, "--top-k", []),
        (DATA_PREPARE, "--clips", []),
        (DATA_PREPARE, "--seed", ["0"]),
        (["data", "synth", "--out", "synth"], "--clips", []),
        (["data", "synth", "--out", "synth"], "--workers", []),
        (["data", "synth", "--out", "synth"], "--bank", []),
        (["data", "synth", "--out", "synth"], "--seed", ["0"]),
        (TRAIN, "--max-steps", []),
        (TRAIN, "--seed", ["0"]),
        (TRAIN, "--width", []),
        (TRAIN, "--workers", ["0"]),
        (["models"], "--num-tags", []),
        (["models"], "--width", []),
        (["models"], "--alpha", []),
        (["evaluate", "R", "--data", "S"], "--clips-per-batch", []),
        (["evaluate", "R", "--data", "S"], "--workers", ["0"]),
        (["compare", "RUNS", "--data", "S"], "--resamples", []),
        (["tag", "song.mp3", "--checkpoint", "R"], "--top-k", ["0"]),
        (["excitations", "R", "--data", "S"], "--batch-size", []),
        (["import-keras", "m.hdf5", "--variant", "se", "--out", "c.pt"], "--width", []),
        (["import-keras", "m.hdf5", "--variant", "se", "--out", "c.pt"], "--alpha", []),
        (["import-keras", "m.hdf5", "--variant", "se", "--out", "c.pt"], "--num-blocks", []),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_numeric_options_refuse_nan_infinity_and_out_of_range_values(
    argv, option, valid, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for bad in [b for b in BAD_NUMBERS if b not in valid]:
        code, line = run([*argv, f"{option}={bad}"], capsys)
        assert code == 2, (option, bad)
        assert f"error: argument {option}: expected " in line and repr(bad) in line, line
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("fractions", ["0.5,0.5", "nan,0.5,0.5", "0.8,0.1,0.2", "1,-0.5,0.5"])
def test_split_fractions_are_checked(fractions, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["data", "prepare", "--dataset", "table", "--root", "t.csv", "--out", "store"]
    code, line = run([*argv, "--fractions", fractions], capsys)
    assert code == 2 and "argument --fractions: expected three fractions >= 0 summing to 1" in line


def test_an_output_directory_that_is_a_file_is_an_argument_error(store_dir, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a run")
    code, line = run(train_args(store_dir, a_file), capsys)
    assert code == 2 and f"argument --out: '{a_file}' cannot be a directory: it is a file" in line
    code, line = run(train_args(store_dir, a_file / "run"), capsys)
    assert code == 2 and f"its parent {a_file} is a file" in line


def test_import_keras_into_an_existing_directory(tmp_path, capsys):
    from test_keras_import import SMALL, build_official, write_keras

    path = write_keras(
        tmp_path / "m.hdf5", build_official("se-multi", np.random.default_rng(0), **SMALL)
    )
    out = tmp_path / "checkpoints"
    out.mkdir()
    argv = ["import-keras", str(path), "--variant", "se-multi", "--out", str(out)]
    code, line = run([*argv, "--width", "0.0625", "--num-blocks", "5", "--alpha", "4"], capsys)
    assert code == 2
    assert line == (
        f"resemul import-keras: error: {out}: is a directory, not a checkpoint file to write "
        f"(e.g. {out / 'se-multi.pt'})"
    )
    assert list(out.iterdir()) == []
    code, line = run(["import-keras", str(out), "--variant", "se-multi", "--out", "c.pt"], capsys)
    assert code == 2 and f"{out}: is a directory, not a Keras HDF5 file" in line


# --- settings and hyper-parameters -------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-0.01"])
def test_a_learning_rate_that_cannot_train_is_refused_before_the_run_starts(
    value, store_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    code, line = run(train_args(store_dir, out, "--set", f"learning_rate={value}"), capsys)
    assert code == 2
    assert line.startswith("resemul train: error: ") and "learning_rate" in line
    assert "finite" in line or "> 0" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: TrainConfig(learning_rate=math.nan), "learning_rate"),
        (lambda: TrainConfig(learning_rate=math.inf), "learning_rate"),
        (lambda: TrainConfig(momentum=math.nan), "momentum"),
        (lambda: TrainConfig(lr_decay=math.nan), "lr_decay"),
        (lambda: TrainConfig(weight_decay=math.inf), "weight_decay"),
        (lambda: TrainConfig(momentum=1.0), "momentum"),
        (lambda: TrainConfig(momentum=0.0), "momentum"),  # Nesterov needs momentum
        (lambda: TrainConfig(seed=-1), "seed"),
        (lambda: ModelConfig(width=math.nan), "width"),
        (lambda: ModelConfig(alpha=math.inf), "alpha"),
        (lambda: ModelConfig(bn_eps=0.0), "bn_eps"),
        (lambda: ModelConfig(bn_momentum=math.nan), "bn_momentum"),
        (lambda: RuntimeConfig(device="bogus"), "device"),
        (lambda: resolve_config("basic", "tiny", {"learning_rate": math.nan}), "learning_rate"),
    ],
)
def test_the_library_refuses_values_that_cannot_train(make, field):
    with pytest.raises(ValueError, match=field):
        make()


# --- divergence ---------------------------------------------------------------------------------


def _poison_loss(monkeypatch, at_call: int) -> None:
    calls = {"n": 0}
    real = loop.bce_loss

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * math.nan if calls["n"] == at_call else loss

    monkeypatch.setattr(loop, "bce_loss", poisoned)


def test_divergence_before_the_first_checkpoint_names_none(
    store_dir, tmp_path, capsys, monkeypatch
):
    _poison_loss(monkeypatch, at_call=1)
    out = tmp_path / "run"
    code, line = run(train_args(store_dir, out), capsys)
    assert code == 2
    assert "training loss is nan at global step 1" in line
    assert "predates" not in line and "no checkpoint was written yet" in line
    assert not (out / "last.pt").exists()


def test_divergence_after_a_checkpoint_names_it(store_dir, tmp_path, capsys, monkeypatch):
    _poison_loss(monkeypatch, at_call=2)
    out = tmp_path / "run"
    code, line = run(train_args(store_dir, out, "--set", "checkpoint_every=1"), capsys)
    assert code == 2
    last = out / "last.pt"
    assert line.endswith(f"the last checkpoint {last} predates it")
    assert "training loss is nan at global step 2 " in line
    assert (out / "last.pt").is_file()


# --- a run killed before its first checkpoint -------------------------------------------------


def _interrupt_first_step(monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_step", interrupted)


def test_a_run_killed_before_its_first_checkpoint_says_how_to_start_again(
    store_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_first_step(patch)
        code, line = run(train_args(store_dir, out), capsys)
    assert code == 130
    assert line == (
        "resemul train: interrupted; run the same command with --overwrite to start over "
        "(no checkpoint was written)"
    )
    assert (out / "config.json").is_file() and not (out / "last.pt").exists()
    # the same command again: no "resume it", which cannot work
    code, line = run(train_args(store_dir, out), capsys)
    assert code == 2
    assert "stopped before its first checkpoint (config.json, no last.pt)" in line
    assert "nothing to resume" in line and "--overwrite" in line
    assert "resume it" not in line
    # --resume: not just "last.pt does not exist"
    code, line = run(["train", "--data", str(store_dir), "--out", str(out), "--resume"], capsys)
    assert code == 2
    assert "cannot resume: run directory" in line and "stopped before its first checkpoint" in line
    assert "--overwrite" in line
    code, line = run(train_args(store_dir, out, "--resume"), capsys)
    assert code == 2 and "stopped before its first checkpoint" in line and "--overwrite" in line
    # the way out that the messages name works
    assert main(train_args(store_dir, out, "--overwrite", "--max-steps", "1")) == 0
    assert (out / "last.pt").is_file()


def test_an_interrupted_run_with_a_checkpoint_is_resumed_by_the_same_command(
    store_dir, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    assert main(train_args(store_dir, out, "--max-steps", "1")) == 0
    capsys.readouterr()
    with monkeypatch.context() as patch:
        _interrupt_first_step(patch)
        code, line = run(train_args(store_dir, out), capsys)
    assert code == 130
    assert (
        line == f"resemul train: interrupted; run the same command to resume from {out / 'last.pt'}"
    )


def test_a_fresh_run_over_a_checkpointed_one_names_both_ways_out(store_dir, tmp_path):
    from conftest import pinned_config

    config = pinned_config("basic", num_tags=3, segment_length=LENGTH)
    out = tmp_path / "run"
    train(store_dir, out, config, max_steps=1, progress=False)
    with pytest.raises(FileExistsError, match="already holds a run") as err:
        train(store_dir, out, config, progress=False)
    assert "--resume" in str(err.value) and "--overwrite" in str(err.value)
    with pytest.raises(FileNotFoundError, match="no run in .*start one without"):
        train(store_dir, tmp_path / "none", config, resume=True, progress=False)


# --- what the operating system refuses ----------------------------------------------------------


@pytest.mark.parametrize(
    ("code_", "hint"),
    [
        (errno.ENOSPC, "(the output's filesystem is full; free space, then run the same command"),
        (errno.EROFS, "(the output's filesystem is mounted read-only; write the output elsewhere)"),
        (errno.EACCES, None),
    ],
)
def test_os_errors_name_the_file_and_the_reason(
    code_, hint, store_dir, tmp_path, capsys, monkeypatch
):
    def refused(path, data):
        raise OSError(code_, os.strerror(code_), str(path))

    monkeypatch.setattr(state, "write_json", refused)
    out = tmp_path / "run"
    code, line = run(train_args(store_dir, out), capsys)
    assert code == 2
    assert line.startswith(f"resemul train: error: {out / 'config.json'}: {os.strerror(code_)}")
    if hint:
        assert hint in line
    else:
        assert line.endswith(os.strerror(code_))


def test_a_file_size_limit_is_reported_with_a_hint(store_dir, tmp_path, capsys):
    """A real EFBIG: the checkpoint outgrows the process' file-size limit."""
    out = tmp_path / "run"
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, before[1]))
    try:
        code, line = run(train_args(store_dir, out, "--max-steps", "1"), capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)
    assert code == 2
    assert f"{out / 'last.pt'}: {os.strerror(errno.EFBIG)} (the file grew larger than" in line


def test_a_missing_store_is_one_line(tmp_path, capsys):
    code, line = run(["data", "info", str(tmp_path / "nothing")], capsys)
    assert code == 2 and str(tmp_path / "nothing") in line


# --- debugging and bugs -------------------------------------------------------------------------


def test_tracebacks_on_request(tmp_path, capsys, monkeypatch):
    assert "RESEMUL_TRACEBACK=1" in build_parser().format_help()
    monkeypatch.setenv("RESEMUL_TRACEBACK", "1")
    assert main(["data", "info", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.splitlines()[-1].startswith("resemul data info: error: ")


def test_a_bug_still_shows_its_traceback(monkeypatch):
    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setattr(cli, "_cmd_models", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["models"])
