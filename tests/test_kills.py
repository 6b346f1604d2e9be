"""SIGKILL at seeded random moments: what a killed ``data prepare``, ``train`` or pool leaves.

Three promises, each through the real command line (``python -m resemul_core.interfaces.cli``)
in a subprocess with a timeout, with kill moments drawn from a seeded ``random.Random``:

1. ``data prepare`` killed, then rerun into the same ``--out``, gives a store whose four files
   (segments.npy, labels.npy, clips.csv, manifest.json) equal, byte for byte, those of an
   uninterrupted prepare of the same table (other files, such as a lock, are not compared).
   Two cases, ``--workers 1`` and ``--workers 2``; each makes :data:`PREPARE_KILLS` (4) kill
   attempts in a row on the same ``--out`` (kills during resumes), in turns of the parent
   alone (``os.kill``: its workers are orphaned) and of its whole process group
   (``os.killpg``), then one rerun to completion: 8 kills and 10 runs of the command in all.
   Each moment is drawn from the work still to do (:func:`wait_for_moment`): once a random
   number of the clips left are journaled, plus a few ms (into the next clip's decoding,
   slot write or journal append), or, for one draw in eight, up to 0.3 s after the last clip
   (compaction, the store files, the manifest, cleaning up); on a store a kill left
   complete, up to 0.15 s after the start-up. So kills land while clips are decoded and
   journaled, while finishing, after the manifest, or on a store already complete. 64 clips,
   58 FLAC tones of 8 s and 6 unusable files (empty, undecodable, too short: compaction
   fills their holes), make the decoding last about a third of a second.
2. ``train`` killed at :data:`TRAIN_KILLS` (3) random steps of one 16-step run (once its
   checkpoint reaches a drawn global step, after a random delay of up to one step's time, so
   maybe while it writes a checkpoint), each time continued by the same command, then run to
   completion (4 runs of the command), gives ``best.pt`` and ``last.pt`` whose every tensor
   (model and optimizer state) equals the uninterrupted run's.
3. A SIGKILLed parent leaves no process behind: ``data prepare --workers 2`` and ``data synth
   --workers 2`` are killed (the parent only) once their workers are busy, and every process
   that descended from the parent must be gone (or a zombie) within :data:`GONE_WITHIN` s:
   one kill per command (a run that ends before its workers are busy is redone, 3 at most).

A kill attempt counts only if the process was still running when the signal was sent
(``poll()`` first); each test asserts that at least one kill landed and names, in its
messages, how many did and where (the phase a prepare was in, the step a run was at).
Leftover processes are killed in ``finally`` blocks; nothing waits without a timeout.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import TEST_DETERMINISTIC, TEST_DEVICE, pinned_config
from test_train import LENGTH, TAGS, make_toy_store

from resemul_core.model.checkpoint import read_checkpoint
from resemul_core.training.loop import train

CLI = [sys.executable, "-m", "resemul_core.interfaces.cli"]
STORE_FILES = ("segments.npy", "labels.npy", "clips.csv", "manifest.json")
#: kill attempts per prepare case before the completing rerun, half of the parent alone
PREPARE_KILLS = 4
#: kills in one training run before the completing resume
TRAIN_KILLS = 3
#: seconds within which every process of a killed parent must be gone
GONE_WITHIN = 10.0
#: seconds any one subprocess may run
TIMEOUT = 120.0

# --- processes ------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def descendants(pid: int) -> list[int]:
    found, todo = [], children(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children(child))
    return found


def start_time(pid: int) -> int | None:
    """The process' start time in clock ticks (tells a reused pid apart), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def alive(pid: int, started: int | None) -> bool:
    """Whether ``pid`` still runs the process started at ``started`` (a zombie is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next((line.split()[1] for line in status.splitlines() if line[:6] == "State:"), "")
    return state not in ("Z", "X") and start_time(pid) == started


def command_line(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:100].decode()
    return "?"


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def process_groups() -> Iterator[list[subprocess.Popen]]:
    """Processes started in their own sessions; on exit every member of their groups is
    killed (orphaned workers included) and the processes are reaped."""
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for process in started:
            kill_group(process.pid)
        for process in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            process.log.close()  # type: ignore[attr-defined]


def launch(groups: list[subprocess.Popen], args: list[str], **kwargs) -> subprocess.Popen:
    """Start the command line in a session of its own; its stderr goes to a file, not a pipe
    (orphaned workers would hold a pipe open, and a full pipe would block the process)."""
    log = tempfile.TemporaryFile()
    try:
        process = subprocess.Popen(
            CLI + args, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True, **kwargs
        )
    except BaseException:
        log.close()
        raise
    process.log = log  # type: ignore[attr-defined]
    groups.append(process)
    return process


def stderr_of(process: subprocess.Popen) -> str:
    process.log.seek(0)  # type: ignore[attr-defined]
    return process.log.read().decode(errors="replace")[-4000:]  # type: ignore[attr-defined]


def finish(process: subprocess.Popen, what: str, timeout: float = TIMEOUT) -> None:
    """Wait for ``process`` and require success, showing its stderr otherwise."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process.pid)
        process.wait(timeout=10)
        pytest.fail(f"{what}: still running after {timeout} s:\n{stderr_of(process)}")
    assert process.returncode == 0, f"{what} failed ({process.returncode}):\n{stderr_of(process)}"


