"""Tests of resemul_core.profiles: the profiles and the one resolver of a run's settings."""

from __future__ import annotations

import dataclasses

import pytest

from resemul_core.config import (
    KERAS_BN_MOMENTUM,
    ModelConfig,
    RunConfig,
    RuntimeConfig,
    TrainConfig,
    model_config,
)
from resemul_core.profiles import (
    PROFILES,
    apply_overrides,
    get_profile,
    parse_overrides,
    resolve_config,
    setting_names,
)

SECTIONS = {"model": ModelConfig, "train": TrainConfig, "runtime": RuntimeConfig}


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# --- routing ----------------------------------------------------------------------------------


def test_every_setting_name_is_unique_across_the_sections():
    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
    qualified = setting_names()
    assert {name.partition(".")[0] for name in qualified} == set(SECTIONS)
    assert "model.width" in qualified and "train.seed" in qualified
    assert "runtime.device" in qualified
    assert "model.block" not in qualified and "model.multi" not in qualified
    assert len(qualified) == len(names) - 2


def test_bare_names_are_routed_to_their_owner():
    config = resolve_config("se-multi", "paper", {"width": 0.125, "seed": 3, "device": "cpu"})
    assert config.model.width == 0.125
    assert config.train.seed == 3
    assert config.runtime.device == "cpu"
    # everything else stays the paper's (and the paper profile's one runtime setting)
    assert config == RunConfig(
        model_config("se-multi", width=0.125),
        TrainConfig(seed=3),
        RuntimeConfig(device="cpu", num_workers=6),
    )
    assert config.variant == "se-multi" and config.model.block == "se" and config.model.multi
    flat = config.flat()
    assert flat["model.width"] == 0.125 and flat["train.seed"] == 3
    assert flat["runtime.device"] == "cpu"


def test_qualified_names_are_routed_and_checked():
    config = resolve_config(
        "basic", "paper", {"model.width": 0.25, "train.batch_size": 7, "runtime.num_workers": 0}
    )
    assert config.model.width == 0.25
    assert config.train.batch_size == 7
    assert config.runtime.num_workers == 0
    with pytest.raises(ValueError, match=r"unknown setting 'train\.width'"):
        resolve_config("basic", "paper", {"train.width": 0.25})
    with pytest.raises(ValueError, match=r"unknown setting 'optimizer\.seed'"):
        resolve_config("basic", "paper", {"optimizer.seed": 1})


def test_an_unknown_setting_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown setting 'widht'; valid settings: ") as err:
        resolve_config("basic", "tiny", {"widht": 0.5})
    listed = str(err.value).partition("valid settings: ")[2].split(", ")
    assert sorted(listed) == sorted(name.partition(".")[2] for name in setting_names())
    assert "width" in listed and "seed" in listed and "device" in listed
    with pytest.raises(ValueError, match="unknown setting 'lr'; valid settings: .*learning_rate"):
        apply_overrides(resolve_config("basic"), {"lr": 0.1})
    with pytest.raises(ValueError, match="unknown setting 'lr'"):
        parse_overrides(["lr=0.1"])


@pytest.mark.parametrize("key", ["block", "multi", "model.block", "model.multi"])
def test_block_and_multi_are_fixed_by_the_variant(key):
    value = "res1" if key.endswith("block") else True
    with pytest.raises(ValueError, match="is fixed by the variant; choose another variant"):
        resolve_config("basic", "paper", {key: value})
    with pytest.raises(ValueError, match="is fixed by the variant"):
        apply_overrides(resolve_config("basic"), {key: value})
    with pytest.raises(ValueError, match="is fixed by the variant"):
        parse_overrides([f"{key}={value}"])


