"""Rehearse MagnaTagATune-scale data preparation on this machine and record the figures.

Usage::

    python bench/mtat_scale.py --scratch /work/scratch/mtat [--clips 25863] [--cleanup]

Phases, each timed, with the peak memory of its whole process tree (sampled every 0.25 s:
RSS, PSS and anonymous RSS summed over the process and all its children) and the load
average:

1. ``generate``: ``resemul data synth --mtat`` writes an MTAT-sized synthetic release (MTAT's
   layout, 25,863 mp3s of 29.1 s at 16 kHz, MTAT's split counts; see
   :mod:`resemul_core.data.synth_release`) into ``SCRATCH/release``, or reuses a complete one.
2. ``prepare``: ``resemul data prepare --dataset mtat --workers 2`` into ``SCRATCH/store``,
   SIGKILLed (the whole process group) once the journal shows ``--kill-at`` of the clips done.
3. ``resume``: the same command again, to completion.
4. ``check``: the store's counts against the release's expected ones; every clip's segments
   re-read from disk (one clip at a time, plain reads) against the digest in ``clips.csv``;
   a random sample of clips decoded again independently (as an uninterrupted run would) and
   compared with the stored digests; the clip order against the one the plan and the skips
   imply; the manifest fingerprint recomputed.
5. ``loader``: segments/s of random 23-segment training batches (``SegmentBatches``, batches
   from ``epoch_batches`` as training draws them) in this process and through a
   ``DataLoader`` with 2 workers, each from a cold page cache (``drop_caches`` if permitted,
   else ``posix_fadvise(DONTNEED)`` on ``segments.npy``), with /proc/meminfo and the store's
   resident bytes (``fincore``) before and after.

Writes ``bench/out/mtat_scale.json`` and prints a Markdown table. ``--cleanup`` deletes the
release and the store at the end (the JSON stays).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "mtat_scale.json"
RESEMUL = [sys.executable, "-m", "resemul_core.interfaces.cli"]
GB = 1e9


class TreeSampler:
    """Peak memory of a process and all its descendants, sampled in a thread.

    ``peak`` holds the largest sums seen (bytes): ``rss``, ``pss`` (shared pages split
    between the processes mapping them) and ``anon`` (RssAnon: private memory, not the page
    cache); ``timeline`` one ``(seconds, rss, anon, extra)`` sample every ``every`` seconds,
    where ``extra`` is whatever ``probe()`` returns (e.g. clips done).
    """

    def __init__(self, pid: int, *, interval: float = 0.25, every: float = 5.0, probe=None):
        self.pid, self.interval, self.every, self.probe = pid, interval, every, probe
        self.peak = {"rss": 0, "pss": 0, "anon": 0, "processes": 0}
        self.timeline: list[tuple[float, int, int, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _status_kb(pid: int, key: str, file: str) -> int:
        try:
            with open(f"/proc/{pid}/{file}") as handle:
                for line in handle:
                    if line.startswith(key):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def sample(self) -> dict[str, int]:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return {"rss": 0, "pss": 0, "anon": 0, "processes": 0}
        total = {"rss": 0, "pss": 0, "anon": 0, "processes": len(procs)}
        for proc in procs:
            total["rss"] += self._status_kb(proc.pid, "VmRSS:", "status")
            total["anon"] += self._status_kb(proc.pid, "RssAnon:", "status")
            total["pss"] += self._status_kb(proc.pid, "Pss:", "smaps_rollup")
        return total

    def _run(self) -> None:
        start, last = time.perf_counter(), -self.every
        while not self._stop.is_set():
            now = self.sample()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now[key])
            t = time.perf_counter() - start
            if t - last >= self.every:
                extra = self.probe() if self.probe else None
                self.timeline.append((round(t, 1), now["rss"], now["anon"], extra))
                last = t
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class LoadSampler:
    """Max and mean 1-minute load average while a phase runs (sampled every 5 s)."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.values.append(os.getloadavg()[0])
            if self._stop.wait(5.0):
                break

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.values.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float]:
        return {"max": max(self.values), "mean": round(float(np.mean(self.values)), 2)}


