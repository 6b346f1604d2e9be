"""The twelve variants: exact parameter counts, shapes, init, BN settings, errors.

Specification §2.
"""

import hashlib
import math

import pytest
import torch
from torch import nn

from resemul_core import VARIANTS, ModelConfig, SampleCNN, build_model, count_parameters
from resemul_core.config import model_config
from resemul_core.model.blocks import Head, ResidualBlock, Shortcut, Stem
from resemul_core.model.sample_cnn import architecture_summary, reset_parameters, variant_table

# specification §2.4: (trainable, total incl. BN moving statistics) at width 1.0, 50 tags, alpha 16.
PAPER_COUNTS = {
    "basic": (1_869_874, 1_875_762),
    "basic-multi": (2_683_442, 2_690_354),
    "se": (23_929_138, 23_935_026),
    "se-multi": (24_742_706, 24_749_618),
    "res1": (2_036_018, 2_043_442),
    "res1-multi": (2_849_586, 2_858_034),
    "res2": (4_107_314, 4_119_346),
    "res2-multi": (4_920_882, 4_933_938),
    "rese1": (24_095_282, 24_102_706),
    "rese1-multi": (24_908_850, 24_917_298),
    "rese2": (26_166_578, 26_178_610),
    "rese2-multi": (26_980_146, 26_993_202),
}
SMALL = {"width": 1 / 16, "num_blocks": 4}  # 243-sample input, fast on CPU

# SHA-256 of every state-dict tensor's bytes, in state-dict order, of SMALL models built under
# torch.manual_seed(0) by the code that used nn.Sequential stems, heads and residual paths
# (checkpoint version 1). Equal digests: the named modules draw the same random numbers in the
# same order, and parameters and buffers come in the same order (optimizer states still fit).
LEGACY_INIT_DIGESTS = {
    ("se-multi", "keras"): "38e313f732a70707027fe4ff8d496cfcfa33ac1c4cc76b499e207710f33d6247",
    ("res1", "keras"): "c25129f845f162d4c5e7709d565ef7af22623c388f41e3036ea1e9ed9a029731",
    ("rese2-multi", "keras"): "f8954a2f505f96936d5e6efb90049169da3ffb1f2cfa98e664516c77ab26d564",
    ("res2-multi", "he"): "48ad606d5d8cd5b332aaa46706214b6ac0de4ada7b95bec860c3cc18dc52ddc0",
}


def test_registry_names_the_twelve_variants():
    assert list(VARIANTS) == list(PAPER_COUNTS)


@pytest.mark.parametrize("name", list(PAPER_COUNTS))
def test_parameter_counts_match_the_paper_exactly(name):
    model = build_model(name)
    trainable, total = PAPER_COUNTS[name]
    assert count_parameters(model) == trainable
    assert count_parameters(model, trainable_only=False) == total


def test_variant_table_matches_real_models():
    rows = {row["variant"]: row for row in variant_table()}
    assert {k: (r["trainable"], r["total"]) for k, r in rows.items()} == PAPER_COUNTS


@pytest.mark.parametrize("name", ["basic", "rese2-multi"])
def test_block_lengths_and_widths_at_paper_size(name):
    model = build_model(name).eval()
    with torch.no_grad():
        outputs = model.block_outputs(torch.randn(2, 59049))
    assert [o.shape[-1] for o in outputs] == [19683, 6561, 2187, 729, 243, 81, 27, 9, 3, 1]
    assert [o.shape[1] for o in outputs] == [128, 128, 128, 256, 256, 256, 256, 256, 256, 512]
    with torch.no_grad():
        assert model(torch.randn(2, 1, 59049)).shape == (2, 50)


@pytest.mark.parametrize("name", ["se", "se-multi", "rese1", "rese2-multi"])
def test_excitations_one_per_block_with_block_width(name):
    model = build_model(name, width=0.25).eval()
    x = torch.randn(3, 59049)
    with torch.no_grad():
        logits, gates = model.forward_with_gates(x)
        assert torch.equal(logits, model(x))
    assert logits.shape == (3, 50)
    assert [tuple(g.shape) for g in gates] == [(3, c) for c in [32, 32] + [64] * 6 + [128]]
    assert all(((g > 0) & (g < 1)).all() for g in gates)


