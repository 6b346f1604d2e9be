"""Keras import: HDF5 fixtures in the layouts of Keras 2.0.5 to 2.15, checked against a NumPy
Keras forward; and the cache of converted checkpoints.

The fixtures are built here, layer by layer, the way the official code builds its model
(specification §2; a residual block's projection shortcut is created before its main path),
named the way Keras names layers, stored in the order Keras 2.0.5 stores them (by graph depth,
which interleaves a block's shortcut with its main path) and written with h5py in the
``model.save`` or ``save_weights`` layout, spelled as Keras 2.0.5, tf.keras 2.15 or Keras 3's
legacy HDF5 writer spells it (``write_keras(style=...)``). The reference output is a NumPy
re-implementation of the Keras layers' inference semantics, channels-last.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from resemul_core import build_model
from resemul_core.data.tags import MTAT_TOP50_TAGS
from resemul_core.interfaces.cli import main
from resemul_core.model import keras_import as keras_import_module
from resemul_core.model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from resemul_core.model.keras_file import KerasImportError, read_keras_file
from resemul_core.model.keras_import import (
    cached_keras_checkpoint,
    convert_keras_checkpoint,
    import_keras,
    keras_layer_table,
)

SMALL = {"width": 1 / 16, "num_blocks": 5, "alpha": 4.0}
LENGTH = 3**6  # samples read by a 5-block model

_SNAKE = {
    "InputLayer": "input",
    "Reshape": "reshape",
    "Conv1D": "conv1d",
    "BatchNormalization": "batch_normalization",
    "Activation": "activation",
    "Dropout": "dropout",
    "MaxPooling1D": "max_pooling1d",
    "GlobalAveragePooling1D": "global_average_pooling1d",
    "GlobalMaxPooling1D": "global_max_pooling1d",
    "Dense": "dense",
    "Multiply": "multiply",
    "Add": "add",
    "Concatenate": "concatenate",
}


@dataclass
class Layer:
    name: str
    class_name: str
    config: dict
    inputs: list[str]
    weights: dict[str, np.ndarray] = field(default_factory=dict)


class KerasGraph:
    """A Keras functional model as a list of layers in construction order.

    ``naming``: ``"keras2"`` (``conv1d_1`` ... counted from ``first_uid``), ``"tf"``
    (``conv1d``, ``conv1d_1``, ...) or ``"custom"`` (names that carry no order).
    """

    def __init__(self, rng, *, naming="keras2", first_uid=1, eps=1e-3):
        self.rng, self.naming, self.first_uid, self.eps = rng, naming, first_uid, eps
        self.layers: list[Layer] = []
        self.counts: Counter = Counter()

    def add(self, class_name, inputs, config=None, weights=None):
        stem = _SNAKE[class_name]
        n = self.counts[stem]
        self.counts[stem] += 1
        if self.naming == "keras2":
            name = f"{stem}_{n + self.first_uid}"
        elif self.naming == "tf":
            name = stem if n == 0 else f"{stem}_{n}"
        else:
            name = f"{stem}-{self.rng.integers(1 << 40):010x}"
        self.layers.append(Layer(name, class_name, dict(config or {}), list(inputs), weights or {}))
        return name

    def conv(self, x, c_in, c_out, k, *, strides=1, padding="same"):
        bound = np.sqrt(3.0 / (k * c_in))
        weights = {
            "kernel": self.rng.uniform(-bound, bound, (k, c_in, c_out)).astype(np.float32),
            "bias": self.rng.normal(0, 0.1, c_out).astype(np.float32),
        }
        config = {"filters": c_out, "kernel_size": [k], "strides": [strides], "padding": padding}
        return self.add("Conv1D", [x], {**config, "activation": "linear"}, weights)

    def bn(self, x, c):
        weights = {
            "gamma": self.rng.uniform(0.8, 1.5, c).astype(np.float32),
            "beta": self.rng.normal(0, 0.2, c).astype(np.float32),
            "moving_mean": self.rng.normal(0, 0.2, c).astype(np.float32),
            "moving_variance": self.rng.uniform(0.3, 1.5, c).astype(np.float32),
        }
        config = {"axis": -1, "epsilon": self.eps, "center": True, "scale": True}
        return self.add("BatchNormalization", [x], config, weights)

    def dense(self, x, n_in, n_out, activation):
        bound = np.sqrt(3.0 / n_in)
        weights = {
            "kernel": self.rng.uniform(-bound, bound, (n_in, n_out)).astype(np.float32),
            "bias": self.rng.normal(0, 0.2, n_out).astype(np.float32),
        }
        return self.add("Dense", [x], {"units": n_out, "activation": activation}, weights)

    def relu(self, x):
        return self.add("Activation", [x], {"activation": "relu"})

    def pool(self, x):
        return self.add("MaxPooling1D", [x], {"pool_size": [3], "strides": [3]})


def _se(g, x, c, alpha):
    s = g.add("GlobalAveragePooling1D", [x])
    s = g.add("Reshape", [s], {"target_shape": [1, c]})
    s = g.dense(s, c, round(alpha * c), "relu")
    s = g.dense(s, round(alpha * c), c, "sigmoid")
    return g.add("Multiply", [x, s])


def _plain_block(g, x, c_in, c, alpha, *, se):
    x = g.pool(g.relu(g.bn(g.conv(x, c_in, c, 3), c)))
    return _se(g, x, c, alpha) if se else x


def _residual_block(g, x, c_in, c, alpha, *, convs, se):
    shortcut = g.bn(g.conv(x, c_in, c, 1), c) if c_in != c else x
    y = x
    if convs == 2:
        y = g.add("Dropout", [g.relu(g.bn(g.conv(y, c_in, c, 3), c))], {"rate": 0.2})
    y = g.bn(g.conv(y, c if convs == 2 else c_in, c, 3), c)
    if se:
        y = _se(g, y, c, alpha)
    return g.pool(g.relu(g.add("Add", [shortcut, y])))


def build_official(variant, rng, *, width, num_blocks, alpha, num_tags=50, **graph_options):
    """The official model (specification §2) for one of our variant names, with random weights."""
    block, _, head = variant.partition("-")
    g = KerasGraph(rng, **graph_options)

    def scale(c):
        return max(1, round(c * width))

    x = g.add("InputLayer", [], {"batch_input_shape": [23, 3 ** (num_blocks + 1)]})
    x = g.add("Reshape", [x], {"target_shape": [-1, 1]})
    c = scale(128)
    x = g.relu(g.bn(g.conv(x, 1, c, 3, strides=3, padding="valid"), c))
    outputs, widths = [], []
    for i in range(num_blocks):
        c_out = scale(128 * (2 if i >= 2 else 1) * (2 if i == num_blocks - 1 else 1))
        if block in ("basic", "se"):
            x = _plain_block(g, x, c, c_out, alpha, se=block == "se")
        else:
            convs = int(block[-1])
            x = _residual_block(g, x, c, c_out, alpha, convs=convs, se=block.startswith("rese"))
        c = c_out
        outputs.append(x)
        widths.append(c)
    if head == "multi":
        pooled = [g.add("GlobalMaxPooling1D", [o]) for o in outputs[-3:]]
        x, d = g.add("Concatenate", pooled, {"axis": -1}), sum(widths[-3:])
    else:
        x, d = g.add("GlobalMaxPooling1D", [x]), c
    x = g.relu(g.bn(g.dense(x, d, d, "linear"), d))
    x = g.add("Dropout", [x], {"rate": 0.5})
    g.dense(x, d, num_tags, "sigmoid")
    return g


def keras_205_order(layers):
    """The order Keras 2.0.5 lists a functional model's layers in (``model.layers``).

    Deepest first, depth being the longest path to the output; ties in order of first visit
    by a depth-first walk from the output that follows each layer's inputs in order.
    """
    parents = {layer.name: layer.inputs for layer in layers}
    children = {layer.name: [] for layer in layers}
    for layer in layers:
        for p in layer.inputs:
            children[p].append(layer.name)
    depth = {}
    for layer in reversed(layers):  # construction order is topological
        depth[layer.name] = max((depth[c] + 1 for c in children[layer.name]), default=0)
    visit_index: dict[str, int] = {}

    def visit(name):
        if name not in visit_index:
            visit_index[name] = len(visit_index)
            for p in parents[name]:
                visit(p)

    visit(layers[-1].name)
    return sorted(layers, key=lambda layer: (-depth[layer.name], visit_index[layer.name]))


#: ``keras_version`` and the dtype entry of every layer config, by writer ("2.0.5" has none;
#: tf.keras writes a policy object once a global dtype policy is set).
KERAS_VERSIONS = {"2.0.5": "2.0.5", "tf2": "2.15.0", "keras3": "3.3.3"}
_DTYPES = {
    "tf2": {"class_name": "Policy", "config": {"name": "float32"}},
    "keras3": {
        "module": "keras",
        "class_name": "DTypePolicy",
        "config": {"name": "float32"},
        "registered_name": None,
    },
}


def styled_config(layer, by_name, style, *, int_sizes=False, activation_objects=False):
    """``layer``'s config as the ``style`` writer spells it (see :func:`write_keras`)."""
    config = {"name": layer.name, "trainable": True, **layer.config}
    kind = layer.class_name
    if style != "2.0.5":
        config["dtype"] = _DTYPES[style]
        if kind == "InputLayer":  # no fixed batch size; Keras 3 renamed the entry
            shape = [None, *config.pop("batch_input_shape")[1:]]
            config["batch_shape" if style == "keras3" else "batch_input_shape"] = shape
        if kind == "Conv1D":
            config.update(dilation_rate=[1], data_format="channels_last", groups=1, use_bias=True)
    if kind == "BatchNormalization" and style == "tf2" and config["axis"] == -1:
        # tf.keras stores the axis resolved when the layer was built, as a list.
        rank = 2 if by_name[layer.inputs[0]].class_name == "Dense" else 3
        config["axis"] = [rank - 1]
    if int_sizes:
        for key in ("kernel_size", "strides", "pool_size"):
            if isinstance(config.get(key), list):
                config[key] = config[key][0]
    if activation_objects and isinstance(config.get("activation"), str):
        # How Keras' newer serializer writes a function when not reduced to its name.
        config["activation"] = {
            "module": "keras.activations",
            "class_name": "function",
            "config": config["activation"],
            "registered_name": "function",
        }
    return config


