"""A faster CPU forward pass of a trained SampleCNN, for tagging: folded, in place, cache-sized.

Public: :class:`FastSampleCNN`, :func:`fold_batch_norm`, :data:`FAST_DTYPES`.
The entry point is :func:`resemul_core.model.inference.inference_model`.

What changes against the eval-mode reference forward (``SampleCNN`` on the CPU, channels-last
``(B, C, 1, T)`` maps, float32), and why:

* **BatchNorm folded** into the preceding convolution (and the head's BN into ``fc1``):
  eval-mode BN is the affine map ``y = (x - mean) * gamma / sqrt(var + eps) + beta``, so a
  conv (or Linear) ``W x + b`` followed by it is the conv ``(s W) x + (b - mean) s + beta``
  with ``s = gamma / sqrt(var + eps)``. The same function up to float rounding (the folded
  weights are computed in float64), one memory pass fewer per BN.
* **In place**: the bias is added inside the convolution, the ReLU (or the shortcut's
  addition) applied in place to its fresh output while it is still in cache (micro-batches,
  below). oneDNN's fused conv + ReLU (+ addition) kernels, what ``torch.compile`` emits
  (``torch.ops.mkldnn._convolution_pointwise``), measured no faster than that here (0-5 %),
  so only public operators are used.
* **ReLU after max-pooling** in the blocks: ``maxpool(relu(z)) = relu(maxpool(z))`` exactly
  (both are monotone), and the pooled map is a third of the size.
* **Micro-batches for the first, large maps**: the stem's output alone is ``128 x 19,683``
  values per segment (10 MB in float32). A batch of 10 segments streams every early map
  through main memory several times; one segment at a time (at paper width; more at smaller
  widths, :data:`MICRO_BATCH_BYTES`) stays in the last-level cache: this alone takes 35-40 %
  off the time. The later blocks, whose maps are small but whose SE layers hold most of the weights
  (22 M of se-multi's 25 M parameters), run on the whole batch so that each weight is read
  once per batch rather than once per micro-batch.
* **Max-pooling as two element-wise maxima** of strided views (:func:`_pool`): the same
  values in half the time of ``max_pool2d`` on these maps.
* Optionally **bfloat16 maps and weights** (``dtype=torch.bfloat16``: AVX-512 BF16 dot
  products), with float32 accumulation inside oneDNN and a float32 head.

Everything is per segment: no segment's output depends on the others in its batch, so the
micro-batching changes nothing but speed (and, at most, the last bits of rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from resemul_core.model.blocks import BasicBlock, Head, ResidualBlock, Stem, time_max, time_mean
from resemul_core.model.sample_cnn import SampleCNN

__all__ = ["FAST_DTYPES", "FastSampleCNN", "fold_batch_norm"]

#: The compute dtypes of the fast path: float32 (faithful) and bfloat16 (faster, looser).
FAST_DTYPES = (torch.float32, torch.bfloat16)

#: Bytes of the largest map (the stem's output) that one micro-batch may hold: a micro-batch
#: has ``max(1, MICRO_BATCH_BYTES // bytes per segment)`` segments, 1 at paper width (10 MB a
#: segment in float32), 6 at width 1/8. About a quarter of a typical last-level cache: each
#: stage keeps two or three such maps alive, and a micro-batch twice this size was 1.5x slower
#: for rese2-multi (``bench/tag_forward_speed.py``).
MICRO_BATCH_BYTES = 8 << 20
#: The leading stages (the stem counts as one) run in micro-batches while their conv output
#: for one micro-batch holds more than this; the rest run on the whole batch.
MICRO_STAGE_BYTES = 1 << 20

_CL = torch.channels_last


def _keep_freed_maps_in_the_heap() -> None:
    """Make glibc's ``malloc`` keep the micro-batches' freed maps for reuse.

    glibc serves a request above its mmap threshold (initially 128 KiB) with a fresh ``mmap``,
    and gives the top of its heap back to the system once more than twice the threshold is
    free there: every page of such memory then costs a page fault at its first touch. Freeing
    an mmapped block of up to 32 MiB raises the threshold to its size. A paper-width
    micro-batch's 10 MB maps alone would raise it to 10 MB, and each segment would fault its
    20-30 MB of maps in anew: about 50,000 page faults and 60 % more time per 10 segments in a
    process that has run nothing bigger. Allocating and freeing one untouched block just under
    32 MiB raises the threshold once for the process (it never falls). With another C library
    this is an empty allocation.
    """
    torch.empty(31 << 20, dtype=torch.uint8)  # freed at once, never touched


@torch.no_grad()
def fold_batch_norm(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm1d | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv's or Linear's weight and bias with the eval-mode BatchNorm that follows folded in.

    Args:
        weight: ``(C_out, ...)`` (a Conv1d's ``(C_out, C_in, k)`` or a Linear's ``(out, in)``).
        bias: ``(C_out,)`` or ``None`` (zero).
        bn: the ``BatchNorm1d`` over the ``C_out`` outputs, or ``None`` (nothing to fold).

    Returns:
        ``(weight, bias)`` float32, new tensors: ``weight * s`` per output and
        ``(bias - running_mean) * s + beta`` with ``s = gamma / sqrt(running_var + eps)``,
        computed in float64 and rounded once.
    """
    w = weight.detach().double()
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
    if bn is not None:
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("cannot fold a BatchNorm without running statistics")
        gamma = torch.ones_like(b) if bn.weight is None else bn.weight.detach().double()
        beta = torch.zeros_like(b) if bn.bias is None else bn.bias.detach().double()
        scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)  # C_out
        w = w * scale.view(-1, *([1] * (w.dim() - 1)))
        b = (b - bn.running_mean.double()) * scale + beta
    return w.float(), b.float()


