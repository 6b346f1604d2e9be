"""resemul_core: sample-level CNNs for music auto-tagging (Kim, Lee & Nam, ICASSP 2018).

The package follows the paper's pipeline, one subpackage per stage; a module may import from
its own stage and the ones before it, never from a later one:

* :mod:`resemul_core.config`, :mod:`resemul_core.files`, :mod:`resemul_core.runtime`: what a run
  is configured by (variants, model, recipe, runtime, profiles), atomic files, and where and
  how a model computes (device, precision);
* :mod:`resemul_core.data`: audio decoding, dataset sources and splits, the segment store;
* :mod:`resemul_core.model`: the blocks, the network, checkpoints, the Keras import;
* :mod:`resemul_core.training`: the recipe's schedule, the loop, the run directory, DDP;
* :mod:`resemul_core.analysis`: evaluation, the excitation analysis, figures;
* :mod:`resemul_core.interfaces`: the pipeline that the command line and the book call, the
  command line itself, and the tagger.

Code cites the book's specification page (``book/specification.md``) as "specification §N.M".

The names below are importable from the package itself; they are loaded on first use, so that
``import resemul_core`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from resemul_core._version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "VARIANTS": "config",
    "ModelConfig": "config",
    "TrainConfig": "config",
    "PROFILES": "profiles",
    "model_config": "config",
    "SampleCNN": "model.sample_cnn",
    "build_model": "model.sample_cnn",
    "count_parameters": "model.sample_cnn",
    "variant_table": "model.sample_cnn",
    "AudioDecodeError": "data.audio",
    "load_audio": "data.audio",
    "segment_waveform": "data.audio",
    "CheckpointError": "model.checkpoint",
    "load_checkpoint": "model.checkpoint",
    "save_checkpoint": "model.checkpoint",
    "SegmentStore": "data.store",
    "open_store": "data.store",
    "write_store_from_arrays": "data.store",
    "prepare_store": "data.prepare",
    "SegmentDataset": "data.datasets",
    "ClipDataset": "data.datasets",
    "train": "training.loop",
    "PAPER_RESULTS": "analysis.evaluate",
    "evaluate_checkpoint": "analysis.evaluate",
    "results_table": "analysis.evaluate",
    "tag_metrics": "analysis.evaluate",
    "extract_excitations": "analysis.excitations",
    "load_excitations": "analysis.excitations",
    "summarize_excitations": "analysis.excitation_stats",
    "import_keras": "model.keras_import",
    "Tagger": "interfaces.tagger",
    "TagResult": "interfaces.tagger",
    "tag_files": "interfaces.tag_files",
    "inference_model": "model.inference",
    "prepare": "interfaces.pipeline",
    "fit": "interfaces.pipeline",
    "evaluate": "interfaces.pipeline",
    "analyse_excitations": "interfaces.pipeline",
    "resolve_config": "profiles",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'resemul_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"resemul_core.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
