"""Tests of resemul_core.interfaces.tagger and ``resemul tag`` on generated audio files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from resemul_core.interfaces.cli import main as cli_main
from resemul_core.interfaces.tagger import Tagger
from resemul_core.model.checkpoint import save_checkpoint
from resemul_core.model.sample_cnn import build_model

LENGTH = 3**5  # samples per segment of a 4-block model
TAGS = ["one", "two", "three"]
AUDIO = {"sample_rate": 22_050, "segment_length": LENGTH, "segments_per_clip": 3, "duration": None}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("rese2-multi", num_tags=3, width=1 / 16, num_blocks=4)
    path = tmp_path_factory.mktemp("run") / "best.pt"
    save_checkpoint(path, model=model, tags=TAGS, audio=AUDIO)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Odd lengths, rates and channel counts; the flac is shorter than one segment."""
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    stereo = 0.3 * rng.standard_normal((1_001, 2))  # 44.1 kHz: 500 samples at 22.05 kHz
    mono = 0.3 * np.sin(np.arange(5_003) * 0.05)  # 22.05 kHz: 20 segments, 3 used
    short = 0.3 * rng.standard_normal(101)  # 16 kHz: ~139 samples < 243
    sf.write(root / "stereo.wav", stereo, 44_100)
    sf.write(root / "long.mp3", mono, 22_050)
    sf.write(root / "short.flac", short, 16_000)
    return {name: root / name for name in ("stereo.wav", "long.mp3", "short.flac")}


def test_segments_follow_the_checkpoint(checkpoint, files):
    tagger = Tagger.from_checkpoint(checkpoint.parent, device="cpu")
    assert (tagger.sample_rate, tagger.segment_length, tagger.segments_per_clip) == (
        22_050,
        LENGTH,
        3,
    )
    assert tagger.segments(files["stereo.wav"]).shape == (2, LENGTH)
    assert tagger.segments(files["long.mp3"]).shape == (3, LENGTH)
    short = tagger.segments(files["short.flac"])
    assert short.shape == (1, LENGTH)
    assert np.abs(short[0, :130]).max() > 0 and not short[0, 145:].any()  # zero-padded tail
    every = Tagger.from_checkpoint(checkpoint, device="cpu", segments_per_clip=None)
    assert every.segments(files["long.mp3"]).shape[0] >= 20


def test_predict_is_the_mean_of_segment_probabilities(checkpoint):
    tagger = Tagger.from_checkpoint(checkpoint, device="cpu")
    waveform = np.random.default_rng(1).uniform(-0.5, 0.5, 3 * LENGTH + 17).astype(np.float32)
    segments = torch.from_numpy(waveform[: 3 * LENGTH].reshape(3, LENGTH))
    with torch.no_grad():
        expected = torch.sigmoid(tagger.model(segments)).mean(dim=0).numpy()
    np.testing.assert_allclose(tagger.predict(waveform), expected, rtol=1e-6)
    stereo = np.stack([waveform, waveform])  # (channels, samples) is averaged to mono
    np.testing.assert_allclose(tagger.predict(stereo), expected, rtol=1e-6)
    ranked = tagger.tag(waveform, top_k=None)
    assert [t for t, _ in ranked] == [TAGS[k] for k in np.argsort(-expected)]
    assert [p for _, p in ranked] == sorted(expected.tolist(), reverse=True)
    assert len(tagger.tag(waveform, top_k=2)) == 2
    with pytest.raises(ValueError, match="channels, samples"):
        tagger.predict(np.zeros((LENGTH, 2), dtype=np.float32))


def test_cli_tag_text_and_json(checkpoint, files, tmp_path, capsys):
    paths = [str(p) for p in files.values()]
    assert (
        cli_main(
            ["tag", *paths, "--checkpoint", str(checkpoint), "--top-k", "2", "--device", "cpu"]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0] == paths[0] and len(out) == 3 * 3
    assert all(line.startswith("  ") and line.split()[-1].startswith("0.") for line in out[1:3])

    broken = tmp_path / "broken.mp3"
    broken.write_bytes(b"not audio at all")
    code = cli_main(
        [
            "tag",
            paths[2],
            str(broken),
            "--checkpoint",
            str(checkpoint),
            "--json",
            "--top-k",
            "0",
            "--device",
            "cpu",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1 and "broken.mp3" in captured.err
    data = json.loads(captured.out)
    assert [d["file"] for d in data] == [paths[2]]
    probs = [t["probability"] for t in data[0]["tags"]]
    assert {t["tag"] for t in data[0]["tags"]} == set(TAGS) and probs == sorted(probs)[::-1]
    tagger = Tagger.from_checkpoint(checkpoint, device="cpu")
    assert probs[0] == pytest.approx(float(tagger.predict(files["short.flac"]).max()))


def test_tag_store_clips_shows_every_tag_list_in_full(checkpoint, files):
    from types import SimpleNamespace

    import pandas as pd

    from resemul_core.interfaces.tagger import TagTable, tag_store_clips

    long_tags = [f"a rather long tag name {k}" for k in range(3)]
    store = SimpleNamespace(
        audio_path=lambda i: files["long.mp3"],
        clips=pd.DataFrame({"clip_id": ["c0"]}),
        tags=long_tags,
        labels=np.ones((1, 3), dtype=np.uint8),
    )
    tagger = Tagger.from_checkpoint(checkpoint, device="cpu")
    table = tag_store_clips(tagger, store, [0], top_k=3)
    assert isinstance(table, TagTable) and list(table.columns) == [
        "clip_id",
        "file",
        "predicted",
        "true",
    ]
    true = ", ".join(long_tags)
    assert table["true"].iat[0] == true and len(true) > 50  # longer than pandas shows
    assert len(table["predicted"].iat[0].split(", ")) == 3
    for text in (table._repr_html_(), repr(table)):
        assert true in text and table["predicted"].iat[0] in text and "..." not in text
    assert isinstance(table.head(1), TagTable)  # operations keep the full display
