"""Load the authors' released Keras 2.0.5 HDF5 models into :class:`SampleCNN` (issue 8).

Public: :func:`read_keras_file`, :func:`import_keras`, :func:`convert_keras_checkpoint`,
:func:`keras_layer_table`, :class:`KerasFile`, :class:`KerasLayer`, :class:`KerasImportError`,
:data:`RELEASED_MODELS`.

The official code released ``se-multi-auc_0.9111-tfrmodel.hdf5`` and
``rese-multi-auc_0.9113-tfrmodel.hdf5``, written by Keras 2.0.5's ``model.save``. They are read
with h5py alone (no TensorFlow). Only layers with weights matter: ``Conv1D``, ``Dense`` and
``BatchNormalization``. They are matched to our model's layers in the official code's
*construction* order (specification §2): stem conv, BN; per block the projection shortcut's 1x1
conv and BN when the width changes (the official code creates them before the main path), the
main path's convs and BNs, the SE block's two denses; then the head's dense, BN and dense.

How the file's layers are put into that order:

* with a model config (``model.save`` files): from the layer graph (``inbound_nodes``), so the
  order Keras stored the layers in (by graph depth, which interleaves a block's shortcut with its
  main path) and the layer names do not matter;
* without one (``save_weights`` files): by the number Keras appends to each auto-generated name
  (``conv1d_7``), which counts the layers of one class in creation order whatever the offset;
  if the names are not numbered that way, the file's ``layer_names`` order is taken as the
  construction order.

Every tensor's shape, and each layer's activation, strides, padding and BN epsilon when the file
has a config, is checked against the requested variant; the first difference is reported with
the Keras layer's name. Layout conversions: Conv1D kernels ``(k, C_in, C_out)`` become
``(C_out, C_in, k)``, Dense kernels ``(in, out)`` become ``(out, in)``; BN moving statistics
become the running statistics. The Keras model reads channels-last inputs ``(B, 59049, 1)``;
ours reads ``(B, 59049)``, so only the weights change layout.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import re
from collections import Counter, defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from resemul_core.config import model_config
from resemul_core.data.tags import MTAT_TOP50_TAGS
from resemul_core.model.blocks import ResidualBlock
from resemul_core.model.checkpoint import save_checkpoint
from resemul_core.model.sample_cnn import SampleCNN

__all__ = [
    "RELEASED_MODELS",
    "KerasImportError",
    "KerasLayer",
    "KerasFile",
    "read_keras_file",
    "import_keras",
    "convert_keras_checkpoint",
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

_WEIGHTED = ("Conv1D", "Dense", "BatchNormalization")
# Keras' canonical weight order within a layer, used when weight names are not recognisable.
_WEIGHT_ORDER = {
    "Conv1D": ("kernel", "bias"),
    "Dense": ("kernel", "bias"),
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
}
_NUMBERED = re.compile(r"(?P<stem>.*?)(?:_(?P<uid>\d+))?")


class KerasImportError(ValueError):
    """A Keras file that cannot be imported; the message names the file and the reason."""


@dataclass(frozen=True, eq=False)
class KerasLayer:
    """One Keras layer with weights.

    Attributes:
        name: the Keras layer name, e.g. ``"conv1d_3"``.
        class_name: ``"Conv1D"``, ``"Dense"`` or ``"BatchNormalization"``.
        weights: arrays in Keras layout by short name: ``kernel`` ``(k, C_in, C_out)`` or
            ``(in, out)``, ``bias``; ``gamma``, ``beta``, ``moving_mean``,
            ``moving_variance`` ``(C,)``.
        config: the layer's Keras config (``{}`` when the file has no model config).
    """

    name: str
    class_name: str
    weights: dict[str, np.ndarray]
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class KerasFile:
    """The weighted layers of a Keras HDF5 file, in the model's construction order.

    Attributes:
        path: the file.
        keras_version: the ``keras_version`` attribute (``"2.0.5"`` for the release) or None.
        backend: the ``backend`` attribute (``"tensorflow"``) or None.
        layers: the layers with weights in construction order; for ``"layer numbering"``
            only each class's own layers are in that order (see the module docstring).
        order_source: how that order was found: ``"model config"``, ``"layer numbering"`` or
            ``"file order"``.
        input_length: samples per input from the config's input layer, or None if unknown.
    """

    path: Path
    keras_version: str | None
    backend: str | None
    layers: list[KerasLayer]
    order_source: str
    input_length: int | None = None

    @property
    def has_config(self) -> bool:
        return self.order_source == "model config"

    def bn_epsilons(self) -> set[float]:
        """The distinct BatchNormalization epsilons in the config (empty without one)."""
        return {
            float(layer.config["epsilon"])
            for layer in self.layers
            if layer.class_name == "BatchNormalization" and "epsilon" in layer.config
        }


# --- reading the file ---------------------------------------------------------------------


def _text(value: Any) -> Any:
    """Decode h5py attribute values (bytes, numpy bytes/str arrays) to str / list of str."""
    if isinstance(value, bytes):
        return value.decode("utf8")
    if isinstance(value, np.ndarray):
        return [_text(v) for v in value.tolist()] if value.ndim else _text(value.item())
    if isinstance(value, list):
        return [_text(v) for v in value]
    return value


def _attr(attrs: Any, key: str) -> Any:
    return _text(attrs[key]) if key in attrs else None


def _short_name(weight_name: str) -> str:
    """``"conv1d_1/kernel:0"`` -> ``"kernel"``."""
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _guess_class(arrays: list[np.ndarray]) -> str:
    """The class of a layer from the ranks of its weights, for files without a config."""
    ranks = [a.ndim for a in arrays]
    if ranks == [3, 1]:
        return "Conv1D"
    if ranks == [2, 1]:
        return "Dense"
    return "BatchNormalization" if ranks == [1, 1, 1, 1] else ""


def _read_layer(path: Path, group: Any, name: str, config: dict[str, Any]) -> KerasLayer | None:
    """One layer's weights (None for a layer without any), keyed by their short names."""
    if name not in group:
        raise KerasImportError(f"{path}: layer {name!r} is listed but has no weight group")
    layer_group = group[name]
    names = _attr(layer_group.attrs, "weight_names") or []
    if not names:
        return None
    try:
        arrays = [np.asarray(layer_group[n][()]) for n in names]
    except (KeyError, OSError) as err:
        raise KerasImportError(
            f"{path}: cannot read the weights of layer {name!r}; "
            f"the file is truncated or corrupted ({err})"
        ) from err
    class_name = config.get("class_name") or _guess_class(arrays)
    if class_name not in _WEIGHTED:
        raise KerasImportError(
            f"{path}: layer {name!r} ({class_name or 'unknown class'}) has weights "
            f"{[a.shape for a in arrays]}; a sample-level CNN has only "
            f"{', '.join(_WEIGHTED)} layers with weights"
        )
    short = [_short_name(n) for n in names]
    if sorted(short) != sorted(_WEIGHT_ORDER[class_name]):
        short = list(_WEIGHT_ORDER[class_name])  # unrecognised names: Keras' positional order
    weights = dict(zip(short, arrays, strict=False))
    return KerasLayer(name, class_name, weights, config.get("config", {}))