def _inbound_nodes(layer, style):
    if not layer.inputs:
        return []
    if style != "keras3":
        return [[[p, 0, 0, {}] for p in layer.inputs]]
    tensors = [
        {
            "class_name": "__keras_tensor__",
            "config": {"shape": [None], "dtype": "float32", "keras_history": [p, 0, 0]},
        }
        for p in layer.inputs
    ]
    return [{"args": tensors if len(tensors) == 1 else [tensors], "kwargs": {}}]


def write_keras(
    path,
    g,
    *,
    layout="model",
    order="keras",
    text="bytes",
    style="2.0.5",
    split_names=False,
    **config_options,
):
    """Write ``g`` as Keras does: ``model.save`` (config, ``model_weights``) or ``save_weights``.

    ``style``: the writer: ``"2.0.5"`` (the release), ``"tf2"`` (tf.keras 2.15: a
    ``Functional`` config, BN axes as lists, dtype policies, no fixed batch size) or
    ``"keras3"`` (``batch_shape``, ``inbound_nodes`` as tensors with a ``keras_history``,
    weight names without ``:0``). ``text``: attributes as ``"bytes"`` or ``"str"``.
    ``split_names``: ``layer_names`` in two chunks, as Keras writes it past 64 KiB.
    ``config_options``: ``int_sizes`` (sizes as ints), ``activation_objects``.
    """
    layers = keras_205_order(g.layers) if order == "keras" else list(g.layers)
    by_name = {layer.name: layer for layer in g.layers}

    def enc(s):
        return s.encode("utf8") if text == "bytes" else s

    entries = [
        {
            "name": layer.name,
            "class_name": layer.class_name,
            "config": styled_config(layer, by_name, style, **config_options),
            "inbound_nodes": _inbound_nodes(layer, style),
        }
        for layer in layers
    ]
    if style == "keras3":
        entries = [{"module": "keras.layers", "registered_name": None, **e} for e in entries]
    config = {
        "class_name": "TFRecordModel" if style == "2.0.5" else "Functional",
        "config": {
            "name": "tf_record_model_1" if style == "2.0.5" else "model",
            "layers": entries,
            "input_layers": [[g.layers[0].name, 0, 0]],
            "output_layers": [[g.layers[-1].name, 0, 0]],
        },
    }
    if style == "tf2":
        config.update(keras_version=KERAS_VERSIONS[style], backend="tensorflow")
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = enc(KERAS_VERSIONS[style])
        f.attrs["backend"] = enc("tensorflow")
        if layout == "model":
            f.attrs["model_config"] = enc(json.dumps(config))
            group = f.create_group("model_weights")
        else:
            group = f
        names = [enc(layer.name) for layer in layers]
        if split_names:
            group.attrs["layer_names0"] = names[: len(names) // 2]
            group.attrs["layer_names1"] = names[len(names) // 2 :]
        else:
            group.attrs["layer_names"] = names
        suffix = "" if style == "keras3" else ":0"
        for layer in layers:
            layer_group = group.create_group(layer.name)
            names = [f"{layer.name}/{k}{suffix}" for k in layer.weights]
            layer_group.attrs["weight_names"] = [enc(n) for n in names]
            for n, array in zip(names, layer.weights.values(), strict=True):
                layer_group.create_dataset(n, data=array)
    return path


def _conv1d(x, kernel, bias, strides, padding):
    k = kernel.shape[0]
    if padding == "same":  # TensorFlow's split: the extra sample goes to the right
        left = (k - 1) // 2
        x = np.pad(x, ((0, 0), (left, k - 1 - left), (0, 0)))
    n = (x.shape[1] - k) // strides + 1
    return bias + sum(
        x[:, j : j + strides * (n - 1) + 1 : strides, :] @ kernel[j] for j in range(k)
    )


def keras_forward(g, x):
    """Every layer's output for waveforms ``x`` ``(B, L)``, channels-last, inference mode.

    Dense layers also store their pre-activation under ``"<name>:linear"``.
    """
    out: dict[str, np.ndarray] = {}
    acts = {"linear": lambda v: v, "relu": lambda v: np.maximum(v, 0)}
    acts["sigmoid"] = lambda v: 1 / (1 + np.exp(-v))
    for layer in g.layers:
        ins, c, w = [out[n] for n in layer.inputs], layer.config, layer.weights
        kind = layer.class_name
        if kind == "InputLayer":
            y = x.astype(np.float64)
        elif kind == "Reshape":
            y = ins[0].reshape((ins[0].shape[0], *c["target_shape"]))
        elif kind == "Conv1D":
            y = _conv1d(ins[0], w["kernel"], w["bias"], c["strides"][0], c["padding"])
        elif kind == "BatchNormalization":
            scale = w["gamma"] / np.sqrt(w["moving_variance"] + c["epsilon"])
            y = (ins[0] - w["moving_mean"]) * scale + w["beta"]
        elif kind == "Activation":
            y = acts[c["activation"]](ins[0])
        elif kind == "Dropout":
            y = ins[0]
        elif kind == "MaxPooling1D":
            b, t, ch = ins[0].shape
            y = ins[0][:, : t // 3 * 3].reshape(b, t // 3, 3, ch).max(axis=2)
        elif kind == "GlobalAveragePooling1D":
            y = ins[0].mean(axis=1)
        elif kind == "GlobalMaxPooling1D":
            y = ins[0].max(axis=1)
        elif kind == "Dense":
            out[f"{layer.name}:linear"] = ins[0] @ w["kernel"] + w["bias"]
            y = acts[c["activation"]](out[f"{layer.name}:linear"])
        elif kind == "Multiply":
            y = ins[0] * ins[1]
        elif kind == "Add":
            y = ins[0] + ins[1]
        elif kind == "Concatenate":
            y = np.concatenate(ins, axis=-1)
        else:
            raise AssertionError(kind)
        out[layer.name] = y
    return out


def _check_against_keras(model, g, *, seed=0):
    """The imported model reproduces the Keras probabilities, logits and SE gates."""
    x = np.random.default_rng(seed).uniform(-1, 1, (3, LENGTH)).astype(np.float32)
    ref = keras_forward(g, x)
    last = g.layers[-1].name
    logits, gates = model.forward_with_gates(torch.from_numpy(x))
    assert ref[f"{last}:linear"].std() > 0.3  # the fixture's outputs are far from constant
    np.testing.assert_allclose(torch.sigmoid(logits).detach().numpy(), ref[last], atol=1e-5)
    np.testing.assert_allclose(logits.detach().numpy(), ref[f"{last}:linear"], atol=1e-4)
    se_gates = [
        ref[layer.name][:, 0, :]
        for layer in g.layers
        if layer.class_name == "Dense"
        and layer.config["activation"] == "sigmoid"
        and layer.name != last
    ]
    assert len(gates) == len(se_gates)
    for ours, theirs in zip(gates, se_gates, strict=True):
        np.testing.assert_allclose(ours.detach().numpy(), theirs, atol=1e-5)


@pytest.mark.parametrize(
    ("variant", "layout", "naming", "order_source"),
    [
        ("se-multi", "model", "keras2", "model config"),
        ("se-multi", "weights", "keras2", "layer numbering"),
        ("rese2-multi", "model", "keras2", "model config"),
        ("rese2-multi", "weights", "keras2", "layer numbering"),
        ("rese2-multi", "model", "custom", "model config"),  # only the graph gives the order
        ("rese2-multi", "weights", "tf", "layer numbering"),
        ("res2-multi", "model", "keras2", "model config"),
        ("res1-multi", "model", "custom", "model config"),  # equal-length residual branches
        ("basic", "weights", "keras2", "layer numbering"),
        ("rese2", "model", "tf", "model config"),
    ],
)
def test_import_reproduces_the_keras_forward_pass(tmp_path, variant, layout, naming, order_source):
    g = build_official(variant, np.random.default_rng(1), naming=naming, first_uid=7, **SMALL)
    path = write_keras(tmp_path / "model.hdf5", g, layout=layout, text="bytes")
    assert read_keras_file(path).order_source == order_source
    model = import_keras(path, variant=variant, **SMALL)
    assert not model.training
    _check_against_keras(model, g)


@pytest.mark.parametrize("variant", ["se-multi", "res1", "rese2-multi"])
def test_layer_table_names_every_weighted_module_once(variant):
    model = build_model(variant, **SMALL)
    table = keras_layer_table(model)
    weighted = {
        name
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Linear, torch.nn.BatchNorm1d))
    }
    names = [row[0] for row in table]
    assert len(names) == len(set(names)) and set(names) == weighted
    g = build_official(variant, np.random.default_rng(0), **SMALL)
    keras = [layer.class_name for layer in g.layers if layer.weights]  # construction order
    assert [row[1] for row in table] == keras
    if variant == "rese2-multi":
        assert names[2:6] == ["blocks.0.conv1", "blocks.0.bn1", "blocks.0.conv2", "blocks.0.bn2"]
        assert names[names.index("blocks.2.shortcut.conv") + 2] == "blocks.2.conv1"


def test_fixture_stores_the_shortcut_out_of_construction_order():
    # Keeps the tests above meaningful: the file order is not the construction order.
    g = build_official("rese2-multi", np.random.default_rng(0), **SMALL)
    built = [layer.name for layer in g.layers if layer.weights]
    stored = [layer.name for layer in keras_205_order(g.layers) if layer.weights]
    assert sorted(built) == sorted(stored) and built != stored


def test_weights_file_without_numbered_names_is_read_in_file_order(tmp_path):
    g = build_official("rese2-multi", np.random.default_rng(2), naming="custom", **SMALL)
    path = write_keras(tmp_path / "w.h5", g, layout="weights", order="construction", text="str")
    assert read_keras_file(path).order_source == "file order"
    _check_against_keras(import_keras(path, variant="rese2-multi", **SMALL), g)


def test_tensors_are_transposed_from_the_keras_layout(tmp_path):
    g = build_official("se-multi", np.random.default_rng(3), **SMALL)
    model = import_keras(write_keras(tmp_path / "m.hdf5", g), variant="se-multi", **SMALL)
    by_name = {layer.name: layer.weights for layer in g.layers}
    stem = model.stem.conv.weight.detach().numpy()
    np.testing.assert_array_equal(stem, by_name["conv1d_1"]["kernel"].transpose(2, 1, 0))
    head = model.head.fc1.weight.detach().numpy()
    np.testing.assert_array_equal(head, by_name["dense_11"]["kernel"].T)
    np.testing.assert_array_equal(
        model.blocks[0].bn.running_var.numpy(), by_name["batch_normalization_2"]["moving_variance"]
    )


def test_wrong_variant_names_the_first_layer_that_differs(tmp_path):
    g = build_official("se-multi", np.random.default_rng(4), **SMALL)
    path = write_keras(tmp_path / "se.hdf5", g)
    with pytest.raises(KerasImportError, match=r"se\.hdf5.*'dense_1' \(Dense\).*block 1 conv 2"):
        import_keras(path, variant="rese2-multi", **SMALL)
    with pytest.raises(KerasImportError, match=r"'dense_1' \(Dense\).*block 2 conv \(Conv1D"):
        import_keras(path, variant="basic-multi", **SMALL)
    weights = write_keras(tmp_path / "se.h5", g, layout="weights")  # classes matched apart
    with pytest.raises(KerasImportError, match=r"'conv1d_4'.*block 2 conv 1.*\(3, 8, 16\)"):
        import_keras(weights, variant="rese2-multi", **SMALL)
    with pytest.raises(KerasImportError, match=r"'dense_1'.*head dense.*\(64, 64\).*\(8, 32\)"):
        import_keras(weights, variant="basic-multi", **SMALL)
    g = build_official("basic-multi", np.random.default_rng(4), **SMALL)
    g.dense(g.layers[-1].name, 50, 50, "sigmoid")  # one layer more than the variant has
    with pytest.raises(KerasImportError, match=r"1 weighted layer\(s\) left over.*'dense_3'"):
        import_keras(write_keras(tmp_path / "extra.hdf5", g), variant="basic-multi", **SMALL)


def test_shape_mismatch_names_the_layer_and_both_shapes(tmp_path):
    g = build_official("rese2-multi", np.random.default_rng(5), **SMALL)
    path = write_keras(tmp_path / "m.hdf5", g)
    with h5py.File(path, "a") as f:
        group = f["model_weights/conv1d_5"]
        del group["conv1d_5/kernel:0"]
        group.create_dataset("conv1d_5/kernel:0", data=np.zeros((3, 8, 9), np.float32))
    with pytest.raises(KerasImportError) as err:
        import_keras(path, variant="rese2-multi", **SMALL)
    message = str(err.value)
    assert "'conv1d_5'" in message and "(3, 8, 8)" in message and "(3, 8, 9)" in message
    with pytest.raises(KerasImportError, match=r"'conv1d_1'.*\(3, 1, 16\).*\(3, 1, 8\)"):
        import_keras(
            write_keras(tmp_path / "ok.hdf5", g), variant="rese2-multi", **{**SMALL, "width": 1 / 8}
        )


def test_unreadable_files_fail_clearly(tmp_path):
    g = build_official("se-multi", np.random.default_rng(6), **SMALL)
    path = write_keras(tmp_path / "full.hdf5", g)
    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(KerasImportError, match="truncated.hdf5.*truncated"):
        import_keras(truncated, variant="se-multi", **SMALL)
    text = tmp_path / "notes.hdf5"
    text.write_text("not a model")
    with pytest.raises(KerasImportError, match="notes.hdf5 is not a readable HDF5 file"):
        import_keras(text, variant="se-multi")
    with h5py.File(tmp_path / "data.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(KerasImportError, match="data.h5 .*no Keras weights"):
        import_keras(tmp_path / "data.h5", variant="se-multi")
    with pytest.raises(FileNotFoundError, match="missing.hdf5"):
        import_keras(tmp_path / "missing.hdf5", variant="se-multi")


def test_config_is_checked_where_shapes_cannot_tell(tmp_path):
    g = build_official("se", np.random.default_rng(7), eps=1e-5, **SMALL)
    path = write_keras(tmp_path / "eps.hdf5", g)
    model = import_keras(path, variant="se", **SMALL)  # the file's epsilon is adopted
    assert model.config.bn_eps == 1e-5 and model.stem.bn.eps == 1e-5
    _check_against_keras(model, g)
    with pytest.raises(KerasImportError, match="'batch_normalization_1'.*epsilon 1e-05"):
        import_keras(path, variant="se", bn_eps=1e-3, **SMALL)
    g.layers[-1].config["activation"] = "softmax"
    with pytest.raises(KerasImportError, match="'dense_12'.*activation 'softmax'"):
        import_keras(write_keras(tmp_path / "act.hdf5", g), variant="se", **SMALL)
    with pytest.raises(KerasImportError, match="729-sample inputs.*243"):
        import_keras(path, variant="se", **{**SMALL, "num_blocks": 4})


def test_cli_writes_a_checkpoint_with_the_official_tag_order(tmp_path, capsys):
    g = build_official("rese2-multi", np.random.default_rng(8), **SMALL)
    path = write_keras(tmp_path / "rese-multi-auc_0.9113-tfrmodel.hdf5", g)
    out = tmp_path / "ckpt" / "rese2-multi.pt"
    argv = ["import-keras", str(path), "--variant", "rese2-multi", "--out", str(out)]
    options = ["--width", "0.0625", "--num-blocks", "5", "--alpha", "4"]
    assert main(argv + options) == 0
    assert str(out) in capsys.readouterr().out
    model, payload = load_checkpoint(out)
    assert payload["tags"] == list(MTAT_TOP50_TAGS)
    info = payload["keras_import"]
    assert info["source"] == path.name and info["keras_version"] == "2.0.5"
    assert info["layer_order"] == "model config" and len(info["sha256"]) == 64
    _check_against_keras(model, g)
    wrong = ["import-keras", str(path), "--variant", "se-multi", "--out", str(out)]
    assert main(wrong + options) == 2
    assert "conv1d" in capsys.readouterr().err


def test_convert_checkpoint_without_tags(tmp_path):
    g = build_official("se-multi", np.random.default_rng(9), num_tags=10, **SMALL)
    path = write_keras(tmp_path / "m.hdf5", g, layout="weights")
    out = convert_keras_checkpoint(
        path, tmp_path / "c.pt", variant="se-multi", tags=None, num_tags=10, **SMALL
    )
    model, payload = load_checkpoint(out)
    assert payload["tags"] is None and model.config.num_tags == 10
    assert payload["keras_import"]["layer_order"] == "layer numbering"


# --- files written by later Keras versions ----------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "style", "layout", "text", "options"),
    [
        ("se-multi", "tf2", "model", "str", {}),
        ("rese2-multi", "tf2", "model", "bytes", {"split_names": True}),
        ("rese2-multi", "tf2", "weights", "str", {}),
        ("se-multi", "keras3", "model", "str", {"activation_objects": True}),
        ("rese2-multi", "keras3", "model", "bytes", {"int_sizes": True}),
        ("res1-multi", "2.0.5", "model", "str", {"int_sizes": True, "split_names": True}),
    ],
)
def test_files_of_later_keras_versions_import(tmp_path, variant, style, layout, text, options):
    g = build_official(variant, np.random.default_rng(12), naming="tf", **SMALL)
    path = write_keras(tmp_path / "m.h5", g, layout=layout, text=text, style=style, **options)
    kfile = read_keras_file(path)
    assert kfile.keras_version == KERAS_VERSIONS[style] and kfile.backend == "tensorflow"
    if layout == "model":
        assert kfile.order_source == "model config" and kfile.input_length == LENGTH
        configs = [layer.config for layer in kfile.layers]
        assert {c.get("dtype", "float32") for c in configs} == {"float32"}  # policies: names
        assert all(isinstance(c.get("activation", ""), str) for c in configs)
    _check_against_keras(import_keras(path, variant=variant, **SMALL), g)


def test_tf2_fixture_writes_bn_axes_as_lists_of_the_input_rank(tmp_path):
    # Keeps the test above meaningful: the tf.keras files hold [2] and [1], not -1.
    g = build_official("se-multi", np.random.default_rng(12), naming="tf", **SMALL)
    kfile = read_keras_file(write_keras(tmp_path / "m.h5", g, style="tf2"))
    axes = [layer.config["axis"] for layer in kfile.layers if "axis" in layer.config]
    assert axes[-1] == [1] and set(map(tuple, axes[:-1])) == {(2,)}


def _bn(g, which):
    norms = [layer for layer in g.layers if layer.class_name == "BatchNormalization"]
    return norms[0] if which == "stem" else norms[-1]


@pytest.mark.parametrize(
    ("which", "axis"),
    [("stem", [2]), ("stem", [-1]), ("stem", 2), ("head", 1), ("head", [1]), ("head", [-1])],
)
def test_bn_axis_is_read_against_the_rank_of_its_input(tmp_path, which, axis):
    g = build_official("se-multi", np.random.default_rng(13), **SMALL)
    _bn(g, which).config["axis"] = axis
    path = write_keras(tmp_path / "m.hdf5", g)
    _check_against_keras(import_keras(path, variant="se-multi", **SMALL), g)


@pytest.mark.parametrize(
    ("which", "axis"),
    [
        ("stem", [1]),
        ("stem", 1),
        ("stem", -2),
        ("stem", [2, 1]),
        ("stem", "2"),
        ("head", 2),
        ("head", [2]),
        ("head", [0]),
    ],
)
def test_bn_over_another_axis_is_refused(tmp_path, which, axis):
    g = build_official("se-multi", np.random.default_rng(13), **SMALL)
    layer = _bn(g, which)
    layer.config["axis"] = axis
    path = write_keras(tmp_path / "axis.hdf5", g)
    with pytest.raises(KerasImportError) as err:
        import_keras(path, variant="se-multi", **SMALL)
    message = str(err.value)
    assert message.startswith(f"{path}: Keras layer {layer.name!r} ({which} BN)")
    assert f"axis {axis!r}" in message and message.count(". ") == 0
    shape = "(batch, time, channels)" if which == "stem" else "(batch, features)"
    assert shape in message


def test_conv_arithmetic_the_shapes_cannot_show_is_checked(tmp_path):
    g = build_official("se-multi", np.random.default_rng(14), **SMALL)
    stem = next(layer for layer in g.layers if layer.class_name == "Conv1D")
    stem.config["data_format"] = "channels_first"
    with pytest.raises(KerasImportError, match=r"'conv1d_1' \(stem conv\).*'channels_first'"):
        import_keras(write_keras(tmp_path / "cf.hdf5", g), variant="se-multi", **SMALL)
    stem.config.update(data_format="channels_last", dilation_rate=2)
    with pytest.raises(KerasImportError, match=r"'conv1d_1'.*dilation rate 2"):
        import_keras(write_keras(tmp_path / "d.hdf5", g), variant="se-multi", **SMALL)


def test_a_layer_with_an_extra_weight_is_refused(tmp_path):
    g = build_official("se-multi", np.random.default_rng(15), **SMALL)
    path = write_keras(tmp_path / "m.hdf5", g)
    with h5py.File(path, "a") as f:  # e.g. a BN trained with batch renormalisation
        group = f["model_weights/batch_normalization_1"]
        extra = "batch_normalization_1/renorm_mean:0"
        group.create_dataset(extra, data=np.zeros(8, np.float32))
        names = [f"batch_normalization_1/{k}:0" for k in ("gamma", "beta")]
        names += [f"batch_normalization_1/moving_{k}:0" for k in ("mean", "variance")]
        group.attrs["weight_names"] = [n.encode() for n in [*names, extra]]
    with pytest.raises(KerasImportError, match=r"'batch_normalization_1'.*'renorm_mean'"):
        import_keras(path, variant="se-multi", **SMALL)


# --- converted once, then cached ----------------------------------------------------------------

LOGGER = "resemul_core.model.keras_import"


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _count_conversions(monkeypatch):
    """Route the cache's conversions through a counter; the list gets each output path."""
    calls, real = [], convert_keras_checkpoint

    def counting(path, out, **kwargs):
        calls.append(Path(out))
        return real(path, out, **kwargs)

    monkeypatch.setattr(keras_import_module, "convert_keras_checkpoint", counting)
    return calls


def _fake_conversions(monkeypatch):
    """A stand-in converter for the naming tests: a fresh small model of the asked variant,
    recorded as the file's conversion (the cache reads only that record)."""
    calls = []

    def fake(path, out, *, variant, tags, **options):
        calls.append(Path(out))
        model = build_model(variant, **SMALL)
        record = {"sha256": _sha256(path), "variant": variant}
        return save_checkpoint(out, model=model, tags=tags, keras_import=record)

    monkeypatch.setattr(keras_import_module, "convert_keras_checkpoint", fake)
    return calls


@pytest.fixture
def se_file(tmp_path):
    g = build_official("se-multi", np.random.default_rng(16), **SMALL)
    return g, write_keras(tmp_path / "se-multi-auc_0.9111-tfrmodel.hdf5", g)


def test_cached_conversion_is_made_once_then_reused(tmp_path, monkeypatch, caplog, se_file):
    g, path = se_file
    monkeypatch.setenv("RESEMUL_CACHE", str(tmp_path / "cache"))
    calls = _count_conversions(monkeypatch)
    caplog.set_level(logging.INFO, logger=LOGGER)
    out = cached_keras_checkpoint(path, variant="se-multi", **SMALL)
    sha = _sha256(path)
    # Not the paper's size: a digest of the options follows the variant.
    assert out.parent == tmp_path / "cache" / "keras" and out.name.startswith(
        f"{sha[:16]}-se-multi-"
    )
    assert calls == [out] and f"converted {path} to {out} (cached)" in caplog.messages
    model, payload = load_checkpoint(out)
    assert payload["tags"] == list(MTAT_TOP50_TAGS) and payload["keras_import"]["sha256"] == sha
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, LENGTH)).astype(np.float32))
    direct = import_keras(path, variant="se-multi", **SMALL)
    torch.testing.assert_close(model(x), direct(x), rtol=0, atol=0)
    _check_against_keras(model, g)

    before = out.stat()
    caplog.clear()
    assert cached_keras_checkpoint(path, variant="se-multi", **SMALL) == out
    after = out.stat()
    assert len(calls) == 1 and caplog.messages == [f"using cached conversion {out}"]
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "another file's"])
def test_unusable_cache_entry_is_converted_again(tmp_path, monkeypatch, se_file, damage):
    g, path = se_file
    monkeypatch.setenv("RESEMUL_CACHE", str(tmp_path / "cache"))
    calls = _count_conversions(monkeypatch)
    out = cached_keras_checkpoint(path, variant="se-multi", **SMALL)
    data = bytearray(out.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0xFF
        out.write_bytes(data)
    elif damage == "truncated":
        out.write_bytes(data[: len(data) // 2])
    else:  # a good checkpoint, but of another file
        other = build_official("se-multi", np.random.default_rng(17), **SMALL)
        other_path = write_keras(tmp_path / "other.hdf5", other)
        convert_keras_checkpoint(other_path, out, variant="se-multi", **SMALL)
    if damage != "another file's":
        with pytest.raises(CheckpointError, match="damaged|corrupted"):
            read_checkpoint(out)
    assert cached_keras_checkpoint(path, variant="se-multi", **SMALL) == out
    assert calls == [out, out]
    model, payload = load_checkpoint(out)
    assert payload["keras_import"]["sha256"] == _sha256(path)
    _check_against_keras(model, g)


def test_cache_folder_comes_from_the_argument_or_the_environment(tmp_path, monkeypatch, se_file):
    _, path = se_file
    calls = _fake_conversions(monkeypatch)
    for name in ("RESEMUL_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    entry = f"{_sha256(path)[:16]}-se-multi.pt"  # the paper's size: no options digest
    home = tmp_path / "home" / ".cache" / "resemul" / "keras" / entry
    assert cached_keras_checkpoint(path, variant="se-multi") == home
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    xdg = tmp_path / "xdg" / "resemul" / "keras" / entry
    assert cached_keras_checkpoint(path, variant="se-multi") == xdg
    monkeypatch.setenv("RESEMUL_CACHE", str(tmp_path / "env"))
    assert cached_keras_checkpoint(path, variant="se-multi") == tmp_path / "env" / "keras" / entry
    arg = cached_keras_checkpoint(path, variant="se-multi", cache_dir=tmp_path / "arg")
    assert arg == tmp_path / "arg" / "keras" / entry
    assert calls == [home, xdg, tmp_path / "env" / "keras" / entry, arg]
    assert all(p.is_file() for p in calls)


def test_another_variant_or_changed_file_gets_its_own_entry(tmp_path, monkeypatch, se_file):
    _, path = se_file
    monkeypatch.setenv("RESEMUL_CACHE", str(tmp_path / "cache"))
    calls = _fake_conversions(monkeypatch)
    se = cached_keras_checkpoint(path, variant="se-multi")
    rese = cached_keras_checkpoint(path, variant="rese2-multi")
    assert rese == se.parent / f"{_sha256(path)[:16]}-rese2-multi.pt" and rese != se
    assert load_checkpoint(rese)[0].config.variant == "rese2-multi"
    assert cached_keras_checkpoint(path, variant="se-multi") == se and len(calls) == 2
    write_keras(path, build_official("se-multi", np.random.default_rng(18), **SMALL))
    changed = cached_keras_checkpoint(path, variant="se-multi")
    assert changed.name == f"{_sha256(path)[:16]}-se-multi.pt" and changed != se
    assert se.is_file() and calls == [se, rese, changed]
    with pytest.raises(ValueError, match="unknown variant"):
        cached_keras_checkpoint(path, variant="../se-multi")
    assert sorted(p.name for p in se.parent.iterdir()) == sorted([se.name, rese.name, changed.name])


@pytest.mark.parametrize("how", ["below a file", "disk full"])
def test_unwritable_cache_falls_back_to_a_temporary_file(
    tmp_path, monkeypatch, caplog, se_file, how
):
    g, path = se_file
    if how == "below a file":  # the cache folder cannot be created
        (tmp_path / "a-file").write_text("")
        cache = tmp_path / "a-file" / "cache"
    else:  # the folder is there, but writing the entry fails (as for root too)
        cache = tmp_path / "full"
    monkeypatch.setenv("RESEMUL_CACHE", str(cache))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    calls = _count_conversions(monkeypatch)
    if how == "disk full":
        convert = keras_import_module.convert_keras_checkpoint

        def no_space_in_the_cache(source, out, **options):
            if Path(out).is_relative_to(cache):
                raise OSError(errno.ENOSPC, "No space left on device", str(out))
            return convert(source, out, **options)

        monkeypatch.setattr(keras_import_module, "convert_keras_checkpoint", no_space_in_the_cache)
    caplog.set_level(logging.INFO, logger=LOGGER)
    first = cached_keras_checkpoint(path, variant="se-multi", **SMALL)
    second = cached_keras_checkpoint(path, variant="se-multi", **SMALL)
    assert calls == [first, second] and first != second  # converted each time
    assert first.is_relative_to(tmp_path / "tmp") and second.is_relative_to(tmp_path / "tmp")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(str(cache) in w and str(path) in w for w in warnings)
    _check_against_keras(load_checkpoint(first)[0], g)
    assert not any(p.is_file() for p in cache.rglob("*"))  # nothing partial left in the cache
