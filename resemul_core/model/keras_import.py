"""Load the authors' released Keras HDF5 models into :class:`SampleCNN` (issue 8).

Public: :func:`import_keras`, :func:`convert_keras_checkpoint`, :func:`cached_keras_checkpoint`,
:func:`keras_layer_table`, :data:`RELEASED_MODELS`.

:func:`~resemul_core.model.keras_file.read_keras_file` reads the file's weighted layers in the
official code's *construction* order (specification §2); this module matches them, in that
order, to our model's layers by the name table of :func:`keras_layer_table`: stem conv, BN; per
block the projection shortcut's 1x1 conv and BN when the width changes (the official code creates
them before the main path), the main path's convs and BNs, the SE block's two denses; then the
head's dense, BN and dense.

Every tensor's shape, and each layer's activation, strides, padding and BN epsilon and axis when
the file has a config, is checked against the requested variant; the first difference is
reported with the Keras layer's name. A BN's ``axis`` must be its input's channel axis,
written as Keras 2.0.5 does (``-1``) or as tf.keras does after building (``[2]`` for
``(B, T, C)`` maps, ``[1]`` for the head's ``(B, D)``). Layout conversions: Conv1D kernels
``(k, C_in, C_out)`` become ``(C_out, C_in, k)``, Dense kernels ``(in, out)`` become
``(out, in)``; BN moving statistics become the running statistics. The Keras model reads
channels-last inputs ``(B, 59049, 1)``; ours reads ``(B, 59049)``, so only the weights
change layout.

:func:`cached_keras_checkpoint` converts a file on first use and keeps the checkpoint in a
cache folder keyed by the file's SHA-256 and the variant, so that a Keras file can be given
wherever a checkpoint is accepted.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import logging
import os
import shutil
import tempfile
from collections import Counter, defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from resemul_core.config import ModelConfig, model_config
from resemul_core.data.integrity import file_sha256
from resemul_core.data.tags import MTAT_TOP50_TAGS
from resemul_core.model.blocks import ResidualBlock
from resemul_core.model.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from resemul_core.model.keras_file import KerasFile, KerasImportError, KerasLayer, read_keras_file
from resemul_core.model.sample_cnn import SampleCNN

__all__ = [
    "RELEASED_MODELS",
    "import_keras",
    "convert_keras_checkpoint",
    "cached_keras_checkpoint",
    "keras_layer_table",
]

log = logging.getLogger(__name__)

#: The official release's files and the variant each one holds (width 1, alpha 16, 50 tags in
#: the order of :data:`~resemul_core.data.tags.MTAT_TOP50_TAGS`). "rese" in the official code is
#: ReSE-2.
RELEASED_MODELS: dict[str, str] = {
    "se-multi-auc_0.9111-tfrmodel.hdf5": "se-multi",
    "rese-multi-auc_0.9113-tfrmodel.hdf5": "rese2-multi",
}


def keras_layer_table(model: SampleCNN) -> list[tuple[str, str, str, str]]:
    """Our weighted layers in the official code's construction order, by module name.

    Returns:
        ``(module name, Keras class, role, Keras activation)`` rows, e.g.
        ``("blocks.2.shortcut.conv", "Conv1D", "block 3 shortcut conv", "linear")``: the
        stem's conv and BN; per block its projection shortcut's conv and BN (created first by
        the official code, when the width changes), the main path's convs and BNs, the SE
        gate's two denses; then the head's dense, BN and output dense.
    """
    conv, dense, norm = "Conv1D", "Dense", "BatchNormalization"
    table = [("stem.conv", conv, "stem conv", "linear"), ("stem.bn", norm, "stem BN", "linear")]
    for i, block in enumerate(model.blocks):
        base, name = f"blocks.{i}", f"block {i + 1}"
        if isinstance(block, ResidualBlock):
            if block.shortcut is not None:
                table.append((f"{base}.shortcut.conv", conv, f"{name} shortcut conv", "linear"))
                table.append((f"{base}.shortcut.bn", norm, f"{name} shortcut BN", "linear"))
            for j in range(1, block.num_convs + 1):
                table.append((f"{base}.conv{j}", conv, f"{name} conv {j}", "linear"))
                table.append((f"{base}.bn{j}", norm, f"{name} BN {j}", "linear"))
        else:
            table.append((f"{base}.conv", conv, f"{name} conv", "linear"))
            table.append((f"{base}.bn", norm, f"{name} BN", "linear"))
        if block.se is not None:
            table.append((f"{base}.se.expand", dense, f"{name} SE dense 1", "relu"))
            table.append((f"{base}.se.contract", dense, f"{name} SE dense 2", "sigmoid"))
    table.append(("head.fc1", dense, "head dense", "linear"))
    table.append(("head.bn", norm, "head BN", "linear"))
    table.append(("head.fc2", dense, "head output dense", "sigmoid"))
    return table


@dataclass(frozen=True)
class _Slot:
    """One of our weighted layers: its module name, Keras class, role and Keras activation;
    ``input_rank`` is the rank of its Keras input: 3 for ``(B, T, C)`` maps, 2 in the head."""

    prefix: str
    class_name: str
    role: str
    module: nn.Module
    activation: str = "linear"
    input_rank: int = 3

    def keras_shapes(self) -> dict[str, tuple[int, ...]]:
        """The Keras-layout shape of every weight this layer needs."""
        if isinstance(self.module, nn.BatchNorm1d):
            c = (self.module.num_features,)
            return {"gamma": c, "beta": c, "moving_mean": c, "moving_variance": c}
        out = self.module.weight.shape[0]
        return {"kernel": tuple(reversed(self.module.weight.shape)), "bias": (out,)}


_MODULE_TYPES = {"Conv1D": nn.Conv1d, "Dense": nn.Linear, "BatchNormalization": nn.BatchNorm1d}


def _slots(model: SampleCNN) -> list[_Slot]:
    """Our weighted layers in the official code's construction order (:func:`keras_layer_table`)."""
    slots = []
    for name, class_name, role, activation in keras_layer_table(model):
        module = model.get_submodule(name)
        if not isinstance(module, _MODULE_TYPES[class_name]):
            raise TypeError(f"{name} is a {type(module).__name__}, not a {class_name} layer")
        rank = 2 if name.startswith("head.") else 3  # the head works on pooled (B, D) vectors
        slots.append(_Slot(name, class_name, role, module, activation, rank))
    return slots


