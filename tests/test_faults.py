"""Nothing lost: disk full, bit rot, concurrent writers, file modes and foreign files.

Every case runs the real code path (a store from ``prepare_store``, checkpoints from ``train``)
and then breaks something the way the world does: a write that comes back short, a full disk,
a flipped byte, a second process aimed at the same directory. The promise each test checks:
either the result is exactly what an undisturbed run gives, or one clear error names the file.
SIGKILLs at random moments are in ``test_kills.py``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_store import STORE_FILES, make_dataset, prepare, run_child
from test_train import assert_same_run, make_toy_store, resume_config

from resemul_core.data.store import StoreCorrupted, open_store, verify_store
from resemul_core.files import atomic_write, write_json
from resemul_core.locks import LOCK_FILE, DirectoryBusy, directory_lock
from resemul_core.model.checkpoint import CheckpointError, read_checkpoint
from resemul_core.training.loop import train

SEED = 14


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference_store(table, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "store"
    prepare(table, out, workers=1)
    return out


def same_store(out: Path, reference: Path) -> bool:
    return all((out / n).read_bytes() == (reference / n).read_bytes() for n in STORE_FILES)


# --- disk full and short writes ----------------------------------------------------------


def test_a_short_write_then_a_full_disk_stops_prepare_naming_the_store(
    table, reference_store, tmp_path, monkeypatch
):
    """A ``pwrite`` that writes half a slot, then ENOSPC: once was recorded as complete."""
    real_pwrite = os.pwrite
    rng = random.Random(SEED)
    for trial in range(4):
        fail_at = rng.randrange(1, 8)  # the slot write that comes back short
        calls = []

        def full_disk(fd, data, offset, fail_at=fail_at, calls=calls):
            calls.append(offset)
            if len(calls) == fail_at:
                return real_pwrite(fd, bytes(data)[: len(data) // 2], offset)
            if len(calls) > fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_pwrite(fd, data, offset)

        out = tmp_path / f"store{trial}"
        monkeypatch.setattr(os, "pwrite", full_disk)
        with pytest.raises(OSError) as caught:
            prepare(table, out, workers=1)
        monkeypatch.setattr(os, "pwrite", real_pwrite)
        assert caught.value.errno == errno.ENOSPC
        assert caught.value.filename == str(out / "segments.npy")  # the output, not an mp3
        assert not (out / "manifest.json").exists()
        store = prepare(table, out, workers=1)  # space again: the same command resumes
        assert store.num_clips == 8 and same_store(out, reference_store), trial


def test_a_slot_lost_after_its_journal_entry_is_decoded_again(table, reference_store, tmp_path):
    """The state an unchecked short write left: journal says 'ok', the slot holds zeros."""
    out = tmp_path / "store"
    assert run_child(table, out, "after-slots") < 0  # killed after 5 slots, 4 journaled
    journal = [json.loads(line) for line in (out / ".prepare" / "journal.jsonl").open()]
    lost = next(e for e in journal if e["status"] == "ok")
    header = int(np.load(out / "segments.npy", mmap_mode="r").offset)
    slot = np.load(out / "segments.npy", mmap_mode="r")[0].nbytes
    with open(out / "segments.npy", "r+b") as handle:
        handle.seek(header + lost["i"] * slot)
        handle.write(bytes(slot))
    prepare(table, out, workers=1)
    assert same_store(out, reference_store)


def test_a_full_disk_while_training_loses_no_checkpoint(tmp_path, monkeypatch):
    """ENOSPC from the n-th fsync (where a full disk surfaces for delayed allocation), for
    several n: the run stops naming the file, the last complete checkpoint survives intact,
    no temporary file is left, and the resumed run equals an uninterrupted one bit for bit."""
    store = make_toy_store(tmp_path / "toy")
    reference = tmp_path / "reference"
    calls = []
    real_fsync = os.fsync

    def counting(fd):
        calls.append(fd)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    train(store, reference, resume_config("res2-multi"), progress=False)
    total = len(calls)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert total >= 10
    rng = random.Random(SEED)
    for trial, fail_at in enumerate(sorted(rng.sample(range(2, total), 3))):
        run = tmp_path / f"run{trial}"
        calls.clear()

        def full(fd, fail_at=fail_at):
            calls.append(fd)
            if len(calls) == fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(OSError) as caught:
            train(store, run, resume_config("res2-multi"), progress=False)
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert caught.value.errno == errno.ENOSPC
        assert run in (Path(caught.value.filename), Path(caught.value.filename).parent)
        assert not list(run.glob(".*.tmp")), "a temporary file was left behind"
        if (run / "last.pt").exists():
            read_checkpoint(run / "last.pt")  # intact: the failed write never replaced it
            train(store, run, resume=True, progress=False)
        else:  # failed before the first checkpoint: nothing to resume, start again
            train(store, run, resume_config("res2-multi"), overwrite=True, progress=False)
        assert_same_run(run, reference)


# --- bit rot -----------------------------------------------------------------------------


def flip(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << (position % 8)
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_any_store_file_is_detected(reference_store, tmp_path):
    """60 flips in each of the four files (header, data, padding alike); every one is caught
    by ``open_store`` (index, labels, manifest, the .npy header and size) or by
    ``verify_store`` (the audio against each clip's digest and zero padding)."""
    rng = random.Random(SEED)
    copy = tmp_path / "store"
    caught = {}
    for name in STORE_FILES:
        size = (reference_store / name).stat().st_size
        positions = sorted(rng.sample(range(size), min(60, size)))
        for position in positions:
            copy.mkdir(exist_ok=True)
            for n in STORE_FILES:
                (copy / n).write_bytes((reference_store / n).read_bytes())
            flip(copy / name, position)
            with pytest.raises(StoreCorrupted) as error:
                verify_store(copy, progress=False)
            assert str(copy) in str(error.value)
        caught[name] = len(positions)
    assert caught == {
        name: min(60, (reference_store / name).stat().st_size) for name in STORE_FILES
    }


def test_training_refuses_a_store_whose_audio_rotted(tmp_path):
    store = make_toy_store(tmp_path / "toy")
    path = store.path / "segments.npy"
    header = int(np.load(path, mmap_mode="r").offset)
    flip(path, header + 5 * store.segments_per_clip * store.segment_length * 2 + 123)
    with pytest.raises(StoreCorrupted, match=r"segments\.npy: clip 5 \(5\) is damaged"):
        train(open_store(store.path), tmp_path / "run", resume_config("basic"), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_truncated_segments_file_is_named_when_the_store_is_opened(reference_store, tmp_path):
    copy = tmp_path / "store"
    copy.mkdir()
    for n in STORE_FILES:
        (copy / n).write_bytes((reference_store / n).read_bytes())
    data = (copy / "segments.npy").read_bytes()
    (copy / "segments.npy").write_bytes(data[: len(data) - 1000])
    with pytest.raises(StoreCorrupted, match=r"segments\.npy is .* bytes, but .* need"):
        open_store(copy)


def test_a_flipped_byte_in_a_checkpoint_never_loads_as_a_different_model(tmp_path):
    """Flips all over ``best.pt`` and ``last.pt`` of a real run: each one either is refused
    (CheckpointError naming the file) or changed nothing that loads (zip padding, timestamps,
    the container's own unchecked CRCs). Never a model or training state that differs."""
    store = make_toy_store(tmp_path / "toy")
    run = tmp_path / "run"
    train(store, run, resume_config("basic"), max_steps=5, progress=False)
    rng = random.Random(SEED)
    refused = harmless = 0
    for name in ("best.pt", "last.pt"):
        original = (run / name).read_bytes()
        want = read_checkpoint(run / name)
        for position in rng.sample(range(len(original)), 60):
            broken = tmp_path / f"broken-{name}"
            broken.write_bytes(original)
            flip(broken, position)
            try:
                got = read_checkpoint(broken)
            except CheckpointError as err:
                assert str(broken) in str(err)
                assert "weights_only=False" not in str(err)
                refused += 1
                continue
            assert got.keys() == want.keys()
            for key, value in want.items():
                if isinstance(value, dict) and key.endswith("state"):
                    assert got[key].keys() == value.keys()
            assert torch.equal(
                torch.cat([v.flatten().float() for v in got["model_state"].values()]),
                torch.cat([v.flatten().float() for v in want["model_state"].values()]),
            ), f"flip at {position} of {name} changed the weights unnoticed"
            harmless += 1
    assert refused + harmless == 120 and refused >= 60  # most bytes are content


def test_a_tampered_checkpoint_is_refused_without_the_advice_to_load_it_unsafely(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"format": "resemul-checkpoint", "x": Payload()}, path)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    message = str(error.value)
    assert "refused unread" in message and str(path) in message
    assert "weights_only" not in message and "\n" not in message
    assert not (tmp_path / "pwned").exists()


# --- concurrent writers ------------------------------------------------------------------


def test_a_second_prepare_into_a_busy_store_is_refused(table, tmp_path):
    out = tmp_path / "store"
    with directory_lock(out, "data prepare"):
        with pytest.raises(DirectoryBusy, match=f"in use by pid {os.getpid()} on "):
            prepare(table, out, workers=1)
    assert not out.exists()  # made for the lock alone, and removed with it
    prepare(table, out, workers=1)  # free again: the lock was released


CONCURRENT = """
import sys
from resemul_core.interfaces.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_prepares_at_once_give_one_store_and_a_clear_refusal(table, reference_store, tmp_path):
    """Two processes started together into one store, three times over: every process
    either completes (the second may find the store finished) or stops with one sentence
    naming the owner; the store equals an undisturbed one."""
    outcomes = []
    for trial in range(3):
        out = tmp_path / f"store{trial}"
        command = [
            sys.executable, "-c", CONCURRENT, "data", "prepare", "--dataset", "table",
            "--root", str(table), "--out", str(out), "--sample-rate", "8000",
            "--segment-length", "243", "--segments-per-clip", "4", "--clip-duration", "0.15",
            "--min-duration", "0.25", "--workers", "1", "--no-progress",
        ]  # fmt: skip
        processes = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        for process in processes:
            _, err = process.communicate(timeout=120)
            outcomes.append(process.returncode)
            if process.returncode != 0:
                assert "is in use by pid" in err and "Traceback" not in err, err
        assert same_store(out, reference_store)
    assert outcomes.count(0) >= 3  # at least one per trial


TRAIN_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_train import resume_config
from resemul_core.locks import DirectoryBusy
from resemul_core.training.loop import train
try:
    train(sys.argv[1], sys.argv[2], resume_config("basic", seed=int(sys.argv[3])), progress=False)
except DirectoryBusy as err:  # the other one is training
    print(err, file=sys.stderr)
    sys.exit(3)
except FileExistsError as err:  # the other one has finished: its run is not replaced
    print(err, file=sys.stderr)
    sys.exit(4)
"""


def test_two_trainings_into_one_directory_leave_one_whole_run(tmp_path):
    """Before the lock, the directory ended with last.pt of one seed and best.pt of the other."""
    store = make_toy_store(tmp_path / "toy")
    code = textwrap.dedent(TRAIN_CHILD).format(tests=str(Path(__file__).parent))
    run = tmp_path / "run"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(store.path), str(run), str(seed)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (0, 1)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 3], [0, 4]), results  # one trains; the other is refused, one way or
    if codes == [0, 3]:  # the other (it may start only after the first has finished)
        assert "is in use by pid" in next(err for rc, err in results if rc == 3)
    winner = read_checkpoint(run / "last.pt")["train_config"]["seed"]
    reference = tmp_path / "reference"
    train(store, reference, resume_config("basic", seed=winner), progress=False)
    assert_same_run(run, reference)


