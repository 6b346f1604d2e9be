"""Building blocks of the sample-level CNNs (Kim, Lee & Nam, ICASSP 2018, specification §2.2).

Public: :class:`Stem`, :class:`SqueezeExcitation`, :class:`BasicBlock`, :class:`Shortcut`,
:class:`ResidualBlock`, :class:`Head`.

Shape legend: B = batch, C = channels, T = time steps (samples at the stem's rate), F =
pooled features. Every block maps ``(B, C_in, T)`` to ``(B, C_out, T // 3)`` and returns a
pair ``(output, excitation)`` where ``excitation`` is the SE gate ``(B, C_out)`` or ``None``
for blocks without squeeze-and-excitation.

Every layer with weights is a named attribute (``stem.conv``, ``blocks.3.conv1``,
``blocks.2.shortcut.bn``, ``head.fc2``, ...), so ``state_dict`` keys and the Keras importer
address layers by name. Attributes are registered in the order the layers are built and
initialised; changing that order changes the weights a seed gives.
"""

from __future__ import annotations

import torch
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
        ``(B, 1, L)`` -> ``(B, width, L // 3)``.
    """

    def __init__(
        self, width: int, *, bn_eps: float = KERAS_BN_EPS, bn_momentum: float = KERAS_BN_MOMENTUM
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, width, kernel_size=3, stride=3, padding=0, bias=True)
        self.bn = batch_norm(width, eps=bn_eps, momentum=bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))  # B, width, L/3


class SqueezeExcitation(nn.Module):
    """The SE gate: time-average, expand by ``alpha``, contract, sigmoid.

    The paper's ratio ``alpha`` *amplifies*: the hidden layer has ``round(alpha * C)`` units
    (16 C by default, 8192 units for C = 512), unlike the reduction ratio of SENet.

    Args:
        channels: C, the number of channels gated.
        alpha: expansion ratio of the hidden layer (specification §2.2, default 16).

    Shapes:
        input ``(B, C, T)`` -> gate ``(B, C)`` with values in (0, 1).
    """

    def __init__(self, channels: int, *, alpha: float = 16.0) -> None:
        super().__init__()
        hidden = max(1, round(alpha * channels))
        self.expand = nn.Linear(channels, hidden)
        self.contract = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean(dim=-1)  # B, C
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
        out = self.pool(torch.relu(self.bn(self.conv(x))))  # B, C_out, T/3
        if self.se is None:
            return out, None
        gate = self.se(out)  # B, C_out
        return out * gate.unsqueeze(-1), gate


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
        return self.bn(self.conv(x))  # B, C_out, T


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
        h = self.bn1(self.conv1(x))  # B, C_out, T
        if self.conv2 is None or self.bn2 is None or self.dropout is None:
            return h
        return self.bn2(self.conv2(self.dropout(torch.relu(h))))  # B, C_out, T

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        main = self.main_path(x)  # B, C_out, T
        gate = None
        if self.se is not None:
            gate = self.se(main)  # B, C_out
            main = main * gate.unsqueeze(-1)
        shortcut = x if self.shortcut is None else self.shortcut(x)  # B, C_out, T
        out = self.pool(torch.relu(shortcut + main))  # B, C_out, T/3
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