def test_variants_without_se_return_no_excitations():
    model = build_model("res2", **SMALL).eval()
    logits, gates = model.forward_with_gates(torch.randn(2, 243))
    assert logits.shape == (2, 50) and gates == []


@pytest.mark.parametrize(("name", "features"), [("basic", 32), ("rese2-multi", 8 + 16 + 32)])
def test_forward_is_forward_head_of_forward_features(name, features):
    model = build_model(name, num_tags=7, **SMALL).eval()
    x = torch.randn(3, 1, 243)
    with torch.no_grad():
        pooled = model.forward_features(x)
        logits = model(x)
        last = model.block_outputs(x)[-3 if model.config.multi else -1 :]
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 7)
    assert pooled.shape == (3, features)
    torch.testing.assert_close(pooled, torch.cat([o.amax(-1) for o in last], 1), rtol=0, atol=0)
    torch.testing.assert_close(model.forward_head(pooled), logits, rtol=0, atol=0)
    with pytest.raises(TypeError):
        model(x, return_excitations=True)  # forward returns logits only


def test_module_tree_has_named_layers():
    model = build_model("rese2-multi", **SMALL)
    assert isinstance(model.stem, Stem) and isinstance(model.head, Head)
    assert [n for n, _ in model.stem.named_children()] == ["conv", "bn"]
    assert [n for n, _ in model.head.named_children()] == ["fc1", "bn", "dropout", "fc2"]
    children = [n for n, _ in model.blocks[2].named_children()]
    assert children == ["conv1", "bn1", "dropout", "conv2", "bn2", "se", "shortcut", "pool"]
    assert isinstance(model.blocks[2].shortcut, Shortcut) and model.blocks[1].shortcut is None
    assert {k.split(".")[0] for k in model.state_dict()} == {"stem", "blocks", "head"}
    assert "blocks.2.shortcut.conv.weight" in model.state_dict()


@pytest.mark.parametrize(("name", "init"), list(LEGACY_INIT_DIGESTS))
def test_initialisation_is_bit_identical_to_the_sequential_layout(name, init):
    torch.manual_seed(0)
    state = build_model(name, init=init, **SMALL).state_dict()
    digest = hashlib.sha256()
    for tensor in state.values():
        digest.update(tensor.contiguous().numpy().tobytes())
    assert digest.hexdigest() == LEGACY_INIT_DIGESTS[name, init]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = build_model(name, num_tags=5, **SMALL).train()
    loss = model(torch.randn(4, 243)).square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_multi_head_concatenates_last_three_blocks():
    assert build_model("basic-multi").head.fc1.in_features == 256 + 256 + 512
    assert build_model("basic").head.fc1.in_features == 512


def _bound_ratio(weight: torch.Tensor, bound: float) -> float:
    return weight.abs().max().item() / bound


def test_keras_init_reproduces_the_conv1d_fan_bug():
    torch.manual_seed(0)
    model = build_model("res2")
    stem = model.stem.conv.weight
    assert 0.9 < _bound_ratio(stem, math.sqrt(2.0)) <= 1.0  # C_in = 1: U(+-sqrt(6/3))
    for block in model.blocks:
        for conv in (block.conv1, block.conv2):
            c_in = conv.in_channels
            # Keras 2.0.5 took fan_in = 3 * C_in**2 for a (3, C_in, C_out) kernel.
            assert 0.95 < _bound_ratio(conv.weight, math.sqrt(6 / (3 * c_in**2))) <= 1.0
            assert not conv.bias.any()
        if block.shortcut is not None:
            conv = block.shortcut.conv
            c_in, c_out = conv.in_channels, conv.out_channels
            assert 0.95 < _bound_ratio(conv.weight, math.sqrt(6 / (c_in * (c_in + c_out)))) <= 1.0
    dense = model.head.fc1
    assert 0.95 < _bound_ratio(dense.weight, math.sqrt(6 / (512 + 512))) <= 1.0
    assert model.head.bn.weight.eq(1).all() and not model.head.bn.bias.any()


def test_he_init_is_the_textbook_bound():
    torch.manual_seed(0)
    conv = build_model("basic", init="he").blocks[3].conv  # C_in = 256
    assert 0.95 < _bound_ratio(conv.weight, math.sqrt(6 / (3 * 256))) <= 1.0


