"""Blocks against hand-written reference computations (specification §2.2)."""

import torch
import torch.nn.functional as F

from resemul_core.model.blocks import BasicBlock, Head, ResidualBlock, SqueezeExcitation, Stem


def test_se_gate_is_sigmoid_of_expanded_mean():
    torch.manual_seed(0)
    se = SqueezeExcitation(4, alpha=16)
    assert (se.expand.in_features, se.expand.out_features) == (4, 64)
    assert (se.contract.in_features, se.contract.out_features) == (64, 4)
    x = torch.randn(2, 4, 9)
    mean = x.sum(-1) / 9
    hidden = (mean @ se.expand.weight.T + se.expand.bias).clamp(min=0)
    expected = 1 / (1 + torch.exp(-(hidden @ se.contract.weight.T + se.contract.bias)))
    torch.testing.assert_close(se(x), expected)


def test_se_gate_of_a_known_input():
    se = SqueezeExcitation(1, alpha=2)
    with torch.no_grad():
        se.expand.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        se.expand.bias.zero_()
        se.contract.weight.copy_(torch.tensor([[2.0, 3.0]]))
        se.contract.bias.fill_(-1.0)
    # mean of [1, 2, 3] = 2 -> hidden relu([2, -2]) = [2, 0] -> 2*2 - 1 = 3 -> sigmoid(3)
    gate = se(torch.tensor([[[1.0, 2.0, 3.0]]]))
    torch.testing.assert_close(gate, torch.sigmoid(torch.tensor([[3.0]])))


def test_se_block_gates_the_pooled_map():
    torch.manual_seed(0)
    block = BasicBlock(3, 5, se_alpha=16).eval()
    x = torch.randn(2, 3, 27)
    pooled = F.max_pool1d(torch.relu(block.bn(block.conv(x))), 3)
    gate = block.se(pooled)
    out, returned_gate = block(x)
    torch.testing.assert_close(returned_gate, gate)
    torch.testing.assert_close(out, pooled * gate[..., None])
    assert out.shape == (2, 5, 9)


def test_rese_gate_comes_before_the_addition():
    torch.manual_seed(0)
    block = ResidualBlock(4, 6, num_convs=1, se_alpha=2).eval()
    x = torch.randn(2, 4, 27)
    main = block.bn1(block.conv1(x))
    gate = block.se(main)
    shortcut = block.shortcut.bn(block.shortcut.conv(x))
    expected = F.max_pool1d(torch.relu(shortcut + main * gate[..., None]), 3)
    out, returned_gate = block(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(returned_gate, gate)


def test_identity_shortcut_when_width_is_kept():
    block = ResidualBlock(4, 4, num_convs=2).eval()
    x = torch.randn(1, 4, 9)
    main = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))  # eval: no dropout
    torch.testing.assert_close(block.main_path(x), main)
    torch.testing.assert_close(block(x)[0], F.max_pool1d(torch.relu(x + main), 3))
    assert block(x)[1] is None and block.shortcut is None


def test_two_conv_main_path_drops_out_between_the_convs():
    torch.manual_seed(0)
    block = ResidualBlock(4, 4, num_convs=2, dropout=0.5).train()
    x = torch.randn(2, 4, 9)
    torch.manual_seed(3)
    got = block.main_path(x)
    torch.manual_seed(3)
    hidden = F.dropout(torch.relu(block.bn1(block.conv1(x))), 0.5, training=True)
    torch.testing.assert_close(got, block.bn2(block.conv2(hidden)), rtol=0, atol=0)


def test_stem_and_head_compute_their_documented_layers():
    torch.manual_seed(0)
    stem = Stem(5).eval()
    x = torch.randn(2, 1, 27)
    torch.testing.assert_close(stem(x), torch.relu(stem.bn(stem.conv(x))))
    assert stem(x).shape == (2, 5, 9)
    head = Head(6, 3).eval()
    f = torch.randn(4, 6)
    torch.testing.assert_close(head(f), head.fc2(torch.relu(head.bn(head.fc1(f)))))
    assert head(f).shape == (4, 3)