def test_overrides_beat_the_profile_and_invalid_values_are_refused():
    demo = resolve_config("basic", "demo", {"width": 0.125, "num_stages": 3})
    assert demo.model.width == 0.125 and demo.train.num_stages == 3
    assert demo.model.bn_momentum == 0.1 and demo.train.precision == "bf16"  # the rest: demo's
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        resolve_config("basic", "paper", {"precision": "fp16"})
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        resolve_config("basic", "paper", {"batch_size": 0})
    with pytest.raises(ValueError, match="checkpoint_every must be > 0"):
        resolve_config("basic", "paper", {"checkpoint_every": 0})
    with pytest.raises(ValueError, match="unknown variant 'vgg'; valid variants: basic"):
        resolve_config("vgg", "paper")
    with pytest.raises(ValueError, match="unknown profile 'fast'; valid profiles: paper, demo"):
        resolve_config("basic", "fast")


def test_apply_overrides_returns_a_new_config():
    config = resolve_config("res2", "tiny")
    changed = apply_overrides(config, {"seed": 5, "sync_bn": False, "alpha": 8.0})
    assert (changed.train.seed, changed.runtime.sync_bn, changed.model.alpha) == (5, False, 8.0)
    assert (config.train.seed, config.runtime.sync_bn, config.model.alpha) == (0, True, 16.0)
    assert apply_overrides(config, {}) == config


# --- the store's facts ------------------------------------------------------------------------


def test_the_store_sets_num_tags_and_num_blocks():
    config = resolve_config("basic", "tiny", num_tags=3, segment_length=243)
    assert (config.model.num_tags, config.model.num_blocks) == (3, 4)
    assert config.model.segment_length == 243
    paper = resolve_config("basic", "paper", num_tags=50, segment_length=59_049)
    assert (paper.model.num_tags, paper.model.num_blocks) == (50, 9)
    # an override that agrees with the data is accepted
    same = resolve_config(
        "basic", "tiny", {"num_tags": 3, "model.num_blocks": 4}, num_tags=3, segment_length=243
    )
    assert same == config


@pytest.mark.parametrize("key", ["num_tags", "model.num_tags"])
def test_a_num_tags_override_that_contradicts_the_store_is_an_error(key):
    """Not silently replaced by the store's number (a named defect of the earlier design)."""
    with pytest.raises(
        ValueError,
        match=r"num_tags=50 was asked for, but the data gives num_tags=3 \(from its tags\)",
    ):
        resolve_config("basic", "tiny", {key: 50}, num_tags=3, segment_length=243)


def test_a_num_blocks_override_that_contradicts_the_store_is_an_error():
    with pytest.raises(
        ValueError,
        match=r"num_blocks=9 was asked for, but the data gives num_blocks=4 \(from its segment",
    ):
        resolve_config("basic", "paper", {"num_blocks": 9}, num_tags=3, segment_length=243)
    with pytest.raises(ValueError, match="segment length 1000 is not 3"):
        resolve_config("basic", "paper", num_tags=3, segment_length=1000)


# --- parsing key=value ------------------------------------------------------------------------