def _config_layers(model_config: Any) -> list[dict[str, Any]] | None:
    """The ``layers`` list of a functional (or sequential) model config, or None."""
    config = model_config.get("config") if isinstance(model_config, dict) else None
    if isinstance(config, dict):
        config = config.get("layers")
    return config if isinstance(config, list) else None


def _inbound(layer: dict[str, Any]) -> list[str]:
    """Names of the layers feeding ``layer``, in order, from its ``inbound_nodes``.

    Handles Keras 2's ``[[name, node_index, tensor_index, kwargs], ...]`` lists and newer
    formats that wrap tensors in dicts with a ``keras_history``.
    """
    names: list[str] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            history = obj.get("keras_history")
            if isinstance(history, list) and history:
                names.append(history[0])
                return
            for value in obj.values():
                walk(value)
        elif isinstance(obj, list):
            if len(obj) >= 3 and isinstance(obj[0], str) and isinstance(obj[1], int):
                names.append(obj[0])
                return
            for value in obj:
                walk(value)

    walk(layer.get("inbound_nodes", []))
    return list(dict.fromkeys(names))


def _topological(parents: dict[str, list[str]], rank: dict[str, tuple]) -> list[str]:
    """Kahn's algorithm; among ready layers the one with the smallest ``rank`` goes first."""
    children: dict[str, list[str]] = defaultdict(list)
    waiting = {name: len(ps) for name, ps in parents.items()}
    for name, ps in parents.items():
        for p in ps:
            children[p].append(name)
    ready = [(rank[n], n) for n, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(name)
        for child in children[name]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, (rank[child], child))
    if len(order) != len(parents):
        raise ValueError("the model config's layer graph has a cycle")
    return order