# --- modes and foreign files -------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_honour_the_umask(table, tmp_path, umask):
    old = os.umask(umask)
    try:
        store = prepare(table, tmp_path / "store", workers=1)
        train(make_toy_store(tmp_path / "toy"), tmp_path / "run", resume_config("basic"),
              progress=False)  # fmt: skip
        write_json(tmp_path / "plain.json", {})
        with atomic_write(tmp_path / "plain.bin") as handle:
            handle.write(b"x")
    finally:
        os.umask(old)
    files = [store.path / n for n in STORE_FILES]
    files += [tmp_path / "toy" / n for n in STORE_FILES]
    files += [tmp_path / "run" / n for n in ("config.json", "last.pt", "best.pt", "log.csv")]
    files += [tmp_path / "plain.json", tmp_path / "plain.bin"]
    modes = {str(f): oct(f.stat().st_mode & 0o777) for f in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_prepare_never_replaces_files_it_did_not_write(tmp_path):
    """``--root mymusic/clips.csv --out mymusic`` used to overwrite the user's tag table."""
    table = make_dataset(tmp_path / "mymusic")
    before = {p: p.read_bytes() for p in (tmp_path / "mymusic").rglob("*") if p.is_file()}
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is not empty and holds no segment store"):
            prepare(table, tmp_path / "mymusic", workers=1, overwrite=overwrite)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"mine": true}\n')
    with pytest.raises(ValueError, match="is not the manifest of a segment store"):
        prepare(table, tmp_path / "other", workers=1, overwrite=True)
    after = {p: p.read_bytes() for p in (tmp_path / "mymusic").rglob("*") if p.is_file()}
    assert after == before and (tmp_path / "other" / "manifest.json").read_text().startswith("{")
    assert not (tmp_path / "mymusic" / LOCK_FILE).exists()
    prepare(table, tmp_path / "empty", workers=1)  # a new directory is fine
    (tmp_path / "made").mkdir()
    prepare(table, tmp_path / "made", workers=1)  # and an empty one