def test_parse_overrides_reads_each_fields_type():
    parsed = parse_overrides(
        [
            "width=0.125",
            "seed=3",
            "nesterov=false",
            "compile=yes",
            "sync_bn=0",
            "data_on_device=On",
            "max_steps_per_epoch=none",
            "val_segments=40",
            "learning_rate=1e-3",
            "device=cuda:1",
            "precision=bf16",
            "model.alpha=8",
            " num_stages = 2 ",
        ]
    )
    assert parsed == {
        "width": 0.125,
        "seed": 3,
        "nesterov": False,
        "compile": True,
        "sync_bn": False,
        "data_on_device": True,
        "max_steps_per_epoch": None,
        "val_segments": 40,
        "learning_rate": 0.001,
        "device": "cuda:1",
        "precision": "bf16",
        "alpha": 8.0,
        "num_stages": 2,
    }
    types = {k: type(v) for k, v in parsed.items()}
    assert types["seed"] is int and types["val_segments"] is int and types["num_stages"] is int
    assert types["alpha"] is float and types["width"] is float
    assert types["nesterov"] is bool and types["compile"] is bool
    assert parse_overrides("width=0.5, seed=2 val_segments=null") == {
        "width": 0.5,
        "seed": 2,
        "val_segments": None,
    }
    assert parse_overrides(None) == {} and parse_overrides("") == {} and parse_overrides([]) == {}
    config = resolve_config("basic", "tiny", parse_overrides(["seed=3", "val_segments=none"]))
    assert config.train.seed == 3 and config.train.val_segments is None


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("seed=three", "setting seed='three': expected int"),
        ("seed=3.5", "setting seed='3.5': expected int"),
        ("width=wide", "setting width='wide': expected float"),
        ("model.width=", "setting model.width='': expected float"),
        ("nesterov=maybe", "setting nesterov='maybe': expected bool"),
        ("seed=none", "setting seed='none': expected int"),  # not optional
        ("width", "override 'width' is not of the form key=value"),
        ("=3", "override '=3' is not of the form key=value"),
    ],
)
def test_parse_overrides_refuses_bad_values(item, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_overrides([item])


# --- the profiles -----------------------------------------------------------------------------


def test_get_profile():
    assert get_profile("demo") is PROFILES["demo"]
    assert list(PROFILES) == ["paper", "demo", "demo-excitations", "gpu", "tiny"]
    with pytest.raises(ValueError, match="unknown profile 'fast'; valid profiles: paper, demo"):
        get_profile("fast")


@pytest.mark.parametrize("name", list(PROFILES))
def test_each_profile_resolves_to_its_own_table(name):
    profile = PROFILES[name]
    config = resolve_config("se-multi", name)
    paper = RunConfig(model_config("se-multi"))  # the dataclasses' defaults: the paper's
    for key, value in profile.overrides.items():
        section = next(s for s, cls in SECTIONS.items() if key in field_names(cls))
        assert getattr(getattr(config, section), key) == value, (name, key)
    for section, cls in SECTIONS.items():  # and every setting not in the table is the paper's
        for key in field_names(cls) - set(profile.overrides):
            want = getattr(getattr(paper, section), key)
            assert getattr(getattr(config, section), key) == want, (name, key)


def test_profiles_state_their_values():
    demo = resolve_config("basic", "demo")
    assert demo.model.width == 1 / 16 and demo.model.bn_momentum == 0.1
    assert demo.train.num_stages == 2 and demo.train.max_epochs_per_stage == 3
    assert demo.train.max_steps_per_epoch == 120 and demo.train.val_segments == 230
    assert demo.train.precision == "bf16" and demo.runtime.checkpoint_every == 120
    assert demo.train.learning_rate == 0.04 and demo.train.lr_factor == 0.2
    excitations = resolve_config("se-multi", "demo-excitations")
    assert excitations.model == resolve_config("se-multi", "demo").model  # demo's sizes
    assert excitations.train.learning_rate == 0.1 and excitations.train.num_stages == 3
    assert excitations.train.max_epochs_per_stage * excitations.train.max_steps_per_epoch == 360
    gpu = resolve_config("basic", "gpu")
    assert gpu.model.width == 1.0 and gpu.model.bn_momentum == KERAS_BN_MOMENTUM
    assert gpu.train.num_stages == 2 and gpu.train.max_epochs_per_stage == 3
    assert gpu.train.max_steps_per_epoch == 1000 and gpu.train.val_segments == 2300
    assert gpu.train.precision == "bf16" and gpu.runtime.data_on_device
    tiny = resolve_config("basic", "tiny")
    assert tiny.model.width == 1 / 16 and tiny.model.bn_momentum == 0.1
    assert tiny.train.num_stages == 2 and tiny.train.max_epochs_per_stage == 3
    assert tiny.train.max_steps_per_epoch == 10 and tiny.train.val_segments == 230
    assert tiny.train.precision == "bf16" and tiny.runtime.checkpoint_every == 5
    assert tiny.train.learning_rate == 0.01  # a smoke test: the paper's rate, 60 steps at most
    paper = resolve_config("basic", "paper")
    assert paper.model == model_config("basic") and paper.train == TrainConfig()
    assert paper.train.precision == "fp32" and paper.train.num_stages == 5
    assert paper.runtime == RuntimeConfig(num_workers=6)
    # every profile leaves the device to the machine unless told
    assert {resolve_config("basic", p).runtime.device for p in PROFILES} == {"auto"}
