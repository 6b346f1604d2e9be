"""resemul_core: sample-level CNNs for music auto-tagging (Kim, Lee & Nam, ICASSP 2018).

The twelve model variants are listed in :data:`VARIANTS` and built with :func:`build_model`.
The rest of the public API, one module per concern:

* data: :func:`load_audio`, :func:`prepare_dataset`, :func:`open_store`,
  :class:`SegmentDataset`, :class:`ClipDataset` (modules ``audio``, ``sources``, ``prepare``,
  ``store``, ``datasets``, ``synth``);
* training and evaluation: :data:`PROFILES`, ``train.train``, :func:`evaluate_checkpoint`,
  :func:`tag_metrics`, :class:`Tagger` (``train``, ``runs``, ``evaluate``, ``tagger``);
* analysis: :func:`extract_excitations`, :func:`summarize_excitations` (``excitations``,
  ``plots``); the authors' Keras weights: :func:`import_keras` (``keras_import``).
"""

from .audio import AudioDecodeError, load_audio, segment_waveform
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .datasets import ClipDataset, SegmentDataset
from .evaluate import PAPER_RESULTS, evaluate_checkpoint, results_table, tag_metrics
from .excitations import extract_excitations, load_excitations, summarize_excitations
from .keras_import import import_keras
from .model import (
    VARIANTS,
    ModelConfig,
    SampleCNN,
    build_model,
    count_parameters,
    model_config,
    variant_table,
)
from .prepare import prepare_dataset, prepare_store
from .store import SegmentStore, open_store, write_store_from_arrays
from .tagger import Tagger
from .train import PROFILES, TrainConfig

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "ModelConfig",
    "SampleCNN",
    "build_model",
    "count_parameters",
    "model_config",
    "variant_table",
    "AudioDecodeError",
    "load_audio",
    "segment_waveform",
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
    "SegmentStore",
    "open_store",
    "write_store_from_arrays",
    "prepare_dataset",
    "prepare_store",
    "SegmentDataset",
    "ClipDataset",
    "PROFILES",
    "TrainConfig",
    "PAPER_RESULTS",
    "evaluate_checkpoint",
    "results_table",
    "tag_metrics",
    "Tagger",
    "extract_excitations",
    "load_excitations",
    "summarize_excitations",
    "import_keras",
    "__version__",
]
