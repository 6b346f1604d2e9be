"""Checkpoints: round trip, weights_only loading, clear errors for bad files, version 1."""

import re

import pytest
import torch

from resemul_core import build_model
from resemul_core.files import write_json, write_text
from resemul_core.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    save_payload,
    upgrade_state_dict,
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


# Version 2 names -> the nn.Sequential indices of version 1 (the inverse of upgrade_state_dict).
_TO_V1 = [
    (r"^stem\.conv\.", "stem.0."),
    (r"^stem\.bn\.", "stem.1."),
    (r"^(blocks\.\d+)\.shortcut\.conv\.", r"\1.shortcut.0."),
    (r"^(blocks\.\d+)\.shortcut\.bn\.", r"\1.shortcut.1."),
    (r"^(blocks\.\d+)\.conv1\.", r"\1.main.0."),
    (r"^(blocks\.\d+)\.bn1\.", r"\1.main.1."),
    (r"^(blocks\.\d+)\.conv2\.", r"\1.main.4."),
    (r"^(blocks\.\d+)\.bn2\.", r"\1.main.5."),
    (r"^head\.fc1\.", "head.0."),
    (r"^head\.bn\.", "head.1."),
    (r"^head\.fc2\.", "head.4."),
]


def _to_v1(state):
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in _TO_V1:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def _save_v1(path, model, **extra):
    """A version-1 file: the payload ``save_checkpoint`` wrote before layers had names."""
    payload = torch.load(save_checkpoint(path, model=model, tags=TAGS, **extra), weights_only=True)
    payload["version"] = 1
    payload.pop("checksum")  # version 1 had none
    payload["model_state"] = _to_v1(payload["model_state"])
    torch.save(payload, path)
    return path


def test_upgrade_renames_the_sequential_indices():
    model = _model()
    old = _to_v1(model.state_dict())
    assert {"stem.0.weight", "blocks.0.main.4.weight", "blocks.2.shortcut.1.running_var"} <= set(
        old
    )
    assert {"head.0.weight", "head.1.bias", "head.4.bias"} <= set(old)
    new = upgrade_state_dict(old, model.config)
    assert list(new) == list(model.state_dict())  # same keys, same order
    assert upgrade_state_dict(model.state_dict(), model.config).keys() == new.keys()  # no-op
    torch.manual_seed(0)
    res1 = build_model("res1", num_tags=5, width=1 / 16, num_blocks=4)
    old = _to_v1(res1.state_dict())
    assert "blocks.0.main.1.weight" in old and "blocks.0.main.4.weight" not in old
    assert list(upgrade_state_dict(old, res1.config)) == list(res1.state_dict())


@pytest.mark.parametrize("name", ["rese2-multi", "res1", "se"])
def test_version_1_checkpoint_loads_with_identical_outputs(tmp_path, name):
    torch.manual_seed(0)
    model = build_model(name, num_tags=5, width=1 / 16, num_blocks=4).train()
    model(torch.randn(8, 243))  # running statistics away from their initial values
    model.eval()
    path = _save_v1(tmp_path / "v1.pt", model, epoch=2)
    assert torch.load(path, weights_only=True)["version"] == 1
    loaded, payload = load_checkpoint(path)
    assert payload["version"] == 3 and payload["epoch"] == 2
    x = torch.randn(3, 243)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_version_1_training_state_resumes_the_optimizer(tmp_path):
    torch.manual_seed(0)
    model = build_model("rese2-multi", num_tags=5, width=1 / 16, num_blocks=4).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.randn(4, 243)
    model(x).square().mean().backward()
    optimizer.step()
    path = _save_v1(tmp_path / "last.pt", model, optimizer_state=optimizer.state_dict())
    payload = read_checkpoint(path)
    resumed = build_model("rese2-multi", num_tags=5, width=1 / 16, num_blocks=4).train()
    resumed.load_state_dict(payload["model_state"])
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    resumed_opt.load_state_dict(payload["optimizer_state"])  # keyed by parameter index
    for net, opt in ((model, optimizer), (resumed, resumed_opt)):
        opt.zero_grad()
        torch.manual_seed(5)  # the same dropout masks
        net(x).square().mean().backward()
        opt.step()
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_unknown_version_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", model=_model(), tags=TAGS)
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="c.pt has format version 99.*reads versions 1, 2, 3"):
        read_checkpoint(path)


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
    save_payload(path, payload)  # a consistent file whose weights do not fit its config
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
