"""Dataset adapters (MTAT, MSD, table) on tiny generated fixtures, and `resemul data` end to end."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from resemul_core.data.prepare import prepare_store
from resemul_core.data.sources import (
    MSD_PATH_PATTERNS,
    MTAT_KNOWN_BROKEN,
    SOURCES,
    SYNTH_MARKER,
    read_msd,
    read_mtat,
    read_source,
    read_synth,
    read_table,
)
from resemul_core.data.splits import MTAT_SPLIT_OF_FOLDER, mtat_folders, mtat_split
from resemul_core.data.tags import MSD_TOP50_TAGS, MTAT_TOP50_TAGS
from resemul_core.interfaces.cli import main

RATE = 8000
MTAT_TAGS = ["guitar", "rock", "piano", "never", "choral", "slow"]
# (clip_id, mp3_path, tags): counts guitar 8 (5 + the 3 broken files), rock 3, piano 3 (a tie,
# rock's column comes first), slow 2, choral 1, never 0.
MTAT_ROWS = [
    ("1", "0/one.mp3", {"guitar", "rock"}),
    ("2", "5/two.mp3", {"guitar"}),
    ("3", "b/three.mp3", {"piano"}),
    ("4", "c/four.mp3", {"guitar", "piano"}),
    ("5", "d/five.mp3", {"rock"}),
    ("6", "f/six.mp3", {"guitar", "slow"}),
    ("7", "3/seven.mp3", {"choral"}),
    ("8", "e/eight.mp3", {"slow"}),
    ("9", "a/short.mp3", {"rock", "piano", "guitar"}),
] + [(str(100 + k), path, {"guitar"}) for k, path in enumerate(MTAT_KNOWN_BROKEN)]


def make_mtat(root: Path, *, quoted: bool = True, nested: bool = True) -> Path:
    """The fixture: 0.3 s clips, one 0.1 s clip, the three known broken files as 0 bytes."""
    audio = root / "mp3" if nested else root
    for k, (_, path, _) in enumerate(MTAT_ROWS):
        (audio / path).parent.mkdir(parents=True, exist_ok=True)
        if path in MTAT_KNOWN_BROKEN:
            (audio / path).write_bytes(b"")
        else:
            seconds = 0.1 if "short" in path else 0.3
            noise = np.random.default_rng(k).uniform(-0.5, 0.5, round(seconds * RATE))
            sf.write(audio / path, noise.astype(np.float32), RATE)
    q = '"' if quoted else ""
    lines = ["\t".join(f"{q}{c}{q}" for c in ["clip_id", *MTAT_TAGS, "mp3_path"])]
    for clip_id, path, tags in MTAT_ROWS:
        fields = [clip_id, *("1" if t in tags else "0" for t in MTAT_TAGS), path]
        lines.append("\t".join(f"{q}{f}{q}" for f in fields))
    (root / "annotations_final.csv").write_text("\n".join(lines) + "\n")
    return root


def test_the_mtat_split_rule():
    # The rule, spelled out once here as the test oracle: folders 0-b train, c valid, d-f test.
    assert "".join(MTAT_SPLIT_OF_FOLDER) == "0123456789abcdef"
    assert [mtat_folders(s) for s in ("train", "valid", "test")] == ["0123456789ab", "c", "def"]
    assert mtat_split("c/x-y-01-z-0-29.mp3") == "valid" and mtat_split(" B/x.mp3") == "train"
    assert mtat_split("f/x.mp3") == "test"
    for bad in ("g/x.mp3", "", "/0/x.mp3"):
        with pytest.raises(ValueError, match="does not start with a folder 0-9 or a-f"):
            mtat_split(bad)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        mtat_folders("dev")


def test_mtat_top_k_order_splits_and_drops_under_both_policies(tmp_path):
    root = make_mtat(tmp_path / "mtat")
    paper = read_mtat(root, top_k=3)
    assert paper.tags == ["rock", "piano", "guitar"]  # ascending count, tie in column order
    assert paper.clips["clip_id"].tolist() == ["1", "2", "3", "4", "5", "6", "9"]
    assert paper.clips["split"].tolist() == ["train"] * 3 + ["valid", "test", "test", "train"]
    np.testing.assert_array_equal(paper.labels[0], [1, 0, 1])
    np.testing.assert_array_equal(paper.labels[-1], [1, 1, 1])
    assert [(d["clip_id"], d["reason"]) for d in paper.dropped] == [
        ("7", "no tag"),
        ("8", "no tag"),
        ("100", "known broken"),
        ("101", "known broken"),
        ("102", "known broken"),
    ]
    assert paper.min_duration == 29.1 and paper.split_counts() == (4, 1, 2)
    assert paper.root == root / "mp3"

    resemul = read_mtat(root, split_policy="resemul", top_k=3)
    assert resemul.split_counts() == (7, 1, 2) and resemul.min_duration is None
    assert [d["reason"] for d in resemul.dropped] == ["no tag", "no tag"]

    everything = read_mtat(root)  # top_k=50 but only 5 tags ever occur
    assert everything.tags == ["choral", "slow", "rock", "piano", "guitar"]
    assert everything.split_counts() == (5, 1, 3)  # clips 7 and 8 now have a tag
    assert [d["clip_id"] for d in everything.dropped] == ["100", "101", "102"]
    assert everything.clips["split"].tolist() == [mtat_split(p) for p in everything.clips["path"]]


def test_mtat_quoted_unquoted_and_flat_layouts_read_the_same(tmp_path):
    quoted = read_mtat(make_mtat(tmp_path / "q"), top_k=3)
    plain = read_mtat(make_mtat(tmp_path / "p", quoted=False, nested=False), top_k=3)
    assert plain.root == tmp_path / "p"
    assert plain.tags == quoted.tags
    pd.testing.assert_frame_equal(plain.clips, quoted.clips)
    np.testing.assert_array_equal(plain.labels, quoted.labels)


def test_mtat_official_tags_keep_the_official_order(tmp_path):
    root = tmp_path / "mtat"
    # descending column order with equal counts: a stable sort would reverse nothing useful,
    # the official order must win whenever the 50 selected tags are exactly specification §1.1's
    tags = list(reversed(MTAT_TOP50_TAGS))
    (root / "mp3" / "0").mkdir(parents=True)
    sf.write(root / "mp3" / "0" / "x.mp3", np.zeros(800, np.float32), RATE)
    header = "\t".join(["clip_id", *tags, "mp3_path"])
    row = "\t".join(["1", *["1"] * 50, "0/x.mp3"])
    (root / "annotations_final.csv").write_text(f"{header}\n{row}\n")
    assert read_mtat(root).tags == list(MTAT_TOP50_TAGS)


def test_mtat_real_size_warns_about_unexpected_counts(tmp_path, caplog):
    root = tmp_path / "mtat"
    (root / "mp3" / "0").mkdir(parents=True)
    sf.write(root / "mp3" / "0" / "c0.mp3", np.zeros(800, np.float32), RATE)
    paths = [f"{'0123456789abcdef'[i % 16]}/c{i}.mp3" for i in range(25_863)]
    frame = pd.DataFrame({"clip_id": range(25_863), "guitar": 1, "mp3_path": paths})
    frame.to_csv(root / "annotations_final.csv", sep="\t", index=False)
    with caplog.at_level(logging.WARNING, logger="resemul_core.data.sources"):
        source = read_mtat(root)
    assert "looks like the real MTAT" in caplog.text and "(15247, 1529, 4332)" in caplog.text
    assert source.split_counts() == (1, 0, 0) and source.expected_counts == (15_244, 1_529, 4_332)
    assert sum(d["reason"] == "missing file" for d in source.dropped) == 25_862


def test_mtat_errors_name_the_file_and_what_is_missing(tmp_path):
    root = make_mtat(tmp_path / "mtat")
    with pytest.raises(ValueError, match="unknown split policy 'lee'; valid policies: paper, re"):
        read_mtat(root, split_policy="lee")
    with pytest.raises(FileNotFoundError, match=r"elsewhere/annotations_final\.csv"):
        (tmp_path / "elsewhere").mkdir()
        read_mtat(tmp_path / "elsewhere")
    csv = root / "annotations_final.csv"
    text = csv.read_text()
    csv.write_text(text.replace('"mp3_path"', '"path"'))
    with pytest.raises(ValueError, match=r"annotations_final\.csv: missing column\(s\) 'mp3_path'"):
        read_mtat(root)
    csv.write_text(text.replace('"0"\t"0/one.mp3"', '"x"\t"0/one.mp3"'))
    with pytest.raises(ValueError, match=r"tag column 'slow' must hold 0 or 1; row 1 holds 'x'"):
        read_mtat(root)
    csv.write_text(text.replace('"0/one.mp3"', '"g/one.mp3"'))
    with pytest.raises(ValueError, match=r"row 1: mp3_path 'g/one.mp3' does not start"):
        read_mtat(root)


def prepare_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "data", "prepare", "--dataset", "mtat", "--root", str(root), "--out", str(out),
        "--top-k", "3", "--sample-rate", str(RATE), "--segment-length", "243",
        "--segments-per-clip", "4", "--clip-duration", "0.15", "--min-duration", "0.25",
        "--workers", "1", "--no-progress", *extra,
    ]  # fmt: skip


def test_mtat_prepare_via_cli_under_both_policies(tmp_path, capsys):
    root = make_mtat(tmp_path / "mtat")
    assert main(prepare_args(root, tmp_path / "paper")) == 0
    manifest = json.loads((tmp_path / "paper" / "manifest.json").read_text())
    assert manifest["counts"]["train"] == {"clips": 3, "segments": 12}  # short clip 9 skipped
    assert manifest["skip_counts"] == {"no tag": 2, "known broken": 3, "too short": 1}
    assert manifest["tags"] == ["rock", "piano", "guitar"]
    assert manifest["source"]["split_policy"] == "paper"

    assert main(prepare_args(root, tmp_path / "resemul", "--split-policy", "resemul")) == 0
    manifest = json.loads((tmp_path / "resemul" / "manifest.json").read_text())
    # the 0-byte files fail to decode, the 0.1 s clip keeps its 3 segments
    assert manifest["counts"]["train"] == {"clips": 4, "segments": 15}
    assert manifest["skip_counts"] == {"no tag": 2, "empty": 3}

    capsys.readouterr()
    assert main(["data", "info", str(tmp_path / "resemul")]) == 0
    out = capsys.readouterr().out
    assert "dataset      mtat" in out and "rock, piano, guitar" in out
    assert re.search(r"\ntrain +4 +15\n", out) and re.search(r"\nempty +3\n", out)
    assert main(["data", "info", str(tmp_path / "nothing")]) == 2
    assert "no such segment store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(prepare_args(root, tmp_path / "x", "--split-policy", "lee"))
    assert "invalid choice: 'lee'" in capsys.readouterr().err


# --- table ----------------------------------------------------------------------------------


def make_audio(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        sf.write(folder / name, np.full(800, 0.01 * k, np.float32), RATE)


def test_table_with_tag_columns_and_split_column(tmp_path):
    make_audio(tmp_path / "music", ["a.wav", "b.flac", "c.ogg"])
    table = tmp_path / "list.tsv"
    table.write_text(
        "path\tsplit\trock\tjazz\n"
        "music/a.wav\ttrain\t1\t0\n"
        "music/b.flac\tval\t1\t1\n"
        f"{tmp_path / 'music' / 'c.ogg'}\tTest\t0\t0\n"  # absolute paths work too
        "music/gone.wav\ttrain\t0\t1\n"
    )
    source = read_table(table)
    assert source.tags == ["rock", "jazz"] and source.root == tmp_path
    assert source.clips["split"].tolist() == ["train", "valid", "test"]
    np.testing.assert_array_equal(source.labels, [[1, 0], [1, 1], [0, 0]])
    assert source.dropped == [
        {
            "clip_id": "music/gone.wav",
            "path": "music/gone.wav",
            "split": "train",
            "reason": "missing file",
            "detail": f"no file under {tmp_path}",
        }
    ]
    only_jazz = read_table(table, tag_columns=["jazz"])
    assert only_jazz.tags == ["jazz"]


def test_table_with_tag_lists_and_a_seeded_split(tmp_path):
    names = [f"s{k}.wav" for k in range(10)]
    make_audio(tmp_path, names)
    tags = ["rock;guitar", "jazz", "", " rock ; piano", "jazz", "rock", "", "guitar", "pop", "pop"]
    pd.DataFrame({"file": names, "id": [f"id{k}" for k in range(10)], "tags": tags}).to_csv(
        tmp_path / "t.csv", index=False
    )
    source = read_table(tmp_path / "t.csv", path_column="file", id_column="id", seed=3)
    assert source.tags == ["guitar", "jazz", "piano", "pop", "rock"]
    np.testing.assert_array_equal(source.labels[3], [0, 0, 1, 0, 1])
    assert source.labels[2].sum() == 0
    assert source.split_counts() == (8, 1, 1)
    assert source.clips["clip_id"].tolist()[:2] == ["id0", "id1"]
    again = read_table(tmp_path / "t.csv", path_column="file", seed=3)
    other = read_table(tmp_path / "t.csv", path_column="file", seed=4)
    assert again.clips["split"].tolist() == source.clips["split"].tolist()
    assert other.clips["split"].tolist() != source.clips["split"].tolist()
    halves = read_table(tmp_path / "t.csv", path_column="file", fractions=(0.5, 0.3, 0.2))
    assert halves.split_counts() == (5, 3, 2)


def test_table_errors_name_the_file_and_the_problem(tmp_path):
    make_audio(tmp_path, ["a.wav"])
    table = tmp_path / "t.csv"
    with pytest.raises(FileNotFoundError, match=r"t\.csv: no such file"):
        read_table(table)
    table.write_text("file,rock\na.wav,1\n")
    with pytest.raises(ValueError, match=r"t\.csv: missing column\(s\) 'path'; found 'file'"):
        read_table(table)
    table.write_text("path,split,rock\na.wav,dev,1\n")
    with pytest.raises(ValueError, match=r"t\.csv: row 1: split 'dev' is not one of"):
        read_table(table)
    table.write_text("path,rock\na.wav,yes\n")
    with pytest.raises(ValueError, match=r"tag column 'rock' must hold 0 or 1"):
        read_table(table)
    table.write_text("path,rock\na.wav,1\na.wav,0\n")
    with pytest.raises(ValueError, match=r"clip id 'a.wav' occurs more than once"):
        read_table(table)
    table.write_text("path,rock\nb.wav,1\n")
    with pytest.raises(FileNotFoundError, match=r"none of the 1 audio files was found"):
        read_table(table)
    with pytest.raises(ValueError, match="unknown dataset 'gtzan'; valid datasets: mtat, msd"):
        read_source("gtzan", table)


def test_table_source_prepares_into_a_store(tmp_path):
    make_audio(tmp_path, ["a.wav", "b.wav"])
    (tmp_path / "t.csv").write_text("path,split,tags\na.wav,train,x\nb.wav,test,y;x\n")
    store = prepare_store(
        read_table(tmp_path / "t.csv"),
        tmp_path / "store",
        sample_rate=RATE,
        segment_length=200,
        segments_per_clip=10,
        progress=False,
        workers=1,
    )
    assert store.clips["num_segments"].tolist() == [4, 4]  # 800 samples / 200
    # 0.01 went through the wav's 16 bits and the store's: within two quantisation steps
    np.testing.assert_allclose(store.read_segment(1, 0), np.full(200, 0.01), rtol=0, atol=2**-14)


# --- MSD ------------------------------------------------------------------------------------


def make_msd(root: Path) -> None:
    ids = {
        "train": ["TRAAAAA128F00001", "TRBBBBB128F00002"],
        "valid": ["TRCCCCC128F00003"],
        "test": ["TRDDDDD128F00004", "TREEEEE128F00005"],
    }
    stems = {"train": ["1/2/12", "3/4/34"], "valid": ["5/6/56"], "test": ["7/8/78", "9/0/90"]}
    for split in ids:
        (root / f"{split}_x_msd_id.txt").write_text("\n".join(ids[split]) + "\n")
        (root / f"{split}_x_filename.txt").write_text("".join(f"{s}.npy\n" for s in stems[split]))
        y = np.zeros((len(ids[split]), 50), np.uint8)
        y[:, len(ids[split])] = 1
        np.save(root / f"{split}_y.npy", y)
    make_audio(root / "audio" / "1" / "2", ["12.clip.mp3"])
    make_audio(root / "audio" / "5" / "6", ["56.mp3"])
    make_audio(root / "audio" / "D" / "D" / "D", ["TRDDDDD128F00004.mp3"])
    make_audio(root / "audio", ["TREEEEE128F00005.mp3"])


def test_msd_finds_audio_by_pattern_and_drops_tracks_without_audio(tmp_path):
    make_msd(tmp_path)
    source = read_msd(tmp_path)
    assert source.tags == list(MSD_TOP50_TAGS)
    assert source.clips["path"].tolist() == [
        "1/2/12.clip.mp3",
        "5/6/56.mp3",
        "D/D/D/TRDDDDD128F00004.mp3",
        "TREEEEE128F00005.mp3",
    ]
    assert source.clips["split"].tolist() == ["train", "valid", "test", "test"]
    assert source.labels.shape == (4, 50) and source.labels[:, 2].tolist() == [1, 0, 1, 1]
    assert [(d["clip_id"], d["reason"]) for d in source.dropped] == [
        ("TRBBBBB128F00002", "missing file")
    ]
    assert "{stem}.clip.mp3" in source.dropped[0]["detail"]
    assert source.min_duration == 29.1


def test_msd_errors_list_what_was_searched(tmp_path):
    make_msd(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no MSD audio found under .*nowhere.*patterns"):
        (tmp_path / "nowhere").mkdir()
        read_msd(tmp_path, audio_dir=tmp_path / "nowhere")
    good = np.load(tmp_path / "valid_y.npy")
    np.save(tmp_path / "valid_y.npy", np.zeros((2, 50)))
    with pytest.raises(ValueError, match=r"valid_y\.npy: expected shape \(1, 50\)"):
        read_msd(tmp_path)
    np.save(tmp_path / "valid_y.npy", good)
    (tmp_path / "test_x_msd_id.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"test_x_msd_id\.txt"):
        read_msd(tmp_path)


def test_a_synthetic_folder_is_dataset_synth_and_real_mtat_stays_mtat(tmp_path):
    from resemul_core.data.synth import PARAMS_FILE

    assert SYNTH_MARKER == PARAMS_FILE and SOURCES["synth"] is read_synth
    root = make_mtat(tmp_path / "mtat")
    assert read_mtat(root).dataset == "mtat"
    with pytest.raises(FileNotFoundError, match="not a synthetic dataset"):
        read_source("synth", root)
    (root / SYNTH_MARKER).write_text("{}")  # what the synthetic generators write
    assert read_mtat(root).dataset == "synth"  # MTAT's layout, but not MTAT
    source = read_source("synth", root)
    assert source.dataset == "synth" and source.split_counts() == read_mtat(root).split_counts()


def test_data_info_of_a_synthetic_store_says_synth(tmp_path, capsys):
    root = make_mtat(tmp_path / "mtat")
    (root / SYNTH_MARKER).write_text("{}")
    assert main(prepare_args(root, tmp_path / "store", "--split-policy", "resemul")) == 0
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["dataset"] == "synth"
    capsys.readouterr()
    assert main(["data", "info", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "dataset      synth" in out and "mtat" not in out.split("dataset", 1)[1].split("\n")[0]


# --- duplicates and paths outside the root ----------------------------------------------------


def append_mtat_rows(root: Path, rows: list[tuple[str, str, set[str]]]) -> None:
    """Append rows (clip_id, mp3_path, tags) to a :func:`make_mtat` CSV, quoted like it."""
    csv = root / "annotations_final.csv"
    lines = [
        "\t".join(
            f'"{f}"' for f in [clip_id, *("1" if t in tags else "0" for t in MTAT_TAGS), path]
        )
        for clip_id, path, tags in rows
    ]
    csv.write_text(csv.read_text() + "\n".join(lines) + "\n")


def test_mtat_duplicate_clip_ids_rows_and_paths_are_dropped_and_listed(tmp_path):
    root = make_mtat(tmp_path / "mtat")
    make_audio(root / "mp3" / "0", ["other.mp3"])
    append_mtat_rows(
        root,
        [
            ("1", "0/other.mp3", {"choral"}),  # row 13: clip_id of row 1, another file
            ("2", "5/two.mp3", {"guitar"}),  # row 14: row 2 repeated exactly
            ("50", "c/four.mp3", {"slow"}),  # row 15: the file of row 4 under a new id
        ],
    )
    source = read_mtat(root, top_k=3)
    # the first occurrences stay, and the repeats do not count towards the tag ranking
    assert source.tags == ["rock", "piano", "guitar"]
    assert source.clips["clip_id"].tolist() == ["1", "2", "3", "4", "5", "6", "9"]
    assert source.clips["path"].tolist()[:2] == ["0/one.mp3", "5/two.mp3"]
    np.testing.assert_array_equal(source.labels[0], [1, 0, 1])
    assert source.dropped[:3] == [
        {
            "clip_id": "1",
            "path": "0/other.mp3",
            "split": "train",
            "reason": "duplicate clip_id",
            "detail": "row 13 of annotations_final.csv repeats clip_id '1' of row 1",
        },
        {
            "clip_id": "2",
            "path": "5/two.mp3",
            "split": "train",
            "reason": "duplicate clip_id",
            "detail": "row 14 of annotations_final.csv repeats clip_id '2' of row 2"
            " (the whole row is identical)",
        },
        {
            "clip_id": "50",
            "path": "c/four.mp3",
            "split": "valid",
            "reason": "duplicate path",
            "detail": "row 15 of annotations_final.csv repeats mp3_path 'c/four.mp3' of row 4"
            " (clip_id '4')",
        },
    ]
    assert [d["reason"] for d in source.dropped[3:]] == ["no tag"] * 2 + ["known broken"] * 3
    assert source.split_counts() == (4, 1, 2)


def test_mtat_and_table_reject_a_duplicated_column_header(tmp_path):
    root = make_mtat(tmp_path / "mtat")
    csv = root / "annotations_final.csv"
    header, rest = csv.read_text().split("\n", 1)
    csv.write_text(header.replace('"never"', '"piano"') + "\n" + rest)  # pandas: 'piano.1'
    with pytest.raises(
        ValueError,
        match=r"annotations_final\.csv: column 'piano' occurs more than once in the header"
        r" \(columns 4 and 5\)",
    ):
        read_mtat(root)
    make_audio(tmp_path, ["a.wav"])
    (tmp_path / "t.csv").write_text("path,rock,jazz, rock\na.wav,1,0,1\n")
    with pytest.raises(ValueError, match=r"t\.csv: column 'rock' occurs more than once"):
        read_table(tmp_path / "t.csv")


def test_mtat_paths_outside_the_root_are_dropped_unopened(tmp_path):
    root = make_mtat(tmp_path / "mtat")
    make_audio(root, ["escaped.mp3"])  # a real file, but beside mp3/, not in it
    make_audio(root / "mp3" / "5", ["inside.mp3"])
    append_mtat_rows(
        root,
        [
            ("60", "0/../../../../etc/passwd", {"guitar"}),
            ("61", "/etc/passwd", {"guitar"}),
            ("62", "0/../../escaped.mp3", {"guitar"}),
            ("63", "c/../5/inside.mp3", {"guitar"}),  # stays inside: kept, as train
        ],
    )
    source = read_mtat(root, top_k=3)
    audio_root = root / "mp3"
    skips = [
        (d["clip_id"], d["path"], d["split"], d["reason"], d["detail"]) for d in source.dropped
    ]
    assert skips[:3] == [
        ("60", "0/../../../../etc/passwd", "train", "path outside root",
         f"row 13 of annotations_final.csv: '0/../../../../etc/passwd' is not inside {audio_root}"),
        ("61", "/etc/passwd", "", "path outside root",
         f"row 14 of annotations_final.csv: '/etc/passwd' is not inside {audio_root}"),
        ("62", "0/../../escaped.mp3", "train", "path outside root",
         f"row 15 of annotations_final.csv: '0/../../escaped.mp3' is not inside {audio_root}"),
    ]  # fmt: skip
    assert [d["reason"] for d in source.dropped[3:]] == ["no tag"] * 2 + ["known broken"] * 3
    assert source.clips["clip_id"].tolist() == ["1", "2", "3", "4", "5", "6", "9", "63"]
    assert source.clips.iloc[-1].tolist() == ["63", "5/inside.mp3", "train"]


def test_mtat_follows_symlinks_inside_the_root(tmp_path):
    root = make_mtat(tmp_path / "mtat")
    make_audio(tmp_path / "elsewhere", ["linked.mp3"])
    (root / "mp3" / "7").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    append_mtat_rows(root, [("70", "7/linked.mp3", {"guitar"})])
    source = read_mtat(root, top_k=3)
    assert source.clips["clip_id"].tolist()[-1] == "70"
    assert all(d["clip_id"] != "70" for d in source.dropped)


def write_msd_split(root: Path, split: str, ids: list[str], stems: list[str]) -> None:
    (root / f"{split}_x_msd_id.txt").write_text("".join(f"{i}\n" for i in ids))
    (root / f"{split}_x_filename.txt").write_text("".join(f"{s}.npy\n" for s in stems))
    y = np.zeros((len(ids), 50), np.uint8)
    y[:, 0] = 1
    np.save(root / f"{split}_y.npy", y)


def test_msd_duplicates_and_paths_outside_the_root_are_dropped_and_listed(tmp_path):
    make_msd(tmp_path)
    make_audio(tmp_path, ["escaped.clip.mp3"])  # beside audio/, not in it
    write_msd_split(
        tmp_path,
        "valid",
        ["TRCCCCC128F00003", "TRAAAAA128F00001", "TRFFFFF128F00006", "TRGGGGG128F00007"],
        ["5/6/56", "1/2/12", "../escaped", "5/6/56"],
    )
    source = read_msd(tmp_path)
    audio = tmp_path / "audio"
    assert source.clips["clip_id"].tolist() == [
        "TRAAAAA128F00001",
        "TRCCCCC128F00003",
        "TRDDDDD128F00004",
        "TREEEEE128F00005",
    ]
    assert source.labels.shape == (4, 50)
    assert [(d["clip_id"], d["split"], d["reason"], d["detail"]) for d in source.dropped] == [
        ("TRAAAAA128F00001", "valid", "duplicate clip_id",
         "track 2 of valid_x_msd_id.txt repeats track 1 of train_x_msd_id.txt"),
        ("TRFFFFF128F00006", "valid", "path outside root",
         f"'../escaped.clip.mp3' is not inside {audio}"),
        ("TRBBBBB128F00002", "train", "missing file",
         f"no file under {audio} matching {list(MSD_PATH_PATTERNS)}"),
        ("TRGGGGG128F00007", "valid", "duplicate path",
         "'5/6/56.mp3' is already the audio of TRCCCCC128F00003 (track 1 of valid_x_msd_id.txt)"),
    ]  # fmt: skip


def test_msd_ids_too_short_for_the_path_patterns_are_skipped(tmp_path):
    make_msd(tmp_path)
    write_msd_split(tmp_path, "valid", ["TRCCCCC128F00003", "TR1"], ["5/6/56", ""])
    source = read_msd(tmp_path)
    assert "TR1" not in source.clips["clip_id"].tolist()
    assert [(d["clip_id"], d["reason"], d["detail"]) for d in source.dropped][0] == (
        "TR1",
        "malformed id",
        "track 2 of valid_x_msd_id.txt: 'TR1' is not a Million Song Dataset track id",
    )