class _Conv(nn.Module):
    """A conv with its BatchNorm folded in, on ``(B, C_in, 1, T)`` channels-last maps.

    The weight is stored as ``(C_out, C_in, 1, k)`` channels-last, weight and bias in the
    compute dtype (oneDNN accumulates in float32 either way).
    """

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, conv: nn.Conv1d, bn: nn.BatchNorm1d | None, dtype: torch.dtype) -> None:
        super().__init__()
        weight, bias = fold_batch_norm(conv.weight, conv.bias, bn)
        weight = weight.unsqueeze(2).to(dtype).contiguous(memory_format=_CL)
        self.register_buffer("weight", weight)  # C_out, C_in, 1, k
        self.register_buffer("bias", bias.to(dtype))  # C_out
        self.padding = (0, int(conv.padding[0]))  # type: ignore[index]
        self.stride = (1, int(conv.stride[0]))

    def forward(
        self, x: torch.Tensor, *, relu: bool = False, add: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``relu?(conv(x) + add?)``: ``(B, C_in, 1, T)`` -> ``(B, C_out, 1, T')``."""
        out = F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)
        if add is not None:
            out.add_(add)  # in place: ``out`` is a fresh tensor
        return out.relu_() if relu else out


class _Dense(nn.Module):
    """``F.linear`` with weight ``(out, in)`` and bias ``(out,)`` held as buffers in ``dtype``
    (no ``nn.Linear``: its random initialisation of 8192 x 512 SE weights would cost more than
    the rest of building the copy)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().to(dtype, copy=True))
        self.register_buffer("bias", bias.detach().to(dtype, copy=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _Gate(nn.Module):
    """The SE gate of :class:`~resemul_core.model.blocks.SqueezeExcitation`, weights in
    ``dtype``: ``(B, C, 1, T)`` -> ``(B, C)`` in ``dtype``."""

    def __init__(self, se: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.expand = _Dense(se.expand.weight, se.expand.bias, dtype)
        self.contract = _Dense(se.contract.weight, se.contract.bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = time_mean(x)  # B, C
        return torch.sigmoid(self.contract(torch.relu(self.expand(squeezed))))  # B, C


def _pool(x: torch.Tensor) -> torch.Tensor:
    """Max-pooling by 3 over time: ``(B, C, 1, T)`` -> ``(B, C, 1, T // 3)``, channels-last.

    As two element-wise maxima of strided views of the ``(B, T / 3, 3, C)`` memory: the same
    values as ``max_pool2d``, in half its time on these maps.
    """
    batch, channels, _, length = x.shape
    if length % 3 or not x.is_contiguous(memory_format=_CL):
        return F.max_pool2d(x, (1, 3), (1, 3))
    triples = x.permute(0, 2, 3, 1).view(batch, length // 3, 3, channels)  # memory order
    out = torch.maximum(triples[:, :, 0], triples[:, :, 1])  # B, T/3, C
    torch.maximum(out, triples[:, :, 2], out=out)
    return out.view(batch, 1, length // 3, channels).permute(0, 3, 1, 2)  # B, C, 1, T/3


class _FastStem(nn.Module):
    """:class:`~resemul_core.model.blocks.Stem`, folded: ``(B, 1, L)`` float waveform ->
    ``(B, C, 1, L // 3)`` channels-last in the compute dtype."""

    def __init__(self, stem: Stem, dtype: torch.dtype) -> None:
        super().__init__()
        self.conv = _Conv(stem.conv, stem.bn, dtype)
        # kernel 3 = stride 3 on one channel: a 1x1 conv of the waveform's triples (as Stem)
        self.conv.weight = self.conv.weight.reshape(-1, 3, 1, 1).contiguous(memory_format=_CL)
        self.conv.stride, self.conv.padding = (1, 1), (0, 0)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape[0], x.shape[-1]
        triples = x.to(self.dtype).reshape(batch, 1, length // 3, 3).permute(0, 3, 1, 2)
        return self.conv(triples, relu=True)  # B, C, 1, L/3


class _FastBasic(nn.Module):
    """:class:`~resemul_core.model.blocks.BasicBlock` (Basic or SE), folded."""

    def __init__(self, block: BasicBlock, dtype: torch.dtype) -> None:
        super().__init__()
        self.conv = _Conv(block.conv, block.bn, dtype)
        self.se = None if block.se is None else _Gate(block.se, dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = _pool(self.conv(x)).relu_()  # B, C_out, 1, T/3
        if self.se is None:
            return out, None
        gate = self.se(out)  # B, C_out
        return out * gate[:, :, None, None], gate


class _FastResidual(nn.Module):
    """:class:`~resemul_core.model.blocks.ResidualBlock` (Res-n or ReSE-n), folded
    (dropout is the identity in eval mode)."""

    def __init__(self, block: ResidualBlock, dtype: torch.dtype) -> None:
        super().__init__()
        self.conv1 = _Conv(block.conv1, block.bn1, dtype)
        self.conv2 = None
        if block.conv2 is not None:
            self.conv2 = _Conv(block.conv2, block.bn2, dtype)
        self.shortcut = None
        if block.shortcut is not None:
            shortcut = block.shortcut
            self.shortcut = _Conv(shortcut.conv, shortcut.bn, dtype)
        self.se = None if block.se is None else _Gate(block.se, dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        shortcut = x if self.shortcut is None else self.shortcut(x)  # B, C_out, 1, T
        last, h = self.conv1, x
        if self.conv2 is not None:
            last, h = self.conv2, self.conv1(x, relu=True)  # B, C_out, 1, T
        if self.se is None:
            return _pool(last(h, add=shortcut)).relu_(), None  # B, C_out, 1, T/3
        main = last(h)  # B, C_out, 1, T
        gate = self.se(main)  # B, C_out
        summed = torch.addcmul(shortcut, main, gate[:, :, None, None])  # B, C_out, 1, T
        return _pool(summed).relu_(), gate  # B, C_out, 1, T/3


class _FastHead(nn.Module):
    """:class:`~resemul_core.model.blocks.Head` with its BN folded into ``fc1``; float32."""

    def __init__(self, head: Head) -> None:
        super().__init__()
        weight, bias = fold_batch_norm(head.fc1.weight, head.fc1.bias, head.bn)
        self.fc1 = _Dense(weight, bias, torch.float32)
        self.fc2 = _Dense(head.fc2.weight, head.fc2.bias, torch.float32)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(features.float())))  # B, num_tags


class FastSampleCNN(SampleCNN):
    """An inference-only copy of a :class:`SampleCNN` for the CPU: same interface, same outputs
    up to rounding (module docstring). Build it with
    :func:`~resemul_core.model.inference.inference_model`.

    Args:
        model: the trained model (read only; its eval-mode function is what is copied).
        dtype: the maps' and convolution weights' dtype, one of :data:`FAST_DTYPES`.

    Shapes: as :class:`SampleCNN`: ``(B, L)`` or ``(B, 1, L)`` float waveforms in, float32
    logits ``(B, num_tags)``, pooled block outputs and SE gates ``(B, C_i)`` out. The maps
    of :meth:`block_outputs` are in ``dtype``.

    The copy has no BatchNorm or dropout layers and always computes the eval-mode function:
    :meth:`train` refuses ``True``. Its ``state_dict`` holds the folded weights, not a
    checkpoint's: save the original model, not this one.
    """

    def __init__(self, model: SampleCNN, *, dtype: torch.dtype = torch.float32) -> None:
        if dtype not in FAST_DTYPES:
            raise ValueError(f"dtype must be one of {FAST_DTYPES}, got {dtype}")
        nn.Module.__init__(self)  # not SampleCNN.__init__: no layers to build and initialise
        self.config = model.config
        self.dtype = dtype
        self.stem = _FastStem(model.stem, dtype)
        blocks: list[nn.Module] = []
        for block in model.blocks:
            if isinstance(block, BasicBlock):
                blocks.append(_FastBasic(block, dtype))
            elif isinstance(block, ResidualBlock):
                blocks.append(_FastResidual(block, dtype))
            else:
                raise TypeError(f"no fast version of {type(block).__name__}")
        self.blocks = nn.ModuleList(blocks)
        self.head = _FastHead(model.head)
        self.requires_grad_(False)
        self.eval()
        _keep_freed_maps_in_the_heap()

    def train(self, mode: bool = True) -> FastSampleCNN:
        """Only ``mode=False`` (a no-op): the folded copy has no training-mode function."""
        if mode:
            raise RuntimeError("a FastSampleCNN is for inference only; train the original model")
        return super().train(False)

    def _micro_plan(self) -> tuple[int, int]:
        """``(stages, segments)``: how many leading stages (the stem counts as one) run in
        micro-batches, and how many segments each micro-batch holds
        (:data:`MICRO_BATCH_BYTES`, :data:`MICRO_STAGE_BYTES`)."""
        size = torch.finfo(self.dtype).bits // 8
        channels = [self.config.scale(128), *self.config.block_channels()]
        length = self.config.segment_length // 3  # the stem's and block 1's conv outputs
        maps = []  # bytes per segment of each stage's conv output
        for i, c in enumerate(channels):
            maps.append(c * length * size)
            length //= 3 if i > 0 else 1
        segments = max(1, MICRO_BATCH_BYTES // max(maps))
        stages = 0
        while stages < len(maps) and maps[stages] * segments > MICRO_STAGE_BYTES:
            stages += 1
        return stages, segments

    def _features(
        self,
        waveform: torch.Tensor,
        gates: list[torch.Tensor] | None,
        every_block: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """As :meth:`SampleCNN._features` (pooled features ``(B, F)`` float32; gates and every
        block's time-max, float32, appended to the lists if given), by micro-batches first."""
        x = self._as_batch(waveform)  # B, 1, L
        micro, segments = self._micro_plan()
        blocks = list(self.blocks)
        first_pooled = len(blocks) - (3 if self.config.multi else 1)
        wanted = range(0 if every_block is not None else first_pooled, len(blocks))
        num_early = max(micro - 1, 0)  # blocks run per micro-batch, after the stem
        early_gates: list[list[torch.Tensor]] = [[] for _ in range(num_early)]
        early_pooled: list[list[torch.Tensor]] = [[] for _ in range(num_early)]
        parts = []
        for part in x.split(segments if micro else max(1, x.shape[0])):
            h = self.stem(part)  # b, C, 1, L/3
            for i, block in enumerate(blocks[:num_early]):
                h, gate = block(h)
                if gate is not None:
                    early_gates[i].append(gate)
                if i in wanted:
                    early_pooled[i].append(time_max(h))  # b, C_i
            parts.append(h)
        h = torch.cat(parts) if len(parts) > 1 else parts[0]  # B, C, 1, T: the small maps
        pooled = {i: torch.cat(p) for i, p in enumerate(early_pooled) if p}
        block_gates = [torch.cat(g) for g in early_gates if g]
        for i, block in enumerate(blocks[num_early:], start=num_early):
            h, gate = block(h)
            if gate is not None:
                block_gates.append(gate)
            if i in wanted:
                pooled[i] = time_max(h)  # B, C_i
        if gates is not None:
            gates.extend(g.float() for g in block_gates)
        if every_block is not None:
            every_block.extend(pooled[i].float() for i in range(len(blocks)))
        features = [pooled[i].float() for i in range(first_pooled, len(blocks))]
        return torch.cat(features, dim=1)  # B, F

    def block_outputs(self, waveform: torch.Tensor) -> list[torch.Tensor]:
        """The stem's and every block's output, ``[(B, C, L/3), (B, C_1, L/9), ...]``, in
        the model's dtype."""
        outputs = [self.stem(self._as_batch(waveform))]
        for block in self.blocks:
            outputs.append(block(outputs[-1])[0])
        return [o.squeeze(2) for o in outputs]