def kill_at(process: subprocess.Popen, moment: float, *, group: bool) -> bool:
    """SIGKILL ``process`` (or its group) at ``moment`` (``time.monotonic``); False if it
    ended before then (also when it exited just before the signal: a zombie ignores it)."""
    while time.monotonic() < moment:
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    if process.poll() is not None:
        return False
    if group:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode in (0, -signal.SIGKILL), (
        f"exit status {process.returncode}:\n{stderr_of(process)}"
    )
    return process.returncode == -signal.SIGKILL


# --- 1. data prepare ------------------------------------------------------------------------

AUDIO = [
    "--sample-rate",
    "16000",
    "--segment-length",
    "729",
    "--segments-per-clip",
    "8",
    "--clip-duration",
    "7",
]
NUM_CLIPS, SECONDS, FILE_RATE = 64, 8.0, 44_100
BAD = {5: "empty", 17: "text", 29: "short", 41: "empty", 53: "text", 60: "short"}


def make_table(root: Path) -> Path:
    """A table dataset of :data:`NUM_CLIPS` FLAC tones (each its own) and six unusable files."""
    (root / "audio").mkdir(parents=True)
    t = np.arange(round(SECONDS * FILE_RATE)) / FILE_RATE
    rows = []
    for k in range(NUM_CLIPS):
        kind = BAD.get(k, "good")
        name = f"c{k:03d}." + {"good": "flac", "text": "mp3"}.get(kind, "wav")
        path = root / "audio" / name
        if kind == "good":
            tremolo = 0.5 + 0.5 * np.sin(2 * np.pi * 0.5 * (1 + k % 5) * t)
            wave = 0.3 * np.sin(2 * np.pi * 110 * (1 + k % 37) * t + k) * tremolo
            sf.write(path, wave.astype(np.float32), FILE_RATE, subtype="PCM_16")
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "text":
            path.write_text("<html>not found</html>\n" * 40)
        else:  # shorter than one segment
            sf.write(path, np.full(300, 0.1, dtype=np.float32), FILE_RATE)
        rows.append(
            {
                "path": f"audio/{name}",
                "tags": ["rock", "jazz", "pop", "rock;jazz"][k % 4],
                "split": ["train", "train", "valid", "test"][k % 4],
            }
        )
    pd.DataFrame(rows).to_csv(root / "clips.csv", index=False)
    return root / "clips.csv"


def prepare_args(table: Path, out: Path, workers: int) -> list[str]:
    where = ["--root", str(table), "--out", str(out), "--workers", str(workers)]
    return ["data", "prepare", "--dataset", "table", *where, "--no-progress", *AUDIO]


def started_work(process: subprocess.Popen, limit: float = TIMEOUT) -> None:
    """Wait until ``process`` has written to stderr (the command's first log line: its start-up
    is over) or has ended."""
    deadline = time.monotonic() + limit
    while process.poll() is None and time.monotonic() < deadline:
        if os.fstat(process.log.fileno()).st_size > 0:  # type: ignore[attr-defined]
            return
        time.sleep(0.002)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    return make_table(tmp_path_factory.mktemp("table"))


@pytest.fixture(scope="module")
def reference(table, tmp_path_factory) -> Path:
    """The store of an uninterrupted prepare."""
    out = tmp_path_factory.mktemp("reference") / "store"
    with process_groups() as groups:
        finish(launch(groups, prepare_args(table, out, 1)), "uninterrupted prepare")
    return out


def journaled(out: Path) -> int:
    """Clips with a complete journal line in an unfinished store."""
    journal = out / ".prepare" / "journal.jsonl"
    return journal.read_bytes().count(b"\n") if journal.exists() else 0


def complete(out: Path) -> bool:
    return (out / "manifest.json").exists() and not (out / ".prepare").exists()


def prepare_phase(out: Path, *, was_complete: bool) -> str:
    """Where a killed prepare was, read from what it left in ``out``."""
    if was_complete:
        return "rerun on the complete store"
    if (out / "manifest.json").exists():
        return "after the manifest"
    if not (out / ".prepare" / "plan.json").exists():
        return "start-up"
    lines = journaled(out)
    if (out / ".prepare" / "compacted").exists() or lines >= NUM_CLIPS:
        return "finishing"
    return f"decoding ({lines}/{NUM_CLIPS} journaled)"


