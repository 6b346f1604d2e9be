"""The sample-level CNN and its twelve named variants (specification §2).

Public: :data:`VARIANTS`, :class:`ModelConfig`, :class:`SampleCNN`, :func:`build_model`,
:func:`model_config`, :func:`count_parameters`, :func:`variant_table`.

Shape legend (paper width, 9 blocks): B = batch, T = 59049 input samples.
``(B, 59049) -> stem (B, 128, 19683) -> block 1 (B, 128, 6561) -> block 2 (B, 128, 2187)
-> block 3 (B, 256, 729) -> ... -> block 8 (B, 256, 3) -> block 9 (B, 512, 1) -> (B, num_tags)``.

Module tree: ``stem`` (:class:`~resemul_core.model.blocks.Stem`), ``blocks.0`` ...
``blocks.{n-1}`` (:class:`~resemul_core.model.blocks.BasicBlock` or
:class:`~resemul_core.model.blocks.ResidualBlock`), ``head``
(:class:`~resemul_core.model.blocks.Head`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from resemul_core.config import INITS, VARIANTS, ModelConfig, model_config
from resemul_core.model.blocks import BasicBlock, Head, ResidualBlock, Stem, time_max

__all__ = [
    "SampleCNN",
    "build_model",
    "count_parameters",
    "variant_table",
    "architecture_summary",
]


def build_model(name: str, *, num_tags: int = 50, **options: Any) -> SampleCNN:
    """Build one of the twelve registered variants, e.g. ``build_model("rese2-multi")``.

    Args:
        name: a key of :data:`VARIANTS`.
        num_tags: number of output tags.
        **options: any other :class:`ModelConfig` field (``width``, ``alpha``, ``init``, ...).
    """
    return SampleCNN(model_config(name, num_tags=num_tags, **options))


class SampleCNN(nn.Module):
    """Sample-level CNN for music auto-tagging with any of the paper's blocks.

    Args:
        config: the model's :class:`ModelConfig`.

    Shapes:
        input ``(B, L)`` or ``(B, 1, L)`` float waveform with ``L = config.segment_length``
        (59049 samples at 22,050 Hz, 2.68 s); output logits ``(B, num_tags)``.
        Probabilities are ``torch.sigmoid(logits)``.

    Methods: :meth:`forward` (logits), :meth:`forward_features` (pooled features ``(B, F)``),
    :meth:`forward_head` (features to logits), :meth:`forward_with_gates` (logits and SE
    gates), :meth:`forward_pooled` (logits and every block's pooled output, the embeddings),
    :meth:`block_outputs` (every stage's map). ``forward`` always returns a tensor.

    On the CPU the feature maps are held as ``(B, C, 1, T)`` channels-last (memory order
    ``(B, T, C)``) between the stem and the head: the same computation and parameters, with
    oneDNN's fast kernels for narrow convolutions (module docstring of
    :mod:`resemul_core.model.blocks`). Elsewhere (CUDA) they are ``(B, C, T)``, as they are
    on the CPU with ``channels_last_on_cpu = False`` (the plain reference computation, for
    tests and benchmarks).
    """

    #: Whether CPU passes hold the maps channels-last; not a parameter, not in the state_dict.
    channels_last_on_cpu: bool = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.block_channels()
        stem_width = config.scale(128)
        self.stem = Stem(stem_width, bn_eps=config.bn_eps, bn_momentum=config.bn_momentum)
        num_convs = config.num_convs
        se_alpha = config.alpha if config.has_se else None
        blocks: list[nn.Module] = []
        c_in = stem_width
        for c_out in widths:
            norm = {"bn_eps": config.bn_eps, "bn_momentum": config.bn_momentum}
            if num_convs == 0:
                blocks.append(BasicBlock(c_in, c_out, se_alpha=se_alpha, **norm))
            else:
                blocks.append(
                    ResidualBlock(
                        c_in,
                        c_out,
                        num_convs=num_convs,
                        se_alpha=se_alpha,
                        dropout=config.block_dropout,
                        **norm,
                    )
                )
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        features = sum(widths[-3:]) if config.multi else widths[-1]
        self.head = Head(
            features,
            config.num_tags,
            dropout=config.dropout,
            bn_eps=config.bn_eps,
            bn_momentum=config.bn_momentum,
        )
        reset_parameters(self, init=config.init)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """Tag logits for a batch of segments.

        Args:
            waveform: ``(B, L)`` or ``(B, 1, L)`` samples in [-1, 1].

        Returns:
            logits ``(B, num_tags)``.
        """
        return self.forward_head(self._features(waveform, None))

    def forward_features(self, waveform: torch.Tensor) -> torch.Tensor:
        """The pooled features the head reads.

        Args:
            waveform: ``(B, L)`` or ``(B, 1, L)`` samples in [-1, 1].

        Returns:
            features ``(B, F)``: the last block's output max-pooled over time, ``F = C_n``;
            for ``multi`` variants the concatenation of the last three blocks' pooled
            outputs, ``F = C_{n-2} + C_{n-1} + C_n``.
        """
        return self._features(waveform, None)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Tag logits from pooled features.

        Args:
            features: ``(B, F)``, as :meth:`forward_features` returns.

        Returns:
            logits ``(B, num_tags)``.
        """
        return self.head(features)  # B, num_tags

    def forward_with_gates(self, waveform: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tag logits and the squeeze-and-excitation gates of one pass.

        Args:
            waveform: ``(B, L)`` or ``(B, 1, L)`` samples in [-1, 1].

        Returns:
            ``(logits, gates)``: logits ``(B, num_tags)`` and one gate ``(B, C_i)`` per SE
            block in block order, values in (0, 1); an empty list for variants without SE.
        """
        gates: list[torch.Tensor] = []
        logits = self.forward_head(self._features(waveform, gates))
        return logits, gates

    def forward_pooled(self, waveform: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tag logits and every block's output max-pooled over time, in one pass.

        The pooled outputs are the network's embeddings (used for transfer learning): those
        of the last three blocks, concatenated, are the multi-level features the ``multi``
        variants' head reads.

        Args:
            waveform: ``(B, L)`` or ``(B, 1, L)`` samples in [-1, 1].

        Returns:
            ``(logits, pooled)``: logits ``(B, num_tags)`` and one ``(B, C_i)`` tensor per
            block, block 1 first (``C_i`` = :meth:`ModelConfig.block_channels`).
        """
        pooled: list[torch.Tensor] = []
        logits = self.forward_head(self._features(waveform, None, pooled))
        return logits, pooled

    def _features(
        self,
        waveform: torch.Tensor,
        gates: list[torch.Tensor] | None,
        every_block: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Pooled features ``(B, F)``; the SE gates are appended to ``gates`` if given, and
        every block's time-max to ``every_block`` if given."""
        h = self.stem(
            self._layout(self._as_batch(waveform))
        )  # B, 128, L/3 (or B, 128, 1, L/3 channels-last)
        pooled: list[torch.Tensor] = []
        first_pooled = len(self.blocks) - (3 if self.config.multi else 1)
        for i, block in enumerate(self.blocks):
            h, gate = block(h)  # B, C_i, L / 3^(i+2)
            if gate is not None and gates is not None:
                gates.append(gate)
            if every_block is not None:
                every_block.append(time_max(h))  # B, C_i
                if i >= first_pooled:
                    pooled.append(every_block[-1])
            elif i >= first_pooled:
                pooled.append(time_max(h))  # B, C_i
        return torch.cat(pooled, dim=1)  # B, F

    def block_outputs(self, waveform: torch.Tensor) -> list[torch.Tensor]:
        """The stem's and every block's output, ``[(B, C, L/3), (B, C_1, L/9), ...]``."""
        outputs = [self.stem(self._layout(self._as_batch(waveform)))]
        for block in self.blocks:
            outputs.append(block(outputs[-1])[0])
        # the forward pass's own maps (bit-identical to what the head pools), as (B, C, T) views
        return [o.squeeze(2) if o.dim() == 4 else o for o in outputs]

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, L)`` as the stem's input: ``(B, 1, 1, L)`` on the CPU, where the maps are
        then channels-last (class docstring), else unchanged."""
        if x.device.type == "cpu" and self.channels_last_on_cpu:
            return x.unsqueeze(1)  # B, 1, 1, L
        return x

    def _as_batch(self, waveform: torch.Tensor) -> torch.Tensor:
        length = self.config.segment_length
        if waveform.dim() == 2:
            waveform = waveform.unsqueeze(1)
        if waveform.dim() != 3 or waveform.shape[1] != 1 or waveform.shape[-1] != length:
            raise ValueError(
                f"expected a waveform of shape (batch, {length}) or (batch, 1, {length}), "
                f"found {tuple(waveform.shape)}"
            )
        return waveform  # B, 1, L


def _keras_uniform_bound(weight: torch.Tensor, *, kind: str) -> float:
    """The Keras 2.0.5 ``he_uniform`` / ``glorot_uniform`` bound, fan bug included.

    Keras 2.0.5 computed a 3-D kernel ``(k, C_in, C_out)``'s receptive field as
    ``k * C_in``, giving fan_in = k * C_in**2 and fan_out = k * C_in * C_out (specification §2.3).
    """
    if weight.dim() == 3:  # PyTorch Conv1d weight: (C_out, C_in, k)
        c_out, c_in, k = weight.shape
        fan_in, fan_out = k * c_in * c_in, k * c_in * c_out
    else:  # Linear weight: (out, in)
        fan_out, fan_in = weight.shape
    if kind == "he":
        return math.sqrt(6.0 / fan_in)
    return math.sqrt(6.0 / (fan_in + fan_out))


@torch.no_grad()
def reset_parameters(model: SampleCNN, *, init: str = "keras") -> None:
    """Initialise every layer as the paper's code did (``"keras"``) or by the textbook (``"he"``).

    Both: biases 0, BN gamma 1 / beta 0, Dense layers Glorot-uniform. ``"keras"``: 3-tap
    convs U(+-sqrt(6 / (3 C_in^2))) and 1x1 shortcuts U(+-sqrt(6 / (C_in (C_in + C_out)))),
    the Keras 2.0.5 fan bug; ``"he"``: 3-tap convs U(+-sqrt(6 / (3 C_in))) and shortcuts
    Glorot-uniform with the correct fans.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    for module in model.modules():
        if isinstance(module, nn.Conv1d):
            kind = "glorot" if module.kernel_size[0] == 1 else "he"
            if init == "keras":
                bound = _keras_uniform_bound(module.weight, kind=kind)
                nn.init.uniform_(module.weight, -bound, bound)
            elif kind == "he":
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm1d):
            module.reset_parameters()


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of parameters; with ``trainable_only=False`` BN running statistics are added,
    which is Keras' "total params" (specification §2.4)."""
    count = sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
    if not trainable_only:
        count += sum(
            b.numel()
            for name, b in model.named_buffers()
            if not name.endswith("num_batches_tracked")
        )
    return count


def variant_table(**options: Any) -> list[dict[str, Any]]:
    """One row per registered variant: name, block, multi, trainable and total parameters.

    Builds each model on the ``meta`` device, so it is fast and allocates no weights.
    """
    rows = []
    for name in VARIANTS:
        with torch.device("meta"):
            model = SampleCNN(model_config(name, **options))
        rows.append(
            {
                "variant": name,
                "block": model.config.block,
                "multi": model.config.multi,
                "trainable": count_parameters(model),
                "total": count_parameters(model, trainable_only=False),
            }
        )
    return rows


def architecture_summary(config: ModelConfig) -> list[dict[str, Any]]:
    """One row per stage of the network: output shape and parameter count.

    Rows: ``stem``, ``block 1`` ... ``block n`` (with their block type), ``head``; columns
    ``stage``, ``layer``, ``channels``, ``length`` (time steps of the stage's output; for the
    head, the number of tags) and ``parameters`` (trainable). Built on the meta device: fast,
    no weights allocated.
    """
    with torch.device("meta"):
        model = SampleCNN(config)
    rows = [
        {
            "stage": "stem",
            "layer": "conv k3 s3 + BN + ReLU",
            "channels": model.stem.conv.out_channels,
            "length": config.segment_length // 3,
            "parameters": count_parameters(model.stem),
        }
    ]
    length = config.segment_length // 3
    for i, block in enumerate(model.blocks):
        length //= 3
        rows.append(
            {
                "stage": f"block {i + 1}",
                "layer": config.block,
                "channels": config.block_channels()[i],
                "length": length,
                "parameters": count_parameters(block),
            }
        )
    rows.append(
        {
            "stage": "head",
            "layer": "max-pool of blocks 7-9" if config.multi else "max-pool of the last block",
            "channels": model.head.fc1.in_features,
            "length": config.num_tags,
            "parameters": count_parameters(model.head),
        }
    )
    return rows