def journal_lines(store: Path) -> int:
    """Clips finished so far: complete lines of the prepare journal."""
    try:
        return (store / ".prepare" / "journal.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def run_phase(
    name: str,
    command: list[str],
    log: Path,
    *,
    probe=None,
    kill_when=None,
) -> dict[str, Any]:
    """Run ``command`` in its own process group, sampling its memory; SIGKILL the group as
    soon as ``kill_when()`` is true. Returns the phase's figures."""
    started = time.perf_counter()
    with open(log, "ab") as handle, LoadSampler() as load:
        handle.write(f"\n=== {name}: {' '.join(command)}\n".encode())
        handle.flush()
        proc = subprocess.Popen(
            command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        killed = False
        with TreeSampler(proc.pid, probe=probe) as sampler:
            while proc.poll() is None:
                if kill_when is not None and not killed and kill_when():
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
                time.sleep(0.2)
    seconds = time.perf_counter() - started
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"{name} failed with exit code {proc.returncode}; see {log}")
    return {
        "seconds": round(seconds, 1),
        "returncode": proc.returncode,
        "killed": killed,
        "peak_rss_gb": round(sampler.peak["rss"] / GB, 3),
        "peak_pss_gb": round(sampler.peak["pss"] / GB, 3),
        "peak_anon_gb": round(sampler.peak["anon"] / GB, 3),
        "processes": sampler.peak["processes"],
        "timeline": [(t, round(r / GB, 3), round(a / GB, 3), x) for t, r, a, x in sampler.timeline],
        "load_average": load.summary(),
    }


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (sparse files count their written blocks)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def meminfo() -> dict[str, float]:
    """MemTotal, MemAvailable, Cached and Dirty from /proc/meminfo, in GB."""
    keys = ("MemTotal", "MemAvailable", "Cached", "Dirty")
    out = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            name, value = line.split(":")
            if name in keys:
                out[name] = round(int(value.split()[0]) * 1024 / GB, 2)
    return out


def resident_gb(path: Path) -> float | None:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``), GB; None if unavailable."""
    try:
        text = subprocess.run(
            ["fincore", "-b", "-n", "-o", "RES", str(path)], capture_output=True, text=True
        ).stdout
        return round(int(text.split()[0]) / GB, 2)
    except (OSError, ValueError, IndexError):
        return None


def disk_read_gb(path: Path) -> float:
    """GB read so far from the block device holding ``path`` (/proc/diskstats; all readers)."""
    device = os.stat(path).st_dev
    major, minor = os.major(device), os.minor(device)
    with open("/proc/diskstats") as handle:
        for line in handle:
            fields = line.split()
            if (int(fields[0]), int(fields[1])) == (major, minor):
                return int(fields[5]) * 512 / GB  # sectors read, always 512-byte units
    return float("nan")


def drop_page_cache(path: Path) -> str:
    """Empty the page cache of ``path``: ``drop_caches`` if permitted, else fadvise; the method."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("1\n")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "posix_fadvise(DONTNEED)"