def _is_channel_axis(axis: Any, rank: int) -> bool:
    """Whether a BN ``axis``, an int or a one-int list, is the last axis of a rank-``rank``
    input once normalised (``-1`` and ``rank - 1`` are; tf.keras stores ``[rank - 1]``)."""
    if isinstance(axis, (list, tuple)) and len(axis) == 1:
        axis = axis[0]
    if isinstance(axis, bool) or not isinstance(axis, int):
        return False
    return -rank <= axis < rank and axis % rank == rank - 1


def _check_config(path: Path, layer: KerasLayer, slot: _Slot) -> None:
    """Compare what shapes cannot show: activation, strides, padding, BN epsilon and axis.

    ``layer.config`` is in Keras 2.0.5's spelling (sizes as lists, activation as a name:
    :mod:`~resemul_core.model.keras_file` reduces later versions' spellings to it).
    """
    config, where = layer.config, f"{path}: Keras layer {layer.name!r} ({slot.role})"
    if not config:
        return
    activation = config.get("activation")
    if isinstance(activation, str) and activation != slot.activation:
        raise KerasImportError(
            f"{where} has activation {activation!r}, the model applies {slot.activation!r}"
        )
    module = slot.module
    if isinstance(module, nn.Conv1d):
        strides = config.get("strides", [1])[0]
        padding = config.get("padding", "valid")
        k = module.kernel_size[0]
        want = "same" if module.padding[0] > 0 else "valid"
        if strides != module.stride[0] or (k > 1 and padding != want):
            raise KerasImportError(
                f"{where} has strides {strides} and padding {padding!r}; expected "
                f"{module.stride[0]} and {want!r}"
            )
        # Same kernel shape, other arithmetic: neither would show in the shape check.
        dilation = config.get("dilation_rate", [1])[0]
        data_format = config.get("data_format", "channels_last")
        if dilation != 1 or data_format != "channels_last":
            raise KerasImportError(
                f"{where} has dilation rate {dilation} and data format {data_format!r}; "
                "the model needs 1 and 'channels_last'"
            )
    if isinstance(module, nn.BatchNorm1d):
        eps = config.get("epsilon")
        if eps is not None and not np.isclose(float(eps), module.eps, rtol=1e-6, atol=0):
            raise KerasImportError(
                f"{where} has epsilon {eps}, the model uses {module.eps} (pass bn_eps={eps})"
            )
        axis, rank = config.get("axis", -1), slot.input_rank
        if not _is_channel_axis(axis, rank):
            shape = "(batch, time, channels)" if rank == 3 else "(batch, features)"
            raise KerasImportError(
                f"{where} normalises over axis {axis!r}, but its input is {shape} and only "
                f"the last axis ({rank - 1}, -1 or [{rank - 1}]) fits the model"
            )
        if not config.get("center", True) or not config.get("scale", True):
            raise KerasImportError(f"{where} is a BN without center or scale")