def wait_for_moment(process: subprocess.Popen, out: Path, rng: random.Random) -> str:
    """Wait for a random moment of a prepare of ``out``: once a drawn number of the clips still
    to do are journaled (then a few ms more, into the next clip), or, for one draw in eight
    and when no clip is left, once all are (then up to 0.3 s more: compaction, finishing,
    cleaning up); on a complete store, up to 0.15 s after the start-up. What was waited for."""
    if complete(out):
        started_work(process)
        pause = rng.uniform(0, 0.15)
        time.sleep(pause)
        return f"{pause:.2f} s after the start-up"
    done = journaled(out)
    share = rng.uniform(0, 8 / 7)
    if done >= NUM_CLIPS or share >= 1:
        target, pause = NUM_CLIPS, rng.uniform(0, 0.3)
    else:
        target, pause = done + max(1, round(share * (NUM_CLIPS - done))), rng.uniform(0, 0.01)
    if done >= target:
        started_work(process)
    deadline = time.monotonic() + TIMEOUT
    while process.poll() is None and journaled(out) < target and not complete(out):
        assert time.monotonic() < deadline, f"prepare of {out} stalled"
        time.sleep(0.002)
    time.sleep(pause)
    return f"{pause * 1000:.0f} ms after {target} journaled"


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_killed_at_random_moments_resumes_to_an_identical_store(
    table, reference, tmp_path, workers
):
    """Promise 1: PREPARE_KILLS kills in a row (parent or group), then a rerun: the same bytes."""
    rng = random.Random(f"prepare-{workers}")
    # the parent alone or its whole process group, in turns: the first kill, the likeliest to
    # hit busy workers, leaves them orphaned
    modes = ["parent", "group"] * (PREPARE_KILLS // 2)
    out = tmp_path / "store"
    landed: list[str] = []  # each kill that hit a running prepare: how, when, where
    with process_groups() as groups:
        for mode in modes:
            was_complete = complete(out)
            process = launch(groups, prepare_args(table, out, workers))
            moment = wait_for_moment(process, out, rng)
            if kill_at(process, 0, group=mode == "group"):
                phase = prepare_phase(out, was_complete=was_complete)
                landed.append(f"{mode}, {moment}: {phase}")
            else:  # it finished first: a complete store, which the rerun must accept as is
                finish(process, "prepare that ended before its kill")
        finish(launch(groups, prepare_args(table, out, workers)), "the completing rerun")
    summary = f"{len(landed)} of {PREPARE_KILLS} kills landed: {landed}"
    print(summary)
    assert landed, summary
    for name in STORE_FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), (
            f"{name} differs; {summary}"
        )


# --- 2. train -------------------------------------------------------------------------------

RECIPE = {
    "num_stages": 2,
    "max_epochs_per_stage": 2,
    "max_steps_per_epoch": 4,
    "checkpoint_every": 1,
}
TOTAL_STEPS = 16  # 2 stages x 2 epochs x 4 steps


def train_args(store: Path, run: Path) -> list[str]:
    settings = [arg for key, value in RECIPE.items() for arg in ("--set", f"{key}={value}")]
    return [
        "train",
        "--variant",
        "res2-multi",
        "--data",
        str(store),
        "--out",
        str(run),
        "--profile",
        "tiny",
        *settings,
        "--device",
        TEST_DEVICE,
        *(["--set", "deterministic=true"] if TEST_DETERMINISTIC else []),
        "--no-progress",
    ]


def saved_step(run: Path) -> int:
    try:
        return int(read_checkpoint(run / "last.pt")["progress"]["global_step"])
    except FileNotFoundError:
        return 0


def assert_same_values(got, want, where: str) -> int:
    """Equal nested dicts/lists of tensors and plain values; the number of tensors compared."""
    if isinstance(want, torch.Tensor):
        same = isinstance(got, torch.Tensor) and torch.equal(got, want)
        assert same, f"{where} differs"
        return 1
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        return sum(assert_same_values(got[k], want[k], f"{where}[{k!r}]") for k in want)
    if isinstance(want, list | tuple):
        assert isinstance(got, list | tuple) and len(got) == len(want), where
        return sum(
            assert_same_values(g, w, f"{where}[{i}]")
            for i, (g, w) in enumerate(zip(got, want, strict=True))
        )
    assert got == want, where
    return 0