def check_store(store_dir: Path, release: Path, expected: dict, *, sample: int) -> dict[str, Any]:
    """Counts, every digest re-read from disk, a decoded sample, the order, the fingerprint."""
    from resemul_core.data.audio import load_audio, segment_waveform
    from resemul_core.data.sources import read_mtat
    from resemul_core.data.store import (
        clip_digest,
        clips_to_csv,
        open_store,
        quantize,
        store_fingerprint,
    )

    store = open_store(store_dir)
    counts = [store.manifest["counts"][s]["clips"] for s in ("train", "valid", "test")]
    figures: dict[str, Any] = {
        "clips": store.num_clips,
        "counts": counts,
        "expected_counts": expected,
        "counts_match": counts == expected,
        "segments": int(store.clips["num_segments"].sum()),
        "skip_counts": store.manifest["skip_counts"],
    }
    # Every clip's stored bytes against its journal digest: plain reads into one buffer, so
    # neither the page cache mapped by a memmap nor a whole-store array counts against memory.
    per_clip, length = store.segments_per_clip, store.segment_length
    slot = np.empty((per_clip, length), dtype="<i2")
    offset = int(store.segments.offset)
    started, bad, nonzero_tail = time.perf_counter(), 0, 0
    with open(store_dir / "segments.npy", "rb", buffering=0) as handle:
        handle.seek(offset)
        index = zip(store.clips["num_segments"], store.clips["digest"], strict=True)
        for i, (n, digest) in enumerate(index):
            if handle.readinto(memoryview(slot).cast("B")) != slot.nbytes:
                raise RuntimeError(f"segments.npy ends inside clip {i}")
            bad += clip_digest(slot[:n]) != digest
            nonzero_tail += bool(slot[n:].any())
    seconds = time.perf_counter() - started
    size = store.num_clips * slot.nbytes
    figures["train_split_gb"] = round(counts[0] * slot.nbytes / GB, 2)
    figures["digest_pass"] = {
        "bad_digests": int(bad),
        "nonzero_unused_slots": int(nonzero_tail),
        "seconds": round(seconds, 1),
        "read_gb_per_s": round(size / seconds / GB, 3),
    }
    # What an uninterrupted run gives: the plan's clips in order, holes of skipped clips
    # filled by the last kept ones, each clip's content a function of its audio alone.
    source = read_mtat(release, split_policy="paper")
    planned = list(source.clips["path"])
    skipped = {s["path"] for s in store.manifest["skipped"]} & set(planned)
    kept = [i for i, p in enumerate(planned) if p not in skipped]
    holes = [i for i, p in enumerate(planned[: len(kept)]) if p in skipped]
    order = list(range(len(kept)))
    for hole, tail in zip(holes, [i for i in kept if i >= len(kept)], strict=True):
        order[hole] = tail
    figures["order_matches_plan"] = [planned[i] for i in order] == list(store.clips["path"])
    labels_match = np.array_equal(source.labels[order], store.labels)
    figures["labels_match_source"] = bool(labels_match)
    rng = np.random.default_rng(0)
    chosen = rng.choice(store.num_clips, min(sample, store.num_clips), replace=False)
    params = store.manifest["params"]
    same = 0
    for i in chosen:
        waveform = load_audio(
            Path(source.root) / store.clips["path"].iat[i],
            sample_rate=params["sample_rate"],
            duration=max(params["clip_duration"], params["min_duration"] or 0.0),
        )[: round(params["clip_duration"] * params["sample_rate"])]
        segments = segment_waveform(
            waveform, segment_length=length, max_segments=params["segments_per_clip"]
        )
        same += clip_digest(quantize(segments)) == store.clips["digest"].iat[i]
    figures["decoded_sample"] = {"clips": len(chosen), "identical": int(same)}
    fingerprint = store_fingerprint(
        dataset=store.manifest["dataset"],
        params=params,
        tags=store.tags,
        clips_csv=clips_to_csv(store.clips),
        labels=store.labels,
    )
    figures["fingerprint"] = store.fingerprint
    figures["fingerprint_recomputed"] = fingerprint == store.fingerprint
    figures["clips_csv_sha256"] = hashlib.sha256((store_dir / "clips.csv").read_bytes()).hexdigest()
    return figures


def time_loader(
    store_dir: Path,
    *,
    workers: int,
    seconds: float,
    cold: bool,
    epoch: int = 0,
    batch_size: int = 23,
) -> dict[str, Any]:
    """Segments/s of one epoch of random training batches (at most ``seconds``).

    ``cold``: empty the store's page cache first, so every segment comes from the disk (each
    is read once per epoch, so a cold epoch is what every epoch of a store larger than the
    page cache sees); otherwise read whatever the cache holds (after a cold epoch: all of
    the training split, if it fits).
    """
    from torch.utils.data import DataLoader

    from resemul_core.data.datasets import SegmentBatches
    from resemul_core.training.schedule import epoch_batches

    batches = SegmentBatches(store_dir, "train")
    steps = len(batches) // batch_size
    rows = epoch_batches(len(batches), batch_size=batch_size, num_steps=steps, seed=0, epoch=epoch)
    segments_file = store_dir / "segments.npy"
    method = drop_page_cache(segments_file) if cold else "none (warm)"
    before = {**meminfo(), "store_resident_gb": resident_gb(segments_file)}
    loader = DataLoader(batches, sampler=list(rows), batch_size=None, num_workers=workers)
    disk_before = disk_read_gb(segments_file)
    seen, started = 0, time.perf_counter()
    with LoadSampler() as load:
        for samples, _ in loader:  # timing includes worker start-up, as an epoch's does
            seen += len(samples)
            if time.perf_counter() - started >= seconds:
                break
        elapsed = time.perf_counter() - started
    disk = disk_read_gb(segments_file) - disk_before
    del loader
    after = {**meminfo(), "store_resident_gb": resident_gb(segments_file)}
    bytes_read = seen * batches.items.store.segment_length * 2
    return {
        "workers": workers,
        "cold": cold,
        "segments": seen,
        "seconds": round(elapsed, 1),
        "segments_per_s": round(seen / elapsed, 1),
        "mb_per_s": round(bytes_read / elapsed / 1e6, 1),
        "read_gb": round(bytes_read / GB, 2),
        "disk_read_gb": round(disk, 2),  # readahead included; other processes' reads too
        "cache_drop": method,
        "meminfo_before": before,
        "meminfo_after": after,
        "load_average": load.summary(),
    }