def _to_torch(slot: _Slot, weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Our state-dict entries for one layer, converted from the Keras layout."""

    def t(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    p = slot.prefix
    if isinstance(slot.module, nn.BatchNorm1d):
        return {
            f"{p}.weight": t(weights["gamma"]),
            f"{p}.bias": t(weights["beta"]),
            f"{p}.running_mean": t(weights["moving_mean"]),
            f"{p}.running_var": t(weights["moving_variance"]),
        }
    kernel = weights["kernel"]
    # Conv1D (k, C_in, C_out) -> (C_out, C_in, k); Dense (in, out) -> (out, in).
    return {f"{p}.weight": t(kernel.T), f"{p}.bias": t(weights["bias"])}


def _match(kfile: KerasFile, model: SampleCNN) -> dict[str, torch.Tensor]:
    """Pair the file's layers with the model's, check everything, convert the weights."""
    path, variant = kfile.path, model.config.variant
    hint = f"does the file hold {variant!r} with width {model.config.width:g}, " + (
        f"alpha {model.config.alpha:g}, {model.config.num_blocks} blocks and "
        f"{model.config.num_tags} tags?"
    )
    # With a config the whole sequence is known and compared in order; without one only
    # each class's own order is, so every class is matched separately.
    in_sequence = kfile.has_config
    queues: dict[str, deque[KerasLayer]] = defaultdict(deque)
    for layer in kfile.layers:
        queues["all" if in_sequence else layer.class_name].append(layer)
    counts = Counter(layer.class_name for layer in kfile.layers)
    state: dict[str, torch.Tensor] = {}
    for slot in _slots(model):
        queue = queues["all" if in_sequence else slot.class_name]
        if not queue:
            raise KerasImportError(
                f"{path}: {variant} needs another {slot.class_name} layer for its {slot.role}, "
                f"but the file has only {counts[slot.class_name]}; {hint}"
            )
        layer = queue.popleft()
        if layer.class_name != slot.class_name:
            raise KerasImportError(
                f"{path}: Keras layer {layer.name!r} ({layer.class_name}) is where {variant} "
                f"has its {slot.role} ({slot.class_name}); {hint}"
            )
        expected = slot.keras_shapes()
        found = {k: tuple(v.shape) for k, v in layer.weights.items()}
        if found != expected:
            raise KerasImportError(
                f"{path}: Keras layer {layer.name!r} ({layer.class_name}) does not fit the "
                f"{slot.role} of {variant}: expected {expected}, found {found}; {hint}"
            )
        _check_config(path, layer, slot)
        state.update(_to_torch(slot, layer.weights))
    extra = [layer for q in queues.values() for layer in q]
    if extra:
        position = {id(layer): i for i, layer in enumerate(kfile.layers)}
        first = min(extra, key=lambda layer: position[id(layer)])
        raise KerasImportError(
            f"{path}: {len(extra)} weighted layer(s) left over after filling {variant}, "
            f"the first is {first.name!r} ({first.class_name}); {hint}"
        )
    return state


def _import(
    path: str | os.PathLike, variant: str, model_options: dict[str, Any]
) -> tuple[SampleCNN, KerasFile]:
    kfile = read_keras_file(path)
    options = dict(model_options)
    epsilons = kfile.bn_epsilons()
    if "bn_eps" not in options and len(epsilons) == 1:
        options["bn_eps"] = epsilons.pop()  # the file's epsilon, normally Keras' 1e-3
    config = model_config(variant, **options)
    if kfile.input_length is not None and kfile.input_length != config.segment_length:
        raise KerasImportError(
            f"{kfile.path}: the Keras model reads {kfile.input_length}-sample inputs, "
            f"{variant} with {config.num_blocks} blocks reads {config.segment_length}"
        )
    model = SampleCNN(config)
    state = model.state_dict()
    state.update(_match(kfile, model))
    model.load_state_dict(state)
    log.info(
        "imported %s (Keras %s, %d weighted layers, order from %s) as %s",
        kfile.path.name,
        kfile.keras_version or "unknown version",
        len(kfile.layers),
        kfile.order_source,
        variant,
    )
    return model.eval(), kfile


def import_keras(path: str | os.PathLike, *, variant: str, **model_options: Any) -> SampleCNN:
    """Build ``variant`` and fill it with the weights of a Keras HDF5 file.

    Args:
        path: a Keras ``model.save`` or ``save_weights`` HDF5 file of the official code.
        variant: one of :data:`~resemul_core.config.VARIANTS`; ``"se-multi"`` and
            ``"rese2-multi"`` for the released files (:data:`RELEASED_MODELS`).
        **model_options: other :class:`~resemul_core.config.ModelConfig` fields (``width``,
            ``alpha``, ``num_blocks``, ``num_tags``, ...); the paper's by default.
            ``bn_eps`` defaults to the file's BatchNormalization epsilon when it has a config.

    Returns:
        The model in eval mode. For waveforms ``(B, 59049)`` its
        ``torch.sigmoid(model(x))`` equals the Keras model's output ``(B, 50)`` on
        ``x[..., None]``.

    Raises:
        FileNotFoundError: no such file.
        KerasImportError: not a Keras file, or its layers do not fit the variant; the message
            names the first Keras layer that differs and the expected and found shapes.
    """
    return _import(path, variant, model_options)[0]


def convert_keras_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    variant: str,
    tags: Sequence[str] | None = MTAT_TOP50_TAGS,
    **model_options: Any,
) -> Path:
    """Import a Keras HDF5 file (:func:`import_keras`) and save it as one of our checkpoints.

    Args:
        path: the Keras file.
        out: the checkpoint to write (atomically).
        variant: the variant the file holds.
        tags: the output names; by default MTAT's top 50 in the official (ascending
            popularity) order, which is the released models' output order.
        **model_options: as for :func:`import_keras`.

    Returns:
        ``out`` as a Path. The checkpoint's ``keras_import`` entry records the source file's
        name and SHA-256, its Keras version and backend, and how the layer order was found.

    Raises:
        IsADirectoryError: ``out`` is a directory (checked before the file is read).
    """
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(
            errno.EISDIR,
            f"is a directory, not a checkpoint file to write (e.g. {out / f'{variant}.pt'})",
            str(out),
        )
    model, kfile = _import(path, variant, model_options)
    return save_checkpoint(
        out,
        model=model,
        tags=tags,
        keras_import={
            "source": kfile.path.name,
            "sha256": file_sha256(kfile.path),
            "keras_version": kfile.keras_version,
            "backend": kfile.backend,
            "variant": variant,
            "layer_order": kfile.order_source,
        },
    )


def _cache_folder(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir``, else ``$RESEMUL_CACHE``, ``$XDG_CACHE_HOME/resemul``, ``~/.cache/resemul``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("RESEMUL_CACHE"):
        return Path(os.environ["RESEMUL_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "resemul"
    return Path.home() / ".cache" / "resemul"  # RuntimeError without a home: no cache


def _options_suffix(config: ModelConfig, model_options: dict[str, Any]) -> str:
    """``""`` for the paper's model, else ``-`` and a digest of the options that differ from it,
    so that one file converted at another size gets an entry of its own."""
    default = model_config(config.variant)
    changed = sorted(
        (k, getattr(config, k)) for k in model_options if getattr(config, k) != getattr(default, k)
    )
    return f"-{hashlib.sha256(repr(changed).encode()).hexdigest()[:8]}" if changed else ""


def _usable(entry: Path, sha256: str, config: ModelConfig, model_options: dict[str, Any]) -> bool:
    """Whether a cache entry reads back intact (checksum) and holds this file as ``config``."""
    if not entry.is_file():
        return False
    try:
        payload = read_checkpoint(entry)
        stored = ModelConfig.from_dict(payload["model_config"])
    except (CheckpointError, OSError, KeyError, TypeError, ValueError) as err:
        log.warning("cached conversion %s is unusable, converting again: %s", entry, err)
        return False
    info = payload.get("keras_import")
    return (
        isinstance(info, dict)
        and info.get("sha256") == sha256
        and info.get("variant") == config.variant
        and all(getattr(stored, k) == getattr(config, k) for k in model_options)
    )


def cached_keras_checkpoint(
    path: str | os.PathLike,
    *,
    variant: str,
    cache_dir: str | os.PathLike | None = None,
    **model_options: Any,
) -> Path:
    """The checkpoint converted from a Keras HDF5 file, converted once and then reused.

    The cache folder is ``cache_dir``, else ``$RESEMUL_CACHE``, else
    ``$XDG_CACHE_HOME/resemul``, else ``~/.cache/resemul``; checkpoints go in its ``keras/``
    subfolder as ``<first 16 hex digits of the file's SHA-256>-<variant>.pt``, so a changed
    file or another variant gets its own entry. An entry is reused only if it reads back
    (checksum verified) and records the same SHA-256 and variant; otherwise it is converted
    again (:func:`convert_keras_checkpoint`, an atomic write: concurrent conversions both end
    with a good file). If the cache cannot be written, the file is converted into a temporary
    file (removed at exit) each time, with a warning.

    Args:
        path: the Keras file, e.g. ``se-multi-auc_0.9111-tfrmodel.hdf5``.
        variant: the variant it holds (:data:`RELEASED_MODELS`).
        cache_dir: the cache folder, overriding the environment.
        **model_options: as for :func:`import_keras` (the paper's size by default); options
            that change the model add a digest of them to the entry's name.

    Returns:
        The checkpoint; its tags are MTAT's top 50 in the official order (for 50 outputs).

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: ``path`` is a directory.
        ValueError: an unknown variant or option.
        KerasImportError: the file does not hold ``variant`` (as for :func:`import_keras`).
    """
    source = Path(path)
    if source.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a Keras HDF5 file", str(source))
    if not source.is_file():
        raise FileNotFoundError(f"Keras file {source} does not exist")
    config = model_config(variant, **model_options)  # before any file is named after them
    sha256 = file_sha256(source)
    name = f"{sha256[:16]}-{variant}{_options_suffix(config, model_options)}.pt"
    tags = MTAT_TOP50_TAGS if config.num_tags == len(MTAT_TOP50_TAGS) else None
    options = {"variant": variant, "tags": tags, **model_options}
    try:
        entry = _cache_folder(cache_dir) / "keras" / name
        if _usable(entry, sha256, config, model_options):
            log.info("using cached conversion %s", entry)
            return entry
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=entry.parent)  # writable?
        os.close(fd)
        os.unlink(probe)
    except (OSError, RuntimeError) as err:  # RuntimeError: no home directory
        return _convert_uncached(source, name, err, options)
    try:
        out = convert_keras_checkpoint(source, entry, **options)
    except OSError as err:
        if err.filename != str(entry):  # the source's failures are the caller's to see
            raise
        return _convert_uncached(source, name, err, options)  # e.g. the cache's disk is full
    log.info("converted %s to %s (cached)", source, out)
    return out


def _convert_uncached(source: Path, name: str, why: Exception, options: dict[str, Any]) -> Path:
    """Convert into a temporary folder removed at exit, when the cache cannot be written."""
    log.warning(
        "cannot write the conversion cache (%s); converting %s into a temporary file instead "
        "(set RESEMUL_CACHE to a writable folder to keep the conversion)",
        why,
        source,
    )
    folder = Path(tempfile.mkdtemp(prefix="resemul-keras-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    out = convert_keras_checkpoint(source, folder / name, **options)
    log.info("converted %s to %s (not cached)", source, out)
    return out
