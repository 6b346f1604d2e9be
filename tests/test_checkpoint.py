"""Checkpoints: round trip, weights_only loading, clear errors for bad files."""

import pytest
import torch

from resemul_core import build_model
from resemul_core.files import write_json, write_text
from resemul_core.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from resemul_core.training.run_dir import load_model, resolve_checkpoint

TAGS = [f"tag{i}" for i in range(5)]


def _model():
    torch.manual_seed(0)
    return build_model("rese2-multi", num_tags=5, width=1 / 16, num_blocks=4).eval()


def test_round_trip_rebuilds_the_same_model(tmp_path):
    model = _model()
    path = save_checkpoint(tmp_path / "best.pt", model=model, tags=TAGS, epoch=3)
    loaded, payload = load_model(tmp_path)  # a run directory resolves to best.pt
    x = torch.randn(2, 243)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert payload["tags"] == TAGS and payload["epoch"] == 3
    assert loaded.config == model.config
    raw = torch.load(path, weights_only=True)  # plain, safe format
    assert raw["model_config"]["block"] == "rese2"


def test_truncated_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", model=_model(), tags=TAGS)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="c.pt is corrupted or truncated"):
        load_checkpoint(path)


def test_foreign_files_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a resemul checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    write_text(tmp_path / "text.pt", "hello")
    with pytest.raises(CheckpointError, match="text.pt"):
        read_checkpoint(tmp_path / "text.pt")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", model=_model(), tags=TAGS)
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["width"] = 0.125
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="does not match its model config"):
        load_checkpoint(path)


def test_missing_paths_name_themselves(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt does not exist"):
        resolve_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(FileNotFoundError, match="has no best.pt"):
        resolve_checkpoint(tmp_path)


def test_tag_count_must_match_outputs(tmp_path):
    with pytest.raises(ValueError, match="3 tag names for a model with 5 outputs"):
        save_checkpoint(tmp_path / "c.pt", model=_model(), tags=TAGS[:3])


def test_failed_write_keeps_the_previous_file(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        write_json(tmp_path / "m.json", {"a": Unserialisable()})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary left behind