def _shortcut_layers(
    parents: dict[str, list[str]], classes: dict[str, str], configs: dict[str, dict]
) -> set[str]:
    """Layers on the shortcut branch of every residual ``Add``.

    Each branch of an ``Add`` is the set of its input's ancestors that are not ancestors of
    the other input; the shortcut is the smaller branch (empty for an identity shortcut).
    With equal sizes (Res-1's conv + BN against a 1x1 conv + BN) the branch holding the
    kernel-1 convolution is the shortcut.
    """
    order = _topological(parents, {name: (i,) for i, name in enumerate(parents)})
    ancestors: dict[str, frozenset[str]] = {}
    for name in order:
        ancestors[name] = frozenset({name}).union(*(ancestors[p] for p in parents[name]))

    def pointwise(branch: set[str]) -> bool:
        return any(
            classes[n] == "Conv1D" and list(configs[n].get("kernel_size", [0]))[0] == 1
            for n in branch
        )

    shortcut: set[str] = set()
    for name in order:
        if classes[name] != "Add" or len(parents[name]) != 2:
            continue
        a, b = (ancestors[p] for p in parents[name])
        branch_a, branch_b = set(a - b), set(b - a)
        if len(branch_a) != len(branch_b):
            shortcut |= min(branch_a, branch_b, key=len)
        elif pointwise(branch_a) != pointwise(branch_b):
            shortcut |= branch_a if pointwise(branch_a) else branch_b
    return shortcut


def _order_from_config(path: Path, layers: list[dict[str, Any]]) -> list[str]:
    """All layer names in construction order, recovered from the config's layer graph."""
    names = [layer.get("name") or layer.get("config", {}).get("name") for layer in layers]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise KerasImportError(f"{path}: the model config's layers lack unique names")
    if not any("inbound_nodes" in layer for layer in layers):
        return names  # a Sequential model: the list is the chain
    parents = {name: _inbound(layer) for name, layer in zip(names, layers, strict=True)}
    unknown = {p for ps in parents.values() for p in ps} - set(parents)
    if unknown:
        raise KerasImportError(
            f"{path}: the model config refers to unknown layers {sorted(unknown)}"
        )
    classes = {n: layer.get("class_name", "") for n, layer in zip(names, layers, strict=True)}
    configs = {n: layer.get("config", {}) for n, layer in zip(names, layers, strict=True)}
    try:
        shortcut = _shortcut_layers(parents, classes, configs)
        # The official code builds a block's projection shortcut before its main path.
        rank = {n: (0 if n in shortcut else 1, i) for i, n in enumerate(names)}
        return _topological(parents, rank)
    except ValueError as err:
        raise KerasImportError(f"{path}: {err}") from err


def _order_by_numbering(layers: list[KerasLayer]) -> list[KerasLayer] | None:
    """Reorder each class's layers by the number in their auto-generated names.

    Keras names a layer ``<class in snake case>_<n>`` with n counting that class's layers in
    creation order (tf.keras leaves the first one unnumbered). The positions each class holds
    in the file are kept; only the layers within a class are reordered. None if the names do
    not follow that pattern.
    """
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, layer in enumerate(layers):
        by_class[layer.class_name].append(i)
    result = list(layers)
    for positions in by_class.values():
        matches = [_NUMBERED.fullmatch(layers[i].name) for i in positions]
        stems = {m["stem"] for m in matches if m}
        uids = [int(m["uid"]) if m and m["uid"] else 0 for m in matches]
        if len(stems) != 1 or len(set(uids)) != len(uids):
            return None
        ordered = [layers[positions[k]] for k in np.argsort(uids, kind="stable")]
        for pos, layer in zip(positions, ordered, strict=True):
            result[pos] = layer
    return result


def _input_length(layers: list[dict[str, Any]]) -> int | None:
    for layer in layers:
        if layer.get("class_name") == "InputLayer":
            config = layer.get("config", {})
            shape = config.get("batch_input_shape") or config.get("batch_shape") or []
            for dim in reversed(shape):
                if isinstance(dim, int) and dim > 1:
                    return dim
    return None


