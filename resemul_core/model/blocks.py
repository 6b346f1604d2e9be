"""Building blocks of the sample-level CNNs (Kim, Lee & Nam, ICASSP 2018, specification §2.2).

Public: :class:`Stem`, :class:`SqueezeExcitation`, :class:`BasicBlock`, :class:`Shortcut`,
:class:`ResidualBlock`, :class:`Head`.

Shape legend: B = batch, C = channels, T = time steps (samples at the stem's rate), F =
pooled features. Every block maps ``(B, C_in, T)`` to ``(B, C_out, T // 3)`` and returns a
pair ``(output, excitation)`` where ``excitation`` is the SE gate ``(B, C_out)`` or ``None``
for blocks without squeeze-and-excitation.

Layouts: every module also takes its map as ``(B, C, 1, T)`` in PyTorch's ``channels_last``
memory format (memory order ``(B, T, C)``) and then returns that layout; the stem takes the
waveform as ``(B, 1, 1, L)``. It is the same computation with the same parameters, only the
kernels differ: on the CPU oneDNN's convolutions and max-pooling are several times faster in
this layout at the narrow widths (8-32 channels) the book trains (``bench/cpu_step.py``), so
:class:`~resemul_core.model.sample_cnn.SampleCNN` uses it on the CPU. Parameters keep their
``Conv1d`` / ``BatchNorm1d`` shapes and names; the 2-D kernels read them through views.

Every layer with weights is a named attribute (``stem.conv``, ``blocks.3.conv1``,
``blocks.2.shortcut.bn``, ``head.fc2``, ...), so ``state_dict`` keys and the Keras importer
address layers by name. Attributes are registered in the order the layers are built and
initialised; changing that order changes the weights a seed gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from resemul_core.config import KERAS_BN_EPS, KERAS_BN_MOMENTUM

__all__ = [
    "Stem",
    "SqueezeExcitation",
    "BasicBlock",
    "Shortcut",
    "ResidualBlock",
    "Head",
    "batch_norm",
    "time_mean",
    "time_max",
]


def batch_norm(
    channels: int, *, eps: float = KERAS_BN_EPS, momentum: float = KERAS_BN_MOMENTUM
) -> nn.BatchNorm1d:
    """A ``BatchNorm1d`` with the Keras defaults used throughout the paper's models.

    Note:
        Keras updates the moving variance with the biased batch variance, PyTorch with the
        unbiased one; the difference is a factor N/(N-1) on the running variance only.
    """
    return nn.BatchNorm1d(channels, eps=eps, momentum=momentum)


def conv(layer: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for ``(B, C_in, T)``; for channels-last ``(B, C_in, 1, T)`` the same
    convolution as a 2-D one over a height of 1, ``(B, C_out, 1, T')`` channels-last."""
    if x.dim() == 3:
        return layer(x)
    return F.conv2d(
        x,
        layer.weight.unsqueeze(2),  # C_out, C_in, 1, k: a view, gradients reach the 1-D weight
        layer.bias,
        stride=(1, layer.stride[0]),
        padding=(0, layer.padding[0]),  # type: ignore[index]
    )


def norm(layer: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for ``(B, C, T)``; for channels-last ``(B, C, 1, T)`` the same BatchNorm.

    ``BatchNorm1d`` refuses 4-D input, so this is ``BatchNorm1d``'s forward (running
    statistics, momentum and ``num_batches_tracked`` included) on the 4-D map. A subclass
    (the data-parallel ``SyncBatchNorm1d``) in training mode inside a process group gets a
    3-D view of the map instead, so that its own forward runs; outside one it is plain
    BatchNorm, as ``SyncBatchNorm1d`` is there.
    """
    if x.dim() == 3:
        return layer(x)
    if type(layer) is not nn.BatchNorm1d and layer.training and _in_process_group():
        return layer(x.flatten(2)).unsqueeze(2)  # B, C, T strided as (B, T, C), and back
    factor = 0.0 if layer.momentum is None else layer.momentum
    if layer.training and layer.track_running_stats and layer.num_batches_tracked is not None:
        layer.num_batches_tracked.add_(1)
        if layer.momentum is None:  # cumulative moving average, as nn.BatchNorm1d
            factor = 1.0 / float(layer.num_batches_tracked)
    batch_stats = layer.training or layer.running_mean is None
    track = not layer.training or layer.track_running_stats
    return F.batch_norm(
        x,
        layer.running_mean if track else None,
        layer.running_var if track else None,
        layer.weight,
        layer.bias,
        batch_stats,
        factor,
        layer.eps,
    )


def _in_process_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def max_pool(layer: nn.MaxPool1d, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for ``(B, C, T)``; ``(B, C, 1, T // 3)`` channels-last for 4-D input."""
    if x.dim() == 3:
        return layer(x)
    return F.max_pool2d(x, (1, layer.kernel_size), (1, layer.stride))  # type: ignore[arg-type]


