"""Reading a Keras 2 HDF5 model or weights file with h5py: its weighted layers, in order.

Public: :func:`read_keras_file`, :class:`KerasFile`, :class:`KerasLayer`,
:class:`KerasImportError`.

The official code released ``se-multi-auc_0.9111-tfrmodel.hdf5`` and
``rese-multi-auc_0.9113-tfrmodel.hdf5``, written by Keras 2.0.5's ``model.save``. They are read
with h5py alone (no TensorFlow). Only layers with weights matter: ``Conv1D``, ``Dense`` and
``BatchNormalization``; :func:`read_keras_file` returns them in the official code's
*construction* order (specification §2), which :mod:`resemul_core.model.keras_import` matches
with our model's layers.

How the file's layers are put into that order:

* with a model config (``model.save`` files): from the layer graph (``inbound_nodes``), so the
  order Keras stored the layers in (by graph depth, which interleaves a block's shortcut with its
  main path) and the layer names do not matter; a block's projection shortcut comes before its
  main path, as the official code creates it first;
* without one (``save_weights`` files): by the number Keras appends to each auto-generated name
  (``conv1d_7``), which counts the layers of one class in creation order whatever the offset;
  if the names are not numbered that way, the file's ``layer_names`` order is taken as the
  construction order.

Later writers (Keras 2.1 to 2.15, tf.keras, and Keras 3's legacy HDF5 layout) store the same
model with other spellings, all read here: attributes as ``bytes`` or ``str``; ``layer_names``
split into ``layer_names0``, ``layer_names1``, ... when it outgrows an HDF5 object header;
weight names with or without the ``:0`` suffix; tf.keras names (``conv1d``, ``conv1d_1``);
``batch_input_shape`` or ``batch_shape``; ``inbound_nodes`` as lists or as tensors carrying a
``keras_history``. Layer configs are reduced to Keras 2.0.5's spelling by
``_plain_config`` (sizes as lists, activation and dtype as names); a BatchNormalization's
``axis`` (``-1`` or, from tf.keras, ``[2]``) is left as stored, since what it means depends on
the rank of the layer's input, which :mod:`~resemul_core.model.keras_import` knows.
"""

from __future__ import annotations

import errno
import heapq
import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["KerasImportError", "KerasLayer", "KerasFile", "read_keras_file"]

log = logging.getLogger(__name__)

_WEIGHTED = ("Conv1D", "Dense", "BatchNormalization")
# Keras' canonical weight order within a layer, used when weight names are not recognisable.
_WEIGHT_ORDER = {
    "Conv1D": ("kernel", "bias"),
    "Dense": ("kernel", "bias"),
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
}
_NUMBERED = re.compile(r"(?P<stem>.*?)(?:_(?P<uid>\d+))?")
# Config entries that Keras writes as one-element lists but that may also be plain ints.
_SIZES = ("kernel_size", "strides", "dilation_rate", "pool_size")


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
        config: the layer's Keras config in Keras 2.0.5's spelling (``{}`` when the file has
            no model config).
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
    """A decoded attribute, or None; a list that Keras split into ``key0``, ``key1``, ...
    (it does so past HDF5's 64 KiB object-header limit) is joined again."""
    if key in attrs:
        return _text(attrs[key])
    chunks: list[Any] = []
    while f"{key}{len(chunks)}" in attrs:
        chunks.append(_text(attrs[f"{key}{len(chunks)}"]))
    return [v for c in chunks for v in (c if isinstance(c, list) else [c])] if chunks else None


def _plain_config(config: dict[str, Any]) -> dict[str, Any]:
    """A layer's config in Keras 2.0.5's spelling, whichever Keras version wrote it.

    Sizes given as an int become one-element lists (``3`` -> ``[3]``); an activation or dtype
    written as a serialized object becomes its name: ``{"class_name": "Policy", "config":
    {"name": "float32"}}`` -> ``"float32"``, ``{"class_name": "function", "config": "relu"}``
    -> ``"relu"``, an unknown object -> its class name (so a custom activation is reported,
    not skipped).
    """
    plain = dict(config)
    for key in _SIZES:
        if isinstance(plain.get(key), int):
            plain[key] = [plain[key]]
    for key in ("activation", "dtype"):
        value = plain.get(key)
        if isinstance(value, dict):
            inner = value.get("config")
            name = inner.get("name") if isinstance(inner, dict) else inner
            plain[key] = name if isinstance(name, str) else value.get("class_name")
    return plain


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
    short, canonical = [_short_name(n) for n in names], _WEIGHT_ORDER[class_name]
    if sorted(short) != sorted(canonical) and len(short) == len(canonical):
        short = list(canonical)  # unrecognised names: Keras' positional order
    # With another number of weights the names stay, and the shape check reports the layer.
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
    if config_layers is not None:
        config_layers = [
            {**layer, "config": _plain_config(layer.get("config") or {})} for layer in config_layers
        ]
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
        IsADirectoryError: ``path`` is a directory.
        PermissionError: the file may not be read.
        KerasImportError: not an HDF5 file, truncated, or no Keras weights in it.
    """
    import h5py  # only this module needs it

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a Keras HDF5 file", str(path))
    if not path.is_file():
        raise FileNotFoundError(f"Keras file {path} does not exist")
    path.open("rb").close()  # an unreadable file is a PermissionError, not "not HDF5"
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