def test_data_verify_and_info_report_damage_in_one_line(reference_store, tmp_path, capsys):
    from resemul_core.interfaces.cli import main

    copy = tmp_path / "store"
    copy.mkdir()
    for n in STORE_FILES:
        (copy / n).write_bytes((reference_store / n).read_bytes())
    assert main(["data", "verify", str(copy), "--no-progress"]) == 0
    assert "intact" in capsys.readouterr().out
    store = open_store(copy)
    header = int(np.load(copy / "segments.npy", mmap_mode="r").offset)
    flip(copy / "segments.npy", header + 3 * store.segments_per_clip * store.segment_length * 2)
    assert main(["data", "verify", str(copy), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    clip = store.clips["clip_id"].iat[3]
    assert "\n" not in err and f"segments.npy: clip 3 ({clip}) is damaged" in err
    data = (copy / "segments.npy").read_bytes()
    (copy / "segments.npy").write_bytes(data[:-2])
    assert main(["data", "info", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "segments.npy is" in err and "cut short" in err


FORKING_PARENT = """
import os, sys, time
from resemul_core.locks import directory_lock
with directory_lock(sys.argv[1], "data prepare"):
    child = os.fork()
    if child == 0:  # a worker that outlives its parent (and lets go of its pipes)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        time.sleep(30)
        os._exit(0)
    print(child, flush=True)
    os._exit(0)  # the parent dies holding the lock, as under SIGKILL: no unlock
"""


def test_a_forked_child_does_not_inherit_the_lock(tmp_path):
    """Decoding workers are forked while prepare holds the store's lock; a flock lives while
    any copy of its descriptor is open, so an orphan must not keep the dead parent's lock."""
    out = tmp_path / "store"
    done = subprocess.run(
        [sys.executable, "-c", FORKING_PARENT, str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    child = int(done.stdout.split()[0])
    try:
        assert Path(f"/proc/{child}").exists()  # the orphan still runs
        with directory_lock(out, "data prepare"):  # and yet the lock is free
            pass
    finally:
        os.kill(child, signal.SIGKILL)