def dropout(layer: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for ``(B, C, T)``; for channels-last ``(B, C, 1, T)`` the same mask.

    PyTorch's CPU dropout draws its mask in the input's memory order, so on a channels-last
    map it would drop other elements than on ``(B, C, T)`` for the same seed. The mask is
    drawn as a ``(B, C, T)`` tensor instead: same random numbers, same dropped elements.
    """
    if x.dim() == 3 or not layer.training or layer.p == 0.0:
        return layer(x)
    keep = 1.0 - layer.p
    mask = torch.empty(x.shape[0], x.shape[1], x.shape[3], dtype=x.dtype, device=x.device)
    mask.bernoulli_(keep).div_(keep)  # B, C, T, as ATen's CPU dropout draws it
    return x * mask.unsqueeze(2)  # B, C, 1, T channels-last (the layout of x)


def time_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over time of ``(B, C, T)`` or ``(B, C, 1, T)``: ``(B, C)``."""
    return x.mean(dim=-1) if x.dim() == 3 else x.mean(dim=(2, 3))


def time_max(x: torch.Tensor) -> torch.Tensor:
    """Maximum over time of ``(B, C, T)`` or ``(B, C, 1, T)``: ``(B, C)``."""
    return x.amax(dim=-1) if x.dim() == 3 else x.amax(dim=(2, 3))


def per_channel(gate: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(B, C)`` gate shaped to broadcast over the time axes of ``like``."""
    return gate.view(*gate.shape, *([1] * (like.dim() - 2)))


def conv3(c_in: int, c_out: int) -> nn.Conv1d:
    """Kernel-3, stride-1, 'same'-padded convolution with bias, as in every block."""
    return nn.Conv1d(c_in, c_out, kernel_size=3, stride=1, padding=1, bias=True)


class Stem(nn.Module):
    """The strided first layer: Conv(k3, stride 3, no padding) -> BN -> ReLU.

    Args:
        width: output channels (128 at the paper's width).
        bn_eps: BatchNorm epsilon.
        bn_momentum: BatchNorm momentum (PyTorch convention).

    Shapes:
        ``(B, 1, L)`` -> ``(B, width, L // 3)``; ``(B, 1, 1, L)`` -> ``(B, width, 1, L // 3)``
        channels-last.
    """

    def __init__(
        self, width: int, *, bn_eps: float = KERAS_BN_EPS, bn_momentum: float = KERAS_BN_MOMENTUM
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, width, kernel_size=3, stride=3, padding=0, bias=True)
        self.bn = batch_norm(width, eps=bn_eps, momentum=bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return torch.relu(self.bn(self.conv(x)))  # B, width, L/3
        # kernel 3 = stride 3 on one input channel: a 1x1 convolution of the waveform cut into
        # non-overlapping triples, (B, 3, 1, L/3) channels-last with no copy. oneDNN gives it a
        # channels-last output and a fast weight gradient; the 2-D strided convolution of a
        # single-channel input does neither (its backward was 5-10x slower).
        batch, length = x.shape[0], x.shape[-1]
        triples = x.reshape(batch, 1, length // 3, 3).permute(0, 3, 1, 2)  # B, 3, 1, L/3
        weight = self.conv.weight.view(self.conv.out_channels, 3, 1, 1)  # C, 3 taps, 1, 1
        return torch.relu(norm(self.bn, F.conv2d(triples, weight, self.conv.bias)))


class SqueezeExcitation(nn.Module):
    """The SE gate: time-average, expand by ``alpha``, contract, sigmoid.

    The paper's ratio ``alpha`` *amplifies*: the hidden layer has ``round(alpha * C)`` units
    (16 C by default, 8192 units for C = 512), unlike the reduction ratio of SENet.

    Args:
        channels: C, the number of channels gated.
        alpha: expansion ratio of the hidden layer (specification §2.2, default 16).

    Shapes:
        input ``(B, C, T)`` or ``(B, C, 1, T)`` -> gate ``(B, C)`` with values in (0, 1).
    """

    def __init__(self, channels: int, *, alpha: float = 16.0) -> None:
        super().__init__()
        hidden = max(1, round(alpha * channels))
        self.expand = nn.Linear(channels, hidden)
        self.contract = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = time_mean(x)  # B, C
        return torch.sigmoid(self.contract(torch.relu(self.expand(squeezed))))  # B, C


class BasicBlock(nn.Module):
    """Conv(k3) -> BN -> ReLU -> MaxPool(3), optionally followed by an SE gate.

    With ``se_alpha`` set this is the paper's SE block: the gate is computed on the
    pooled, post-ReLU map and scales it channel-wise (specification §2.2).

    Args:
        c_in: input channels.
        c_out: output channels.
        se_alpha: SE expansion ratio, or ``None`` for the Basic block.
        bn_eps: BatchNorm epsilon.
        bn_momentum: BatchNorm momentum (PyTorch convention).

    Shapes:
        ``(B, c_in, T)`` -> ``((B, c_out, T // 3), (B, c_out) or None)``.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        se_alpha: float | None = None,
        bn_eps: float = KERAS_BN_EPS,
        bn_momentum: float = KERAS_BN_MOMENTUM,
    ) -> None:
        super().__init__()
        self.conv = conv3(c_in, c_out)
        self.bn = batch_norm(c_out, eps=bn_eps, momentum=bn_momentum)
        self.pool = nn.MaxPool1d(3)
        self.se = SqueezeExcitation(c_out, alpha=se_alpha) if se_alpha is not None else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = max_pool(self.pool, torch.relu(norm(self.bn, conv(self.conv, x))))  # B, C_out, T/3
        if self.se is None:
            return out, None
        gate = self.se(out)  # B, C_out
        return out * per_channel(gate, out), gate


class Shortcut(nn.Module):
    """The projection shortcut of a residual block that changes width: 1x1 Conv -> BN.

    Args:
        c_in: input channels.
        c_out: output channels.
        bn_eps: BatchNorm epsilon.
        bn_momentum: BatchNorm momentum (PyTorch convention).

    Shapes:
        ``(B, c_in, T)`` -> ``(B, c_out, T)``.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        bn_eps: float = KERAS_BN_EPS,
        bn_momentum: float = KERAS_BN_MOMENTUM,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size=1, bias=True)
        self.bn = batch_norm(c_out, eps=bn_eps, momentum=bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm(self.bn, conv(self.conv, x))  # B, C_out, T


class ResidualBlock(nn.Module):
    """Res-n / ReSE-n: a residual unit with one or two convolutions, then MaxPool(3).

    Main path for ``num_convs = 2``: Conv -> BN -> ReLU -> Dropout -> Conv -> BN
    (``conv1``, ``bn1``, ``dropout``, ``conv2``, ``bn2``); for ``num_convs = 1``: Conv -> BN
    (``conv1``, ``bn1``; ``dropout``, ``conv2`` and ``bn2`` are ``None``). With ``se_alpha``
    set (ReSE), the main path is scaled by its SE gate after its last BN and before the
    addition. The shortcut is the identity (``shortcut`` is ``None``) when the width is
    unchanged, else a :class:`Shortcut`, a 1x1 convolution + BN (no ReLU). Output:
    ``MaxPool(ReLU(shortcut + main))`` (specification §2.2).

    Args:
        c_in: input channels.
        c_out: output channels.
        num_convs: n, 1 or 2.
        se_alpha: SE expansion ratio (ReSE), or ``None`` (Res).
        dropout: element-wise dropout between the two convolutions (only for n = 2;
            0.2 in the paper).
        bn_eps: BatchNorm epsilon.
        bn_momentum: BatchNorm momentum (PyTorch convention).

    Shapes:
        ``(B, c_in, T)`` -> ``((B, c_out, T // 3), (B, c_out) or None)``.

    Note:
        Res-1/ReSE-1 are absent from the official code; they follow the poster's figure
        and the authors' follow-up code (specification §2.2): no dropout for n = 1.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        num_convs: int,
        se_alpha: float | None = None,
        dropout: float = 0.2,
        bn_eps: float = KERAS_BN_EPS,
        bn_momentum: float = KERAS_BN_MOMENTUM,
    ) -> None:
        super().__init__()
        if num_convs not in (1, 2):
            raise ValueError(f"num_convs must be 1 or 2, got {num_convs}")
        self.num_convs = num_convs
        # Registration order = construction and initialisation order: main path, SE, shortcut.
        self.conv1 = conv3(c_in, c_out)
        self.bn1 = batch_norm(c_out, eps=bn_eps, momentum=bn_momentum)
        self.dropout: nn.Dropout | None = None
        self.conv2: nn.Conv1d | None = None
        self.bn2: nn.BatchNorm1d | None = None
        if num_convs == 2:
            self.dropout = nn.Dropout(dropout)
            self.conv2 = conv3(c_out, c_out)
            self.bn2 = batch_norm(c_out, eps=bn_eps, momentum=bn_momentum)
        self.se = SqueezeExcitation(c_out, alpha=se_alpha) if se_alpha is not None else None
        self.shortcut = (
            Shortcut(c_in, c_out, bn_eps=bn_eps, bn_momentum=bn_momentum) if c_in != c_out else None
        )
        self.pool = nn.MaxPool1d(3)

    def main_path(self, x: torch.Tensor) -> torch.Tensor:
        """The main path before the SE gate: ``(B, c_in, T)`` -> ``(B, c_out, T)``."""
        h = norm(self.bn1, conv(self.conv1, x))  # B, C_out, T
        if self.conv2 is None or self.bn2 is None or self.dropout is None:
            return h
        dropped = dropout(self.dropout, torch.relu(h))  # B, C_out, T
        return norm(self.bn2, conv(self.conv2, dropped))  # B, C_out, T

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        main = self.main_path(x)  # B, C_out, T
        gate = None
        if self.se is not None:
            gate = self.se(main)  # B, C_out
            main = main * per_channel(gate, main)
        shortcut = x if self.shortcut is None else self.shortcut(x)  # B, C_out, T
        out = max_pool(self.pool, torch.relu(shortcut + main))  # B, C_out, T/3
        return out, gate


class Head(nn.Module):
    """The classifier: Linear -> BN -> ReLU -> Dropout -> Linear, giving tag logits.

    Args:
        features: F, the pooled feature size (and the hidden layer's size).
        num_tags: number of output tags.
        dropout: dropout before the output layer (0.5 in the paper).
        bn_eps: BatchNorm epsilon.
        bn_momentum: BatchNorm momentum (PyTorch convention).

    Shapes:
        ``(B, F)`` -> ``(B, num_tags)``.
    """

    def __init__(
        self,
        features: int,
        num_tags: int,
        *,
        dropout: float = 0.5,
        bn_eps: float = KERAS_BN_EPS,
        bn_momentum: float = KERAS_BN_MOMENTUM,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, features)
        self.bn = batch_norm(features, eps=bn_eps, momentum=bn_momentum)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(features, num_tags)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(torch.relu(self.bn(self.fc1(features))))  # B, F
        return self.fc2(hidden)  # B, num_tags