def loader_runs(store_dir: Path, *, workers: int, seconds: float) -> list[dict[str, Any]]:
    """In this process, then with ``workers`` DataLoader workers: a cold epoch, a warm one."""
    return [
        time_loader(store_dir, workers=w, seconds=seconds, cold=cold, epoch=int(not cold))
        for w in (0, workers)
        for cold in (True, False)
    ]


def markdown(figures: dict[str, Any]) -> str:
    g, p, r = figures["generate"], figures["prepare"], figures["resume"]
    c, d = figures["check"], figures["disk"]
    total = p["seconds"] + r["seconds"]
    planned = figures["planned_clips"]
    rows = [
        ("release", f"{figures['clips']:,} clips ({figures['release']['bank']} rendered)"),
        (
            "generate",
            f"{g['seconds']:.0f} s, {g.get('clips_per_s', 0):.0f} clips/s, "
            f"peak RSS {g['peak_rss_gb']:.2f} GB (PSS {g['peak_pss_gb']:.2f})"
            + (" (reused)" if figures["release"].get("reused") else ""),
        ),
        (
            "prepare until SIGKILL",
            f"{p['seconds']:.0f} s, {p['clips_done']:,} of {planned:,} clips "
            f"({p['clips_per_s']:.1f} clips/s)",
        ),
        ("resume", f"{r['seconds']:.0f} s, {r['clips_done']:,} clips ({r['clips_per_s']:.1f}/s)"),
        ("prepare total", f"{total:.0f} s, {planned / total:.1f} clips/s"),
        (
            "peak memory, prepare / resume (tree)",
            f"RSS {p['peak_rss_gb']:.2f} / {r['peak_rss_gb']:.2f} GB, "
            f"PSS {p['peak_pss_gb']:.2f} / {r['peak_pss_gb']:.2f} GB, "
            f"anon {p['peak_anon_gb']:.2f} / {r['peak_anon_gb']:.2f} GB",
        ),
        ("disk: mp3s / store", f"{d['mp3_gb']:.2f} GB / {d['store_gb']:.2f} GB"),
        ("store vs RAM", f"{d['store_gb']:.1f} GB vs {d['ram_gb']:.1f} GB MemTotal"),
        (
            "store clips train/valid/test",
            f"{'/'.join(f'{n:,}' for n in c['counts'])} (expected "
            f"{'/'.join(f'{n:,}' for n in c['expected_counts'])})",
        ),
        (
            "check",
            f"{c['digest_pass']['bad_digests']} bad digests "
            f"({c['digest_pass']['read_gb_per_s']:.2f} GB/s sequential), "
            f"{c['decoded_sample']['identical']}/{c['decoded_sample']['clips']} re-decoded "
            f"identical, order {'ok' if c['order_matches_plan'] else 'WRONG'}",
        ),
    ]
    for run in figures["loader"]:
        name = "1 process" if run["workers"] == 0 else f"DataLoader, {run['workers']} workers"
        cache = "cold" if run["cold"] else "warm"
        rows.append(
            (
                f"loader, {cache} cache, {name}",
                f"{run['segments_per_s']:.0f} segments/s ({run['mb_per_s']:.0f} MB/s, "
                f"{run['read_gb']:.1f} GB in {run['seconds']:.0f} s, "
                f"load {run['load_average']['mean']:.1f})",
            )
        )
    load = [figures[k]["load_average"]["max"] for k in ("generate", "prepare", "resume")]
    rows.append(("load average (1 min, max)", " / ".join(f"{x:.1f}" for x in load)))
    lines = ["| phase | figure |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", required=True, type=Path, help="folder for release + store")
    parser.add_argument("--clips", type=int, default=25_863, help="release size (25863)")
    parser.add_argument("--bank", type=int, default=1024, help="rendered clips (1024)")
    parser.add_argument("--workers", type=int, default=2, help="processes (2)")
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction done at SIGKILL")
    parser.add_argument("--loader-seconds", type=float, default=60.0, help="per loader run")
    parser.add_argument("--sample", type=int, default=300, help="clips decoded again (300)")
    parser.add_argument("--cleanup", action="store_true", help="delete release and store")
    parser.add_argument(
        "--loader-only", action="store_true", help="rerun the loader phase on the store there"
    )
    args = parser.parse_args(argv)
    if args.scratch.resolve().is_relative_to(REPO):
        parser.error("--scratch must lie outside the repository")
    release, store_dir = args.scratch / "release", args.scratch / "store"
    if args.loader_only:
        figures = json.loads(OUT.read_text())
        figures["loader"] = loader_runs(
            store_dir, workers=args.workers, seconds=args.loader_seconds
        )
        OUT.write_text(json.dumps(figures, indent=2) + "\n")
        print(markdown(figures))
        return 0
    args.scratch.mkdir(parents=True, exist_ok=True)
    log = args.scratch / "mtat_scale.log"
    figures: dict[str, Any] = {"clips": args.clips, "workers": args.workers, "cpus": os.cpu_count()}
    figures["meminfo_start"] = meminfo()

    synth = [*RESEMUL, "data", "synth", "--mtat", "--out", str(release), "--clips", str(args.clips)]
    synth += ["--bank", str(args.bank), "--workers", str(args.workers)]
    csv_file = release / "annotations_final.csv"
    stamp = csv_file.stat().st_mtime_ns if csv_file.exists() else None
    figures["generate"] = run_phase("generate", synth, log)
    record = json.loads((release / "synth.json").read_text())
    figures["release"] = {k: v for k, v in record["summary"].items() if k != "tags"}
    reused = csv_file.stat().st_mtime_ns == stamp  # ensure_release left it as it was
    figures["release"]["reused"] = reused
    if not reused:
        figures["generate"]["clips_per_s"] = round(args.clips / figures["generate"]["seconds"], 1)
    expected = record["summary"]["expected"]["paper"]
    planned = sum(expected["source"])
    figures["planned_clips"] = planned

    if store_dir.exists():  # a fresh store every time, so the phases mean the same thing
        shutil.rmtree(store_dir)
    prepare = [*RESEMUL, "data", "prepare", "--dataset", "mtat", "--root", str(release)]
    prepare += ["--out", str(store_dir), "--workers", str(args.workers), "--no-progress"]
    kill_at = int(args.kill_at * planned)

    def probe() -> int:
        return journal_lines(store_dir)

    first = run_phase("prepare", prepare, log, probe=probe, kill_when=lambda: probe() >= kill_at)
    if not first["killed"]:
        raise RuntimeError("prepare finished before it could be killed; raise --clips")
    first["clips_done"] = journal_lines(store_dir)
    first["clips_per_s"] = round(first["clips_done"] / first["seconds"], 1)
    figures["prepare"] = first
    second = run_phase("resume", prepare, log, probe=probe)
    second["clips_done"] = planned - first["clips_done"]
    second["clips_per_s"] = round(second["clips_done"] / second["seconds"], 1)
    figures["resume"] = second

    figures["check"] = check_store(store_dir, release, expected["store"], sample=args.sample)
    store_gb = disk_bytes(store_dir) / GB
    figures["disk"] = {
        "mp3_gb": round(disk_bytes(release / "mp3") / GB, 2),
        "mp3_apparent_gb": round(record["summary"]["mp3_bytes"] / GB, 2),
        "store_gb": round(store_gb, 2),
        "ram_gb": meminfo()["MemTotal"],
        "train_split_gb": figures["check"]["train_split_gb"],  # what training reads at random
    }
    figures["loader"] = loader_runs(store_dir, workers=args.workers, seconds=args.loader_seconds)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(figures, indent=2) + "\n")
    print(markdown(figures))
    print(f"\nwrote {OUT}")
    if args.cleanup:
        shutil.rmtree(release)
        shutil.rmtree(store_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