def test_train_killed_at_random_steps_resumes_to_identical_weights(tmp_path):
    """Promise 2: TRAIN_KILLS kills at random steps, then a resume: the same tensors."""
    store = make_toy_store(tmp_path / "toy")
    reference = tmp_path / "reference"
    config = pinned_config("res2-multi", "tiny", RECIPE, num_tags=len(TAGS), segment_length=LENGTH)
    # one thread here and in the command (the same kernels, so the same bits): OpenMP threads
    # that wait for each other crawl on busy cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(store, reference, config, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert result.finished and result.global_step == TOTAL_STEPS

    rng = random.Random("train")
    targets = sorted(rng.sample(range(1, TOTAL_STEPS), TRAIN_KILLS))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    landed: list[str] = []
    steps: list[int] = []  # the step of last.pt after each kill that landed
    with process_groups() as groups:
        for target in targets:
            # wait for a checkpoint of this process at or past the drawn step, then kill within
            # the next step (maybe while it writes a checkpoint)
            wanted = max(target, saved_step(run) + 1)
            process = launch(groups, train_args(store.path, run), env=env)
            deadline = time.monotonic() + TIMEOUT
            seen = [(saved_step(run), time.monotonic())]  # (step, when first seen)
            while process.poll() is None and seen[-1][0] < wanted:
                assert time.monotonic() < deadline, f"no checkpoint of step {wanted} in time"
                time.sleep(0.005)
                if (step := saved_step(run)) != seen[-1][0]:
                    seen.append((step, time.monotonic()))
            # a step and its checkpoint take this long here (as last observed)
            step_seconds = seen[-1][1] - seen[-2][1] if len(seen) > 2 else 0.05
            delay = rng.uniform(0, step_seconds)
            if kill_at(process, time.monotonic() + delay, group=False):
                steps.append(saved_step(run))
                landed.append(f"step >= {wanted} + {delay * 1000:.0f} ms: saved {steps[-1]}")
            else:
                finish(process, "training that ended before its kill")
        finish(launch(groups, train_args(store.path, run), env=env), "the completing resume")
    summary = f"{len(landed)} of {TRAIN_KILLS} kills landed: {landed}"
    print(summary)
    assert landed and min(steps) < TOTAL_STEPS, summary
    compared = 0
    for name in ("best.pt", "last.pt"):
        got, want = read_checkpoint(run / name), read_checkpoint(reference / name)
        for part in ("model_state", "optimizer_state"):
            assert (part in got) == (part in want), f"{name}: {part}"
            if part in want:
                compared += assert_same_values(got[part], want[part], f"{name} {part}")
    last, want = read_checkpoint(run / "last.pt"), read_checkpoint(reference / "last.pt")
    assert "optimizer_state" in want
    assert last["progress"] == want["progress"], summary
    assert compared > 0, summary


# --- 3. no process outlives a killed parent -------------------------------------------------


def synth_args(out: Path) -> list[str]:
    return ["data", "synth", "--out", str(out), "--clips", "16", "--workers", "2"]


def busy(command: str, out: Path) -> bool:
    """Whether the workers have got work done (not just started up)."""
    if command == "prepare":
        journal = out / ".prepare" / "journal.jsonl"
        return journal.exists() and journal.stat().st_size > 0
    return any((out / "mp3").rglob("*.mp3")) if (out / "mp3").exists() else False


@pytest.mark.parametrize("command", ["prepare", "synth"])
def test_a_killed_parent_leaves_no_process_behind(table, tmp_path, command):
    """Promise 3: one SIGKILL of the parent while its 2 workers are busy; none outlives it."""
    rng = random.Random(f"orphans-{command}")
    with process_groups() as groups:
        for attempt in range(3):  # a run that ends before its workers are busy is redone
            out = tmp_path / f"out{attempt}"
            args = prepare_args(table, out, 2) if command == "prepare" else synth_args(out)
            process = launch(groups, args)
            deadline = time.monotonic() + TIMEOUT
            workers: dict[int, int | None] = {}
            while process.poll() is None and time.monotonic() < deadline:
                for pid in descendants(process.pid):
                    workers.setdefault(pid, start_time(pid))
                if len(workers) >= 2 and busy(command, out):
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.1))  # somewhere in the middle of a clip
            for pid in descendants(process.pid):
                workers.setdefault(pid, start_time(pid))
            if len(workers) >= 2 and kill_at(process, 0, group=False):
                break
            finish(process, f"{command} that ended before its kill")
        else:
            pytest.fail(f"{command} never had busy workers to orphan in 3 attempts")
        until = time.monotonic() + GONE_WITHIN
        left = [pid for pid, started in workers.items() if alive(pid, started)]
        while left and time.monotonic() < until:
            time.sleep(0.05)
            left = [pid for pid, started in workers.items() if alive(pid, started)]
        lines = {pid: command_line(pid) for pid in left}
        assert not left, (
            f"{len(left)} of the {len(workers)} processes of the SIGKILLed {command} still "
            f"run {GONE_WITHIN} s later: {lines}"
        )