def _read_open_file(
    path: Path, handle: Any
) -> tuple[str | None, str | None, list[dict[str, Any]] | None, list[KerasLayer]]:
    """Version, backend, config layers and weighted layers (in file order) of an open file."""
    group = handle["model_weights"] if "model_weights" in handle else handle
    layer_names = _attr(group.attrs, "layer_names")
    if not isinstance(layer_names, list):
        raise KerasImportError(
            f"{path} is an HDF5 file but holds no Keras weights (no 'layer_names' attribute)"
        )
    keras_version = _attr(handle.attrs, "keras_version") or _attr(group.attrs, "keras_version")
    backend = _attr(handle.attrs, "backend") or _attr(group.attrs, "backend")
    raw_config = _attr(handle.attrs, "model_config")
    config_layers = None
    if raw_config:
        try:
            config_layers = _config_layers(json.loads(raw_config))
        except json.JSONDecodeError as err:
            raise KerasImportError(f"{path}: its model_config is not valid JSON") from err
    configs = {
        (layer.get("name") or layer.get("config", {}).get("name")): layer
        for layer in config_layers or []
    }
    layers = []
    for name in layer_names:
        layer = _read_layer(path, group, name, configs.get(name, {}))
        if layer is not None:
            layers.append(layer)
    return keras_version, backend, config_layers, layers


def read_keras_file(path: str | os.PathLike) -> KerasFile:
    """Read a Keras HDF5 model (``model.save``) or weights file (``save_weights``).

    Args:
        path: the ``.hdf5`` / ``.h5`` file.

    Returns:
        A :class:`KerasFile` whose ``layers`` are the layers with weights in construction
        order (see the module docstring for how that order is found).

    Raises:
        FileNotFoundError: no such file.
        KerasImportError: not an HDF5 file, truncated, or no Keras weights in it.
    """
    import h5py  # only this module needs it

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Keras file {path} does not exist")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise KerasImportError(
            f"{path} is not a readable HDF5 file (not HDF5, truncated or corrupted: {err})"
        ) from err
    try:
        with handle:
            keras_version, backend, config_layers, layers = _read_open_file(path, handle)
    except OSError as err:
        raise KerasImportError(f"{path} is truncated or corrupted ({err})") from err

    if config_layers:
        named = {
            layer.get("name") or layer.get("config", {}).get("name") for layer in config_layers
        }
        missing = [layer.name for layer in layers if layer.name not in named]
        if missing:
            raise KerasImportError(f"{path}: layers {missing} have weights but no config entry")
        rank = {n: i for i, n in enumerate(_order_from_config(path, config_layers))}
        layers.sort(key=lambda layer: rank[layer.name])
        order_source, input_length = "model config", _input_length(config_layers)
    else:
        numbered = _order_by_numbering(layers)
        order_source = "layer numbering" if numbered is not None else "file order"
        layers, input_length = numbered or layers, None
    if not layers:
        raise KerasImportError(f"{path} holds no layers with weights")
    log.debug("%s: %d weighted layers, order from %s", path, len(layers), order_source)
    return KerasFile(path, keras_version, backend, layers, order_source, input_length)


# --- matching with our model --------------------------------------------------------------


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
    """One of our weighted layers: its module name, Keras class, role and Keras activation."""

    prefix: str
    class_name: str
    role: str
    module: nn.Module
    activation: str = "linear"

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
        slots.append(_Slot(name, class_name, role, module, activation))
    return slots


def _check_config(path: Path, layer: KerasLayer, slot: _Slot) -> None:
    """Compare what shapes cannot show: activation, strides, padding, BN epsilon."""
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
        strides = list(config.get("strides", [1]))[0]
        padding = config.get("padding", "valid")
        k = module.kernel_size[0]
        want = "same" if module.padding[0] > 0 else "valid"
        if strides != module.stride[0] or (k > 1 and padding != want):
            raise KerasImportError(
                f"{where} has strides {strides} and padding {padding!r}; expected "
                f"{module.stride[0]} and {want!r}"
            )
    if isinstance(module, nn.BatchNorm1d):
        eps = config.get("epsilon")
        if eps is not None and not np.isclose(float(eps), module.eps, rtol=1e-6, atol=0):
            raise KerasImportError(
                f"{where} has epsilon {eps}, the model uses {module.eps} (pass bn_eps={eps})"
            )
        if (
            config.get("axis", -1) not in (-1, 2)
            or not config.get("center", True)
            or not (config.get("scale", True))
        ):
            raise KerasImportError(f"{where} is not a channels-last BN with center and scale")


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    """
    model, kfile = _import(path, variant, model_options)
    return save_checkpoint(
        out,
        model=model,
        tags=tags,
        keras_import={
            "source": kfile.path.name,
            "sha256": _sha256(kfile.path),
            "keras_version": kfile.keras_version,
            "backend": kfile.backend,
            "variant": variant,
            "layer_order": kfile.order_source,
        },
    )