def test_every_batchnorm_uses_keras_defaults():
    norms = [
        m for m in build_model("rese2-multi", **SMALL).modules() if isinstance(m, nn.BatchNorm1d)
    ]
    assert len(norms) == 1 + 2 * 4 + 2 + 1  # stem, 2 per block, 2 projection shortcuts, head
    assert {(m.eps, m.momentum) for m in norms} == {(1e-3, 0.01)}


@pytest.mark.parametrize("name", ["res1", "res2", "rese1", "rese2-multi"])
def test_projection_shortcuts_exactly_where_width_changes(name):
    model = build_model(name)
    projected = [i for i, b in enumerate(model.blocks) if b.shortcut is not None]
    assert projected == [2, 8]  # 128 -> 256 and 256 -> 512 (specification §2.2)
    for i in projected:
        shortcut = model.blocks[i].shortcut
        assert shortcut.conv.kernel_size == (1,) and isinstance(shortcut.bn, nn.BatchNorm1d)


def test_residual_dropout_only_between_two_convs():
    two = ResidualBlock(8, 8, num_convs=2)
    one = ResidualBlock(8, 8, num_convs=1)
    kinds = [(n, type(m).__name__) for n, m in two.named_children()]
    assert kinds[:5] == [
        ("conv1", "Conv1d"),
        ("bn1", "BatchNorm1d"),
        ("dropout", "Dropout"),
        ("conv2", "Conv1d"),
        ("bn2", "BatchNorm1d"),
    ]
    assert two.dropout.p == 0.2
    assert [n for n, _ in one.named_children()] == ["conv1", "bn1", "pool"]
    assert one.dropout is None and one.conv2 is None and one.bn2 is None


def test_dropout_inactive_in_eval_mode():
    torch.manual_seed(0)
    model = build_model("rese2-multi", **SMALL)
    x = torch.randn(4, 243)
    model.train()
    model(x)  # move BN statistics away from their initial values
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)  # dropout active while training
    model.eval()
    torch.manual_seed(1)
    c = model(x)
    torch.manual_seed(2)
    assert torch.equal(c, model(x))


def test_same_seed_gives_identical_models():
    torch.manual_seed(7)
    a = build_model("se-multi", **SMALL).state_dict()
    torch.manual_seed(7)
    b = build_model("se-multi", **SMALL).state_dict()
    torch.manual_seed(8)
    c = build_model("se-multi", **SMALL).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError, match="unknown variant 'rese3'.*basic, basic-multi, se"):
        build_model("rese3")


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="unknown option.*depth"):
        build_model("se", depth=3)


@pytest.mark.parametrize("shape", [(2, 59048), (2, 2, 59049), (59049,)])
def test_wrong_input_shape_names_expected_and_found(shape):
    model = build_model("basic", width=0.125)
    with pytest.raises(ValueError, match=r"\(batch, 59049\).*found"):
        model(torch.randn(*shape))


def test_num_blocks_sets_input_length():
    config = model_config("basic-multi", num_blocks=5, width=0.125)
    assert config.segment_length == 729
    assert config.block_channels() == [16, 16, 32, 32, 64]
    assert SampleCNN(config)(torch.randn(2, 729)).shape == (2, 50)


def test_config_round_trips_through_a_dict():
    config = model_config("rese1-multi", num_tags=12, width=0.5, init="he")
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.variant == "rese1-multi" and config.has_se
    with pytest.raises(ValueError, match="unknown ModelConfig fields: colour"):
        ModelConfig.from_dict({**config.to_dict(), "colour": 1})


@pytest.mark.parametrize(
    "bad", [{"block": "res3"}, {"init": "xavier"}, {"num_blocks": 2}, {"dropout": 1.0}]
)
def test_invalid_config_values_are_refused(bad):
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_reset_parameters_rejects_unknown_init():
    with pytest.raises(ValueError, match="unknown init"):
        reset_parameters(build_model("basic", **SMALL), init="orthogonal")


def test_architecture_summary_rows():
    config = model_config("rese2-multi", **SMALL)
    rows = architecture_summary(config)
    assert [r["stage"] for r in rows] == [
        "stem",
        "block 1",
        "block 2",
        "block 3",
        "block 4",
        "head",
    ]
    assert [r["channels"] for r in rows] == [8, 8, 8, 16, 32, 8 + 16 + 32]
    assert [r["length"] for r in rows] == [81, 27, 9, 3, 1, 50]
    assert sum(r["parameters"] for r in rows) == count_parameters(SampleCNN(config))
